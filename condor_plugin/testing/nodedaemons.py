"""Where the mini-condor's daemons run, and the files that make them a pool.

Two daemon sources share one lifecycle (condor_plugin.testing.minicondor):

- `NodeRootDaemons`: the cached Debian 13 root (condor_plugin.testing.noderoot) under an
  overlay whose upper layer is the pool's own (so the cache is never written and
  every pool has its own logs, spool, keys), entered through node-enter.sh with
  private mount, PID and UTS namespaces and pivot_root.
- `HostDaemons`: the host's own HTCondor installation (where condor_master is
  installed), with a configuration of our own and the same PID and mount
  namespaces, so stop works and is checked the same way.

Both write the daemons' configuration (`daemon_config`: a personal pool on
127.0.0.1 with IDTOKENS) and say how to run a command in a fresh node or in the
running one. `client_config` is the host-side client configuration.
"""

from __future__ import annotations

import enum
import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from condor_plugin.testing.nodeproc import mounts_under
from condor_plugin.testing.noderoot import NodeRoot, remove_tree
from pilot.errors import SplitpilotError, UsageError

if TYPE_CHECKING:
    from condor_plugin.testing.minicondor import MiniCondorSettings

#: The node's host name (its own UTS namespace): daemon and slot names do not depend on the host.
NODE_HOSTNAME = "minicondor"
#: UID_DOMAIN, FILESYSTEM_DOMAIN and TRUST_DOMAIN. A token for USER@minicondor makes jobs run as USER.
POOL_DOMAIN = "minicondor"
ENTER_SCRIPT = Path(__file__).with_name("node-enter.sh")
#: Where the pool's signing key lives, as the node sees it (node root daemons).
NODE_KEY_PATH = "/etc/condor/passwords.d/POOL"


class DaemonSetupError(SplitpilotError):
    """The daemons' files or folders cannot be prepared."""


class DaemonSource(enum.StrEnum):
    """Where the HTCondor daemons come from."""

    AUTO = "auto"            # the host's condor_master if installed, else the node root
    HOST = "host"            # the host's own HTCondor installation
    NODE_ROOT = "node-root"  # the cached Debian 13 root (condor_plugin.testing.noderoot)


@dataclass(frozen=True)
class StateLayout:
    """The files of one state folder."""

    state_dir: Path
    job_user: str

    @property
    def settings_file(self) -> Path:
        """The settings of the last start: later commands need only the folder."""
        return self.state_dir / "settings.json"

    @property
    def running_file(self) -> Path:
        """The running node's processes and namespaces; absent when stopped."""
        return self.state_dir / "running.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"

    @property
    def log_file(self) -> Path:
        """condor_master's own output."""
        return self.state_dir / "node.log"

    @property
    def client_dir(self) -> Path:
        return self.state_dir / "client"

    @property
    def client_config(self) -> Path:
        return self.client_dir / "condor_config"

    @property
    def tokens_dir(self) -> Path:
        return self.client_dir / "tokens.d"

    @property
    def token_file(self) -> Path:
        return self.tokens_dir / self.job_user

    @property
    def upper(self) -> Path:
        """The overlay's upper layer: the node's writable files."""
        return self.state_dir / "node/upper"

    @property
    def work(self) -> Path:
        return self.state_dir / "node/work"

    @property
    def merged(self) -> Path:
        return self.state_dir / "node/merged"

    @property
    def host_dir(self) -> Path:
        """LOCAL_DIR of host daemons."""
        return self.state_dir / "host"

    @property
    def host_config(self) -> Path:
        return self.host_dir / "condor_config"


# ---------------------------------------------------------------------------


