"""The pipe against a real Java peer compiled from proto/.

tests/java/PipePeer.java is compiled during the test run with Debian's protoc
and libprotobuf-java (the generated classes come straight from proto/, not
from splitpilot/) and runs as the wrapper side of the pipe. This checks the
framing and the schema against a second, independent protobuf
implementation: Java's writeDelimitedTo / parseDelimitedFrom.

The compiled classes are cached in .cache/java-peer/<key>/, where the key is
a SHA-256 of everything that goes into them (the .proto files, PipePeer.java,
the protoc version, the JDK and jar used), so later runs skip compilation.

Missing tools make these tests fail, never skip: `make test` installs them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, spawn_with_channel
from pilot.pipe.framing import encode_frame, encode_varint
from pilot.pipe.protocol import Connection, ConnectionClosed, Role

pytestmark = pytest.mark.java

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
PEER_SOURCE = REPO / "tests" / "java" / "PipePeer.java"
CACHE_DIR = REPO / ".cache" / "java-peer"
PROTOBUF_JAR = Path("/usr/share/java/protobuf.jar")
PEER_CLASS = "PipePeer"

#: Bump when the compile commands below change, to invalidate the cache.
BUILD_RECIPE = "protoc -I proto --java_out; javac -encoding UTF-8 -nowarn; v1"

COMPILE_TIMEOUT = 300
#: Per message: generous for a cold JVM start on a loaded machine.
RECEIVE_TIMEOUT = 30
EXIT_TIMEOUT = 30

#: Options for every JVM run: fast start, and no JVM logging on stdout
#: (unified logging writes to stdout by default and would corrupt the pipe).
JVM_OPTIONS = ("-Xshare:auto", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
               "-Xlog:disable", "-Xlog:all=warning:stderr", "-XX:+DisplayVMOutputToStderr")

INSTALL_HINT = ("run `make test` once (it installs the Debian packages protobuf-compiler and "
                "libprotobuf-java, and a JDK if javac is missing)")


# ------------------------------------------------------------------ build


class _BuildError(Exception):
    pass


@dataclass
class JavaPeer:
    """The compiled peer, or why there is none (reported by the test itself)."""

    java: str | None = None
    classpath: str | None = None
    error: str | None = None
    build_seconds: float = 0.0
    cached: bool = False

    def argv(self, *args: str) -> list[str]:
        """The command running PipePeer with ARGS; fails the calling test if unbuilt."""
        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        return [self.java, *JVM_OPTIONS, "-cp", self.classpath, PEER_CLASS, *args]

    @property
    def java_is_native(self) -> bool:
        """True when `java` is the launcher binary itself, not a wrapper script.

        Only then is the JVM's own pid the pid of the process we spawned.
        """
        with open(self.java, "rb") as f:
            return f.read(4) == b"\x7fELF"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise _BuildError(f"`{name}` is not on the PATH: {INSTALL_HINT}")
    return path


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _BuildError(f"{what} took more than {COMPILE_TIMEOUT} s: {' '.join(argv)}") from None
    if done.returncode != 0:
        raise _BuildError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n"
                          f"{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def _cache_key(protos: list[Path], protoc_version: str, javac: str, java: str) -> str:
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    add("recipe", BUILD_RECIPE.encode())
    add("protoc", protoc_version.encode())
    # The resolved paths name the JDK (its directory carries the version) and
    # the jar (Debian's symlink points at protobuf-<version>.jar).
    add("javac", os.path.realpath(javac).encode())
    add("java", os.path.realpath(java).encode())
    add("jar", os.path.realpath(PROTOBUF_JAR).encode())
    for proto in protos:
        add(proto.relative_to(PROTO_DIR).as_posix(), proto.read_bytes())
    add("PipePeer.java", PEER_SOURCE.read_bytes())
    return digest.hexdigest()


def _build() -> tuple[str, Path, bool]:
    """Compile (or find in the cache) the peer; return (java, classes dir, cached)."""
    protoc, javac, java = _tool("protoc"), _tool("javac"), _tool("java")
    if not PROTOBUF_JAR.is_file():
        raise _BuildError(f"{PROTOBUF_JAR} is missing: {INSTALL_HINT}")
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise _BuildError(f"no .proto files under {PROTO_DIR}")
    protoc_version = _run([protoc, "--version"], "protoc --version").strip()
    key = _cache_key(protos, protoc_version, javac, java)
    target = CACHE_DIR / key
    stamp = target / "complete"
    if stamp.is_file():
        return java, target / "classes", True
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=CACHE_DIR))
    try:
        src, classes = work / "src", work / "classes"
        src.mkdir()
        classes.mkdir()
        _run([protoc, f"-I{PROTO_DIR}", f"--java_out={src}", *map(str, protos)], "protoc")
        sources = sorted(map(str, src.rglob("*.java"))) + [str(PEER_SOURCE)]
        _run([javac, "-encoding", "UTF-8", "-nowarn", "-d", str(classes), "-cp", str(PROTOBUF_JAR),
              *sources], "javac")
        (work / "complete").write_text(f"{protoc_version}\n{os.path.realpath(javac)}\n")
        work.chmod(0o755)  # mkdtemp made it private
        if target.exists():  # a partial leftover (no stamp): replace it
            shutil.rmtree(target)
        try:
            work.rename(target)
        except OSError:
            if not stamp.is_file():  # not a concurrent run that finished first
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return java, target / "classes", False


@pytest.fixture(scope="session")
def java_peer() -> JavaPeer:
    """Build once per session; a failure is reported by each test that needs the peer."""
    start = time.monotonic()
    try:
        java, classes, cached = _build()
    except _BuildError as exc:
        return JavaPeer(error=f"cannot build the Java pipe peer: {exc}")
    return JavaPeer(java=os.path.realpath(java), classpath=f"{classes}{os.pathsep}{PROTOBUF_JAR}",
                    build_seconds=time.monotonic() - start, cached=cached)


# ------------------------------------------------------------------ helpers


def _jvm_env() -> dict[str, str]:
    """Our environment without options that would make the JVM print or behave differently."""
    env = dict(os.environ)
    for name in ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH"):
        env.pop(name, None)
    return env


def _finish(process: subprocess.Popen, channel: PipeChannel | None) -> None:
    """Close our ends and make sure the JVM is gone, whatever happened."""
    if channel is not None:
        channel.close()
    if process.poll() is None:
        try:
            process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=EXIT_TIMEOUT)


def _stderr(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"\n--- PipePeer stderr ---\n{text}" if text else ""


def _job_start() -> m.JobStart:
    spec = m.JobSpec(
        executable="/cvmfs/sw.example.org/bin/reco",
        arguments=["--events", "1000", "--out", "out/reco.root", "ünïcode ✓"],
        environment={"ALPHA": "1", "OMP_NUM_THREADS": "4", "ZETA": "ζ value"},
        input_files=[
            m.InputFile(name="in/calib.db", size=123_456_789_012, sha256="ab" * 32),
            m.InputFile(name="config.json", size=42, sha256="0f" * 32),
        ],
        output_patterns=["*.root", "out/**"],
        requirements=m.Requirements(cores=8, memory_mb=16_000, disk_mb=50_000, walltime_s=86_400,
                                    container_image="/cvmfs/unpacked/el9:latest", platform="el9-x86_64",
                                    sites_allowed=["SITE_A", "SITE_B"], sites_denied=["SITE_C"]),
        max_attempts=3, owner="/DC=org/CN=alice", name="reco", priority=-5,
    )
    return m.JobStart(
        job_id=2**40 + 7,  # above 32 bits: exercises 64-bit varints both ways
        attempt=3,
        spec=spec,
        token=m.JobToken(certificate_pem=b"-----BEGIN CERTIFICATE-----\n...",
                         private_key_pem=b"-----BEGIN " b"PRIVATE KEY-----\n...", not_after_unix=1_900_000_000),
        broker=m.BrokerEndpoint(address="broker.example.org:8443", ca_pem=b"ca"),
        sandbox_dir="/srv/sandbox/job-7",
        software_dir="/cvmfs/sw.example.org",
        limits=m.Limits(cores=8, memory_mb=16_000, disk_mb=50_000, walltime_s=86_400),
        deadline_unix=1_900_000_000,
        expose_token_to_payload=True,
    )


# -------------------------------------------------------------------- tests


def test_round_trip_with_java_wrapper(java_peer: JavaPeer, tmp_path: Path) -> None:
    argv = java_peer.argv()
    stderr_path = tmp_path / "peer.stderr"
    job = _job_start()
    stop = m.Stop(reason=m.StopReason.STOP_REASON_PREEMPTED, detail="SIGTERM from the batch system",
                  deadline_s=30)
    with open(stderr_path, "wb") as stderr:
        process, channel = spawn_with_channel(argv, stderr=stderr, env=_jvm_env())
    try:
        channel.send(m.make_hello("agent-java-test", "test"))
        channel.send(job)

        ready = channel.expect(m.Ready, timeout=RECEIVE_TIMEOUT)
        # The Java peer speaks minor 0: both sides use it, and this side sends nothing of minor 1.
        assert (ready.protocol_major, ready.protocol_minor) == (1, 0) and m.PROTOCOL_VERSION[1] >= 1
        assert channel.conn.negotiated_minor == 0
        assert list(ready.capabilities) == ["java-peer"]
        assert ready.software_version.startswith("PipePeer")
        if java_peer.java_is_native:
            # We exec'd the launcher binary itself (not a script around it),
            # so the JVM runs in the process we spawned.
            assert ready.pid == process.pid
        else:
            assert ready.pid > 0

        started = channel.expect(m.StateChange, timeout=RECEIVE_TIMEOUT)
        assert started.state == m.JobState.JOB_STATE_STARTED
        assert started.detail == f"job {job.job_id} attempt 3 executable /cvmfs/sw.example.org/bin/reco"
        assert abs(started.time_unix_ms - time.time() * 1000) < 600_000

        running = channel.expect(m.StateChange, timeout=RECEIVE_TIMEOUT)
        assert running.state == m.JobState.JOB_STATE_RUNNING
        assert running.detail == (
            "args=--events|1000|--out|out/reco.root|ünïcode ✓"
            " env=ALPHA=1,OMP_NUM_THREADS=4,ZETA=ζ value"
            f" inputs=in/calib.db:123456789012:{'ab' * 32},config.json:42:{'0f' * 32}"
            " cores=8 memory_mb=16000 sites=SITE_A|SITE_B sandbox=/srv/sandbox/job-7")

        beat = channel.expect(m.Heartbeat, timeout=RECEIVE_TIMEOUT)
        assert beat.payload_pid == job.attempt
        assert beat.rss_bytes == job.job_id * 1000
        assert beat.cpu_seconds == 1.5
        assert beat.sandbox_bytes == len(job.spec.arguments)
        assert beat.wall_seconds == float(job.spec.requirements.walltime_s)
        assert beat.processes == len(job.spec.environment)
        assert beat.time_unix_ms == sum(f.size for f in job.spec.input_files)

        channel.send(stop)
        result = channel.expect(m.Result, timeout=RECEIVE_TIMEOUT)
        assert result.final_state == m.JobState.JOB_STATE_FAILED_WRAPPER
        assert result.failure_class == m.FailureClass.FAILURE_CLASS_STOPPED
        assert result.WhichOneof("termination") == "signal"
        assert result.signal == 15
        assert "STOP_REASON_PREEMPTED" in result.message
        assert "SIGTERM from the batch system" in result.message
        assert result.cpu_seconds == 1.5
        assert result.max_rss_bytes == job.job_id * 1000

        channel.close_write()
        assert channel.receive(timeout=RECEIVE_TIMEOUT) is ConnectionClosed
        assert process.wait(timeout=EXIT_TIMEOUT) == 0, _stderr(stderr_path)
    except BaseException as exc:
        exc.add_note(_stderr(stderr_path))
        raise
    finally:
        _finish(process, channel)


def test_version_mismatch_gets_error(java_peer: JavaPeer, tmp_path: Path) -> None:
    argv = java_peer.argv()
    stderr_path = tmp_path / "peer.stderr"
    with open(stderr_path, "wb") as stderr:
        process, channel = spawn_with_channel(argv, stderr=stderr, env=_jvm_env())
    try:
        channel.send(m.Hello(protocol_major=2, protocol_minor=5, agent_id="agent-from-the-future"))

        ready = channel.expect(m.Ready, timeout=RECEIVE_TIMEOUT)
        assert ready.protocol_major == 1
        error = channel.expect(m.Error, timeout=RECEIVE_TIMEOUT)
        assert error.code == m.ErrorCode.ERROR_CODE_VERSION
        assert "2.5" in error.message
        # Error is the wrapper's last message: its stream ends cleanly.
        assert channel.receive(timeout=RECEIVE_TIMEOUT) is ConnectionClosed
        assert process.wait(timeout=EXIT_TIMEOUT) == 3, _stderr(stderr_path)
    except BaseException as exc:
        exc.add_note(_stderr(stderr_path))
        raise
    finally:
        _finish(process, channel)


def _prefix_len(frame: bytes) -> int:
    """Length of a frame's varint prefix."""
    for i, byte in enumerate(frame):
        if byte < 0x80:
            return i + 1
    raise AssertionError("unterminated varint prefix")


