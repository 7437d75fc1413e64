"""Glidein faults in the mini-condor: preemption, and agent tokens the broker refuses or that expired.

The `condor` tests use a real pool and a real broker (test_glidein's `site`
fixture, one pool for this module):

  preemption     condor_vacate_job (htcondor2 JobAction.Vacate) of a running
                 glidein, after a factory cycle and `glidein status` ran (their
                 clean-up once removed the batch's token, and the evicted
                 glidein went HELD: input file missing): the starter sends
                 SIGTERM, the startup script passes it to the agent, which
                 stops its job and reports it; the broker re-queues it, and
                 the glidein (idle again, then restarted from its spooled
                 inputs) runs it to the end as attempt 2.
  foreign CA     glideins whose tokens come from another CA than the broker's:
                 the agent says so and leaves with exit 4 within seconds, and
                 a factory loop stops submitting (longest backoff) instead of
                 sending a glidein after each short pause.
  expired token  a glidein that starts with an expired token: exit 5, said in
                 its log, and the factory backs off likewise.

The factory's reaction is also tested against a fake schedd (no pool).
"""

from __future__ import annotations

import datetime
import time

import pytest
from htcondor2 import JobStatus

import tests.test_glidein as glidein_tests
from condor_plugin.glidein.package import TOKEN_NAME, PackageBuilder
from tests.test_glidein import (
    PAYLOAD,
    TIMEOUT,
    batch_logs,
    check_outputs,
    factory_settings,
    wait_for_glideins_to_leave,
    wait_until_final,
)

# test_glidein's fixtures, re-exported: this module gets its own pool (`site` is module-scoped).
package = glidein_tests.package
site = glidein_tests.site
fake_factory = glidein_tests.fake_factory

#: Attempt 1 is preempted while it sleeps; attempt 2 counts the words (test_glidein's payload).
PREEMPTIBLE = PAYLOAD.replace("set -e\n", 'set -e\n[ "$SPLITPILOT_ATTEMPT" != 1 ] || exec sleep 600\n', 1)


