"""The factory's decisions (condor_plugin.factory.policy) and the fit of waiting jobs
(condor_plugin.factory.brokerview),
without HTCondor, a broker or a clock: observations in, decisions out.

The factory shell against a fake schedd and a fake broker view is at the end: a glidein's end is judged by
the broker's pilot records of its batch's token, not by how long it ran.
"""

from __future__ import annotations

import datetime

import pytest
from htcondor2 import JobStatus

from condor_plugin.factory.brokerview import STARTUP_MARGIN_S, GlideinSlot, Waiting, count_waiting
from condor_plugin.factory.policy import FactoryPolicy, GlideinEnd, Observation, PolicySettings
from pilot.pipe import messages as m

SETTINGS = PolicySettings(max_queued=3, max_running=5, max_per_cycle=2, backoff_initial_s=30, backoff_max_s=900)


def ended(exit_code: int | None = 0, *, jobs: int = 0, ran: float = 5.0, status: int = JobStatus.COMPLETED,
          proc: int = 0, by_us: bool = False) -> GlideinEnd:
    return GlideinEnd(cluster=7, proc=proc, batch="b", status=status, exit_code=exit_code, ran_s=ran, jobs=jobs,
                      removed_by_us=by_us)


def observe(now: float, waiting: int = 0, idle: int = 0, running: int = 0, ends=(), **extra) -> Observation:
    return Observation(now=now, waiting_fit=waiting, idle=idle, running=running, ended=tuple(ends), **extra)


def test_bounded_by_queue_running_and_cycle():
    policy = FactoryPolicy(SETTINGS)
    assert policy.decide(observe(0, waiting=10)).submit == 2                     # max_per_cycle
    assert policy.decide(observe(1, waiting=10, idle=2)).submit == 1             # max_queued 3
    assert policy.decide(observe(2, waiting=10, idle=1, running=3)).submit == 1  # max_running 5 (idle count too)
    assert policy.decide(observe(3, waiting=10, idle=0, running=5)).submit == 0
    per_four = FactoryPolicy(PolicySettings(jobs_per_glidein=4))
    assert per_four.decide(observe(0, waiting=9)).submit == 3


def test_a_short_glidein_that_ran_jobs_is_not_empty():
    """The rule once looked at the run time only: 4 jobs in 20 s counted as an empty glidein."""
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(100, waiting=1, ends=[ended(jobs=4, ran=20)]))
    assert policy.backoff_s == 0 and decision.submit == 1 and not decision.messages


def test_empty_glideins_back_off_doubling_and_a_useful_one_resets():
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(100, waiting=1, ends=[ended(jobs=0, ran=3000)]))   # long, but ran nothing
    assert decision.submit == 0 and policy.backoff_s == 30
    assert "ran no job (empty)" in decision.messages[0] and "backing off 30 s" in decision.messages[0]
    assert "backing off 30 s more" in decision.messages[-1]
    assert policy.decide(observe(129, waiting=1)).submit == 0
    assert policy.decide(observe(131, waiting=1)).submit == 1
    for expected in (60, 120, 240, 480, 900, 900):
        policy.decide(observe(200, waiting=1, ends=[ended(jobs=0)]))
        assert policy.backoff_s == expected
    policy.decide(observe(300, waiting=1, ends=[ended(jobs=1)]))
    assert policy.backoff_s == 0
    assert policy.decide(observe(300 + 900, waiting=1)).submit == 1       # the pause already set runs out


@pytest.mark.parametrize("end", [ended(exit_code=1, jobs=3), ended(exit_code=3, jobs=0),
                                 ended(exit_code=None, status=JobStatus.REMOVED, jobs=0)], ids=["killed", "black-hole",
                                                                                      "removed"])
def test_failures_back_off_whatever_they_ran(end):
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(100, waiting=1, ends=[end]))
    assert decision.submit == 0 and policy.backoff_s == 30 and policy.refused is None
    assert "failed" in decision.messages[0] or "was removed" in decision.messages[0]


@pytest.mark.parametrize("code", [4, 5])
def test_refused_or_expired_tokens_back_off_to_the_maximum_at_once(code):
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(100, waiting=5, ends=[ended(exit_code=code)]))
    assert decision.submit == 0 and policy.backoff_s == 900 and policy.refused.exit_code == code
    assert f"ended with exit {code}" in decision.messages[-1]
    policy.decide(observe(200, waiting=5, ends=[ended(jobs=2, proc=1)]))   # a later good one: pause stays set
    assert policy.decide(observe(999, waiting=5)).submit == 0
    assert policy.decide(observe(1001, waiting=5)).submit == 2


def test_glideins_the_factory_removed_are_not_judged():
    policy = FactoryPolicy(SETTINGS)
    gone = ended(exit_code=None, status=JobStatus.REMOVED, by_us=True)
    decision = policy.decide(observe(100, waiting=1, ends=[gone]))
    assert decision.submit == 1 and policy.backoff_s == 0 and not decision.messages


