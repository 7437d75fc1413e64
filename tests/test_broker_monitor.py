"""Operating the broker: per-site metrics, /healthz and /readyz, and the live web monitor.

Each test runs a real BrokerServer over mutual TLS with real AgentClient matches and real job clients;
the monitor is loaded by a real headless Chromium (Debian's `chromium`), which runs the page's
JavaScript against the running broker, and the test reads the DOM it rendered. The hostile inputs: a
job message carrying markup and script, a site name with control characters, 205 sites from one CA,
a monitor bound beyond loopback without the flag, a public monitor asked for details.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from pg import PostgresCluster, pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from prometheus_client.parser import text_string_to_metric_families
from test_pilot_e2e import wait_for

from broker.ca import CertificateAuthority
from broker.server import BrokerConfig, BrokerServer
from broker.store import open_store
from broker.store.base import PilotRef, SlotOffer
from broker.store.figures import MAX_SITES, OTHER, cap_labels, site_figures
from pilot.api.client import AdminClient, AgentClient, BrokerClient, MatchedJob, NoMatch
from pilot.api.states import JobState
from pilot.errors import UsageError
from pilot.tokens import TokenRole
from splitpilot.job.v1 import job_pb2

HOSTILE = ('<img src=x onerror="document.title=\'pwned\'"><script>document.title=\'pwned\'</script>'
           '</td></tr></table><b>bold</b>')
SLOT = {"cores": 4, "memory_mb": 8000, "disk_mb": 10000, "time_left_s": 86400}
WALLTIME = job_pb2.Requirements(walltime_s=3600)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("monitor-ca") / "ca")
    CertificateAuthority.init(path)
    return path


@pytest.fixture(scope="module")
def tokens(ca_dir) -> SimpleNamespace:
    ca = CertificateAuthority.load(ca_dir)
    return SimpleNamespace(
        alice=ca.new_token(TokenRole.USER, "alice"),
        agent_a=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default"),
        agent_b=ca.new_token(TokenRole.AGENT, "glidein-b", site="SITE-B", queue="default"))


def start_server(tmp_path, ca_dir, **overrides) -> BrokerServer:
    state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
    settings = {"listen": "127.0.0.1:0", "metrics": "127.0.0.1:0", "monitor": "127.0.0.1:0", "reap_interval": 0,
                "grace": 1.0, **overrides}
    server = BrokerServer(BrokerConfig(state_dir=str(state), ca_dir=ca_dir, **settings))
    server.start()
    return server


@pytest.fixture
def server(tmp_path, ca_dir):
    server = start_server(tmp_path, ca_dir)
    yield server
    server.stop()


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(server: BrokerServer) -> dict[tuple[str, tuple], float]:
    status, _, text = get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def populate(server: BrokerServer, tokens) -> SimpleNamespace:
    """SITE-A: one pilot holding a RUNNING job, a job failed with HOSTILE as its message; SITE-B: a pilot
    that found nothing and left empty; waiting: one job no site can run (64 cores; SITE-A offers 4)."""
    alice = BrokerClient(server.address, tokens.alice)
    agent_a = AgentClient(server.address, tokens.agent_a)
    agent_b = AgentClient(server.address, tokens.agent_b)
    try:
        two = job_pb2.Requirements(cores=2, walltime_s=3600)
        ids = alice.submit([job_pb2.JobSpec(executable="run.sh", name=f"j{i}", requirements=two) for i in range(2)])
        running, failing = (agent_a.match(SLOT, "pilot-a", "node-a.example") for _ in range(2))
        assert isinstance(running, MatchedJob) and isinstance(failing, MatchedJob)
        with running.job_client() as job:
            job.update_state(JobState.STARTED)
            job.update_state(JobState.RUNNING)
        with failing.job_client() as job:
            job.update_state(JobState.STARTED)
            job.update_state(JobState.RUNNING)
            assert job.update_state(JobState.FAILED_EXECUTION, HOSTILE, exit_code=3).state is \
                JobState.FAILED_EXECUTION
        assert isinstance(agent_b.match({"cores": 1, "time_left_s": 3600}, "pilot-b", "node-b"), NoMatch)
        agent_b.report_pilot_end("pilot-b", "node-b", 0, "idle")
        huge = alice.submit(job_pb2.JobSpec(executable="run.sh", name="huge",
                                            requirements=job_pb2.Requirements(cores=64, walltime_s=3600)))[0]
        return SimpleNamespace(ids=ids, running=running.job_id, failed=failing.job_id, huge=huge)
    finally:
        for client in (alice, agent_a, agent_b):
            client.close()


# ------------------------------------------------------------------ metrics, probes

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_metrics_are_labelled_by_site(backend, request, tmp_path, ca_dir, tokens):
    """Per site: pilots alive/busy/idle, jobs by state, failures by class, pilot ends and empty pilots;
    the Match latency histogram by result; pilots alive now (both stores: the figures are SQL of their own)."""
    db = {"db_url": request.getfixturevalue("pg_url")} if backend == "postgresql" else {}
    server = start_server(tmp_path, ca_dir, **db)
    try:
        populate(server, tokens)
        got = samples(server)
        status, _, body = get(f"http://127.0.0.1:{server.monitor_port}/api/monitor.json")
        assert status == 200 and [s["site"] for s in json.loads(body)["sites"]] == ["SITE-A", "SITE-B"]
    finally:
        server.stop()
    expected = {
        ("splitpilot_pilots_alive", ()): 1,
        ("splitpilot_site_pilots", (("site", "SITE-A"), ("status", "alive"))): 1,
        ("splitpilot_site_pilots", (("site", "SITE-A"), ("status", "busy"))): 1,
        ("splitpilot_site_pilots", (("site", "SITE-A"), ("status", "idle"))): 0,
        ("splitpilot_site_jobs", (("site", "SITE-A"), ("state", "RUNNING"))): 1,
        ("splitpilot_site_jobs", (("site", "SITE-A"), ("state", "FAILED_EXECUTION"))): 1,
        ("splitpilot_site_failures", (("class", "FAILED_EXECUTION"), ("site", "SITE-A"))): 1,
        ("splitpilot_site_pilot_ends", (("reason", "empty"), ("site", "SITE-B"))): 1,
        ("splitpilot_site_empty_pilots", (("site", "SITE-B"),)): 1,
        ("splitpilot_match_duration_seconds_count", (("result", "matched"),)): 2,
        ("splitpilot_match_duration_seconds_count", (("result", "empty"),)): 1,
        ("splitpilot_jobs", (("state", "WAITING"),)): 1,
    }
    assert {key: got.get(key) for key in expected} == expected
    # A pilot that left is not alive, and no site holds a WAITING job.
    assert got[("splitpilot_site_pilots", (("site", "SITE-B"), ("status", "alive")))] == 0
    assert not [key for key in got if key[0] == "splitpilot_site_jobs" and ("state", "WAITING") in key[1]]


def test_healthz_and_readyz_follow_the_database(tmp_path, ca_dir):
    """A private PostgreSQL server goes away: /readyz answers 503 with the reason while /healthz still
    answers (the process is alive, it just cannot serve); back, /readyz is 200 again."""
    with PostgresCluster() as cluster:
        server = start_server(tmp_path, ca_dir, db_url=cluster.url())
        try:
            base = f"http://127.0.0.1:{server.metrics_port}"
            assert get(f"{base}/healthz")[::2] == (200, "ok\n")
            assert get(f"{base}/readyz")[::2] == (200, "ready: the store answers\n")
            cluster.pause()
            wait_for(lambda: get(f"{base}/readyz")[0] == 503, 120, "/readyz to see the database gone")
            status, _, body = get(f"{base}/readyz")
            assert status == 503 and "the store does not answer" in body and "log" in body
            assert get(f"{base}/healthz")[0] == 200
            cluster.resume()
            wait_for(lambda: get(f"{base}/readyz")[0] == 200, 120, "/readyz to see the database back")
            status, _, body = get(f"{base}/nothing")
            assert status == 404 and "/readyz" in body
        finally:
            server.stop()


def test_site_and_reason_labels_are_capped_and_cleaned(tmp_path):
    """205 sites and a site name with control characters, through a real store: at most MAX_SITES
    labels plus "other", every label printable; an agent's end reasons are capped the same way."""
    store = open_store(f"sqlite://{tmp_path}/b.db")
    try:
        now = datetime.datetime.now(datetime.UTC)
        names = [f"SITE-{i:03d}" for i in range(MAX_SITES + 4)] + ["EVIL\nsplitpilot_pilots_alive 99"]
        for i, site in enumerate(names):
            pilot = PilotRef(f"p{i}", site, "n", subject=f"g{i}", serial=f"{i:x}")
            assert store.match(SlotOffer(site, 1, 1, 1, 1), pilot, now) is None
            store.pilot_end(pilot, 0, f"reason {i}", now)
        figures = site_figures(store, now, datetime.timedelta(minutes=5))
        sites = {site for site, _ in figures.pilot_ends}
        assert len(sites) == MAX_SITES + 1 and OTHER in sites
        assert all(site.isprintable() for site in sites)
        assert sum(n for (site, _), n in figures.pilot_ends.items() if site == OTHER) == len(names) - MAX_SITES
        assert {reason for _, reason in figures.pilot_ends} == {"empty"}  # no job ran: "empty", whatever was said
    finally:
        store.close()
    labels = cap_labels([(f"r{i}", i) for i in range(30)], 20)
    assert sorted(set(labels.values()) - {OTHER}) == sorted(f"r{i}" for i in range(10, 30))


