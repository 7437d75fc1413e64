"""The factory's decisions: how many glideins to submit, when to back off, which idle ones to remove.

A pure object: fed one `Observation` per cycle (what the schedd and the
broker said, and the time), it returns a `Decision` and keeps only its
backoff state. No HTCondor, no broker, no clock, no sleep: the factory
(condor_plugin.factory.factory) gathers the observation and carries the decision
out, and the tests drive the policy with made-up observations.

The rules:

- Wanted: one glidein per `jobs_per_glidein` waiting jobs that fit a
  glidein's slot (cores, memory, disk, walltime within its lifetime, site,
  platform, container), minus the glideins already idle in the queue;
  bounded by max_queued (idle), max_running (running + idle) and
  max_per_cycle.
- Idle glideins beyond what the waiting jobs want are removed (they would
  start, find nothing and leave): when jobs were taken by running glideins,
  killed, or stopped fitting.
- A site that is draining or disabled gets no glideins, and its idle
  glideins are removed: they would be told to leave at their first call.
- Each glidein that ended is judged by what it did, not how long it ran:
  * its agent token was refused or had expired (exit 4 or 5): every
    glidein with this factory's tokens would fail alike, so the pause is
    backoff_max_s at once, and the message says what to check;
  * it failed (another non-zero exit, or removed by someone else): the
    pause doubles (from backoff_initial_s up to backoff_max_s);
  * it ran no job (the broker's pilot records say so; no record: its agent
    never reached the broker): the pause doubles likewise;
  * it ran at least one job: the pause is reset.
  Glideins this factory removed itself are not judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from htcondor2 import JobStatus

from pilot.agent import exitcodes

#: Site states in which the site takes glideins: "enabled", and "unknown" (the factory could not learn it:
#: then it is not held back). Any other ("draining", "disabled", "draining or disabled") closes the site.
OPEN_STATES = ("enabled", "unknown")


@dataclass(frozen=True)
class PolicySettings:
    max_queued: int = 10            # glideins idle in the queue at most
    max_running: int = 50           # glideins running (and idle) at most
    max_per_cycle: int = 5          # submitted in one cycle at most
    jobs_per_glidein: int = 1       # waiting jobs one new glidein is counted for
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 900.0


@dataclass(frozen=True)
class GlideinEnd:
    """One glidein that ended (the factory reports each once)."""

    cluster: int
    proc: int
    batch: str
    status: int                     # JobStatus.COMPLETED or JobStatus.REMOVED
    exit_code: int | None
    ran_s: float | None
    #: Jobs its agent was given (the broker's pilot record); 0 also when the broker has no record of it.
    jobs: int = 0
    #: Removed by this factory (excess idle, a drained site, Ctrl-C): not a failure.
    removed_by_us: bool = False

    @property
    def name(self) -> str:
        return f"{self.cluster}.{self.proc}"


@dataclass(frozen=True)
class Observation:
    now: float                      # seconds (any epoch: only differences count)
    waiting_fit: int                # waiting jobs this factory's glideins can run
    idle: int                       # this factory's glideins idle in the queue
    running: int                    # ... running
    ended: tuple[GlideinEnd, ...] = ()
    site_state: str = "enabled"
    #: Waiting jobs of the site that no glidein of this factory can run (said once per change, not counted).
    waiting_unfit: int = 0
    unfit_reason: str = ""


@dataclass(frozen=True)
class Decision:
    submit: int = 0
    remove_idle: int = 0
    messages: tuple[str, ...] = ()
    #: Seconds until submissions may resume (0: not backing off).
    backoff_left_s: float = 0.0


@dataclass
class FactoryPolicy:
    settings: PolicySettings = field(default_factory=PolicySettings)
    backoff_s: float = 0.0
    not_before: float = 0.0
    #: The last glidein whose agent token was refused or had expired (for the reminders).
    refused: GlideinEnd | None = None
    _said_unfit: tuple[int, str] = (0, "")
    _said_site: str = "enabled"

    def decide(self, obs: Observation) -> Decision:
        s = self.settings
        messages: list[str] = []
        for end in obs.ended:
            line = self._judge(end, obs.now)
            if line:
                messages.append(line)
        if obs.waiting_unfit and (obs.waiting_unfit, obs.unfit_reason) != self._said_unfit:
            messages.append(f"{obs.waiting_unfit} waiting job(s) of the site fit no glidein of this factory "
                            f"({obs.unfit_reason}): no glidein is sent for them")
        self._said_unfit = (obs.waiting_unfit, obs.unfit_reason) if obs.waiting_unfit else (0, "")
        if obs.site_state not in OPEN_STATES:
            if obs.site_state != self._said_site or obs.idle:
                messages.append(f"the site is {obs.site_state} at the broker: no glideins"
                                + (f"; removing {obs.idle} idle glidein(s)" if obs.idle else ""))
            self._said_site = obs.site_state
            return Decision(submit=0, remove_idle=obs.idle, messages=tuple(messages))
        if self._said_site not in OPEN_STATES:
            messages.append(f"the site is {obs.site_state} at the broker again")
        self._said_site = obs.site_state
        wanted_total = math.ceil(max(0, obs.waiting_fit) / max(1, s.jobs_per_glidein))
        remove = max(0, obs.idle - wanted_total)
        if remove:
            messages.append(f"{obs.idle} idle glidein(s) for {obs.waiting_fit} waiting job(s) that fit: "
                            f"removing {remove}")
        idle = obs.idle - remove
        room = min(s.max_queued - idle, s.max_running - obs.running - idle, s.max_per_cycle)
        count = max(0, min(wanted_total - idle, room))
        left = max(0.0, self.not_before - obs.now)
        if count and left > 0:
            why = ""
            if self.refused is not None:
                why = (f" (glidein {self.refused.name} ended with exit {self.refused.exit_code}: its agent token "
                       "was refused or had expired)")
            messages.append(f"{obs.waiting_fit} waiting job(s), {idle} idle glidein(s): backing off "
                            f"{left:.0f} s more{why}")
            count = 0
        return Decision(submit=count, remove_idle=remove, messages=tuple(messages), backoff_left_s=left)

    def _judge(self, end: GlideinEnd, now: float) -> str:
        s = self.settings
        if end.removed_by_us:
            return ""
        ran = f"{end.ran_s:.0f} s" if end.ran_s is not None else "unknown time"
        if end.status == JobStatus.COMPLETED and end.exit_code in exitcodes.CREDENTIALS:
            self.backoff_s = s.backoff_max_s
            self.not_before = max(self.not_before, now + self.backoff_s)
            self.refused = end
            return ""   # the factory says it loudly (credentials_alarm), with what to check
        if end.status != JobStatus.COMPLETED or end.exit_code:
            what = "was removed" if end.status == JobStatus.REMOVED else f"failed (exit {end.exit_code})"
        elif end.jobs == 0:
            what = "ran no job (empty)"
        else:
            self.backoff_s = 0.0
            return ""
        self.backoff_s = min(s.backoff_max_s, max(s.backoff_initial_s, self.backoff_s * 2))
        self.not_before = max(self.not_before, now + self.backoff_s)
        return f"glidein {end.name} {what} after {ran}: backing off {self.backoff_s:.0f} s"


__all__ = ["Decision", "FactoryPolicy", "GlideinEnd", "Observation", "PolicySettings"]
