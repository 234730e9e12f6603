import pytest

from absorber_memory import InvalidMessageError, TemplateError
from absorber_memory.chat import ChatFormat, split_prefix, validate_messages


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], r"`messages` is empty"),
        ("hello", r"must be a list of chat messages, got str"),
        ([{"role": "user"}], r"`messages\[0\].content` must be a string or a list of content parts, got NoneType"),
        ([{"role": "user", "content": 5}], r"must be a string or a list of content parts, got int"),
        ([{"role": "user", "content": "  \n"}], r"is empty or whitespace"),
        ([{"role": "robot", "content": "hi"}], r"`messages\[0\].role` must be one of"),
        ([{"content": "hi"}], r"`messages\[0\]` has no `role`"),
        (["hi"], r"`messages\[0\]` must be a dict"),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises(InvalidMessageError, match=match):
        validate_messages(messages)


def test_validate_drops_extra_keys():
    assert validate_messages([{"role": "user", "content": "hi", "id": 3}]) == [{"role": "user", "content": "hi"}]


def test_split_prefix_rejects_a_late_system_message():
    msgs = validate_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert split_prefix(msgs) == (msgs[:1], msgs[1:])
    with pytest.raises(InvalidMessageError, match=r"`messages\[1\]` is a system message after"):
        split_prefix(msgs[1:] + msgs[:1])


def test_piecewise_tokens_equal_the_whole_render(tokenizer):
    fmt = ChatFormat(tokenizer)
    prefix = [{"role": "system", "content": "Be brief."}]
    msgs = [{"role": "user", "content": "My dog is Bruno."}, {"role": "assistant", "content": "Nice dog!"}]
    whole = tokenizer.apply_chat_template(prefix + msgs, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert fmt.encode(prefix, msgs, add_generation_prompt=True) == expected
    assert fmt.count(msgs[0]) == len(fmt.message_ids(msgs[0])) > 0


def test_default_header_is_used_without_a_system_message(tokenizer):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    fmt = ChatFormat(tokenizer)
    assert fmt.prefix_text([]) == "<|im_start|>system\nDefault.<|im_end|>\n"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    whole = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert fmt.encode([], msgs) == tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_non_concatenative_template_is_refused(tokenizer):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="not concatenative"):
        ChatFormat(tokenizer)


def test_missing_template_is_refused(tokenizer):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        ChatFormat(tokenizer)
