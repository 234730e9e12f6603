import pytest

from absorber_memory.probes import DEFAULT_PROBES, chained_probe_segment, pick_probes, probe_segments

LEAD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_pick_rotates_deterministically():
    prompts = ["a", "b", "c", "d", "e"]
    assert pick_probes(prompts, 2, 0) == ["a", "b"]
    assert pick_probes(prompts, 2, 1) == ["c", "d"]
    assert pick_probes(prompts, 2, 2) == ["e", "a"]
    assert pick_probes(prompts, 9, 0) == prompts  # never repeats within a round
    assert pick_probes(prompts, 0, 3) == [] and pick_probes([], 2, 0) == []


def test_defaults_are_generic():
    assert len(set(DEFAULT_PROBES)) == len(DEFAULT_PROBES) >= 8
    assert all(p.strip() and (p.endswith("?") or p.endswith(".")) for p in DEFAULT_PROBES)


def test_separate_segments_ask_each_probe_alone_in_one_batch():
    seen = []

    def answer_all(questions):
        seen.append(questions)
        return [f" answer {i + 1} " if i else "  " for i in range(len(questions))]

    segments = probe_segments(answer_all, ["q1", "q2"])
    assert seen == [[[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]]
    assert segments == [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "..."}],
                        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "answer 2"}]]
    assert probe_segments(answer_all, []) == [] and len(seen) == 1  # no probes: the teacher is not called


def test_a_teacher_returning_too_few_answers_is_an_error():
    with pytest.raises(ValueError, match="returned 1 answers for 2 probes"):
        probe_segments(lambda questions: ["only one"], ["q1", "q2"])


def test_chained_segment_asks_probes_after_the_lead():
    seen = []

    def answer(messages):
        seen.append(list(messages))
        return "" if len(seen) == 2 else "ok"

    segment = chained_probe_segment(answer, ["q1", "q2"], LEAD)
    assert seen[0] == LEAD + [{"role": "user", "content": "q1"}]
    assert seen[1] == LEAD + [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "q2"}]
    assert segment == seen[1] + [{"role": "assistant", "content": "..."}]  # empty answers become "..."
    assert LEAD == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]  # not mutated
