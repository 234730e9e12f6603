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


def test_a_string_is_a_question_asked_after_the_session_context_in_both_memories(make_service, make_memory):
    memory = make_service()
    memory.add_messages([{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada!"}],
                        session_id="s")
    question = [{"role": "user", "content": "What is my name?"}]
    asked = memory.generate("What is my name?", session_id="s", max_new_tokens=6)
    assert asked == memory.generate(memory.context_messages("s") + question, session_id="s", max_new_tokens=6)
    assert asked != memory.generate(question, session_id="s", max_new_tokens=6)  # the context was really there
    assert memory.stream("What is my name?", session_id="s", max_new_tokens=6).text().strip() == asked.strip()
    raw = memory.generate("The quick brown fox", session_id="s", raw=True, max_new_tokens=6)
    assert raw.strip() == memory.stream("The quick brown fox", session_id="s", raw=True, max_new_tokens=6).text().strip()
    assert raw != memory.generate("The quick brown fox", session_id="s", max_new_tokens=6)
    assert len(memory.transcript("s")) == 2  # asking stores nothing

    pm = make_memory()
    pm.add_messages([{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada!"}])
    assert pm.generate("What is my name?", max_new_tokens=6) == pm.generate(
        pm.context_messages() + question, max_new_tokens=6
    )
    assert len(pm.window) == 2


def test_nothing_to_answer_is_a_clear_error_in_both_memories(make_service, make_memory):
    from absorber_memory import InvalidMessageError

    memory = make_service()
    for call in (memory.generate, memory.stream):
        with pytest.raises(InvalidMessageError, match="nothing to answer: session 'never-seen' has no messages"):
            call(session_id="never-seen")
    memory.set_prefix("sys-only", "You are terse.")
    with pytest.raises(InvalidMessageError, match="nothing to answer"):
        memory.generate(session_id="sys-only")
    assert memory.prefix("sys-only") == [{"role": "system", "content": "You are terse."}]  # kept
    assert isinstance(memory.generate("Hi?", session_id="sys-only", max_new_tokens=2), str)  # a question is enough
    with pytest.raises(InvalidMessageError, match="`raw=True` needs a non-empty string"):
        memory.generate([{"role": "user", "content": "Hi"}], session_id="s", raw=True)
    with pytest.raises(InvalidMessageError, match="empty or whitespace"):
        memory.generate("   ", session_id="s")
    with pytest.raises(InvalidMessageError, match="nothing to answer: this memory has no messages"):
        make_memory().generate()


def test_a_prompt_cache_gives_the_answers_of_fresh_prompts_reading_only_what_is_new(model, tokenizer, monkeypatch):
    from absorber_memory import generation
    from absorber_memory.generation import PromptCache

    history = tokenizer("a long shared history " * 12)["input_ids"]
    monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", len(history))
    cache = PromptCache()
    lengths = []
    # A chain: each prompt extends the last prompt and its answer (what chained probes do), then a fork
    # back to the shared history alone (what probes over the same history do), then an unrelated prompt.
    first = history + tokenizer(" first question")["input_ids"]
    answer = cache.generate_ids(model, tokenizer, first, 6)
    lengths.append(cache.cache.get_seq_length())
    reads = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: reads.append(k["input_ids"].shape[1]) or real(*a, **k))
    cache.generate_ids(model, tokenizer, history + tokenizer(" a last question")["input_ids"], 2)
    assert reads[0] < len(history)  # the shared history came from the cache; only the question was read
    monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", len(history) + 50)
    reads.clear()
    cache.generate_ids(model, tokenizer, history + tokenizer(" one more")["input_ids"], 2)
    assert reads[0] > len(history)  # a shared start below the threshold is read anew
    monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", len(history))
    chained = first + answer + tokenizer(" next question")["input_ids"]
    fork = history + tokenizer(" other question")["input_ids"]
    other = tokenizer("unrelated")["input_ids"]
    for prompt in (chained, fork, other):
        assert cache.generate_ids(model, tokenizer, prompt, 6) == generate_ids(model, tokenizer, prompt, 6)
    assert len(answer) == 6 and answer == generate_ids(model, tokenizer, first, 6)
    assert lengths == [len(first) + 5]  # the prompt and every answer token but the last one
    assert cache.ids == other + generate_ids(model, tokenizer, other, 6)[:5]


def test_a_kv_cache_goes_by_the_keyword_the_model_declares():
    from absorber_memory.generation import cache_kwargs

    class Older:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class Newer:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class Wrapped:  # a PEFT model: looked through to its base model
        def get_base_model(self):
            return Newer()

        def forward(self, *args, **kwargs): ...

    marker = object()
    assert cache_kwargs(Older(), marker) == {"past_key_values": marker}
    assert cache_kwargs(Newer(), marker) == {"cache": marker}
    assert cache_kwargs(Wrapped(), marker) == {"cache": marker}


def test_cached_generation_and_targets_raise_no_deprecation_warning(make_memory, monkeypatch):
    import warnings

    from absorber_memory import absorber, generation

    monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", 1)
    monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", 1)
    pm = make_memory(probe_count=2)
    context = [{"role": "user", "content": "My cat is called Miso."}, {"role": "assistant", "content": "Nice!"}] * 3
    following = [{"role": "user", "content": "What a day."}, {"role": "assistant", "content": "Indeed."}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers warns of a renamed keyword this way
        report = pm.engine.run_round([], context, n_probes=2, following=following, base_teacher=True)
    assert report.steps > 0 and report.sync_tokens > 0
