"""The mini-condor's node root: a cached Debian 13 tree holding HTCondor and Apptainer.

Debian 12 has no HTCondor package and installing Debian 13's onto it drags a
new libc in, so the daemons run from a separate root instead: `debootstrap
--variant=minbase trixie`, then HTCondor from trixie and Apptainer from sid
(pinned low, so nothing else comes from sid), and a small Apptainer sandbox
image inside it. Building takes a minute or so; it happens once per recipe.

The cache lives outside the repository (default /var/cache/splitpilot/minicondor)
so a fresh clone reuses it:

    <cache>/<recipe-hash>/root          the tree (the overlay's lower layer; never written once built)
    <cache>/<recipe-hash>/recipe.json   what was built, and from which mirror
    <cache>/<recipe-hash>/build.log     the build's output
    <cache>/<recipe-hash>.lock          flock: one builder per recipe at a time
    <cache>/.build-<recipe-hash>-*      a build in progress; renamed into place when complete

A build happens in a temporary folder renamed into place only when every step
succeeded, so a half-built root is never used. Every build step runs in its own
private mount and PID namespace: mounts debootstrap makes inside the target, or
processes a package script leaves behind, vanish with the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from condor_plugin.testing.nodeproc import mounts_under
from pilot.errors import SplitpilotError, UsageError

#: Bump when the build steps change in a way the recipe fields do not show:
#: it changes the recipe hash, so old caches are left alone and a new one is built.
BUILD_STEPS_VERSION = 1

DEFAULT_CACHE_DIR = Path("/var/cache/splitpilot/minicondor")

#: Where the Apptainer sandbox image sits inside the node root.
SANDBOX_IMAGE_PATH = "/var/lib/splitpilot/images/debian13"

#: The apt sources files of the host, in the order apt reads them.
HOST_APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    """The default progress sink: one line on stderr, flushed."""
    print(f"minicondor: {line}", file=sys.stderr, flush=True)


class NodeRootError(SplitpilotError):
    """The node root cannot be built or used."""


class NeedsRootError(NodeRootError):
    """An operation needs root (namespaces, mounts, debootstrap) and this process is not root."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs root (the mini-condor makes mount and PID namespaces, mounts an overlay and "
            "builds its Debian root with debootstrap); fix: run the command as root, e.g. with sudo")
        self.what = what


class MirrorNotFoundError(NodeRootError, UsageError):
    """No Debian mirror could be read from the host's apt sources."""

    def __init__(self, searched: Sequence[Path]) -> None:
        where = ", ".join(str(p) for p in searched)
        super().__init__(
            f"no Debian mirror found in the host's apt sources ({where}); "
            "fix: pass --mirror URL (e.g. the URL of your site's Debian mirror) or add a Debian "
            "'deb' source to /etc/apt/sources.list.d/")
        self.searched = tuple(searched)


class MissingToolError(NodeRootError):
    """A host program the build needs is not installed."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"{program} is not installed on this host; fix: apt-get install {package} "
                         "(or run scripts/install-system-deps.sh)")
        self.program = program
        self.package = package


class BuildStepError(NodeRootError):
    """One step of the node root build failed; its output is in `log_path`."""

    def __init__(self, step: str, returncode: int, log_path: Path, tail: str) -> None:
        super().__init__(
            f"building the node root failed at step '{step}' (exit code {returncode}); "
            f"the last lines of {log_path}:\n{tail}\n"
            "fix: read the log above; a network or mirror problem goes away on retry "
            "('splitpilot minicondor build'); a signature error needs a newer debian-archive-keyring")
        self.step = step
        self.returncode = returncode
        self.log_path = log_path


@dataclass(frozen=True)
class NodeRootRecipe:
    """What goes into the node root. Every field is part of the cache key."""

    suite: str = "trixie"
    #: From `suite`. htcondor's recommends are not needed by a local pool.
    packages: tuple[str, ...] = ("htcondor", "python3", "procps")
    #: From sid, pinned low: only these packages (and what they need) come from sid.
    sid_packages: tuple[str, ...] = ("apptainer",)
    #: The unprivileged user jobs run as (HTCondor refuses root-owned jobs).
    job_user: str = "glidein"
    #: A fixed id, so files in the shared folder have the same owner on every machine;
    #: chosen away from the 1000+ range that ordinary host accounts take.
    job_uid: int = 59000

    def key(self) -> str:
        """The cache key: a short hash of the recipe and of the build steps' version."""
        fields = dataclasses.asdict(self) | {"build_steps_version": BUILD_STEPS_VERSION}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.suite}-{digest[:16]}"


