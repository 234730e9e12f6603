"""Training beside generation in one process: does sharing the cores waste work?

A training thread runs absorption-sized steps (forward and backward over 367 tokens with every
layer's hidden states, gradients into one projection) on a replica of the default model while the
main thread generates 24 tokens after a 300-token prompt, as an agent's turn does during a
background round. Prints each alone, then together: generation's seconds and the steps finished
meanwhile, and the work done per second together relative to running the same work one after the
other (above 1: overlapping wastes nothing; below 1: the threads slow each other more than they share).

    python benchmarks/overlap.py --threads 2
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from absorber_memory.models import load_model, replica, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    set_threads(args.threads)
    model, _ = load_model()
    trained = replica(model)
    for p in trained.parameters():
        p.requires_grad_(False)
    trained.model.layers[-1].mlp.down_proj.weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    ids, prompt = torch.randint(100, 20000, (1, 367), generator=gen), torch.randint(100, 20000, (1, 300), generator=gen)

    def step() -> None:
        out = trained(input_ids=ids, output_hidden_states=True)
        sum(h.abs().mean() for h in out.hidden_states).backward()

    def turn() -> None:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)

    step()  # warm-up
    turn()
    start = time.perf_counter()
    for _ in range(4):
        step()
    step_s = (time.perf_counter() - start) / 4
    start = time.perf_counter()
    for _ in range(args.turns):
        turn()
    turn_s = (time.perf_counter() - start) / args.turns
    stop, done = threading.Event(), [0]

    def training() -> None:
        while not stop.is_set():
            step()
            done[0] += 1

    worker = threading.Thread(target=training)
    worker.start()
    time.sleep(1.0)
    before, start = done[0], time.perf_counter()
    for _ in range(args.turns):
        turn()
    both_s, steps = time.perf_counter() - start, done[0] - before
    stop.set()
    worker.join()
    print(f"alone: a step {step_s:.2f} s, a turn {turn_s:.2f} s")
    print(
        f"together: a turn {both_s / args.turns:.2f} s ({both_s / args.turns / turn_s - 1:+.0%}), "
        f"{steps} steps finished in the {both_s:.1f} s of {args.turns} turns"
    )
    print(f"work per second together / one after the other: {(args.turns * turn_s + steps * step_s) / both_s:.2f}")


if __name__ == "__main__":
    main()
