"""Configuration files (`--config FILE`) of `broker serve`, `agent` and the factory, `config show`, the
example files and systemd units in contrib/: real processes, hostile and careless files."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import tomllib
from types import SimpleNamespace

import pytest

from broker.ca import CertificateAuthority
from pilot.api.client import AgentClient, NoMatch
from pilot.tokens import TokenRole
from tests.test_broker_cli import BIN, SLOT, run, run_to_done, write_job_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUSECRET\n-----END CERTIFICATE-----\n"


def wait(condition, timeout: float, what: str):
    """Poll CONDITION until it returns something true, or fail naming WHAT."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def show(target: str, *options: str) -> dict:
    result = run("config", "show", "--json", "--for", target, *options)
    assert result.returncode == 0, result.stderr
    return {r["key"]: r for r in json.loads(result.stdout)["settings"]}


# ------------------------------------------------------------------ the broker from a file alone

def test_a_broker_started_with_only_a_config_file_serves_a_job(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "broker.toml"
    log_path = tmp_path / "broker.log"
    config.write_text(f'[broker]\nstate_dir = "{state}"\nlisten = "127.0.0.1:0"\nreap_interval = "1s"\n'
                      'max_file_size = "1M"\nmax_outputs = 7\ngrace = 1\nempty_retry = "7s"\n'
                      f'log_file = "{log_path}"\n')
    process = subprocess.Popen([str(BIN), "broker", "serve", "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait(lambda: (state / "address").exists() or process.poll() is not None, 60, "the broker to start")
        assert process.poll() is None, log_path.read_text()
        assert log_path.stat().st_mode & 0o077 == 0   # the log file from the config: private
        # The file's settings are the ones in force (the defaults are 2 GiB and 5s).
        wait(lambda: "ready:" in log_path.read_text(), 30, "the broker's ready line")
        assert "limits 1 MiB per file" in log_path.read_text() and "reaper every 1s" in log_path.read_text()
        address = (state / "address").read_text().strip()
        token = tmp_path / "alice.pem"
        assert run("token", "issue", "--ca", str(state / "ca"), "--role", "user", "--subject", "alice",
                   "--out", str(token)).returncode == 0
        client = tmp_path / "client.toml"
        client.write_text(f'[client]\nbroker = "{address}"\ntoken = "{token}"\n')
        ca = CertificateAuthority.load(str(state / "ca"))
        # A service setting from the file: an empty match tells the agent to come back in 7 s (default 30).
        agent_token = ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
        with AgentClient(address, agent_token) as agent:
            empty = agent.match(SLOT, "pilot-0", "node-0")
        assert isinstance(empty, NoMatch) and empty.retry_after_s == 7
        submitted = run("job", "submit", write_job_file(tmp_path), "--config", str(client))
        assert submitted.returncode == 0, submitted.stderr
        job_id = run_to_done(SimpleNamespace(address=address, ca=ca), tmp_path)
        status = run("job", "status", str(job_id), "--config", str(client))
        assert status.returncode == 0 and "state:     DONE" in status.stdout, status.stdout + status.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    assert code == 0   # the clean stop on SIGTERM the systemd unit relies on


def test_flags_override_the_file_and_show_says_where_each_value_came_from(tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nstate_dir = "{tmp_path}/s"\nlisten = "0.0.0.0:7443"\nhost_name = ["b.example.org"]\n'
                      'heartbeat_timeout = 600\n')
    settings = show("broker", "--config", str(config), "--listen", "127.0.0.1:9999")
    assert settings["listen"] == {"key": "listen", "flag": "--listen", "value": "127.0.0.1:9999", "source": "flag"}
    assert settings["state_dir"]["source"] == f"file:{config}:broker.state_dir"
    assert settings["host_name"]["value"] == ["b.example.org"]
    assert settings["heartbeat_timeout"]["value"] == "600s"     # whole seconds, as the flag would take them
    assert settings["grace"] == {"key": "grace", "flag": "--grace", "value": "5s", "source": "default"}
    human = run("config", "show", "--for", "broker", "--config", str(config))
    assert human.returncode == 0 and "file:" in human.stdout and "default" in human.stdout
    assert not (tmp_path / "s").exists()   # show starts nothing


@pytest.mark.parametrize("target, argv", [
    ("broker", ("broker", "serve")), ("agent", ("agent",)), ("factory", ("factory", "run")),
    ("factory", ("glidein", "submit"))])
def test_every_option_of_each_command_is_a_key_of_its_file(target, argv):
    """No setting is reachable only by a flag: each long option (but --config and one-shot ones) is a key."""
    from apps.cli import build_parser

    parser = build_parser()
    for word in argv:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    flags = {f.lstrip("-").replace("-", "_") for a in parser._actions for f in a.option_strings
             if f.startswith("--") and a.dest not in ("help", "config", "dry_run", "count")}
    assert flags - set(show(target)) == set()
    documented = (ROOT / "docs" / "operations.md").read_text()
    assert [key for key in sorted(flags) if f"| `{key}` |" not in documented] == []
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{argv} {action.option_strings} has no help text"


# ------------------------------------------------------------------ hostile and careless files

@pytest.mark.parametrize("text, key, words", [
    ('[broker]\nstate_dir = "S"\nmax_atempts = 3\n', "broker.max_atempts", "did you mean 'max_attempts'"),
    ('[broker]\nstate_dir = "S"\nmax_attempts = "three"\n', "broker.max_attempts", "expected a whole number"),
    ('[broker]\nstate_dir = "S"\ngrace = "-5s"\n', "broker.grace", "not a duration"),
    ('[broker]\nstate_dir = "S"\ngrace = -5\n', "broker.grace", "not a duration"),
    ('[broker]\nstate_dir = "S"\nmax_attempts = 0\n', "broker.max_attempts", "at least 1"),
    ('[broker]\nstate_dir = "S"\nheartbeat_timeout = "1s"\n', "broker.heartbeat_timeout", "shorter than wrappers"),
    ('[broker]\nstate_dir = "S"\nmetrics_public = "yes"\n', "broker.metrics_public", "expected true or false"),
    ('[broker]\nstate_dir = "S"\nmax_file_size = "lots"\n', "broker.max_file_size", "is not a size"),
    ('[broker]\nstate_dir = "S"\nlog_level = "loud"\n', "broker.log_level", "not one of"),
    ('[brokr]\nstate_dir = "S"\n', "brokr", "did you mean 'broker'"),
    ('[broker]\nstate_dir = "S"\nhost_name = "b.example.org"\n', "broker.host_name", "expected an array"),
    ('[broker\n', "(syntax)", "not valid TOML"),
])
def test_broker_config_mistakes_are_refused_naming_file_and_key_and_nothing_starts(tmp_path, text, key, words):
    config = tmp_path / "broker.toml"
    config.write_text(text.replace('"S"', f'"{tmp_path}/state"'))
    result = run("broker", "serve", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{config}: {key}:" in result.stderr and words in result.stderr and "fix:" in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()   # refused before the state dir, CA or database


def test_a_token_inline_instead_of_its_path_is_refused_and_never_echoed(tmp_path):
    work = tmp_path / "work"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nbroker = "127.0.0.1:1"\nwork_dir = "{work}"\ntoken = """{PEM}"""\n')
    result = run("agent", "--config", str(config), timeout=60)
    assert result.returncode == 2
    assert f"{config}: agent.token: holds a credential itself" in result.stderr and "chmod 600" in result.stderr
    assert "SECRET" not in result.stderr + result.stdout and not work.exists()
    # The same in the factory's file (an admin token and a SciToken are paths too).
    factory = tmp_path / "factory.toml"
    factory.write_text(f'[factory]\nsite = "S"\nadmin_token = """{PEM}"""\nscitoken = "a\\nb"\n')
    result = run("factory", "run", "--config", str(factory), timeout=60)
    assert result.returncode == 2 and "factory.admin_token: holds a credential" in result.stderr
    assert "factory.scitoken: holds a credential" in result.stderr and "SECRET" not in result.stderr


def test_a_required_setting_missing_from_flags_and_file_names_both(tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nlisten = "127.0.0.1:0"\n')
    result = run("broker", "serve", "--config", str(config), timeout=60)
    assert result.returncode == 2 and "--state-dir is required" in result.stderr
    assert f"state_dir in {config} under [broker]" in result.stderr


def test_an_unreadable_config_file_is_named(tmp_path):
    result = run("broker", "serve", "--config", str(tmp_path / "nope.toml"), timeout=60)
    assert result.returncode == 2 and f"{tmp_path}/nope.toml: (file): cannot read it" in result.stderr


# ------------------------------------------------------------------ the agent from a file

def test_an_agent_dry_run_from_a_config_file_shows_its_binds_and_runtime(tmp_path):
    site = tmp_path / "site-data"
    site.mkdir()
    work = tmp_path / "work"
    jobfile = tmp_path / "job.toml"
    jobfile.write_text('[job]\nname = "probe"\nexecutable = "run.sh"\n[job.requirements]\nwalltime = "1h"\n')
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nwork_dir = "{work}"\ncontainer_policy = "off"\nruntimes = "namespace"\n'
                      f'bind = ["{site}:/site/data"]\nplatform = ["el9"]\nblack_hole = 2\n')
    result = run("agent", "--config", str(config), "--dry-run", str(jobfile), timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(site) in result.stdout and "/site/data" in result.stdout, result.stdout
    settings = show("agent", "--config", str(config), "--black-hole", "5")
    assert settings["black_hole"]["value"] == 5 and settings["black_hole"]["source"] == "flag"
    assert settings["platform"]["value"] == ["el9"] and settings["runtimes"]["value"] == "namespace"
    # A bind the launcher owns is refused in the file, naming the key and item, before any work dir exists.
    config.write_text(f'[agent]\nwork_dir = "{tmp_path}/other"\nbind = ["/data", "/x:/workdir"]\n')
    result = run("agent", "--config", str(config), "--dry-run", str(jobfile), timeout=60)
    assert result.returncode == 2 and f"{config}: agent.bind[1]:" in result.stderr and "/workdir" in result.stderr
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ the factory from a file

def test_the_factory_file_reaches_the_submit_description_and_the_agents_command_line(tmp_path):
    from apps import factory_cli
    from apps.cli import build_parser
    from condor_plugin.glidein.package import GlideinPackage, GlideinSettings, render_script
    from submit import build_description

    scitoken = tmp_path / "ce.scitoken"
    scitoken.write_text("not read here\n")
    config = tmp_path / "factory.toml"
    config.write_text(f'[factory]\nsite = "SITE-A"\nbroker = "broker.example.org:7443"\nca = "{tmp_path}/ca"\n'
                      f'work_dir = "{tmp_path}/work"\nce = "ce.example.org:9620"\nscitoken = "{scitoken}"\n'
                      'submit_line = ["accounting_group = group_pilots.site_a", "+ProjectName = \\"alice\\""]\n'
                      'bind = ["/data/site:/site/data"]\nsoftware_dir = "/cvmfs/sw.example.org/sp"\n'
                      'platform = ["el9"]\nblack_hole = 4\nstop_deadline = 90\nlifetime = "12h"\ncpus = 8\n'
                      'image = "/cvmfs/img"\nmax_queued = 3\ngrace = "20m"\nmax_idle = "1h"\nqueue = "short"\n')
    args = build_parser().parse_args(["glidein", "submit", "--config", str(config), "--cpus", "4"])
    settings = factory_cli._settings(args, None)
    assert settings.cpus == 4 and settings.lifetime.total_seconds() == 12 * 3600 and settings.queue == "short"
    folder = tmp_path / "batch"
    d = build_description(settings.glidein_request(folder / "glidein_startup.sh", folder / "log", batch="b1",
                                                   inputs=()))
    assert d["grid_resource"] == "condor ce.example.org ce.example.org:9620"
    assert d["scitokens_file"] == str(scitoken) and d["accounting_group"] == "group_pilots.site_a"
    assert d["+ProjectName"] == '"alice"' and d["request_cpus"] == "4"
    assert d["+SplitpilotGrace"] == "1200" and d["+SplitpilotMaxIdle"] == "3600"
    glidein = settings.glidein
    assert glidein.image == "/cvmfs/img" and glidein.binds == ("/data/site:/site/data",)
    assert glidein.agent_args() == (" --bind '/data/site:/site/data' --software-dir '/cvmfs/sw.example.org/sp'"
                                    " --platform 'el9' --black-hole '4' --stop-deadline '90'")
    assert GlideinSettings(broker="b:1").agent_args() == ""
    # The startup script passes them to the agent as words a shell reads back unchanged.
    package = GlideinPackage(tarball=tmp_path / "p.tar", sha256="0" * 64, key="k", python_version="3.11", wheels=(),
                             built_seconds=0.0, cached=True)
    script = tmp_path / "glidein_startup.sh"
    script.write_text(render_script(package, glidein))
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    line = next(t for t in script.read_text().splitlines() if "--bind" in t)
    extra = line.split('"$IDLE_TIMEOUT"', 1)[1]
    words = subprocess.run(["sh", "-c", "set -- " + extra + "; printf '%s\\n' \"$@\""],
                           capture_output=True, text=True).stdout.split("\n")
    assert words[:10] == ["--bind", "/data/site:/site/data", "--software-dir", "/cvmfs/sw.example.org/sp",
                          "--platform", "el9", "--black-hole", "4", "--stop-deadline", "90"]
    # The factory's file is shared by glidein status: keys of factory run are known there, not refused.
    status = build_parser().parse_args(["glidein", "status", "--config", str(config)])
    factory_cli.resolve(status)
    assert status.site == "SITE-A" and not hasattr(status, "max_queued")


@pytest.mark.parametrize("line, words", [
    ('submit_line = ["executable = /bin/evil"]', "executable"),
    ('platform = ["el9; touch /tmp/pwned"]', "whitespace"),
    ('software_dir = "relative/sw"', "not an absolute path"),
    ('black_hole = 0', "at least 1"),
    ('cpus = -2', "at least 1"),
    ('lifetime = "forever"', "not a duration"),
])
def test_hostile_factory_settings_are_refused_before_a_token_or_batch_exists(tmp_path, line, words):
    config = tmp_path / "factory.toml"
    config.write_text(f'[factory]\nsite = "S"\nbroker = "127.0.0.1:1"\nca = "{tmp_path}/ca"\n'
                      f'work_dir = "{tmp_path}/work"\n{line}\n')
    result = run("glidein", "submit", "--config", str(config), timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------ contrib/

@pytest.mark.parametrize("target", ["broker", "agent", "factory"])
def test_the_example_config_files_are_valid_and_set_what_they_say(target):
    path = CONTRIB / f"{target}.toml"
    settings = show(target, "--config", str(path))
    written = tomllib.loads(path.read_text())[target]
    for key in written:
        assert settings[key]["source"] == f"file:{path}:{target}.{key}", key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing (Debian package systemd; scripts/install-system-deps.sh)")
@pytest.mark.parametrize("unit, command", [("splitpilot-broker.service", "broker serve"),
                                           ("splitpilot-factory.service", "factory run")])
def test_the_systemd_units_verify(tmp_path, unit, command):
    text = (CONTRIB / unit).read_text()
    assert f"ExecStart=/usr/local/bin/splitpilot {command} --config /etc/splitpilot/" in text
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "User=splitpilot",
                   "KillSignal=SIGTERM"):
        assert option in text, option
    # The unit as shipped, with the command of this installation (verify checks that it is executable).
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/splitpilot", str(BIN)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in (result.stdout + result.stderr).splitlines() if unit in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