# ---------------------------------------------------------------------------
# The Debian mirror, from the host's apt sources

@dataclass(frozen=True)
class AptSource:
    """One 'deb' source: a URI with its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


#: Suites that are Debian releases proper (not security, updates or backports).
_RELEASE_SUITE = re.compile(
    r"^(stable|testing|unstable|oldstable|oldoldstable|sid|experimental|"
    r"buster|bullseye|bookworm|trixie|forky|duke)$")


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse the one-line format: `deb [opt=val ...] URI SUITE COMPONENT...`."""
    sources = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options are irrelevant to the mirror's address
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        sources.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return sources


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse the deb822 format (`.sources` files): paragraphs of Types/URIs/Suites/Components."""
    sources = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in paragraph.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key is not None:  # a continuation line
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri, suites, components))
    return sources


def host_apt_sources(paths: Sequence[Path] = HOST_APT_SOURCES) -> list[AptSource]:
    """Every 'deb' source the host's apt reads, in apt's order (both file formats)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources"))
        elif path.is_file():
            files.append(path)
    sources = []
    for file in files:
        text = file.read_text(errors="replace")
        sources += parse_deb822_sources(text) if file.suffix == ".sources" else parse_one_line_sources(text)
    return sources


def host_debian_mirror(paths: Sequence[Path] = HOST_APT_SOURCES) -> str:
    """The URI of the host's Debian archive: the first source of a Debian release suite with 'main'.

    Security, updates and backports suites live on other archives
    (debian-security) or lack a full release, so they are skipped.
    """
    for source in host_apt_sources(paths):
        if "main" in source.components and any(_RELEASE_SUITE.match(s) for s in source.suites):
            if source.uri.startswith(("http://", "https://", "file:/")):
                return source.uri.rstrip("/")
    raise MirrorNotFoundError(paths)


# ---------------------------------------------------------------------------
# The cache

