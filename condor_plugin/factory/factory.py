"""The glidein factory: submit glideins through the htcondor2 bindings, follow them, keep them in line.

    factory = Factory(FactorySettings(work_dir=..., site="SITE-A", glidein=GlideinSettings(broker=...)),
                      schedd=pool.schedd(), ca=CertificateAuthority.load(ca_dir))
    batch = factory.submit(count=2)     # a fresh agent token, the package, a batch folder, one cluster
    factory.glideins()                  # this factory's glideins in the queue (and recent history)
    factory.collect()                   # finished glideins: output, error and log back; they leave the queue
    factory.remove(idle_only=True)      # this factory's idle glideins (their spooled tokens go with them)
    factory.broker = BrokerView(admin_client, "SITE-A", ca=ca)   # condor_plugin.factory.brokerview
    factory.run_once()                  # one step of the loop: observe, decide (condor_plugin.factory.policy), act

The loop's decisions (how many to submit, which idle ones to remove, the
backoff) are condor_plugin.factory.policy.FactoryPolicy's, a pure object; this
module observes (the schedd; the broker through a BrokerView: waiting jobs
that fit a glidein, the pilot records of its glideins, the site's state)
and carries the decisions out.

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
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import htcondor2
from htcondor2 import JobStatus

from condor_plugin.factory.brokerview import STARTUP_MARGIN_S, GlideinSlot, Waiting
from condor_plugin.factory.policy import Decision, FactoryPolicy, GlideinEnd, Observation, PolicySettings
from condor_plugin.glidein.package import GlideinPackage, GlideinSettings, PackageBuilder, prepare_batch, remove_batch
from pilot import logconfig
from pilot.agent import exitcodes
from pilot.api.states import JobState
from pilot.errors import SplitpilotError
from pilot.tokens import TokenRole
from submit import CondorCE, GlideinRequest, build_description, to_submit
from submit.quoting import classad_string

if TYPE_CHECKING:
    from broker.ca import CertificateAuthority
    from condor_plugin.factory.brokerview import BrokerView

#: HoldReasonCode of a job submitted with spooling until its inputs have arrived.
SPOOLING_HOLD = 16
#: Seconds the schedd may take to release spooled glideins once their inputs are there.
SPOOL_RELEASE_TIMEOUT = 60.0
#: Finished and not yet retrieved: the spooled glideins that wait for `collect` (LeaveJobInQueue holds
#: them until StageOutFinish, set by a retrieval, is later than their completion).
NOT_RETRIEVED = f"JobStatus == {JobStatus.COMPLETED:d} && (StageOutFinish ?: 0) < EnteredCurrentStatus"
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
    #: None: the schedd runs the glideins (vanilla universe); a CondorCE: the schedd forwards them to that
    #: HTCondor-CE (grid universe, with its SciToken file).
    ce: CondorCE | None = None
    #: More submit lines (raw submit language: accounting_group, requirements, +Attr = "text"); checked
    #: against the generator's keys and for credentials when the settings are made.
    submit_lines: Mapping[str, str] = field(default_factory=dict)
    # -- the loop ------------------------------------------------------------------
    max_queued: int = 10                # glideins idle in the queue at most
    max_running: int = 50               # glideins running at most
    max_per_cycle: int = 5              # submitted in one cycle at most
    jobs_per_glidein: int = 1           # waiting jobs one new glidein is counted for
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 900.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(self.work_dir).absolute())
        object.__setattr__(self, "submit_lines", dict(self.submit_lines))
        # Every submit description problem now, before a token is minted or a batch folder made.
        build_description(self.glidein_request(self.work_dir / "check" / "glidein_startup.sh",
                                               self.work_dir / "check" / "log", batch="check", inputs=()))

    def glidein_request(self, script: Path, log_dir: Path, *, batch: str, inputs: tuple[str, ...],
                        encrypted: tuple[str, ...] = ()) -> GlideinRequest:
        """The submit settings of one batch: SCRIPT, its LOG_DIR, the transfer INPUTS (ENCRYPTED among them)."""
        return GlideinRequest(executable=script, log_dir=log_dir, site=self.site, factory=self.factory, batch=batch,
                              ce=self.ce, transfer_input_files=inputs, encrypt_input_files=encrypted,
                              cpus=self.cpus, memory_mb=self.memory_mb, disk_mb=self.disk_mb,
                              lifetime=self.lifetime, grace=self.grace, max_idle=self.max_idle,
                              extra=self.submit_lines)

    @property
    def policy(self) -> PolicySettings:
        return PolicySettings(max_queued=self.max_queued, max_running=self.max_running,
                              max_per_cycle=self.max_per_cycle, jobs_per_glidein=self.jobs_per_glidein,
                              backoff_initial_s=self.backoff_initial_s, backoff_max_s=self.backoff_max_s)

    @property
    def slot(self) -> GlideinSlot:
        """What each glidein offers its jobs: the resources it asks HTCondor for, its lifetime less the
        start-up margin."""
        return GlideinSlot(cores=self.cpus, memory_mb=self.memory_mb, disk_mb=self.disk_mb,
                           time_s=max(0, int(self.lifetime.total_seconds()) - STARTUP_MARGIN_S), site=self.site,
                           containers=self.glidein.container_policy != "off")


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
    status: int                 # an htcondor2.JobStatus, or the number of one these bindings do not know
    entered: int
    started: int | None
    finished: int | None
    exit_code: int | None
    hold_reason: str | None

    @property
    def status_name(self) -> str:
        try:
            return JobStatus(self.status).name
        except ValueError:
            return str(self.status)

    @property
    def name(self) -> str:
        return f"{self.cluster}.{self.proc}"

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
    """What the loop remembers between cycles besides the policy's backoff: the glideins already judged."""

    seen_finished: set[tuple[int, int]] = field(default_factory=set)
    primed: bool = False        # glideins that ended before this factory started do not count
    #: Glideins this factory removed itself (excess idle, a drained site, Ctrl-C): not failures.
    removed_by_us: set[tuple[int, int]] = field(default_factory=set)
    #: Pilot records (ids) already matched to an ended glidein of their batch.
    pilots_seen: set[str] = field(default_factory=set)


