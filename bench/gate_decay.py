"""How far a gate's fit to its calibration samples carries to samples it never saw, per AdamW weight decay.

A `compress` run trains its gates on a handful of calibration samples (6 / 2 / 2 at 2K / 4K / 8K in
the full preset) and they fit those samples far better than new text. This trains the gates of a
finished run's work folder again, once per weight decay and cross-validation fold (the samples dealt
to the folds as the gates stage deals them, :func:`moa_compress.gates.sample_folds`), and prints the
distillation loss KL(target ‖ softmax(gate scores)) per query-block row on the folds trained on and on
the fold left out, every 25 steps::

    python bench/gate_decay.py WORK_DIR [--decays 0.01,1,3,10] [--steps 300] [--folds 2]

It reads the saved targets of the work folder (``gates-samples/train``; no model forward) and the
model's shape and the run's gate settings (seed, width, learning rate, fold count) from its
``gates/gates.json``; at the run's own decay and steps the last row is the held-out KL the run recorded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from moa_compress.gates import GateSettings, _loss_of_all, _make_gates, _mean_loss, sample_folds
from moa_compress.plan import ModelIdentity


def read_samples(work: Path) -> tuple[dict, dict[int, list[dict[str, torch.Tensor]]]]:
    """The gates record and each length's saved targets, in sample order."""
    record = json.loads((work / "gates" / "gates.json").read_text())
    samples: dict[int, list[dict[str, torch.Tensor]]] = {}
    for n in sorted(int(k) for k in record["samples"]):
        samples[n] = []
        for i in range(record["samples"][str(n)]):
            with safe_open(
                str(work / "gates-samples" / "train" / str(n) / f"sample-{i:04d}.safetensors"), "pt"
            ) as f:
                samples[n].append({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 - no dict
    return record, samples


def curve(record: dict, inside: list, left_out: list, settings: GateSettings, every: int) -> list[tuple]:
    """Train on ``inside`` as the gates stage does; (step, KL inside, KL left out) every ``every`` steps."""
    gates = _make_gates(ModelIdentity(**record["model"]), settings, record["rope_theta"])
    params = [p for gate in gates for p in gate.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    points = []
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad()
        loss = _loss_of_all(gates, inside)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == settings.steps:
            points.append((step, _mean_loss(gates, inside), _mean_loss(gates, left_out)))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="a compress work folder (gates/ and gates-samples/)")
    parser.add_argument("--decays", default="0.01,1,3,10", help="weight decays, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's own")
    parser.add_argument("--folds", type=int, default=None, help="default: the run's own fold count")
    parser.add_argument("--every", type=int, default=25, help="steps between measurements")
    args = parser.parse_args()
    record, samples = read_samples(args.work)
    args.steps = args.steps or record["settings"]["steps"]
    args.folds = args.folds or (record.get("folds") or {}).get("count", 2)
    if args.folds < 2:
        parser.error("--folds must be at least 2 (a fold left out needs a fold to train on)")
    dealt = sample_folds({n: len(v) for n, v in samples.items()}, args.folds)
    items = [(item, f) for n in sorted(samples) for item, f in zip(samples[n], dealt[n], strict=True)]
    print(
        f"{args.work}: {sum(len(v) for v in samples.values())} samples at {sorted(samples)}, {args.folds} folds"
    )
    print("| weight decay | step | KL on the samples trained on | KL on the fold left out |")
    print("|---|---|---|---|")
    for decay in (float(d) for d in args.decays.split(",")):
        # The run's own settings (seed, gate_dim, lr, ...) but the steps and decay asked for.
        settings = GateSettings(**{**record["settings"], "steps": args.steps, "weight_decay": decay})
        started = time.perf_counter()
        runs = []
        for fold in range(args.folds):
            inside = [item for item, f in items if f != fold]
            left_out = [item for item, f in items if f == fold]
            runs.append(curve(record, inside, left_out, settings, args.every))
        for points in zip(*runs, strict=True):
            trained = sum(p[1] for p in points) / len(points)
            held = sum(p[2] for p in points) / len(points)
            print(f"| {decay:g} | {points[0][0]} | {trained:.4f} | {held:.4f} |")
        print(f"(weight decay {decay:g}: {time.perf_counter() - started:.0f} s for {args.folds} folds)")


if __name__ == "__main__":
    main()