# ------------------------------------------------------------------ the monitor's binds and views

def test_monitor_beyond_loopback_needs_the_flag(tmp_path, ca_dir):
    """--monitor 0.0.0.0:PORT without --monitor-public: refused with the fix, before anything starts."""
    state = tmp_path / "state"
    with pytest.raises(UsageError) as info:
        BrokerServer(BrokerConfig(state_dir=str(state), ca_dir=ca_dir, listen="127.0.0.1:0",
                                  monitor="0.0.0.0:0")).start()
    assert "--monitor-public" in str(info.value) and "fix:" in str(info.value)
    assert not state.exists()


def test_public_monitor_shows_aggregated_counts_only(tmp_path, ca_dir, tokens):
    """A public monitor: totals per state, pilots and failure classes; no site name, job id, message or
    analysis anywhere in what it serves."""
    server = start_server(tmp_path, ca_dir, monitor="0.0.0.0:0", monitor_public=True)
    try:
        populate(server, tokens)
        status, content_type, body = get(f"http://127.0.0.1:{server.monitor_port}/api/monitor.json")
        assert status == 200 and content_type.startswith("application/json")
        data = json.loads(body)
        assert data["public"] is True and data["jobs"]["RUNNING"] == 1 and data["failures"] == {"FAILED_EXECUTION": 1}
        assert data["pilots"] == {"alive": 1, "busy": 1, "idle": 0, "empty": 1}
        assert not {"sites", "errors", "unrunnable"} & set(data)
        for secret in ("SITE-A", "SITE-B", "onerror", "pilot-a", "cores"):
            assert secret not in body
        # No job id: no field that carries one (a bare "3," would also match a timestamp's digits).
        keys: set[str] = set()

        def collect(value):
            if isinstance(value, dict):
                keys.update(value)
                for item in value.values():
                    collect(item)
            elif isinstance(value, list):
                for item in value:
                    collect(item)
        collect(data)
        assert [k for k in keys if {"id", "ids", "job"} & set(k.lower().split("_"))] == []
    finally:
        server.stop()


