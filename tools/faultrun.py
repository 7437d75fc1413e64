#!/usr/bin/env python3
"""Randomized fault injection: a real broker, real agents and jobs, and faults at random.

    .venv/bin/python tools/faultrun.py --rounds 100 --seed 1     # as root (tmpfs work dirs, kill, setpriv)
    .venv/bin/python tools/faultrun.py --seed 1234567 --rounds 1 # one round again, from its printed seed

Each round starts a broker (`splitpilot broker serve`, SQLite in a fresh state folder, short timeouts), a
few agents (`splitpilot agent`, process launcher, as the unprivileged user nobody, each on its own small
tmpfs work folder) and submits jobs with inputs and outputs. While they run, faults are injected at random:

  wrapper-kill   kill -9 of a job wrapper
  payload-kill   kill -9 of a payload (that job may then fail: it is "meant to fail")
  agent-kill     kill -9 of an agent (its guardian reports it); a new agent takes the same work folder
  broker-kill    kill -9 of the broker, restarted on the same state after an outage (up to --max-outage)
  agent-stop     SIGSTOP of an agent and everything under it past the broker's heartbeat timeout, then
                 SIGCONT: a zombie pilot coming back while its jobs run elsewhere
  agent-term     SIGTERM of an agent (HTCondor's preemption); a new agent takes the same work folder
  disk-full      the agent's work folder (a tmpfs) filled up for a few seconds

At the end of each round: every job final; none lost (every job DONE unless it was meant to fail); none
completed twice; outputs correct (content, and written by the attempt the broker took); no stale attempt
accepted (no event of an attempt after a later one began); no payload of a fenced attempt still running,
nor running on longer than --fence-limit seconds after the broker ended its attempt (or its node ran again);
no process and no sandbox left once the agents have left. Figures: successful payload runs thrown away
(an attempt whose payload succeeded but that was not the job's final attempt), and how long fenced
payloads ran on after the broker had ended their attempt.

Each round prints its seed (run it again alone with --seed SEED --rounds 1) and a verdict; the last line
is the summary: `faultrun_lost_jobs: N jobs`. With --json FILE, every round's record (faults, problems,
job histories of the jobs concerned) is written there. Exit code 1 when any round found a problem.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("wrapper-kill", "payload-kill", "agent-kill", "broker-kill", "agent-stop", "agent-term", "disk-full")

#: The payload: records its run in the ledger (start, alive every 0.2 s, end), works for DURATION seconds,
#: writes its result (job, attempt, digest of its input) and exits with CODE.
PAYLOAD = r'''
import hashlib, os, sys, time
ledger, duration, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
mark = os.path.join(ledger, "%s.%s" % (os.environ["SPLITPILOT_JOB_ID"], os.environ["SPLITPILOT_ATTEMPT"]))
seen = os.path.isdir(ledger)   # not under the namespace launcher, which shows the payload its sandbox only

def note(suffix, text):
    if seen:
        with open(mark + suffix, "w") as f:
            f.write(text)

note(".start", "%d %f\n" % (os.getpid(), time.time()))
end = time.time() + duration
while True:
    note(".alive", "%f\n" % time.time())
    if time.time() >= end:
        break
    time.sleep(min(0.2, max(0.0, end - time.time())))
digest = hashlib.sha256(open("data.txt", "rb").read()).hexdigest()
with open("result.out", "w") as f:
    f.write("%s %s %s\n" % (os.environ["SPLITPILOT_JOB_ID"], os.environ["SPLITPILOT_ATTEMPT"], digest))
note(".end", "%d %f\n" % (code, time.time()))
sys.exit(code)
'''


@dataclass(frozen=True)
class Settings:
    jobs: int = 10
    agents: int = 3
    max_faults: int = 4
    kinds: tuple[str, ...] = KINDS
    heartbeat_timeout_s: int = 9
    reap_interval_s: int = 1
    start_timeout_s: int = 30
    max_outage_s: float = 10.0
    long_outage_s: float = 60.0           # the longest outage, given with LONG_OUTAGE_CHANCE
    long_outage_chance: float = 0.1
    payload_s: tuple[float, float] = (0.3, 3.0)
    long_job_chance: float = 0.2          # long payloads: a fenced one has time left to run on beside the next
    long_payload_s: tuple[float, float] = (8.0, 20.0)
    #: A fenced attempt's payload must stop within this once its node runs again (heartbeat refused).
    fence_limit_s: float = 10.0
    bad_job_chance: float = 0.12          # jobs whose payload exits 3: meant to fail (FAILED_EXECUTION)
    max_attempts: int = 8                 # more than the faults of a round: a fault alone never uses them up
    launcher: str = "process"
    tmpfs_mb: int = 48
    stop_deadline_s: int = 5
    round_timeout_s: float = 180.0        # after the last fault
    user: str = "nobody"


@dataclass
class Fault:
    kind: str
    at: float                    # seconds since the round started
    target: str = ""
    detail: str = ""
    duration_s: float = 0.0


@dataclass
class RoundResult:
    index: int
    seed: int
    jobs: int = 0
    done: int = 0
    meant_to_fail: int = 0
    lost: list[dict] = field(default_factory=list)
    double: list[dict] = field(default_factory=list)
    wrong_output: list[dict] = field(default_factory=list)
    stale: list[dict] = field(default_factory=list)
    fenced_running: list[dict] = field(default_factory=list)
    fenced_ran_on: list[dict] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    leftover_sandboxes: list[str] = field(default_factory=list)
    wasted_runs: list[dict] = field(default_factory=list)
    fenced_overrun_s: list[float] = field(default_factory=list)
    #: Per broker restart with jobs still to run: seconds until the broker recorded the next job event.
    resumed_after_restart_s: list[float] = field(default_factory=list)
    agent_exits: Counter = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def problems(self) -> int:
        return (len(self.lost) + len(self.double) + len(self.wrong_output) + len(self.stale)
                + len(self.fenced_running) + len(self.fenced_ran_on) + len(self.leftover_processes)
                + len(self.leftover_sandboxes) + (1 if self.error else 0))

    def record(self) -> dict:
        data = dataclasses.asdict(self)
        data["faults"] = [dataclasses.asdict(f) for f in self.faults]
        data["agent_exits"] = dict(self.agent_exits)
        data["problems"] = self.problems
        return data


def say(line: str) -> None:
    print(line, flush=True)


def poll(condition: Callable[[], object], timeout: float, interval: float = 0.2):
    """CONDITION's first true value within TIMEOUT seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# ---------------------------------------------------------------------------------------- processes