def glidein_err(directory, glidein) -> str:
    path = directory / "log" / f"glidein.{glidein.cluster}.{glidein.proc}.err"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_end(factory, cluster: int, timeout: float = 150.0):
    """The glidein of CLUSTER once it left the queue (from the history), its output retrieved first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        factory.collect()
        ended = [g for g in factory.glideins() if g.cluster == cluster and g.status in (3, 4)]
        if ended and not [g for g in factory.glideins(history=False) if g.cluster == cluster]:
            return ended[0]
        time.sleep(1.0)
    raise AssertionError(f"glidein cluster {cluster} still queued after {timeout:.0f} s")


@pytest.mark.condor
@pytest.mark.slow
def test_vacated_glidein_job_is_requeued_and_done_at_a_later_attempt(site, capsys):
    """Evicted after a factory cycle and `glidein status` ran: it starts again from its spooled inputs."""
    import argparse
    import hashlib

    import htcondor2

    from apps import factory_cli
    from condor_plugin.factory.factory import Factory
    from pilot.api.client import BrokerClient
    from pilot.api.states import JobState
    from pilot.pipe import messages as m

    settings = factory_settings(site, factory="vacate")
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client:
        script_path = site.work / "preemptible.sh"
        script_path.write_text(PREEMPTIBLE)
        words = " ".join(f"v{n}" for n in range(7)) + "\n"
        (site.work / "words-vacate.txt").write_text(words)
        (job_id,) = client.submit([m.JobSpec(
            name="preemptible", executable="./preemptible.sh", output_patterns=["*.out"], max_attempts=3,
            input_files=[client.upload(str(script_path), "preemptible.sh"),
                         client.upload(str(site.work / "words-vacate.txt"), "words.txt")],
            requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=64, walltime_s=900))])
        batch = factory.submit(1)
        started = time.monotonic()
        while client.status(job_id).state is not JobState.RUNNING:
            assert time.monotonic() - started < TIMEOUT, batch_logs(batch.directory)
            assert factory.glideins(history=False), "the glidein left\n" + batch_logs(batch.directory)
            time.sleep(0.5)
        assert client.status(job_id).attempt == 1
        # What runs on the factory side while the glidein runs: a cycle, and `glidein status`. Neither may
        # take away what the glidein needs to start again (its clean-up once removed the batch's token).
        assert factory.run_once(waiting=0) == 0
        parser = argparse.ArgumentParser()
        factory_cli.register(parser.add_subparsers())
        args = parser.parse_args(["glidein", "status", "--site", "MINICONDOR", "--factory", "vacate",
                                  "--minicondor", str(site.pool.settings.state_dir)])
        assert args.handler(args) == 0
        assert f"{batch.cluster}.0  RUNNING" in capsys.readouterr().out
        assert not list(settings.work_dir.rglob(TOKEN_NAME))     # never was one after the submit
        # condor_vacate_job: SIGTERM from the starter, the glidein goes back to idle (not removed).
        site.pool.schedd().act(htcondor2.JobAction.Vacate, f"ClusterId == {batch.cluster}")
        vacated = time.monotonic()
        wait_until_final(client, factory, [job_id], vacated)
        status = client.status(job_id)
        history = "\n".join(f"  {e.state.name} attempt {e.attempt}: {e.detail}" for e in status.history)
        print(f"\nvacated -> final in {time.monotonic() - vacated:.1f} s:\n{history}")
        check_outputs(site, client, {job_id: (7, hashlib.sha256(words.encode()).hexdigest())},
                      history + "\n" + batch_logs(batch.directory))
        assert status.attempt >= 2, history
        # Attempt 1 ended by the agent's own report of the SIGTERM (the script forwarded it), not by the reaper.
        (requeued,) = [e for e in status.history if e.attempt == 1 and e.state is JobState.WAITING]
        assert "STOP_REASON_PREEMPTED" in requeued.detail and "re-queued" in requeued.detail, history
        assert "signal SIGTERM" in requeued.detail, history
        wait_for_glideins_to_leave(factory, timeout=90)
        log = (batch.directory / "log" / f"glidein.{batch.cluster}.0.log").read_text()
        assert "Job was evicted" in log and log.count("Job executing on host") >= 2, log
        (glidein,) = [g for g in factory.glideins() if g.cluster == batch.cluster]
        assert glidein.status == JobStatus.COMPLETED and glidein.exit_code == 0
        assert "the agent left with code 0" in glidein_err(batch.directory, glidein)


@pytest.mark.condor
@pytest.mark.slow
def test_foreign_ca_glideins_fail_fast_and_the_factory_stops_submitting(site):
    from broker.ca import CertificateAuthority
    from condor_plugin.factory.factory import Factory, waiting_jobs_for_site
    from pilot.api.client import AdminClient, BrokerClient
    from pilot.pipe import messages as m
    from pilot.tokens import TokenRole

    foreign = CertificateAuthority.create()     # the factory's CA is not the broker's
    # One glidein at a time (the loop counts only idle glideins against waiting jobs: with several, how many
    # it sends before the first one fails depends on how fast they start), and a short ordinary backoff:
    # without the credentials rule a new glidein would follow each failed one within 5-20 s (3 or more in
    # the loop's 60-90 s); with it, the first failure stops the submissions.
    settings = factory_settings(site, factory="foreign", max_running=1, backoff_initial_s=5.0,
                                backoff_max_s=900.0)
    lines: list[str] = []
    factory = Factory(settings, site.pool.schedd(), foreign, PackageBuilder(progress=lambda line: None),
                      progress=lines.append)
    admin = site.server.ca.new_token(TokenRole.ADMIN, "faults-admin")
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client, \
            AdminClient(site.server.address, admin, site.server.ca_pem) as admin_client:
        sleeper = site.work / "waiting.sh"
        sleeper.write_text("#!/bin/sh\ntrue\n")
        (job_id,) = client.submit([m.JobSpec(
            name="waiting", executable="./waiting.sh", input_files=[client.upload(str(sleeper), "waiting.sh")],
            requirements=m.Requirements(cores=1, memory_mb=128, disk_mb=16, walltime_s=300))])
        try:
            submitted = 0
            started = time.monotonic()
            alarmed_at = None
            # The loop as `factory run` runs it, once a second: until 20 s after the alarm (60-90 s in all).
            while time.monotonic() - started < 90 and (alarmed_at is None or time.monotonic() - alarmed_at < 20
                                                        or time.monotonic() - started < 60):
                waiting = waiting_jobs_for_site(admin_client, "MINICONDOR")
                assert waiting >= 1
                submitted += factory.run_once(waiting)
                if alarmed_at is None and any("ATTENTION" in line for line in lines):
                    alarmed_at = time.monotonic()
                time.sleep(1.0)
            factory.collect()      # the last glidein's log, if it ended after the last cycle
            glideins = factory.glideins()
            alarm_s = f"{alarmed_at - started:.0f} s" if alarmed_at else "never"
            print(f"\n{submitted} glidein(s) submitted in {time.monotonic() - started:.0f} s; alarm after "
                  f"{alarm_s}:", *lines[:6], sep="\n  ")
            assert 1 <= submitted <= 2 and len({g.cluster for g in glideins}) == submitted, "\n".join(lines)
            assert alarmed_at is not None, "no credentials alarm\n" + "\n".join(lines)
            assert factory.policy.backoff_s == 900.0 and factory.policy.not_before > time.time() + 800
            (alarm,) = [line for line in lines if "ATTENTION" in line]
            assert "exit 4" in alarm and "REFUSES THIS FACTORY'S AGENT TOKENS" in alarm and "--ca" in alarm
            assert any("backing off" in line and "exit 4" in line for line in lines)   # said again each cycle
            ended = [g for g in glideins if g.status == JobStatus.COMPLETED]
            assert ended and all(g.exit_code == 4 for g in ended)
            directory = settings.work_dir / "batches" / ended[0].batch
            err = glidein_err(directory, ended[0])
            print(*(line for line in err.splitlines() if "refused" in line or "code 4" in line), sep="\n")
            assert "the broker refused this agent token" in err and "different CAs" in err, err
            assert "fix:" in err and "the agent left with code 4" in err, err
            assert "PRIVATE KEY" not in err
            # Quick: three refusals a few seconds apart, not the 10 s idle timeout of backing off.
            assert "1 of 3 refusals" in err and "2 of 3 refusals" in err and "leaving: idle" not in err
            assert not list((settings.work_dir / "batches").glob(f"*/{TOKEN_NAME}"))   # cleaned
        finally:
            if factory.glideins(history=False):
                factory.remove_all("test over")
            wait_for_glideins_to_leave(factory, timeout=90)
            client.kill(job_id, "test over")


class ShortLivedTokens:
    """The broker's CA, minting agent tokens that live TTL only (a glidein queued longer than its token)."""

    def __init__(self, ca, ttl: datetime.timedelta) -> None:
        self.ca, self.ttl, self.policy = ca, ttl, ca.policy

    def new_token(self, role, subject, **kwargs):
        return self.ca.new_token(role, subject, **(kwargs | {"ttl": self.ttl}))


