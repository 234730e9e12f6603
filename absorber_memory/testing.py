"""A tiny Llama and tokenizer built in-process, for tests and examples without downloads.

`tiny_model_and_tokenizer()` trains a ~400-token byte-level BPE on a few
sentences and builds a 2-layer Llama with a ChatML chat template. It takes
well under a second on a CPU, and the same seed gives the same weights, so
tests are deterministic. Not a useful language model: only the mechanics
(templates, hidden states, LoRA, persistence) are real.
"""

from __future__ import annotations

from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "My name is Ana and I live in Lisbon with my dog Bruno.",
    "I work as a nurse and I love cooking pasta on Sundays.",
    "What do you remember about me? Summarize what we discussed.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She was born in 1987, her favourite colour is green and she plays the violin.",
    "Hello! How are you today? I am fine, thank you. Tell me more about yourself.",
    "We talked about travel, books, music, food, work, family and the weather.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Places: Paris, Tokyo, Lima, Oslo.",
]


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tokenizer: Any, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Any:
    """A randomly initialised `LlamaForCausalLM` sized for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,  # larger than usual so context visibly changes outputs
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny-llama"
    return model.eval()


def tiny_model_and_tokenizer(seed: int = 0, **kwargs: Any) -> tuple[Any, Any]:
    """`(model, tokenizer)`: see `tiny_model` and `tiny_tokenizer`."""
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, seed=seed, **kwargs), tokenizer