def test_frames_are_byte_identical_to_java_write_delimited(java_peer: JavaPeer, tmp_path: Path) -> None:
    argv = java_peer.argv("--reencode")

    # A legal agent conversation, framed by the protocol core itself.
    conn = Connection(Role.AGENT)
    big_job = _job_start()
    big_job.token.certificate_pem = b"-----BEGIN CERTIFICATE-----\n" + b"Q" * 20_000  # > 16 KiB
    frames = [
        conn.send(m.make_hello("agent-java-test", "1.2.3")),
        conn.send(big_job),
        conn.send(m.Ping(nonce=2**64 - 1)),
        conn.send(m.TokenRefresh(token=m.JobToken(certificate_pem=b"C" * 200, not_after_unix=-1))),
        conn.send(m.Stop(reason=m.StopReason.STOP_REASON_SLOT_END, detail="slot ends", deadline_s=60)),
    ]
    # Edge cases framed directly, outside any conversation.
    envelopes = [
        m.AgentMessage(),                                          # empty message: a 0x00 frame
        m.AgentMessage(hello=m.Hello()),                           # all fields default
        m.AgentMessage(stop=m.Stop(detail="x" * 127)),             # 2-byte length
        m.AgentMessage(ping=m.Ping(nonce=1)),
        m.AgentMessage(job_start=m.JobStart(sandbox_dir="s" * 16_384)),       # 3-byte length
        m.AgentMessage(token_refresh=m.TokenRefresh(                           # 4-byte length
            token=m.JobToken(private_key_pem=bytes(range(256)) * 12_288))),
    ]
    frames += [encode_frame(e.SerializeToString()) for e in envelopes]
    assert {_prefix_len(f) for f in frames} == {1, 2, 3, 4}
    assert frames[len(frames) - len(envelopes)] == encode_varint(0)
    sent = b"".join(frames)

    stderr_path = tmp_path / "peer.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                   env=_jvm_env(), close_fds=True)
    try:
        echoed, _ = process.communicate(sent, timeout=EXIT_TIMEOUT + RECEIVE_TIMEOUT)
        assert process.returncode == 0, _stderr(stderr_path)
        if echoed != sent:
            first = next((i for i, (a, b) in enumerate(zip(echoed, sent, strict=False)) if a != b),
                         min(len(echoed), len(sent)))
            pytest.fail(f"Java re-encoded {len(echoed)} bytes for our {len(sent)}; first difference "
                        f"at byte {first}: ours {sent[first:first + 16].hex()} java "
                        f"{echoed[first:first + 16].hex()}{_stderr(stderr_path)}")
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=EXIT_TIMEOUT)
