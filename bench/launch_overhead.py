#!/usr/bin/env python3
"""Launch overhead of the wrapper per runtime, and the agent's and wrapper's memory.

    python bench/launch_overhead.py [--quick] [--jobs N] [--memory-only [--runs R]]

For each runtime present (process, namespace, bubblewrap, podman with a local image
folder; apptainer and docker when present), N jobs one after the other:
the time from a match arriving (the agent side about to start the wrapper)
to the payload's exec (its first instruction writes the clock), through
the real launcher, the software area's setup script, the real Wrapper (with
a file-backed broker link: broker round trips are not part of launching),
JobStart over the pipe, and the payload's start. Next to it, in the same
run, the bare runtime starting `python3 -c pass` to completion (the
baseline). Then the resident memory of a real agent (against a real broker,
running jobs) and of a real wrapper (pilot.wrapper with the gRPC client
loaded), sampled from /proc while they run.

Targets (issue 5): process <= 150 ms p50, bubblewrap <= 200 ms p50, our
p50 <= 1.5x the bare runtime's; agent RSS <= 40 MB, wrapper RSS <= 35 MB.
The last line is `wrapper_start_ms_p50: N` (the best runtime found).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pilot.launch import Mounts, build_software_area, make_launcher, spawn, wrapper_command  # noqa: E402
from pilot.launch.manifest import write_manifest  # noqa: E402
from pilot.pipe import messages as m  # noqa: E402


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_launch(launcher, software: Path, work: Path, index: int) -> float:
    sandbox = work / f"job-{index}"
    sandbox.mkdir()
    mounts = Mounts.on_host(sandbox, software)
    argv = wrapper_command(launcher, mounts, ["python3", "-m", "fake_job_broker",
                                              f"{launcher.workdir(mounts)}/.broker"])
    job = m.JobStart(job_id=index + 2, attempt=1, sandbox_dir=launcher.workdir(mounts),
                     spec=m.JobSpec(executable="/bin/sh", arguments=["-c", ": > start.ns"]))
    start = time.time_ns() / 1e9
    process, channel = spawn(launcher, argv, mounts, stderr=subprocess.DEVNULL)
    with channel:
        channel.send_many([m.make_hello("bench"), job])
        channel.expect(m.Ready, timeout=60)
        while True:
            event = channel.expect(m.StateChange, m.Heartbeat, m.LogChunk, m.Result, timeout=60)
            if isinstance(event, m.Result):
                break
    process.wait(timeout=60)
    # The payload's first act creates the file: the kernel stamps its mtime
    # (no program of the payload's own needs to be started to read a clock).
    payload_start = (sandbox / "start.ns").stat().st_mtime_ns / 1e9
    shutil.rmtree(sandbox, ignore_errors=True)
    return payload_start - start


def bare(launcher, software: Path, work: Path) -> float:
    sandbox = work / "bare"
    sandbox.mkdir(exist_ok=True)
    mounts = Mounts.on_host(sandbox, software)
    command = launcher.wrap(["python3", "-c", "pass"], mounts)
    env = launcher.environment(mounts, os.environ)
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=launcher.cwd(mounts), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def peak_rss(pid: int, stop: threading.Event, into: list) -> None:
    """Sample VmRSS of PID until STOP; append the peak (bytes) to INTO."""
    peak = 0
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            break
        time.sleep(0.02)
    into.append(peak)


def memory(software: Path, work: Path) -> tuple[int, int]:
    """Peak RSS of a real agent running 3 jobs, and of its wrappers."""
    from broker.server import BrokerConfig, BrokerServer
    from pilot.api.client import BrokerClient
    from pilot.procstat import tree_usage
    from pilot.tokens import TokenRole

    with BrokerServer(BrokerConfig(state_dir=str(work / "broker"), listen="127.0.0.1:0")) as server:
        user = server.ca.new_token(TokenRole.USER, "bench")
        agent_token = server.ca.new_token(TokenRole.AGENT, "bench", site="BENCH", queue="q",
                                          ttl=datetime.timedelta(hours=1))
        with BrokerClient(server.address, user, server.ca_pem) as client:
            client.submit([m.JobSpec(executable="/bin/sleep", arguments=["3"], name=f"rss-{i}",
                                     requirements=m.Requirements(cores=1, memory_mb=100, walltime_s=60))
                           for i in range(3)])
        agent = subprocess.Popen([sys.executable, "-m", "pilot", "agent", "--broker", server.address, "--token", "-",
                                  "--work-dir", str(work / "agent"), "--software-dir", str(software),
                                  "--idle-timeout", "2s", "--runtimes", "process", "--container-policy", "require",
                                  "--allow-root-payloads"],
                                 stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ})
        agent.stdin.write(agent_token.to_pem())
        agent.stdin.close()
        stop, agent_peak, wrapper_peaks, seen = threading.Event(), [], [], set()
        # The process started is the agent's guardian; the agent is its first child.
        deadline = time.monotonic() + 30
        while not tree_usage(agent.pid, include_root=False).pids and time.monotonic() < deadline:
            time.sleep(0.01)
        agent_pid = min(tree_usage(agent.pid, include_root=False).pids, default=agent.pid)
        sampler = threading.Thread(target=peak_rss, args=(agent_pid, stop, agent_peak))
        sampler.start()
        wrapper_threads = []
        while agent.poll() is None:
            for pid in tree_usage(agent.pid, include_root=False).pids:
                if pid in seen:
                    continue
                try:
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                if b"pilot.wrapper" in cmdline and b"/bin/sh" not in cmdline.split(b"\0")[0]:
                    seen.add(pid)
                    thread = threading.Thread(target=peak_rss, args=(pid, stop, wrapper_peaks))
                    thread.start()
                    wrapper_threads.append(thread)
            time.sleep(0.05)
        stop.set()
        sampler.join()
        for thread in wrapper_threads:
            thread.join()
    return agent_peak[0], max(wrapper_peaks) if wrapper_peaks else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 jobs per runtime (a smoke run)")
    parser.add_argument("--jobs", type=int, default=50, help="jobs per runtime (default 50)")
    parser.add_argument("--memory-only", action="store_true", help="only the agent's and wrapper's RSS (no launches)")
    parser.add_argument("--runs", type=int, default=3, help="with --memory-only: runs, the median is printed")
    args = parser.parse_args()
    count = 10 if args.quick else args.jobs
    work = Path(tempfile.mkdtemp(prefix="splitpilot-launch-bench-"))
    os.chmod(work, 0o755)
    try:
        software = build_software_area(work / "software")
        shutil.copy(REPO / "tests" / "fake_job_broker.py", software / "lib" / "python")
        write_manifest(software)   # the area changed: the agent refuses an area that differs from its manifest
        if args.memory_only:
            runs = [memory(software, work / f"memory-{i}") for i in range(args.runs)]
            for agent_rss, wrapper_rss in runs:
                print(f"run: agent {agent_rss / 2**20:.1f} MiB, wrapper {wrapper_rss / 2**20:.1f} MiB")
            print(f"memory: agent peak RSS {statistics.median(r[0] for r in runs) / 2**20:.1f} MiB (target 40), "
                  f"wrapper peak RSS {statistics.median(r[1] for r in runs) / 2**20:.1f} MiB (target 35) "
                  f"(median of {len(runs)})")
            return 0
        from pilot.launch.testimage import ensure_rootfs
        image = str(ensure_rootfs())
        candidates = [("process", None), ("namespace", None), ("bubblewrap", None), ("podman", image),
                      ("apptainer", image), ("docker", image)]
        results = {}
        print(f"launch_overhead: {count} jobs per runtime, p50/p90 in ms", file=sys.stderr)
        print(f"{'runtime':12s} {'match->exec p50':>16s} {'p90':>8s} {'bare python p50':>16s} {'ratio':>6s}")
        for name, img in candidates:
            try:
                launcher = make_launcher(name, img)
            except Exception as exc:  # noqa: BLE001 - e.g. docker cannot run an image folder
                print(f"{name:12s} not set up here ({exc})")
                continue
            probe = launcher.probe()
            if not probe.ok:
                print(f"{name:12s} not available here ({probe.reason})")
                continue
            try:
                one_launch(launcher, software, work, -1)  # warm caches (image, page cache)
                samples = [one_launch(launcher, software, work, i) for i in range(count)]
                baseline = [bare(launcher, software, work) for _ in range(max(10, count // 2))]
            except Exception as exc:  # noqa: BLE001 - a broken runtime is reported, not fatal
                print(f"{name:12s} failed: {exc}")
                continue
            p50, p90, b50 = (percentile(samples, 0.5) * 1e3, percentile(samples, 0.9) * 1e3,
                             statistics.median(baseline) * 1e3)
            results[name] = (p50, p90, b50)
            print(f"{name:12s} {p50:14.1f} ms {p90:6.1f} ms {b50:14.1f} ms {p50 / b50:6.2f}")
        agent_rss, wrapper_rss = memory(software, work)
        print(f"memory: agent peak RSS {agent_rss / 2**20:.1f} MiB (target 40), "
              f"wrapper peak RSS {wrapper_rss / 2**20:.1f} MiB (target 35)")
        targets = {"process": 150, "bubblewrap": 200}
        for name, (p50, _p90, b50) in results.items():
            limit = targets.get(name)
            verdict = f"target {limit} ms: {'met' if p50 <= limit else 'MISSED'}; " if limit else ""
            print(f"{name}: {verdict}ratio to bare runtime {p50 / b50:.2f} (target <= 1.5: "
                  f"{'met' if p50 / b50 <= 1.5 else 'missed'})")
        best = min(results.values(), key=lambda r: r[0])[0] if results else float("nan")
        print(f"wrapper_start_ms_p50: {results.get('process', (best,))[0]:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