def test_idle_glideins_beyond_the_waiting_jobs_are_removed():
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(0, waiting=1, idle=3))
    assert (decision.submit, decision.remove_idle) == (0, 2)
    assert "3 idle glidein(s) for 1 waiting job(s) that fit: removing 2" in decision.messages
    assert policy.decide(observe(1, waiting=0, idle=1)).remove_idle == 1
    assert policy.decide(observe(2, waiting=2, idle=1)).remove_idle == 0


@pytest.mark.parametrize("state", ["draining", "disabled", "draining or disabled"])
def test_a_closed_site_gets_no_glideins_and_loses_its_idle_ones(state):
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(0, waiting=10, idle=2, site_state=state))
    assert (decision.submit, decision.remove_idle) == (0, 2)
    assert decision.messages == (f"the site is {state} at the broker: no glideins; removing 2 idle glidein(s)",)
    assert policy.decide(observe(1, waiting=10, site_state=state)).messages == ()      # said once
    back = policy.decide(observe(2, waiting=10, site_state="enabled"))
    assert back.submit == 2 and back.messages == ("the site is enabled at the broker again",)
    # Not known (the factory could not ask): not held back.
    assert FactoryPolicy(SETTINGS).decide(observe(0, waiting=1, site_state="unknown")).submit == 1


def test_unfit_jobs_are_said_once_and_not_served():
    policy = FactoryPolicy(SETTINGS)
    decision = policy.decide(observe(0, waiting=0, waiting_unfit=3, unfit_reason="3 need memory_mb 512000 > 2048"))
    assert decision.submit == 0
    assert decision.messages == ("3 waiting job(s) of the site fit no glidein of this factory (3 need memory_mb "
                                 "512000 > 2048): no glidein is sent for them",)
    assert policy.decide(observe(1, waiting_unfit=3, unfit_reason="3 need memory_mb 512000 > 2048")).messages == ()


# ---------------------------------------------------------------------------------------- fit

SLOT = GlideinSlot(cores=2, memory_mb=2048, disk_mb=4096, time_s=6 * 3600 - STARTUP_MARGIN_S, site="A",
                   containers=False)


def spec(**requirements) -> m.JobSpec:
    base = dict(cores=1, memory_mb=512, disk_mb=100, walltime_s=3600)
    return m.JobSpec(executable="x", requirements=m.Requirements(**(base | requirements)))


@pytest.mark.parametrize(("requirements", "unmet"), [
    ({}, []),
    ({"cores": 0}, []),
    ({"cores": 64}, ["cores 64 > 2"]),
    ({"memory_mb": 500_000}, ["memory_mb 500000 > 2048"]),
    ({"disk_mb": 5000}, ["disk_mb 5000 > 4096"]),
    ({"walltime_s": 6 * 3600}, [f"walltime_s 21600 > {6 * 3600 - STARTUP_MARGIN_S} (the glidein lifetime less "
                                f"{STARTUP_MARGIN_S} s)"]),
    ({"platform": "el9-x86_64"}, ["platform 'el9-x86_64' not offered"]),
    ({"container_image": "/img"}, ["a container (the glideins run with --container-policy off)"]),
    ({"sites_allowed": ["B"]}, ["sites_allowed does not name A"]),
    ({"sites_denied": ["A"]}, ["sites_denied names A"]),
])
def test_slot_says_which_requirement_it_does_not_meet(requirements, unmet):
    assert SLOT.unmet(spec(**requirements).requirements) == unmet


def test_waiting_jobs_split_into_fit_and_unfit_with_the_main_reason():
    specs = [spec(), spec(), spec(memory_mb=500_000), spec(memory_mb=600_000), spec(cores=64),
             spec(sites_allowed=["B"])]                         # another site's: not this site's to serve
    found = count_waiting(specs, SLOT, "A")
    assert found == Waiting(fit=2, unfit=3, reason="2 need memory_mb 500000 > 2048; 1 for other reasons")
    assert count_waiting([spec()], SLOT, "A") == Waiting(fit=1)


# ---------------------------------------------------------------------------------------- the factory shell

class FakeBrokerView:
    """The broker's answers the factory asks for: waiting jobs, pilot records, the site's state."""

    def __init__(self) -> None:
        self.fit = 0
        self.state = "enabled"
        self.records = []

    def waiting(self, slot):
        return Waiting(fit=self.fit)

    def pilots(self, seen_within_s):
        return list(self.records)

    def site_state(self):
        return self.state