class Daemons:
    """What differs between the two daemon sources: files, paths and how to enter the node."""

    source: DaemonSource

    def __init__(self, settings: MiniCondorSettings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout

    def prepare(self, port: int) -> None:
        """Write the daemons' configuration and make their folders, before any start."""
        raise NotImplementedError

    def enter_argv(self) -> list[str]:
        """The argv prefix that makes a fresh node; the command to run in it follows."""
        raise NotImplementedError

    def nsenter_argv(self, init_pid: int) -> list[str]:
        """The argv prefix that runs a command in the running node of INIT_PID."""
        raise NotImplementedError

    def node_env(self) -> dict[str, str]:
        """Environment every HTCondor command in the node needs."""
        return {}

    def passwd(self, user: str) -> tuple[int, int, str]:
        """(uid, gid, home) of USER as the node sees it."""
        raise NotImplementedError

    def key_file(self) -> Path:
        """The pool signing key, as a host path."""
        raise NotImplementedError

    def key_path_in_node(self) -> str:
        raise NotImplementedError

    def log_dir(self) -> Path:
        """The daemons' log folder, as a host path."""
        raise NotImplementedError

    def master(self) -> str:
        """condor_master's path, as the node sees it."""
        raise NotImplementedError

    def config_lines(self) -> list[str]:
        """Lines added to the common daemon configuration."""
        return []

    def spool_in_node(self) -> str:
        """The schedd's SPOOL, as the node sees it (hidden from jobs: see daemon_config)."""
        raise NotImplementedError

    def _unshare(self) -> list[str]:
        # --uts: the node's own host name. --kill-child: if unshare dies, PID 1 of the
        # node gets SIGKILL, and with it every process of the node.
        return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--uts",
                "--kill-child=SIGKILL", "--", "/bin/sh", str(ENTER_SCRIPT)]

    def _binds_and_env(self) -> list[str]:
        argv = ["--hostname", NODE_HOSTNAME]
        for path in self.settings.shared_dirs:
            argv += ["--bind", str(path)]
        for name, value in self.node_env().items():
            argv += ["--env", f"{name}={value}"]
        return argv


class NodeRootDaemons(Daemons):
    """Daemons from the cached Debian 13 root, under an overlay of the pool's own layer."""

    source = DaemonSource.NODE_ROOT

    def __init__(self, settings: MiniCondorSettings, layout: StateLayout, root: NodeRoot) -> None:
        super().__init__(settings, layout)
        self.root = root

    def prepare(self, port: int) -> None:
        lay, lower = self.layout, self.root.path
        for path in (lay.upper, lay.work, lay.merged):
            path.mkdir(parents=True, exist_ok=True)
        # The upper layer's top folder is the node's "/": it must be as open as the root's.
        mirror_mode(lower, lay.upper, default=0o755)
        if mounts_under(lay.merged):
            raise DaemonSetupError(f"{lay.merged} is still mounted (a node of this state folder is running "
                                   f"outside its record?); fix: umount -R {lay.merged}")
        # What a previous run left in /run and /tmp is stale: drop it from the upper layer.
        for stale in ("run", "tmp", "var/tmp"):
            remove_tree(lay.upper / stale)
        condor_uid, condor_gid = self.root.user_ids("condor")
        # HTCondor's own folders must belong to its user, or condor_procd spins.
        for rel in ("var/log/condor", "var/lib/condor", "var/lib/condor/spool", "var/lib/condor/execute",
                    "run/condor", "run/lock/condor"):
            path = lay.upper / rel
            path.mkdir(parents=True, exist_ok=True)
            mirror_mode(lower / rel, path, default=0o755)
            os.chown(path, condor_uid, condor_gid)
        for rel in ("run", "run/lock"):
            mirror_mode(lower / rel, lay.upper / rel, default=0o755)
        for rel in ("tmp", "var/tmp"):
            (lay.upper / rel).mkdir(parents=True, exist_ok=True)
            (lay.upper / rel).chmod(0o1777)
        for rel in ("etc/condor/passwords.d", "etc/condor/tokens.d"):
            (lay.upper / rel).mkdir(parents=True, exist_ok=True)
            (lay.upper / rel).chmod(0o700)
        (lay.upper / "etc/hostname").write_text(f"{NODE_HOSTNAME}\n")
        (lay.upper / "etc/hosts").write_text(f"127.0.0.1\t{NODE_HOSTNAME} localhost\n::1\tlocalhost ip6-localhost\n")
        config = lay.upper / "etc/condor/config.d/99-splitpilot-minicondor.config"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(daemon_config(self.settings, port, self.config_lines(), self.spool_in_node()))

    def spool_in_node(self) -> str:
        return "/var/lib/condor/spool"

    def config_lines(self) -> list[str]:
        return [
            "# The folders prepared (owned by condor) in the pool's own layer.",
            "LOG = /var/log/condor",
            f"SPOOL = {self.spool_in_node()}",
            "EXECUTE = /var/lib/condor/execute",
            "RUN = /run/condor",
            "LOCK = /run/lock/condor",
        ]

    def enter_argv(self) -> list[str]:
        lay = self.layout
        return [*self._unshare(), "--root", str(self.root.path), str(lay.upper), str(lay.work), str(lay.merged),
                *self._binds_and_env(), "--"]

    def nsenter_argv(self, init_pid: int) -> list[str]:
        # --root/--wd: the node's "/" (after its pivot_root), not the host's.
        return ["nsenter", f"--target={init_pid}", "--mount", "--pid", "--uts", "--root", "--wd", "--"]

    def passwd(self, user: str) -> tuple[int, int, str]:
        for line in (self.root.path / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3]), fields[5]
        raise UsageError(f"user {user!r} does not exist in the node root {self.root.path}; "
                         f"fix: use {self.settings.job_user!r} or root")

    def key_file(self) -> Path:
        return self.layout.upper / NODE_KEY_PATH.lstrip("/")

    def key_path_in_node(self) -> str:
        return NODE_KEY_PATH

    def log_dir(self) -> Path:
        return self.layout.upper / "var/log/condor"

    def master(self) -> str:
        return "/usr/sbin/condor_master"


