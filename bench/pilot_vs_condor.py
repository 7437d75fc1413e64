#!/usr/bin/env python3
"""Makespan of N one-second jobs: plain HTCondor against splitpilot glideins, on one mini-condor.

    python bench/pilot_vs_condor.py [--jobs N] [--runtime apptainer|process] [--repeat R]
                                    [--order alternate|pilot-first|condor-first] [--keep DIR]

One mini-condor pool (condor_plugin.testing.minicondor, default 2 CPUs: a
partitionable slot, jobs run as the unprivileged job user) and one broker
on 127.0.0.1 (the node shares the host's network), in one run:

  condor      N vanilla jobs `/bin/sleep 1`, one cluster submitted through
              the htcondor2 bindings as the job user (no file transfer,
              shared file system). Makespan: the wall clock just before
              Schedd.submit -> the largest CompletionDate (whole seconds,
              truncated: this rounds HTCondor's makespan down, never up).
  splitpilot  the same N jobs (`/bin/sleep 1`, 1 core) submitted to the
              broker with a user token, then one glidein per slot (1 CPU
              each, idle timeout 10 s) submitted through
              condor_plugin.factory.factory.Factory as one cluster; each glidein's
              agent matches and runs jobs back to back, each in a wrapper
              inside the runtime chosen by --runtime (apptainer with the
              pool's sandbox image, as a glidein uses on the node; or
              process: no container, the agent runs as the unprivileged
              job user so it may). Makespan: the wall clock just before the
              broker submit -> the last job's DONE at the broker (ms).
              The glideins' start (negotiation, the package's venv, the
              runtime self-test) is inside the makespan; the glidein
              package is built (or found in its cache) before the clock.

Per-job overhead = (makespan x slots - N x 1 s) / N, slots = the pool's
CPUs. Before the first round a warm-up cluster (one /bin/true per slot)
runs, excluded; between phases the bench waits until no slot is claimed.
With --repeat R the rounds alternate which side goes first (by default)
and the medians are reported. Every phase then prints where the time went:
HTCondor from the job ads (claims used, activation -> exec -> completion
-> the next job's activation on the same slot, 1 s resolution), splitpilot
from the broker's per-job history (match -> STARTED -> RUNNING -> SAVING ->
DONE -> the next match of the same pilot, ms) and the glideins' ads.

Target: splitpilot's makespan <= 1/3 of plain HTCondor's. The machine's
load average and the number of HTCondor masters running on it (other pools)
are printed next to the figures. Progress goes to stderr every few seconds.
Nothing is left behind: glideins removed, broker and pool stopped, the
temporary folders removed, on success, failure, Ctrl-C or SIGTERM (and the
pool dies with this process if it is killed). Needs root (the mini-condor).
The last line is `pilot_speedup_vs_condor: X.XX x` (condor makespan /
splitpilot makespan, medians).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAYLOAD_S = 1.0
SITE = "MINICONDOR"
CONDOR_PROJECTION = ["ClusterId", "ProcId", "QDate", "JobStartDate", "JobCurrentStartDate",
                     "JobCurrentStartExecutingDate", "CompletionDate", "ExitCode", "LastRemoteHost", "RemoteHost",
                     "NumShadowStarts", "JobStatus"]


def say(line: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    masters = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if open(f"/proc/{pid}/comm").read().strip() == "condor_master":
                    masters += 1
    return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs, "
            f"{masters} condor_master(s) running")


def median(values):
    return statistics.median(values) if values else float("nan")


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def fmt(values, unit="s") -> str:
    """'mean M, median P (n=K)' for a list of seconds."""
    if not values:
        return "n/a"
    return f"mean {mean(values):.3f} {unit}, median {median(values):.3f} {unit} (n={len(values)})"


@dataclass
class Phase:
    name: str
    makespan: float
    jobs: int
    slots: int
    breakdown: list[str] = field(default_factory=list)
    load: str = ""

    @property
    def overhead(self) -> float:
        return (self.makespan * self.slots - self.jobs * PAYLOAD_S) / self.jobs


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# The site: one pool, one broker

class Site:
    def __init__(self, base: Path, runtime: str, progress_every: float, timeout: float) -> None:
        self.base = base
        self.runtime = runtime
        self.progress_every = progress_every
        self.timeout = timeout
        self.pool = None
        self.condor_config: tuple[str, ...] = ()
        self.server = None
        self.factories = []
        self.slots = 0
        self.package = None

    def start(self) -> None:
        from broker.server import BrokerConfig, BrokerServer
        from condor_plugin.glidein.package import PackageBuilder
        from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings

        started = time.monotonic()
        self.package = PackageBuilder(progress=lambda line: say(f"glidein package: {line}")).ensure()
        say(f"glidein package {self.package.key[:12]} "
            f"{'from the cache' if self.package.cached else f'built in {self.package.built_seconds:.0f} s'}")
        shared = self.base / "shared"
        self.pool = MiniCondor(MiniCondorSettings(state_dir=self.base / "state", shared_dirs=(shared,),
                                                  extra_config=self.condor_config),
                               progress=lambda line: say(f"mini-condor: {line}"))
        self.pool.start(die_with_caller=True)
        status = self.pool.status()
        self.slots = sum(slot.cpus for slot in status.slots) or self.pool.settings.cpus
        self.server = BrokerServer(BrokerConfig(state_dir=str(self.base / "broker"), listen="127.0.0.1:0",
                                                reap_interval=2.0))
        self.server.start()
        say(f"pool ready ({self.slots} CPUs in {len(status.slots)} slot ad(s)), broker on {self.server.address}, "
            f"{time.monotonic() - started:.0f} s")

    def stop(self) -> None:
        """Everything started, in reverse; each step runs even if an earlier one failed."""
        from condor_plugin.testing import nodeproc

        with contextlib.ExitStack() as stack:
            if self.pool is not None:
                pool = self.pool

                def stop_pool():
                    try:
                        pool.stop()
                    finally:
                        pool.restore_client_config()
                        if nodeproc.mounts_under(self.base):
                            say(f"something is still mounted under {self.base}: not removing it")
                        else:
                            shutil.rmtree(self.base, ignore_errors=True)
                stack.callback(stop_pool)
            else:
                stack.callback(shutil.rmtree, self.base, True)
            if self.server is not None:
                stack.callback(self.server.stop)
            for factory in self.factories:
                def remove(factory=factory):
                    with contextlib.suppress(Exception):
                        factory.remove_all("pilot_vs_condor bench: cleaning up")
                stack.callback(remove)

    # -- helpers --------------------------------------------------------------

    def folder(self, name: str) -> Path:
        """A folder in the shared folder owned by the job user (the schedd writes the user log as it)."""
        shared = self.pool.shared_dirs[0]
        path = shared / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        owner = shared.stat()
        os.chown(path, owner.st_uid, owner.st_gid)
        return path

    def wait_idle(self, timeout: float = 90.0) -> None:
        """Until no slot is claimed and the partitionable slot has every CPU back."""
        end = time.monotonic() + timeout
        while True:
            status = self.pool.status()
            claimed = [s for s in status.slots if s.state != "Unclaimed"]
            free = sum(s.cpus for s in status.slots if s.state == "Unclaimed")
            if not claimed and free >= self.slots:
                return
            if time.monotonic() > end:
                say(f"pool still busy after {timeout:.0f} s: {[(s.name, s.state, s.cpus) for s in status.slots]}; "
                    "going on")
                return
            time.sleep(1.0)

    def condor_wait(self, schedd, constraint: str, count: int, label: str) -> list:
        """Poll the queue until every job of CONSTRAINT left it; return their history ads."""
        started = time.monotonic()
        next_print = started + self.progress_every
        while True:
            ads = schedd.query(constraint=constraint, projection=["JobStatus", "HoldReason"])
            held = [ad for ad in ads if ad.get("JobStatus") == 5]
            if held:
                raise BenchError(f"{label}: a job is held: {held[0].get('HoldReason')}")
            if not ads:
                break
            now = time.monotonic()
            if now >= next_print:
                running = sum(1 for ad in ads if ad.get("JobStatus") == 2)
                say(f"{label}: {count - len(ads)}/{count} done, {running} running, {now - started:.0f} s")
                next_print = now + self.progress_every
            if now - started > self.timeout:
                raise BenchError(f"{label}: {len(ads)} of {count} jobs still queued after {self.timeout:.0f} s")
            time.sleep(0.5)
        for _ in range(60):   # the history file may lag the queue by a moment
            done = list(schedd.history(constraint=constraint, projection=CONDOR_PROJECTION, match=count))
            if len(done) >= count:
                return done
            time.sleep(0.5)
        raise BenchError(f"{label}: only {len(done)} of {count} jobs in the schedd's history")

    def warm_up(self) -> None:
        import htcondor2

        folder = self.folder("warmup")
        tag = uuid.uuid4().hex
        schedd = self.pool.schedd()
        schedd.submit(htcondor2.Submit(condor_description("/bin/true", "", folder, tag)), count=self.slots)
        started = time.monotonic()
        self.condor_wait(schedd, f'SplitpilotBench == "{tag}"', self.slots, "warm-up")
        say(f"warm-up: {self.slots} /bin/true job(s) in {time.monotonic() - started:.1f} s")


def condor_description(executable: str, arguments: str, folder: Path, tag: str) -> dict[str, str]:
    return {"executable": executable, "arguments": arguments, "transfer_executable": "false",
            "should_transfer_files": "NO", "initialdir": str(folder), "output": "/dev/null", "error": "/dev/null",
            "log": "jobs.log", "request_cpus": "1", "request_memory": "64", "request_disk": "1024",
            "My.SplitpilotBench": f'"{tag}"'}


# ---------------------------------------------------------------------------
# (a) plain HTCondor

def run_condor(site: Site, jobs: int, label: str) -> Phase:
    import htcondor2

    folder = site.folder("condor")
    tag = uuid.uuid4().hex
    schedd = site.pool.schedd()
    description = htcondor2.Submit(condor_description("/bin/sleep", "1", folder, tag))
    say(f"{label}: submitting {jobs} vanilla jobs (/bin/sleep 1) as one cluster")
    t0 = time.time()
    result = schedd.submit(description, count=jobs)
    submit_s = time.time() - t0
    ads = site.condor_wait(schedd, f'SplitpilotBench == "{tag}"', jobs, label)
    seen_done = time.time()
    bad = [ad for ad in ads if ad.get("ExitCode") != 0 or ad.get("JobStatus") != 4]
    if bad:
        raise BenchError(f"{label}: {len(bad)} job(s) did not complete with exit code 0: {dict(bad[0])}")
    last = max(int(ad["CompletionDate"]) for ad in ads)
    phase = Phase("condor", makespan=last - t0, jobs=jobs, slots=site.slots, load=load())
    phase.breakdown = condor_breakdown(ads, t0, submit_s, result.cluster(), seen_done)
    shutil.copy(folder / "jobs.log", site.base / f"condor-{tag[:8]}.log")
    return phase


def condor_breakdown(ads, t0: float, submit_s: float, cluster: int, seen_done: float) -> list[str]:
    by_slot = collections.defaultdict(list)
    for ad in ads:
        by_slot[str(ad.get("LastRemoteHost") or ad.get("RemoteHost") or "?")].append(ad)
    activation_to_exec, exec_to_done, done_to_next, cycles = [], [], [], []
    for slot_ads in by_slot.values():
        slot_ads.sort(key=lambda ad: (int(ad["JobCurrentStartDate"]), int(ad["ProcId"])))
        for ad in slot_ads:
            start, done = int(ad["JobCurrentStartDate"]), int(ad["CompletionDate"])
            executing = ad.get("JobCurrentStartExecutingDate")
            if executing is not None:
                activation_to_exec.append(int(executing) - start)
                exec_to_done.append(done - int(executing))
        for prev, nxt in zip(slot_ads, slot_ads[1:], strict=False):
            done_to_next.append(int(nxt["JobCurrentStartDate"]) - int(prev["CompletionDate"]))
        span = int(slot_ads[-1]["CompletionDate"]) - int(slot_ads[0]["JobCurrentStartDate"])
        cycles.append(span / len(slot_ads))
    first_start = min(int(ad["JobCurrentStartDate"]) for ad in ads)
    shadows = sum(int(ad.get("NumShadowStarts", 1) or 1) for ad in ads)
    return [
        f"cluster {cluster}: Schedd.submit took {submit_s:.2f} s; first job activated {first_start - t0:.1f} s after "
        f"submit (negotiation, claim); the poll saw the queue empty {seen_done - t0:.1f} s after submit",
        f"claims (dynamic slots) used: {len(by_slot)} for {len(ads)} jobs "
        f"({'claims reused' if len(by_slot) < len(ads) else 'no claim reuse'}); {shadows} shadow start(s)",
        "per job, on each slot (job ads in whole seconds: only the last line is precise):",
        f"  activation (shadow) -> exec (starter ran it):   {fmt(activation_to_exec)}",
        f"  exec -> completion (1 s payload, exit, report): {fmt(exec_to_done)}",
        f"  completion -> next job's activation, same slot: {fmt(done_to_next)}",
        f"  slot time per job (first activation .. last completion / jobs): {fmt(cycles)}",
    ]


# ---------------------------------------------------------------------------
# (b) splitpilot

def run_pilot(site: Site, jobs: int, label: str, round_no: int) -> Phase:
    from condor_plugin.factory.factory import Factory, FactorySettings
    from condor_plugin.glidein.package import GlideinSettings, PackageBuilder
    from pilot.api.client import BrokerClient
    from pilot.api.states import JobState
    from pilot.pipe import messages as m
    from pilot.tokens import TokenRole

    server, pool = site.server, site.pool
    user = server.ca.new_token(TokenRole.USER, f"bench-round-{round_no}-{uuid.uuid4().hex[:6]}")
    if site.runtime == "apptainer":
        glidein = GlideinSettings(broker=server.address, container_policy="require", runtimes="apptainer",
                                  image=pool.sandbox_image, idle_timeout="10s")
    else:
        # require + process: no isolation at all, as before `off` came to mean "the namespace launcher if it
        # works" (this bench measures the pilot's own overhead against HTCondor's, not a launcher's).
        glidein = GlideinSettings(broker=server.address, container_policy="require", runtimes="process",
                                  idle_timeout="10s")
    factory_name = f"bench{round_no}{uuid.uuid4().hex[:6]}"
    # Batch folders on the submit side only (inputs are spooled): not in the shared folder the node sees.
    settings = FactorySettings(work_dir=site.base / f"factory-{factory_name}", site=SITE, factory=factory_name,
                               cpus=1, memory_mb=768, disk_mb=1024,
                               lifetime=datetime.timedelta(minutes=60), glidein=glidein)
    builder = PackageBuilder(progress=lambda line: say(f"glidein package: {line}"))
    factory = Factory(settings, pool.schedd(), server.ca, builder)
    factory._package = site.package          # built before the clock (Factory.package() would look it up again)
    site.factories.append(factory)
    specs = [m.JobSpec(name=f"sleep-{i}", executable="/bin/sleep", arguments=["1"],
                       requirements=m.Requirements(cores=1, memory_mb=128, disk_mb=16, walltime_s=300))
             for i in range(jobs)]
    with BrokerClient(server.address, user, server.ca_pem) as client:
        say(f"{label}: submitting {jobs} jobs (/bin/sleep 1) to the broker, then {site.slots} glidein(s) "
            f"(runtime {site.runtime})")
        t0 = time.time()
        ids = client.submit(specs)
        submitted = time.time()
        batch = factory.submit(site.slots)
        glideins_submitted = time.time()
        started = time.monotonic()
        next_print = started + site.progress_every
        while True:
            listing = client.list(limit=1)
            final = sum(n for state, n in listing.counts.items() if state.final)
            if final >= jobs:
                break
            now = time.monotonic()
            if now - started > site.timeout:
                raise BenchError(f"{label}: {jobs - final} of {jobs} jobs not final after {site.timeout:.0f} s"
                                 + glidein_logs(batch.directory))
            queued = factory.glideins(history=False)
            held = [g for g in queued if g.status == 5]
            if held:
                raise BenchError(f"{label}: glidein held: {held[0].hold_reason}")
            if not queued and now - started > 10:
                raise BenchError(f"{label}: the glideins left with {jobs - final} job(s) not final"
                                 + glidein_logs(batch.directory))
            if now >= next_print:
                counts = {s.name: n for s, n in listing.counts.items() if n}
                running = sum(1 for g in queued if g.status == 2)
                say(f"{label}: {listing.counts.get(JobState.DONE, 0)}/{jobs} done, {running} glidein(s) running, "
                    f"{now - started:.0f} s  {counts}")
                next_print = now + site.progress_every
            time.sleep(0.5)
        seen_done = time.time()
        statuses = [client.status(job_id) for job_id in ids]
    phase_load = load()
    failed = [s for s in statuses if s.state is not JobState.DONE]
    if failed:
        raise BenchError(f"{label}: {len(failed)} job(s) not DONE, e.g. {failed[0].job_id}: {failed[0].state.name} "
                         f"{failed[0].message}" + glidein_logs(batch.directory))
    done_at = [event_time(s, JobState.DONE) for s in statuses]
    phase = Phase("splitpilot", makespan=max(done_at) - t0, jobs=jobs, slots=site.slots, load=phase_load)
    # The glideins leave after their idle timeout: wait, so that the next phase finds the pool idle.
    end = time.monotonic() + 120
    while factory.glideins(history=False) and time.monotonic() < end:
        factory.collect()        # finished glideins' logs back; then they leave the queue
        time.sleep(1.0)
    if factory.glideins(history=False):
        say(f"{label}: glideins still queued 120 s after the last job: removing them")
        factory.remove_all("pilot_vs_condor bench: done")
    glidein_ads = list(pool.schedd().history(constraint=f"ClusterId == {batch.cluster}",
                                             projection=["ProcId", "QDate", "JobStartDate", "CompletionDate",
                                                         "ExitCode", "LastRemoteHost"], match=site.slots))
    phase.breakdown = pilot_breakdown(statuses, t0, submitted - t0, glideins_submitted - t0, glidein_ads,
                                      seen_done, batch.directory)
    keep = site.base / f"glideins-{factory_name}"
    with contextlib.suppress(OSError):
        shutil.copytree(batch.directory / "log", keep)
    return phase


def event_time(status, state) -> float:
    times = [e.time.timestamp() for e in status.history if e.state is state and e.attempt == status.attempt]
    return times[-1] if times else status.updated.timestamp()


def glidein_logs(directory: Path) -> str:
    parts = []
    for path in sorted((directory / "log").glob("glidein.*")):
        with contextlib.suppress(OSError):
            parts.append(f"\n== {path.name}\n{path.read_text(errors='replace')[-4000:]}")
    return "".join(parts)


def pilot_breakdown(statuses, t0: float, submit_s: float, glideins_at: float, glidein_ads, seen_done: float,
                    batch_dir: Path) -> list[str]:
    from pilot.api.states import JobState as S

    phases = collections.defaultdict(list)
    by_pilot = collections.defaultdict(list)
    for status in statuses:
        times = {}
        for event in status.history:
            if event.attempt == status.attempt:
                times[event.state] = event.time.timestamp()
        by_pilot[status.pilot_id].append(times)
        chain = [S.ASSIGNED, S.STARTED, S.RUNNING, S.SAVING, S.DONE]
        for a, b in zip(chain, chain[1:], strict=False):
            if a in times and b in times:
                phases[(a, b)].append(times[b] - times[a])
    gaps, firsts, cycles, to_payload, after_payload = [], [], [], [], []
    for runs in by_pilot.values():
        runs.sort(key=lambda t: t.get(S.ASSIGNED, 0))
        firsts.append(runs[0].get(S.ASSIGNED, float("nan")) - t0)
        for prev, nxt in zip(runs, runs[1:], strict=False):
            if S.DONE in prev and S.ASSIGNED in nxt:
                gaps.append(nxt[S.ASSIGNED] - prev[S.DONE])
        cycles.append((runs[-1].get(S.DONE, float("nan")) - runs[0].get(S.ASSIGNED, float("nan"))) / len(runs))
        for times in runs:
            # SAVING is queued the moment the payload ends and sent at once (the connection is up):
            # the payload started about 1 s before it. RUNNING is stamped late (after the connection).
            if S.SAVING in times and S.ASSIGNED in times:
                to_payload.append(times[S.SAVING] - PAYLOAD_S - times[S.ASSIGNED])
            if S.SAVING in times and S.DONE in times:
                after_payload.append(times[S.DONE] - times[S.SAVING])
    starts = sorted(int(ad["JobStartDate"]) - t0 for ad in glidein_ads if ad.get("JobStartDate"))
    ends = sorted(int(ad["CompletionDate"]) - t0 for ad in glidein_ads if ad.get("CompletionDate"))
    lines = [
        f"broker submit took {submit_s:.2f} s; the glidein cluster was submitted {glideins_at:.2f} s after t0; "
        f"glideins started (JobStartDate) at {', '.join(f'{s:.0f}' for s in starts) or '?'} s; "
        f"first match per pilot at {', '.join(f'{f:.1f}' for f in sorted(firsts))} s "
        f"(the difference: transfer, package check, venv install, runtime self-test, agent start)",
        f"pilots: {len(by_pilot)}, jobs per pilot: {sorted(len(r) for r in by_pilot.values())}; "
        f"the poll saw every job final {seen_done - t0:.1f} s after t0; glideins left at "
        f"{', '.join(f'{e:.0f}' for e in ends) or '?'} s (idle timeout 10 s)",
        "per job, on each pilot (broker history, ms):",
        f"  match (ASSIGNED) -> STARTED (wrapper up, broker connected): {fmt(phases[(S.ASSIGNED, S.STARTED)])}",
        f"  STARTED -> RUNNING (payload started):                      {fmt(phases[(S.STARTED, S.RUNNING)])}",
        f"  RUNNING -> SAVING (1 s payload):                           {fmt(phases[(S.RUNNING, S.SAVING)])}",
        f"  SAVING -> DONE (outputs uploaded, final report):           {fmt(phases[(S.SAVING, S.DONE)])}",
        f"  DONE -> next match of the same pilot:                      {fmt(gaps)}",
        f"  => match -> payload start (SAVING - 1 s, estimated):      {fmt(to_payload)}",
        f"  => payload end -> DONE at the broker:                      {fmt(after_payload)}",
        f"  pilot time per job (first match .. last DONE / jobs):      {fmt(cycles)}",
        *glidein_startup(batch_dir),
    ]
    return lines


def glidein_startup(batch_dir: Path) -> list[str]:
    """The glideins' start-up steps from their error logs (HH:MM:SS stamps: whole seconds)."""
    marks = {"starting on": "start", "verified": "package checked", "venv ready": "venv installed",
             "starting the agent": "agent started", "runtime:": "runtime self-test passed",
             "matched": "first job matched"}
    lines = []
    for path in sorted((batch_dir / "log").glob("glidein.*.err")):
        seen = {}
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                stamp = re.search(r"\b(\d\d):(\d\d):(\d\d)\b", line)
                if not stamp:
                    continue
                seconds = int(stamp[1]) * 3600 + int(stamp[2]) * 60 + int(stamp[3])
                for needle, name in marks.items():
                    if needle in line and name not in seen:
                        seen[name] = seconds
        if "start" in seen:
            steps = ", ".join(f"{name} +{seen[name] - seen['start']}" for name in marks.values()
                              if name in seen and name != "start")
            lines.append(f"glidein {path.name.split('.', 1)[1].rsplit('.', 1)[0]} start-up (log, whole s): {steps}")
    return lines


