import pytest

from absorber_memory.generation import generate_batch_ids, generate_ids


def prompts_of(tokenizer, *texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_batched_greedy_answers_equal_one_at_a_time(model, tokenizer):
    prompts = prompts_of(tokenizer, "hello there", "a much longer prompt with many more words in it", "x")
    assert len({len(p) for p in prompts}) == 3  # left padding really happens
    alone = [generate_ids(model, tokenizer, p, 6) for p in prompts]
    assert generate_batch_ids(model, tokenizer, prompts, 6) == alone
    # A small token budget splits the prompts into several batches, same answers in the same order.
    assert generate_batch_ids(model, tokenizer, prompts, 6, max_batch_tokens=len(prompts[1])) == alone


def test_each_batched_answer_ends_at_its_own_eos(model, tokenizer):
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id

    def eos_for_first_row_at_step_2(input_ids, scores):
        if input_ids.shape[1] - width == 2:
            scores[0] = -float("inf")
            scores[0, eos] = 0.0
        return scores

    prompts = prompts_of(tokenizer, "hello there", "another prompt")
    width = max(map(len, prompts))
    full = generate_batch_ids(model, tokenizer, prompts, 5)
    cut = generate_batch_ids(model, tokenizer, prompts, 5,
                             logits_processor=LogitsProcessorList([eos_for_first_row_at_step_2]))
    assert eos not in full[0] and len(full[0]) == 5  # the tiny model never says EOS by itself here
    assert cut == [full[0][:2], full[1]]  # row 0 stops before its EOS, row 1 runs on
    assert generate_batch_ids(model, tokenizer, [], 5) == []


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "8"])
def test_bad_max_new_tokens_is_our_error_before_generation(make_memory, bad):
    from absorber_memory import ConfigError

    pm = make_memory()
    with pytest.raises(ConfigError, match=r"`max_new_tokens` must be a positive integer, got"):
        pm.generate([{"role": "user", "content": "Hi"}], max_new_tokens=bad)
    with pytest.raises(ConfigError, match=r"`max_new_tokens` must be a positive integer"):
        pm.engine.generate([], [{"role": "user", "content": "Hi"}], bad)


@pytest.mark.parametrize("bad", [-1, 0])
def test_sessions_reject_bad_max_new_tokens_in_generate_and_stream(make_service, bad):
    from absorber_memory import ConfigError

    memory = make_service()
    memory.add_messages([{"role": "user", "content": "Hi"}], session_id="s")
    for call in (memory.generate, memory.stream):
        with pytest.raises(ConfigError, match="`max_new_tokens` must be a positive integer"):
            call(session_id="s", max_new_tokens=bad)
    assert [m.content for m in memory.transcript("s")] == ["Hi"]  # nothing lost
