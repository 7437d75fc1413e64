"""A small image made from this host's own files, for tests of the launchers.

No registry is reachable on test machines, and the wrapper must be shown to
run in an image that does not contain splitpilot. So a root folder is built
from this host: its python3 with its standard library, a POSIX sh and a few
core utilities, every shared library they load (found with ldd), and a
minimal /etc. The same python3 inside means the software area's compiled
dependencies (protobuf's upb extension) are ABI compatible.

The folder serves bubblewrap (image mode), apptainer (a sandbox image) and
podman (--rootfs); `ensure_image` also imports it as a podman or docker image
(`podman import` of a tarball). Both are cached under CACHE_DIR by a hash
of the recipe and of the source files' sizes and times, so a second test
run reuses them and a changed host Python makes a new one. Nothing is ever
removed.

    python -m pilot.launch.testimage [--import podman]   # build, print the folder (and image name)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: Bump when the recipe below changes.
RECIPE_VERSION = "1"
CACHE_DIR = Path(os.environ.get("SPLITPILOT_TEST_CACHE", "/var/tmp/splitpilot-test-cache"))
IMAGE_REPOSITORY = "localhost/splitpilot-test-root"

#: Programs copied into the root (with whatever name links point at them).
PROGRAMS: tuple[str, ...] = ("sh", "dash", "python3", "cat", "env", "id", "ls", "rm", "sleep", "touch", "true")
#: Parts of the standard library the wrapper never needs.
_STDLIB_SKIP = re.compile(r"/(test|idlelib|tkinter|turtledemo|ensurepip|lib2to3|pydoc_data)(/|$)")


def _python() -> Path:
    """The host's system python3 (the one an image of this host would have)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return Path(candidate)
    raise RuntimeError("no system python3 at /usr/bin/python3: install python3 (Debian: apt-get install python3)")


def _stdlib(python: Path) -> Path:
    out = subprocess.run([str(python), "-S", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _program_paths() -> list[Path]:
    paths = []
    for name in PROGRAMS:
        found = shutil.which(name, path="/usr/bin:/bin")
        if found:
            paths.append(Path(found))
    return paths


def _libraries(elves: list[Path]) -> set[Path]:
    """Every shared library the ELF files ELVES load, by absolute path (ldd)."""
    libraries: set[Path] = set()
    for chunk in range(0, len(elves), 50):
        batch = [str(p) for p in elves[chunk:chunk + 50]]
        out = subprocess.run(["ldd", *batch], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libraries.add(Path(match.group(1)))
    return libraries


def _software_area_extensions() -> list[Path]:
    found = []
    for dist in ("grpcio", "cryptography", "cffi", "protobuf"):
        try:
            files = importlib.metadata.distribution(dist).files or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        found += [Path(f.locate()).resolve() for f in files if f.name.endswith(".so")]
    return found


def _files() -> list[Path]:
    """Every host file the root is made of (symlinks included as links)."""
    python = _python()
    stdlib = _stdlib(python)
    files: list[Path] = []
    for path in _program_paths() + [python]:
        files.append(path)
        if path.is_symlink():
            files.append(path.resolve())
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if not _STDLIB_SKIP.search(os.path.join(root, d))]
        files += [Path(root, n) for n in names]
    elves = [p.resolve() for p in files if p.suffix == ".so" or p in _program_paths() or p == python]
    # The software area's compiled modules (grpc, cryptography, cffi) need
    # system libraries of their own (librt, libpthread...): a real image has
    # them as part of its libc; this minimal root must list them.
    elves += _software_area_extensions()
    for library in _libraries(sorted(set(elves))):
        files.append(library)
        if library.is_symlink():
            files.append(library.resolve())
    return sorted(set(files))


def recipe_hash(files: list[Path] | None = None) -> str:
    """A short hash of the recipe and of the source files (path, size, mtime)."""
    digest = hashlib.sha256(f"recipe {RECIPE_VERSION}\n".encode())
    for path in files if files is not None else _files():
        st = path.lstat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{os.readlink(path) if path.is_symlink() else ''}\n"
                      .encode())
    return digest.hexdigest()[:16]


_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "os-release": 'NAME="splitpilot test root"\nID=splitpilot-test\n',
}


def _populate(root: Path, files: list[Path]) -> None:
    # A merged-/usr layout, as Debian's.
    for folder in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "proc", "dev", "sys", "tmp", "var/tmp",
                   "workdir", "sw", "cvmfs", "root"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for link, link_target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (root / link).symlink_to(link_target)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    for source in files:
        # Host paths through /bin, /lib, /lib64 land in usr/ via the links above.
        relative = str(source).lstrip("/")
        for top in ("bin/", "sbin/", "lib/", "lib64/"):
            if relative.startswith(top):
                relative = "usr/" + relative
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            continue
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)  # copies, never hard links: the host's files stay untouched
    for name, text in _ETC.items():
        (root / "etc" / name).write_text(text)
    (root / "etc/ld.so.conf").write_text("")
    subprocess.run(["ldconfig", "-r", str(root)], check=False, capture_output=True)


def ensure_rootfs(cache_dir: Path = CACHE_DIR) -> Path:
    """The cached root folder for this host, built if missing. Safe to call concurrently."""
    files = _files()
    root = cache_dir / f"rootfs-{recipe_hash(files)}"
    if (root / ".complete").exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".rootfs-build-", dir=cache_dir))
    try:
        _populate(building, files)
        (building / ".complete").write_text("")
        os.chmod(building, 0o755)
        try:
            building.rename(root)
        except OSError:  # another process finished first: use its folder
            if not (root / ".complete").exists():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return root


def _tarball(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(os.listdir(root)):
            if entry != ".complete":
                tar.add(root / entry, arcname=entry)
    return buffer.getvalue()


def ensure_image(engine: str = "podman", cache_dir: Path = CACHE_DIR) -> str:
    """The name of an ENGINE (podman or docker) image of the cached root folder, imported if missing."""
    root = ensure_rootfs(cache_dir)
    name = f"{IMAGE_REPOSITORY}:{root.name.removeprefix('rootfs-')}"
    exists = subprocess.run([engine, "image", "inspect", name], capture_output=True, check=False)
    if exists.returncode == 0:
        return name
    done = subprocess.run([engine, "import", "-", name], input=_tarball(root), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} import of {root} failed: {done.stderr.decode(errors='replace').strip()}")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.launch.testimage", description=__doc__.split("\n")[0])
    parser.add_argument("--import", dest="engine", choices=("podman", "docker"),
                        help="also import it as an image of this engine")
    args = parser.parse_args(argv)
    print(ensure_rootfs())
    if args.engine:
        print(ensure_image(args.engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

