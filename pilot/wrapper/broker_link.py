"""The wrapper's link to the broker, with the job token and only it.

`JobBroker` is what the wrapper needs from the broker; `pilot.api.jobclient.JobClient`
implements it over gRPC with the token held in memory. Around it:

- `classify` sorts a failed call: *transient* (the broker is restarting or
  unreachable: UNAVAILABLE, DEADLINE_EXCEEDED, ...: retry), *fenced* (the
  broker will not let this attempt act any more: FAILED_PRECONDITION, e.g.
  another attempt holds the job: stop the payload, save nothing) or
  *final* (anything else: the call's own failure).
- `retry` repeats a call while it fails transiently, with exponential
  backoff, until a deadline (the job token's end: it is refreshed by the
  agent while the job runs, which moves the deadline). A broker outage
  never becomes a final state by itself.
- `Reporter` sends state reports in order from one thread, retrying each;
  the final report is awaited before the wrapper sends its Result.
- `BrokerHeartbeat` heartbeats the broker from its own thread for the whole
  job, at the interval the broker asked for (JobStart.broker_heartbeat_s),
  and records a kill or a fencing for the main loop. Only when the agent does
  not carry the job's liveness (JobStart.liveness_from_agent unset: an older
  agent or broker); otherwise the wrapper connects only for its calls, and
  the connection closes after IDLE_CONNECTION_S without one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from pilot.pipe import messages as m

#: gRPC codes of a broker that is restarting, overloaded or unreachable: retried until the deadline.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED"})
#: Codes that may be transient (a broker bug, a stream cut by a restart) but may also persist: retried a few times.
DOUBTFUL_CODES = frozenset({"INTERNAL", "UNKNOWN"})
DOUBTFUL_TRIES = 5
#: The broker will not let this attempt act any more (another attempt holds the job, or it ended there).
FENCED_CODES = frozenset({"FAILED_PRECONDITION"})

TRANSIENT, DOUBTFUL, FENCED, FINAL = "transient", "doubtful", "fenced", "final"


def classify(error: BaseException) -> str:
    """TRANSIENT, DOUBTFUL, FENCED or FINAL for an exception raised by a JobBroker call.

    Works on anything shaped like pilot.api.client.BrokerError (a `code` with a
    `name`): tests' fakes raise such errors without importing grpc."""
    code = getattr(getattr(error, "code", None), "name", None)
    if code in TRANSIENT_CODES:
        return TRANSIENT
    if code in DOUBTFUL_CODES:
        return DOUBTFUL
    if code in FENCED_CODES:
        return FENCED
    return FINAL


