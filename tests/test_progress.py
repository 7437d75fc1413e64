"""Progress of uploads and downloads: the API's on_progress callback against a real broker, the
terminal line of `splitpilot job submit|output` under a real pseudo-terminal, and Ctrl-C mid-transfer."""

from __future__ import annotations

import io
import os
import pathlib
import pty
import re
import select
import signal
import subprocess
import time

import pytest
from test_broker_cli import BIN, SLOT, job, serving

from broker.progress import TransferProgress
from pilot.api.client import AgentClient, BrokerClient, MatchedJob
from pilot.api.states import JobState
from pilot.tokens import TokenRole

BIG = 3 * (1 << 20) + 12345   # several chunks (1 MiB each) and a ragged last one


@pytest.fixture
def broker(tmp_path):
    with serving(tmp_path) as running:
        yield running


def write_job_file(tmp_path, size: int = BIG, name: str = "big-input.dat") -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / name).write_bytes(os.urandom(size))
    path = tmp_path / "jobs.toml"
    path.write_text(f'[job]\nname = "progress"\nexecutable = "run.sh"\n'
                    f'[job.requirements]\nmemory_mb = 1000\nwalltime = "1h"\n'
                    f'[[job.inputs]]\npath = "data/{name}"\n[job.outputs]\npatterns = ["*.out"]\n')
    return str(path)


def run_with_output(broker, tmp_path, size: int) -> tuple[int, bytes]:
    """Submit one job, run it to DONE as a real agent and wrapper would, with one output of SIZE bytes."""
    submitted = job(broker, "submit", write_job_file(tmp_path, size=10))
    assert submitted.returncode == 0, submitted.stderr
    content = os.urandom(size)
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            wrapper.update_state(JobState.RUNNING)
            sandbox = tmp_path / "sandbox"
            sandbox.mkdir()
            (sandbox / "result.out").write_bytes(content)
            wrapper.put_output(str(sandbox / "result.out"))
            wrapper.update_state(JobState.SAVING)
            wrapper.update_state(JobState.DONE, exit_code=0)
    return matched.job_id, content


def assert_one_transfer(calls: list[tuple[int, int, str]], size: int, name: str) -> None:
    assert calls[0] == (0, size, name) and calls[-1] == (size, size, name)
    assert all(total == size and got == name for _done, total, got in calls)
    done = [d for d, _t, _n in calls]
    assert done == sorted(done), "done bytes went backwards"
    assert len(calls) >= 5   # one call per 1 MiB chunk, not only the start and the end


# ------------------------------------------------------------------ the API callback, real broker

def test_upload_and_download_report_growing_bytes_to_the_total_and_change_nothing(broker, tmp_path):
    token = str(tmp_path / "alice.pem")
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(BIG))
    with BrokerClient(broker.address, token) as client:
        calls: list[tuple[int, int, str]] = []
        watched = client.upload(source, "upload.bin", on_progress=lambda *c: calls.append(c))
        assert_one_transfer(calls, BIG, "upload.bin")
        # The callback only watches: the same answer as an upload without it.
        assert client.upload(source, "upload.bin") == watched

    job_id, content = run_with_output(broker, tmp_path, BIG)
    with BrokerClient(broker.address, token) as client:
        calls = []
        results = client.download(job_id, tmp_path / "out", on_progress=lambda *c: calls.append(c))
        assert [r.ok for r in results] == [True]
        assert_one_transfer(calls, BIG, "result.out")
        assert (tmp_path / "out" / "result.out").read_bytes() == content
        plain = client.download(job_id, tmp_path / "plain")
        assert (tmp_path / "plain" / "result.out").read_bytes() == content and plain[0].ok


def test_an_interrupt_mid_download_leaves_no_file_under_its_name_nor_a_part_file(broker, tmp_path):
    """Ctrl-C arriving while chunks are written (raised from the callback, exactly mid-stream): the
    output is not left half-written under its final name, and no temporary file stays behind."""
    job_id, _content = run_with_output(broker, tmp_path, BIG)
    out = tmp_path / "out"

    def interrupt(done, total, name):
        if 0 < done < total:
            raise KeyboardInterrupt

    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as client:
        with pytest.raises(KeyboardInterrupt):
            client.download(job_id, out, on_progress=interrupt)
    assert list(out.iterdir()) == []


