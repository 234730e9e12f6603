"""The window block of a split step two ways: the fused kernel, or matrix products keeping the probabilities.

The window block of `absorber_memory.attention` (a row's grouped queries folded, 1,101 of them, over
1,105 stored keys; three key/value heads of 64) runs forward through the fused CPU kernel and, in
the backward, recomputes the probabilities for the queries' gradient. The alternative keeps the
probabilities from a forward of plain matrix products (about 15 MB a layer at this shape) so the
backward skips the recomputation. Prints the median milliseconds of each piece.

    python benchmarks/window_block_paths.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1101)
    parser.add_argument("--keys", type=int, default=1105)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads, dim = 3, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(heads, n, dim, generator=gen) for n in (args.queries, args.keys, args.keys))
    grad_out = torch.randn(heads, args.queries, dim, generator=gen)
    scale = 1 / math.sqrt(dim)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def products_forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = torch.matmul(q, k.transpose(1, 2)).mul_(scale)
        lse = torch.logsumexp(scores, -1, keepdim=True)
        probs = scores.sub_(lse).exp_()
        return torch.matmul(probs, v), probs, lse

    out, probs, lse = products_forward()

    def dq(p: torch.Tensor) -> torch.Tensor:
        delta = (grad_out * out).sum(-1, keepdim=True)
        return torch.matmul(torch.matmul(grad_out, v.transpose(1, 2)).sub_(delta).mul_(p), k).mul_(scale)

    def dq_recomputed() -> torch.Tensor:
        return dq(torch.matmul(q, k.transpose(1, 2)).mul_(scale).sub_(lse).exp_())

    kernel = median_ms(lambda: fused(q[None], k[None], v[None], 0.0, False, scale=scale))
    print(f"forward, fused kernel:                     {kernel:6.2f} ms")
    print(f"forward, products keeping probabilities:  {median_ms(products_forward):6.2f} ms")
    print(f"queries' gradient from kept probabilities: {median_ms(lambda: dq(probs)):6.2f} ms")
    print(f"queries' gradient recomputing them:        {median_ms(dq_recomputed):6.2f} ms (untiled)")


if __name__ == "__main__":
    main()