def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of PID, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(root: int) -> list[int]:
    """ROOT and every process below it (a snapshot)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                children.setdefault(info[0], []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat(pid) is None:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_under(base: Path, exclude: set[int]) -> list[int]:
    """Live processes (not zombies) whose working folder or command line names BASE."""
    found = []
    prefix = str(base)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude or int(name) == os.getpid():
            continue
        pid = int(name)
        info = _stat(pid)
        if info is None or info[1] == "Z":
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if cwd.startswith(prefix) or prefix in cmdline(pid):
            found.append(pid)
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------- the round

class Round:
    def __init__(self, index: int, seed: int, settings: Settings, software: Path, work_root: Path) -> None:
        self.index = index
        self.seed = seed
        self.rng = random.Random(seed)
        self.s = settings
        self.all_final = threading.Event()  # set once every job of the round is final
        self.software = software
        self.base = Path(tempfile.mkdtemp(prefix=f"round-{index}-", dir=work_root))
        os.chmod(self.base, 0o755)
        self.result = RoundResult(index=index, seed=seed)
        self.started = time.monotonic()
        self.wall_started = time.time()
        self.user = pwd.getpwnam(settings.user)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.broker: subprocess.Popen | None = None
        self.agents: dict[int, subprocess.Popen] = {}        # slot -> guardian process
        self.agent_serial = 0
        self.mounts: list[Path] = []
        self.ca = None
        self.ca_pem = b""
        self.user_token = None
        self.expected: dict[int, dict] = {}                    # job id -> what it must end as
        self.lock = threading.Lock()                           # agents and broker are replaced by two threads
        self.paused: set[int] = set()                          # slots not to be replaced now (a fault holds them)
        self.resumed: list[float] = []                         # wall times of the SIGCONTs (agent-stop)
        self.restarts: list[float] = []                        # wall times the broker answered again
        self.stopping = False

    @property
    def ledger(self) -> Path:
        return self.base / "ledger"

    def now(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------ broker

    def start_broker(self) -> None:
        argv = [sys.executable, "-m", "apps", "broker", "serve", "--state-dir", str(self.base / "broker"),
                "--listen", self.address, "--heartbeat-timeout", f"{self.s.heartbeat_timeout_s}s",
                "--reap-interval", f"{self.s.reap_interval_s}s", "--start-timeout", f"{self.s.start_timeout_s}s",
                "--grace", "1s", "--log-level", "info"]
        log = open(self.base / "broker.log", "ab")
        self.broker = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base,
                                       env=self._env())
        log.close()

    def wait_broker(self, timeout: float = 60.0) -> None:
        from pilot.api.client import BrokerClient, BrokerError

        def answers() -> bool:
            if self.broker.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.broker.returncode}: "
                                   f"{(self.base / 'broker.log').read_text()[-2000:]}")
            try:
                with BrokerClient(self.address, self.user_token, self.ca_pem, timeout=2) as client:
                    client.list(limit=1)
                return True
            except BrokerError:
                return False
        if not poll(answers, timeout):
            raise RuntimeError(f"the broker did not answer within {timeout:g} s")

    def load_ca(self) -> None:
        from pilot.tokens import TokenRole

        ca_dir = self.base / "broker" / "ca"
        if not poll(lambda: (ca_dir / "ca.crt").exists() and (ca_dir / "policy.toml").exists(), 30):
            raise RuntimeError("the broker made no CA")
        poll(lambda: self._try_load(ca_dir), 10)
        self.ca_pem = (ca_dir / "ca.crt").read_bytes()
        self.user_token = self.ca.new_token(TokenRole.USER, "faultrun", ttl=datetime.timedelta(hours=2))

    def _try_load(self, ca_dir: Path) -> bool:
        from broker.ca import CertificateAuthority

        try:
            self.ca = CertificateAuthority.load(str(ca_dir))
            return True
        except Exception:  # noqa: BLE001 - still being written
            return False

    def kill_broker(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.broker.kill()
        self.broker.wait()

    # ------------------------------------------------------------ agents

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONPATH": str(REPO), "LANG": "C.UTF-8", "HOME": str(self.base)}

    def work_dir(self, slot: int) -> Path:
        return self.base / f"work-{slot}"

    def make_work_dir(self, slot: int) -> None:
        path = self.work_dir(slot)
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.s.tmpfs_mb}m,mode=0700", "faultrun", str(path)],
                       check=True)
        self.mounts.append(path)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def start_agent(self, slot: int) -> None:
        from pilot.tokens import TokenRole

        self.agent_serial += 1
        token = self.ca.new_token(TokenRole.AGENT, f"faultrun-{self.index}-{self.agent_serial}", site="FAULTRUN",
                                  queue="default", ttl=datetime.timedelta(hours=1))
        work = self.work_dir(slot)
        argv = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                sys.executable, "-m", "pilot", "agent", "--broker", self.address, "--token", "-",
                "--work-dir", str(work), "--software-dir", str(self.software), "--idle-timeout", "10m",
                "--lifetime", "1h", "--runtimes", self.s.launcher, "--container-policy", "require",
                "--stop-deadline", str(self.s.stop_deadline_s)]
        log = open(self.base / f"agent-{slot}.log", "ab")
        log.write(f"==== agent {self.agent_serial} at {self.now():.1f} s\n".encode())
        log.flush()
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=work, env=self._env())
        log.close()
        process.stdin.write(token.to_pem())
        process.stdin.close()
        self.agents[slot] = process

    def agent_child(self, slot: int) -> int | None:
        """The agent proper: the guardian's child."""
        guardian = self.agents[slot].pid
        children = [pid for pid in descendants(guardian) if (_stat(pid) or (0, ""))[0] == guardian]
        return children[0] if children else None

    def keep_agents(self) -> None:
        """Replace agents that left (any reason) while jobs remain; count how they left."""
        with self.lock:
            for slot, process in list(self.agents.items()):
                if process.poll() is None or slot in self.paused or self.stopping:
                    continue
                self.result.agent_exits[str(process.returncode)] += 1
                self.start_agent(slot)

    # ------------------------------------------------------------ jobs

    def submit(self) -> None:
        from pilot.api.client import BrokerClient
        from pilot.pipe import messages as m

        self.ledger.mkdir()
        os.chmod(self.ledger, 0o777)
        payload = self.base / "payload.py"
        payload.write_text(PAYLOAD)
        specs, records = [], []
        with BrokerClient(self.address, self.user_token, self.ca_pem) as client:
            script = client.upload(str(payload), "payload.py")
            for index in range(self.s.jobs):
                data = self.rng.randbytes(self.rng.randint(1, 256) * 1024)
                path = self.base / f"data-{index}.bin"
                path.write_bytes(data)
                bad = self.rng.random() < self.s.bad_job_chance
                long = self.rng.random() < self.s.long_job_chance
                duration = round(self.rng.uniform(*(self.s.long_payload_s if long else self.s.payload_s)), 2)
                specs.append(m.JobSpec(
                    name=f"faultrun-{self.index}-{index}", executable="python3",
                    arguments=["payload.py", str(self.ledger), str(duration), "3" if bad else "0"],
                    input_files=[script, client.upload(str(path), "data.txt")], output_patterns=["*.out"],
                    max_attempts=self.s.max_attempts,
                    requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=4, walltime_s=600)))
                records.append({"digest": hashlib.sha256(data).hexdigest(), "bad": bad, "may_fail": False,
                                "duration": duration})
            ids = client.submit(specs)
        self.expected = dict(zip(ids, records, strict=True))
        self.result.jobs = len(ids)
        self.result.meant_to_fail = sum(1 for r in records if r["bad"])

    def statuses(self) -> dict[int, object] | None:
        from pilot.api.client import BrokerClient, BrokerError

        try:
            with BrokerClient(self.address, self.user_token, self.ca_pem, timeout=5) as client:
                return {job_id: client.status(job_id) for job_id in self.expected}
        except BrokerError:
            return None

    # ------------------------------------------------------------ faults

    def inject(self, kind: str) -> Fault | None:
        fault = Fault(kind, round(self.now(), 1))
        slot = self.rng.choice(sorted(self.agents))
        if kind == "wrapper-kill":
            pids = [p for p in self._round_pids() if "pilot.wrapper" in cmdline(p)]
            if not pids:
                return None
            pid = self.rng.choice(pids)
            fault.target = f"wrapper pid {pid} ({self._job_of(pid)})"
            signal_all([pid], signal.SIGKILL)
        elif kind == "payload-kill":
            running = self._payloads()
            if not running:
                return None
            pid, job_id, attempt = self.rng.choice(running)
            fault.target = f"payload of job {job_id}.{attempt} (pid {pid})"
            self.expected[job_id]["may_fail"] = True
            signal_all([pid], signal.SIGKILL)
        elif kind == "agent-kill":
            child = self.agent_child(slot)
            if child is None:
                return None
            fault.target = f"agent {slot} (pid {child})"
            signal_all([child], signal.SIGKILL)
        elif kind == "broker-kill":
            outage = (self.rng.uniform(self.s.max_outage_s, self.s.long_outage_s)
                      if self.rng.random() < self.s.long_outage_chance else self.rng.uniform(0.3, self.s.max_outage_s))
            fault.target, fault.duration_s = "broker", round(outage, 1)
            self.kill_broker()
            time.sleep(outage)  # the outage itself
            self.start_broker()
            self.wait_broker()
            self.restarts.append(time.time())
        elif kind == "agent-stop":
            with self.lock:
                self.paused.add(slot)
            try:
                pids = descendants(self.agents[slot].pid)
                held = self.s.heartbeat_timeout_s + 3 * self.s.reap_interval_s + 2.0
                fault.target, fault.duration_s = f"agent {slot} and {len(pids) - 1} process(es) under it", held
                signal_all(pids, signal.SIGSTOP)
                time.sleep(held)  # past the heartbeat timeout: the broker reaps its attempts meanwhile
                # Noted before the SIGCONT: a payload that writes its ledger at once must not appear to have
                # run before its node resumed (with the time taken after, a second stop right behind the
                # first made the first's 14 s look like a fenced payload running on).
                self.resumed.append(time.time())
                signal_all(pids, signal.SIGCONT)
            finally:
                with self.lock:
                    self.paused.discard(slot)
        elif kind == "agent-term":
            fault.target = f"agent {slot} (guardian pid {self.agents[slot].pid})"
            signal_all([self.agents[slot].pid], signal.SIGTERM)
        elif kind == "disk-full":
            held = round(self.rng.uniform(1.0, 5.0), 1)
            fault.target, fault.duration_s = f"work folder of agent {slot}", held
            fault.detail = self._fill(self.work_dir(slot), held)
        self.result.faults.append(fault)
        held = f" for {fault.duration_s:g} s" if fault.duration_s else ""
        say(f"  {fault.at:6.1f} s  {kind:<13} {fault.target}{held}{f' ({fault.detail})' if fault.detail else ''}")
        return fault

    def _fill(self, folder: Path, held: float) -> str:
        filler = folder / ".faultrun-filler"
        stats = os.statvfs(folder)
        size = stats.f_bavail * stats.f_frsize
        try:
            with open(filler, "wb", buffering=0) as handle:   # unbuffered: nothing left to flush at close
                with contextlib.suppress(OSError):
                    os.posix_fallocate(handle.fileno(), 0, max(1, size))
                with contextlib.suppress(OSError):
                    while handle.write(b"\0" * 4096):
                        pass
            time.sleep(held)  # the disk stays full this long
        finally:
            filler.unlink(missing_ok=True)
        return f"{size // 1024} KiB"

    def _round_pids(self) -> list[int]:
        exclude = {self.broker.pid} if self.broker else set()
        return processes_under(self.base, exclude)

    def _payloads(self) -> list[tuple[int, int, int]]:
        found = []
        for start in self.ledger.glob("*.start"):
            job_id, attempt = (int(x) for x in start.name.split(".")[:2])
            if (self.ledger / f"{job_id}.{attempt}.end").exists():
                continue
            with contextlib.suppress(ValueError, OSError):
                pid = int(start.read_text().split()[0])
                if "payload.py" in cmdline(pid):
                    found.append((pid, job_id, attempt))
        return found

    def _job_of(self, wrapper_pid: int) -> str:
        for pid, job_id, attempt in self._payloads():
            if wrapper_pid in self._ancestors(pid):
                return f"job {job_id}.{attempt}"
        return "no payload yet"

    @staticmethod
    def _ancestors(pid: int) -> list[int]:
        chain = []
        while pid > 1:
            info = _stat(pid)
            if info is None:
                break
            pid = info[0]
            chain.append(pid)
        return chain

    # ------------------------------------------------------------ the round

    def run(self) -> RoundResult:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - a broken round is reported, with what is known
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.result.seconds = round(self.now(), 1)
            self._teardown()
        return self.result

    def _run(self) -> None:
        s = self.s
        self.start_broker()
        self.load_ca()
        self.wait_broker()
        self.submit()
        for slot in range(s.agents):
            self.make_work_dir(slot)
            self.start_agent(slot)
        faults = self.rng.randint(1, s.max_faults)
        # While the agents are busy (about a job a second and a half each), so that a fault finds its target.
        plan = sorted(self.rng.uniform(0.5, 1.0 + 1.5 * s.jobs / s.agents) for _ in range(faults))
        kinds = [self.rng.choice(s.kinds) for _ in range(faults)]
        injector = threading.Thread(target=self._injector, args=(plan, kinds), daemon=True)
        injector.start()
        finals = None
        deadline = None
        while True:
            self.keep_agents()
            statuses = self.statuses()
            if statuses is not None and all(st.final for st in statuses.values()):
                self.all_final.set()   # a fault still looking for its target gives up: there is none left
                if not injector.is_alive():
                    finals = statuses
                    break
            if not injector.is_alive():
                deadline = deadline or time.monotonic() + s.round_timeout_s
                if time.monotonic() > deadline:
                    finals = statuses or self.statuses() or {}
                    break
            time.sleep(0.3)
        injector.join()
        self._check(finals)

    def _injector(self, plan: list[float], kinds: list[str]) -> None:
        for at, kind in zip(plan, kinds, strict=True):
            delay = at - self.now()
            if delay > 0:
                time.sleep(delay)
            # A fault that finds nothing to act on now (no wrapper yet: on a loaded machine the first payload
            # can start many seconds late) tries again shortly, until every job is final or a minute passed.
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up and not self.all_final.is_set():
                try:
                    if self.inject(kind) is not None:
                        break
                except Exception as exc:  # noqa: BLE001 - the round says so; the other faults still come
                    self.result.error = f"injecting {kind} failed: {type(exc).__name__}: {exc}"
                    break
                time.sleep(0.25)

    # ------------------------------------------------------------ checks

    def _check(self, statuses: dict[int, object]) -> None:
        from pilot.api.states import JobState

        r = self.result
        self._recovery({job_id: st for job_id, st in statuses.items() if st is not None})
        for job_id, expect in self.expected.items():
            status = statuses.get(job_id)
            if status is None:
                r.lost.append({"job": job_id, "state": "unknown", "why": "no status at the end"})
                continue
            history = [(round(e.time.timestamp(), 3), e.state.name, e.attempt, e.detail) for e in status.history]
            evidence = {"job": job_id, "state": status.state.name, "attempt": status.attempt,
                        "message": status.message, "faults_meanwhile": self._faults_during(status),
                        "history": history}
            if not status.final:
                r.lost.append({**evidence, "why": "not final at the end of the round"})
                continue
            if status.state is JobState.DONE and expect["bad"]:
                r.lost.append({**evidence, "why": "meant to fail with exit 3, but DONE"})
            elif status.state is JobState.DONE:
                r.done += 1
            elif expect["bad"] and status.state is JobState.FAILED_EXECUTION and status.exit_code == 3:
                pass
            elif expect["may_fail"] and status.state is JobState.FAILED_EXECUTION:
                pass
            else:
                r.lost.append({**evidence, "why": "meant to succeed" if not expect["bad"] else "meant to fail "
                               "with exit 3 (FAILED_EXECUTION)"})
            dones = [e for e in status.history if e.state is JobState.DONE]
            if len(dones) > 1:
                r.double.append({**evidence, "why": f"{len(dones)} DONE events"})
            # No event of an attempt once a later attempt has begun (a fenced attempt's report accepted).
            highest = 0
            for event in status.history:
                if event.state is JobState.WAITING:
                    continue
                if event.attempt < highest:
                    r.stale.append({**evidence, "why": f"{event.state.name} of attempt {event.attempt} after "
                                                       f"attempt {highest} began"})
                    break
                highest = max(highest, event.attempt)
            if status.state is JobState.DONE:
                self._check_output(job_id, status, expect, evidence)
            self._runs(job_id, status, expect)

    def _recovery(self, statuses: dict[int, object]) -> None:
        """How long after each broker restart the work went on (the next job event anywhere), when some job
        was not final yet: the agents' and wrappers' reconnection delay."""
        events = sorted(e.time.timestamp() for st in statuses.values() for e in st.history)
        for restart in self.restarts:
            later = [t for t in events if t >= restart]
            if later and any(not st.final or max(e.time.timestamp() for e in st.history) > restart
                             for st in statuses.values()):
                self.result.resumed_after_restart_s.append(round(later[0] - restart, 1))

    def _faults_during(self, status) -> list[str]:
        """The faults that overlapped the job's last attempt (from its match to its last event)."""
        events = [e.time.timestamp() - self.wall_started for e in status.history if e.attempt == status.attempt]
        if not events:
            return []
        first, last = min(events), max(events)
        return [f"{f.kind} at {f.at:g} s ({f.target})" for f in self.result.faults
                if f.at <= last + 1 and f.at + f.duration_s >= first - 1]

    def _check_output(self, job_id: int, status, expect: dict, evidence: dict) -> None:
        from pilot.api.client import BrokerClient

        target = self.base / "out" / str(job_id)
        try:
            with BrokerClient(self.address, self.user_token, self.ca_pem) as client:
                client.output(job_id, str(target), ["result.out"])
            text = (target / "result.out").read_text().split()
        except Exception as exc:  # noqa: BLE001 - recorded as a wrong output
            self.result.wrong_output.append({**evidence, "why": f"result.out could not be downloaded: {exc}"})
            return
        wanted = [str(job_id), str(status.attempt), expect["digest"]]
        if text != wanted:
            self.result.wrong_output.append({**evidence, "why": f"result.out is {text}, wanted {wanted} (job, "
                                                                "the attempt the broker took, input digest)"})

    def _runs(self, job_id: int, status, expect: dict) -> None:
        """Successful payload runs thrown away, and fenced payloads that ran on."""
        from pilot.api.states import JobState

        # Attempt A ended at the first event of a later attempt (the re-queue's WAITING included).
        ended_at: dict[int, float] = {}
        attempts = sorted({e.attempt for e in status.history if e.attempt})
        for event in status.history:
            for attempt in attempts:
                if attempt not in ended_at and event.attempt > attempt:
                    ended_at[attempt] = event.time.timestamp()
        for start in self.ledger.glob(f"{job_id}.*.start"):
            attempt = int(start.name.split(".")[1])
            end = self.ledger / f"{job_id}.{attempt}.end"
            final_attempt = status.state is JobState.DONE and attempt == status.attempt
            if end.exists() and end.read_text().split()[0] == "0" and not final_attempt and not expect["bad"]:
                self.result.wasted_runs.append({"job": job_id, "attempt": attempt, "final_attempt": status.attempt,
                                                "state": status.state.name, "why": next(
                                                    (e.detail for e in status.history if e.attempt == attempt
                                                     and e.state is JobState.WAITING), "")})
            alive = self.ledger / f"{job_id}.{attempt}.alive"
            if attempt in ended_at and alive.exists():
                with contextlib.suppress(ValueError, OSError):
                    last = float(alive.read_text())
                    # From when the broker ended the attempt, or when its frozen node ran again if later.
                    since = max([ended_at[attempt]] + [t for t in self.resumed if t <= last])
                    overrun = last - since
                    if overrun > 0:
                        self.result.fenced_overrun_s.append(round(overrun, 2))
                    if overrun > self.s.fence_limit_s:
                        self.result.fenced_ran_on.append({
                            "job": job_id, "attempt": attempt, "ran_on_s": round(overrun, 1),
                            "why": f"its payload ran {overrun:.1f} s after the broker ended attempt {attempt} "
                                   "(or after its node ran again)", "history": [
                                (round(e.time.timestamp(), 3), e.state.name, e.attempt, e.detail)
                                for e in status.history]})

    # ------------------------------------------------------------ teardown

    def _teardown(self) -> None:
        r = self.result
        self.stopping = True
        # Fenced payloads still running now, before the agents are asked to leave.
        for pid, job_id, attempt in self._payloads():
            r.fenced_running.append({"job": job_id, "attempt": attempt, "pid": pid})
        for process in self.agents.values():
            if process.poll() is None:
                signal_all([process.pid], signal.SIGTERM)
        for slot, process in self.agents.items():
            try:
                process.wait(timeout=self.s.stop_deadline_s + 40)
                r.agent_exits[str(process.returncode)] += 1
            except subprocess.TimeoutExpired:
                r.leftover_processes.append(f"agent {slot} did not leave within "
                                            f"{self.s.stop_deadline_s + 40} s of SIGTERM")
                signal_all(descendants(process.pid), signal.SIGKILL)
                process.wait()
        exclude = {self.broker.pid} if self.broker else set()
        left = poll(lambda: not processes_under(self.base, exclude), 5.0) is None
        if left:
            pids = processes_under(self.base, exclude)
            r.leftover_processes += [f"pid {pid}: {cmdline(pid)[:200]}" for pid in pids]
            signal_all(pids, signal.SIGKILL)
        for slot in sorted(self.agents):
            work = self.work_dir(slot)
            with contextlib.suppress(OSError):
                r.leftover_sandboxes += [f"{work.name}/{p.name}" for p in work.iterdir() if p.is_dir()]
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_broker()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the run

