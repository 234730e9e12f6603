import random

import pytest

from absorber_memory.stream import plan_absorption, turn_spans

PLAN = dict(window_tokens=100, absorb_tokens=40, sync_tokens=50)


def test_no_plan_when_the_window_fits():
    assert plan_absorption([30, 30, 40], ["user", "assistant", "user"], **PLAN) is None


def test_absorbs_oldest_whole_turns_until_absorb_tokens():
    plan = plan_absorption([25, 25, 25, 25, 25], ["user", "assistant"] * 2 + ["user"], **PLAN)
    assert (plan.absorb, plan.absorb_tokens) == (2, 50)
    assert (plan.sync, plan.sync_tokens) == (2, 50)


def test_tool_results_stay_with_their_call():
    roles = ["user", "assistant", "tool", "tool", "user"]
    assert turn_spans(roles) == [(0, 1), (1, 4), (4, 5)]
    plan = plan_absorption([30, 20, 30, 30, 10], roles, **PLAN)
    assert plan.absorb in (1, 4)  # never inside the tool span
    plan = plan_absorption([10, 20, 30, 30, 20], roles, **PLAN)
    assert plan.absorb == 4


def test_newest_turn_is_never_absorbed():
    assert plan_absorption([500], ["user"], **PLAN) is None
    plan = plan_absorption([10, 500], ["user", "assistant"], **PLAN)
    assert plan.absorb == 1 and plan.sync == 0  # the big message does not fit in S


def test_keep_newest_false_absorbs_everything_when_asked():
    kwargs = dict(PLAN, window_tokens=0)
    assert plan_absorption([], [], keep_newest=False, **kwargs) is None
    plan = plan_absorption([10, 500], ["user", "assistant"], keep_newest=False, **kwargs)
    assert plan.absorb == 2 and plan.sync == 0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        plan_absorption([1, 2], ["user"], **PLAN)


@pytest.mark.parametrize("seed", range(20))
def test_streaming_loses_and_duplicates_nothing(seed):
    rng = random.Random(seed)
    roles_all, counts_all = [], []
    absorbed: list[int] = []
    start = 0
    for i in range(60):
        roles_all.append(rng.choice(["user", "assistant", "tool"]) if i else "user")
        counts_all.append(rng.randint(1, 60))
        while True:
            plan = plan_absorption(counts_all[start:], roles_all[start:], **PLAN)
            if plan is None:
                break
            assert plan.absorb >= 1 and start + plan.absorb < len(counts_all)
            assert roles_all[start + plan.absorb] != "tool"  # never split a tool span
            absorbed += range(start, start + plan.absorb)
            start += plan.absorb
        window = list(range(start, len(counts_all)))
        assert absorbed + window == list(range(len(counts_all)))
        assert sum(counts_all[start:]) <= PLAN["window_tokens"] or len(turn_spans(roles_all[start:])) == 1
