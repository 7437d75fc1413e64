"""Glideins: the package, the startup script, and a glidein running jobs in the mini-condor.

The `condor` test is end to end: a mini-condor pool, a broker on the host's
127.0.0.1 (the node shares the network namespace), jobs submitted with a
user token, one glidein submitted through the factory (htcondor2); the
glidein runs in the node as the job user, its agent matches and runs the
jobs; every job must end DONE with the right outputs, and nothing is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from htcondor2 import JobStatus

from condor_plugin.glidein.package import (
    PACKAGE_NAME,
    TOKEN_NAME,
    GlideinSettings,
    PackageBuilder,
    prepare_batch,
    render_script,
)

JOBS = 5
TIMEOUT = 420.0


@pytest.fixture(scope="module")
def package():
    return PackageBuilder(progress=lambda line: None).ensure()


def test_package_is_cached_by_key(package):
    again = PackageBuilder(progress=lambda line: None).ensure()
    assert again.cached and again.key == package.key and again.sha256 == package.sha256
    with open(package.tarball, "rb") as handle:
        assert hashlib.file_digest(handle, "sha256").hexdigest() == package.sha256
    assert any(w.startswith("splitpilot-") for w in package.wheels)
    assert any(w.startswith("grpcio-") and "cp313" in w for w in package.wheels)


def test_the_node_wheel_carries_the_node_side_only(package):
    """A glidein (and so a job's node) gets no broker server, no CA that could mint tokens, no database
    driver and no mini-condor: the wheel holds pilot/ and splitpilot/, names no requirement beyond the
    runtime's, and declares no command or entry point pointing at modules it does not carry."""
    import io
    import tarfile
    import zipfile

    with tarfile.open(package.tarball) as tar:
        member = next(m for m in tar.getmembers() if Path(m.name).name.startswith("splitpilot-"))
        wheel = zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read()))
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"pilot", "splitpilot"}, tops
    assert not any(name.startswith(("broker/", "condor_plugin/", "submit/", "apps/")) for name in names)
    assert "pilot/tokens/ca.py" not in names and "pilot/api/client.py" in names
    info = next(top for top in tops if top.endswith(".dist-info"))
    metadata = wheel.read(f"{info}/METADATA").decode()
    requires = [line.split(":", 1)[1].strip().split()[0].split(";")[0] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert sorted(r.split(">")[0].split("<")[0].split("=")[0] for r in requires) == ["cryptography", "grpcio",
                                                                                    "protobuf"], requires
    assert f"{info}/entry_points.txt" not in names


def test_key_follows_the_sources(tmp_path):
    root = tmp_path / "src"
    for name in ("setup.cfg", "pilot/__init__.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")
    builder = PackageBuilder(cache_dir=tmp_path / "cache", source_root=root, pins=("protobuf==1",))
    before = builder.key()
    (root / "pilot/__init__.py").write_text("y\n")
    assert builder.key() != before
    (root / "pilot/__init__.py").write_text("x\n")
    assert builder.key() == before
    assert builder.lookup() is None


def test_script_holds_no_token_and_checks_the_package(package, tmp_path):
    token = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN " b"PRIVATE KEY-----\nBBB\n"
    batch = prepare_batch(package, tmp_path / "b", token_pem=token, settings=GlideinSettings(broker="127.0.0.1:1"))
    text = batch.script.read_text()
    assert "PRIVATE KEY" not in text and "@" + "PACKAGE_SHA256@" not in text and package.sha256 in text
    assert stat.S_IMODE(batch.token.stat().st_mode) == 0o600 and batch.token.read_bytes() == token
    assert stat.S_IMODE(batch.directory.stat().st_mode) == 0o700
    # The package is spooled from the cache itself: no copy in the batch folder.
    assert batch.package == package.tarball and sorted(p.name for p in batch.directory.iterdir()) == [
        "agent-token.pem", "glidein_startup.sh", "log"]
    assert subprocess.run(["sh", "-n", str(batch.script)]).returncode == 0
    # A corrupted package is refused before anything is unpacked, and the token is removed.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(batch.token, scratch / TOKEN_NAME)
    (scratch / PACKAGE_NAME).write_bytes(b"not the package")
    result = subprocess.run(["sh", str(batch.script)], cwd=scratch, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "_CONDOR_SCRATCH_DIR": str(scratch)})
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    assert not (scratch / TOKEN_NAME).exists() and not (scratch / "splitpilot").exists()
    assert "BBB" not in result.stderr + result.stdout