def test_monitor_json_on_loopback(server, tokens):
    """The loopback monitor: per site, the last errors (the message as the wrapper wrote it: the page
    escapes it) and the waiting job no site can run, with why."""
    made = populate(server, tokens)
    status, _, body = get(f"http://127.0.0.1:{server.monitor_port}/api/monitor.json")
    data = json.loads(body)
    sites = {s["site"]: s for s in data["sites"]}
    assert sites["SITE-A"]["pilots"] == {"alive": 1, "busy": 1, "idle": 0, "empty": 0}
    assert sites["SITE-A"]["jobs"] == {"FAILED_EXECUTION": 1, "RUNNING": 1}
    assert sites["SITE-B"]["pilots"]["empty"] == 1
    assert [(e["job"], e["message"]) for e in data["errors"]] == [(made.failed, HOSTILE)]
    assert [(u["jobs"], u["oldest_job"]) for u in data["unrunnable"]] == [(1, made.huge)]
    assert "cores 64" in data["unrunnable"][0]["why"]
    server._monitor_server.monitor.sample()  # what the sampler thread does every 10 s
    status, _, body = get(f"http://127.0.0.1:{server.monitor_port}/api/monitor.json")
    assert json.loads(body)["history"][-1]["sites"] == {"SITE-A": 1}
    status, content_type, page = get(f"http://127.0.0.1:{server.monitor_port}/")
    assert status == 200 and content_type.startswith("text/html")
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing loaded from elsewhere
    request = urllib.request.Request(f"http://127.0.0.1:{server.monitor_port}/", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 405  # read-only


# ------------------------------------------------------------------ the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DomText(HTMLParser):
    """Cells of each table by id, the title, and the tags seen (from Chromium's --dump-dom)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_title = False
        self.text: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        ident = dict(attrs).get("id")
        if tag == "table":
            self._table = ident
            self.tables[ident] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "title":
            self._in_title = True
        elif tag == "p" and ident:
            self._id = ident

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._in_title = False
        elif tag == "p":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data
        if self._id:
            self.text[self._id] = self.text.get(self._id, "") + data


def chromium(tmp_path, url: str, *args: str) -> str:
    """Run headless Chromium on URL (its own profile under TMP_PATH, its own process group, removed after)."""
    profile = tmp_path / "chromium-profile"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args, url]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        try:  # its renderer and helpers share the group: none may outlive the test
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    shutil.rmtree(profile, ignore_errors=True)
    return out.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/install-system-deps.sh chromium)")
def test_the_monitor_page_in_a_real_browser(server, tokens, tmp_path):
    """Chromium runs the page against the broker: the DOM shows each site's pilots and jobs, the failure,
    the job no site can run; the hostile message is text (no <img>, no <b> element, the title unchanged,
    no table broken out of)."""
    made = populate(server, tokens)
    for _ in range(3):
        server._monitor_server.monitor.sample()  # what the sampler thread does every 10 s
    url = f"http://127.0.0.1:{server.monitor_port}/"
    dom = DomText()
    html = chromium(tmp_path, url, "--dump-dom")
    dom.feed(html)
    assert "polyline" in dom.tags and "running at SITE-A: 1" in html and "waiting (all): 1" in html
    assert dom.title == "splitpilot broker monitor"
    assert "img" not in dom.tags and "b" not in dom.tags and "script" in dom.tags  # only the page's own script
    sites = {row[0]: row for row in dom.tables["sites"][1:]}
    assert sites["SITE-A"][:6] == ["SITE-A", "enabled", "1", "1", "0", "0"]
    assert "RUNNING 1" in sites["SITE-A"][6] and "FAILED_EXECUTION 1" in sites["SITE-A"][7]
    assert sites["SITE-B"][5] == "1"  # the empty pilot
    errors = dom.tables["errors"][1:]
    assert [(row[0], row[1], row[2], row[4]) for row in errors] == [
        (str(made.failed), "SITE-A", "FAILED_EXECUTION", HOSTILE)]
    unrunnable = dom.tables["unrunnable"][1:]
    assert [row[1:3] for row in unrunnable] == [["1", str(made.huge)]] and "cores 64" in unrunnable[0][3]
    assert dom.tables["failures"][1:] == [["FAILED_EXECUTION", "1"]]
    assert "pilots alive 1" in dom.text["totals"] and "RUNNING 1" in dom.text["totals"]
    shot = tmp_path / "monitor.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1200,800", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("SPLITPILOT_MONITOR_SCREENSHOT"):  # docs/monitor.png is made this way
        shutil.copyfile(shot, os.environ["SPLITPILOT_MONITOR_SCREENSHOT"])


def test_the_history_ring_is_bounded(server):
    """The sampler keeps at most an hour of samples, however long the broker runs."""
    monitor = server._monitor_server.monitor
    for _ in range(monitor.settings.history + 20):
        monitor.sample()
    assert len(monitor.snapshot()["history"]) == monitor.settings.history


# ------------------------------------------------------------------ queue wait

def test_queue_wait_is_observed_once_per_assignment_by_the_pilots_site(tmp_path, ca_dir, tokens):
    """A job submitted, matched at SITE-B, requeued by an admin and matched again at SITE-A: one
    observation each, under each site's label, their sum between 0 and the time the test took; a Match
    that finds nothing, and a refused one (a disabled site), observe nothing. (The endpoint renders at
    most once a second: each check polls until the scrape shows the Match counters of that step.)"""
    admin = CertificateAuthority.load(ca_dir).new_token(TokenRole.ADMIN, "ops")
    server = start_server(tmp_path, ca_dir)
    clients = [BrokerClient(server.address, tokens.alice), AgentClient(server.address, tokens.agent_a),
               AgentClient(server.address, tokens.agent_b), AdminClient(server.address, admin)]
    alice, agent_a, agent_b, ops = clients

    def after(matched: int, empty: int, refused: int) -> dict[str, tuple[float, float]]:
        """{site: (count, sum)} of the queue wait, from the first scrape that counts these Match results."""
        want = {"matched": matched, "empty": empty, "refused": refused}

        def scraped() -> dict | None:
            got = samples(server)
            counted = {r: got.get(("splitpilot_match_requests_total", (("result", r),))) for r in want}
            return got if counted == want else None

        got = wait_for(scraped, 30, f"a scrape counting Match results {want}")
        return {dict(labels)["site"]: (value, got[("splitpilot_queue_wait_seconds_sum", labels)])
                for (name, labels), value in got.items() if name == "splitpilot_queue_wait_seconds_count"}

    try:
        assert after(0, 0, 0) == {}
        began = time.monotonic()
        job_id = alice.submit(job_pb2.JobSpec(executable="run.sh", name="q", requirements=WALLTIME))[0]
        assert isinstance(agent_b.match(SLOT, "pilot-b0", "node-b"), MatchedJob)      # the job: SITE-B
        first = after(1, 0, 0)
        assert first.keys() == {"SITE-B"} and first["SITE-B"][0] == 1
        assert 0 <= first["SITE-B"][1] <= time.monotonic() - began + 1   # + 1: the store keeps milliseconds
        assert isinstance(agent_a.match(SLOT, "pilot-a0", "node-a"), NoMatch)           # nothing waits
        assert after(1, 1, 0) == first

        ops.requeue(job_id, "to SITE-A")
        ops.set_site_state("SITE-B", "disabled", "test")
        assert isinstance(agent_b.match(SLOT, "pilot-b1", "node-b"), NoMatch)           # refused: disabled
        assert after(1, 1, 1) == first
        matched = agent_a.match(SLOT, "pilot-a1", "node-a")                               # the re-assignment
        assert isinstance(matched, MatchedJob) and matched.job_id == job_id and matched.attempt == 2
        second = after(2, 1, 1)
        assert second.keys() == {"SITE-A", "SITE-B"}
        assert second["SITE-B"] == first["SITE-B"] and second["SITE-A"][0] == 1
        assert first["SITE-B"][1] <= second["SITE-A"][1] <= time.monotonic() - began + 1
        bucket = samples(server)[("splitpilot_queue_wait_seconds_bucket", (("le", "604800.0"), ("site", "SITE-A")))]
        assert bucket == 1   # buckets reach a week: grid queues wait hours
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_queue_wait_site_labels_are_capped_and_cleaned():
    """More sites than MAX_SITES (a CA may issue any number) fold into "other"; a site name with a line
    break (the CA refuses one; the label is cleaned all the same) cannot forge a sample."""
    from broker.metrics import Metrics

    assert Metrics().site_label("EVIL\nsplitpilot_pilots_alive 99") == "EVIL?splitpilot_pilots_alive 99"
    metrics = Metrics()
    for i in range(MAX_SITES + 5):
        metrics.queued_for(f"SITE-{i:03d}", 1.0)
    metrics.queued_for("SITE-000", -5.0)   # clocks that disagree: counted as no wait, not a negative sum
    families = {s.labels.get("site"): s.value for family in text_string_to_metric_families(metrics.render().decode())
                for s in family.samples if s.name == "splitpilot_queue_wait_seconds_count"}
    assert len(families) == MAX_SITES + 1 and families[OTHER] == 5 and families["SITE-000"] == 2
