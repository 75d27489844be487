"""Any `moa-compress` command with the gates distilled from block attention *mass* instead of its max.

The gates' ground truth (:func:`moa_compress.gates.block_targets`) is SeerAttention's: the 2-D max-pool of
each head's softmax attention over a block, the max over a KV group's query heads, each row normalised.
A max says which blocks hold a sharp peak, not how much of a row's attention they hold, which is what
the attention-mass oracles rank by. This runs the CLI with the target replaced by the mass: the
attention summed over each block (:func:`moa_compress.oracle.block_mass`), averaged over the group's
query heads (rows still sum to 1)::

    python bench/mass_targets.py compress --budget 0.25 --force --out DIR --work WORK
    python bench/mass_targets.py train-gates ...

A work folder's saved gate targets are keyed by model and block size, not by this choice: give the
command a work folder without ``gates-samples`` (and without the stages after it) so they are made
again — and do not hand a folder this script filled to a plain `moa-compress compress`, which would
reuse its mass targets without knowing.
"""

from __future__ import annotations

import sys

import torch

from moa_compress import gates


def block_targets_mass(
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    block_size: int,
    per_query_head: bool = False,
    slab_bytes: int = gates.DEFAULT_SLAB_BYTES,
) -> torch.Tensor:  # [B, H_gate, nB, nB]
    """:func:`moa_compress.gates.block_targets`' contract with block mass in place of block max."""
    mass = gates.pooled_attention(query, key, scale, block_size, "sum", slab_bytes)
    if not per_query_head:
        b, hq, nb, _ = mass.shape
        mass = mass.view(b, key.shape[1], hq // key.shape[1], nb, nb).mean(2)
    return mass / mass.sum(-1, keepdim=True)


def main() -> None:
    gates.block_targets = block_targets_mass  # looked up at call time by the target capture
    from moa_compress.cli import app

    sys.argv = ["moa-compress", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