def test_glidein_binds_reach_the_agents_command_line(package, tmp_path):
    settings = GlideinSettings(broker="127.0.0.1:1", binds=("/data/site:/site/data", "/cvmfs-like"))
    text = render_script(package, settings)
    assert "--bind '/data/site:/site/data' --bind '/cvmfs-like'" in text and "@BIND_ARGS@" not in text
    assert "--bind" not in render_script(package, GlideinSettings(broker="127.0.0.1:1"))
    script = tmp_path / "glidein_startup.sh"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("bind, words", [
    ("/data site:/x", "whitespace"),
    ("/data';touch /tmp/pwned;'", "a quote"),
    ("/data$(id)", "'$'"),
    ("/data`id`", "'`'"),
    ("data", "not absolute"),
    ("/data:/workdir", "overlaps /workdir"),
    ("/:/host", "whole host"),
    ("/proc", "processes"),
    ("/data/../etc", "'..'"),
])
def test_glidein_binds_that_would_break_the_script_or_the_isolation_are_refused(bind, words, tmp_path):
    """--bind of `glidein submit` and `factory run`: refused before the settings exist (no token, no batch)."""
    from apps import factory_cli
    from pilot.errors import UsageError

    with pytest.raises(UsageError) as err:
        GlideinSettings(broker="127.0.0.1:1", binds=(bind,))
    assert words in str(err.value)
    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    args = parser.parse_args(["glidein", "submit", "--site", "S", "--broker", "127.0.0.1:1", "--ca",
                              str(tmp_path / "ca"), "--work-dir", str(tmp_path / "work"), "--bind", bind])
    with pytest.raises(UsageError, match="bind"):
        args.handler(args)
    assert not (tmp_path / "work").exists()


def test_factory_cli_binds_reach_the_glidein_settings(tmp_path):
    from apps import factory_cli

    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    args = parser.parse_args(["factory", "run", "--site", "S", "--broker", "127.0.0.1:1", "--ca", str(tmp_path),
                              "--admin-token", "x", "--work-dir", str(tmp_path / "w"),
                              "--bind", "/data/site:/site/data", "--bind", "/opt/exp"])
    settings = factory_cli._settings(args, None)
    assert settings.glidein.binds == ("/data/site:/site/data", "/opt/exp")


def test_settings_refuse_quotes():
    from pilot.errors import UsageError

    with pytest.raises(UsageError):
        GlideinSettings(broker="x:1'; rm -rf /")


# ---------------------------------------------------------------------------
# End to end in the mini-condor

PAYLOAD = """\
#!/bin/sh
set -e
wc -w < words.txt | tr -d ' ' > count.out
sha256sum words.txt | cut -d' ' -f1 > digest.out
id -un > who.out
"""


@dataclass
class Site:
    """A mini-condor pool and a broker on the host's 127.0.0.1 (the node shares the network namespace)."""

    pool: object
    server: object
    user: object
    work: Path


@pytest.fixture(scope="module")
def site(package, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the mini-condor needs root")
    from broker.server import BrokerConfig, BrokerServer
    from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings
    from pilot.tokens import TokenRole
    from tests.test_minicondor import new_base_dir, stop_and_clean

    base = new_base_dir()
    work = tmp_path_factory.mktemp("glidein-site")
    pool = MiniCondor(MiniCondorSettings(state_dir=base / "state", shared_dirs=(base / "shared",)),
                      progress=lambda line: None)
    server = BrokerServer(BrokerConfig(state_dir=str(work / "broker"), listen="127.0.0.1:0", reap_interval=2.0))
    try:
        pool.start(die_with_caller=True)
        server.start()
        yield Site(pool, server, server.ca.new_token(TokenRole.USER, "glidein-test-user"), work)
    finally:
        try:
            server.stop()
        finally:
            stop_and_clean(pool, base)
        assert pool.running_node() is None


def submit_jobs(site: Site, client, count: int, tag: str) -> dict[int, tuple[int, str]]:
    """COUNT counting jobs; {job id: (words, sha256 of the input)}."""
    from pilot.pipe import messages as m

    script_path = site.work / "count.sh"
    script_path.write_text(PAYLOAD)
    script = client.upload(str(script_path), "count.sh")
    specs, expected = [], []
    for index in range(count):
        words = " ".join(f"{tag}{index}-{n}" for n in range(5 + 3 * index)) + "\n"
        path = site.work / f"words-{tag}-{index}.txt"
        path.write_text(words)
        specs.append(m.JobSpec(
            name=f"count-{tag}-{index}", executable="./count.sh",
            input_files=[script, client.upload(str(path), "words.txt")], output_patterns=["*.out"], max_attempts=2,
            requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=64, walltime_s=300)))
        expected.append((5 + 3 * index, hashlib.sha256(words.encode()).hexdigest()))
    return dict(zip(client.submit(specs), expected, strict=True))


