"""Job description files: the documented format, and messages naming file, field and fix."""

from __future__ import annotations

import textwrap

import pytest

from pilot.api.jobfile import JobFileError, load_job_file, parse_job_text

EXAMPLE = """\
[job]
name = "hello"
executable = "run.sh"
arguments = ["--events", "10"]
priority = 0
max_attempts = 3
[job.environment]
MODE = "test"
[job.requirements]
cores = 1
memory_mb = 2000
disk_mb = 1000
walltime = "1h"
container_image = ""
sites_allowed = []
sites_denied = []
[[job.inputs]]
path = "data/input.txt"     # local file, uploaded before submit
[job.outputs]
patterns = ["*.out"]
"""


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text("hello\n")
    return tmp_path


def job_file(workdir, text: str, name: str = "jobs.toml") -> str:
    path = workdir / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(workdir, text: str) -> JobFileError:
    path = job_file(workdir, text)
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    assert info.value.exit_code == 2
    for problem in info.value.problems:
        assert problem.render(path) in str(info.value)
    return info.value


def test_the_documented_example(workdir):
    [job] = load_job_file(job_file(workdir, EXAMPLE))
    spec = job.spec
    assert (spec.name, spec.executable, list(spec.arguments)) == ("hello", "run.sh", ["--events", "10"])
    assert dict(spec.environment) == {"MODE": "test"} and spec.max_attempts == 3
    req = spec.requirements
    assert (req.cores, req.memory_mb, req.disk_mb, req.walltime_s) == (1, 2000, 1000, 3600)
    assert list(spec.output_patterns) == ["*.out"]
    assert [(i.name, i.path) for i in job.inputs] == [("input.txt", str(workdir / "data" / "input.txt"))]
    assert len(spec.input_files) == 0  # filled in by the client after uploading


def test_count_and_index(workdir):
    jobs = load_job_file(job_file(workdir, """
        [job]
        name = "scan-{index}"
        executable = "scan"
        arguments = ["--point", "{index}"]
        count = 3
        [job.environment]
        POINT = "{index}"
        [job.requirements]
        walltime = 600
        """))
    assert [j.spec.name for j in jobs] == ["scan-0", "scan-1", "scan-2"]
    assert [j.spec.environment["POINT"] for j in jobs] == ["0", "1", "2"]
    assert [list(j.spec.arguments) for j in jobs][2] == ["--point", "2"]


def test_jobs_array_with_defaults(workdir):
    jobs = load_job_file(job_file(workdir, """
        [defaults]
        executable = "run.sh"
        [defaults.requirements]
        cores = 2
        memory_mb = 1000
        walltime = "2h"
        [defaults.environment]
        A = "1"

        [[jobs]]
        name = "small"

        [[jobs]]
        name = "big"
        executable = "big.sh"
        [jobs.requirements]
        memory_mb = 16000
        [jobs.environment]
        B = "2"
        [[jobs.inputs]]
        path = "data/input.txt"
        name = "in/renamed.txt"
        """))
    small, big = jobs
    def summary(job):
        return job.spec.executable, job.spec.requirements.cores, job.spec.requirements.memory_mb
    assert summary(small) == ("run.sh", 2, 1000)
    assert summary(big) == ("big.sh", 2, 16000)
    assert dict(big.spec.environment) == {"A": "1", "B": "2"}
    assert big.spec.requirements.walltime_s == small.spec.requirements.walltime_s == 7200
    assert [i.name for i in big.inputs] == ["in/renamed.txt"] and small.inputs == ()


def test_wrong_type_names_file_field_and_fix(workdir):
    error = problems(workdir, """
        [job]
        executable = "run.sh"
        [job.requirements]
        memory_mb = "lots"
        walltime = "1h"
        """)
    assert str(error) == ("{}: job.requirements.memory_mb: expected a positive integer, got 'lots'; "
                          "fix: write memory_mb = 2000").format(workdir / "jobs.toml")
    assert error.field == "job.requirements.memory_mb" and error.fix == "write memory_mb = 2000"


def test_unknown_fields_suggest_the_right_name(workdir):
    error = problems(workdir, """
        [job]
        executable = "run.sh"
        argumnts = ["x"]
        [job.requirments]
        cores = 1
        """)
    text = str(error)
    assert "job.argumnts: unknown field; did you mean 'arguments'?; fix: rename it to arguments" in text
    assert "job.requirments: unknown field; did you mean 'requirements'?" in text
    unknown = problems(workdir, '[job]\nexecutable = "x"\nflavour = "vanilla"\n')
    assert "job.flavour: unknown field; fix: remove it (known fields here: name, executable" in str(unknown)