class Factory:
    def __init__(self, settings: FactorySettings, schedd: htcondor2.Schedd, ca: CertificateAuthority,
                 builder: PackageBuilder | None = None, progress: Callable[[str], None] | None = None,
                 broker: BrokerView | None = None) -> None:
        self.settings = settings
        self.schedd = schedd
        self.ca = ca
        self.builder = builder or PackageBuilder()
        #: Where progress lines go: the `factory: ...` lines of the process's log unless a caller takes them.
        self.progress = progress or logconfig.progress_logger("splitpilot.factory")
        #: The broker's side (waiting jobs that fit, pilot records, the site's state); None: only what
        #: run_once is told (waiting jobs), every ended glidein counted as empty unless it failed.
        self.broker = broker
        self._package: GlideinPackage | None = None
        self.policy = FactoryPolicy(settings.policy)
        self.loop_state = LoopState()
        self._serials: dict[str, str] = {}

    @property
    def batches_dir(self) -> Path:
        return self.settings.work_dir / "batches"

    def package(self) -> GlideinPackage:
        if self._package is None:
            self._package = self.builder.ensure()
        return self._package

    def _constraint(self, extra: str = "") -> str:
        base = (f"SplitpilotFactory == {classad_string(self.settings.factory, key='factory')} && "
                f"SplitpilotSite == {classad_string(self.settings.site, key='site')}")
        return f"{base} && ({extra})" if extra else base

    # -- one-off submit --------------------------------------------------------

    def submit(self, count: int) -> SubmittedBatch:
        """Submit COUNT glideins as one batch (one cluster, one fresh agent token), inputs spooled."""
        if count < 1:
            raise FactoryError("count must be at least 1")
        s = self.settings
        package = self.package()
        batch = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        ttl = s.lifetime + s.grace + s.max_idle
        ttl = min(ttl, self.ca.policy.max_lifetime[TokenRole.AGENT])
        token = self.ca.new_token(TokenRole.AGENT, f"glidein-{batch}", site=s.site, queue=s.queue, ttl=ttl)
        # How the broker's pilot records of this batch's glideins are found (PilotInfo.certificate_serial).
        serial = f"{token.certificate.serial_number:x}"
        # 0700 and ours: the token is written below it for as long as the spooling takes.
        self.batches_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.batches_dir.chmod(0o700)
        files = prepare_batch(package, self.batches_dir / batch, token_pem=token.to_pem(), settings=s.glidein)
        del token
        try:
            request = s.glidein_request(files.script, files.log_dir, batch=batch,
                                        inputs=files.transfer_input_files, encrypted=(str(files.token),))
            result = self._submit_spooled(to_submit(build_description(request)), count, batch)
        except BaseException:
            remove_batch(files.directory)
            raise
        finally:
            # The schedd holds the token now (or nothing does): never keep a copy here.
            files.token.unlink(missing_ok=True)
        self._wait_released(result.cluster())
        record = {"batch": batch, "cluster": result.cluster(), "count": count, "package": package.key,
                  "submitted": time.time(), "serial": serial}
        (files.directory / "batch.json").write_text(json.dumps(record) + "\n")
        self._serials[batch] = serial
        self.progress(f"submitted {count} glidein(s): cluster {result.cluster()}, batch {batch} (inputs spooled)")
        return SubmittedBatch(batch, result.cluster(), count, files.directory)

    def _submit_spooled(self, description: htcondor2.Submit, count: int, batch: str):
        """Submit on hold, send the inputs to the schedd's SPOOL (which releases the glideins); the result."""
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
        constraint = f"ClusterId == {cluster} && JobStatus == {JobStatus.HELD:d} && HoldReasonCode == {SPOOLING_HOLD}"
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

    def remove(self, *, idle_only: bool = False, batch: str | None = None, count: int | None = None,
               reason: str = "splitpilot factory: removed") -> list[Glidein]:
        """Remove this factory's glideins for its site: all of them, only the idle ones (IDLE_ONLY), only
        BATCH's, at most COUNT (the newest first); return those removed.

        A removed glidein leaves the queue, and the schedd drops its spooled
        inputs (the batch's agent token) with it. A running one gets SIGTERM
        first: its agent stops its jobs and reports them (the broker re-queues
        them)."""
        chosen = [g for g in self.glideins(history=False)
                  if g.status not in (JobStatus.COMPLETED, JobStatus.REMOVED)
                  and (not idle_only or g.status == JobStatus.IDLE)
                  and (batch is None or g.batch == batch)]
        chosen.sort(key=lambda g: (g.cluster, g.proc), reverse=True)
        if count is not None:
            chosen = chosen[:max(0, count)]
        if not chosen:
            return []
        which = " || ".join(f"(ClusterId == {g.cluster} && ProcId == {g.proc})" for g in chosen)
        extra = f"({which})" + (f" && JobStatus == {JobStatus.IDLE:d}" if idle_only else "")
        if batch is not None:
            extra += f" && SplitpilotBatch == {classad_string(batch, key='batch')}"
        try:
            self.schedd.act(htcondor2.JobAction.Remove, self._constraint(extra), reason)
        except (htcondor2.HTCondorException, RuntimeError) as exc:
            raise FactoryError(f"the schedd did not remove glidein(s) {', '.join(g.name for g in chosen)}: "
                               f"{exc}; fix: check that this client may act on the schedd's jobs") from exc
        self.loop_state.removed_by_us.update((g.cluster, g.proc) for g in chosen)
        return chosen

    def remove_all(self, reason: str = "splitpilot factory: removed") -> None:
        """Remove every glidein of this factory and site from the queue."""
        self.schedd.act(htcondor2.JobAction.Remove, self._constraint(), reason)

    # -- the loop ----------------------------------------------------------------

    def batch_serials(self) -> dict[str, str]:
        """batch -> serial of its agent token, for every batch folder of this factory (batch.json)."""
        if self.batches_dir.is_dir():
            for record in self.batches_dir.glob("*/batch.json"):
                if record.parent.name not in self._serials:
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        self._serials[record.parent.name] = json.loads(record.read_text())["serial"]
        return dict(self._serials)

    def observe(self, now: float, waiting: int | None = None) -> Observation:
        """What the policy decides on: the queue, the glideins that ended since, and (from the broker, or
        WAITING when given) the waiting jobs a glidein fits and the site's state."""
        s = self.settings
        state = self.loop_state
        all_glideins = self.glideins(history=True)
        newly = [g for g in all_glideins if g.status in (JobStatus.COMPLETED, JobStatus.REMOVED)
                 and (g.cluster, g.proc) not in state.seen_finished]
        ended = newly if state.primed else []   # ended before this factory started: not ours to judge
        site_state = "unknown"
        # The broker first: when it does not answer, the cycle fails with nothing marked as judged.
        if waiting is not None or self.broker is None:
            found = Waiting(fit=waiting or 0)
        else:
            found = self.broker.waiting(s.slot)
            site_state = self.broker.site_state()
        jobs = self._jobs_of(ended)
        state.seen_finished.update((g.cluster, g.proc) for g in newly)
        state.primed = True
        ends = tuple(GlideinEnd(cluster=g.cluster, proc=g.proc, batch=g.batch, status=g.status,
                                exit_code=g.exit_code, ran_s=g.ran_seconds, jobs=jobs.get((g.cluster, g.proc), 0),
                                removed_by_us=(g.cluster, g.proc) in state.removed_by_us) for g in ended)
        return Observation(now=now, waiting_fit=found.fit, waiting_unfit=found.unfit, unfit_reason=found.reason,
                           idle=sum(1 for g in all_glideins if g.status == JobStatus.IDLE),
                           running=sum(1 for g in all_glideins if g.status == JobStatus.RUNNING), ended=ends,
                           site_state=site_state)

    def _jobs_of(self, ended: list[Glidein]) -> dict[tuple[int, int], int]:
        """Jobs each ended glidein's agent was given, from the broker's pilot records: the pilots of a batch
        are those of its agent token (by serial); each ended pilot record is matched to one ended glidein of
        its batch (a glidein's pilot reports its end before the glidein ends). No record: 0 (its agent
        never reached the broker)."""
        if not ended or self.broker is None:
            return {}
        serials = self.batch_serials()
        wanted = {serials[g.batch] for g in ended if g.batch in serials}
        if not wanted:
            return {}
        s = self.settings
        window = (s.lifetime + s.grace + s.max_idle).total_seconds() + 3600
        records = [p for p in self.broker.pilots(int(window))
                   if p.certificate_serial in wanted and p.end_reason and p.pilot_id not in self.loop_state.pilots_seen]
        # Records with jobs first: a glidein is not called empty while an unmatched record of its batch ran jobs.
        records.sort(key=lambda p: -p.jobs_matched)
        jobs: dict[tuple[int, int], int] = {}
        for glidein in ended:
            serial = serials.get(glidein.batch)
            record = next((p for p in records if p.certificate_serial == serial), None)
            if record is not None:
                records.remove(record)
                self.loop_state.pilots_seen.add(record.pilot_id)
                jobs[(glidein.cluster, glidein.proc)] = record.jobs_matched
        return jobs

    def run_once(self, waiting: int | None = None, now: float | None = None) -> int:
        """One cycle: observe, let the policy decide (condor_plugin.factory.policy), carry it out.

        WAITING: the number of waiting jobs to serve (without a broker view);
        else the broker view says how many fit a glidein. Returns the number
        of glideins submitted."""
        now = time.time() if now is None else now
        policy = self.policy
        refused_before = policy.refused
        observation = self.observe(now, waiting)
        self.collect()
        decision: Decision = policy.decide(observation)
        if policy.refused is not None and policy.refused is not refused_before:
            self.progress(credentials_alarm(policy.refused, self.settings, policy.backoff_s))
        for line in decision.messages:
            self.progress(line)
        if decision.remove_idle:
            removed = self.remove(idle_only=True, count=decision.remove_idle,
                                  reason="splitpilot factory: not needed (no waiting job for it, or the site is "
                                         "draining or disabled)")
            if removed:
                self.progress(f"removed idle glidein(s) {', '.join(g.name for g in removed)}")
        if decision.submit:
            self.submit(decision.submit)
        return decision.submit

    def run(self, waiting_jobs: Callable[[], int] | None = None, interval: float = 15.0,
            should_stop: Callable[[], bool] = lambda: False, wake: threading.Event | None = None) -> None:
        """Cycle every INTERVAL seconds until SHOULD_STOP() is true (WAKE, when set, ends a pause at once).
        WAITING_JOBS: how many jobs to serve, when there is no broker view."""
        wake = wake or threading.Event()
        while not should_stop():
            try:
                self.run_once(waiting_jobs() if waiting_jobs is not None else None)
            except SplitpilotError as exc:
                self.progress(f"cycle failed: {exc}")
            wake.wait(interval)


def credentials_alarm(glidein: Glidein | GlideinEnd, settings: FactorySettings, pause_s: float) -> str:
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
    listing = admin_client.list_all_jobs(states=[JobState.WAITING])
    count = 0
    for job in listing.jobs:
        allowed = list(getattr(getattr(getattr(job, "spec", None), "requirements", None), "sites_allowed", []) or [])
        if not allowed or site in allowed:
            count += 1
    return count


__all__ = ["Factory", "FactoryError", "FactorySettings", "Glidein", "SubmittedBatch", "credentials_alarm",
           "waiting_jobs_for_site"]