def check_outputs(site: Site, client, expected: dict[int, tuple[int, str]], logs: str = "") -> None:
    from pilot.api.states import JobState

    for job_id, (words, digest) in expected.items():
        status = client.status(job_id)
        assert status.state is JobState.DONE, f"job {job_id}: {status.state} {status.message}\n{logs}"
        out = site.work / "out" / str(job_id)
        client.output(job_id, str(out))
        assert (out / "count.out").read_text().strip() == str(words)
        assert (out / "digest.out").read_text().strip() == digest
        assert (out / "who.out").read_text().strip() == site.pool.settings.job_user


def factory_settings(site: Site, **changes):
    import datetime

    from condor_plugin.factory.factory import FactorySettings

    # Where `glidein submit --minicondor` puts it: the pool's state folder, which the node does not see.
    values = dict(work_dir=site.pool.settings.state_dir / "factory", site="MINICONDOR",
                  lifetime=datetime.timedelta(minutes=30), memory_mb=1024, disk_mb=1024,
                  glidein=GlideinSettings(broker=site.server.address, runtimes="apptainer",
                                          image=site.pool.sandbox_image, idle_timeout="10s"))
    return FactorySettings(**(values | changes))


def batch_logs(directory: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                     for p in sorted((directory / "log").glob("glidein.*")))


def wait_until_final(client, factory, ids, started: float) -> float | None:
    """Poll until every job in IDS is final; return seconds from STARTED to the first DONE."""
    from pilot.api.states import JobState

    first_done = None
    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        jobs = [client.status(job_id) for job_id in ids]
        if first_done is None and any(job.state is JobState.DONE for job in jobs):
            first_done = time.monotonic() - started
        if all(job.final for job in jobs):
            break
        glideins = factory.glideins(history=False)
        held = [g for g in glideins if g.status == JobStatus.HELD]
        assert not held, f"glidein held: {held[0].hold_reason}"
        if not glideins:
            break  # the glideins left with jobs still waiting: the caller's checks say why
        time.sleep(0.5)
    return first_done


def wait_for_glideins_to_leave(factory, timeout: float = 120.0) -> None:
    """Until no glidein of FACTORY is queued; finished ones are retrieved (as `glidein status` does), then leave."""
    end = time.monotonic() + timeout
    while factory.glideins(history=False) and time.monotonic() < end:
        factory.collect()
        time.sleep(1.0)
    assert not factory.glideins(history=False), "glideins still queued"


def wait_for_glideins_to_finish(factory, timeout: float = 120.0) -> list:
    """Until every queued glidein of FACTORY has ended (COMPLETED, waiting in the queue to be retrieved)."""
    end = time.monotonic() + timeout
    while True:
        queued = factory.glideins(history=False)
        if queued and all(g.status == JobStatus.COMPLETED for g in queued):
            return queued
        assert time.monotonic() < end, f"glideins not finished after {timeout:.0f} s: {queued}"
        time.sleep(1.0)


