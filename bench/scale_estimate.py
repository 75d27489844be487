"""Estimate profiling a 70B model on 8 GPUs from per-sample costs measured here (an estimate, not a run).

Usage: ``python bench/scale_estimate.py PROFILE_DIR [--gpu-tflops 300] [--gpu-fp32-tflops 50]``

``PROFILE_DIR`` is a ``moa-compress profile`` output of the embedded model at three or more lengths
(``profile.json`` records the measured seconds per sample). The model here:

1. Fit the measured seconds per sample at N tokens as ``a·N + b·N²``: ``a`` is the per-token cost
   (the weight matmuls of a forward and a backward, ~6 FLOPs per parameter and token), ``b`` the
   attention part (the causal maps, recomputed slab by slab in float32 by the profile's backward).
2. Scale to the target model: ``a`` by its parameter count, ``b`` by layers × query heads × head dim.
3. Turn CPU seconds into GPU seconds by the throughput ratio: the CPU's rate implied by ``a`` (FLOPs of
   6·P·N over a·N seconds) against an assumed effective GPU rate (bf16 weights; float32 attention).
4. Memory per GPU with ``--device-map auto`` over all GPUs (one process: the weights do not fit one GPU
   and ranks take one GPU each): the GPU's share of the bf16 weights plus the activations autograd
   keeps per token and layer for the backward, ~(7·hidden + 3·kv_hidden + 4·ffn) values in a Llama
   layer (the profile's attention keeps q, k, v only, never an N×N map), plus one float32 slab.
   With a device map one GPU works at a time, so the time is one GPU's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# The embedded model (SmolLM2-135M-Instruct) and a Llama-3-70B-shaped target.
SMALL = {"params": 134.5e6, "layers": 30, "heads": 9, "head_dim": 64}
TARGET = {
    "name": "70B (Llama-3-70B shape)",
    "params": 70.6e9,
    "layers": 80,
    "heads": 64,
    "kv_heads": 8,
    "head_dim": 128,
    "hidden": 8192,
    "ffn": 28672,
}
SLAB_GIB = 0.75  # the profile backward's float32 scratch (3 maps of DEFAULT_SLAB_BYTES)


def fit(seconds: dict[int, float]) -> tuple[float, float]:
    """Least squares ``t = a·N + b·N²`` (both non-negative)."""
    n = np.array(sorted(seconds), dtype=float)
    t = np.array([seconds[int(k)] for k in n])
    (a, b), *_ = np.linalg.lstsq(np.stack([n, n**2], axis=1), t, rcond=None)
    return max(a, 0.0), max(b, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--gpu-tflops", type=float, default=300.0, help="effective bf16 matmul TFLOP/s")
    parser.add_argument("--gpu-fp32-tflops", type=float, default=50.0, help="effective float32 TFLOP/s")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--lengths", default="8192,16384,32768")
    args = parser.parse_args()

    measured = json.loads((args.profile / "profile.json").read_text())["provenance"]["seconds_per_sample"]
    seconds = {int(n): float(t) for n, t in measured.items()}
    a, b = fit(seconds)
    cpu_rate = 6 * SMALL["params"] / a  # FLOP/s the CPU reached on the per-token part
    attention_scale = (TARGET["layers"] * TARGET["heads"] * TARGET["head_dim"]) / (
        SMALL["layers"] * SMALL["heads"] * SMALL["head_dim"]
    )
    a_gpu = a * TARGET["params"] / SMALL["params"] * cpu_rate / (args.gpu_tflops * 1e12)
    # The CPU ran the attention part at about its per-token rate; the GPU runs it in float32.
    b_gpu = b * attention_scale * cpu_rate / (args.gpu_fp32_tflops * 1e12)
    weights_gib = 2 * TARGET["params"] / 2**30 / args.gpus
    per_token_layer = 2 * (
        7 * TARGET["hidden"] + 3 * TARGET["kv_heads"] * TARGET["head_dim"] + 4 * TARGET["ffn"]
    )
    layers_per_gpu = TARGET["layers"] / args.gpus

    print(f"measured here (s per sample): {seconds}")
    print(f"fit: a = {a:.4g} s/token, b = {b:.4g} s/token^2; CPU per-token rate {cpu_rate / 1e9:.1f} GFLOP/s")
    print(
        f"target {TARGET['name']}, {args.gpus} GPUs x {args.gpu_memory_gib:g} GiB, assumed "
        f"{args.gpu_tflops:g} bf16 / {args.gpu_fp32_tflops:g} fp32 effective TFLOP/s per GPU\n"
    )
    print("| tokens | weights / GPU | activations / GPU | total / GPU | fits | time per sample (estimate) |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        activations = per_token_layer * n * layers_per_gpu / 2**30
        total = weights_gib + activations + SLAB_GIB
        fits = "yes" if total <= args.gpu_memory_gib else "no"
        time_s = a_gpu * n + b_gpu * n**2
        print(
            f"| {n} | {weights_gib:.1f} GiB | {activations:.1f} GiB | {total:.1f} GiB | {fits} | "
            f"{time_s:.0f} s ({a_gpu * n:.0f} s weights + {b_gpu * n**2:.0f} s attention) |"
        )


if __name__ == "__main__":
    main()
