"""`splitpilot demo` (the default): the whole path, glideins on a real HTCondor pool.

    broker (embedded default: SQLite, mutual TLS, 127.0.0.1)
      <- 20 sample jobs, submitted with a user token
    mini-condor (a real HTCondor pool on this machine, IDTOKENS)
      <- the factory: agent token minted per batch, glidein package, htcondor2 submit
    glideins (HTCondor jobs, as the pool's unprivileged job user)
      -> the agent matches jobs at the broker and runs each in a wrapper
         inside an Apptainer container in the node (other runtimes by policy)
    outputs fetched from the broker, checked, summarised

Progress is printed throughout: the node root build (first run only), the
pool, the package, each factory cycle, the jobs' states and the glideins'.
Everything started here is stopped before it returns, also on Ctrl-C: the
glideins are removed, the pool stopped (no process or mount left), the broker
stopped and the state folder removed (unless --keep).
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from apps.demojobs import check_outputs, print_summary, progress_line, state_counts, submit_sample_jobs
from broker.server import BrokerConfig, BrokerServer
from condor_plugin.factory.factory import Factory, FactorySettings, waiting_jobs_for_site
from condor_plugin.glidein.package import GlideinSettings, PackageBuilder
from condor_plugin.testing import nodeproc
from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings
from condor_plugin.testing.noderoot import require_root
from pilot.api.client import AdminClient, BrokerClient
from pilot.errors import UsageError
from pilot.tokens import TokenRole

SITE = "MINICONDOR"


@dataclass(frozen=True)
class CondorDemoSettings:
    jobs: int = 20
    glideins: int = 2                   # glideins running at once (one core each)
    runtimes: str = "apptainer"         # what the agents try, in order
    container_policy: str = "prefer"    # prefer: fall back to no container if none passes its self-test
    idle_timeout: str = "10s"           # a glidein leaves when it found nothing to do this long
    factory_interval_s: float = 2.0
    timeout_s: float = 900.0
    keep: bool = False

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.glideins < 1:
            raise UsageError("--jobs and --glideins must be at least 1")


@dataclass(frozen=True)
class DemoOutcome:
    ok: bool
    containers: tuple[str, ...]     # the runtime each DONE job's payload saw itself in
    glidein_logs: tuple[str, ...]   # the glideins' error logs (they came back with the glideins)
    seconds: float


def say(line: str) -> None:
    print(line, flush=True)


def run_condor_demo(settings: CondorDemoSettings) -> DemoOutcome:
    """Run the demo; everything it starts is stopped before it returns (or raises)."""
    require_root("the HTCondor demo (it starts a mini-condor; `splitpilot demo --local` needs no root)")
    started = time.monotonic()
    # Not 0700 like mkdtemp's default: the job user must reach the shared folder through every parent.
    base = Path(tempfile.mkdtemp(prefix="splitpilot-demo-", dir="/tmp"))
    base.chmod(0o755)
    say(f"splitpilot demo: a broker, a mini-condor, {settings.jobs} jobs, glideins (state in {base})")
    pool = MiniCondor(MiniCondorSettings(state_dir=base / "minicondor", shared_dirs=(base / "shared",)),
                      progress=lambda line: say(f"mini-condor: {line}"))
    server = BrokerServer(BrokerConfig(state_dir=str(base / "broker"), listen="127.0.0.1:0", reap_interval=2.0))
    factory = None
    try:
        server.start()
        say(f"broker: listening on {server.address} (mutual TLS, SQLite in {server.state_dir})")
        say("mini-condor: starting (the first run builds and caches the node root: about a minute)")
        pool.start(die_with_caller=True)
        say(f"mini-condor: up in {time.monotonic() - started:.1f} s; jobs run as '{pool.settings.job_user}'")
        factory = _factory(settings, pool, server, base / "factory")
        return _run(settings, server, pool, factory, base, started)
    finally:
        if factory is not None:
            _remove_glideins(factory)
        try:
            pool.stop()
            pool.restore_client_config()
        finally:
            server.stop()
            if settings.keep:
                say(f"state kept in {base} (glidein logs in factory/batches/*/log)")
            else:
                if not nodeproc.mounts_under(base):   # never remove a tree with something mounted below
                    shutil.rmtree(base, ignore_errors=True)
                    say("state folder removed (--keep keeps it, the glideins' logs included)")


def _factory(settings: CondorDemoSettings, pool, server, work_dir: Path):
    per_glidein = -(-settings.jobs // settings.glideins)
    # The factory's folder is not the pool's shared folder: the glideins' inputs (the agent token among
    # them) are spooled into the schedd, so nothing of it needs to be, or is, visible in the node.
    factory_settings = FactorySettings(
        work_dir=work_dir, site=SITE, cpus=1, memory_mb=1024,
        disk_mb=1024, lifetime=datetime.timedelta(minutes=30), jobs_per_glidein=per_glidein,
        max_queued=settings.glideins, max_running=settings.glideins, max_per_cycle=settings.glideins,
        glidein=GlideinSettings(broker=server.address, container_policy=settings.container_policy,
                                runtimes=settings.runtimes, image=pool.sandbox_image,
                                idle_timeout=settings.idle_timeout))
    builder = PackageBuilder(progress=lambda line: say(f"package: {line}"))
    return Factory(factory_settings, pool.schedd(), server.ca, builder, progress=lambda line: say(f"factory: {line}"))


def _run(settings: CondorDemoSettings, server, pool, factory, base: Path, started: float) -> DemoOutcome:
    user = server.ca.new_token(TokenRole.USER, "demo-user")
    admin = server.ca.new_token(TokenRole.ADMIN, "demo-factory")
    with BrokerClient(server.address, user, server.ca_pem) as client, \
            AdminClient(server.address, admin, server.ca_pem) as admin_client:
        expected = submit_sample_jobs(client, str(base / "inputs"), settings.jobs)
        say(f"submitted {len(expected)} jobs (ids {expected[0].job_id}..{expected[-1].job_id}), "
            "each with 2 inputs and 3 outputs")
        say("factory: packaging the pilot (cached after the first run) and sending glideins")
        deadline = time.monotonic() + settings.timeout_s
        next_cycle, last = 0.0, ""
        while True:
            now = time.monotonic()
            if now >= next_cycle:
                factory.run_once(waiting_jobs_for_site(admin_client, SITE))
                next_cycle = time.monotonic() + settings.factory_interval_s
            listing = client.list()
            glideins = factory.glideins(history=False)
            line = progress_line(state_counts(listing), started, _glidein_counts(glideins))
            if line.split("] ", 1)[1] != last:
                say(line)
                last = line.split("] ", 1)[1]
            held = [g for g in glideins if g.status_name == "HELD"]
            if held:
                say(f"glidein {held[0].cluster}.{held[0].proc} is held: {held[0].hold_reason}")
            if len(listing.jobs) == len(expected) and all(job.final for job in listing.jobs):
                break
            if now > deadline:
                say(f"timed out after {settings.timeout_s:.0f} s with jobs still not final")
                break
            time.sleep(0.5)
        jobs_done_at = time.monotonic() - started
        say(f"all jobs final after {jobs_done_at:.1f} s; waiting for the glideins to leave "
            f"(their agents' idle timeout is {settings.idle_timeout})")
        _wait_for_glideins(factory, started, timeout=120.0)
        checked = check_outputs(client, expected, str(base / "outputs"))
    print_summary(checked)
    logs = _glidein_report(factory)
    ok = all(c.good for c in checked)
    containers = tuple(c.container for c in checked)
    used = ", ".join(f"{name} x{containers.count(name)}" for name in sorted(set(containers)))
    verdict = "all jobs DONE with the right outputs" if ok else "FAILED: see the table and the glidein logs"
    say(f"payload containers: {used}")
    say(f"jobs final in {jobs_done_at:.1f} s, total {time.monotonic() - started:.1f} s; {verdict}")
    return DemoOutcome(ok, containers, logs, time.monotonic() - started)


def _glidein_counts(glideins) -> str:
    counts: dict[str, int] = {}
    for glidein in glideins:
        counts[glidein.status_name.lower()] = counts.get(glidein.status_name.lower(), 0) + 1
    return "glideins " + (", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none queued")


def _wait_for_glideins(factory, started: float, timeout: float) -> None:
    """Until no glidein is queued; finished ones are retrieved (their logs come back) and then leave."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        factory.collect()
        queued = factory.glideins(history=False)
        if not queued:
            return
        summary = _glidein_counts(queued)
        if summary != last:
            say(f"[{time.monotonic() - started:5.1f} s] {summary}")
            last = summary
        time.sleep(1.0)
    say("the glideins did not leave in time: removing them")