class HostDaemons(Daemons):
    """Daemons of the host's own HTCondor installation, with a configuration of our own."""

    source = DaemonSource.HOST

    def prepare(self, port: int) -> None:
        host = self.layout.host_dir
        try:
            condor = pwd.getpwnam("condor")
        except KeyError:
            raise DaemonSetupError("the host's HTCondor has no 'condor' user to run its daemons as; fix: "
                                   "reinstall the htcondor package, or use --daemons node-root") from None
        for name in ("log", "spool", "execute", "run", "lock"):
            (host / name).mkdir(parents=True, exist_ok=True)
            os.chown(host / name, condor.pw_uid, condor.pw_gid)
        for name in ("passwords.d", "tokens.d"):
            (host / name).mkdir(parents=True, exist_ok=True)
            (host / name).chmod(0o700)
        self.layout.host_config.write_text(daemon_config(self.settings, port, self.config_lines(),
                                                         self.spool_in_node()))

    def spool_in_node(self) -> str:
        return str(self.layout.host_dir / "spool")

    def config_lines(self) -> list[str]:
        host = self.layout.host_dir
        return [
            "# The host's installation paths (RELEASE_DIR, LIBEXEC, ...), but none of its local",
            "# configuration: this pool is not the host's pool.",
            "include ifexist : /etc/condor/condor_config",
            "LOCAL_CONFIG_FILE =",
            "LOCAL_CONFIG_DIR =",
            "REQUIRE_LOCAL_CONFIG_FILE = False",
            f"LOCAL_DIR = {host}",
            f"LOG = {host}/log",
            f"SPOOL = {self.spool_in_node()}",
            f"EXECUTE = {host}/execute",
            f"RUN = {host}/run",
            f"LOCK = {host}/lock",
            f"SEC_PASSWORD_DIRECTORY = {host}/passwords.d",
            f"SEC_TOKEN_POOL_SIGNING_KEY_FILE = {host}/passwords.d/POOL",
            f"SEC_TOKEN_SYSTEM_DIRECTORY = {host}/tokens.d",
        ]

    def enter_argv(self) -> list[str]:
        return [*self._unshare(), *self._binds_and_env(), "--"]

    def nsenter_argv(self, init_pid: int) -> list[str]:
        return ["nsenter", f"--target={init_pid}", "--mount", "--pid", "--uts", "--"]

    def node_env(self) -> dict[str, str]:
        return {"CONDOR_CONFIG": str(self.layout.host_config)}

    def passwd(self, user: str) -> tuple[int, int, str]:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"user {user!r} does not exist on this host, and host daemons run jobs as "
                             f"host users; fix: useradd --create-home {user}") from None
        return entry.pw_uid, entry.pw_gid, entry.pw_dir

    def key_file(self) -> Path:
        return self.layout.host_dir / "passwords.d/POOL"

    def key_path_in_node(self) -> str:
        return str(self.key_file())

    def log_dir(self) -> Path:
        return self.layout.host_dir / "log"

    def master(self) -> str:
        return shutil.which("condor_master") or "condor_master"


