"""The mini-condor: a real HTCondor pool on this machine (condor_plugin.testing.minicondor).

Tests marked `condor` start real pools: they need root, and the first run on a
machine builds the cached node root (about a minute; cached afterwards). The
others check the pieces that need neither (apt sources, configuration, settings).

Every pool started here is stopped by a fixture finalizer, and is started with
die_with_caller=True: even a killed test run leaves no node behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from htcondor2 import JobStatus

from condor_plugin.testing import cli as minicondor_cli
from condor_plugin.testing import nodeproc
from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings, PoolState, RunningNode
from condor_plugin.testing.nodedaemons import ENTER_SCRIPT, client_config, daemon_config
from condor_plugin.testing.noderoot import (
    MirrorNotFoundError,
    NodeRootRecipe,
    host_debian_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
)
from pilot.errors import UsageError

PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
JOB_TIMEOUT = 240.0  # seconds a test job may take end to end (typically 2-5 s; generous for loaded CI)


# ---------------------------------------------------------------------------
# Helpers

def new_base_dir() -> Path:
    """A fresh folder for one pool. Not under pytest's tmp_path: that is mode 0700,
    and the job user must reach the shared folder through every parent."""
    base = Path(tempfile.mkdtemp(prefix="splitpilot-minicondor-test-", dir="/tmp"))
    base.chmod(0o755)
    return base


def stop_and_clean(pool: MiniCondor, base: Path) -> None:
    """The finalizer of every pool: stop (checks no process or mount is left), then remove its files."""
    try:
        pool.stop()
    finally:
        pool.restore_client_config()
        if not nodeproc.mounts_under(base):  # never remove a tree with something mounted below it
            shutil.rmtree(base, ignore_errors=True)


def job_dir(pool: MiniCondor, name: str) -> Path:
    """A folder in the pool's shared folder, owned by the job user like the shared folder itself."""
    shared = pool.shared_dirs[0]
    path = shared / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    owner = shared.stat()
    os.chown(path, owner.st_uid, owner.st_gid)
    return path


