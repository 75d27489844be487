"""How well a `compress` run's trained gates do on text they never saw, next to their training samples.

The search charges a gate candidate on the calibration samples the gates were trained on, so a gate
that only memorised them would look better to the search than it is. This compares, per length:

* the distillation loss KL(target ‖ softmax(gate scores)) per query-block row (the training loss);
* the recall of the gate's top-k selection at a density: the share of the row-normalised target
  (block max of the dense attention, the gate's ground truth) inside the blocks the gate keeps;
* the same recall for a sink + local band of the same k blocks per row (what a static rule keeps),

on the run's training samples (its work folder's saved targets) and on windows of the shipped
Wikipedia articles' eval split (targets computed here, one dense forward each)::

    python bench/gate_generalisation.py WORK_DIR [--density 0.25] [--windows 3]

Uses the embedded model (the one the shipped plans were made for) at its default dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from moa_compress.data import shipped_texts, token_windows
from moa_compress.gates import (
    blocks_for_density,
    distillation_loss,
    load_gates,
    sample_targets,
    select_blocks,
)
from moa_compress.models import load_model
from moa_compress.plan import StaticRule


def measure(gates, item, n: int, block_size: int, density: float) -> tuple[float, float, float]:
    """Mean over layers of (KL per row, gate recall, band recall) on one sample's targets."""
    k = blocks_for_density(density, n, block_size)
    kl = gate_recall = band_recall = 0.0
    with torch.no_grad():
        for layer, gate in enumerate(gates):
            scores = gate(
                item[f"q.{layer}"][None].float(), item[f"k.{layer}"][None].float()
            )  # [1, Hg, nB, nB]
            target = item[f"target.{layer}"].float()[None]
            kl += float(distillation_loss(scores[0], target[0]))
            gate_recall += float((target * select_blocks(scores, k)).sum(-1).mean())
            band = StaticRule(1, float((max(k, 2) - 1) * block_size), 0.0).block_mask(n, block_size)
            band_recall += float((target * band).sum(-1).mean())
    layers = len(gates)
    return kl / layers, gate_recall / layers, band_recall / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="a compress work folder (gates/ and gates-samples/)")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--windows", type=int, default=3, help="eval-split windows per length")
    args = parser.parse_args()
    model, tokenizer = load_model(None)
    gates = load_gates(args.work / "gates", model)
    block_size = gates[0].block_size
    texts = shipped_texts("eval")
    print(f"density {args.density}: mean over layers and samples; recall = target share in the kept blocks")
    print("| length | samples | KL | gate recall | band recall |")
    print("|---|---|---|---|---|")
    for folder in sorted((args.work / "gates-samples" / "train").iterdir(), key=lambda p: int(p.name)):
        n = int(folder.name)
        sets = {
            "training": [load_file(path) for path in sorted(folder.glob("*.safetensors"))],
            "eval prose": [
                sample_targets(model, torch.tensor(ids), block_size, gates[0].per_query_head)
                for ids in token_windows(texts, tokenizer, n, limit=args.windows)
            ],
        }
        for name, items in sets.items():
            rows = [measure(gates, item, n, block_size, args.density) for item in items]
            kl, gate_recall, band_recall = (sum(column) / len(rows) for column in zip(*rows, strict=True))
            print(
                f"| {n} | {name} ({len(rows)}) | {kl:.4f} | {gate_recall:.4f} | {band_recall:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
