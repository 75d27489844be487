"""Decode steps of a left-padded batch through a PlanKVCache: the serving case of a plan with gate heads.

`moa-compress bench decode` fills its caches with random keys of equal lengths (no padding). Here the
batch has rows of different lengths, left-padded, prefilled by the model with the plan applied, then
decoded greedily; every step is a real one (gate layers code the blocks each row completes and select
every row's blocks at its own length)::

    python bench/padded_decode.py [--plan smollm2-135m-instruct-mixed-b0.25] [--batch 16]
        [--lengths 1024,2048] [--steps 16] [--dtype auto]

Prints the prefill time, the median and fastest step, tokens/s and the last tokens (to compare two
versions of the code on the same batch). Uses the embedded model.
"""

from __future__ import annotations

import argparse
import time

import torch

import moa_compress as mc
from moa_compress.runtime import cache_kwarg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="smollm2-135m-instruct-mixed-b0.25")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", default="1024,2048", help="shortest,longest prompt (tokens)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, high = (int(x) for x in args.lengths.split(","))
    model, _ = mc.load_model(dtype=args.dtype)
    plan = mc.load_plan(args.plan)
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(low, high + 1, (args.batch,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros(args.batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):  # random tokens: the step's cost does not depend on the text
        ids[row, width - n :] = torch.randint(100, model.config.vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    with torch.no_grad(), mc.apply_plan(model, plan):
        cache = mc.PlanKVCache(model.config, plan, max_length=width + args.steps + 2)
        kw = {cache_kwarg(model): cache, "use_cache": True}
        start = time.perf_counter()
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw)
        prefill = time.perf_counter() - start
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(args.steps + 2):  # two untimed steps first
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            start = time.perf_counter()
            out = model(tokens, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, **kw)
            times.append(time.perf_counter() - start)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    times = sorted(times[2:])
    median = times[len(times) // 2]
    print(f"plan {args.plan}, {model.dtype}, {torch.get_num_threads()} threads")
    print(f"batch {args.batch}, prompts {min(lengths)}-{max(lengths)} tokens: prefill {prefill:.1f} s")
    print(
        f"step: median {1000 * median:.1f} ms, fastest {1000 * times[0]:.1f} ms; {args.batch / median:.1f} tokens/s"
    )
    print("last tokens", tokens[:, 0].tolist())


if __name__ == "__main__":
    main()
