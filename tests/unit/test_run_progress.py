"""When a run counts as stalled, and that each stall is reported once."""

from __future__ import annotations

from swf_panda_workers.core.run_progress import RunProgress

LIMIT = 60.0


def test_an_expected_wait_that_lasts_past_the_limit_is_reported_once() -> None:
    progress = RunProgress.starting("7", now=0.0)
    progress.waits_for("iDDS's created_workflow_task", now=10.0)
    assert progress.stalled_for(69.0, LIMIT) is None
    assert progress.stalled_for(71.0, LIMIT) == 61.0
    assert progress.stalled_for(200.0, LIMIT) is None  # reported already
    assert progress.stall_line(61.0) == (
        "stalled run_id=7: no progress for 61s, waiting for iDDS's created_workflow_task"
    )


def test_progress_ends_a_stall_and_says_how_long_it_lasted() -> None:
    progress = RunProgress.starting("7", now=0.0)
    assert progress.moved(30.0) is None  # no stall was reported
    assert progress.stalled_for(100.0, LIMIT) == 70.0
    assert progress.moved(130.0) == 100.0
    # A later stall is a new one, reported again.
    assert progress.stalled_for(191.0, LIMIT) == 61.0


def test_waiting_for_results_is_the_run_s_normal_life_not_a_stall() -> None:
    progress = RunProgress.starting("7", now=0.0)
    progress.waits_for("slice results and end_run", now=5.0, expected=False)
    assert progress.stalled_for(10_000.0, LIMIT) is None
    progress.waits_for("the stop and the close to be sent", now=10_000.0)
    assert progress.stalled_for(10_061.0, LIMIT) == 61.0
