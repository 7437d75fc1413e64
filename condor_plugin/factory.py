"""The glidein factory: submit glideins through the htcondor2 bindings, follow them, keep them in line.

    factory = Factory(FactorySettings(work_dir=..., site="SITE-A", glidein=GlideinSettings(broker=...)),
                      schedd=pool.schedd(), ca=CertificateAuthority.load(ca_dir))
    batch = factory.submit(count=2)     # a fresh agent token, the package, a batch folder, one cluster
    factory.glideins()                  # this factory's glideins in the queue (and recent history)
    factory.collect()                   # finished glideins: output, error and log back; they leave the queue
    factory.run_once(waiting=5)         # one step of the loop: submit what the waiting jobs need

Everything goes through the bindings (Schedd.submit, spool, retrieve, query,
history); no command output is parsed. Every glidein carries
+SplitpilotFactory, +SplitpilotSite and +SplitpilotBatch (submit.description);
queries select by them.

One agent token per batch: minted here from the CA, scoped to the site,
living no longer than the glidein's lifetime plus grace plus the time a
glidein may wait in the queue (capped by the CA's policy for agents).

The token exists on the submit side only until HTCondor has it. The batch is
submitted with spooling (Schedd.submit(spool=True), then Schedd.spool): the
bindings read the inputs here and send them to the schedd, which keeps them
in its SPOOL for every start of every glidein of the batch (an evicted
glidein starts again from there) and drops them when the glidein leaves the
queue. The factory's token file is removed as soon as the spool call returns
(or fails). Nothing of the batch folder is read by a shadow or a job, so it
stays 0700, the factory's own.

Spooled glideins come back the same way: their output, error and event log
stay in the schedd's SPOOL when they end (LeaveJobInQueue, set by spooling:
up to 10 days) until `collect` retrieves them (Schedd.retrieve) into the
batch's log folder; the schedd then lets them leave the queue.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from condor_plugin.glidein import (
    GlideinPackage,
    GlideinSettings,
    PackageBuilder,
    prepare_batch,
    remove_batch,
)
from pilot.agent import exitcodes
from pilot.durations import parse_duration
from pilot.errors import SplitpilotError

if TYPE_CHECKING:
    import htcondor2

    from pilot.tokens import CertificateAuthority

#: HTCondor JobStatus values.
IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING, SUSPENDED = 1, 2, 3, 4, 5, 6, 7
STATUS_NAMES = {IDLE: "IDLE", RUNNING: "RUNNING", REMOVED: "REMOVED", COMPLETED: "COMPLETED", HELD: "HELD",
                TRANSFERRING: "TRANSFERRING", SUSPENDED: "SUSPENDED"}
#: HoldReasonCode of a job submitted with spooling until its inputs have arrived.
SPOOLING_HOLD = 16
#: Seconds the schedd may take to release spooled glideins once their inputs are there.
SPOOL_RELEASE_TIMEOUT = 60.0
#: Finished and not yet retrieved: the spooled glideins that wait for `collect` (LeaveJobInQueue holds
#: them until StageOutFinish, set by a retrieval, is later than their completion).
NOT_RETRIEVED = "JobStatus == 4 && (StageOutFinish ?: 0) < EnteredCurrentStatus"
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "SplitpilotBatch", "SplitpilotSite", "EnteredCurrentStatus",
              "QDate", "JobStartDate", "CompletionDate", "ExitCode", "HoldReason", "RemoteHost"]


class FactoryError(SplitpilotError):
    """The factory could not submit or query glideins."""


@dataclass(frozen=True)
class FactorySettings:
    work_dir: Path                      # batches/BATCH/: script, log (0700: read by this process only)
    site: str
    glidein: GlideinSettings
    factory: str = "splitpilot"
    queue: str = "default"
    cpus: int = 1
    memory_mb: int = 1024
    disk_mb: int = 2048
    lifetime: datetime.timedelta = datetime.timedelta(hours=6)
    grace: datetime.timedelta = datetime.timedelta(minutes=10)
    max_idle: datetime.timedelta = datetime.timedelta(hours=2)
    # -- the loop ------------------------------------------------------------------
    max_queued: int = 10                # glideins idle in the queue at most
    max_running: int = 50               # glideins running at most
    max_per_cycle: int = 5              # submitted in one cycle at most
    jobs_per_glidein: int = 1           # waiting jobs one new glidein is counted for
    fast_failure_s: float = 60.0        # a glidein that ends sooner than this failed fast (or came back empty)
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 900.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(self.work_dir).absolute())


@dataclass(frozen=True)
class SubmittedBatch:
    batch: str
    cluster: int
    count: int
    directory: Path


@dataclass(frozen=True)
class Glidein:
    cluster: int
    proc: int
    batch: str
    status: int
    entered: int
    started: int | None
    finished: int | None
    exit_code: int | None
    hold_reason: str | None

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))

    @property
    def ran_seconds(self) -> float | None:
        if self.started and self.finished:
            return float(self.finished - self.started)
        return None

    @classmethod
    def from_ad(cls, ad) -> Glidein:
        def opt(name: str):
            value = ad.get(name)
            return None if value is None else value

        return cls(cluster=int(ad["ClusterId"]), proc=int(ad["ProcId"]), batch=str(ad.get("SplitpilotBatch", "")),
                   status=int(ad.get("JobStatus", 0)), entered=int(ad.get("EnteredCurrentStatus", 0) or 0),
                   started=opt("JobStartDate"), finished=opt("CompletionDate") or None,
                   exit_code=opt("ExitCode"), hold_reason=opt("HoldReason"))


@dataclass
class LoopState:
    """What the loop remembers between cycles (backoff)."""

    backoff_s: float = 0.0
    not_before: float = 0.0
    seen_finished: set[tuple[int, int]] = field(default_factory=set)
    primed: bool = False        # glideins that ended before this factory started do not count
    refused: Glidein | None = None  # the last glidein whose agent token was refused or had expired


class Factory:
    def __init__(self, settings: FactorySettings, schedd: htcondor2.Schedd, ca: CertificateAuthority,
                 builder: PackageBuilder | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.schedd = schedd
        self.ca = ca
        self.builder = builder or PackageBuilder()
        self.progress = progress or (lambda line: None)
        self._package: GlideinPackage | None = None
        self.loop_state = LoopState()

    @property
    def batches_dir(self) -> Path:
        return self.settings.work_dir / "batches"

    def package(self) -> GlideinPackage:
        if self._package is None:
            self._package = self.builder.ensure()
        return self._package

    def _constraint(self, extra: str = "") -> str:
        from submit.quoting import classad_string

        base = (f"SplitpilotFactory == {classad_string(self.settings.factory, key='factory')} && "
                f"SplitpilotSite == {classad_string(self.settings.site, key='site')}")
        return f"{base} && ({extra})" if extra else base

    # -- one-off submit --------------------------------------------------------

    def submit(self, count: int) -> SubmittedBatch:
        """Submit COUNT glideins as one batch (one cluster, one fresh agent token), inputs spooled."""

        from pilot.tokens import TokenRole
        from submit import GlideinRequest, build_description, to_submit

        if count < 1:
            raise FactoryError("count must be at least 1")
        s = self.settings
        package = self.package()
        batch = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        ttl = s.lifetime + s.grace + s.max_idle
        ttl = min(ttl, self.ca.policy.max_lifetime[TokenRole.AGENT])
        token = self.ca.new_token(TokenRole.AGENT, f"glidein-{batch}", site=s.site, queue=s.queue, ttl=ttl)
        # 0700 and ours: the token is written below it for as long as the spooling takes.
        self.batches_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.batches_dir.chmod(0o700)
        files = prepare_batch(package, self.batches_dir / batch, token_pem=token.to_pem(), settings=s.glidein)
        del token
        try:
            request = GlideinRequest(executable=files.script, log_dir=files.log_dir, site=s.site,
                                     factory=s.factory, batch=batch, transfer_input_files=files.transfer_input_files,
                                     encrypt_input_files=(str(files.token),), cpus=s.cpus, memory_mb=s.memory_mb,
                                     disk_mb=s.disk_mb, lifetime=s.lifetime, grace=s.grace, max_idle=s.max_idle)
            result = self._submit_spooled(to_submit(build_description(request)), count, batch)
        except BaseException:
            remove_batch(files.directory)
            raise
        finally:
            # The schedd holds the token now (or nothing does): never keep a copy here.
            files.token.unlink(missing_ok=True)
        self._wait_released(result.cluster())
        record = {"batch": batch, "cluster": result.cluster(), "count": count, "package": package.key,
                  "submitted": time.time()}
        (files.directory / "batch.json").write_text(json.dumps(record) + "\n")
        self.progress(f"submitted {count} glidein(s): cluster {result.cluster()}, batch {batch} (inputs spooled)")
        return SubmittedBatch(batch, result.cluster(), count, files.directory)

    def _submit_spooled(self, description: htcondor2.Submit, count: int, batch: str):
        """Submit on hold, send the inputs to the schedd's SPOOL (which releases the glideins); the result."""
        import htcondor2

        try:
            result = self.schedd.submit(description, count=count, spool=True)
        except (htcondor2.HTCondorException, RuntimeError) as exc:
            raise FactoryError(f"the schedd refused the glideins: {exc}") from exc
        try:
            self.schedd.spool(result)
        except BaseException as exc:
            # Held glideins waiting for inputs that will never come: take them out of the queue.
            with contextlib.suppress(htcondor2.HTCondorException, RuntimeError):
                self.schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {result.cluster()}",
                                f"splitpilot factory: spooling the inputs of batch {batch} failed")
            if isinstance(exc, (htcondor2.HTCondorException, RuntimeError)):
                raise FactoryError(f"sending the glideins' inputs to the schedd failed (batch {batch}, cluster "
                                   f"{result.cluster()}, removed): {exc}; fix: check that this client may write "
                                   "to the schedd (its SPOOL, its disk)") from exc
            raise
        return result

    def _wait_released(self, cluster: int, timeout: float = SPOOL_RELEASE_TIMEOUT) -> None:
        """Until the schedd has released CLUSTER's glideins from their spooling hold (it does so shortly
        after the inputs arrived): a caller must not see them HELD, nor count them as anything but idle."""
        import htcondor2

        constraint = f"ClusterId == {cluster} && JobStatus == {HELD} && HoldReasonCode == {SPOOLING_HOLD}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.schedd.query(constraint=constraint, projection=["ProcId"]):
                    return
                problem = "still holds it 'spooling input data files'"
            except (htcondor2.HTCondorException, RuntimeError) as exc:
                problem = f"did not answer ({exc})"
            if time.monotonic() > deadline:
                # Submitted and spooled all the same: say so, and let the caller go on.
                self.progress(f"warning: cluster {cluster} was submitted and its inputs sent, but the schedd "
                              f"{problem} {timeout:.0f} s later; see the schedd's log (SchedLog)")
                return
            time.sleep(0.2)

    # -- status ------------------------------------------------------------------

    def glideins(self, history: bool = True) -> list[Glidein]:
        """This factory's glideins for its site: in the queue, and (HISTORY) those that left it."""
        queued = [Glidein.from_ad(ad) for ad in self.schedd.query(constraint=self._constraint(),
                                                                   projection=PROJECTION)]
        done: list[Glidein] = []
        if history:
            done = [Glidein.from_ad(ad) for ad in self.schedd.history(constraint=self._constraint(),
                                                                       projection=PROJECTION, match=200)]
        return sorted(queued + done, key=lambda g: (g.cluster, g.proc))

    def collect(self) -> list[tuple[int, int]]:
        """Retrieve the output, error and event log of this factory's finished glideins; return their ids.

        They come back into their batch's log folder (the paths the
        description named: glidein.CLUSTER.PROC.{out,err,log}); the schedd then
        lets them leave the queue at its next look (LeaveJobInQueue), with the
        spooled inputs (the agent token) they no longer need. A glidein that is
        idle, running or held is not touched: it may still start (again) from
        its spooled inputs.
        """
        import htcondor2

        constraint = self._constraint(NOT_RETRIEVED)
        done = [(int(ad["ClusterId"]), int(ad["ProcId"]))
                for ad in self.schedd.query(constraint=constraint, projection=["ClusterId", "ProcId"])]
        if not done:
            return []
        try:
            self.schedd.retrieve(constraint)
        except (htcondor2.HTCondorException, RuntimeError) as exc:
            # Next cycle tries again; the glideins wait in the queue meanwhile.
            self.progress(f"could not retrieve the output of glidein(s) "
                          f"{', '.join(f'{c}.{p}' for c, p in done)}: {exc}")
            return []
        return done

    def remove_all(self, reason: str = "splitpilot factory: removed") -> None:
        """Remove every glidein of this factory and site from the queue."""
        import htcondor2

        self.schedd.act(htcondor2.JobAction.Remove, self._constraint(), reason)

    def purge_batches(self) -> None:
        """Remove all batch folders (scripts, logs): after remove_all, when nothing is queued."""
        if self.batches_dir.is_dir():
            for folder in self.batches_dir.iterdir():
                remove_batch(folder)

    # -- the loop ----------------------------------------------------------------

    def run_once(self, waiting: int, now: float | None = None) -> int:
        """One cycle: how many glideins to submit for WAITING jobs of the site, bounded and backed off.

        Returns the number submitted. Wanted: one glidein per jobs_per_glidein
        waiting jobs, minus the glideins already idle; bounded by max_queued,
        max_running and max_per_cycle. Backoff: each glidein that ended within
        max(fast_failure_s, its idle timeout + 60 s) (failed fast, or came back
        empty: the agent leaves after its idle timeout), or with a non-zero
        exit, or removed, doubles the pause before the next submission (from
        backoff_initial_s up to backoff_max_s); one that ran longer resets it.
        A glidein whose agent left because its token was refused or had expired
        (exit codes 4 and 5, pilot.agent.exitcodes) sets the pause to
        backoff_max_s at once, and says loudly what to check: every glidein
        carrying this factory's tokens would fail the same way.
        Glideins that ended before the first cycle do not count.
        """
        s = self.settings
        state = self.loop_state
        now = time.time() if now is None else now
        all_glideins = self.glideins(history=True)
        queued = [g for g in all_glideins if g.status in (IDLE, RUNNING, HELD, TRANSFERRING, SUSPENDED)]
        # A glidein that ran no longer than its agent's idle timeout plus a margin found
        # (nearly) nothing to do: as useless as one that failed fast.
        idle_s = parse_duration(s.glidein.idle_timeout, what="idle timeout").total_seconds()
        threshold = max(s.fast_failure_s, idle_s + 60.0)
        for glidein in all_glideins:
            key = (glidein.cluster, glidein.proc)
            if glidein.status not in (COMPLETED, REMOVED) or key in state.seen_finished:
                continue
            state.seen_finished.add(key)
            if not state.primed:
                continue
            ran = glidein.ran_seconds
            if glidein.status == COMPLETED and glidein.exit_code in exitcodes.CREDENTIALS:
                state.backoff_s = s.backoff_max_s
                state.not_before = max(state.not_before, now + state.backoff_s)
                state.refused = glidein
                self.progress(credentials_alarm(glidein, s, state.backoff_s))
            elif glidein.status == REMOVED or ran is None or ran < threshold or glidein.exit_code:
                state.backoff_s = min(s.backoff_max_s, max(s.backoff_initial_s, state.backoff_s * 2))
                state.not_before = max(state.not_before, now + state.backoff_s)
                self.progress(f"glidein {key[0]}.{key[1]} ended after {ran or 0:.0f} s (exit {glidein.exit_code}): "
                              f"backing off {state.backoff_s:.0f} s")
            else:
                state.backoff_s = 0.0
        state.primed = True
        self.collect()
        idle = sum(1 for g in queued if g.status == IDLE)
        running = sum(1 for g in queued if g.status == RUNNING)
        wanted = -(-waiting // max(1, s.jobs_per_glidein)) - idle
        room = min(s.max_queued - idle, s.max_running - running - idle, s.max_per_cycle)
        count = max(0, min(wanted, room))
        if count and now < state.not_before:
            why = ""
            if state.refused is not None:
                why = (f" (glidein {state.refused.cluster}.{state.refused.proc} ended with exit "
                       f"{state.refused.exit_code}: its agent token was refused or had expired)")
            self.progress(f"{waiting} waiting job(s), {idle} idle glidein(s): backing off "
                          f"{state.not_before - now:.0f} s more{why}")
            return 0
        if count:
            self.submit(count)
        return count

    def run(self, waiting_jobs: Callable[[], int], interval: float = 15.0,
            should_stop: Callable[[], bool] = lambda: False) -> None:
        """Cycle every INTERVAL seconds until SHOULD_STOP() is true."""
        while not should_stop():
            try:
                self.run_once(waiting_jobs())
            except SplitpilotError as exc:
                self.progress(f"cycle failed: {exc}")
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not should_stop():
                time.sleep(min(1.0, interval))


def credentials_alarm(glidein: Glidein, settings: FactorySettings, pause_s: float) -> str:
    """The progress line for a glidein whose agent's token was refused or had expired."""
    where = f"glidein {glidein.cluster}.{glidein.proc} (batch {glidein.batch})"
    if glidein.exit_code == exitcodes.TOKEN_EXPIRED:
        what = ("its agent token had expired when it started: the glideins wait in the queue longer than their "
                "tokens live, or the clocks disagree")
        check = ("check the clocks of this factory and the worker nodes (NTP), and that --max-idle plus the "
                 "lifetime fits the CA's agent token lifetime")
    else:
        what = "THE BROKER REFUSES THIS FACTORY'S AGENT TOKENS"
        check = (f"check that the factory's CA (--ca) is the broker's CA (the broker's ca.crt must have signed "
                 f"the tokens), that the broker accepts agents of site {settings.site!r}, the --broker address, "
                 "and the clocks of factory, broker and nodes; the glidein's .err log says what the agent saw")
    return (f"ATTENTION: {where} ended with exit {glidein.exit_code}: {what}. Not submitting glideins for "
            f"{pause_s:.0f} s; {check}")


def waiting_jobs_for_site(admin_client, site: str) -> int:
    """Waiting jobs at the broker that SITE may run (no sites_allowed, or SITE among them)."""
    from broker.lifecycle import JobState

    listing = admin_client.list_all_jobs(states=[JobState.WAITING])
    count = 0
    for job in listing.jobs:
        allowed = list(getattr(getattr(getattr(job, "spec", None), "requirements", None), "sites_allowed", []) or [])
        if not allowed or site in allowed:
            count += 1
    return count


__all__ = ["Factory", "FactoryError", "FactorySettings", "Glidein", "SubmittedBatch", "credentials_alarm",
           "waiting_jobs_for_site"]
