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
