"""A prompt's key blocks allocated layer-wide from sampled queries (``ranking="sampled-layer:R"``).

A plan fixes each head's density; the block mass of a prompt does not follow it: on one input a head
that the plan gave a narrow band needs a far block, on another a wide head needs little. The
``oracle-layer`` selection (:mod:`moa_compress.oracle`) shows what spending each layer's pair budget over
all its heads and rows by true block mass is worth, but it reads the dense attention map first. This
module makes the same allocation from an *estimate* a runtime can afford: per query head and query
block, the attention of ``R`` sampled queries summed per key block
(:func:`~moa_compress.gate_runtime.sampled_scores` with ``per_head=True``), scaled to the block's query
rows. Every head keeps what its rule keeps on every input (:func:`kept_blocks`: a static head its band, a
dense head everything, a gate head its sink, local window, dense tail rows and rows short enough to keep
whole); the layer's other causal blocks follow by estimated mass per pair while they fit in the plan's
pair budget for the layer at that length (the sum of its heads' rule densities), so the layer never
computes more pairs than the plan would. What moves between heads and rows is the gate heads' free
choice: the blocks their gates would have picked, now picked layer-wide (a static or dense head keeps
its rule's blocks and can gain others; a layer without gate heads is left as its rules make it).
Keeping the rules' neighbourhoods matters at short lengths: spending the whole budget by mass (the
``oracle-layer`` way, ``ranking="sampled-layer-all:R"``, ``keep_rules=False``) lost to the plan's gates
at 2K — and found far more passkeys, by moving the budget the rules' windows hold (BENCHMARKS.md).

Cost: the sampled rows' scores are ``R / block_size`` of the causal score product for every query
head, plus their softmax (BENCHMARKS.md: ``bench attention``'s "sampled-layer" columns); then the
layer's block rows as one :class:`~moa_compress.kernels.layout.BlockLayout` and one attention call.
With ``R = block_size`` (every query sampled) it allocates by exact block mass.

It serves a prompt's first call only (every query of the sequence in one call): what the plan's heads
keep for later calls and decoding steps is theirs, so the decode cache is unchanged.
"""

from __future__ import annotations

import torch

from moa_compress.gate_runtime import PrefillRanking, rows_attention, sampled_scores
from moa_compress.oracle import layer_budget, top_blocks_in_layer
from moa_compress.plan import Plan, num_blocks


def sampled_head_mass(
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE, a whole sequence
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    block_size: int,
    samples: int,
) -> torch.Tensor:  # [B, Hq, nB, nB], at least float32; 0 above the block diagonal
    """Each query head's block mass (as :func:`moa_compress.oracle.block_mass`: a block of ``r`` query
    rows holds ``r`` times their mean attention) estimated from ``samples`` sampled queries per block."""
    n = query.shape[2]
    rows = torch.full((num_blocks(n, block_size),), float(block_size), device=query.device)
    rows[-1] = n - (len(rows) - 1) * block_size  # a shorter last query block
    mean = sampled_scores(query, key, scale, block_size, samples, per_head=True).exp()
    return mean * rows[:, None].to(mean.dtype)


def kept_blocks(plan: Plan, layer: int, n: int) -> torch.Tensor:  # [H, nB, nB] bool
    """The blocks each head of ``layer`` keeps at length ``n`` whatever the input: a fixed rule's
    mask; for an input-dependent rule its sink, its local window (``local_blocks``, the diagonal with
    it), its dense tail rows and the rows that have no more causal blocks than it keeps per row."""
    bs, nb = plan.block_size, num_blocks(n, plan.block_size)
    rows = torch.arange(nb)[:, None]
    cols = torch.arange(nb)[None, :]
    causal = cols <= rows
    kept = []
    for rule in plan.rules[layer]:
        fixed = rule.block_mask(n, bs)
        if fixed is not None:
            kept.append(fixed.bool() & causal)
            continue
        per_row = rule.blocks_per_row(n, bs)
        whole = (rows < per_row) | (rows >= nb - getattr(rule, "tail", 0))
        window = cols > rows - rule.local_blocks(n, bs)
        kept.append(causal & ((cols == 0) | window | whole))
    return torch.stack(kept)


def allocated_rows(
    plan: Plan,
    layer: int,
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE, a whole sequence
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    samples: int,
    keep_rules: bool = True,
) -> torch.Tensor:  # [B, Hq, nB, nB] bool
    """The layer's block rows for a whole prompt: each head's :func:`kept_blocks` (``keep_rules=False``:
    its sink and diagonal only), then the rest of the layer's pair budget at this length over every head
    and row by estimated mass per pair (:func:`~moa_compress.oracle.top_blocks_in_layer`)."""
    n = query.shape[2]
    mass = sampled_head_mass(query, key, scale, plan.block_size, samples)
    kept = kept_blocks(plan, layer, n) if keep_rules else None
    return top_blocks_in_layer(mass, n, plan.block_size, layer_budget(plan, layer, n), kept)


def allocated_attention(
    plan: Plan,
    layer: int,
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE, a whole sequence
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,
    scale: float,
    backend: str,
    ranking: PrefillRanking,  # a layer scope: its samples, and whether the rules' blocks are kept
) -> torch.Tensor:  # [B, Hq, S, D]
    """A whole prompt's attention in ``layer`` under :func:`allocated_rows`, one block-sparse call
    (unpadded: a left-padded batch runs each row over its own tokens, see
    :meth:`moa_compress.runtime.PlanHandle.static_call`)."""
    rows = allocated_rows(plan, layer, query, key, scale, ranking.samples, ranking.keeps_rules)
    return rows_attention(rows, query, key, value, plan.block_size, scale, backend)
