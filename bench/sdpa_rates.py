"""How fast the fused CPU attention op runs the tile shapes the block-sparse path hands it.

The torch backend (``kernels/cpu.py``) runs a plan's bands as batches of short query tiles against
short key windows, with an additive mask where a tile's rows see different keys. This prints, per
dtype, the op's rate (query-key pairs computed per second) on dense causal attention at 8K and on such
tiles with and without a mask, so that a change of tiling can be judged against the op's own limits::

    python bench/sdpa_rates.py [--dtypes bfloat16,float32] [--threads 2]

Shapes: ``[entries, KV heads, rows, D]`` queries against ``[entries, KV heads, keys, D]`` — 27 entries
of 768 rows (a GQA group of 3 heads folded over 4 query blocks of 64) against 1216 keys is the 8K,
d = 0.25 uniform plan's main call on the embedded model; 121 × 192 rows against 384 keys its d = 0.1 one.
"""

from __future__ import annotations

import argparse
import time

import torch

OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# (entries, rows, keys): the sparse path's calls at 8K for d = 0.25 and d = 0.1, and neighbours.
TILES = ((27, 768, 1216), (27, 768, 1024), (27, 768, 1536), (13, 1536, 1472), (121, 192, 384), (121, 192, 64))


def median_ms(fn, runs: int = 5) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| dtype | call | mask | ms | G pairs/s | vs dense causal |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())

        def rnd(*shape, dtype=dtype):
            return torch.randn(*shape, generator=g).to(dtype)

        q, k, v = rnd(1, 9, 8192, 64), rnd(1, 9, 8192, 64), rnd(1, 9, 8192, 64)
        ms = median_ms(lambda q=q, k=k, v=v: OP(q, k, v, is_causal=True))
        dense = 9 * 8192 * 8192 / 2 / ms / 1e6
        print(f"| {name} | dense causal [1, 9, 8192, 64] | causal | {ms:.1f} | {dense:.2f} | 1.00 |")
        for entries, rows, keys in TILES:
            q, k, v = rnd(entries, 3, rows, 64), rnd(entries, 3, keys, 64), rnd(entries, 3, keys, 64)
            for masked in (False, True):
                mask = torch.zeros(rows, keys, dtype=dtype) if masked else None
                ms = median_ms(lambda q=q, k=k, v=v, mask=mask: OP(q, k, v, attn_mask=mask))
                rate = entries * 3 * rows * keys / ms / 1e6
                call = f"[{entries}, 3, {rows}, 64] x {keys} keys"
                print(f"| {name} | {call} | {'additive' if masked else 'none'} | {ms:.1f} | {rate:.2f} | "
                      f"{rate / dense:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
