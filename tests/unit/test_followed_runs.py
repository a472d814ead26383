"""Which runs a listener follows: from their start until a grace period
after their flow run was first seen finished."""

from __future__ import annotations

from listeners.followed_runs import FollowedRuns
from swf_panda_workers.adapters.stomp_bus import run_selector, workers_selector


def test_a_run_is_followed_once() -> None:
    runs = FollowedRuns(grace=60)
    assert runs.follow("7") is True
    assert runs.follow("7") is False
    assert "7" in runs and len(runs) == 1


def test_a_finished_run_is_forgotten_after_the_grace() -> None:
    runs = FollowedRuns(grace=60)
    runs.follow("7")
    runs.follow("8")
    assert runs.still_active({"7", "8"}, now=0) == []
    assert runs.still_active({"8"}, now=10) == []  # 7 finished at 10
    assert runs.still_active({"8"}, now=69) == []
    assert runs.still_active({"8"}, now=70) == ["7"]
    assert "7" not in runs and "8" in runs


def test_a_run_seen_active_again_starts_its_grace_anew() -> None:
    # A failed flow run retried by Prefect, or a count that missed it once.
    runs = FollowedRuns(grace=60)
    runs.follow("7")
    runs.still_active(set(), now=0)
    runs.still_active({"7"}, now=30)
    assert runs.still_active(set(), now=80) == []
    assert runs.still_active(set(), now=140) == ["7"]


def test_following_again_cancels_a_pending_forget() -> None:
    runs = FollowedRuns(grace=60)
    runs.follow("7")
    runs.still_active(set(), now=0)
    runs.follow("7")  # e.g. a late message made it ours again
    assert runs.still_active(set(), now=59) == []
    assert runs.still_active(set(), now=120) == ["7"]


def test_selectors() -> None:
    assert run_selector("100123") == "run_id = '100123'"
    assert workers_selector("dev") == "namespace='dev' OR namespace IS NULL"
    assert workers_selector("dev", "dev") == "namespace='dev' OR namespace IS NULL"
    assert (
        workers_selector("alice", "dev")
        == "namespace='alice' OR namespace='dev' OR namespace IS NULL"
    )