def daemon_config(settings: MiniCondorSettings, port: int, extra: Sequence[str], spool: str) -> str:
    """The daemons' configuration: a personal pool on 127.0.0.1, IDTOKENS, quick cycles, SPOOL hidden from jobs."""
    lines = [
        "# Written by splitpilot's mini-condor at every start: edit condor_plugin/testing/minicondor.py instead.",
        *extra,
        "use ROLE : Personal",
        "use FEATURE : PartitionableSlot",
        "use SECURITY : recommended_v9_0",
        "CONDOR_HOST = 127.0.0.1",
        f"COLLECTOR_HOST = 127.0.0.1:{port}",
        "COLLECTOR_NAME = splitpilot mini-condor",
        "# Loopback only, IPv4 only: the pool is for this machine.",
        "NETWORK_INTERFACE = 127.0.0.1",
        "BIND_ALL_INTERFACES = False",
        "ENABLE_IPV6 = False",
        "USE_SHARED_PORT = False",
        "# A token for USER@minicondor makes the schedd accept, and the starter run, jobs as USER.",
        "# One file system domain for host and node (the shared folders): jobs that do not",
        "# transfer files match only slots of the same FileSystemDomain.",
        f"UID_DOMAIN = {POOL_DOMAIN}",
        f"FILESYSTEM_DOMAIN = {POOL_DOMAIN}",
        f"TRUST_DOMAIN = {POOL_DOMAIN}",
        "TRUST_UID_DOMAIN = True",
        "# FS: daemons and tools inside the node; IDTOKENS: clients on the host (never CLAIMTOBE).",
        "SEC_DEFAULT_AUTHENTICATION_METHODS = FS, IDTOKENS",
        "# Submit side and execute side share this one node, where on a grid they are different",
        "# hosts: the schedd's SPOOL holds every spooled glidein's inputs, the agent token among",
        "# them, in folders owned by the job user (as the shadow reads them). Each job gets an",
        "# empty private SPOOL in its scratch directory instead (a mount in its own mount",
        "# namespace, made by the starter), so a payload cannot read a token from there.",
        f"MOUNT_UNDER_SCRATCH = {spool}",
        "# No PID namespaces: the node is a namespace of its own already (verified configuration).",
        "USE_PID_NAMESPACES = False",
        f"NUM_CPUS = {settings.cpus}",
        f"MEMORY = {settings.memory_mb}",
        "# Quick cycles: tests wait for matches, not for production-sized intervals.",
        "NEGOTIATOR_INTERVAL = 2",
        "NEGOTIATOR_MIN_INTERVAL = 1",
        "# The default 20 s between cycles would be most of a test job's time.",
        "NEGOTIATOR_CYCLE_DELAY = 1",
        "UPDATE_INTERVAL = 5",
        "SCHEDD_INTERVAL = 5",
        "STARTER_UPDATE_INTERVAL = 5",
        "# periodic_hold/periodic_remove are evaluated this often (60 s by default): the glideins'",
        "# idle and lifetime bounds take effect within seconds here.",
        "PERIODIC_EXPR_INTERVAL = 5",
    ]
    if settings.extra_config:
        lines += ["# Given by the caller (MiniCondorSettings.extra_config, minicondor start --config):",
                  *settings.extra_config]
    return "\n".join(lines) + "\n"


def client_config(port: int, tokens_dir: Path) -> str:
    """The host-side client configuration: where the collector is and which token to use."""
    return "\n".join([
        "# Written by splitpilot's mini-condor: a client of the pool on this machine.",
        "CONDOR_HOST = 127.0.0.1",
        f"COLLECTOR_HOST = 127.0.0.1:{port}",
        "# The node's host name, so that htcondor2.Schedd() and condor_q find \"the local",
        "# schedd\" (they look it up by this machine's name) without being given a name.",
        f"NETWORK_HOSTNAME = {NODE_HOSTNAME}",
        "ENABLE_IPV6 = False",
        f"UID_DOMAIN = {POOL_DOMAIN}",
        "# Jobs submitted from here see the shared folders at the same paths as the node does.",
        f"FILESYSTEM_DOMAIN = {POOL_DOMAIN}",
        "SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS",
        f"SEC_TOKEN_DIRECTORY = {tokens_dir}",
    ]) + "\n"


def mirror_mode(source: Path, target: Path, default: int) -> None:
    """Give TARGET the permission bits SOURCE has in the node root (DEFAULT if SOURCE is missing)."""
    try:
        mode = source.stat().st_mode & 0o7777
    except OSError:
        mode = default
    if target.exists():
        target.chmod(mode)