@dataclass(frozen=True)
class NodeRoot:
    """A complete, cached node root."""

    path: Path          # the tree itself
    recipe: NodeRootRecipe
    info: dict[str, object]   # recipe.json: mirror, build time, versions

    def user_ids(self, name: str) -> tuple[int, int]:
        """(uid, gid) of a user in the root's /etc/passwd."""
        for line in (self.path / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
        raise NodeRootError(f"user {name!r} is missing from {self.path}/etc/passwd; "
                            "fix: remove the cached root and build it again ('splitpilot minicondor build')")


class NodeRootCache:
    """Cached node roots under one folder, keyed by recipe; builds them when missing."""

    def __init__(self, cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = stderr_progress) -> None:
        self.cache_dir = Path(cache_dir)
        self.progress = progress

    def entry_dir(self, recipe: NodeRootRecipe) -> Path:
        return self.cache_dir / recipe.key()

    def lookup(self, recipe: NodeRootRecipe) -> NodeRoot | None:
        """The cached root for RECIPE, or None. Only a completed build has recipe.json."""
        entry = self.entry_dir(recipe)
        info_file = entry / "recipe.json"
        if not info_file.is_file():
            return None
        return NodeRoot(entry / "root", recipe, json.loads(info_file.read_text()))

    def ensure(self, recipe: NodeRootRecipe, mirror: str | None = None) -> NodeRoot:
        """The cached root for RECIPE, built first if missing (about a minute, progress on stderr)."""
        found = self.lookup(recipe)
        if found is not None:
            return found
        require_root("building the node root")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(recipe):
            # Another builder may have finished while we waited for the lock.
            found = self.lookup(recipe)
            if found is not None:
                return found
            self._remove_stale_builds(recipe)
            return self._build(recipe, mirror or host_debian_mirror())

    @contextlib.contextmanager
    def _lock(self, recipe: NodeRootRecipe) -> Iterator[None]:
        lock_path = self.cache_dir / f"{recipe.key()}.lock"
        with open(lock_path, "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress(f"another process is building the node root {recipe.key()}; waiting for it")
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _remove_stale_builds(self, recipe: NodeRootRecipe) -> None:
        """Remove leftovers of builds of RECIPE that died; safe because we hold its lock."""
        for stale in self.cache_dir.glob(f".build-{recipe.key()}-*"):
            self.progress(f"removing an unfinished earlier build: {stale}")
            remove_tree(stale)

    def _build(self, recipe: NodeRootRecipe, mirror: str) -> NodeRoot:
        for program, package in (("debootstrap", "debootstrap"), ("unshare", "util-linux")):
            if shutil.which(program) is None:
                raise MissingToolError(program, package)
        started = time.monotonic()
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{recipe.key()}-", dir=self.cache_dir))
        build_dir.chmod(0o755)
        try:
            builder = _Builder(recipe, mirror, build_dir, self.progress)
            builder.run()
            info = {
                "recipe": dataclasses.asdict(recipe),
                "build_steps_version": BUILD_STEPS_VERSION,
                "mirror": mirror,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 1),
                "sandbox_image": SANDBOX_IMAGE_PATH,
            }
            # recipe.json is written last: its presence marks the entry complete.
            _write_durably(build_dir / "recipe.json", json.dumps(info, indent=2) + "\n")
            entry = self.entry_dir(recipe)
            os.rename(build_dir, entry)  # atomic: readers see nothing or the complete root
        except BaseException:
            remove_tree(build_dir)
            raise
        self.progress(f"node root ready in {time.monotonic() - started:.0f} s: {entry / 'root'}")
        return NodeRoot(entry / "root", recipe, info)


class _Builder:
    """The build steps of one node root, run in order into BUILD_DIR/root."""

    def __init__(self, recipe: NodeRootRecipe, mirror: str, build_dir: Path, progress: Progress) -> None:
        self.recipe = recipe
        self.mirror = mirror
        self.root = build_dir / "root"
        self.log_path = build_dir / "build.log"
        self.progress = progress

    def run(self) -> None:
        r = self.recipe
        self.progress(f"building the node root {r.key()} (Debian {r.suite} from {self.mirror}; "
                      "about 1-2 minutes, once: it is cached afterwards)")
        self.step("debootstrap", ["debootstrap", "--variant=minbase", "--components=main",
                                  r.suite, str(self.root), self.mirror])
        self.prepare_apt()
        self.step("apt-get update", self.chroot("apt-get", "update"))
        wanted = [*r.packages, *(f"{p}/sid" for p in r.sid_packages)]
        self.step("apt-get install", self.chroot("apt-get", "install", "-y", "--no-install-recommends", *wanted))
        self.configure_apptainer()
        self.step("add the job user", self.chroot(
            "useradd", "--uid", str(r.job_uid), "--user-group", "--create-home", "--shell", "/bin/bash", r.job_user))
        self.make_sandbox_image()
        self.step("apt-get clean", self.chroot("apt-get", "clean"))
        shutil.rmtree(self.root / "var/lib/apt/lists", ignore_errors=True)
        (self.root / "var/lib/apt/lists/partial").mkdir(parents=True)

    def step(self, name: str, argv: list[str]) -> None:
        """Run one build step in a private mount and PID namespace; output to the build log."""
        started = time.monotonic()
        self.progress(f"build: {name} ...")
        last_report = started
        with open(self.log_path, "ab") as log:
            log.write(f"\n==> {name}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(isolated(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                now = time.monotonic()
                if now - last_report >= 10:  # a sign of life, not a flood: debootstrap prints hundreds
                    last_report = now
                    text = line.decode(errors="replace").strip()[:100]
                    self.progress(f"build: {name}: {now - started:.0f} s: {text}")
            returncode = process.wait()
        if returncode != 0:
            raise BuildStepError(name, returncode, self.log_path, _tail(self.log_path, 15))
        self.progress(f"build: {name} done ({time.monotonic() - started:.0f} s)")

    def chroot(self, *argv: str) -> list[str]:
        """ARGV run inside the root being built (chroot is enough for apt: no daemon runs here)."""
        return ["chroot", str(self.root), "/usr/bin/env", "-i", f"PATH={NODE_PATH}", "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive", *argv]

    def prepare_apt(self) -> None:
        root = self.root
        # No service may start inside the build: package scripts ask policy-rc.d first.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# splitpilot node root: never start services\nexit 101\n")
        policy.chmod(0o755)
        # A copy, not a link: the host's resolv.conf may be a link into a place the root lacks.
        resolv = root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        resolv.write_text(Path("/etc/resolv.conf").read_text())
        (root / "etc/apt/sources.list").write_text(f"deb {self.mirror} {self.recipe.suite} main\n")
        # sid's Release file on the mirror may be past its Valid-Until date; the option is
        # scoped to this one source so the main suite keeps the check.
        (root / "etc/apt/sources.list.d/sid.list").write_text(f"deb [check-valid-until=no] {self.mirror} sid main\n")
        # Pinned below the default 500: sid only provides what is asked for by name (pkg/sid).
        (root / "etc/apt/preferences.d/sid-low").write_text(
            "Package: *\nPin: release n=sid\nPin-Priority: 100\n")

    def configure_apptainer(self) -> None:
        conf = self.root / "etc/apptainer/apptainer.conf"
        text = conf.read_text()
        # The node's /dev is the host's; a new devpts instance cannot be mounted
        # from the unprivileged user namespace jobs run Apptainer in.
        new, count = re.subn(r"(?m)^mount devpts = yes$", "mount devpts = no", text)
        if count != 1:
            raise NodeRootError(f"{conf}: no 'mount devpts = yes' line to change; the Apptainer "
                                "package changed: fix condor_plugin/testing/noderoot.py configure_apptainer()")
        conf.write_text(new)

    def make_sandbox_image(self) -> None:
        """A sandbox image folder: a hard-linked copy of the root's /usr (no registry is reachable)."""
        image = self.root / SANDBOX_IMAGE_PATH.lstrip("/")
        image.mkdir(parents=True)
        self.step("sandbox image", ["cp", "-a", "--link", str(self.root / "usr"), str(image / "usr")])
        for name in ("bin", "lib", "lib64", "sbin"):
            if (self.root / "usr" / name).is_dir():
                (image / name).symlink_to(f"usr/{name}")
        for name in ("etc", "proc", "sys", "dev", "tmp", "var/tmp", "home", "root", "srv", "mnt"):
            (image / name).mkdir(parents=True, exist_ok=True)
        (image / "tmp").chmod(0o1777)
        (image / "var/tmp").chmod(0o1777)
        (image / "etc/os-release").symlink_to("../usr/lib/os-release")
        # Apptainer adds the calling user to copies of these when it starts a container.
        for name in ("passwd", "group"):
            shutil.copy2(self.root / "etc" / name, image / "etc" / name)


# ---------------------------------------------------------------------------
# Helpers

def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NeedsRootError(what)


def isolated(argv: Sequence[str]) -> list[str]:
    """ARGV in a new private mount namespace and PID namespace (with its own /proc).

    Whatever ARGV mounts stays in its namespace; whatever it starts dies with
    it (the PID namespace ends when its first process ends, and --kill-child
    ends that one if `unshare` itself is killed).
    """
    return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child=SIGKILL",
            "--mount-proc", "--", *argv]


def remove_tree(path: Path) -> None:
    """Remove PATH, refusing if anything is mounted below it (it could be a host folder)."""
    if not path.exists():
        return
    mounted = mounts_under(path)
    if mounted:
        raise NodeRootError(f"refusing to remove {path}: mounts below it ({', '.join(mounted)}); "
                            f"fix: umount them (umount -R {path}) and retry")
    shutil.rmtree(path)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
