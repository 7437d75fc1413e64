"""The mini-condor: a real HTCondor pool on this one machine, for splitpilot's tests and demo.

Modelled on `htcondor2.personal.PersonalPool`: an explicit state machine and a
context manager, with helpers that hand out htcondor2 objects for this pool.

    from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings

    with MiniCondor(MiniCondorSettings(state_dir=Path("/run/my-pool"))) as pool:
        result = pool.schedd().submit(htcondor2.Submit({...}))

Where the daemons come from: a host with `condor_master` installed uses it.
Elsewhere (Debian 12 has no HTCondor package) the daemons run from a cached
Debian 13 root (`condor_plugin.testing.noderoot`) entered through `node-enter.sh`:
private mount and PID namespaces, an overlay of the cached root and this
pool's writable layer, pivot_root. Either way the whole pool lives in one PID
namespace, so stopping it cannot leave a process behind, and in a private
mount namespace, so it cannot leave a mount behind; `stop()` checks both.

Security: IDTOKENS. The pool gets its own signing key and a token for the
unprivileged job user (the schedd refuses root-owned jobs), made with the
node's own `condor_store_cred` and `condor_token_create`; clients on the host
use that token through the client configuration `env()` points at.

The state folder (default /run/splitpilot-minicondor: a running pool does not
survive a reboot, and neither should its record):

    settings.json        the settings of the last start (so stop/status/env need only the folder)
    running.json         the running node's processes and namespaces; absent when stopped
    lock                 flock: one start/stop at a time
    node.log             condor_master's own output
    client/condor_config the client configuration (CONDOR_CONFIG) and client/tokens.d/
    node/upper, node/work, node/merged   the overlay (node root daemons)
    host/                LOCAL_DIR of host daemons
    shared/              the default shared folder, bound at the same path in the node
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from condor_plugin.testing import nodeproc
from condor_plugin.testing.nodedaemons import (
    POOL_DOMAIN,
    Daemons,
    DaemonSource,
    HostDaemons,
    NodeRootDaemons,
    StateLayout,
    client_config,
)
from condor_plugin.testing.noderoot import (
    DEFAULT_CACHE_DIR,
    NODE_PATH,
    SANDBOX_IMAGE_PATH,
    NodeRootCache,
    NodeRootRecipe,
    Progress,
    require_root,
    stderr_progress,
)
from pilot.errors import SplitpilotError, UsageError

if TYPE_CHECKING:  # imported lazily at run time: `splitpilot --help` must not load the bindings
    import htcondor2

#: A running pool does not survive a reboot, and neither should its record.
DEFAULT_STATE_DIR = Path("/run/splitpilot-minicondor")


class PoolState(enum.StrEnum):
    """The states of a `MiniCondor`; `start()` and `stop()` are the only transitions."""

    STOPPED = "STOPPED"      # no process of the pool runs (initially, and after stop())
    BUILDING = "BUILDING"    # building the cached node root (first start on a machine only)
    STARTING = "STARTING"    # daemons launched; waiting for the schedd and a slot to be advertised
    READY = "READY"          # the schedd and at least one slot are in the collector
    STOPPING = "STOPPING"    # shutting down and checking nothing is left behind


# ---------------------------------------------------------------------------
# Errors: one type per thing a caller would do differently

class MiniCondorError(SplitpilotError):
    """The mini-condor failed."""


class PoolNotRunningError(MiniCondorError):
    """The operation needs a running pool and there is none in `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(f"no mini-condor is running in {state_dir}; "
                         f"fix: splitpilot minicondor start --state-dir {state_dir}")
        self.state_dir = state_dir


class PoolStartError(MiniCondorError):
    """The daemons did not come up (in time); details are in the logs named."""

    def __init__(self, reason: str, log_dirs: Sequence[Path], tail: str) -> None:
        logs = ", ".join(str(p) for p in log_dirs)
        super().__init__(f"the mini-condor did not start: {reason}; logs: {logs}\n{tail}\n"
                         "fix: read the logs above; on a slow machine raise the timeout (--timeout)")
        self.reason = reason
        self.log_dirs = tuple(log_dirs)


class LeftoverError(MiniCondorError):
    """Processes or mounts of a stopped pool are still there (they should never be)."""

    def __init__(self, pids: Sequence[int], mounts: Sequence[str]) -> None:
        super().__init__(f"the mini-condor stopped but left processes {list(pids)} and mounts {list(mounts)}; "
                         "fix: kill -9 the processes, umount -l the mounts, and report this as a bug")
        self.pids = tuple(pids)
        self.mounts = tuple(mounts)


class NodeCommandTimeout(MiniCondorError):
    """A command run inside the node did not end in time; it was killed."""

    def __init__(self, argv: Sequence[str], user: str, timeout: float) -> None:
        super().__init__(f"{' '.join(argv)} (as {user}, in the node) did not end in {timeout:.0f} s and was "
                         "killed; fix: pass a longer timeout, or find what the command waits for")
        self.argv = tuple(argv)
        self.user = user
        self.timeout = timeout


class NodeCommandError(MiniCondorError):
    """A command run inside the node failed."""

    def __init__(self, argv: Sequence[str], user: str, returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} (as {user}, in the node) exited with {returncode}:\n{output.strip()}")
        self.argv = tuple(argv)
        self.user = user
        self.returncode = returncode
        self.output = output


# ---------------------------------------------------------------------------
# Settings and records

@dataclass(frozen=True)
class MiniCondorSettings:
    """How to run one mini-condor. Everything a later stop/status/env needs is in `state_dir`."""

    state_dir: Path = DEFAULT_STATE_DIR
    #: Host folders bound at the same absolute path in the node, shared by host-side
    #: submit code and jobs. Owned by the job user once the pool starts. Default: STATE/shared.
    shared_dirs: tuple[Path, ...] = ()
    #: The collector's port on 127.0.0.1; 0 picks one (the previous start's, if it is free).
    port: int = 0
    cpus: int = 2
    memory_mb: int = 2048
    daemons: DaemonSource = DaemonSource.AUTO
    cache_dir: Path = DEFAULT_CACHE_DIR
    #: The Debian mirror for building the node root; None reads it from the host's apt sources.
    mirror: str | None = None
    recipe: NodeRootRecipe = field(default_factory=NodeRootRecipe)
    start_timeout: float = 180.0
    stop_timeout: float = 30.0
    #: Configuration lines ("NAME = VALUE") appended last to the daemons' configuration, so they
    #: override ours: e.g. CLAIM_WORKLIFE = 0 to measure HTCondor without claim reuse.
    extra_config: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).absolute())
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).absolute())
        object.__setattr__(self, "daemons", DaemonSource(self.daemons))
        shared = tuple(Path(p).absolute() for p in self.shared_dirs) or (self.state_dir / "shared",)
        object.__setattr__(self, "shared_dirs", shared)
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} is not a TCP port; fix: pass 0 (pick one) or 1-65535")
        if self.cpus < 1 or self.memory_mb < 64:
            raise UsageError("the node needs at least 1 CPU and 64 MB of memory")
        object.__setattr__(self, "extra_config", tuple(self.extra_config))
        for line in self.extra_config:
            name, equals, _ = line.partition("=")
            if not equals or not name.strip() or not name.strip().replace("_", "").replace(".", "").isalnum() \
                    or "\n" in line:
                raise UsageError(f"configuration line {line!r} is not 'NAME = VALUE' on one line; "
                                 "fix: e.g. 'CLAIM_WORKLIFE = 0'")

    @property
    def job_user(self) -> str:
        return self.recipe.job_user

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data |= {"state_dir": str(self.state_dir), "cache_dir": str(self.cache_dir),
                 "shared_dirs": [str(p) for p in self.shared_dirs], "daemons": self.daemons.value}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MiniCondorSettings:
        data = json.loads(text)
        recipe = data.pop("recipe")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()}
        recipe = NodeRootRecipe(**fields)
        return cls(**{**data, "shared_dirs": tuple(data["shared_dirs"]), "recipe": recipe,
                      "extra_config": tuple(data.get("extra_config", ()))})


@dataclass(frozen=True)
class RunningNode:
    """What `start()` records about the running node (running.json), for stop and status."""

    source: str             # DaemonSource value actually used
    port: int
    launcher_pid: int       # the `unshare` process (host PID namespace, node mount namespace)
    launcher_start: int     # its start time in clock ticks: guards against PID reuse
    init_pid: int           # PID 1 of the node (node-enter.sh), as the host numbers it
    init_start: int
    mnt_ns: int             # inode numbers of the node's namespaces
    pid_ns: int
    ready: bool = False


@dataclass(frozen=True, order=True)
class Daemon:
    kind: str               # MyType: Collector, Negotiator, Scheduler, DaemonMaster, StartD
    name: str


@dataclass(frozen=True)
class Slot:
    name: str
    state: str
    activity: str
    cpus: int
    memory_mb: int


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of the pool, from its records and its collector."""

    state: PoolState
    state_dir: Path
    collector: str | None = None
    daemons: tuple[Daemon, ...] = ()
    slots: tuple[Slot, ...] = ()
    source: str | None = None
    node_pid: int | None = None
    client_config: Path | None = None
    shared_dirs: tuple[Path, ...] = ()
    problem: str | None = None   # why the collector could not be asked, if it could not


# ---------------------------------------------------------------------------
# The pool

class MiniCondor:
    """One mini-condor pool, identified by its state folder.

    A new object attaches to a pool already running in the same state folder
    (so `splitpilot minicondor stop` in another process stops it).
    """

    def __init__(self, settings: MiniCondorSettings | None = None, progress: Progress = stderr_progress) -> None:
        self.settings = settings or MiniCondorSettings()
        self.progress = progress
        self._layout = StateLayout(self.settings.state_dir, self.settings.job_user)
        self._launcher: subprocess.Popen | None = None
        self._daemons: Daemons | None = None
        self._saved_condor_config: list[str | None] = []   # [previous value] once we set ours
        self._lock_depth = 0
        record = self._read_record()
        if record is not None and nodeproc.alive(record.init_pid, record.init_start):
            self._state = PoolState.READY if record.ready else PoolState.STARTING
        else:
            self._state = PoolState.STOPPED

    @classmethod
    def from_state_dir(cls, state_dir: Path, progress: Progress = stderr_progress) -> MiniCondor:
        """The pool last started in STATE_DIR, with the settings it was started with."""
        settings_file = StateLayout(Path(state_dir).absolute(), "").settings_file
        if not settings_file.is_file():
            raise PoolNotRunningError(Path(state_dir))
        return cls(MiniCondorSettings.from_json(settings_file.read_text()), progress)

    # -- state ---------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        return self._state

    def _set_state(self, state: PoolState) -> None:
        self._state = state

    def __repr__(self) -> str:
        return f"MiniCondor(state_dir={str(self.settings.state_dir)!r}, state={self._state.value})"

    @property
    def client_config_path(self) -> Path:
        """The client configuration file (CONDOR_CONFIG) for this pool."""
        return self._layout.client_config

    @property
    def shared_dirs(self) -> tuple[Path, ...]:
        return self.settings.shared_dirs

    @property
    def sandbox_image(self) -> str:
        """An Apptainer sandbox image folder, as jobs in the node see it (node root daemons only)."""
        return SANDBOX_IMAGE_PATH

    def running_node(self) -> RunningNode | None:
        """The running node's record (its processes and namespaces), or None if none runs."""
        record = self._read_record()
        if record is not None and nodeproc.alive(record.init_pid, record.init_start):
            return record
        return None

    def env(self) -> dict[str, str]:
        """The environment a client process needs to use this pool."""
        return {"CONDOR_CONFIG": str(self.client_config_path)}

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> MiniCondor:
        # A pool made by `with` never outlives this process, even if it is killed.
        return self.start(die_with_caller=True)

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.restore_client_config()

    def start(self, die_with_caller: bool = False) -> MiniCondor:
        """Start the pool and wait until its schedd and a slot are advertised; no-op if running.

        DIE_WITH_CALLER: the node is killed when this process dies (tests); otherwise
        it keeps running after this process exits (the command line).
        """
        require_root("starting the mini-condor")
        self._layout.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            record = self._read_record()
            if record is not None and nodeproc.alive(record.init_pid, record.init_start):
                self._set_state(PoolState.STARTING)
                self._daemons = self._daemons_for(DaemonSource(record.source), build=False)
                self._wait_ready(record)
                return self
            if record is not None:  # a node that died without stop(): check and forget it
                self._stop_locked()
            try:
                self._start_locked(die_with_caller)
            except BaseException:
                self.progress("start failed: stopping what was started")
                with contextlib.suppress(MiniCondorError):
                    self._stop_locked()
                raise
        return self

    def stop(self) -> MiniCondor:
        """Stop the pool; check that no process and no mount of it is left. Idempotent."""
        with self._locked():
            self._stop_locked()
        return self

    def _start_locked(self, die_with_caller: bool) -> None:
        started = time.monotonic()
        settings = self.settings
        daemons = self._daemons_for(settings.daemons)
        self._daemons = daemons
        port = self._choose_port()
        self._layout.settings_file.write_text(dataclasses.replace(settings, port=port).to_json())
        uid, gid, _ = daemons.passwd(settings.job_user)
        for shared in settings.shared_dirs:
            _prepare_shared_dir(shared, uid, gid)
        daemons.prepare(port)
        self._ensure_credentials(daemons)
        self._write_client_config(port)
        self._set_state(PoolState.STARTING)
        record = self._launch(daemons, port, die_with_caller)
        self._wait_ready(record)
        self.progress(f"ready in {time.monotonic() - started:.1f} s: collector 127.0.0.1:{port}; "
                      f"client config {self.client_config_path}")

    def _daemons_for(self, source: DaemonSource, build: bool = True) -> Daemons:
        """The daemon source SOURCE resolves to; builds the node root if needed and BUILD is true."""
        if source is DaemonSource.AUTO:
            source = DaemonSource.HOST if shutil.which("condor_master") else DaemonSource.NODE_ROOT
        if source is DaemonSource.HOST:
            if shutil.which("condor_master") is None:
                raise UsageError("--daemons host: condor_master is not installed on this host; "
                                 "fix: use --daemons node-root (or auto)")
            return HostDaemons(self.settings, self._layout)
        found = self.node_root_cache().lookup(self.settings.recipe)
        if found is None:
            if not build:
                raise MiniCondorError("the node root is not built yet; fix: splitpilot minicondor build")
            self._set_state(PoolState.BUILDING)
            found = self.node_root_cache().ensure(self.settings.recipe, self.settings.mirror)
        return NodeRootDaemons(self.settings, self._layout, found)

    def node_root_cache(self) -> NodeRootCache:
        return NodeRootCache(self.settings.cache_dir, self.progress)

    def _choose_port(self) -> int:
        if self.settings.port:
            return self.settings.port
        if self._layout.settings_file.is_file():
            previous = MiniCondorSettings.from_json(self._layout.settings_file.read_text()).port
            if previous and _port_is_free(previous):
                return previous
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def _ensure_credentials(self, daemons: Daemons) -> None:
        """The pool signing key and the job user's token, made once per state folder by the node's tools."""
        token = self._layout.token_file
        key = daemons.key_file()
        if not key.is_file():
            self.progress("creating the pool signing key (condor_store_cred, in the node)")
            # -i -: the key material comes on stdin, never on a command line.
            self.run_in_node(["condor_store_cred", "add", "-c", "-i", "-", "-f", daemons.key_path_in_node()],
                             user="root", input=secrets.token_urlsafe(48), check=True)
            token.unlink(missing_ok=True)  # signed by a key that no longer exists
        if not token.is_file():
            identity = f"{self.settings.job_user}@{POOL_DOMAIN}"
            self.progress(f"creating an IDTOKEN for {identity} (condor_token_create, in the node)")
            result = self.run_in_node(["condor_token_create", "-identity", identity, "-key", "POOL"],
                                      user="root", check=True)
            text = result.stdout.strip()
            if text.count(".") != 2:
                raise MiniCondorError(f"condor_token_create printed no token: {result.stdout!r} {result.stderr!r}")
            self._layout.tokens_dir.mkdir(parents=True, exist_ok=True)
            self._layout.tokens_dir.chmod(0o700)
            # HTCondor ignores a token file others can read.
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text + "\n")

    def _write_client_config(self, port: int) -> None:
        self._layout.client_dir.mkdir(parents=True, exist_ok=True)
        self._layout.client_config.write_text(client_config(port, self._layout.tokens_dir))

    def _launch(self, daemons: Daemons, port: int, die_with_caller: bool) -> RunningNode:
        argv = [*daemons.enter_argv(), daemons.master(), "-f"]
        if die_with_caller:
            # setpriv sets the parent-death signal, then becomes unshare: if this process
            # dies, unshare is killed, and --kill-child takes the node's PID 1 with it.
            argv = ["setpriv", "--pdeathsig", "SIGKILL", "--", *argv]
        self.progress(f"starting the daemons ({daemons.source.value})")
        with open(self._layout.log_file, "ab") as log:
            self._launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        launcher_pid = self._launcher.pid
        launcher_start = nodeproc.start_time(launcher_pid)
        init_pid = nodeproc.wait_for(lambda: next(iter(nodeproc.children(launcher_pid)), None), 10.0)
        if init_pid is None or launcher_start is None:
            raise PoolStartError("the node's first process did not appear", [self._layout.log_file],
                                 _tail(self._layout.log_file, 20))
        record = RunningNode(
            source=daemons.source.value, port=port, launcher_pid=launcher_pid, launcher_start=launcher_start,
            init_pid=init_pid, init_start=nodeproc.start_time(init_pid) or 0,
            mnt_ns=nodeproc.ns_inode(init_pid, "mnt") or 0, pid_ns=nodeproc.ns_inode(init_pid, "pid") or 0)
        self._write_record(record)
        return record

    def _wait_ready(self, record: RunningNode) -> None:
        """Poll the collector until it lists a schedd and a slot, with progress; fail on timeout or death."""
        import htcondor2  # why: the condor extra's bindings, only for queries

        deadline = time.monotonic() + self.settings.start_timeout
        started = last_report = time.monotonic()
        seen: set[str] = set()
        problem = "no answer from the collector yet"
        while True:
            if not nodeproc.alive(record.init_pid, record.init_start):
                raise PoolStartError("the node exited", self._log_dirs(), _tail(self._layout.log_file, 20))
            try:
                ads = self.collector().query(htcondor2.AdType.Any, constraint='MyType =!= "Accounting"',
                                             projection=["MyType", "Name"])
                seen = {str(ad.get("MyType")) for ad in ads}
                if {"Scheduler", "Machine"} <= seen:
                    break
                problem = f"advertised so far: {', '.join(sorted(seen)) or 'nothing'}"
            except _htcondor_errors() as exc:
                problem = f"collector: {exc}"
            now = time.monotonic()
            if now >= deadline:
                raise PoolStartError(f"no schedd and slot after {self.settings.start_timeout:.0f} s ({problem})",
                                     self._log_dirs(), _tail(self._daemons.log_dir() / "MasterLog", 20)
                                     if self._daemons else "")
            if now - last_report >= 5:
                last_report = now
                self.progress(f"waiting for the schedd and a slot ({now - started:.0f} s; {problem})")
            time.sleep(0.5)
        self._write_record(dataclasses.replace(record, ready=True))
        self._set_state(PoolState.READY)

    def _stop_locked(self) -> None:
        record = self._read_record()
        if record is None and self._launcher is None:
            self._set_state(PoolState.STOPPED)
            return
        self._set_state(PoolState.STOPPING)
        started = time.monotonic()
        if record is not None and nodeproc.alive(record.init_pid, record.init_start):
            self.progress("stopping the daemons")
            self._shut_down(record)
        if self._launcher is not None:
            # Our own launcher: reap it, so no zombie stays behind. A launch that failed before
            # its record was written has only this handle: killing unshare kills the node (--kill-child).
            if record is None:
                self._launcher.kill()
            try:
                self._launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait()
            self._launcher = None
        if record is not None:
            nodeproc.wait_for(lambda: not nodeproc.alive(record.launcher_pid, record.launcher_start) or None, 10.0)
            pids, mounts = self._wait_for_leftovers(record, 10.0)
            if pids or mounts:
                raise LeftoverError(pids, mounts)
        self._layout.running_file.unlink(missing_ok=True)
        self._set_state(PoolState.STOPPED)
        self.progress(f"stopped in {time.monotonic() - started:.1f} s; no process or mount left")

    def _shut_down(self, record: RunningNode) -> None:
        """SIGQUIT to condor_master (a fast shutdown: jobs are killed); SIGKILL to the node's PID 1 if slow.

        PID 1 of the node exits when condor_master does; the kernel then kills
        whatever else is left in the node's PID namespace.
        """
        master = nodeproc.child_named(record.init_pid, "condor_master")
        if master is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGQUIT)
            gone = nodeproc.wait_for(lambda: not nodeproc.alive(record.init_pid, record.init_start) or None,
                                     self.settings.stop_timeout,
                                     lambda s: self.progress(f"waiting for the daemons to exit ({s:.0f} s)"))
            if gone:
                return
            self.progress(f"the daemons did not exit in {self.settings.stop_timeout:.0f} s: killing the node")
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.init_pid, signal.SIGKILL)
        nodeproc.wait_for(lambda: not nodeproc.alive(record.init_pid, record.init_start) or None, 10.0)

    def _wait_for_leftovers(self, record: RunningNode, timeout: float) -> tuple[list[int], list[str]]:
        """The node's processes and host mounts still there after TIMEOUT (teardown is asynchronous)."""
        paths = [self.settings.state_dir, *self.settings.shared_dirs]
        found = self.node_root_cache().lookup(self.settings.recipe)
        if found is not None:
            paths.append(found.path)

        def leftovers() -> tuple[list[int], list[str]]:
            return (nodeproc.node_processes(record.mnt_ns, record.pid_ns),
                    [m for path in paths for m in nodeproc.mounts_under(path)])

        nodeproc.wait_for(lambda: leftovers() == ([], []), timeout)
        return leftovers()

    def _log_dirs(self) -> list[Path]:
        return [self._layout.log_file] + ([self._daemons.log_dir()] if self._daemons else [])

    # -- inside the node -----------------------------------------------------

    def run_in_node(self, argv: Sequence[str], user: str | None = None, cwd: str = "/",
                    input: str | None = None, timeout: float = 120.0,
                    check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the node as USER (default: the job user), in CWD; capture its output.

        In the running node if there is one (its namespaces, its processes can see
        the daemons); otherwise in a fresh node of the same state folder that ends
        with the command. Either way nothing it starts outlives the node.
        """
        require_root("running a command in the mini-condor node")
        user = user or self.settings.job_user
        daemons = self._daemons or self._current_daemons()
        uid, gid, home = daemons.passwd(user)
        inner = ["/usr/bin/env", "-i", "-C", cwd, f"PATH={NODE_PATH}", "LANG=C.UTF-8", f"HOME={home}",
                 f"USER={user}", f"LOGNAME={user}", *(f"{k}={v}" for k, v in daemons.node_env().items())]
        if uid != 0:
            inner += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
        inner += list(argv)
        record = self._read_record()
        if record is not None and nodeproc.alive(record.init_pid, record.init_start):
            result = nodeproc.run_captured(daemons.nsenter_argv(record.init_pid) + inner, input, timeout)
        else:
            with self._locked():  # a fresh node mounts the pool's layer: never two at once
                result = nodeproc.run_captured(daemons.enter_argv() + inner, input, timeout)
        if result is None:
            raise NodeCommandTimeout(argv, user, timeout)
        if check and result.returncode != 0:
            raise NodeCommandError(argv, user, result.returncode, result.stdout + result.stderr)
        return result

    def _current_daemons(self) -> Daemons:
        """The daemon source of the running (or last) node, never building anything."""
        record = self._read_record()
        return self._daemons_for(DaemonSource(record.source) if record else self.settings.daemons, build=False)

    # -- htcondor2 helpers ---------------------------------------------------

    def use_client_config(self) -> None:
        """Make this pool the one htcondor2 talks to, in this process (CONDOR_CONFIG + reload).

        htcondor2 reads its configuration (token folder, authentication methods)
        from CONDOR_CONFIG, process-wide; `restore_client_config()` (called on
        leaving `with`) puts the previous one back.
        """
        import htcondor2  # why: the condor extra's bindings, only for queries

        path = str(self.client_config_path)
        if os.environ.get("CONDOR_CONFIG") == path:
            return
        if not self._saved_condor_config:
            self._saved_condor_config.append(os.environ.get("CONDOR_CONFIG"))
        os.environ["CONDOR_CONFIG"] = path
        htcondor2.reload_config()

    def restore_client_config(self) -> None:
        """Undo `use_client_config()`: the CONDOR_CONFIG this process had before."""
        if not self._saved_condor_config:
            return
        import htcondor2  # why: the condor extra's bindings, only for queries

        previous = self._saved_condor_config.pop()
        if previous is None:
            os.environ.pop("CONDOR_CONFIG", None)
        else:
            os.environ["CONDOR_CONFIG"] = previous
        htcondor2.reload_config()

    def collector(self) -> htcondor2.Collector:
        """The pool's collector, with this pool's client configuration in effect."""
        import htcondor2  # why: the condor extra's bindings, only for queries

        port = self._port()
        self.use_client_config()
        return htcondor2.Collector(f"127.0.0.1:{port}")

    def schedd(self) -> htcondor2.Schedd:
        """The pool's schedd, with this pool's client configuration in effect."""
        import htcondor2  # why: the condor extra's bindings, only for queries

        ads = self.collector().locateAll(htcondor2.DaemonType.Schedd)
        if not ads:
            raise MiniCondorError(f"the collector of {self.settings.state_dir} lists no schedd; "
                                  "fix: splitpilot minicondor status (is the pool READY?)")
        return htcondor2.Schedd(ads[0])

    def _port(self) -> int:
        record = self._read_record()
        if record is None:
            raise PoolNotRunningError(self.settings.state_dir)
        return record.port

    # -- status --------------------------------------------------------------

    def status(self) -> PoolStatus:
        """The pool's state, daemons and slots (from its collector, through htcondor2)."""
        import htcondor2  # why: the condor extra's bindings, only for queries

        base: dict[str, Any] = {"state_dir": self.settings.state_dir, "shared_dirs": self.settings.shared_dirs}
        record = self._read_record()
        if record is None or not nodeproc.alive(record.init_pid, record.init_start):
            self._set_state(PoolState.STOPPED)
            return PoolStatus(PoolState.STOPPED, **base)
        base |= {"collector": f"127.0.0.1:{record.port}", "source": record.source, "node_pid": record.init_pid,
                 "client_config": self.client_config_path}
        try:
            ads = self.collector().query(
                htcondor2.AdType.Any, constraint='MyType =!= "Accounting"',
                projection=["MyType", "Name", "State", "Activity", "Cpus", "Memory"])
        except _htcondor_errors() as exc:
            return PoolStatus(PoolState.STARTING, problem=str(exc), **base)
        daemons = tuple(sorted(Daemon(str(ad["MyType"]), str(ad.get("Name", ""))) for ad in ads
                               if ad.get("MyType") != "Machine"))
        slots = tuple(sorted(
            (Slot(str(ad.get("Name")), str(ad.get("State")), str(ad.get("Activity")), int(ad.get("Cpus", 0)),
                  int(ad.get("Memory", 0))) for ad in ads if ad.get("MyType") == "Machine"),
            key=lambda s: s.name))
        ready = any(d.kind == "Scheduler" for d in daemons) and bool(slots)
        state = PoolState.READY if ready else PoolState.STARTING
        self._set_state(state)
        return PoolStatus(state, daemons=daemons, slots=slots, **base)

    # -- records -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The state folder's lock (one start/stop/one-shot command at a time); re-entrant."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self._layout.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._layout.lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_record(self) -> RunningNode | None:
        try:
            return RunningNode(**json.loads(self._layout.running_file.read_text()))
        except FileNotFoundError:
            return None

    def _write_record(self, record: RunningNode) -> None:
        temp = self._layout.running_file.with_suffix(".tmp")
        temp.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
        os.replace(temp, self._layout.running_file)


# ---------------------------------------------------------------------------
# Small helpers

def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _prepare_shared_dir(path: Path, uid: int, gid: int) -> None:
    """Make PATH a folder the job user owns and can reach (every parent searchable by others)."""
    path.mkdir(parents=True, exist_ok=True)
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise UsageError(f"the shared folder {path} is unreachable for the job user: {parent} is not "
                             f"searchable by others; fix: chmod o+x {parent}, or choose a folder elsewhere")
    os.chown(path, uid, gid)
    path.chmod(0o775)


def _htcondor_errors() -> tuple[type[BaseException], ...]:
    """What htcondor2 raises when a daemon does not answer: HTCondorException since 24.x,
    RuntimeError before (the bindings inside a Debian 13 node are 23.9)."""
    import htcondor2  # why: the condor extra's bindings, only for queries

    return tuple(e for e in (getattr(htcondor2, "HTCondorException", None), RuntimeError) if e is not None)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: not there)"


__all__ = [
    "DaemonSource", "LeftoverError", "MiniCondor", "MiniCondorError", "MiniCondorSettings", "NodeCommandError",
    "NodeCommandTimeout", "PoolNotRunningError", "PoolStartError", "PoolState", "PoolStatus", "RunningNode",
]
