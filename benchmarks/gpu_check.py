"""What a CPU-only CI cannot show: the CUDA path end to end, and absorption throughput on a GPU.

    python benchmarks/gpu_check.py --out gpu-out       # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --verify gpu-out    # then on a CPU, with the files it wrote

`e2e` (on the GPU): a small Llama with random weights and the in-process
tokenizer, cast to bfloat16 on CUDA, absorbs a persona chat through the
engine's one-shot path (the frozen model answers the probes, then the
student trains). It checks that every loss and adapter weight is finite and
that the loss fell, and writes the base weights, the adapter folder, and the
logits of the adapted model in float32 on one prompt. `--verify` (on a CPU)
builds the same model from those weights in float32, loads the adapter, and
compares its logits with the GPU's: the adapter a GPU trains serves on a CPU.

`speed` (on the GPU): Llama-shaped models with random bfloat16 weights
(SmolLM2-135M, Llama-3.2-1B and -3B configurations: speed does not need real
weights) each run one absorption of C (~1k tokens) into sync segments S
(`--rows` rows of about `--row-tokens` tokens, one micro-batch) for `--steps`
steps after a warm-up, timed by CUDA events (`Timed`).
Useful work is counted as `bench streaming` counts it: the linear layers'
forward and input gradients (4 x their weights a token) plus attention
(`attention_pair_flops` per query-key pair). Printed per model: seconds a
step, sync tokens a second, achieved TFLOP/s, and MFU against the bf16
matmul peak measured in the same process (8192^3 products) and against the
H100/H200 datasheet's 989 TFLOP/s (dense bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from absorber_memory import AbsorberConfig
from absorber_memory.demo import PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.testing import tiny_model, tiny_tokenizer

PREFIX = [{"role": "system", "content": SYSTEM_PROMPT}]
PROMPT = [{"role": "user", "content": "What do you remember about me?"}]
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}  # fmt: skip
DATASHEET_BF16_TFLOPS = 989.0


def e2e_model(tokenizer: Any) -> Any:
    return tiny_model(tokenizer, seed=0, hidden_size=128, layers=4)


def adapted_logits(engine: AbsorptionEngine) -> torch.Tensor:
    ids = engine.fmt.encode(PREFIX, PROMPT, add_generation_prompt=True)
    device = next(engine.model.parameters()).device
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def e2e(out: Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Absorption on `device` in `dtype` (bf16 on CUDA); writes what `verify` needs into `out`."""
    from safetensors.torch import save_file

    tokenizer = tiny_tokenizer()
    model = e2e_model(tokenizer).to(device, dtype)
    # The weights as `device` holds them (rounded to `dtype`), in float32: what `verify` rebuilds on a CPU.
    weights = {k: v.float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "base.safetensors"))
    config = AbsorberConfig(max_steps=30, lr=1e-2, probe_count=4, probe_max_new_tokens=16, device=device)
    engine = AbsorptionEngine(model, tokenizer=tokenizer, config=config)
    before = adapted_logits(engine)
    with Timed(cuda=device.startswith("cuda")) as timed:
        report = engine.run_round(PREFIX, PERSONA_CHAT, [], n_probes=4, base_teacher=True)
    lora = [p for n, p in engine.model.named_parameters() if "lora_" in n]
    finite = all(math.isfinite(v) for v in report.loss_curve) and all(bool(torch.isfinite(p).all()) for p in lora)
    engine.save_adapter(out / "adapter")
    engine.model.float()  # the same weights in float32, to compare with a CPU in float32
    after = adapted_logits(engine)
    torch.save({"logits": after, "dtype": str(dtype).removeprefix("torch.")}, out / "logits.pt")
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "dtype": str(next(p for p in lora).dtype) if lora else None,
        "compute_dtype": str(dtype),
        "finite": finite,
        "loss_curve": [round(v, 5) for v in report.loss_curve],
        "loss_fell": report.final_loss < report.initial_loss,
        "seconds": timed.seconds,
        "wall_s": timed.wall,
        "report_seconds": report.seconds,
        "adapter_moved_logits": float((after - before).abs().max()),
    }


def verify(out: Path) -> dict[str, Any]:
    """On a CPU: the GPU-trained adapter, loaded on the same base weights in float32, gives the GPU's logits."""
    from safetensors.torch import load_file

    missing = [name for name in ("base.safetensors", "adapter", "logits.pt") if not (out / name).exists()]
    if missing:
        raise SystemExit(f"--verify {out}: no {', '.join(missing)} there (write them with --out on a GPU first)")
    saved = torch.load(out / "logits.pt", weights_only=True)
    tokenizer = tiny_tokenizer()
    # The GPU run's casts, buffers too (the rotary frequencies are not in the state dict), then float32.
    model = e2e_model(tokenizer).to(getattr(torch, saved["dtype"])).float()
    model.load_state_dict(load_file(str(out / "base.safetensors")))
    engine = AbsorptionEngine(
        model, tokenizer=tokenizer, config=AbsorberConfig(device="cpu", num_threads=torch.get_num_threads())
    )
    base = adapted_logits(engine)  # B = 0: the base model
    engine.load_adapter(out / "adapter")
    cpu = adapted_logits(engine)
    gpu = saved["logits"]
    return {
        "max_abs_diff_cpu_vs_gpu": float((cpu - gpu).abs().max()),
        "max_abs_adapter_effect": float((cpu - base).abs().max()),
        "same_argmax": bool((cpu.argmax(-1) == gpu.argmax(-1)).all()),
    }