class Fenced(Exception):
    """The broker refused a call of this attempt for good (see classify): the wrapper must stop."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__(f"the broker refused {what}: {getattr(error, 'details', None) or error}")
        self.error = error


def retry(call: Callable[[], object], what: str, *, deadline: Callable[[], float],
          pause: Callable[[float], None], log: Callable[[str], None], first_delay: float = 0.5,
          max_delay: float = 15.0):
    """CALL's result, retried while it fails transiently and time.time() is before DEADLINE().

    PAUSE(seconds) waits between tries (the caller's way: serving the agent,
    or an interruptible sleep; it may raise to abandon). A fenced failure
    raises Fenced; any other failure, or a transient one past the deadline,
    is raised as is."""
    delay = first_delay
    doubtful = 0
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted below
            kind = classify(exc)
            if kind == FENCED:
                raise Fenced(what, exc) from None
            if kind == DOUBTFUL:
                doubtful += 1
            if kind == FINAL or (kind == DOUBTFUL and doubtful >= DOUBTFUL_TRIES):
                raise
            if time.time() + delay > deadline():
                raise
            log(f"{what} failed ({getattr(getattr(exc, 'code', None), 'name', type(exc).__name__)}); "
                f"retrying in {delay:.1f} s")
            pause(delay)
            delay = min(max_delay, delay * 2)


class JobBroker(Protocol):
    # Results are `object`: the wrapper ignores them (JobClient returns what it learnt, fakes need not).
    def update_state(self, state: int, detail: str = "", exit_code: int | None = None) -> object:
        """Report STATE. A transient failure may be retried with the same arguments (same sequence number)."""

    def heartbeat(self, cpu_seconds: float, rss_bytes: int, sandbox_bytes: int) -> bool:
        """True when the job was killed and must stop."""

    def get_input(self, name: str, destination: str, /) -> object:
        """Download input NAME to DESTINATION, verifying its checksum."""

    def put_output_fd(self, fd: int, name: str) -> object:
        """Upload the open file FD (from offset 0, never reopened by path) as output NAME."""

    def replace_token(self, certificate_pem: bytes, private_key_pem: bytes) -> None: ...

    def close(self) -> None: ...


BrokerFactory = Callable[[m.JobStart], JobBroker]


#: Without a heartbeat of its own, the wrapper's connection to the broker closes after this long without a
#: call (and reopens for the next): a running job holds no connection at the broker between its state reports.
IDLE_CONNECTION_S = 10.0


def connect_grpc(job: m.JobStart) -> JobBroker:
    """The real link: a JobClient on the JobStart's broker endpoint and token.

    The client does not retry itself (retries=0): the wrapper retries every
    call up to the token's end (see `retry`). When the agent carries the job's
    liveness (JobStart.liveness_from_agent) the connection closes when idle."""
    from pilot.api.jobclient import JobClient  # why: grpc (~15 MiB) only once a job runs, in the background

    return JobClient(job.broker.address, ca_pem=job.broker.ca_pem, certificate_pem=job.token.certificate_pem,
                     private_key_pem=job.token.private_key_pem, retries=0,
                     idle_timeout=IDLE_CONNECTION_S if job.liveness_from_agent else None)


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
        if self._broker is None:   # (the connecting thread sets one of the two before _ready)
            raise RuntimeError("the broker connection ended without a client or an error")
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
    """Sends state updates to the broker in order, from one thread, each retried while the broker is away.

    After a fencing (`fenced` is set) or another failure (`error`), later
    reports are dropped: the broker would refuse them as out of order."""

    def __init__(self, broker: JobBroker, *, deadline: Callable[[], float], log: Callable[[str], None],
                 first_delay: float = 0.5, max_delay: float = 15.0) -> None:
        self.broker = broker
        self.error: Exception | None = None
        self.fenced: Fenced | None = None
        self._deadline = deadline
        self._log = log
        self._delays = (first_delay, max_delay)
        self._closing = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="broker-reporter", daemon=True)
        self._thread.start()

    def report(self, state: int, detail: str = "", exit_code: int | None = None) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put((state, detail, exit_code))

    @property
    def idle(self) -> bool:
        """Everything reported so far was sent (or dropped after a failure)."""
        with self._lock:
            return self._pending == 0

    def close(self) -> None:
        """Stop waiting between retries (the wrapper is ending without its reports)."""
        self._closing.set()

    def _pause(self, seconds: float) -> None:
        if self._closing.wait(seconds):
            raise InterruptedError("the wrapper is ending")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if self.error is None and self.fenced is None:
                    self._send(*item)
            finally:
                with self._lock:
                    self._pending -= 1

    def _send(self, state: int, detail: str, exit_code: int | None) -> None:
        what = f"the state report {m.JobState.Name(state) if state in m.JobState.values() else state}"
        first, most = self._delays
        try:
            retry(lambda: self.broker.update_state(state, detail, exit_code), what, deadline=self._deadline,
                  pause=self._pause, log=self._log, first_delay=first, max_delay=most)
        except Fenced as exc:
            self.fenced = exc
        except Exception as exc:  # noqa: BLE001 - recorded and reported in the Result
            self.error = exc


class BrokerHeartbeat:
    """Heartbeats to the broker every INTERVAL seconds from a thread, for the whole job.

    USAGE() gives (cpu_seconds, rss_bytes, sandbox_bytes). A kill answer sets
    `killed`; a fencing sets `fenced`; WAKE() is called on either. Transient
    failures are skipped (the next beat is the retry). The main loop looks at the flags every few tens of
    milliseconds while the payload runs."""

    def __init__(self, broker: JobBroker, interval: float, usage: Callable[[], tuple[float, int, int]],
                 log: Callable[[str], None], wake: Callable[[], None] = lambda: None) -> None:
        self.broker = broker
        self.interval = interval
        self.killed = False
        self.fenced: Fenced | None = None
        self._usage = usage
        self._wake = wake
        self._log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                if self.broker.heartbeat(*self._usage()):
                    self.killed = True
                    self._wake()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - sorted below
                if classify(exc) == FENCED:
                    self.fenced = Fenced("this attempt's heartbeat", exc)
                    self._wake()
                    return
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    self._log(f"heartbeat to the broker failed ({failures} in a row): {exc}")