def test_submit_reports_an_input_already_on_the_broker_once_whole_without_uploading(broker, tmp_path):
    path = write_job_file(tmp_path)
    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as client:
        first: list[tuple[int, int, str]] = []
        client.submit_checked(path, on_progress=lambda *c: first.append(c))
        assert_one_transfer(first, BIG, "big-input.dat")
        again: list[tuple[int, int, str]] = []
        submission = client.submit_checked(path, on_progress=lambda *c: again.append(c))
    assert (submission.uploaded, submission.reused) == (0, 1)
    assert again == [(BIG, BIG, "big-input.dat")]


# ------------------------------------------------------------------ the line itself (unit: a fake clock)

class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_is_throttled_escaped_and_ended_with_a_newline():
    now = [100.0]
    screen = FakeTerminal()
    line = TransferProgress(screen, enabled=True, files=2, clock=lambda: now[0])
    hostile = "evil\x1b]0;owned\x07\x1b[2J.dat"   # a name that would retitle and clear a terminal
    for done in range(0, 1001, 10):                # 101 updates within the same instant
        line.update(done, 1000, hostile)
    assert screen.getvalue().count("\r") == 1      # drawn once: at most one redraw per 0.1 s
    now[0] += 0.5
    line.update(1000, 1000, hostile)
    line.close()
    text = screen.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "100%" in text and "file 1/2" in text and "/s" in text
    # Our own clear-to-end-of-line is the only escape sequence on the screen: the name's are shown escaped.
    assert text.count("\x1b") == text.count("\x1b[K") and "\x07" not in text
    assert "evil\\x1b]0;owned\\x07\\x1b[2J.dat" in text
    line.update(5, 10, "late")                     # a late call from gRPC's thread after the end
    assert screen.getvalue() == text


def test_auto_draws_only_on_a_terminal_and_never_means_never():
    pipe = io.StringIO()
    assert TransferProgress.for_stream(pipe, "auto").callback is None
    assert TransferProgress.for_stream(FakeTerminal(), "never").callback is None
    assert TransferProgress.for_stream(FakeTerminal(), "auto").callback is not None
    always = TransferProgress.for_stream(pipe, "always")
    assert always.callback is not None
    with pytest.raises(ValueError, match="not one of auto, always, never"):
        TransferProgress.for_stream(pipe, "sometimes")


# ------------------------------------------------------------------ the command under a pseudo-terminal

