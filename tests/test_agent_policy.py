"""The agent's decisions (pilot.agent.policy), without processes, threads, sleeps or clocks.

Each test feeds the policy events with made-up monotonic times and checks the
actions it returns and when it wants to be asked again (wake_at): the loop
that drives it never spins (wake_at is in the future whenever nothing is to
be done) and never sleeps past a deadline.
"""

from __future__ import annotations

import math

import pytest

from pilot.agent import policy as p
from pilot.agent.policy import AgentPolicy, CallFailure, Ending, PolicySettings


def make(now=0.0, **changes) -> AgentPolicy:
    settings = dict(cores=4, memory_mb=8000, disk_mb=10_000, slot_end=now + 10_000, idle_timeout_s=300,
                    min_backoff_s=1, max_backoff_s=60, min_job_time_s=60, black_hole_failures=3,
                    pilot_heartbeat_s=60, stop_deadline_s=30, report_until=now + 5000)
    settings.update(changes)
    return AgentPolicy(PolicySettings(**settings), now)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def start(policy: AgentPolicy, now: float, key, cores=1, memory=1000, token_life=3600.0):
    """Answer the pending Match with a job (and any report due meanwhile as done)."""
    actions = policy.actions(now)
    for action in actions:
        if isinstance(action, (p.ReportAttempt, p.ReportJobUnusable, p.ReportPilotEnd)):
            policy.report_done(now, action.report_id)
    (match,) = of(actions, p.Match)
    policy.matched(now, key, cores, memory, 100, now + token_life)
    return match


def act(policy: AgentPolicy, now: float) -> list:
    """The actions due at NOW, every report among them answered as done."""
    actions = policy.actions(now)
    for action in actions:
        if isinstance(action, (p.ReportAttempt, p.ReportJobUnusable, p.ReportPilotEnd)):
            policy.report_done(now, action.report_id)
    return actions


def leave_after_reports(policy: AgentPolicy, now: float):
    """Answer every report until the policy leaves; return (reports made, the Leave)."""
    reports = []
    for _ in range(20):
        actions = policy.actions(now)
        reports += [a for a in actions if isinstance(a, (p.ReportAttempt, p.ReportJobUnusable, p.ReportPilotEnd))]
        for action in actions:
            if isinstance(action, (p.ReportAttempt, p.ReportJobUnusable, p.ReportPilotEnd)):
                policy.report_done(now, action.report_id)
            if isinstance(action, p.Leave):
                return reports, action
    raise AssertionError("the policy never left")


# ---------------------------------------------------------------- matching

def test_offers_the_whole_slot_then_what_is_left():
    policy = make()
    first = start(policy, 0, (1, 1), cores=3, memory=6000)
    assert first == p.Match(cores=4, memory_mb=8000, disk_mb=10_000, time_left_s=10_000 - 30)
    (second,) = of(policy.actions(0.1), p.Match)     # asked again at once: there is room
    assert (second.cores, second.memory_mb, second.disk_mb) == (1, 2000, 9900)
    policy.matched(0.1, (2, 1), 1, 1000, 100, 3600)
    assert not of(policy.actions(0.2), p.Match)       # no core left: no match
    policy.job_ended(5, (1, 1), Ending.REPORTED, "done")
    (third,) = of(policy.actions(5), p.Match)          # room again: asked at once, no backoff wait
    assert third.cores == 3


def test_one_job_at_a_time_never_asks_while_a_job_runs():
    policy = make(one_job_at_a_time=True)
    start(policy, 0, (1, 1))
    for t in (0.1, 100, 1000):
        assert not of(policy.actions(t), p.Match)
    policy.job_ended(1000, (1, 1), Ending.REPORTED, "done")
    (match,) = of(policy.actions(1000), p.Match)
    assert match.cores == 4                            # the whole slot again


