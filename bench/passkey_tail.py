"""Where does a sparse plan lose passkey retrieval: in the prompt's prefill, in its last tokens, or in
decoding? Greedy passkey replies (the eval's 30 prompts per length: a 5-digit key in filler, asked
through the chat template) with the plan applied to parts of the work only:

* ``dense``: no plan;
* ``plan prefill, dense decode``: the prompt prefilled under the plan, the reply decoded densely;
* ``plan prefill but the last M, dense decode``: the prompt's first tokens prefilled under the plan, its
  last ``M`` tokens (through the same cache) and the reply densely.

A reply is correct when it holds the key. Usage::

    python bench/passkey_tail.py --plan PLAN [--lengths 1024] [--tails 16,64,128] [--samples 30]

Prints one line per length and variant: accuracy over all keys and per depth.
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache

from moa_compress.evaluate import decoder_body, log_probs
from moa_compress.models import load_model
from moa_compress.plan import load_plan
from moa_compress.runtime import apply_plan
from moa_compress.tasks import passkey_samples


def prompt_state(model, prompt: list[int], plan, dense_last: int | None):
    """``(cache, hidden [1, S, hidden])`` after ``prompt``: its tokens under ``plan`` except its last
    ``dense_last`` (None: all of them under the plan; no plan: all dense)."""
    from moa_compress.runtime import cache_kwarg

    body = decoder_body(model)
    cache = DynamicCache(config=model.config)
    name = cache_kwarg(body)
    ids = torch.tensor([prompt])
    split = 0 if plan is None else len(prompt) if dense_last is None else max(0, len(prompt) - dense_last)
    hidden = None
    with torch.no_grad():
        if split > 0:
            with apply_plan(model, plan):
                hidden = body(input_ids=ids[:, :split], use_cache=True, **{name: cache}).last_hidden_state
        if split < len(prompt):
            positions = torch.arange(split, len(prompt))[None]
            hidden = body(
                input_ids=ids[:, split:], position_ids=positions, use_cache=True, **{name: cache}
            ).last_hidden_state
    return cache, hidden


def greedy_key(model, prompt: list[int], plan, dense_last: int | None, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` (:func:`prompt_state`), decoded densely."""
    from moa_compress.runtime import cache_kwarg

    body = decoder_body(model)
    name = cache_kwarg(body)
    cache, hidden = prompt_state(model, prompt, plan, dense_last)
    out = []
    with torch.no_grad():
        token = log_probs(model, hidden[:, -1]).argmax(-1)  # [1]
        for step in range(steps):
            out.append(int(token))
            positions = torch.tensor([[len(prompt) + step]])
            hidden = body(
                input_ids=token[:, None], position_ids=positions, use_cache=True, **{name: cache}
            ).last_hidden_state
            token = log_probs(model, hidden[:, -1]).argmax(-1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--tails", default="16,64,128", help="M values: prompt tokens prefilled densely")
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    plan = load_plan(args.plan)
    model, tokenizer = load_model(None)
    variants = [("dense", None, None), ("plan prefill, dense decode", plan, None)]
    variants += [
        (f"plan prefill but the last {m}, dense decode", plan, int(m)) for m in args.tails.split(",")
    ]
    for n in (int(x) for x in args.lengths.split(",")):
        keys = passkey_samples(tokenizer, n, args.samples, 0)
        for name, chosen, dense_last in variants:
            correct = []
            for sample in keys:
                prompt = list(sample.input_ids[: sample.key_start])
                steps = len(sample.input_ids) - sample.key_start + 1
                reply = tokenizer.decode(
                    greedy_key(model, prompt, chosen, dense_last, steps), skip_special_tokens=True
                )
                correct.append(sample.key in reply.replace(" ", ""))
            by_depth: dict[float, list[bool]] = {}
            for sample, ok in zip(keys, correct, strict=True):
                by_depth.setdefault(sample.depth, []).append(ok)
            depths = ", ".join(f"{d:g}: {sum(v)}/{len(v)}" for d, v in sorted(by_depth.items()))
            print(f"{n}  {name}: {sum(correct)}/{len(correct)} ({depths})", flush=True)


if __name__ == "__main__":
    main()
