"""The factory's judgement and its clean-up, in the mini-condor against a real broker.

  useful or empty   a glidein that ran 4 jobs in well under a minute is useful (its batch's pilot record at
                    the broker says 4 jobs): no backoff; one that ran none is empty: backoff
  closed site       a draining site gets no glideins, and its idle glideins are removed with their spooled
                    agent tokens; jobs no glidein fits (64 cores) are not served; enabled again, glideins go
  Ctrl-C            `splitpilot factory run` interrupted: its idle glideins (and their spooled tokens) are
                    removed and it exits 130
  glidein remove    one batch's glideins, then the idle ones, listed with --json

Glideins that must stay idle ask for more memory than the pool's node has (they never start).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.test_glidein as glidein_tests
from condor_plugin.glidein.package import PackageBuilder
from tests.test_glidein import (
    factory_settings,
    spool_emptied,
    spooled_tokens,
    wait_for_glideins_to_finish,
    wait_until_final,
)

package = glidein_tests.package
site = glidein_tests.site

#: More than the mini-condor's node has: such a glidein stays idle.
NEVER_STARTS_MB = 1_000_000
REPO = Path(__file__).resolve().parents[1]


def quick_jobs(site, client, count: int, cores: int = 1) -> list[int]:
    from pilot.pipe import messages as m

    script = site.work / "quick.sh"
    script.write_text("#!/bin/sh\necho quick > quick.out\n")
    uploaded = client.upload(str(script), "quick.sh")
    return client.submit([m.JobSpec(name=f"quick-{i}", executable="./quick.sh", input_files=[uploaded],
                                    output_patterns=["*.out"], max_attempts=2,
                                    requirements=m.Requirements(cores=cores, memory_mb=128, disk_mb=16,
                                                                walltime_s=300)) for i in range(count)])


def queued(factory) -> list:
    return [g for g in factory.glideins(history=False) if g.status in (1, 2, 5)]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def clients(site):
    from pilot.api.client import AdminClient, BrokerClient
    from pilot.tokens import TokenRole

    admin = site.server.ca.new_token(TokenRole.ADMIN, "factory-test-admin")
    with BrokerClient(site.server.address, site.user, site.server.ca_pem) as client, \
            AdminClient(site.server.address, admin, site.server.ca_pem) as admin_client:
        yield client, admin_client, admin


def kill_waiting(client, ids) -> None:
    for job_id in ids:
        if not client.status(job_id).final:
            client.kill(job_id, "test over")


@pytest.mark.condor
@pytest.mark.slow
def test_a_short_glidein_that_ran_jobs_is_useful_and_one_that_ran_none_is_empty(site, clients):
    from condor_plugin.factory.brokerview import BrokerView
    from condor_plugin.factory.factory import Factory

    client, admin_client, _ = clients
    lines: list[str] = []
    settings = factory_settings(site, factory="judged", jobs_per_glidein=4)
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None),
                      progress=lines.append, broker=BrokerView(admin_client, "MINICONDOR", ca=site.server.ca,
                                                               factory="judged"))
    ids = quick_jobs(site, client, 4)
    started = time.monotonic()
    assert factory.run_once() == 1                     # 4 waiting jobs that fit, 4 per glidein
    wait_until_final(client, factory, ids, started)
    assert all(client.status(job_id).final for job_id in ids)
    (useful,) = wait_for_glideins_to_finish(factory)
    assert factory.run_once() == 0
    (glidein,) = [g for g in factory.glideins() if g.cluster == useful.cluster]
    print(f"\nthe glidein ran {glidein.ran_seconds} s for 4 jobs (idle timeout 10 s); lines: {lines}")
    assert factory.policy.backoff_s == 0, lines
    assert not [line for line in lines if "empty" in line or "backing off" in line], lines
    # One with nothing to do: the broker's record of its pilot says no job.
    empty = factory.submit(1)
    wait_for(lambda: [g for g in factory.glideins(history=False) if g.cluster == empty.cluster and g.status == 4],
             240, "the empty glidein to end")
    assert factory.run_once() == 0
    assert factory.policy.backoff_s == settings.backoff_initial_s, lines
    assert any(f"glidein {empty.cluster}.0 ran no job (empty)" in line for line in lines), lines
    glidein_tests.wait_for_glideins_to_leave(factory)


@pytest.mark.condor
@pytest.mark.slow
def test_a_closed_site_gets_no_glideins_and_its_idle_ones_leave_with_their_tokens(site, clients):
    from condor_plugin.factory.brokerview import BrokerView
    from condor_plugin.factory.factory import Factory

    client, admin_client, _ = clients
    lines: list[str] = []
    settings = factory_settings(site, factory="closed", memory_mb=NEVER_STARTS_MB, max_per_cycle=1)
    view = BrokerView(admin_client, "MINICONDOR", ca=site.server.ca, factory="closed")
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None),
                      progress=lines.append, broker=view)
    huge = quick_jobs(site, client, 2, cores=64)        # no glidein of this factory (1 core) fits them
    ids = quick_jobs(site, client, 1)
    try:
        assert factory.run_once() == 1
        assert any("2 waiting job(s) of the site fit no glidein" in line and "2 need cores 64 > 1" in line
                   for line in lines), lines
        (idle,) = queued(factory)
        assert idle.status == 1 and spooled_tokens(site, idle.cluster)
        assert view.site_state() == "enabled"
        admin_client.set_site_state("MINICONDOR", "draining", "factory test")
        assert view.site_state() == "draining"
        assert factory.run_once() == 0
        assert "the site is draining at the broker: no glideins; removing 1 idle glidein(s)" in lines
        wait_for(lambda: not queued(factory), 60, "the idle glidein to leave")
        assert spool_emptied(site, idle.cluster)                    # its agent token left with it
        assert factory.run_once() == 0 and not queued(factory)
        assert factory.policy.backoff_s == 0                        # removed by the factory: not a failure
        admin_client.set_site_state("MINICONDOR", "enabled", "factory test over")
        assert factory.run_once() == 1
        assert "the site is enabled at the broker again" in lines
    finally:
        admin_client.set_site_state("MINICONDOR", "enabled", "factory test over")
        factory.remove(reason="test over")
        kill_waiting(client, huge + ids)
        wait_for(lambda: not queued(factory), 60, "the glideins to leave")


@pytest.mark.condor
@pytest.mark.slow
def test_ctrl_c_on_factory_run_removes_its_idle_glideins_and_exits_130(site, clients, tmp_path):
    from condor_plugin.factory.factory import Factory

    client, _, admin = clients
    token = tmp_path / "admin.pem"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(admin.to_pem())
    ids = quick_jobs(site, client, 2)
    settings = factory_settings(site, factory="ctrlc", memory_mb=NEVER_STARTS_MB)
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    argv = [sys.executable, "-m", "apps", "factory", "run", "--site", "MINICONDOR", "--factory", "ctrlc",
            "--minicondor", str(site.pool.settings.state_dir), "--broker", site.server.address,
            "--ca", site.server.config.ca_path, "--admin-token", str(token), "--interval", "1",
            "--memory", str(NEVER_STARTS_MB), "--idle-timeout", "10s", "--lifetime", "30m"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        # Idle: submitted, and released from the schedd's spooling hold.
        glideins = wait_for(lambda: [g for g in queued(factory) if g.status == 1] if len(queued(factory)) == 2
                            and all(g.status == 1 for g in queued(factory)) else None, 120, "two idle glideins")
        assert all(spooled_tokens(site, g.cluster) for g in glideins)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "stopped by SIGINT: removed 2 idle glidein(s)" in err, err
    wait_for(lambda: not queued(factory), 60, "the removed glideins to leave")
    assert all(spool_emptied(site, g.cluster) for g in glideins)
    assert "Traceback" not in err
    kill_waiting(client, ids)


@pytest.mark.condor
@pytest.mark.slow
def test_glidein_remove_one_batch_then_the_idle_ones(site, capsys):
    from apps import factory_cli
    from condor_plugin.factory.factory import Factory
    from pilot.errors import UsageError

    settings = factory_settings(site, factory="removal", memory_mb=NEVER_STARTS_MB)
    factory = Factory(settings, site.pool.schedd(), site.server.ca, PackageBuilder(progress=lambda line: None))
    first, second = factory.submit(2), factory.submit(1)
    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    common = ["--site", "MINICONDOR", "--factory", "removal", "--minicondor", str(site.pool.settings.state_dir)]
    capsys.readouterr()
    args = parser.parse_args(["glidein", "remove", "--batch", first.batch, "--json", *common])
    assert args.handler(args) == 0
    removed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["cluster"], r["proc"], r["batch"], r["status"]) for r in removed) == [
        (first.cluster, 0, first.batch, "IDLE"), (first.cluster, 1, first.batch, "IDLE")]
    wait_for(lambda: [g.cluster for g in queued(factory)] == [second.cluster], 60, "batch 1 to leave")
    assert spool_emptied(site, first.cluster) and spooled_tokens(site, second.cluster)
    args = parser.parse_args(["glidein", "status", "--json", *common])
    assert args.handler(args) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(g["cluster"], g["status"]) for g in listed if g["status"] == "IDLE"] == [(second.cluster, "IDLE")]
    args = parser.parse_args(["glidein", "remove", "--batch", "no-such-batch", *common])
    with pytest.raises(UsageError, match="no glidein of batch 'no-such-batch'.*fix:"):
        args.handler(args)
    args = parser.parse_args(["glidein", "remove", "--idle", *common])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.strip() == f"removed 1 idle glidein(s): {second.cluster}.0"
    wait_for(lambda: not queued(factory), 60, "every glidein to leave")
    assert spool_emptied(site, second.cluster)
    args = parser.parse_args(["glidein", "remove", *common])
    assert args.handler(args) == 0
    assert "no glidein of factory removal for site MINICONDOR to remove" in capsys.readouterr().out