def round_seed(base_seed: int, index: int) -> int:
    return base_seed if index == 0 else random.Random(base_seed * 1_000_003 + index).randrange(1, 2**31)


def verdict(result: RoundResult) -> str:
    kinds = Counter(f.kind for f in result.faults)
    text = (f"round {result.index} seed {result.seed}: {result.seconds:.0f} s, {result.jobs} jobs, "
            f"{result.done} done, faults {dict(kinds) or 'none'}, lost {len(result.lost)}, double "
            f"{len(result.double)}, wrong outputs {len(result.wrong_output)}, stale {len(result.stale)}, fenced "
            f"running {len(result.fenced_running)}, fenced ran on {len(result.fenced_ran_on)}, leftover processes "
            f"{len(result.leftover_processes)}, "
            f"leftover sandboxes {len(result.leftover_sandboxes)}, wasted successful runs {len(result.wasted_runs)}")
    if result.error:
        text += f"; ERROR {result.error}"
    return text + (" -> OK" if not result.problems else " -> PROBLEMS")


def run(settings: Settings, seed: int, rounds: int, json_path: Path | None = None, keep: bool = False,
        on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
    from pilot.launch import build_software_area

    if os.geteuid() != 0:
        raise SystemExit("faultrun: run it as root (tmpfs work folders, agents as an unprivileged user, kill -9)")
    work_root = Path(tempfile.mkdtemp(prefix="splitpilot-faultrun-"))
    os.chmod(work_root, 0o755)
    results: list[RoundResult] = []
    try:
        software = build_software_area(work_root / "software")
        for index in range(rounds):
            seed_i = round_seed(seed, index)
            say(f"round {index} seed {seed_i}")
            one = Round(index, seed_i, settings, software, work_root)
            result = one.run()
            results.append(result)
            say(verdict(result))
            for name in ("lost", "double", "wrong_output", "stale", "fenced_running", "fenced_ran_on"):
                for item in getattr(result, name):
                    say(f"  {name}: {json.dumps(item)[:1500]}")
            for item in result.leftover_processes + result.leftover_sandboxes:
                say(f"  leftover: {item}")
            if result.problems and keep:
                say(f"  kept {one.base}")
            else:
                one.cleanup()
            if json_path is not None:
                with open(json_path, "a") as out:
                    out.write(json.dumps(result.record()) + "\n")
            if on_round is not None:
                on_round(result)
    finally:
        if not keep:
            shutil.rmtree(work_root, ignore_errors=True)
    summary(results)
    return results


def summary(results: list[RoundResult]) -> None:
    kinds = Counter(f.kind for r in results for f in r.faults)
    total = lambda name: sum(len(getattr(r, name)) for r in results)  # noqa: E731
    overruns = [o for r in results for o in r.fenced_overrun_s]
    say(f"rounds: {len(results)}, with problems: {sum(1 for r in results if r.problems)}")
    say(f"faults: {sum(kinds.values())} ({', '.join(f'{k} {kinds[k]}' for k in KINDS if kinds[k])})")
    say(f"jobs: {sum(r.jobs for r in results)}, done {sum(r.done for r in results)}, meant to fail "
        f"{sum(r.meant_to_fail for r in results)}")
    say(f"lost {total('lost')}, double {total('double')}, wrong outputs {total('wrong_output')}, stale "
        f"{total('stale')}, fenced still running {total('fenced_running')}, fenced ran on (> limit) "
        f"{total('fenced_ran_on')}, leftover processes "
        f"{total('leftover_processes')}, leftover sandboxes {total('leftover_sandboxes')}, round errors "
        f"{sum(1 for r in results if r.error)}")
    say(f"successful payload runs thrown away: {total('wasted_runs')}; fenced payloads ran on after their attempt "
        f"ended: {len(overruns)} times, longest {max(overruns, default=0):.1f} s")
    recoveries = [x for r in results for x in r.resumed_after_restart_s]
    say(f"broker restarts with work left: {len(recoveries)}; next job event after "
        f"{statistics.median(recoveries) if recoveries else 0:.1f} s (median), {max(recoveries, default=0):.1f} s "
        "(longest)")
    exits = sum((r.agent_exits for r in results), Counter())
    say(f"agent exit codes: {dict(exits)}")
    say(f"faultrun_lost_jobs: {total('lost')} jobs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="the first round's seed (default: random); later "
                        "rounds' seeds derive from it")
    parser.add_argument("--rounds", type=int, default=10, help="rounds to run (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=Settings.jobs, help="jobs per round (default %(default)s)")
    parser.add_argument("--agents", type=int, default=Settings.agents, help="agents per round (default %(default)s)")
    parser.add_argument("--max-faults", type=int, default=Settings.max_faults,
                        help="faults per round at most (default %(default)s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (default: all)")
    parser.add_argument("--heartbeat-timeout", type=int, default=Settings.heartbeat_timeout_s, metavar="S",
                        help="the broker's --heartbeat-timeout (default %(default)s)")
    parser.add_argument("--max-outage", type=float, default=Settings.max_outage_s, metavar="S",
                        help="longest usual broker outage (default %(default)s)")
    parser.add_argument("--long-outage", type=float, default=Settings.long_outage_s, metavar="S",
                        help="longest broker outage, drawn with a 10%% chance (default %(default)s)")
    parser.add_argument("--long-jobs", type=float, default=Settings.long_job_chance, metavar="FRACTION",
                        help="share of jobs with a long payload (8-20 s; default %(default)s)")
    parser.add_argument("--fence-limit", type=float, default=Settings.fence_limit_s, metavar="S",
                        help="a fenced payload running on longer than this is a problem (default %(default)s)")
    parser.add_argument("--launcher", default="process", choices=("process", "namespace"),
                        help="the agents' launcher (default %(default)s); under 'namespace' the payloads cannot "
                             "reach the ledger: no payload-kill, wasted runs or fenced-payload figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="append every round's record to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the folders of rounds with problems")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown fault kind(s) {unknown}; choose from {', '.join(KINDS)}")
    settings = Settings(jobs=args.jobs, agents=args.agents, max_faults=args.max_faults, kinds=kinds,
                        heartbeat_timeout_s=args.heartbeat_timeout, max_outage_s=args.max_outage,
                        long_outage_s=args.long_outage, launcher=args.launcher, fence_limit_s=args.fence_limit,
                        long_job_chance=args.long_jobs)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    results = run(settings, seed, args.rounds, args.json, args.keep)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