def test_every_problem_is_reported_at_once(workdir):
    error = problems(workdir, """
        [job]
        name = 7
        executable = "run.sh"
        max_attempts = -1
        [job.requirements]
        cores = true
        walltime = "forever"
        sites_allowed = ["ok-site", "bad site"]
        [job.environment]
        RATIO = 1.5
        [[job.inputs]]
        path = "data/missing.txt"
        [job.outputs]
        patterns = ["../../etc/passwd"]
        """)
    fields = [p.field for p in error.problems]
    assert fields == ["job.name", "job.max_attempts", "job.environment.RATIO", "job.requirements.cores",
                      "job.requirements.walltime", "job.requirements.sites_allowed[1]", "job.inputs[0].path",
                      "job.outputs.patterns[0]"]
    text = str(error)
    assert f"{workdir / 'jobs.toml'}: 8 problems:" in text
    assert 'job.requirements.walltime: expected a duration, got \'forever\'; fix: write walltime = "1h"' in text
    assert 'job.environment.RATIO: expected a string, got a number 1.5; fix: quote the value: RATIO = "1.5"' in text
    assert "job.inputs[0].path: no such file: 'data/missing.txt'" in text
    assert "job.name: expected a string, got an integer 7" in text


def test_structure_problems(workdir):
    assert "(syntax): not valid TOML" in str(problems(workdir, '[job]\nname = hello\n'))
    assert "line 2" in str(problems(workdir, '[job]\nname = hello\n'))
    missing = problems(workdir, '[job]\nname = "no program"\n')
    assert missing.field == "job.executable" and 'executable = "run.sh"' in missing.fix
    assert problems(workdir, '[jobs]\nexecutable = "x"\n').field == "jobs"
    both = problems(workdir, '[job]\nexecutable = "x"\n[[jobs]]\nexecutable = "y"\n')
    assert "either one [job] table or [[jobs]] tables" in str(both)
    assert problems(workdir, 'name = "x"\n').problems[-1].field == "job"
    duplicate = problems(workdir, """
        [job]
        executable = "x"
        inputs = ["data/input.txt", "data/input.txt"]
        """)
    assert duplicate.field == "job.inputs[1].name" and "two inputs are named 'input.txt'" in str(duplicate)
    empty_exec = problems(workdir, '[[jobs]]\nexecutable = ""\n')
    assert empty_exec.field == "jobs[0].executable"


def test_unreadable_file(workdir):
    with pytest.raises(JobFileError, match="cannot read it") as info:
        load_job_file(workdir / "absent.toml")
    assert info.value.field == "(file)"
    (workdir / "latin1.toml").write_bytes(b'[job]\nname = "caf\xe9"\n')
    with pytest.raises(JobFileError, match="not UTF-8"):
        load_job_file(workdir / "latin1.toml")


def test_parse_text_for_embedding(workdir):
    [job] = parse_job_text('[job]\nexecutable = "x"\ninputs = ["data/input.txt"]\n[job.requirements]\n'
                           'walltime = "1m"\n', "inline", str(workdir))
    assert job.inputs[0].name == "input.txt" and job.source == "inline:job"


def test_a_job_without_a_walltime_is_refused_before_anything_is_uploaded(workdir):
    """A careless job file (no walltime, or 0, which once meant "unlimited" and matched every slot to be cut
    off at each slot's end, forever) is refused here, naming the field and the fix."""
    missing = problems(workdir, '[job]\nexecutable = "x"\ninputs = ["data/input.txt"]\n')
    assert missing.field == "job.requirements.walltime"
    assert "missing: every job needs a wall-clock limit" in str(missing)
    assert missing.fix == 'write walltime = "1h" under [job.requirements] (or [defaults.requirements])'
    for value in ("0", '"0s"', "-5", '"367d"'):
        error = problems(workdir, f'[job]\nexecutable = "x"\n[job.requirements]\nwalltime = {value}\n')
        assert [p.field for p in error.problems] == ["job.requirements.walltime"], value
        assert "expected a duration" in str(error) and 'walltime = "1h"' in error.fix, value
    several = problems(workdir, '[[jobs]]\nexecutable = "x"\n[[jobs]]\nexecutable = "y"\n'
                                '[jobs.requirements]\nwalltime = "1h"\n')
    assert [p.field for p in several.problems] == ["jobs[0].requirements.walltime"]
