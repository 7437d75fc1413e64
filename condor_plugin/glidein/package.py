"""Glidein packaging: the pilot's code and runtime, a startup script, and the agent token.

    package = PackageBuilder().ensure()                       # cached by a hash of setup.cfg + code
    batch = prepare_batch(package, batch_dir, token_pem=..., settings=GlideinSettings(broker="host:7443"))
    # batch.script, batch.package, batch.token: the glidein's executable and transfer inputs

The package is a tarball with a wheelhouse for the node's Python (3.13 by
default, the mini-condor node's): protobuf, grpcio, cryptography and their
dependencies downloaded as binary wheels for that Python and platform, plus
splitpilot's own node wheel: pilot/ and splitpilot/ only, with the metadata of
condor_plugin.glidein.nodewheel (built from a copy of the sources, so the
repository gets no build/ folder). Its sha256 is written into the startup script, which
checks it before unpacking. Built once per key (the sources, setup.cfg, the
target Python and the pinned versions) into CACHE/KEY/; a second build with
the same key is a lookup.

The startup script (condor_plugin/glidein/glidein_startup.sh, filled in here) makes a
venv in the glidein's scratch directory, installs the wheelhouse offline,
and runs `python -m pilot agent --token FILE ...`; the agent builds the software
area for its wrappers from that venv, reads the token file and removes it.

The token: minted per batch by the caller (short-lived, site-scoped), written
here 0600 in a 0700 folder of the factory's own, as a transfer input file of
the batch. The factory spools the batch's inputs into the schedd at submit and
removes its copy at once: from then on only the schedd's SPOOL holds it (until
the glideins leave the queue), which is what a glidein that is evicted and
starts again is served from. Never in the script, the submit description, an
argument or the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from condor_plugin.glidein.nodewheel import NODE_PACKAGES, write_node_sources
from pilot.errors import SplitpilotError, UsageError
from pilot.launch.errors import LaunchConfigError
from pilot.launch.mounts import parse_bind
from pilot.logconfig import progress_logger

#: The cache of built packages (one folder per key).
DEFAULT_CACHE_DIR = Path("/var/cache/splitpilot/glidein")
TEMPLATE = Path(__file__).with_name("glidein_startup.sh")
#: The repository (or installed tree) the package is built from.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
#: What goes into splitpilot's own wheel: the node side only, and its metadata files.
SOURCE_PACKAGES: tuple[str, ...] = NODE_PACKAGES
SOURCE_FILES: tuple[str, ...] = ("setup.cfg", "pyproject.toml", "README.md")
#: What the agent and wrapper import at run time (setup.cfg's other requirements, htcondor and
#: psycopg, serve the factory and the broker: a glidein does not need them).
RUNTIME_REQUIREMENTS: tuple[str, ...] = ("protobuf", "grpcio", "cryptography")
#: The mini-condor node's Python (Debian 13).
DEFAULT_PYTHON_VERSION = "3.13"
DEFAULT_PLATFORMS: tuple[str, ...] = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
PACKAGE_NAME = "splitpilot-glidein.tar.gz"
TOKEN_NAME = "agent-token.pem"
SCRIPT_NAME = "glidein_startup.sh"

Progress = Callable[[str], None]


#: The builder's lines (`glidein: ...`) in the log of the process that builds (the factory's).
_log_line = progress_logger("splitpilot.glidein")


class GlideinError(SplitpilotError):
    """Building the glidein package or a batch failed."""


class PackageBuildError(GlideinError):
    """A step of the package build (pip download, pip wheel) failed; `step` and `output` say which and why."""

    def __init__(self, step: str, output: str) -> None:
        super().__init__(f"building the glidein package failed at {step}:\n{output.strip()[-3000:]}\n"
                         "fix: check that PyPI (or the configured index) is reachable and has wheels for "
                         "the target Python and platform")
        self.step = step
        self.output = output


# ---------------------------------------------------------------------------
# The package

@dataclass(frozen=True)
class GlideinPackage:
    """A built package: the tarball, its sha256, what it was built for."""

    tarball: Path
    sha256: str
    key: str
    python_version: str
    wheels: tuple[str, ...]
    built_seconds: float        # how long the build took (0 for a cache hit)
    cached: bool                # found in the cache, not built now


@dataclass(frozen=True)
class PackageBuilder:
    """Builds (or finds) the glidein package for one target Python."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    source_root: Path = SOURCE_ROOT
    python_version: str = DEFAULT_PYTHON_VERSION
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    #: None: pin each requirement to the version installed here (the tested set).
    pins: tuple[str, ...] | None = None
    progress: Progress = _log_line

    def requirements(self) -> tuple[str, ...]:
        if self.pins is not None:
            return self.pins
        return tuple(f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_REQUIREMENTS)

    def source_files(self) -> list[Path]:
        """The files of splitpilot's own wheel, relative to source_root, sorted."""
        root = self.source_root
        files = [Path(name) for name in SOURCE_FILES if (root / name).is_file()]
        for package in SOURCE_PACKAGES:
            for path in sorted((root / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                    files.append(path.relative_to(root))
        return sorted(files)

    def key(self) -> str:
        """A hash of everything the package is made of: sources, setup.cfg, target, pins."""
        digest = hashlib.sha256()
        header = {"python": self.python_version, "platforms": list(self.platforms),
                  "requirements": list(self.requirements()), "format": 1}
        digest.update(json.dumps(header, sort_keys=True).encode())
        for relative in self.source_files():
            digest.update(str(relative).encode() + b"\0")
            digest.update(hashlib.sha256((self.source_root / relative).read_bytes()).digest())
        return digest.hexdigest()[:32]

    def lookup(self, key: str | None = None) -> GlideinPackage | None:
        """The cached package for KEY (default: the current sources), or None."""
        folder = self.cache_dir / (key or self.key())
        try:
            record = json.loads((folder / "package.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        tarball = folder / PACKAGE_NAME
        if not tarball.is_file():
            return None
        return GlideinPackage(tarball=tarball, sha256=record["sha256"], key=record["key"],
                              python_version=record["python_version"], wheels=tuple(record["wheels"]),
                              built_seconds=0.0, cached=True)

    def ensure(self) -> GlideinPackage:
        """The package for the current sources: from the cache, or built now (then cached)."""
        key = self.key()
        found = self.lookup(key)
        if found is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with open(self.cache_dir / ".lock", "a") as lock:   # one build at a time; others then find it
                fcntl.flock(lock, fcntl.LOCK_EX)
                found = self.lookup(key)
                if found is None:
                    built = self._build(key)
                    self.prune(keep={key})
                    return built
        self.progress(f"package {key} from the cache ({found.tarball})")
        with contextlib.suppress(OSError):   # in use: a recent mtime keeps it from other builders' prune
            os.utime(self.cache_dir / key / "package.json")
        return found

    def prune(self, keep: AbstractSet[str] = frozenset(), newest: int = 3, *, min_age_s: float = 3600,
              now: float | None = None) -> list[str]:
        """Remove cached packages but the NEWEST most recently built or used (and KEEP, and any used within
        MIN_AGE_S); return the keys removed.

        Every change of the sources makes a new key: without this the cache grows
        by one package (~15 MB) per change. Unfinished builds (.build-*) are left to
        the build that owns them. The cache is shared by every factory of the host
        (other sources, other versions): a package one of them built or used in the
        last hour may be about to be spooled, so it stays (found when a second
        checkout's builds removed a running factory's package between its build and
        its submit)."""
        horizon = (time.time() if now is None else now) - min_age_s
        entries = []
        for folder in self.cache_dir.iterdir() if self.cache_dir.is_dir() else ():
            record = folder / "package.json"
            if folder.is_dir() and not folder.name.startswith(".") and record.is_file():
                entries.append((record.stat().st_mtime, folder))
        entries.sort(reverse=True)
        removed = []
        for mtime, folder in entries[newest:]:
            if folder.name not in keep and mtime < horizon:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def _build(self, key: str) -> GlideinPackage:
        started = time.monotonic()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.cache_dir))
        try:
            wheelhouse = staging / "wheelhouse"
            wheelhouse.mkdir()
            requirements = self.requirements()
            self.progress(f"downloading wheels for Python {self.python_version}: {' '.join(requirements)}")
            platform_args = [arg for platform in self.platforms for arg in ("--platform", platform)]
            self._pip("pip download", ["download", "--only-binary=:all:", "--python-version", self.python_version,
                                       *platform_args, "--dest", str(wheelhouse), *requirements])
            # pip itself: the node's venv is made --without-pip (no ensurepip needed) and pip runs from its wheel.
            self._pip("pip download (pip)", ["download", "--only-binary=:all:", "--no-deps", "--dest",
                                             str(wheelhouse), f"pip=={importlib.metadata.version('pip')}"])
            self.progress("building splitpilot's own wheel (from a copy of the sources)")
            sources = staging / "sources"
            for relative in self.source_files():
                (sources / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.source_root / relative, sources / relative)
            for missing in _missing_init_files(sources):
                # setup.cfg's `packages = find:` skips a folder without __init__.py (pilot/agent today):
                # the wheel would lack it. Until the sources have one, the staged copy gets an empty one.
                self.progress(f"warning: {missing.parent.relative_to(sources)} has no __init__.py; "
                              "adding an empty one to the wheel's sources")
                missing.write_text("")
            write_node_sources(sources, self.source_root / "setup.cfg")
            self._pip("pip wheel", ["wheel", "--no-deps", "--wheel-dir", str(wheelhouse), str(sources)])
            wheels = tuple(sorted(p.name for p in wheelhouse.glob("*.whl")))
            tarball = staging / PACKAGE_NAME
            _write_tarball(tarball, wheelhouse, wheels)
            sha256 = _sha256(tarball)
            record = {"key": key, "sha256": sha256, "python_version": self.python_version, "wheels": list(wheels),
                      "requirements": list(requirements), "built": time.time()}
            (staging / "package.json").write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(sources)
            shutil.rmtree(wheelhouse)
            final = self.cache_dir / key
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(final)  # an incomplete earlier build (no package.json)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        self.progress(f"package {key} built in {seconds:.1f} s: {len(wheels)} wheels, "
                      f"{(final / PACKAGE_NAME).stat().st_size / 1e6:.1f} MB")
        return GlideinPackage(tarball=final / PACKAGE_NAME, sha256=sha256, key=key,
                              python_version=self.python_version, wheels=wheels, built_seconds=seconds,
                              cached=False)

    def _pip(self, step: str, args: Sequence[str]) -> None:
        argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise PackageBuildError(step, result.stdout + result.stderr)


def _missing_init_files(sources: Path) -> list[Path]:
    """__init__.py files missing from package folders (folders holding .py files) under SOURCES."""
    missing = []
    for package in SOURCE_PACKAGES:
        for folder in [sources / package, *(p for p in (sources / package).rglob("*") if p.is_dir())]:
            if any(folder.glob("*.py")) and not (folder / "__init__.py").exists():
                missing.append(folder / "__init__.py")
    return sorted(missing)


def _write_tarball(path: Path, wheelhouse: Path, wheels: Iterable[str]) -> None:
    """A reproducible tarball: fixed order, owner, times and modes."""
    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        tar.add(wheelhouse, arcname="wheelhouse", recursive=False, filter=normalise)
        for name in wheels:
            tar.add(wheelhouse / name, arcname=f"wheelhouse/{name}", filter=normalise)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------------------
# A batch: the script, the package and the token, ready to be submitted

@dataclass(frozen=True)
class GlideinSettings:
    """What the agent of every glidein of a batch is started with."""

    broker: str                                   # HOST:PORT, as the node reaches it
    container_policy: str = "prefer"
    runtimes: str = "apptainer"
    image: str = ""                               # container image; '' lets the agent decide
    idle_timeout: str = "2m"
    #: Used when the job ad has no SplitpilotLifetime (the submit description sets it).
    lifetime: str = "24h"
    #: Site binds for the agent's jobs (`--bind SRC[:DST]`, read-only); paths on the worker node.
    binds: tuple[str, ...] = ()
    #: The site's read-only software area on the node (e.g. under /cvmfs); '' lets the agent build its own.
    software_dir: str = ""
    #: Platform tags the agent offers (`--platform`, repeatable).
    platforms: tuple[str, ...] = ()
    #: Consecutive failures after which the agent takes no more work (None: the agent's default).
    black_hole: int | None = None
    #: Stop deadline, seconds, given to jobs at slot end or SIGTERM (None: the agent's default).
    stop_deadline: int | None = None

    def agent_args(self) -> str:
        """The agent options beyond the fixed ones, as single-quoted shell words (checked in __post_init__)."""
        words = [f" --bind '{bind}'" for bind in self.binds]
        if self.software_dir:
            words.append(f" --software-dir '{self.software_dir}'")
        words += [f" --platform '{tag}'" for tag in self.platforms]
        if self.black_hole is not None:
            words.append(f" --black-hole '{self.black_hole}'")
        if self.stop_deadline is not None:
            words.append(f" --stop-deadline '{self.stop_deadline}'")
        return "".join(words)

    def __post_init__(self) -> None:
        if self.container_policy not in ("require", "prefer", "off"):
            raise UsageError(f"container policy {self.container_policy!r}: give require, prefer or off")
        for name in ("broker", "runtimes", "image", "idle_timeout", "lifetime"):
            value = getattr(self, name)
            if "'" in value or "\n" in value or "\\" in value:
                raise UsageError(f"glidein setting {name} {value!r} contains a quote, a backslash or a newline")
        if ":" not in self.broker:
            raise UsageError(f"broker {self.broker!r} is not HOST:PORT")
        object.__setattr__(self, "binds", tuple(self.binds))
        object.__setattr__(self, "platforms", tuple(self.platforms))
        for name, words in (("software dir", (self.software_dir,) if self.software_dir else ()),
                            ("platform", self.platforms)):
            for word in words:
                if not word or any(c.isspace() or c in "'\\\"$`" for c in word):
                    raise UsageError(f"glidein {name} {word!r} is empty or contains whitespace, a quote, a "
                                     "backslash, '$' or '`'; fix: give one without them")
        if self.software_dir and not self.software_dir.startswith("/"):
            raise UsageError(f"glidein software dir {self.software_dir!r} is not an absolute path on the node; "
                             "fix: e.g. /cvmfs/sw.example.org/splitpilot")
        for name, number in (("black-hole count", self.black_hole), ("stop deadline", self.stop_deadline)):
            if number is not None and number < (1 if name == "black-hole count" else 0):
                raise UsageError(f"glidein {name} {number} is out of range; fix: a whole number of at least "
                                 f"{1 if name == 'black-hole count' else 0}")
        for bind in self.binds:
            # The agent checks the rest on the node (the source exists, it is not its work dir).
            if any(c.isspace() or c in "'\\\"$`" for c in bind):
                raise UsageError(f"glidein bind {bind!r} contains whitespace, a quote, a backslash, '$' or '`'; "
                                 "fix: bind a path without them")
            try:
                parse_bind(bind)
            except LaunchConfigError as exc:
                raise UsageError(f"glidein bind: {exc}") from None


@dataclass(frozen=True)
class GlideinBatch:
    """The files of one batch: the executable and the transfer inputs (absolute paths).

    `package` is the cached package itself (PackageBuilder's cache): the
    submit spools it to the schedd, so the batch needs no copy of its own.
    """

    directory: Path
    script: Path
    package: Path
    token: Path
    log_dir: Path

    @property
    def transfer_input_files(self) -> tuple[str, ...]:
        return (str(self.package), str(self.token))


def render_script(package: GlideinPackage, settings: GlideinSettings, template: Path = TEMPLATE) -> str:
    """The startup script for PACKAGE and SETTINGS (it holds no credential)."""
    values = {
        "PACKAGE_NAME": PACKAGE_NAME, "PACKAGE_SHA256": package.sha256, "PYTHON_VERSION": package.python_version,
        "TOKEN_NAME": TOKEN_NAME, "BROKER": settings.broker, "CONTAINER_POLICY": settings.container_policy,
        "RUNTIMES": settings.runtimes, "IMAGE": settings.image, "IDLE_TIMEOUT": settings.idle_timeout,
        "LIFETIME": settings.lifetime,
        # Single-quoted words on the agent's command line: GlideinSettings refused quotes and whitespace
        # (binds, then the software area, platforms, black-hole count and stop deadline).
        "BIND_ARGS": settings.agent_args(),
    }
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def prepare_batch(package: GlideinPackage, directory: Path, *, token_pem: bytes,
                  settings: GlideinSettings) -> GlideinBatch:
    """Write one batch's files into DIRECTORY (created 0700): script, token (0600), log folder.

    Everything here is read by this process only: the factory submits with
    spooling (condor_plugin.factory.factory), so the schedd gets the inputs from us
    and no shadow or job ever reads this folder. The caller removes the token
    as soon as the schedd holds it; the log folder receives the glideins'
    output, error and event log when the factory retrieves them.
    """
    if b"PRIVATE KEY" not in token_pem or b"CERTIFICATE" not in token_pem:
        raise UsageError("the agent token holds no certificate and key")
    directory = Path(directory).absolute()
    directory.mkdir(mode=0o700, parents=True)
    directory.chmod(0o700)   # whatever the umask: the token is written here next
    log_dir = directory / "log"
    log_dir.mkdir(mode=0o700)
    script = directory / SCRIPT_NAME
    script.write_text(render_script(package, settings))
    script.chmod(0o700)
    token = directory / TOKEN_NAME
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(token_pem)
    return GlideinBatch(directory=directory, script=script, package=package.tarball, token=token, log_dir=log_dir)


def remove_batch(batch_dir: Path) -> None:
    """Remove a batch's files (the token first, so it is gone even if the rest fails)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(batch_dir) / TOKEN_NAME).unlink()
    shutil.rmtree(batch_dir, ignore_errors=True)


__all__ = [
    "DEFAULT_CACHE_DIR", "GlideinBatch", "GlideinError", "GlideinPackage", "GlideinSettings", "PackageBuildError",
    "PackageBuilder", "prepare_batch", "remove_batch", "render_script",
]