def run_on_a_terminal(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run `splitpilot ARGS` with stderr on a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([str(BIN), *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    finally:
        os.close(slave)
    try:
        screen = read_terminal(master, process, timeout)
        stdout = process.stdout.read().decode()
        return process.wait(timeout=timeout), stdout, screen
    finally:
        process.stdout.close()
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()


def read_terminal(master: int, process: subprocess.Popen, timeout: float, until: str | None = None) -> str:
    """What the terminal shows, until the process closed it (or UNTIL appears); fails at TIMEOUT."""
    got = b""
    deadline = time.monotonic() + timeout
    while until is None or until.encode() not in got:
        if time.monotonic() > deadline:
            pytest.fail(f"the terminal did not show {until!r} in time: {got!r}")
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:    # EIO: every holder of the terminal's other end closed it
            break
        if not data:
            break
        got += data
    return got.decode(errors="replace")


def redrawn(screen: str) -> bool:
    """Whether SCREEN holds a line drawn over (a carriage return not ending a line: the terminal
    itself turns each newline into CR LF)."""
    return re.search(r"\r(?!\n)", screen) is not None


def test_submit_and_output_show_progress_on_a_terminal_and_nothing_elsewhere(broker, tmp_path):
    path = write_job_file(tmp_path)
    code, stdout, screen = run_on_a_terminal("job", "submit", path, "--config", broker.config)
    assert code == 0, screen
    assert stdout.strip().isdigit()                # stdout keeps its one id per line
    assert "big-input.dat" in screen and "100%" in screen and "file 1/1" in screen and redrawn(screen)

    piped = job(broker, "submit", path)            # stderr a pipe: no progress at all
    assert piped.returncode == 0, piped.stderr
    assert "%" not in piped.stderr and "\r" not in piped.stderr and "file 1/1" not in piped.stderr

    code, stdout, screen = run_on_a_terminal("job", "submit", path, "--config", broker.config,
                                             "--progress", "never")
    assert code == 0, screen
    assert not redrawn(screen) and "file 1/1" not in screen and "submitted 1 job(s)" in screen

    (tmp_path / "run").mkdir()
    job_id, content = run_with_output(broker, tmp_path / "run", BIG)
    code, stdout, screen = run_on_a_terminal("job", "output", str(job_id), str(tmp_path / "out"),
                                             "--config", broker.config)
    assert code == 0, screen
    assert "result.out" in screen and "100%" in screen and "file 1/1" in screen
    assert (tmp_path / "out" / "result.out").read_bytes() == content
    piped = job(broker, "output", str(job_id), str(tmp_path / "out2"))
    assert piped.returncode == 0, piped.stderr
    assert "%" not in piped.stderr and "\r" not in piped.stderr
    code, stdout, screen = run_on_a_terminal("job", "output", str(job_id), str(tmp_path / "out3"),
                                             "--config", broker.config, "--progress", "never")
    assert code == 0, screen
    assert not redrawn(screen) and "file 1/1" not in screen and "sha256 verified" in screen
    assert "--progress WHEN" in subprocess.run([str(BIN), "job", "output", "--help"], capture_output=True,
                                               text=True, check=True).stdout


def test_ctrl_c_mid_download_exits_130_and_leaves_no_half_written_output(broker, tmp_path):
    """The broker is frozen (SIGSTOP) while the download is under way, so the interruption lands
    mid-stream for certain; the command ends 130, the folder holds neither the output nor a part."""
    size = 64 << 20   # more than gRPC's flow-control window: the frozen broker cannot have sent it all
    (tmp_path / "run").mkdir()
    job_id, _content = run_with_output(broker, tmp_path / "run", size)
    out = tmp_path / "out"
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([str(BIN), "job", "output", str(job_id), str(out), "--config", broker.config],
                                   stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    finally:
        os.close(slave)
    frozen = False
    try:
        read_terminal(master, process, 120, until="result.out")   # the download has started
        os.kill(broker.process.pid, signal.SIGSTOP)
        frozen = True
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        screen = read_terminal(master, process, 30)
    finally:
        if frozen:
            os.kill(broker.process.pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert "interrupted" in screen
    assert not out.exists() or list(out.iterdir()) == []
    # The broker, thawed, still serves the whole output.
    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as client:
        assert [r.ok for r in client.download(job_id, tmp_path / "again")] == [True]
    assert pathlib.Path(tmp_path / "again" / "result.out").stat().st_size == size


def test_ctrl_c_mid_upload_exits_130_and_queues_nothing(broker, tmp_path):
    """The same for `job submit`: interrupted while its input is on the way, it ends 130 and, once
    the broker runs again, no job was queued and a new submission uploads the input whole."""
    path = write_job_file(tmp_path, size=64 << 20)
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([str(BIN), "job", "submit", path, "--config", broker.config],
                                   stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    finally:
        os.close(slave)
    frozen = False
    try:
        read_terminal(master, process, 120, until="big-input.dat")   # the upload has started
        os.kill(broker.process.pid, signal.SIGSTOP)
        frozen = True
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        screen = read_terminal(master, process, 30)
        assert process.stdout.read() == b""                          # no job id printed
    finally:
        if frozen:
            os.kill(broker.process.pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        os.close(master)
    assert "interrupted" in screen
    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as client:
        assert client.list().jobs == []
        calls: list[tuple[int, int, str]] = []
        submission = client.submit_checked(path, on_progress=lambda *c: calls.append(c))
    assert (submission.uploaded, submission.reused) == (1, 0)
    assert_one_transfer(calls, 64 << 20, "big-input.dat")
