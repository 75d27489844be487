"""Where a plan's KL to dense comes from, by layer range, and how much of it better block choice there
would win: the eval's fidelity (KL of each next-token distribution to dense, mean over tokens) on its
prose windows, for the plan or the per-row oracle at the plan's densities, on edits of the plan.

Each variant is ``SELECTION@EDITS``: ``SELECTION`` is ``plan``, an oracle of :mod:`moa_compress.oracle`
(``oracle``, ``oracle-layer``) at the edited plan's per-head densities (``oracle-layer~sampled:16``: from
block mass estimated by 16 sampled queries per block and query head), the runtime's allocation that does
the same (``sampled-layer:16``, ``apply_plan(..., ranking="sampled-layer:16")``), or a source of block scores for
the plan's gate heads in place of the trained gates (``bench/gate_sources.py``: ``mean``, ``bound``,
``sampled:R``, ``mass``, ``mass-head``); ``--local W`` gives every gate head of the
``plan`` and source variants a local window of W blocks, ``--source-layers LO-HI`` confines the sources to
those layers (the plan's gates elsewhere). ``EDITS`` are those of
``bench/passkey_layers.py`` (``plan`` for none; ``only:20-29`` the plan on layers 20–29 and every other
layer dense). Usage::

    python bench/fidelity_layers.py --plan PLAN --length 8192 --limit 6 plan@plan oracle@plan \\
        plan@only:20-29 oracle@only:20-29

Prints one line per variant: the KL over all windows' scored tokens (each window's second half, as the
eval scores them), per window, and the edited plan's density
at the length. The windows are ``moa-compress eval``'s for ``--lengths N --limit K`` (the eval split of
the shipped articles), so ``plan@plan`` is the eval's ``fidelity`` KL of the plan at N.
"""

from __future__ import annotations

import argparse

import torch
from gate_sources import is_source
from passkey_layers import edited, is_estimated_oracle, is_layer_ranking, layer_range, selected

from moa_compress.data import token_windows
from moa_compress.evaluate import _Sums, default_texts, final_hidden, score_window
from moa_compress.models import load_model
from moa_compress.oracle import ORACLES
from moa_compress.plan import load_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--limit", type=int, default=6, help="windows (the eval's --limit)")
    parser.add_argument("--local", type=int, default=None, help="every gate head's local window (blocks)")
    parser.add_argument(
        "--source-layers", type=layer_range, default=None, help="LO-HI: the layers a gate source scores"
    )
    parser.add_argument("variants", nargs="+", help="SELECTION@EDITS (module docstring)")
    args = parser.parse_args()
    parsed = {name: name.partition("@")[::2] for name in args.variants}  # name -> (SELECTION, EDITS)
    for name, (selection, edits) in parsed.items():
        if (
            not (
                selection in ("plan", *ORACLES)
                or is_source(selection)
                or is_estimated_oracle(selection)
                or is_layer_ranking(selection)
            )
            or not edits
        ):
            parser.error(
                f"a variant is SELECTION@EDITS with SELECTION plan, an oracle or a gate source, got {name!r}"
            )
    plan = load_plan(args.plan)
    model, tokenizer = load_model(None)
    variants = {name: (selection, edited(plan, edits)) for name, (selection, edits) in parsed.items()}
    texts, _ = default_texts()
    windows = token_windows(texts, tokenizer, args.length, limit=args.limit)
    sums = {name: _Sums() for name in variants}
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])  # [1, N]
            n, half = ids.shape[1], ids.shape[1] // 2  # the eval scores each window's second half
            reference = final_hidden(model, ids)[half - 1 : n - 1]
            targets = ids[0, half:]
            for name, (selection, variant) in variants.items():
                with selected(model, variant, selection, args.source_layers, args.local):
                    hidden = final_hidden(model, ids)[half - 1 : n - 1]
                score_window(model, hidden, targets, reference, sums[name])
    for name, (_, variant) in variants.items():
        result = sums[name].fidelity()
        per_window = " ".join(f"{kl:.4f}" for kl in result["window_kl"])
        print(
            f"{args.length}  {name}: KL {result['kl']:.4f}  windows [{per_window}]"
            f"  density {variant.density(args.length):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