def _glidein_report(factory) -> tuple[str, ...]:
    """One line per glidein of this run, from the schedd's history and the error log it brought back."""
    logs = []
    for glidein in factory.glideins(history=True):
        path = factory.batches_dir / glidein.batch / "log" / f"glidein.{glidein.cluster}.{glidein.proc}.err"
        text = path.read_text(errors="replace") if path.is_file() else ""
        logs.append(text)
        ran = next((line.split("ran ", 1)[1] for line in text.splitlines() if "leaving:" in line and "ran " in line),
                   "?")
        runtime = next((line.split("runtime: ", 1)[1].split(";")[0] for line in text.splitlines()
                        if "runtime: " in line and "memory limits" in line), "?")
        seconds = f"{glidein.ran_seconds:.0f} s" if glidein.ran_seconds is not None else "-"
        say(f"glidein {glidein.cluster}.{glidein.proc}: {glidein.status_name}, ran {seconds}, exit "
            f"{glidein.exit_code}; agent ran {ran}; runtime {runtime}; log {path.name}")
    return tuple(logs)


def _remove_glideins(factory) -> None:
    try:
        if factory.glideins(history=False):
            factory.remove_all("splitpilot demo: done")
    except Exception as exc:  # noqa: BLE001 - the pool is stopped next anyway, which ends every glidein
        say(f"could not remove the glideins: {exc}")