@pytest.fixture
def shell(tmp_path, monkeypatch):
    from broker.ca import CertificateAuthority
    from condor_plugin.factory.factory import Factory, FactorySettings
    from condor_plugin.glidein.package import GlideinSettings, PackageBuilder
    from tests.test_glidein import FakeSchedd

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    settings = FactorySettings(work_dir=tmp_path / "f", site="S", glidein=GlideinSettings(broker="127.0.0.1:1"),
                               max_queued=3, max_per_cycle=2, lifetime=datetime.timedelta(hours=1))
    schedd, broker = FakeSchedd(), FakeBrokerView()
    factory = Factory(settings, schedd, CertificateAuthority.create(), PackageBuilder(progress=lambda line: None),
                      broker=broker)
    factory._package = PackageBuilder(progress=lambda line: None).ensure()
    return factory, schedd, broker


def pilot_record(serial: str, jobs: int, pilot_id: str, end_reason: str = "idle"):
    from pilot.api.client import PilotInfo

    moment = datetime.datetime.now(datetime.UTC)
    return PilotInfo(pilot_id, "S", "node", moment, moment, jobs, end_reason, serial)


def test_factory_judges_an_ended_glidein_by_its_pilot_record(shell):
    """A glidein that ran 4 jobs in 20 s: its batch's pilot record (found by the serial of the token the
    factory minted) says 4 jobs, so no backoff; an empty one of the same batch backs off."""
    factory, schedd, broker = shell
    broker.fit = 2
    assert factory.run_once(now=1000) == 2
    (batch,) = factory.batch_serials()
    serial = factory.batch_serials()[batch]
    assert len(serial) > 8 and all(ad["SplitpilotBatch"] == batch for ad in schedd.ads)
    schedd.ads[0] |= {"JobStatus": JobStatus.COMPLETED, "JobStartDate": 1000, "CompletionDate": 1020, "ExitCode": 0}
    broker.records = [pilot_record(serial, 4, "p1"), pilot_record("other", 0, "p9", "empty"),
                      pilot_record(serial, 0, "p2", end_reason="")]        # still running: not ended
    assert factory.run_once(now=1030) == 1 and factory.policy.backoff_s == 0
    schedd.ads[0] |= {"JobStatus": JobStatus.COMPLETED, "JobStartDate": 1000, "CompletionDate": 1100, "ExitCode": 0}
    broker.records = [pilot_record(serial, 4, "p1"), pilot_record(serial, 0, "p2", "empty")]
    assert factory.run_once(now=1110) == 0 and factory.policy.backoff_s == 30


def test_factory_removes_idle_glideins_of_a_closed_site_and_does_not_judge_them(shell):
    factory, schedd, broker = shell
    broker.fit = 2
    assert factory.run_once(now=1000) == 2
    broker.state = "draining or disabled"
    assert factory.run_once(now=1010) == 0
    assert len(schedd.removed) == 1 and f"JobStatus == {JobStatus.IDLE:d}" in schedd.removed[0][0]
    assert "ProcId == 0" in schedd.removed[0][0] and "ProcId == 1" in schedd.removed[0][0]
    assert factory.loop_state.removed_by_us == {(1, 0), (1, 1)}
    schedd.done += [ad | {"JobStatus": JobStatus.REMOVED} for ad in schedd.ads]
    schedd.ads = []
    broker.state = "enabled"
    assert factory.run_once(now=1020) == 2 and factory.policy.backoff_s == 0


# ---------------------------------------------------------------------------------------- the real broker

def test_broker_view_against_a_real_broker(tmp_path):
    """Waiting jobs that fit, pilot records, the site's state from ListSites; a factory whose CA is not the
    broker's is told so (its glideins' tokens would be refused alike)."""
    from broker.ca import CertificateAuthority
    from broker.server import BrokerConfig, BrokerServer
    from condor_plugin.factory.brokerview import BrokerView, SiteStateUnknown
    from pilot.api.client import AdminClient, BrokerClient
    from pilot.tokens import TokenRole

    server = BrokerServer(BrokerConfig(state_dir=str(tmp_path / "broker"), listen="127.0.0.1:0"))
    server.start()
    try:
        user = server.ca.new_token(TokenRole.USER, "someone")
        admin = server.ca.new_token(TokenRole.ADMIN, "admin")
        with BrokerClient(server.address, user, server.ca_pem) as client, \
                AdminClient(server.address, admin, server.ca_pem) as admin_client:
            client.submit([spec(), spec(cores=64), spec(sites_allowed=["B"])])
            view = BrokerView(admin_client, "A", ca=server.ca, factory="t")
            assert view.waiting(SLOT) == Waiting(fit=1, unfit=1, reason="1 need cores 64 > 2")
            assert view.site_state() == "enabled"                         # no record of A at all
            admin_client.set_site_state("A", "disabled", "test")
            assert view.site_state() == "disabled"
            admin_client.set_site_state("A", "draining", "test")
            assert view.site_state() == "draining"
            assert view.pilots(60) == []                                   # reading leaves no pilot record
            foreign = BrokerView(admin_client, "A", ca=CertificateAuthority.create(), factory="t")
            with pytest.raises(SiteStateUnknown, match="factory's --ca is not the broker's CA"):
                foreign.site_state()
    finally:
        server.stop()
