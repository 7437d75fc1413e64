"""`splitpilot demo`: the main job end to end, with progress.

    splitpilot demo [--condor]  the whole path (default; needs root): a broker, a
                                mini-condor (a real HTCondor pool on this machine),
                                20 jobs with inputs and outputs, a factory sending
                                glideins whose agents run the jobs in Apptainer
                                containers inside the node; outputs checked
    splitpilot demo --local     a broker, 20 jobs and one real agent on this machine
                                (no HTCondor; containers from bubblewrap/podman/apptainer)
    splitpilot demo --protocol  only the agent <-> wrapper pipe between real
                                processes (the wrapper side is pilot.pipe.loopback);
                                the last job gets a Stop notice

Exit codes: 0 every job DONE with the right outputs; 1 a job failed, its
outputs were wrong, or a part could not start (e.g. --condor without root:
the message says so); 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from pilot import __version__
from pilot.errors import UsageError
from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, spawn_with_channel

PINGS_PER_JOB = 20


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    final_state: str
    failure_class: str
    heartbeats: int
    log_bytes: int
    frames_in: int
    bytes_in: int
    bytes_out: int
    ping_p50_us: float
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job end to end on the embedded default",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--condor", action="store_true",
                      help="broker + mini-condor + factory + glideins (default; needs root)")
    mode.add_argument("--local", action="store_true", help="broker + jobs + one agent on this machine")
    mode.add_argument("--protocol", action="store_true", help="only the pipe protocol between real processes")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="number of jobs (default: 20, 3 for --protocol)")
    parser.add_argument("--glideins", type=int, default=2, metavar="N",
                        help="--condor: glideins at once, one core each (default %(default)s)")
    parser.add_argument("--steps", type=int, default=6, metavar="N",
                        help="--protocol: heartbeats each simulated job sends before it finishes (default 6)")
    parser.add_argument("--runtimes", default=None, metavar="LIST",
                        help="container runtimes the agents try, in order (default: apptainer for --condor, "
                             "bubblewrap,podman,apptainer for --local)")
    parser.add_argument("--container-policy", choices=("require", "prefer", "off"), default="prefer",
                        help="--condor: require a container, prefer one (fall back to none when no runtime "
                             "passes its self-test in the node), or off (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="--condor, --local: keep the state directory")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.local:
        from apps.localdemo import run_local_demo  # why: each demo loads its own world (the broker server)

        jobs = 20 if args.jobs is None else args.jobs
        if jobs < 1:
            raise UsageError("--jobs must be at least 1")
        return run_local_demo(jobs, args.runtimes or "bubblewrap,podman,apptainer", args.keep)
    if not args.protocol:
        from apps.condordemo import CondorDemoSettings, run_condor_demo  # why: htcondor (the condor extra)

        settings = CondorDemoSettings(jobs=20 if args.jobs is None else args.jobs, glideins=args.glideins,
                                      runtimes=args.runtimes or "apptainer", container_policy=args.container_policy,
                                      keep=args.keep)
        return 0 if run_condor_demo(settings).ok else 1
    args.jobs = 3 if args.jobs is None else args.jobs
    if args.jobs < 1 or args.steps < 1:
        raise UsageError("--jobs and --steps must be at least 1")
    print("splitpilot demo --protocol: the agent <-> wrapper protocol between real processes\n"
          "(agent here, one wrapper process per job, frames over the wrapper's stdin/stdout).\n"
          "The last job gets a Stop notice.\n", flush=True)
    outcomes = []
    for index in range(args.jobs):
        stop_after = max(1, args.steps // 2) if index == args.jobs - 1 and args.jobs > 1 else None
        outcomes.append(run_one_job(1000 + index, args.steps, stop_after))
    print_summary(outcomes)
    expected_done = args.jobs - 1 if args.jobs > 1 else 1
    done = sum(o.final_state == "JOB_STATE_DONE" for o in outcomes)
    return 0 if done == expected_done else 1


def run_one_job(job_id: int, steps: int, stop_after: int | None) -> JobOutcome:
    start = time.monotonic()
    process, channel = spawn_with_channel([sys.executable, "-m", "pilot.pipe.loopback"])
    heartbeats = log_bytes = frames_in = 0
    try:
        channel.send(m.make_hello(agent_id="demo-agent", software_version=__version__))
        ready = channel.expect(m.Ready, timeout=30)
        print(f"job {job_id}: wrapper pid {ready.pid} ready, protocol "
              f"{ready.protocol_major}.{ready.protocol_minor}", flush=True)
        rtts = measure_rtt(channel, PINGS_PER_JOB)
        spec = m.JobSpec(executable="loopback", arguments=[str(steps)], owner="demo", name=f"demo-{job_id}",
                         requirements=m.Requirements(cores=1, memory_mb=100, disk_mb=10, walltime_s=60))
        channel.send(m.JobStart(job_id=job_id, attempt=1, spec=spec, sandbox_dir="/tmp",
                                limits=m.Limits(cores=1, memory_mb=100, disk_mb=10, walltime_s=60)))
        result = None
        while result is None:
            event = channel.expect(m.StateChange, m.Heartbeat, m.LogChunk, m.Result, timeout=30)
            frames_in += 1
            if isinstance(event, m.StateChange):
                print(f"job {job_id}: {m.JobState.Name(event.state)} {event.detail}", flush=True)
            elif isinstance(event, m.Heartbeat):
                heartbeats += 1
                print(f"job {job_id}: heartbeat {heartbeats}, wall {event.wall_seconds:.2f} s", flush=True)
                if stop_after is not None and heartbeats == stop_after:
                    channel.send(m.Stop(reason=m.StopReason.STOP_REASON_SLOT_END,
                                        detail="demo: the slot ends", deadline_s=10))
                    print(f"job {job_id}: sent Stop (slot end, 10 s deadline)", flush=True)
            elif isinstance(event, m.LogChunk):
                log_bytes += len(event.data)
            elif isinstance(event, m.Result):
                result = event
        print(f"job {job_id}: result {m.JobState.Name(result.final_state)} "
              f"({m.FailureClass.Name(result.failure_class)}): {result.message}", flush=True)
        channel.close_write()
        process.wait(timeout=30)
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    return JobOutcome(job_id, m.JobState.Name(result.final_state), m.FailureClass.Name(result.failure_class),
                      heartbeats, log_bytes, frames_in, channel.bytes_received, channel.bytes_sent,
                      statistics.median(rtts) * 1e6 if rtts else float("nan"), time.monotonic() - start)


def measure_rtt(channel: PipeChannel, count: int) -> list[float]:
    """Ping/Pong round trips through the wrapper process, in seconds."""
    rtts = []
    for nonce in range(count):
        sent = time.perf_counter()
        channel.send(m.Ping(nonce=nonce))
        pong = channel.expect(m.Pong, timeout=10)
        rtts.append(time.perf_counter() - sent)
        if pong.nonce != nonce:
            raise RuntimeError(f"pong {pong.nonce} answers ping {nonce}")
    return rtts


def print_summary(outcomes: list[JobOutcome]) -> None:
    header = ("job", "final state", "failure class", "heartbeats", "log B", "frames in",
              "bytes in", "bytes out", "ping p50", "seconds")
    rows = [(str(o.job_id), o.final_state.removeprefix("JOB_STATE_"),
             o.failure_class.removeprefix("FAILURE_CLASS_"), str(o.heartbeats), str(o.log_bytes),
             str(o.frames_in), str(o.bytes_in), str(o.bytes_out), f"{o.ping_p50_us:.0f} us",
             f"{o.seconds:.2f}") for o in outcomes]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(flush=True)
