"""What each launcher isolates a job from, said plainly: for the broker, the agent's log and --dry-run.

The agent sends `Isolation.name` with every match (Slot.isolation; the
broker records it in the job's history), logs it for every job, and its
--dry-run prints `describe(...)`. `concurrent` is the agent's rule: jobs
share a slot only where something separates them; without any isolation
(the process launcher) the agent runs one job at a time and kills every
leftover process of a job before the next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilot.launch.base import Launcher


@dataclass(frozen=True)
class Isolation:
    """What a job run by one launcher is separated from.

    Attributes:
        name: the isolation as Slot.isolation names it ("none" without any).
        other_jobs, agent, software, network, capabilities: one sentence each.
        concurrent: jobs may run side by side on the slot.
    """

    name: str
    other_jobs: str
    agent: str
    software: str
    network: str
    capabilities: str
    concurrent: bool = True

    def describe(self) -> list[str]:
        """Lines for --dry-run: what is and is not isolated."""
        return [f"isolation: {self.name}",
                f"  other jobs:    {self.other_jobs}",
                f"  the agent:     {self.agent}",
                f"  software area: {self.software}",
                f"  network:       {self.network}",
                f"  capabilities:  {self.capabilities}"]


_MANIFEST = "checked against its manifest before every wrapper starts"
_CONTAINER = Isolation(
    "container",
    other_jobs="separated: own mount and PID namespaces, only its own sandbox is mounted",
    agent="separated: not visible (own PID namespace); the agent's files are not mounted",
    software=f"read-only at /sw; {_MANIFEST}",
    network="NOT isolated: the host's network (the wrapper talks to the broker)",
    capabilities="the runtime's: the wrapper runs as an unprivileged user inside")

_BY_NAME: dict[str, Isolation] = {
    "process": Isolation(
        "none",
        other_jobs="NOT isolated: same user, same view of the machine; so jobs run one at a time, and every "
                   "leftover process of a job is killed and its sandbox removed before the next starts",
        agent="NOT isolated: same user; its memory is protected (non-dumpable) but a payload can signal it "
              "(its guardian then reports the pilot's jobs as abandoned; the guardian can be killed too)",
        software=f"WRITABLE by the payload; {_MANIFEST}: a change stops the agent",
        network="NOT isolated: the host's network",
        capabilities="the agent's own (none for an unprivileged user; root payloads are refused)",
        concurrent=False),
    "namespace": Isolation(
        "namespace",
        other_jobs="separated: own user, mount, PID, IPC and UTS namespaces; only its own sandbox is mounted",
        agent="separated: not visible or signalable (own PID namespace); the agent's work dir is not mounted",
        software=f"read-only at /sw (a mount the payload cannot remove); {_MANIFEST}",
        network="NOT isolated: the host's network (the wrapper talks to the broker)",
        capabilities="none: every set emptied, securebits locked, no_new_privs"),
    "bubblewrap": Isolation(
        "bubblewrap",
        other_jobs="separated: own user, mount, PID, IPC, UTS and cgroup namespaces; only its own sandbox is mounted",
        agent="separated: not visible (own PID namespace); the agent's work dir is not mounted",
        software=f"read-only at /sw; {_MANIFEST}",
        network="NOT isolated: the host's network (the wrapper talks to the broker)",
        capabilities="none (--cap-drop ALL)"),
}


def isolation_of(launcher: Launcher) -> Isolation:
    """The isolation LAUNCHER gives a job."""
    known = _BY_NAME.get(launcher.name)
    if known is not None:
        return known
    base = _CONTAINER
    return Isolation(launcher.name, base.other_jobs, base.agent, base.software, base.network, base.capabilities)
