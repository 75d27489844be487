"""`moa-compress eval` with a third oracle in place of the per-row one: each head spends its own budget.

`eval --oracle` reports two ceilings (``moa_compress.oracle``): ``oracle`` gives every query-block row of
a head the same number of blocks (the head's rule density) and picks them by attention mass;
``oracle-layer`` spends the whole layer's pairs over all its heads and rows by mass per pair. Between
them lies a ceiling this script measures: each head's own pair budget (its rule density at the length)
spent over all of *its* rows by mass per pair, so rows whose attention is concentrated give blocks to
rows whose attention is spread, but heads keep their densities. It says which of the two freedoms —
across rows or across heads — oracle-layer's lead comes from. The script runs the CLI unchanged except
that the variant labelled ``oracle`` is this per-head one::

    python bench/oracle_head.py --plan P --tasks ppl,fidelity --lengths 4096,8192 --limit 6 --oracle --out DIR
"""

from __future__ import annotations

import sys

import torch

from moa_compress import oracle
from moa_compress.plan import rule_density


def per_head_selection(self, layer: int, mass: torch.Tensor, n: int) -> torch.Tensor:
    """``OracleHandle.select`` with ``oracle`` replaced: each head's budget over its rows by mass per pair."""
    bs = self.plan.block_size
    if self.kind != "oracle":
        return oracle.top_blocks_in_layer(mass, n, bs, oracle.layer_budget(self.plan, layer, n))
    heads = []
    for h, rule in enumerate(self.plan.rules[layer]):
        budget = int(rule_density(rule, n, bs) * n * (n + 1) / 2 + 1e-6)  # as layer_budget rounds
        heads.append(oracle.top_blocks_in_layer(mass[:, h : h + 1], n, bs, budget))
    return torch.cat(heads, dim=1)


def main() -> None:
    oracle.OracleHandle.select = per_head_selection
    from moa_compress.cli import app

    sys.argv = ["moa-compress", "eval", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
