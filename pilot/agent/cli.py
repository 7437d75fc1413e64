"""`splitpilot agent`: the job agent a glidein starts.

    splitpilot agent --broker HOST:PORT --token FILE|- --work-dir DIR [options]

The agent token comes from FILE (removed after reading) or stdin ('-'); it
stays in this process's memory, which is made non-dumpable, and credential
variables are removed from the environment before any child starts. Right
after reading it the process forks: the child is the agent, the parent its
guardian, which passes SIGTERM/SIGINT/SIGHUP on, and reports the pilot
abandoned to the broker at once if the agent is killed (so that its jobs
are re-queued without waiting for the broker's reaper).

The wrapper runs in the best launcher that passes a self-test. Policy
`require`: the first of --runtimes that works, else no jobs. `prefer`: the
runtimes, then `namespace` (no container: own user, mount and PID
namespaces, the host's system folders read-only, no capabilities), then no
isolation at all, loudly. `off`: no container: `namespace` if it works,
else no isolation. Without isolation jobs run one at a time. Before every
wrapper the software area is checked against what was verified at start.
`--dry-run JOBFILE` prints the exact command, environment and isolation a
job from JOBFILE would get, without running or matching anything.

Site binds: `--bind SRC[:DST]` (repeatable) shows the host's SRC read-only
at DST (default SRC) inside every job's container or namespace (not without
isolation: there the payload sees the host's paths anyway). Refused at
start, with exit 2: relative paths or '..', DST over what the launcher
mounts itself (/workdir, /sw, /cvmfs, /proc, /dev, /sys, /tmp, /), SRC that
is /, the host's /proc, the agent's work dir or a folder holding it (after
symlinks), or that does not exist.

Exit codes (pilot.agent.exitcodes; a glidein exits with its agent's code):
  0  left normally (idle, lifetime, drained, stopped by SIGTERM)
  1  failure (also: the agent was killed; its guardian reported it)
  2  usage
  3  black hole (the node failed K jobs in a row) or no usable runtime
  4  the broker refuses the agent token: PERMISSION_DENIED or UNAUTHENTICATED,
     or the TLS handshake fails on the certificates (token and broker from
     different CAs; a wrong-role token), 3 calls in a row. Check the CA the
     token was issued from (the factory's --ca), its site, and the clocks.
  5  the agent token had expired at start (queued too long, or a wrong clock)
  6  the software area changed (a job tampered with what later wrappers run):
     no wrapper was started from it; the pilot's end report names the path.
     Rebuild the area, and prefer a launcher that mounts it read-only.
The glidein factory stops submitting for its longest backoff when a glidein
ends with 4 or 5: every glidein with its tokens would fail the same way.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import uuid

from pilot import logconfig
from pilot.agent.guardian import fork_agent
from pilot.agent.refusal import AgentTokenExpired, AgentTokenRefused
from pilot.agent.secrets import make_non_dumpable, read_token, scrub_environment
from pilot.api.jobfile import load_job_file
from pilot.configfile import ConfigSpec, make_configurable, resolve
from pilot.durations import parse_duration
from pilot.errors import SplitpilotError, UsageError
from pilot.launch import (
    LaunchConfigError,
    Mounts,
    build_software_area,
    check_site_binds,
    detect,
    dry_run,
    isolation_of,
    parse_bind,
    spawn,
    wrapper_command,
)
from pilot.launch.manifest import SoftwareAreaChanged, SoftwareGuard
from pilot.prctl import become_subreaper
from pilot.procstat import kill_descendants
from pilot.tokens import TokenRole, parse_identity, parse_token_pem

WRAPPER_ARGV = ("python3", "-m", "pilot.wrapper")
log = logging.getLogger("splitpilot.agent")
DEFAULT_RUNTIMES = "apptainer,singularity,podman,bubblewrap"


#: `agent --config FILE`: an [agent] table, one key per option (pilot.configfile); the token is a path.
AGENT_CONFIG = ConfigSpec(
    section="agent",
    examples={"broker": '"broker.example.org:7443"', "token": '"/var/lib/splitpilot/agent.pem"',
              "work_dir": '"/var/lib/splitpilot/agent"', "software_dir": '"/cvmfs/sw.example.org/splitpilot"',
              "image": '"/cvmfs/unpacked.cern.ch/registry.hub.docker.com/library/almalinux:9"',
              "platform": '["el9"]', "bind": '["/data/site:/site/data"]'},
    validators={"bind": parse_bind},
    minimum={"black_hole": 1})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("agent", help="run the job agent (what a glidein starts)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", metavar="HOST:PORT", help="the broker's address (required unless --dry-run)")
    parser.add_argument("--token", metavar="FILE", help="the agent token: a file (removed after reading) or '-' "
                                                        "for stdin (required unless --dry-run)")
    parser.add_argument("--ca-cert", metavar="FILE", help="CA certificate of the broker (default: the last "
                                                          "certificate of the token's chain)")
    parser.add_argument("--work-dir", required=True, metavar="DIR", help="where job sandboxes are made")
    parser.add_argument("--software-dir", metavar="DIR",
                        help="the read-only software area with setup.sh (default: built from this "
                             "installation into WORK_DIR/software)")
    parser.add_argument("--lifetime", default="24h", metavar="DURATION",
                        help="how long this pilot may live (default %(default)s; capped by the machine ad)")
    parser.add_argument("--idle-timeout", default="5m", metavar="DURATION",
                        help="leave after this long without a job (default %(default)s)")
    parser.add_argument("--container-policy", choices=("require", "prefer", "off"), default="prefer",
                        help="require: only the listed runtimes, else no jobs; prefer: the runtimes, then the "
                             "namespace launcher, then no isolation (loudly); off: no container (namespace "
                             "launcher if it works, else no isolation)")
    parser.add_argument("--runtimes", default=DEFAULT_RUNTIMES, metavar="LIST",
                        help="container runtimes to try, in order (default %(default)s); 'namespace' and "
                             "'process' (no isolation) may be listed too")
    parser.add_argument("--image", metavar="IMAGE", help="container image (a directory for apptainer and "
                                                         "bubblewrap, an image name for podman)")
    parser.add_argument("--platform", action="append", default=[], metavar="TAG",
                        help="platform tag this node offers (repeatable)")
    parser.add_argument("--black-hole", type=int, default=3, metavar="K",
                        help="stop taking work after K consecutive wrapper/infrastructure failures (default 3)")
    parser.add_argument("--stop-deadline", type=int, default=30, metavar="SECONDS",
                        help="Stop deadline given to jobs at slot end or SIGTERM (default 30)")
    parser.add_argument("--min-job-time", default="1m", metavar="DURATION",
                        help="ask for no job when less time than this is left (default %(default)s)")
    parser.add_argument("--pilot-heartbeat", default="1m", metavar="DURATION",
                        help="how often the agent reports itself to the broker (default %(default)s)")
    parser.add_argument("--allow-root-payloads", action="store_true",
                        help="run payloads as root without a container (refused by default: a root payload "
                             "can read the agent's memory, token included, despite non-dumpable)")
    parser.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]", dest="binds",
                        help="show the host's SRC read-only at DST (default SRC) in every job's container or "
                             "namespace (repeatable)")
    parser.add_argument("--dry-run", metavar="JOBFILE",
                        help="print the command and environment a job of JOBFILE would run with, then exit")
    parser.add_argument("--log-level", default="info", choices=logconfig.LEVELS,
                        help="the agent's, its guardian's and its wrappers' log level (default %(default)s; "
                             "debug adds every pipe frame's kind and size, never its content)")
    parser.add_argument("--log-file", metavar="FILE",
                        help="append the agent's log lines to FILE (created 0600) instead of stderr")
    make_configurable(parser, AGENT_CONFIG)
    parser.set_defaults(handler=run_agent)


def wrapper_argv(level: str) -> tuple[str, ...]:
    """The wrapper's command with the agent's log level (the default one adds nothing: argv as before)."""
    return WRAPPER_ARGV if level == "info" else (*WRAPPER_ARGV, "--log-level", level)


def site_binds(entries: list[str], work_dir: str) -> tuple:
    """The --bind entries as checked pilot.launch.Bind objects; UsageError naming the fix otherwise."""
    try:
        binds = tuple(parse_bind(entry) for entry in entries)
        check_site_binds(binds, work_dir=work_dir)
    except LaunchConfigError as exc:
        raise UsageError(f"--bind: {exc}") from None
    return binds


def _runtime(args, software: str, work_dir: str, binds: tuple = ()):
    from pilot.agent.agent import PROBE_FOLDER_PREFIX, remove_job_folder  # why: after the fork: not in the guardian

    # Named so that the next agent in this work dir removes it if this one is killed during the probe.
    probe_sandbox = tempfile.mkdtemp(prefix=PROBE_FOLDER_PREFIX, dir=work_dir)
    try:
        # The self-test runs with the site's binds: a runtime that cannot make them fails it here.
        selection = detect([r for r in args.runtimes.split(",") if r], args.container_policy, args.image,
                           Mounts.on_host(probe_sandbox, software, binds))
    finally:
        remove_job_folder(probe_sandbox)
    for attempt in selection.attempts:
        log.info(f"runtime {attempt.name}: {'ok' if attempt.ok else attempt.reason}")
    return selection


def run_agent(args: argparse.Namespace) -> int:
    resolve(args)   # --config FILE: flag, else file, else default
    # One configuration for the process; the guardian forked from it below keeps it.
    logconfig.configure(args.log_level, log_file=args.log_file)
    # Before anything else: protect the memory that will hold the token.
    non_dumpable = make_non_dumpable()
    scrub_environment()
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    binds = site_binds(args.binds, work_dir)
    if args.dry_run:
        return _dry_run(args, _software(args, work_dir), work_dir, binds)
    if not args.broker or not args.token:
        raise UsageError("--broker and --token are required (or give --dry-run JOBFILE)")
    token_pem = read_token(args.token)

    token = parse_token_pem(token_pem, "agent token")
    identity = parse_identity(token.certificate)
    if identity.role is not TokenRole.AGENT:
        # The broker would refuse every call (PERMISSION_DENIED): the same failure, found sooner.
        raise AgentTokenRefused(f"a {identity.role.value} token: the broker takes only agent tokens from an agent",
                                "issue one with splitpilot token issue --role agent --site SITE (a factory does)")
    if identity.not_after <= datetime.datetime.now(datetime.UTC):
        raise AgentTokenExpired(identity.not_after)
    ca_pem = open(args.ca_cert, "rb").read() if args.ca_cert else None
    pilot_id = f"pilot-{uuid.uuid4().hex[:12]}"
    node = socket.gethostname()

    def report_abandoned(reason: str) -> None:
        from pilot.agent.brokerlink import GrpcAgentBroker  # why: grpc in the guardian only once the agent ended

        broker = GrpcAgentBroker(args.broker, token, ca_pem)
        try:
            broker.report_pilot_end(pilot_id, node, 0, reason, abandoned=True)
        finally:
            broker.close()

    # Fork before gRPC is imported or a thread started: the parent guards the agent (pilot.agent.guardian).
    role = fork_agent(pilot_id, report_abandoned)
    if isinstance(role, int):
        return role   # the guardian, with the agent's exit code
    try:
        code = _agent(args, token, identity, ca_pem, pilot_id, node, work_dir, non_dumpable, binds)
    except SplitpilotError:
        role.done()   # a refusal with its message and code, before or after the loop: nothing abandoned
        raise
    role.done()
    return code


def _agent(args, token, identity, ca_pem: bytes | None, pilot_id: str, node: str, work_dir: str,
           non_dumpable: bool, binds: tuple = ()) -> int:
    """The agent proper (the guardian's child): software area, runtime, slot, then the loop."""
    from pilot.agent.agent import (  # why: after the fork: the guardian holds none of the agent's modules
        Agent,
        AgentSettings,
        job_limits,
        remove_stale_job_folders,
        sandbox_for,
    )
    from pilot.agent.brokerlink import GrpcAgentBroker  # why: after the fork: grpc is not fork-safe
    from pilot.agent.jobrun import JobRun, RunSettings  # why: after the fork: not in the guardian
    from pilot.agent.limits import prepare_delegation  # why: after the fork: not in the guardian
    from pilot.agent.slot import discover  # why: after the fork: not in the guardian

    log.info(f"agent token for site {identity.site} (queue {identity.queue}), valid until "
             f"{identity.not_after:%Y-%m-%d %H:%M:%S}Z; memory protected: {'yes' if non_dumpable else 'NO'}; "
             f"pilot {pilot_id}, guardian pid {os.getppid()}")
    # Held until this process ends (however: the kernel releases it on SIGKILL too). The guardian does not
    # hold it, so that a killed agent's work dir can be taken over at once.
    lock_work_dir(work_dir)
    stale = remove_stale_job_folders(work_dir)
    if stale:
        log.info(f"removed {len(stale)} job folder(s) an earlier agent left in {work_dir}: {', '.join(stale[:10])}"
                 f"{' ...' if len(stale) > 10 else ''}")
    software = _software(args, work_dir)
    try:
        guard = SoftwareGuard.verify(software)
    except SoftwareAreaChanged as exc:
        log.error(str(exc))
        broker = GrpcAgentBroker(args.broker, token, ca_pem)
        try:
            broker.report_pilot_end(pilot_id, node, 0, f"software area changed: {exc.path} {exc.what}")
        finally:
            broker.close()
        return exc.exit_code
    log.info(f"software area {software}: {guard.entries} entries verified against its manifest")
    selection = _runtime(args, software, work_dir, binds)
    if selection.launcher is None:
        log.error("no container runtime passed its self-test and the policy is 'require': taking no jobs")
        broker = GrpcAgentBroker(args.broker, token, ca_pem)
        broker.report_pilot_end(pilot_id, node, 0, "no usable container runtime")
        return 3
    launcher = selection.launcher
    isolation = isolation_of(launcher)
    if launcher.name == "process" and os.geteuid() == 0 and not args.allow_root_payloads:
        raise UsageError("refusing to run payloads as root without a container: a root payload can read this "
                         "agent's memory (its token included) whatever prctl says; fix: run the agent as an "
                         "unprivileged user, make a container runtime pass its self-test, or pass "
                         "--allow-root-payloads on a node where that is acceptable")
    broker = GrpcAgentBroker(args.broker, token, ca_pem)
    lifetime = parse_duration(args.lifetime, what="--lifetime").total_seconds()
    lifetime = min(lifetime, (identity.not_after - datetime.datetime.now(datetime.UTC)).total_seconds())
    slot = discover(work_dir, lifetime)
    exclusive = not isolation.concurrent
    if exclusive:
        # Orphans of a job (however they daemonise) come back to us, to be killed before the next job.
        become_subreaper()
    settings = AgentSettings(work_dir=work_dir, pilot_id=pilot_id, node=node,
                             idle_timeout_s=parse_duration(args.idle_timeout).total_seconds(),
                             black_hole_failures=args.black_hole, platforms=tuple(args.platform),
                             min_job_time_s=parse_duration(args.min_job_time, what="--min-job-time").total_seconds(),
                             pilot_heartbeat_s=parse_duration(args.pilot_heartbeat,
                                                              what="--pilot-heartbeat").total_seconds(),
                             run=RunSettings(stop_deadline_s=args.stop_deadline), isolation=isolation.name,
                             one_job_at_a_time=exclusive, token_not_after=identity.not_after.timestamp())
    cgroup_parent = prepare_delegation()
    log.info(f"runtime: {launcher.describe()}; isolation: {isolation.name}"
             f"{' (nothing separates jobs: one job at a time)' if exclusive else ''}; "
             f"memory limits: {'cgroup v2' if cgroup_parent else 'watchdog'}")
    if binds:
        unused = "; not applied: without isolation payloads see the host paths" if launcher.name == "process" else ""
        log.info(f"site binds (read-only): {', '.join(f'{b.host} at {b.container}' for b in binds)}{unused}")

    def make_run(offer, on_done):
        sandbox = sandbox_for(work_dir, offer)
        launcher.prepare_sandbox(sandbox)  # e.g. podman/docker under a root agent: an unprivileged uid inside
        mounts = Mounts.on_host(sandbox, software, binds)
        argv = wrapper_command(launcher, mounts, wrapper_argv(args.log_level))
        log_path = os.path.join(os.path.dirname(sandbox), "..", f"job-{offer.job_id}-{offer.attempt}.wrapper.log")

        def start():
            with open(os.path.normpath(log_path), "ab") as stderr:
                return spawn(launcher, argv, mounts, stderr=stderr)
        return JobRun(offer, spawn_wrapper=start, sandbox_host=sandbox, sandbox_inside=launcher.workdir(mounts),
                      software_inside=launcher.software_dir(mounts), broker_address=broker.address,
                      ca_pem=broker.ca_pem, agent_id=settings.pilot_id, limits=job_limits(offer.spec),
                      deadline_unix=int(slot.end_of_life), settings=settings.run, on_done=on_done,
                      cgroup_parent=cgroup_parent)

    agent = Agent(broker, slot, settings, make_run, containers=launcher.name not in ("process", "namespace"),
                  software=guard, kill_leftovers=kill_descendants if exclusive else None)
    agent.install_signal_handlers()
    try:
        return agent.run()
    finally:
        broker.close()


#: The lock file that keeps two agents out of one work dir.
WORK_DIR_LOCK = ".splitpilot-agent.lock"


def lock_work_dir(work_dir: str) -> int:
    """Take WORK_DIR for this process (an exclusive flock held until it ends); UsageError when another live
    agent has it. Returns the lock's descriptor (close-on-exec: no wrapper or payload inherits it)."""
    fd = os.open(os.path.join(work_dir, WORK_DIR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"the work dir {work_dir} is in use by another agent; fix: give each agent its own "
                         "--work-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _software(args, work_dir: str) -> str:
    """The software area's real path (a link re-pointed later changes nothing): the site's, or our own."""
    if args.software_dir:
        return os.path.realpath(args.software_dir)
    return _software_area(work_dir)


def _software_area(work_dir: str) -> str:
    """This agent's own area in WORK_DIR/software: built when missing, rebuilt when it no longer matches its
    manifest (a job of an earlier agent in this work dir may have changed it)."""

    path = os.path.join(work_dir, "software")
    if os.path.exists(os.path.join(path, "setup.sh")):
        try:
            SoftwareGuard.verify(path)
            return path
        except SplitpilotError as exc:
            log.warning(f"rebuilding its own software area: {exc}")
            shutil.rmtree(path)
    staging = tempfile.mkdtemp(prefix=".software-", dir=work_dir)
    build_software_area(os.path.join(staging, "area"))
    os.replace(os.path.join(staging, "area"), path)
    os.rmdir(staging)
    return path


def _dry_run(args, software: str, work_dir: str, binds: tuple = ()) -> int:

    jobs = load_job_file(args.dry_run)
    selection = _runtime(args, software, work_dir, binds)
    launcher = selection.launcher
    if launcher is not None:
        isolation = isolation_of(launcher)
        print("\n".join(f"# {line}" for line in isolation.describe()))
        print("# jobs share the slot" if isolation.concurrent else
              "# jobs run one at a time (nothing separates them); what a job leaves is killed before the next")
        print()
    for index, job in enumerate(jobs):
        spec = job.spec
        mounts = Mounts.on_host(os.path.join(work_dir, f"job-DRYRUN{index}-1", "sandbox"), software, binds)
        print(f"# job {index + 1} ({spec.name or spec.executable}): {spec.executable} {' '.join(spec.arguments)}")
        if launcher is None:
            print("# no container runtime passed its self-test and the policy is 'require': this job would "
                  "not be matched\n")
            continue
        print(dry_run(launcher, wrapper_command(launcher, mounts, wrapper_argv(args.log_level)), mounts), end="")
        print(f"# then, over the wrapper's stdin: Hello, JobStart (job token and key; sandbox "
              f"{launcher.workdir(mounts)}; software {launcher.software_dir(mounts)}; limits "
              f"{spec.requirements.cores} core(s), {spec.requirements.memory_mb} MiB, "
              f"{spec.requirements.walltime_s} s)\n")
    return 0
