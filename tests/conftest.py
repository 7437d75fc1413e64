"""Shared fixtures: a connected pair of sans-I/O connections and message builders."""

from __future__ import annotations

import pytest

from pilot.pipe import messages as m
from pilot.pipe.protocol import NEED_DATA, Connection, Role


def pump(sender: Connection, receiver: Connection, message) -> object:
    """Send MESSAGE from one connection to the other; return the received event."""
    receiver.receive_data(sender.send(message))
    event = receiver.next_event()
    assert event is not NEED_DATA
    return event


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    """(agent, wrapper) connections after Hello and Ready."""
    agent, wrapper = Connection(Role.AGENT), Connection(Role.WRAPPER)
    pump(agent, wrapper, m.make_hello("agent-under-test"))
    pump(wrapper, agent, m.make_ready())
    return agent, wrapper


@pytest.fixture
def running(pair) -> tuple[Connection, Connection]:
    """(agent, wrapper) connections after JobStart."""
    agent, wrapper = pair
    pump(agent, wrapper, sample_job_start())
    return agent, wrapper


def sample_job_start(job_id: int = 42, attempt: int = 1) -> m.JobStart:
    spec = m.JobSpec(
        executable="run.sh", arguments=["--events", "1000"], environment={"A": "1"},
        input_files=[m.InputFile(name="in.dat", size=3, sha256="ab" * 32)],
        output_patterns=["*.root"],
        requirements=m.Requirements(cores=2, memory_mb=2000, disk_mb=5000, walltime_s=3600,
                                    sites_allowed=["SITE-A"]),
        max_attempts=3, owner="alice", name="sample", priority=5,
    )
    return m.JobStart(job_id=job_id, attempt=attempt, spec=spec,
                      token=m.JobToken(certificate_pem=b"CERT", private_key_pem=b"KEY", not_after_unix=1),
                      broker=m.BrokerEndpoint(address="127.0.0.1:7443", ca_pem=b"CA"),
                      sandbox_dir="/workdir", software_dir="/sw",
                      limits=m.Limits(cores=2, memory_mb=2000, disk_mb=5000, walltime_s=3600))


@pytest.fixture(scope="session")
def docker_engine():
    """A private Docker engine for the whole run (tests/dockerd.py), DOCKER_HOST pointing at it meanwhile.

    Started on first use; stopped at the end of the session, which checks that
    no daemon, mount or folder of it is left.
    """
    import os

    if os.geteuid() != 0:
        pytest.skip("a private Docker engine needs root (dockerd); run the tests as root")
    from tests.dockerd import private_dockerd

    with private_dockerd() as engine:
        yield engine