def test_backoff_after_empty_matches_doubles_up_to_the_cap_and_honours_retry_after():
    policy = make(pilot_heartbeat_s=10_000)
    now, waits = 0.0, []
    for _ in range(8):
        assert of(policy.actions(now), p.Match)
        policy.no_match(now, "no waiting job fits this slot", 0, False)
        assert not of(policy.actions(now), p.Match)    # not before the backoff
        wake = policy.wake_at(now)
        waits.append(wake - now)
        now = wake
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]
    policy = make(pilot_heartbeat_s=10_000)
    policy.actions(0)
    policy.no_match(0, "busy", 45, False)
    assert policy.wake_at(0) == 45                     # the broker's retry_after when longer


def test_no_match_when_the_time_left_cannot_fit_a_job():
    policy = make(slot_end=80, min_job_time_s=60, stop_deadline_s=30)   # 80 - 30 < 60
    assert not of(policy.actions(0), p.Match)


def test_a_broker_error_backs_off_like_an_empty_match():
    policy = make()
    policy.actions(0)
    policy.match_failed(0, CallFailure.TRANSIENT, "broker unreachable: UNAVAILABLE")
    assert not of(policy.actions(1), p.Match)
    assert of(policy.actions(4), p.Match)


# ------------------------------------------------------------------ leaving

def test_an_empty_pilot_leaves_after_the_idle_timeout_and_says_so():
    policy = make(idle_timeout_s=300)
    now, made = 0.0, []
    while not policy.left:
        actions = act(policy, now)
        made += actions
        for action in actions:
            if isinstance(action, p.Match):
                policy.no_match(now, "queue empty", 30, False)
        now = policy.wake_at(now)
        assert now <= 300.01 or policy.left
    assert of(made, p.Leave) == [p.Leave(0, "idle: no job matched (empty pilot)")]
    assert [(r.jobs_run, r.reason) for r in of(made, p.ReportPilotEnd)] == [(0, "idle: no job matched (empty pilot)")]
    # At 0, 30 (the broker's retry_after), then doubling to the 60 s cap: 90, 150, 210, 270; none after leaving.
    assert [m.time_left_s for m in of(made, p.Match)] == [9970 - t for t in (0, 30, 90, 150, 210, 270)]


def test_a_due_match_is_tried_before_leaving_idle():
    policy = make(idle_timeout_s=10)
    policy.actions(0)
    policy.no_match(0, "empty", 10, False)
    actions = policy.actions(10.5)                     # idle timeout and the next match both due
    assert of(actions, p.Match) and policy.leaving is None


def test_signal_stops_every_job_reports_them_and_leaves():
    policy = make()
    start(policy, 0, (1, 1))
    start(policy, 0, (2, 1))
    policy.signal(10, "SIGTERM")
    stops = of(policy.actions(10), p.StopJob)
    assert {(s.key, s.reason, s.deadline_s) for s in stops} == {((1, 1), p.STOP_PREEMPTED, 30),
                                                               ((2, 1), p.STOP_PREEMPTED, 30)}
    assert not of(policy.actions(11), p.Match)          # no more work
    policy.signal(12, "SIGTERM")                        # a second one: said, nothing else
    assert not of(policy.actions(12), p.StopJob)
    policy.job_ended(15, (1, 1), Ending.STOPPED, "stopped (STOP_REASON_PREEMPTED)")
    policy.job_ended(16, (2, 1), Ending.REPORTED, "payload succeeded")
    reports, leave = leave_after_reports(policy, 16)
    assert [(r.key, r.failure) for r in reports if isinstance(r, p.ReportAttempt)] == [((1, 1), p.FAILURE_STOPPED)]
    assert leave == p.Leave(0, "signal SIGTERM") and reports[-1].jobs_run == 2


def test_draining_waits_for_events_and_never_spins():
    """The old _drain polled: here, with jobs still stopping, the policy has nothing to do until an event."""
    policy = make(pilot_heartbeat_s=60)
    start(policy, 0, (1, 1))
    policy.signal(10, "SIGTERM")
    policy.actions(10)
    for now in (10.0, 10.5, 20.0):
        assert not [a for a in policy.actions(now) if not isinstance(a, p.Log)]
        assert policy.wake_at(now) > now               # no busy loop
    policy.job_ended(25, (1, 1), Ending.STOPPED, "stopped")
    assert policy.wake_at(25) == 25                    # the report is due at once