class Timed:
    """Seconds of a block by CUDA events (the GPU's own clock) and by `time.time()`, to cross-check them.

    Both wait for the GPU's queued work first, so the block's kernels are counted, not just their launches.
    """

    def __init__(self, cuda: bool = True) -> None:
        self.cuda = cuda  # False (a CPU run): `seconds` is the wall clock's

    def __enter__(self) -> Timed:
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.wall = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
        self.wall = time.time() - self.wall
        self.seconds = self.start.elapsed_time(self.end) / 1e3 if self.cuda else self.wall


def matmul_peak_tflops(size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    with Timed() as timed:
        for _ in range(repeats):
            a @ b
    return 2 * size**3 * repeats / timed.seconds / 1e12


def text_messages(tokens: int, tokenizer: Any) -> list[dict[str, str]]:
    """Persona-chat turns repeated until they hold about `tokens` tokens."""
    out: list[dict[str, str]] = []
    while sum(len(tokenizer(m["content"])["input_ids"]) for m in out) < tokens:
        out += PERSONA_CHAT
    return out


def speed(name: str, steps: int, peak: float, rows: int = 4, row_tokens: int = 512) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from absorber_memory.bench.streaming import attention_pair_flops, step_linear_flops

    tokenizer = tiny_tokenizer()
    shape = {**SHAPES[name], "max_position_embeddings": 8192}
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).eval()
    config = AbsorberConfig(
        device="cuda",
        max_steps=steps,
        losses={"l1": 1.0},
        micro_batch_tokens=4 * rows * row_tokens,  # one micro-batch (text_messages overshoots row_tokens)
        sync_recitation="off",
    )
    engine = AbsorptionEngine(model, tokenizer=tokenizer, config=config)
    context = text_messages(1024, tokenizer)
    segments = [text_messages(row_tokens, tokenizer) for _ in range(rows)]
    engine.absorber.train(PREFIX, context, segments, base_teacher=True, max_steps=2)  # warm-up
    torch.cuda.synchronize()
    engine.reset_adapter()
    with Timed() as timed:
        report = engine.absorber.train(PREFIX, context, segments, base_teacher=True)
    train = timed.seconds  # the teacher's one pass included: a little conservative
    linear = step_linear_flops(engine.model) * report.step_tokens
    attention = attention_pair_flops(engine.model)[0] * report.step_attention_pairs
    achieved = (linear + attention) / train / 1e12
    result = {
        "model": name,
        "rows": rows,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "context_tokens": report.context_tokens,
        "sync_tokens_a_step": report.sync_tokens,
        "steps": report.steps,
        "s_per_step": train / (report.steps + 1),  # the steps and the final loss's forward
        "sync_tokens_per_s": report.step_tokens / train,
        "wall_s": timed.wall,
        "report_seconds": report.seconds,
        "tflops": achieved,
        "linear_tflops": linear / train / 1e12,
        "mfu_measured_peak": achieved / peak,
        "mfu_datasheet": achieved / DATASHEET_BF16_TFLOPS,
        "finite": all(math.isfinite(v) for v in report.loss_curve),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del engine, model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="run on the GPU, writing here")
    parser.add_argument("--verify", type=Path, help="on a CPU: check the adapter a GPU run wrote here")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--e2e-only", action="store_true", help="skip the throughput measurements")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[4], help="sync segments a step (one run per value)")
    parser.add_argument("--row-tokens", type=int, default=512, help="about this many tokens a sync segment")
    args = parser.parse_args(argv)
    if args.verify:
        result = verify(args.verify)
        print(json.dumps(result, indent=2))
        return 0 if result["same_argmax"] and result["max_abs_diff_cpu_vs_gpu"] < 1e-3 else 1
    if args.out is None or not torch.cuda.is_available():
        parser.error("--out needs a CUDA GPU (or pass --verify DIR on a CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"torch": torch.__version__, "e2e": e2e(args.out)}
    print(json.dumps(result["e2e"], indent=2), flush=True)
    if args.e2e_only:
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        return 0 if result["e2e"]["finite"] else 1
    result["matmul_peak_tflops"] = matmul_peak_tflops()
    print(f"bf16 matmul peak: {result['matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    result["speed"] = []
    for name in args.models:
        for rows in args.rows:
            result["speed"].append(speed(name, args.steps, result["matmul_peak_tflops"], rows, args.row_tokens))
            print(json.dumps(result["speed"][-1]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return 0 if result["e2e"]["finite"] and all(r["finite"] for r in result["speed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