@pytest.mark.condor
@pytest.mark.slow
def test_expired_token_glidein_says_so_and_exits_5(site):
    from condor_plugin.factory.factory import Factory

    settings = factory_settings(site, factory="expired")
    lines: list[str] = []
    factory = Factory(settings, site.pool.schedd(), ShortLivedTokens(site.server.ca, datetime.timedelta(seconds=1)),
                      PackageBuilder(progress=lambda line: None), progress=lines.append)
    assert factory.run_once(waiting=0) == 0      # the loop starts (glideins ended before do not count)
    batch = factory.submit(1)                    # its token expires before the glidein starts
    glidein = wait_for_end(factory, batch.cluster)
    err = glidein_err(batch.directory, glidein)
    print("\n" + "\n".join(line for line in err.splitlines() if "expired" in line))
    assert glidein.status == JobStatus.COMPLETED and glidein.exit_code == 5, batch_logs(batch.directory)
    assert "the agent token has expired (valid until" in err and "fix:" in err, err
    assert "the agent left with code 5" in err and "PRIVATE KEY" not in err
    assert factory.run_once(waiting=3) == 0
    assert factory.policy.backoff_s == settings.backoff_max_s
    (alarm,) = [line for line in lines if "ATTENTION" in line]
    assert "exit 5" in alarm and "expired" in alarm and "clocks" in alarm


# ---------------------------------------------------------------------------
# The factory's reaction, against a fake schedd (no pool)

def finished(ad: dict, exit_code: int, ran: int = 8) -> dict:
    return ad | {"JobStatus": JobStatus.COMPLETED, "JobStartDate": 1000, "CompletionDate": 1000 + ran,
                 "ExitCode": exit_code}


@pytest.mark.parametrize(("exit_code", "words"), [(4, "REFUSES THIS FACTORY'S AGENT TOKENS"), (5, "expired")])
def test_factory_backs_off_to_the_maximum_on_refused_tokens(fake_factory, monkeypatch, exit_code, words):

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    lines: list[str] = []
    factory.progress = lines.append
    assert factory.run_once(waiting=1, now=1000) == 1
    schedd.done.append(finished(schedd.ads.pop(), exit_code))
    assert factory.run_once(waiting=5, now=1010) == 0
    assert factory.policy.backoff_s == factory.settings.backoff_max_s == 900
    (alarm,) = [line for line in lines if line.startswith("ATTENTION")]
    assert f"exit {exit_code}" in alarm and words in alarm and "Not submitting glideins for 900 s" in alarm
    # Each later cycle says why it waits; an ordinary short-lived glidein does not shorten the pause.
    schedd.done.append({"ClusterId": 99, "ProcId": 0, "SplitpilotBatch": "x", "EnteredCurrentStatus": 0}
                       | finished({}, 0, ran=3))
    assert factory.run_once(waiting=5, now=1100) == 0
    assert f"exit {exit_code}" in lines[-1] and "backing off" in lines[-1]
    assert factory.run_once(waiting=5, now=1900) == 0
    assert factory.run_once(waiting=5, now=2100) == 2         # after the longest backoff


def test_factory_ordinary_failures_still_back_off_gradually(fake_factory, monkeypatch):

    monkeypatch.setattr("condor_plugin.factory.factory.to_submit", lambda d: dict(d))
    factory, schedd = fake_factory
    assert factory.run_once(waiting=1, now=1000) == 1
    schedd.done.append(finished(schedd.ads.pop(), 1))           # any other failure: the usual doubling
    assert factory.run_once(waiting=1, now=1010) == 0
    assert factory.policy.backoff_s == factory.settings.backoff_initial_s
    assert factory.policy.refused is None
