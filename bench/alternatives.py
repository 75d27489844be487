"""Write the plans a `compress` run compared as plan folders, so `moa-compress eval` can score them.

`compress` validates the best Pareto plan against the static-only and gate-only optima of the same
search (and the uniform plan) and writes only the winner. To compare them on other text or tasks
(BENCHMARKS.md, "Mixed plans"), export them from the run's work folder::

    python bench/alternatives.py WORK_DIR OUT_DIR
    moa-compress eval --plan OUT_DIR/static-only --tasks ppl,fidelity --lengths 2048 --limit 6

It writes ``OUT_DIR/<name>/plan.json`` (+ ``plan.safetensors``) for every alternative in
``WORK_DIR/search.json`` (``static-only``, ``gate-only``) and ``OUT_DIR/pareto-<i>`` for each Pareto
plan, and prints each one's density per length. The plan `compress` wrote is its ``OUT/plan.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa_compress.plan import save_plan
from moa_compress.workdir import SEARCH_FILE, load_search_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the compress run's work folder")
    parser.add_argument("out", type=Path, help="folder for one plan folder per alternative")
    args = parser.parse_args()

    result = load_search_stage(args.work / SEARCH_FILE)
    plans = {**result.alternatives, **{f"pareto-{i}": point for i, point in enumerate(result.points)}}
    for name, point in sorted(plans.items()):
        path = save_plan(point.plan, args.out / name, force=True)
        densities = ", ".join(f"{n}: {point.plan.density(n):.4f}" for n in result.lengths)
        print(f"{name}: {path} (density {densities})")


if __name__ == "__main__":
    main()
