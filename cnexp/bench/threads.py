"""python -m cnexp.bench.threads: what a torch.set_num_threads call costs CPU attention.

On the project's CPU build (torch 2.14.1) a set_num_threads call, even with the count already in
force, leaves scaled_dot_product_attention at about one thread's speed; convolutions keep their
speed. cnexp therefore sets the count only where it changes (cnexp.run.context.set_threads).
Run in a fresh process: it times attention (forward + backward) and a convolution as the
process starts, then after set_num_threads(the same count), and prints the ratios.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

REPEATS = 300


def timed(step, repeats: int = REPEATS) -> float:
    """Seconds per call of `step`, after a warm-up."""
    for _ in range(repeats // 10):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def workloads() -> dict:
    """name -> one call: SDXL-tiny's attention shape, forward and backward; a 3x3 convolution."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(16, 4, 64, 16, requires_grad=True) for _ in range(3))
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(16, 64, 16, 16)
    return {"attention fwd+bwd (16, 4, 64, 16)": lambda: F.scaled_dot_product_attention(
                q, k, v).sum().backward(),
            "conv 3x3 64->64 on (16, 64, 16, 16)": lambda: conv(x)}


def main() -> None:
    threads = torch.get_num_threads()
    calls = workloads()
    fresh = {name: timed(step) for name, step in calls.items()}
    torch.set_num_threads(threads)  # the count already in force
    after = {name: timed(step) for name, step in calls.items()}
    print(f"torch {torch.__version__}, {threads} threads")
    for name in calls:
        print(f"{name:38s} fresh {1e3 * fresh[name]:.3f} ms   after set_num_threads({threads}) "
              f"{1e3 * after[name]:.3f} ms   ratio {after[name] / fresh[name]:.2f}x")


if __name__ == "__main__":
    main()