def test_the_slots_end_stops_jobs_with_slot_end():
    policy = make(slot_end=1000, stop_deadline_s=30)
    start(policy, 0, (1, 1))
    assert policy.wake_at(100) <= 970
    (stop,) = of(policy.actions(970), p.StopJob)
    assert stop.reason == p.STOP_SLOT_END and policy.leaving == "the slot's lifetime ends"


def test_the_broker_saying_leave_drains_the_pilot():
    policy = make()
    policy.actions(0)
    policy.no_match(0, "site S is draining: no new jobs; leave", 0, True)
    reports, leave = leave_after_reports(policy, 0)
    assert leave.reason.startswith("the broker says leave: site S is draining")


# ---------------------------------------------------------- black-hole guard

@pytest.mark.parametrize("ending", [Ending.WRAPPER_FAILED, Ending.INFRASTRUCTURE])
def test_node_failures_trip_the_black_hole_guard(ending):
    policy = make(black_hole_failures=2)
    for job in (1, 2):
        start(policy, job, (job, 1))
        policy.job_ended(job + 0.5, (job, 1), ending, "wrapper ended without a result")
    first = act(policy, 3)
    assert policy.black_hole and not of(first, p.Match)
    reports, leave = leave_after_reports(policy, 3)
    assert leave.exit_code == 3 and leave.reason.startswith("black hole: 2 consecutive")
    assert [r.failure for r in of(first, p.ReportAttempt)] == [p.ATTEMPT_FAILURE[ending]]   # the second job's


@pytest.mark.parametrize("ending", [Ending.AGENT_ERROR, Ending.UNKNOWN_RESULT, Ending.FENCED, Ending.LIMIT,
                                    Ending.JOB_UNUSABLE, Ending.STOPPED])
def test_what_is_not_the_nodes_fault_never_counts(ending):
    policy = make(black_hole_failures=2)
    for job in range(1, 6):
        start(policy, job, (job, 1))
        policy.job_ended(job + 0.5, (job, 1), ending, "whatever")
    assert not policy.black_hole and policy.consecutive_failures == 0
    assert of(policy.actions(7), p.Match)


def test_a_good_job_resets_the_count():
    policy = make(black_hole_failures=2)
    for job, ending in ((1, Ending.WRAPPER_FAILED), (2, Ending.REPORTED), (3, Ending.WRAPPER_FAILED)):
        start(policy, job, (job, 1))
        policy.job_ended(job + 0.5, (job, 1), ending, "x")
    assert not policy.black_hole


# ------------------------------------------------------------------ reports

@pytest.mark.parametrize("ending,report", [
    (Ending.WRAPPER_FAILED, p.FAILURE_WRAPPER), (Ending.INFRASTRUCTURE, p.FAILURE_INFRASTRUCTURE),
    (Ending.STOPPED, p.FAILURE_STOPPED), (Ending.LIMIT, p.FAILURE_LIMIT), (Ending.AGENT_ERROR, p.FAILURE_AGENT),
    (Ending.UNKNOWN_RESULT, p.FAILURE_WRAPPER), (Ending.REPORTED, None), (Ending.FENCED, None)])
def test_what_each_ending_reports(ending, report):
    policy = make()
    start(policy, 0, (7, 2))
    policy.job_ended(1, (7, 2), ending, "detail")
    made = of(policy.actions(1), p.ReportAttempt)
    assert [(r.key, r.failure, r.detail) for r in made] == ([((7, 2), report, "detail")] if report else [])


