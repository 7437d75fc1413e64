"""The exit codes of `splitpilot agent`, also a glidein's (the startup script exits with the agent's code).

The glidein factory reads them from the glideins' ExitCode (condor_plugin.factory.factory):
TOKEN_REFUSED and TOKEN_EXPIRED mean that every glidein carrying this
factory's tokens would fail the same way, so it stops submitting for long.
"""

from __future__ import annotations

#: Left normally: idle, lifetime over, drained, or stopped by SIGTERM (preemption).
LEFT = 0
#: Something failed (the message says what).
FAILED = 1
#: Bad usage or input.
USAGE = 2
#: Black hole (the node failed K jobs in a row), or no usable container runtime under `--container-policy require`.
BLACK_HOLE = 3
#: The broker refuses the agent token (PERMISSION_DENIED, UNAUTHENTICATED, or the TLS handshake: another CA, a
#: wrong role), several times in a row: retrying with this token will not help.
TOKEN_REFUSED = 4
#: The agent token had expired when the agent started (queued too long, or the node's clock is wrong).
TOKEN_EXPIRED = 5

#: The software area changed under the agent (a job tampered with what later wrappers run): the agent
#: refused to start a wrapper from it, stopped taking work and reported its end naming the changed path.
SOFTWARE_CHANGED = 6

#: The codes that say "this factory's tokens do not work": a new glidein would fail the same way.
CREDENTIALS = frozenset({TOKEN_REFUSED, TOKEN_EXPIRED})