def write_script(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def wait_for_job(pool: MiniCondor, constraint: str, timeout: float = JOB_TIMEOUT):
    """Poll the schedd (then its history) until the job matching CONSTRAINT has left the queue.

    Fails at once if the job is held (its hold reason says why), or after TIMEOUT.
    """
    schedd = pool.schedd()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = schedd.query(constraint=constraint, projection=["JobStatus", "HoldReason"])
        for ad in queued:
            if ad.get("JobStatus") == JobStatus.HELD:
                pytest.fail(f"job held: {ad.get('HoldReason')}")
        if not queued:
            done = list(schedd.history(constraint=constraint, projection=["ExitCode", "JobStatus", "Owner"], match=1))
            if done:
                return done[0]
        time.sleep(0.5)
    pytest.fail(f"no job matching {constraint} finished within {timeout:.0f} s")


# ---------------------------------------------------------------------------
# The pool shared by most tests

@pytest.fixture(scope="module")
def pool() -> Iterator[MiniCondor]:
    if os.geteuid() != 0:
        pytest.skip("the mini-condor needs root (namespaces, mounts)")
    base = new_base_dir()
    pool = MiniCondor(MiniCondorSettings(state_dir=base / "state", shared_dirs=(base / "shared",)))
    try:
        pool.start(die_with_caller=True)
        yield pool
    finally:
        stop_and_clean(pool, base)


@pytest.mark.condor
def test_status_shows_a_schedd_and_a_slot(pool):
    status = pool.status()
    assert status.state is PoolState.READY and pool.state is PoolState.READY
    assert any(daemon.kind == "Scheduler" for daemon in status.daemons)
    assert len(status.slots) >= 1
    assert all(slot.cpus >= 1 and slot.memory_mb > 0 for slot in status.slots)


@pytest.mark.condor
def test_start_again_is_a_no_op(pool):
    before = pool.running_node()
    pool.start()
    assert pool.running_node() == before and pool.state is PoolState.READY


@pytest.mark.condor
def test_vanilla_job_runs_as_the_job_user_and_sees_its_machine_ad(pool):
    import classad2
    import htcondor2

    folder = job_dir(pool, "vanilla")
    script = write_script(folder / "job.sh", """
        #!/bin/sh
        set -e
        id -un > whoami.txt
        id -u >> whoami.txt
        cp "$_CONDOR_MACHINE_AD" machine.ad
        echo written by the job > from-job.txt
    """)
    tag = uuid.uuid4().hex
    result = pool.schedd().submit(htcondor2.Submit({
        "executable": str(script), "initialdir": str(folder), "output": "job.out", "error": "job.err",
        "log": "job.log", "should_transfer_files": "NO", "request_cpus": "1", "request_memory": "64",
        "request_disk": "1024", "My.SplitpilotTest": f'"{tag}"',
    }))
    assert result.num_procs() == 1
    ad = wait_for_job(pool, f'SplitpilotTest == "{tag}"')
    assert ad["ExitCode"] == 0, (folder / "job.err").read_text()
    assert ad["Owner"] == pool.settings.job_user
    assert (folder / "from-job.txt").read_text() == "written by the job\n"
    name, uid = (folder / "whoami.txt").read_text().split()
    assert name == pool.settings.job_user and int(uid) == pool.settings.recipe.job_uid != 0
    machine = classad2.parseOne((folder / "machine.ad").read_text())
    assert machine["Cpus"] >= 1 and machine["Memory"] > 0 and machine["Disk"] > 0


@pytest.mark.condor
def test_apptainer_runs_unprivileged_inside_a_job(pool):
    import htcondor2

    folder = job_dir(pool, "apptainer")
    # /var/lib/condor exists in the node but not in the image: seeing it missing
    # shows the command really ran in the container.
    script = write_script(folder / "job.sh", f"""
        #!/bin/sh
        exec apptainer exec --containall --no-home --pwd / {pool.sandbox_image} \\
            sh -c 'id -u; test ! -e /var/lib/condor && echo contained; cat /etc/os-release'
    """)
    tag = uuid.uuid4().hex
    pool.schedd().submit(htcondor2.Submit({
        "executable": str(script), "initialdir": str(folder), "output": "job.out", "error": "job.err",
        "log": "job.log", "should_transfer_files": "NO", "My.SplitpilotTest": f'"{tag}"',
    }))
    ad = wait_for_job(pool, f'SplitpilotTest == "{tag}"')
    out = (folder / "job.out").read_text()
    assert ad["ExitCode"] == 0, out + (folder / "job.err").read_text()
    lines = out.splitlines()
    assert lines[0] == str(pool.settings.recipe.job_uid)
    assert "contained" in lines and "VERSION_CODENAME=trixie" in lines


@pytest.mark.condor
def test_apptainers_documented_isolation_is_what_a_payload_finds(pool):
    """docs/security.md's `apptainer` row, measured where Apptainer runs: in the node, as the glidein's user,
    with the launcher's exact command (see tests/test_isolation_matrix.py for the other runtimes)."""
    import json
    import shlex

    from test_isolation_matrix import COLUMNS, MARKER, PROBE, cells, documented_rows

    from pilot.launch import ApptainerLauncher, Mounts, build_software_area, wrapper_command

    base = Path(tempfile.mkdtemp(prefix="matrix-", dir=pool.shared_dirs[0]))
    os.chmod(base, 0o755)
    work = base / "work"
    sandbox, other = work / "job-1-1" / "sandbox", work / "job-2-1" / "sandbox"
    for folder in (sandbox, other):
        folder.mkdir(parents=True)
    (other / "secret.out").write_text("another job's output\n")
    (work / "agent-state").write_text("the agent's own file\n")
    software = build_software_area(work / "software")
    shutil.copy(PROBE, sandbox / PROBE.name)
    launcher = ApptainerLauncher(image=pool.sandbox_image)
    mounts = Mounts.on_host(str(sandbox), str(software))
    (sandbox / "probe-input.json").write_text(json.dumps({
        "other_secret": str(other / "secret.out"), "agent_state": str(work / "agent-state"),
        "agent_pid_file": "agent.pid", "agent_marker": MARKER, "port": 1,
        "software": launcher.software_dir(mounts)}))
    uid = pool.settings.recipe.job_uid
    for path in [work, *work.rglob("*")]:
        os.lchown(path, uid, uid)
    command = ["env", "-i", *(f"{k}={v}" for k, v in launcher.environment(mounts, {}).items()),
               *launcher.wrap(wrapper_command(launcher, mounts, ["python3", "isolation_probe.py"]), mounts)]
    script = write_script(base / "agent.sh", f"""
        #!/bin/sh
        # the decoy agent, then the wrapper's command as the agent runs it; the host's loopback is
        # the node's (shared network namespace): port 1 refuses, which still shows it is reachable.
        python3 -c 'import time; time.sleep(600)' {MARKER} </dev/null >/dev/null 2>&1 &
        decoy=$!
        echo $decoy > {sandbox}/agent.pid  # given to the probe: it need not find the agent to be told its pid
        cd {shlex.quote(str(sandbox))} && {shlex.join(command)}
        status=$?
        kill $decoy
        exit $status
    """)
    result = pool.run_in_node(["/bin/sh", str(script)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads((sandbox / "probe-result.json").read_text())
    # Port 1 has no listener: a refused connection (not an unreachable network) means the host's loopback.
    seen["host_loopback"] = "ok" if seen["host_loopback"] == "ECONNREFUSED" else seen["host_loopback"]
    measured = cells(seen)
    print("| `apptainer` | " + " | ".join(measured[c] for c in COLUMNS) + " |")
    assert documented_rows()["apptainer"] == measured, seen


@pytest.mark.condor
def test_sub_file_accepted_by_condor_submit_in_the_node(pool):
    folder = job_dir(pool, "subfile")
    tag = uuid.uuid4().hex
    (folder / "hello.sub").write_text(textwrap.dedent(f"""\
        executable = /bin/echo
        arguments = "hello from condor_submit"
        output = hello.out
        error = hello.err
        log = hello.log
        should_transfer_files = NO
        My.SplitpilotTest = "{tag}"
        queue
    """))
    submitted = pool.run_in_node(["condor_submit", "hello.sub"], cwd=str(folder))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    ad = wait_for_job(pool, f'SplitpilotTest == "{tag}"')
    assert ad["ExitCode"] == 0 and ad["Owner"] == pool.settings.job_user
    assert (folder / "hello.out").read_text() == "hello from condor_submit\n"


@pytest.mark.condor
def test_run_in_node_as_root_and_as_the_job_user(pool):
    assert pool.run_in_node(["id", "-u"], check=True).stdout.strip() == str(pool.settings.recipe.job_uid)
    assert pool.run_in_node(["id", "-u"], user="root", check=True).stdout.strip() == "0"
    assert pool.run_in_node(["hostname"], check=True).stdout.strip() == "minicondor"


@pytest.mark.condor
def test_client_config_finds_the_pool_without_names(pool):
    import htcondor2

    pool.use_client_config()
    assert os.environ["CONDOR_CONFIG"] == pool.env()["CONDOR_CONFIG"]
    # The default constructors: what any client given only CONDOR_CONFIG does.
    assert htcondor2.Schedd().query(constraint="false") == []
    assert htcondor2.Collector().query(htcondor2.AdType.Schedd, projection=["Name"])


@pytest.mark.condor
def test_cli_status_and_env(pool, capsys):
    parser = argparse.ArgumentParser()
    minicondor_cli.register(parser.add_subparsers())
    state_dir = str(pool.settings.state_dir)
    args = parser.parse_args(["minicondor", "status", "--state-dir", state_dir])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "state: READY" in out and "Scheduler" in out and "slot1@minicondor" in out
    args = parser.parse_args(["minicondor", "env", "--state-dir", state_dir])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == f"export CONDOR_CONFIG={pool.client_config_path}\n"
    args = parser.parse_args(["minicondor", "status", "--state-dir", state_dir, "--json"])
    assert args.handler(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "READY" and document["state_dir"] == state_dir
    assert any(d["kind"] == "Scheduler" for d in document["daemons"])
    assert any(s["name"].startswith("slot1@minicondor") and s["cpus"] >= 1 for s in document["slots"])
    assert document["client_config"] == str(pool.client_config_path)


def test_cli_status_json_of_a_pool_never_started(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    minicondor_cli.register(parser.add_subparsers())
    args = parser.parse_args(["minicondor", "status", "--state-dir", str(tmp_path), "--json"])
    assert args.handler(args) == 1
    document = json.loads(capsys.readouterr().out)
    assert (document["state"], document["state_dir"], document["slots"]) == ("STOPPED", str(tmp_path), [])


@pytest.mark.condor
def test_host_daemons_inside_the_node(pool):
    """The host-daemons path (a host with condor_master installed), run inside the node,
    whose own condor_master and htcondor2 (23.9) play the host's."""
    folder = job_dir(pool, "hostdaemons")
    repo = Path(__file__).resolve().parents[1]
    (folder / "code/pilot").mkdir(parents=True)
    shutil.copytree(repo / "condor_plugin", folder / "code/condor_plugin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "errors.py"):
        shutil.copy(repo / "pilot" / name, folder / "code/pilot" / name)
    script = folder / "code/host_daemons.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(folder / "code")!r})
        import htcondor2
        from condor_plugin.testing.minicondor import DaemonSource, MiniCondor, MiniCondorSettings
        base = Path("/tmp/host-daemons")
        base.mkdir(mode=0o755)
        settings = MiniCondorSettings(state_dir=base / "state", daemons=DaemonSource.HOST)
        with MiniCondor(settings) as pool:
            status = pool.status()
            print("status", status.state, status.source, len(status.slots))
            shared = pool.shared_dirs[0]
            result = pool.schedd().submit(htcondor2.Submit({{
                "executable": "/bin/sh", "arguments": "\\"-c 'id -un > who.txt'\\"",
                "initialdir": str(shared), "log": "job.log", "should_transfer_files": "NO"}}))
            deadline = time.monotonic() + {JOB_TIMEOUT}
            while pool.schedd().query(constraint=f"ClusterId == {{result.cluster()}}", projection=["JobStatus"]):
                assert time.monotonic() < deadline, "job did not finish"
                time.sleep(0.5)
            print("job user", (shared / "who.txt").read_text().strip())
        print("after stop", pool.state)
    """))
    result = pool.run_in_node(["python3", str(script)], user="root", timeout=JOB_TIMEOUT + 60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == ["status READY host 1", f"job user {pool.settings.job_user}", "after stop STOPPED"], result.stderr


# ---------------------------------------------------------------------------
# Stopping: pools of their own

@pytest.fixture
def own_pool() -> Iterator[MiniCondor]:
    if os.geteuid() != 0:
        pytest.skip("the mini-condor needs root (namespaces, mounts)")
    base = new_base_dir()
    pool = MiniCondor(MiniCondorSettings(state_dir=base / "state", shared_dirs=(base / "shared",)))
    try:
        yield pool
    finally:
        stop_and_clean(pool, base)


def assert_nothing_left(pool: MiniCondor, record: RunningNode) -> None:
    assert not nodeproc.alive(record.init_pid, record.init_start)
    assert not nodeproc.alive(record.launcher_pid, record.launcher_start)
    assert nodeproc.node_processes(record.mnt_ns, record.pid_ns) == []
    root = pool.node_root_cache().lookup(pool.settings.recipe)
    for path in (pool.settings.state_dir, *pool.shared_dirs, *([root.path] if root else [])):
        assert nodeproc.mounts_under(path) == []


@pytest.mark.condor
def test_stop_with_a_running_job_leaves_nothing_and_is_idempotent(own_pool):
    import htcondor2

    pool = own_pool.start(die_with_caller=True)
    record = pool.running_node()
    assert record is not None
    folder = job_dir(pool, "long")
    tag = uuid.uuid4().hex
    # A job still running at stop time, inside an Apptainer container (PID namespace
    # of its own, nested in the node's): the hardest case for "nothing left".
    script = write_script(folder / "job.sh", f"""
        #!/bin/sh
        exec apptainer exec --containall --no-home --pwd / {pool.sandbox_image} sleep 600
    """)
    pool.schedd().submit(htcondor2.Submit({
        "executable": str(script), "initialdir": str(folder), "output": "job.out", "error": "job.err",
        "log": "job.log", "should_transfer_files": "NO", "My.SplitpilotTest": f'"{tag}"',
    }))

    def sleeping_in_node() -> bool:
        for pid in nodeproc.node_processes(record.mnt_ns, record.pid_ns):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return True
            except OSError:
                pass
        return False

    assert nodeproc.wait_for(sleeping_in_node, JOB_TIMEOUT), "the job's sleep never started"
    pool.stop()
    assert pool.state is PoolState.STOPPED and pool.running_node() is None
    assert_nothing_left(pool, record)
    pool.stop()  # idempotent
    assert pool.state is PoolState.STOPPED
    assert pool.status().state is PoolState.STOPPED
    # A second object for the same state folder (another process, say) agrees.
    assert MiniCondor.from_state_dir(pool.settings.state_dir).state is PoolState.STOPPED


@pytest.mark.condor
def test_pool_dies_with_a_killed_caller(own_pool):
    """A `with` pool must not outlive its process, even one killed with SIGKILL (no finalizer runs)."""
    state_dir = own_pool.settings.state_dir
    program = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings
        settings = MiniCondorSettings(state_dir=Path({str(state_dir)!r}),
                                      shared_dirs=({str(own_pool.shared_dirs[0])!r},))
        with MiniCondor(settings, progress=lambda line: None):
            print("ready", flush=True)
            time.sleep(600)
    """)
    # The child's orphans (its node's launcher and PID 1) come to us, not to the machine's
    # init, so that we can reap them: a killed caller leaves not even a zombie.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    record = None
    try:
        assert child.stdout.readline().strip() == "ready"
        record = own_pool.running_node()
        assert record is not None
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert nodeproc.wait_for(lambda: not nodeproc.alive(record.init_pid, record.init_start), 30.0)
        assert nodeproc.wait_for(lambda: nodeproc.node_processes(record.mnt_ns, record.pid_ns) == [], 30.0)
        assert_nothing_left(own_pool, record)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in (record.launcher_pid, record.init_pid) if record else ():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# ---------------------------------------------------------------------------
# Pieces that need no pool

def test_mirror_from_one_line_sources():
    text = textwrap.dedent("""\
        # a comment
        deb-src http://deb.example.org/debian bookworm main
        deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://mirror.example.org/debian/ bookworm main contrib
        deb http://security.example.org/debian-security bookworm-security main
    """)
    sources = parse_one_line_sources(text)
    assert [s.uri for s in sources] == ["http://mirror.example.org/debian/", "http://security.example.org/debian-security"]
    assert sources[0].components == ("main", "contrib")


def test_mirror_from_deb822_sources_skips_security_and_disabled(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(textwrap.dedent("""\
        Types: deb
        URIs: http://security.example.org/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb deb-src
        # a comment inside a paragraph
        URIs: http://disabled.example.org/debian
        Suites: bookworm
        Components: main
        Enabled: no

        Types: deb
        URIs: http://mirror.example.org/debian
        Suites: bookworm bookworm-updates
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
    """))
    (tmp_path / "sources.list.d/other.list.disabled").write_text("deb http://ignored.example.org/debian trixie main\n")
    parsed = parse_deb822_sources((tmp_path / "sources.list.d/debian.sources").read_text())
    assert [s.uri for s in parsed] == ["http://security.example.org/debian-security", "http://mirror.example.org/debian"]
    paths = (tmp_path / "sources.list", tmp_path / "sources.list.d")
    assert host_debian_mirror(paths) == "http://mirror.example.org/debian"


def test_no_mirror_is_a_usage_error_with_a_fix(tmp_path):
    (tmp_path / "x.list").write_text("deb https://packages.example.com/apt stable-extra main\n")
    with pytest.raises(MirrorNotFoundError) as info:
        host_debian_mirror((tmp_path,))
    assert info.value.exit_code == 2 and "--mirror" in str(info.value)


def test_recipe_key_is_stable_and_follows_the_recipe():
    assert NodeRootRecipe().key() == NodeRootRecipe().key()
    assert NodeRootRecipe().key() != NodeRootRecipe(packages=("htcondor",)).key()
    assert NodeRootRecipe().key().startswith("trixie-")


def test_settings_round_trip_through_json(tmp_path):
    settings = MiniCondorSettings(state_dir=tmp_path / "s", shared_dirs=(tmp_path / "a", tmp_path / "b"), port=9999)
    assert MiniCondorSettings.from_json(settings.to_json()) == settings
    assert MiniCondorSettings(state_dir=tmp_path).shared_dirs == (tmp_path / "shared",)


def test_configurations_use_idtokens_on_loopback(tmp_path):
    config = daemon_config(MiniCondorSettings(cpus=3, memory_mb=1000), 12345, [], "/var/lib/condor/spool")
    for line in ("COLLECTOR_HOST = 127.0.0.1:12345", "NETWORK_INTERFACE = 127.0.0.1", "NUM_CPUS = 3",
                 "MEMORY = 1000", "UID_DOMAIN = minicondor", "SEC_DEFAULT_AUTHENTICATION_METHODS = FS, IDTOKENS",
                 "MOUNT_UNDER_SCRATCH = /var/lib/condor/spool"):
        assert line in config.splitlines()
    client = client_config(12345, tmp_path / "tokens.d").splitlines()
    assert "SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS" in client
    assert f"SEC_TOKEN_DIRECTORY = {tmp_path / 'tokens.d'}" in client
    settings_lines = [line for line in config.splitlines() + client if not line.startswith("#")]
    assert not any("CLAIMTOBE" in line for line in settings_lines)


def test_extra_config_lines_come_last_and_are_checked(tmp_path):
    settings = MiniCondorSettings(state_dir=tmp_path, extra_config=["CLAIM_WORKLIFE = 0", "NUM_CPUS = 4"])
    lines = daemon_config(settings, 12345, [], "/var/lib/condor/spool").splitlines()
    assert lines[-2:] == ["CLAIM_WORKLIFE = 0", "NUM_CPUS = 4"]       # after our NUM_CPUS: it overrides
    assert MiniCondorSettings.from_json(settings.to_json()) == settings
    for bad in ("CLAIM_WORKLIFE", "= 3", "A B = 1", "X = 1\nCLAIMTOBE = 1"):
        with pytest.raises(UsageError, match="NAME = VALUE"):
            MiniCondorSettings(state_dir=tmp_path, extra_config=(bad,))


def test_enter_script_refuses_to_run_outside_a_new_pid_namespace():
    # Run directly it would mount over the host's tree: it must refuse before touching anything.
    result = subprocess.run(["/bin/sh", str(ENTER_SCRIPT), "--", "true"], capture_output=True, text=True)
    assert result.returncode == 70 and "PID 1" in result.stderr