def test_an_unusable_job_is_reported_with_its_own_token():
    policy = make()
    start(policy, 0, (7, 1))
    policy.job_ended(1, (7, 1), Ending.JOB_UNUSABLE, "JobStart too large")
    (report,) = of(policy.actions(1), p.ReportJobUnusable)
    assert report.key == (7, 1) and not of(policy.actions(1), p.ReportAttempt)


def test_a_report_is_retried_with_backoff_while_the_broker_is_away():
    policy = make(report_first_delay_s=1, report_max_delay_s=8)
    start(policy, 0, (1, 1))
    policy.job_ended(1, (1, 1), Ending.STOPPED, "stopped")
    now, tries = 1.0, []
    while True:
        (report,) = of(policy.actions(now), p.ReportAttempt)
        tries.append(now)
        if len(tries) == 6:
            policy.report_done(now, report.report_id)
            break
        policy.report_failed(now, report.report_id, CallFailure.TRANSIENT, "UNAVAILABLE")
        assert not of(policy.actions(now), p.ReportAttempt)   # not before its time
        now = policy.wake_at(now)
    assert [b - a for a, b in zip(tries, tries[1:], strict=False)] == [1, 2, 4, 8, 8]
    assert not of(policy.actions(now + 100), p.ReportAttempt)  # done: never again


def test_a_report_is_given_up_when_the_agent_token_ends():
    policy = make(report_until=100, report_first_delay_s=10, report_max_delay_s=40)
    start(policy, 0, (1, 1))
    policy.signal(1, "SIGTERM")
    policy.job_ended(2, (1, 1), Ending.STOPPED, "stopped")
    now = 2.0
    for _ in range(20):
        actions = policy.actions(now)
        for action in actions:
            if isinstance(action, (p.ReportAttempt, p.ReportPilotEnd)):
                policy.report_failed(now, action.report_id, CallFailure.TRANSIENT, "UNAVAILABLE")
        if of(actions, p.Leave):
            break
        now = policy.wake_at(now)
    assert of(actions, p.Leave) and now == 100                 # the last try was at the token's end
    assert any("given up" in a.text for a in actions if isinstance(a, p.Log))


def test_a_report_the_broker_refuses_is_dropped():
    policy = make()
    start(policy, 0, (1, 1))
    policy.job_ended(1, (1, 1), Ending.STOPPED, "stopped")
    (report,) = of(policy.actions(1), p.ReportAttempt)
    policy.report_failed(1, report.report_id, CallFailure.REJECTED, "FAILED_PRECONDITION: attempt 1 is over")
    assert not of(policy.actions(1000), p.ReportAttempt)


def test_an_agent_error_falls_back_to_a_wrapper_failure_for_an_older_broker():
    policy = make()
    start(policy, 0, (1, 1))
    policy.job_ended(1, (1, 1), Ending.AGENT_ERROR, "KeyError in the agent")
    (report,) = of(policy.actions(1), p.ReportAttempt)
    assert report.failure == p.FAILURE_AGENT
    policy.report_failed(1, report.report_id, CallFailure.INVALID, "failure 5 is not an AttemptFailure class")
    (again,) = of(policy.actions(1), p.ReportAttempt)
    assert again.failure == p.FAILURE_WRAPPER and again.key == (1, 1)


# ------------------------------------------------------------- refused token

def test_a_refused_token_stops_jobs_reports_nothing_and_leaves_with_its_code():
    policy = make(refusals_to_leave=3)
    start(policy, 0, (1, 1))
    now, refused = 0.0, 0
    while refused < 3:
        now = max(now + 1, policy.wake_at(now))
        for action in policy.actions(now):
            if isinstance(action, p.Match):
                policy.match_failed(now, CallFailure.REFUSED, "PERMISSION_DENIED: test", 4)
                refused += 1
    assert policy.refused_exit == 4
    assert of(policy.actions(now), p.StopJob) or policy.jobs[(1, 1)].stopping
    policy.job_ended(now + 1, (1, 1), Ending.STOPPED, "stopped")
    actions = policy.actions(now + 1)
    assert not of(actions, p.ReportAttempt) and not of(actions, p.ReportPilotEnd)
    assert of(actions, p.Leave) == [p.Leave(4, "the broker refused this agent token 3 times in a row")]