def token_files(folder: Path) -> list[Path]:
    """Files under FOLDER holding a private key (the agent token is the only one the factory writes)."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and b"PRIVATE KEY" in path.read_bytes():
            found.append(path)
    return found


def spooled_tokens(site: Site, cluster: int) -> dict[str, bytes]:
    """The agent token(s) the schedd holds in its SPOOL for CLUSTER's glideins: {path: PEM} (read as root).

    A token the schedd removes between the listing and the read is gone, not an error (its spool cleanup
    runs after the glidein left the queue)."""
    spool = "/var/lib/condor/spool"
    listing = site.pool.run_in_node(["find", spool, "-path", f"*/cluster{cluster}.proc*", "-name", TOKEN_NAME],
                                    user="root", check=True).stdout.split()
    found = {}
    for path in listing:
        read = site.pool.run_in_node(["cat", path], user="root", check=False)
        if read.returncode == 0:
            found[path] = read.stdout.encode()
        elif "No such file" not in read.stdout + read.stderr:
            raise AssertionError(f"cannot read {path} in the node: {read.stdout}{read.stderr}")
    return found


def spool_emptied(site: Site, cluster: int, timeout: float = 60.0) -> bool:
    """Whether CLUSTER's spooled tokens are gone within TIMEOUT: the schedd removes a job's SPOOL folder
    after the job left the queue, not in the same step."""
    deadline = time.monotonic() + timeout
    while spooled_tokens(site, cluster):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def key_lines(token_pem: bytes) -> list[bytes]:
    """The base64 lines of the private key in TOKEN_PEM (what a thief would have to find)."""
    key = token_pem[token_pem.index(b"-----BEGIN " b"PRIVATE KEY-----"):]
    lines = [line for line in key.splitlines()[1:] if line and not line.startswith(b"-----")]
    assert lines
    return lines


@pytest.mark.condor
@pytest.mark.slow
def test_glidein_runs_jobs_in_the_minicondor(site, capsys):
    from apps import factory_cli
    from condor_plugin.factory.factory import Factory
    from pilot.api.client import BrokerClient
    from pilot.tokens import TokenRole, parse_identity, parse_token_pem

    times: dict[str, float] = {}
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client:
        expected = submit_jobs(site, client, JOBS, "a")
        settings = factory_settings(site)
        factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
        # `splitpilot glidein submit`, as a person would run it.
        parser = argparse.ArgumentParser()
        factory_cli.register(parser.add_subparsers())
        state_dir = str(site.pool.settings.state_dir)
        args = parser.parse_args([
            "glidein", "submit", "--count", "1", "--site", "MINICONDOR", "--minicondor", state_dir,
            "--broker", site.server.address, "--ca", site.server.config.ca_path,
            "--lifetime", "30m", "--idle-timeout", "10s", "--memory", "1024", "--disk", "1024"])
        started = time.monotonic()
        assert args.handler(args) == 0
        times["submit_command"] = time.monotonic() - started
        (glidein,) = factory.glideins(history=False)
        directory = settings.work_dir / "batches" / glidein.batch
        # The agent token exists on the submit side only until HTCondor has it: no copy is left anywhere
        # under the factory's folder (which is the factory's own, 0700), and the schedd holds it in its SPOOL.
        assert not token_files(settings.work_dir) and not list(settings.work_dir.rglob(TOKEN_NAME))
        assert sorted(p.name for p in directory.iterdir()) == ["batch.json", "glidein_startup.sh", "log"]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.geteuid()
        (spooled,) = spooled_tokens(site, glidein.cluster).values()
        identity = parse_identity(parse_token_pem(spooled, "spooled agent token").certificate)
        assert identity.role is TokenRole.AGENT and identity.site == "MINICONDOR"
        assert identity.subject == f"glidein-{glidein.batch}"
        first_done = wait_until_final(client, factory, list(expected), started)
        times["submit_to_first_done"] = first_done or -1
        times["submit_to_all_final"] = time.monotonic() - started
        check_outputs(site, client, expected, batch_logs(directory))
        # The glidein ends by itself (idle timeout); spooled, it waits in the queue for its output to be
        # retrieved: `glidein status` brings back its output, error and log, then it leaves the queue.
        wait_for_glideins_to_finish(factory)
        assert not list((directory / "log").iterdir())
        args = parser.parse_args(["glidein", "status", "--site", "MINICONDOR", "--minicondor", state_dir])
        assert args.handler(args) == 0
        out = capsys.readouterr().out
        assert f"{glidein.cluster}.0  COMPLETED" in out and "retrieved the output, error and log of 1" in out
        assert sorted(p.name for p in (directory / "log").iterdir()) == [
            f"glidein.{glidein.cluster}.0.{suffix}" for suffix in ("err", "log", "out")]
        wait_for_glideins_to_leave(factory)
        # With it went the spooled token; the schedd had it as a file to transfer encrypted, from the
        # factory and from its SPOOL (*/NAME: the shadow sends a spooled input from there).
        assert spool_emptied(site, glidein.cluster)
        (ad,) = site.pool.schedd().history(f"ClusterId == {glidein.cluster}", ["EncryptInputFiles"], 1)
        assert ad["EncryptInputFiles"] == f"{directory / TOKEN_NAME},*/{TOKEN_NAME}"
        assert not token_files(settings.work_dir)
        err = (directory / "log" / f"glidein.{glidein.cluster}.0.err").read_text()
        runtime = [line for line in err.splitlines() if "runtime:" in line]
        with capsys.disabled():
            print("\nglidein runtime lines:", *runtime, sep="\n  ")
            print("timings:", {k: round(v, 1) for k, v in times.items()})
            if os.environ.get("SPLITPILOT_TEST_SHOW_LOGS"):
                print(batch_logs(directory))
        assert "package" in err and "verified" in err and "the agent left with code 0" in err
        assert "ran 5 job(s)" in err
        assert "PRIVATE KEY" not in err + (directory / "log" / f"glidein.{glidein.cluster}.0.out").read_text()


@pytest.mark.condor
@pytest.mark.slow
def test_factory_cycle_follows_the_waiting_jobs(site):
    from condor_plugin.factory.factory import Factory, waiting_jobs_for_site
    from pilot.api.client import AdminClient, BrokerClient
    from pilot.tokens import TokenRole

    admin = site.server.ca.new_token(TokenRole.ADMIN, "glidein-test-admin")
    settings = factory_settings(site, factory="loop", max_per_cycle=2, max_queued=2)
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client, \
            AdminClient(site.server.address, admin, site.server.ca_pem) as admin_client:
        expected = submit_jobs(site, client, 3, "b")
        waiting = waiting_jobs_for_site(admin_client, "MINICONDOR")
        assert waiting == 3
        assert waiting_jobs_for_site(admin_client, "ELSEWHERE") == 3   # the jobs allow any site
        started = time.monotonic()
        assert factory.run_once(waiting) == 2                          # bounded by max_per_cycle
        assert not token_files(settings.work_dir)                      # spooled: no token left here
        assert factory.run_once(waiting) == 0                          # both still count as queued
        wait_until_final(client, factory, list(expected), started)
        check_outputs(site, client, expected)
        wait_for_glideins_to_leave(factory)
        assert factory.run_once(waiting_jobs_for_site(admin_client, "MINICONDOR")) == 0
        assert not list((settings.work_dir / "batches").glob(f"*/{TOKEN_NAME}"))


@pytest.mark.condor
@pytest.mark.slow
def test_removed_glidein_stops_its_job_and_the_broker_requeues_it(site):
    """condor_rm of a running glidein: SIGTERM reaches the agent through the script, the job gets its
    stop deadline and is reported, and the broker puts it back in the queue for another pilot."""
    import htcondor2

    from condor_plugin.factory.factory import Factory
    from pilot.api.client import BrokerClient
    from pilot.api.states import JobState
    from pilot.pipe import messages as m

    settings = factory_settings(site, factory="removed")
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client:
        sleeper = site.work / "sleep.sh"
        sleeper.write_text("#!/bin/sh\nexec sleep 600\n")
        (job_id,) = client.submit([m.JobSpec(
            name="sleeper", executable="./sleep.sh", input_files=[client.upload(str(sleeper), "sleep.sh")],
            max_attempts=3, requirements=m.Requirements(cores=1, memory_mb=128, disk_mb=16, walltime_s=900))])
        batch = factory.submit(1)
        deadline = time.monotonic() + TIMEOUT
        while client.status(job_id).state is not JobState.RUNNING:
            assert time.monotonic() < deadline, batch_logs(batch.directory)
            assert factory.glideins(history=False), "the glidein left\n" + batch_logs(batch.directory)
            time.sleep(0.5)
        removed = time.monotonic()
        site.pool.schedd().act(htcondor2.JobAction.Remove, f"ClusterId == {batch.cluster}", "test: removed")
        while client.status(job_id).state is not JobState.WAITING:
            assert time.monotonic() - removed < 60, f"job {client.status(job_id).state} 60 s after condor_rm"
            time.sleep(0.5)
        status = client.status(job_id)
        print(f"\nre-queued {time.monotonic() - removed:.1f} s after condor_rm: attempt {status.attempt}, "
              f"{status.message}")
        assert status.attempt == 1
        wait_for_glideins_to_leave(factory, timeout=60)
        client.kill(job_id, "test over")


@pytest.mark.condor
@pytest.mark.slow
def test_payload_of_a_no_container_glidein_finds_no_agent_token(site):
    """The hostile payload (tests/token_hunter.py) in a glidein without any isolation (runtimes process,
    policy require: it runs as the glidein's own user) hunts the node for the agent token: the exact SPOOL
    path of its glidein's spooled inputs, SPOOL, its scratch, /tmp, the factory's folder, SPOOL through
    /proc/PID/root, and a broad walk. The token is in the schedd's SPOOL meanwhile (checked): the payload
    must find none of its key."""
    from condor_plugin.factory.factory import Factory
    from pilot.api.client import BrokerClient
    from pilot.api.states import JobState
    from pilot.pipe import messages as m

    settings = factory_settings(site, factory="hunted", glidein=GlideinSettings(
        broker=site.server.address, container_policy="require", runtimes="process", idle_timeout="10s"))
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    spool = "/var/lib/condor/spool"
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client:
        hunter = client.upload(str(Path(__file__).with_name("token_hunter.py")), "token_hunter.py")
        (job_id,) = client.submit([m.JobSpec(
            name="token-hunter", executable="python3", arguments=["token_hunter.py", str(settings.work_dir), spool],
            input_files=[hunter], output_patterns=["found.out", "report.out"], max_attempts=1,
            requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=512, walltime_s=600))])
        batch = factory.submit(1)
        (token_pem,) = spooled_tokens(site, batch.cluster).values()   # what it would have to find
        secret = key_lines(token_pem)
        started = time.monotonic()
        wait_until_final(client, factory, [job_id], started)
        status = client.status(job_id)
        assert status.state is JobState.DONE, f"{status.state} {status.message}\n{batch_logs(batch.directory)}"
        out = site.work / "out" / str(job_id)
        client.output(job_id, str(out))
        found, report = (out / "found.out").read_bytes(), json.loads((out / "report.out").read_text())
        wait_for_glideins_to_leave(factory)
    print("\ntoken hunt:", json.dumps({k: v for k, v in report.items() if k != "proc_roots"}),
          f"/proc/PID/root of {len(report['proc_roots'])} processes: "
          f"{sorted(set(map(str, report['proc_roots'].values())))}")
    # It searched, as the glidein's user, where the token is: its glidein's job ad told it the exact path.
    cluster, proc = report["job_ad"]
    assert cluster == batch.cluster and report["files_read"] > 1000, report
    exact = f"{spool}/{cluster % 10000}/{proc}/cluster{cluster}.proc{proc}.subproc0/{TOKEN_NAME}"
    assert report["exact"][exact] == "ENOENT", report["exact"]          # SPOOL is an empty folder for jobs
    assert report["roots"][spool] == {"files": 0, "refused": 0}, report["roots"]
    assert report["roots"][str(settings.work_dir)] == {"error": "ENOENT"}  # the submit side is not here
    assert all(value in ("EACCES", "ENOENT", "EPERM") or value == {"files": 0, "refused": 0}
               for value in report["proc_roots"].values()), report["proc_roots"]
    # And found no line of the agent token's key, anywhere it could read.
    assert not [line for line in secret if line in found], f"agent key found by the payload in {report['found']}"
    assert not any(path.endswith(TOKEN_NAME) for path in report["found"]), report["found"]


@pytest.mark.condor
def test_cli_finds_a_schedd_through_a_collector(site, capsys):
    """--pool/--schedd: the schedd located by name through the pool's collector (as for a remote one)."""
    import htcondor2

    from apps import factory_cli
    from pilot.errors import UsageError

    collector = f"127.0.0.1:{site.pool._port()}"
    (name,) = [ad["Name"] for ad in site.pool.collector().locateAll(htcondor2.DaemonType.Schedd)]
    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    work = site.pool.shared_dirs[0] / "factory-remote"
    args = parser.parse_args(["glidein", "status", "--site", "ELSEWHERE", "--pool", collector, "--schedd", name,
                              "--work-dir", str(work)])
    assert args.handler(args) == 0
    assert "no glideins of factory splitpilot for site ELSEWHERE" in capsys.readouterr().out
    args = parser.parse_args(["glidein", "status", "--site", "S", "--pool", collector, "--schedd", "nosuch",
                              "--work-dir", str(work)])
    with pytest.raises(UsageError, match=f"no schedd named 'nosuch'.*{name}.*fix: pass --schedd"):
        args.handler(args)


# ---------------------------------------------------------------------------
# The factory loop, against a fake schedd (no pool needed)

class FakeSchedd:
    """The schedd calls the factory makes, modelled: spooled submission, retrieval, removal."""

    def __init__(self):
        self.ads = []        # in the queue
        self.done = []       # in the history
        self.submitted = []
        self.spooled = {}    # cluster -> {input file name: the bytes the client sent}
        self.retrieved = []  # constraints retrieved
        self.removed = []    # (constraint, reason)
        self.spool_error = None

    def query(self, constraint, projection):
        if "StageOutFinish" in constraint:     # the factory's NOT_RETRIEVED
            return [ad for ad in self.ads if ad["JobStatus"] == JobStatus.COMPLETED and not ad.get("StageOutFinish")]
        if "HoldReasonCode == 16" in constraint:   # waiting for their inputs
            return [ad for ad in self.ads if ad["JobStatus"] == JobStatus.HELD and ad.get("HoldReasonCode") == 16]
        return list(self.ads)

    def history(self, constraint, projection, match):
        return list(self.done)

    def submit(self, description, count, spool=False):
        assert spool, "glideins are submitted with their inputs spooled"
        cluster = len(self.submitted) + 1
        self.submitted.append(count)
        batch = description["+SplitpilotBatch"].strip('"')
        # On hold until their inputs arrive, as the schedd does (HoldReasonCode 16).
        self.ads += [{"ClusterId": cluster, "ProcId": p, "JobStatus": JobStatus.HELD, "HoldReasonCode": 16,
                      "SplitpilotBatch": batch, "EnteredCurrentStatus": 0} for p in range(count)]

        class Result:
            def cluster(self_inner):
                return cluster
        result = Result()
        result.inputs = description["transfer_input_files"].split(",")
        return result

    def spool(self, result):
        if self.spool_error is not None:
            raise self.spool_error
        # The client reads every input where the submit names it, now.
        self.spooled[result.cluster()] = {Path(p).name: Path(p).read_bytes() for p in result.inputs}
        for ad in self.ads:
            if ad["ClusterId"] == result.cluster():
                ad.update(JobStatus=JobStatus.IDLE, HoldReasonCode=None)

    def retrieve(self, constraint):
        self.retrieved.append(constraint)
        for ad in self.ads:
            if ad["JobStatus"] == JobStatus.COMPLETED:
                ad["StageOutFinish"] = 1
        self.done += [ad for ad in self.ads if ad.get("StageOutFinish")]
        self.ads = [ad for ad in self.ads if not ad.get("StageOutFinish")]

    def act(self, action, constraint, reason):
        self.removed.append((constraint, reason))
        cluster = int(constraint.split("ClusterId == ")[1].split()[0]) if "ClusterId == " in constraint else None
        self.ads = [ad for ad in self.ads if cluster is not None and ad["ClusterId"] != cluster]


@pytest.fixture
def fake_factory(tmp_path, package):
    import datetime

    from broker.ca import CertificateAuthority
    from condor_plugin.factory.factory import Factory, FactorySettings

    ca = CertificateAuthority.create()
    settings = FactorySettings(work_dir=tmp_path / "f", site="S", glidein=GlideinSettings(broker="127.0.0.1:1"),
                               max_queued=3, max_per_cycle=2, lifetime=datetime.timedelta(hours=1))
    schedd = FakeSchedd()
    factory = Factory(settings, schedd, ca, PackageBuilder(progress=lambda line: None))
    factory._package = package   # the tests patch condor_plugin.factory.to_submit: the fake schedd takes dicts
    return factory, schedd


def test_factory_loop_is_bounded(fake_factory, monkeypatch):

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    assert factory.run_once(waiting=10, now=1000) == 2      # max_per_cycle
    assert factory.run_once(waiting=10, now=1001) == 1      # max_queued (3 idle)
    assert factory.run_once(waiting=10, now=1002) == 0
    assert factory.run_once(waiting=0, now=1003) == 0
    # Every batch's token went to the schedd (read at spool time) and no copy stayed in the factory's folder.
    assert sorted(schedd.spooled) == [1, 2]
    assert all(b"PRIVATE KEY" in inputs[TOKEN_NAME] for inputs in schedd.spooled.values())
    assert stat.S_IMODE(factory.batches_dir.stat().st_mode) == 0o700
    for batch_dir in factory.batches_dir.iterdir():
        assert stat.S_IMODE(batch_dir.stat().st_mode) == 0o700
        assert not (batch_dir / TOKEN_NAME).exists() and not token_files(batch_dir)


def test_factory_backs_off_after_empty_glideins(fake_factory, monkeypatch):

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    assert factory.run_once(waiting=1, now=1000) == 1
    ad = schedd.ads[-1]
    # It came back after 5 s (empty or failed fast): still in the queue (spooled), it is retrieved in
    # the cycle, and the factory waits.
    ad |= {"JobStatus": JobStatus.COMPLETED, "JobStartDate": 1000, "CompletionDate": 1005, "ExitCode": 0}
    assert factory.run_once(waiting=1, now=1010) == 0
    assert schedd.retrieved and not schedd.ads and schedd.done == [ad]
    assert factory.policy.backoff_s == 30
    assert factory.run_once(waiting=1, now=1041) == 1       # after the backoff


def test_a_failed_spool_leaves_no_token_no_batch_and_no_held_glidein(fake_factory, monkeypatch):
    """The schedd takes the glideins but not their inputs: no glidein waits on hold for inputs that never
    come, no token file and no batch folder stay behind, and the error says what failed and where."""
    from condor_plugin.factory.factory import FactoryError

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    schedd.spool_error = RuntimeError("SPOOL: no space left on device")
    with pytest.raises(FactoryError) as err:
        factory.submit(1)
    assert "sending the glideins' inputs to the schedd failed" in str(err.value)
    assert "no space left" in str(err.value) and "removed" in str(err.value) and "fix:" in str(err.value)
    assert schedd.removed == [("ClusterId == 1", schedd.removed[0][1])] and not schedd.ads
    assert not list(factory.batches_dir.iterdir()) and not schedd.spooled


def test_collect_retrieves_only_finished_glideins_and_survives_a_failed_retrieval(fake_factory, monkeypatch):

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    lines: list[str] = []
    factory.progress = lines.append
    factory.submit(3)
    assert factory.collect() == [] and not schedd.retrieved          # idle: nothing to bring back
    schedd.ads[0]["JobStatus"] = 4
    schedd.ads[1]["JobStatus"] = 2

    def broken(constraint):
        raise RuntimeError("DCSchedd::receiveJobSandbox: permission denied")
    monkeypatch.setattr(schedd, "retrieve", broken)
    assert factory.collect() == []                                    # said, not raised: next cycle tries again
    assert "could not retrieve the output of glidein(s) 1.0" in lines[-1] and "permission denied" in lines[-1]
    # Nothing left the queue.
    assert [ad["JobStatus"] for ad in schedd.ads] == [JobStatus.COMPLETED, JobStatus.RUNNING, JobStatus.IDLE]
    monkeypatch.undo()
    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    assert factory.collect() == [(1, 0)]
    assert [ad["JobStatus"] for ad in schedd.ads] == [JobStatus.RUNNING, JobStatus.IDLE]
    assert schedd.done[0]["ProcId"] == 0


def test_cli_needs_a_work_dir_without_minicondor(tmp_path):
    from apps import factory_cli
    from pilot.errors import UsageError

    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    args = parser.parse_args(["glidein", "submit", "--site", "S", "--broker", "127.0.0.1:1", "--ca", str(tmp_path)])
    with pytest.raises(UsageError, match="--work-dir"):
        args.handler(args)
    args = parser.parse_args(["factory", "run", "--site", "S", "--broker", "127.0.0.1:1", "--ca", str(tmp_path),
                              "--admin-token", "x", "--max-queued", "4"])
    assert args.max_queued == 4 and args.handler is factory_cli.run_factory


def test_prune_keeps_the_newest_packages(tmp_path):
    builder = PackageBuilder(cache_dir=tmp_path, progress=lambda line: None)
    for index, key in enumerate(("old", "mid", "new", "newest")):
        (tmp_path / key).mkdir()
        (tmp_path / key / "package.json").write_text("{}")
        os.utime(tmp_path / key / "package.json", (1000 + index, 1000 + index))
    (tmp_path / ".build-x").mkdir()
    # Another factory of the host used "mid" within the hour: it may be about to spool it.
    assert builder.prune(keep={"old"}, newest=2, min_age_s=3600, now=1001 + 3599) == []
    assert builder.prune(keep={"old"}, newest=2, min_age_s=3600, now=1001 + 3601) == ["mid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build-x", "new", "newest", "old"]


def test_a_package_found_in_the_cache_is_marked_used(package):
    """A cache hit refreshes the package's mtime, so another builder's prune leaves a package in use."""
    record = package.tarball.parent / "package.json"
    os.utime(record, (1000, 1000))
    again = PackageBuilder(progress=lambda line: None).ensure()
    assert again.cached and again.key == package.key
    assert record.stat().st_mtime > 1000


def test_script_refuses_a_node_without_the_python_of_the_package(package, tmp_path):
    path = "/usr/sbin:/usr/bin:/sbin:/bin"   # the system's tools only (not a pyenv or /usr/local Python)
    if shutil.which(f"python{package.python_version}", path=path):
        pytest.skip(f"this machine has python{package.python_version}")
    token = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN " b"PRIVATE KEY-----\nBBB\n"
    batch = prepare_batch(package, tmp_path / "b", token_pem=token, settings=GlideinSettings(broker="127.0.0.1:1"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(batch.token, scratch / TOKEN_NAME)
    shutil.copy(batch.package, scratch / PACKAGE_NAME)
    result = subprocess.run(["sh", str(batch.script)], cwd=scratch, capture_output=True, text=True,
                            env={"PATH": path, "_CONDOR_SCRATCH_DIR": str(scratch)})
    assert result.returncode == 3 and f"no python{package.python_version}" in result.stderr, result.stderr
    assert "verified" in result.stderr                       # the checksum passed first
    assert not (scratch / TOKEN_NAME).exists() and not (scratch / PACKAGE_NAME).exists()
