"""Glidein submit descriptions, built as dicts and rendered at the end.

    from submit import GlideinRequest, CondorCE, build_description, render_sub_file, to_submit

    request = GlideinRequest(executable=Path("/srv/f/glidein_startup.sh"), log_dir=Path("/srv/f/log"),
                             site="SITE-A", factory="f1", ce=CondorCE("ce.example.org"))
    description = build_description(request)     # dict[str, str]: the submit lines
    print(render_sub_file(description, queue=5))  # a .sub file for condor_submit
    schedd.submit(to_submit(description), count=5)

`submit.description` decides the lines (universe, resources, lifetime and the
periodic_hold / periodic_remove policy, +Splitpilot attributes, a site's
extra lines, reserved keys, refusal of credentials); `submit.quoting` says
what a submit line can carry and quotes ClassAd strings with the bindings'
classad2.quote. Errors are `SubmitDescriptionError` (a UsageError) with
`key`, `problem` and `fix`.
"""

from submit.description import (
    CE_PORT,
    PERIODIC_HOLD,
    PERIODIC_HOLD_REASON,
    PERIODIC_REMOVE,
    CondorCE,
    GlideinRequest,
    build_description,
    check_description,
    render_sub_file,
    to_submit,
)
from submit.errors import Problem, SubmitDescriptionError

__all__ = [
    "CE_PORT", "PERIODIC_HOLD", "PERIODIC_HOLD_REASON", "PERIODIC_REMOVE", "CondorCE", "GlideinRequest",
    "Problem", "SubmitDescriptionError", "build_description", "check_description", "render_sub_file",
    "to_submit",
]