def test_a_refusal_between_successes_does_not_count_up():
    policy = make(refusals_to_leave=2)
    for t in range(6):
        for action in policy.actions(t * 100):
            if isinstance(action, p.Match):
                if t % 2:
                    policy.no_match(t * 100, "empty", 1, False)
                else:
                    policy.match_failed(t * 100, CallFailure.REFUSED, "TLS handshake", 4)
    assert policy.refused_exit is None


# ---------------------------------------------------- heartbeats, refreshes

def test_pilot_heartbeats_carry_the_running_attempts_and_their_answers_are_obeyed():
    policy = make(pilot_heartbeat_s=60)
    start(policy, 0, (1, 1), cores=2)
    start(policy, 0, (2, 1))
    assert not of(policy.actions(59), p.PilotHeartbeat)
    (beat,) = of(policy.actions(60), p.PilotHeartbeat)
    assert set(beat.running) == {(1, 1), (2, 1)} and beat.cores_in_use == 3
    policy.heartbeat_answered(60, [(2, 1), (9, 9)], False)
    (stop,) = of(policy.actions(60), p.StopJob)
    assert stop.key == (2, 1) and stop.reason == p.STOP_KILLED
    policy.heartbeat_answered(120, [], True)
    stops = of(policy.actions(120), p.StopJob)
    assert policy.leaving == "the site is drained or disabled" and [s.key for s in stops] == [(1, 1)]


def test_a_job_token_is_refreshed_at_two_thirds_of_its_life_until_capped():
    policy = make()
    start(policy, 0, (1, 1), token_life=300)
    assert policy.wake_at(1) <= 200
    assert not of(policy.actions(199), p.RefreshToken)
    (refresh,) = of(policy.actions(200), p.RefreshToken)
    assert refresh.key == (1, 1) and not of(policy.actions(201), p.RefreshToken)    # one at a time
    policy.token_refresh_failed(201, (1, 1), CallFailure.TRANSIENT, "UNAVAILABLE")
    assert of(policy.actions(201), p.Log) and 201 < policy.wake_at(201) <= 231
    (again,) = of(policy.actions(policy.wake_at(201)), p.RefreshToken)
    policy.token_refreshed(231, (1, 1), 531)                    # a new 300 s token
    assert not of(policy.actions(400), p.RefreshToken)
    (third,) = of(policy.actions(431), p.RefreshToken)
    policy.token_refreshed(431, (1, 1), 531)                    # capped: no longer than before
    assert math.isinf(policy.jobs[(1, 1)].next_refresh)


def test_a_stopping_job_is_not_refreshed_and_wake_at_is_never_in_the_past():
    policy = make()
    start(policy, 0, (1, 1), token_life=30)
    policy.signal(1, "SIGINT")
    policy.actions(1)
    assert not of(policy.actions(25), p.RefreshToken)
    assert policy.wake_at(25) >= 25


def test_a_report_failing_with_internal_errors_is_tried_a_few_times_only():
    """INTERNAL may be a broker restarting or a bug of its own: not retried until the token's end."""
    policy = make(report_first_delay_s=1)
    start(policy, 0, (1, 1))
    policy.job_ended(1, (1, 1), Ending.STOPPED, "stopped")
    now, tries, said = 1.0, 0, []
    for _ in range(20):
        actions = policy.actions(now)
        said += [a.text for a in actions if isinstance(a, p.Log)]
        reports = of(actions, p.ReportAttempt)
        if reports:
            tries += 1
            policy.report_failed(now, reports[0].report_id, CallFailure.DOUBTFUL, "INTERNAL: incident 7")
        now = max(now + 1, policy.wake_at(now))
    assert tries == p.DOUBTFUL_TRIES
    assert "job 1.1's report failed 5 times (INTERNAL: incident 7): dropped" in said