# ---------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="one-second jobs per side (default 200)")
    parser.add_argument("--runtime", choices=("apptainer", "process"), default="apptainer",
                        help="the glideins' agent runtime (default apptainer with the pool's sandbox image)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported (default 1)")
    parser.add_argument("--order", choices=("alternate", "pilot-first", "condor-first"), default="alternate",
                        help="which side runs first in each round (default: alternate, splitpilot first in "
                             "round 1)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up cluster")
    parser.add_argument("--progress", type=float, default=5.0, metavar="S", help="progress every S seconds")
    parser.add_argument("--timeout", type=float, default=0, metavar="S",
                        help="per phase (default 300 + 10 s per job per slot)")
    parser.add_argument("--condor-config", action="append", default=[], metavar="'NAME = VALUE'",
                        help="a configuration line for the pool's daemons, for both sides (repeatable), e.g. "
                             "'CLAIM_WORKLIFE = 0': plain HTCondor without claim reuse, as when other users' "
                             "jobs interleave or a site does not reuse claims; glideins run one job per claim "
                             "anyway")
    parser.add_argument("--keep", metavar="DIR", help="copy the HTCondor user logs and the glideins' output and "
                                                     "error here before cleaning up")
    args = parser.parse_args()
    if args.jobs < 1 or args.repeat < 1:
        parser.error("--jobs and --repeat must be at least 1")
    if os.geteuid() != 0:
        print("pilot_vs_condor: the mini-condor needs root; run as root", file=sys.stderr)
        return 2

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    base = Path(tempfile.mkdtemp(prefix="splitpilot-pilot-vs-condor-", dir="/tmp"))
    base.chmod(0o755)   # the job user must reach the shared folder through every parent
    site = Site(base, args.runtime, args.progress, args.timeout or 0)
    site.condor_config = tuple(args.condor_config)
    rounds: list[tuple[Phase, Phase, str]] = []
    print(f"pilot_vs_condor: {args.jobs} one-second jobs per side, runtime {args.runtime}, {args.repeat} round(s)"
          + (f"; pool configuration added: {'; '.join(args.condor_config)}" if args.condor_config else
             "; pool configuration: the mini-condor's (HTCondor defaults: claims and shadows reused)"))
    print(f"machine at start: {load()}")
    try:
        site.start()
        site.timeout = args.timeout or 300 + 10 * args.jobs / site.slots
        if not args.no_warmup:
            site.warm_up()
            site.wait_idle()
        for round_no in range(1, args.repeat + 1):
            pilot_first = (args.order == "pilot-first" or
                           (args.order == "alternate" and round_no % 2 == 1))
            order = "splitpilot first, then HTCondor" if pilot_first else "HTCondor first, then splitpilot"
            say(f"round {round_no}/{args.repeat}: {order}")
            results = {}
            for side in (("pilot", "condor") if pilot_first else ("condor", "pilot")):
                label = f"round {round_no} {'splitpilot' if side == 'pilot' else 'condor'}"
                if side == "pilot":
                    results[side] = run_pilot(site, args.jobs, label, round_no)
                else:
                    results[side] = run_condor(site, args.jobs, label)
                phase = results[side]
                say(f"{label}: makespan {phase.makespan:.1f} s, per-job overhead {phase.overhead:.2f} s")
                site.wait_idle()
            rounds.append((results["condor"], results["pilot"], order))
            report_round(round_no, *rounds[-1], site.slots, args.runtime)
    except KeyboardInterrupt:
        print("pilot_vs_condor: interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"pilot_vs_condor: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            for path in list(base.glob("condor-*.log")) + list(base.glob("glideins-*")):
                with contextlib.suppress(OSError):
                    (shutil.copytree if path.is_dir() else shutil.copy)(path, keep / path.name)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # cleaning up is not interrupted
        say("cleaning up: glideins, broker, pool, temporary folders")
        site.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    condor = median([c.makespan for c, _p, _o in rounds])
    pilot = median([p.makespan for _c, p, _o in rounds])
    condor_over = median([c.overhead for c, _p, _o in rounds])
    pilot_over = median([p.overhead for _c, p, _o in rounds])
    speedup = condor / pilot
    print()
    print(f"summary ({len(rounds)} round(s), medians; {args.jobs} jobs of {PAYLOAD_S:g} s, {site.slots} slots; "
          f"order: {', '.join(o for _c, _p, o in rounds)}):")
    print(f"  {'plain HTCondor':24s} makespan {condor:7.1f} s   per-job overhead {condor_over:6.2f} s")
    print(f"  {f'splitpilot ({args.runtime})':24s} makespan {pilot:7.1f} s   per-job overhead {pilot_over:6.2f} s")
    print(f"  splitpilot / HTCondor makespan: {pilot / condor:.3f} (target <= 0.333: "
          f"{'met' if pilot <= condor / 3 else 'MISSED'})")
    if len(rounds) > 1:
        print(f"  per round speedup: {', '.join(f'{c.makespan / p.makespan:.2f}' for c, p, _o in rounds)}")
    print(f"machine at the end: {load()}")
    print(f"pilot_speedup_vs_condor: {speedup:.2f} x")
    return 0


def report_round(round_no: int, condor: Phase, pilot: Phase, order: str, slots: int, runtime: str) -> None:
    print(f"\nround {round_no} ({order}):")
    for phase, title in ((condor, "plain HTCondor"), (pilot, f"splitpilot ({runtime})")):
        print(f"  {title}: makespan {phase.makespan:.1f} s, per-job overhead {phase.overhead:.2f} s "
              f"(= ({phase.makespan:.1f} s x {slots} - {phase.jobs} x {PAYLOAD_S:g} s) / {phase.jobs}); "
              f"{phase.load}")
        for line in phase.breakdown:
            print(f"    {line}")
    print(f"  speedup (HTCondor makespan / splitpilot makespan): {condor.makespan / pilot.makespan:.2f} x")


if __name__ == "__main__":
    sys.exit(main())
