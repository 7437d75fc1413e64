"""The wrapper's link to the broker, with the job token and only it.

`JobBroker` is what the wrapper needs from the broker; `broker.client.JobClient`
implements it over gRPC with the token held in memory. State reports go
through a `Reporter`: one background thread sends them in order, so the
payload starts without waiting for broker round trips, and the final report
is awaited before the wrapper sends its Result.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

from pilot.pipe import messages as m


class JobBroker(Protocol):
    def update_state(self, state: int, detail: str = "", exit_code: int | None = None) -> None: ...

    def heartbeat(self, cpu_seconds: float, rss_bytes: int, sandbox_bytes: int) -> bool:
        """True when the job was killed and must stop."""

    def get_input(self, name: str, destination: str) -> None:
        """Download input NAME to DESTINATION, verifying its checksum."""

    def put_output_fd(self, fd: int, name: str) -> None:
        """Upload the open file FD (from offset 0, never reopened by path) as output NAME."""

    def replace_token(self, certificate_pem: bytes, private_key_pem: bytes) -> None: ...

    def close(self) -> None: ...


BrokerFactory = Callable[[m.JobStart], JobBroker]


def connect_grpc(job: m.JobStart) -> JobBroker:
    """The real link: a JobClient on the JobStart's broker endpoint and token."""
    from broker.client import JobClient  # late: grpc is only needed once a job runs

    return JobClient(job.broker.address, ca_pem=job.broker.ca_pem,
                     certificate_pem=job.token.certificate_pem, private_key_pem=job.token.private_key_pem)


class LazyBroker:
    """A JobBroker connected in the background.

    Importing the gRPC client and opening the TLS channel takes ~150 ms; a job
    without inputs need not wait for it: the payload starts at once, and the
    first call that needs the broker (the reporter's STARTED, or an input
    download) waits for the connection. A failed connection raises there.
    """

    def __init__(self, connect: BrokerFactory, job: m.JobStart) -> None:
        self._ready = threading.Event()
        self._broker: JobBroker | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._connect, args=(connect, job), name="broker-connect", daemon=True).start()

    def _connect(self, connect: BrokerFactory, job: m.JobStart) -> None:
        try:
            self._broker = connect(job)
        except BaseException as exc:  # noqa: BLE001 - re-raised to the first caller
            self._error = exc
        finally:
            self._ready.set()

    def _get(self) -> JobBroker:
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._broker

    def update_state(self, state, detail="", exit_code=None):
        return self._get().update_state(state, detail, exit_code)

    def heartbeat(self, cpu_seconds, rss_bytes, sandbox_bytes):
        return self._get().heartbeat(cpu_seconds, rss_bytes, sandbox_bytes)

    def get_input(self, name, destination):
        return self._get().get_input(name, destination)

    def put_output_fd(self, fd, name):
        return self._get().put_output_fd(fd, name)

    def replace_token(self, certificate_pem, private_key_pem):
        return self._get().replace_token(certificate_pem, private_key_pem)

    def close(self):
        self._ready.wait(30)
        if self._broker is not None:
            self._broker.close()


class Reporter:
    """Sends state updates to the broker in order, from one thread."""

    def __init__(self, broker: JobBroker) -> None:
        self.broker = broker
        self.error: Exception | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="broker-reporter", daemon=True)
        self._thread.start()

    def report(self, state: int, detail: str = "", exit_code: int | None = None) -> None:
        self._queue.put((state, detail, exit_code))

    def flush(self, timeout: float = 60.0) -> Exception | None:
        """Wait until everything queued was sent; return the first error, if any."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)
        if not done.is_set() and self.error is None:
            self.error = TimeoutError(f"broker did not take the state reports within {timeout:g} s")
        return self.error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self.error is not None:
                continue  # after a failure, later reports would be refused as out of order
            try:
                self.broker.update_state(*item)
            except Exception as exc:  # noqa: BLE001 - recorded and reported in the Result
                self.error = exc
