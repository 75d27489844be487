"""Decode speed and KV-cache memory: dense vs a plan with a full cache vs a plan with PlanKVCache.

Prefills ``--length`` tokens once per configuration, then times ``--steps`` single-token decode
steps (greedy, fed back) and prints a table (or ``--json``): median ms per token and the bytes the
cache holds at the end. The plan is the uniform sink + window baseline at ``--density``. Token ids
are random (seeded): decode time does not depend on the text.

    python bench/decode.py --length 4096 --density 0.25 --backend reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from moa_compress.models import load_model
from moa_compress.plan import identity_of, uniform_plan
from moa_compress.runtime import PlanKVCache, apply_plan, cache_kwarg


def cache_bytes(cache) -> int:
    if isinstance(cache, PlanKVCache):
        return cache.memory()["stored_bytes"]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def decode(model, prompt: torch.Tensor, cache, steps: int) -> tuple[list[float], int]:
    """Prefill, then ``steps`` timed single-token steps; returns (seconds per step, cache bytes)."""
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        token = model(prompt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            token = model(token, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return times, cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model spec (default: embedded SmolLM2)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    plan = uniform_plan(identity_of(model), args.density, [args.length])
    prompt = torch.randint(
        0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0)
    )

    rows = {}
    times, nbytes = decode(model, prompt, DynamicCache(config=model.config), args.steps)
    rows["dense (sdpa, full cache)"] = (times, nbytes)
    with apply_plan(model, plan, backend=args.backend):
        rows["plan, full cache"] = decode(model, prompt, DynamicCache(config=model.config), args.steps)
        rows["plan, PlanKVCache"] = decode(model, prompt, PlanKVCache(model.config, plan), args.steps)

    full = rows["dense (sdpa, full cache)"][1]
    result = {
        "length": args.length,
        "density": round(plan.density(args.length), 4),
        "backend": args.backend,
        "dtype": args.dtype,
        "steps": args.steps,
        "threads": args.threads,
        "rows": {
            name: {"ms_per_token": 1000 * statistics.median(t), "cache_bytes": b, "cache_fraction": b / full}
            for name, (t, b) in rows.items()
        },
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"decode after a {args.length}-token prompt, plan density {result['density']}, "
        f"backend {args.backend}, {args.dtype}, {args.threads} threads, median of {args.steps} steps"
    )
    print(f"{'configuration':<26} {'ms/token':>9} {'cache MiB':>10} {'of full':>8}")
    for name, row in result["rows"].items():
        mib = row["cache_bytes"] / 2**20
        print(f"{name:<26} {row['ms_per_token']:>9.1f} {mib:>10.2f} {row['cache_fraction']:>8.1%}")


if __name__ == "__main__":
    main()
