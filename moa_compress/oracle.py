"""Oracle selections: per input, the key blocks that carry the most true attention, at a plan's density.

An oracle is no plan: it reads each layer's full attention map before choosing, so it cannot run
without computing dense attention first. It answers "how much better could a block selection at this
density be?" — the ceiling a plan (static or gated) is measured against in ``moa-compress eval
--oracle``.

Per layer call (a full causal prefill, no cache) the attention function here computes the **block
mass** of the layer's own queries and keys (after RoPE): the causal softmax attention summed over each
``block_size × block_size`` block, per query head — each query row's mass sums to 1, so a query block
of ``r`` rows holds mass ``r``. Two selections, both keeping every query-block row's sink (block 0)
and diagonal block:

* ``oracle`` — per query head ``h`` and row, the ``k_h - 2`` other blocks of most mass, where
  ``k_h = blocks_for_density(rule_density(rule_h, N), N)``: the head computes the pairs its own plan
  rule computes (exactly for sink + band rules and gate rules without a dense tail; never more for any
  rule: a tailed gate's density is spread over every row);
* ``oracle-layer`` — the layer's pair budget ``Σ_h rule_density(rule_h, N) · N(N+1)/2`` spent over
  all its heads and rows at once: after every row's sink and diagonal, the remaining causal blocks in
  order of **mass per pair** (mean attention probability; the same order as mass for full blocks, and
  fair to the shorter last query block), as long as the next block still fits. It never exceeds the
  budget and leaves less than one block of it unspent. (Every rule kind keeps at least the sink and
  the diagonal, so those always fit.)

Then the selection becomes a :class:`~moa_compress.kernels.layout.BlockLayout` and the layer runs
:func:`moa_compress.attention.block_sparse_attention` on it, like a plan.

Memory: one layer at a time, and within it one slab of query rows' ``[B, Hq, rows, N]`` float32
probabilities (about ``slab_bytes``) plus the ``[B, Hq, nB, nB]`` block masses.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from moa_compress.attention import block_sparse_attention
from moa_compress.attn_interface import use_attention
from moa_compress.errors import PlanRuntimeError
from moa_compress.gates import DEFAULT_SLAB_BYTES, blocks_for_density, pooled_attention
from moa_compress.kernels.layout import BlockLayout, causal_mask
from moa_compress.plan import Plan, causal_block_pairs, rule_density

ORACLES = ("oracle", "oracle-layer")
_names = itertools.count()


# ----------------------------------------------------------------------------------------------
# Block mass


def block_mass(
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    block_size: int,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> torch.Tensor:  # [B, Hq, nB, nB], at least float32; 0 above the block diagonal
    """Causal softmax attention summed over each ``block_size × block_size`` block, per query head, in
    slabs of query rows of about ``slab_bytes`` (:func:`~moa_compress.gates.pooled_attention`)."""
    return pooled_attention(query, key, scale, block_size, "sum", slab_bytes)


# ----------------------------------------------------------------------------------------------
# Selections


def _causal_and_forced(nb: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(nb, device=device)[:, None]
    cols = torch.arange(nb, device=device)[None, :]
    causal = cols <= rows
    return causal, causal & ((cols == 0) | (cols == rows))


def head_blocks(plan: Plan, layer: int, n: int) -> torch.Tensor:  # [H] int64
    """Key blocks per query-block row of each head of ``layer`` at length ``n`` for the ``oracle``:
    the most whose :func:`~moa_compress.plan.selection_density` stays within the head's rule density."""
    return torch.tensor(
        [
            blocks_for_density(rule_density(r, n, plan.block_size), n, plan.block_size)
            for r in plan.rules[layer]
        ]
    )


def layer_budget(plan: Plan, layer: int, n: int) -> int:
    """Causal (query, key) pairs the plan computes in ``layer`` at length ``n``, over all its heads."""
    density = sum(rule_density(r, n, plan.block_size) for r in plan.rules[layer])
    return math.floor(density * n * (n + 1) / 2 + 1e-6)  # pair counts are integers; absorb rounding


def top_blocks_per_row(
    mass: torch.Tensor,  # [B, H, nB, nB]
    blocks: torch.Tensor,  # [H] int: key blocks per row of each head (at least 2 counts as 2)
) -> torch.Tensor:  # [B, H, nB, nB] bool
    """Every row keeps its sink, its diagonal and its ``blocks[h] - 2`` other blocks of most mass;
    rows with at most ``blocks[h]`` causal blocks keep them all."""
    b, h, nb, _ = mass.shape
    causal, forced = _causal_and_forced(nb, mass.device)
    ranked = mass.masked_fill(~causal, float("-inf")).masked_fill(forced, float("inf"))
    blocks = blocks.to(mass.device).clamp(min=2)
    take = min(int(blocks.max()), nb)
    top = ranked.topk(take, dim=-1).indices  # [B, H, nB, take]
    keep = torch.arange(take, device=mass.device) < blocks[:, None, None]  # [H, 1, take]
    mask = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=mass.device)
    mask.scatter_(-1, torch.where(keep[None], top, torch.full_like(top, nb)), True)  # drops -> spare column
    return mask[..., :nb] & causal


def top_blocks_in_layer(
    mass: torch.Tensor,  # [B, H, nB, nB]
    n: int,
    block_size: int,
    budget: int,  # causal pairs the whole layer may compute, per sequence
    kept: torch.Tensor | None = None,  # [H, nB, nB] bool: the blocks each head keeps, if not sink + diagonal
) -> torch.Tensor:  # [B, H, nB, nB] bool
    """Every row of every head keeps its sink and diagonal (or, given ``kept``, its head's ``kept``
    blocks); then the layer's other causal blocks by mass per pair, best first, while the next one still
    fits in ``budget`` pairs (per sequence)."""
    b, h, nb, _ = mass.shape
    causal, forced = _causal_and_forced(nb, mass.device)
    forced = forced.expand(h, nb, nb) if kept is None else kept.to(mass.device) & causal
    pairs = causal_block_pairs(n, block_size).to(mass.device)  # [nB, nB] float64
    spare = budget - float((pairs * forced).sum())
    candidate = (causal & ~forced).expand(b, h, nb, nb).reshape(b, -1)
    per_pair = (mass.double() / pairs.clamp(min=1)).reshape(b, -1).masked_fill(~candidate, float("-inf"))
    order = per_pair.argsort(dim=-1, descending=True, stable=True)
    cost = pairs.expand(h, nb, nb).reshape(-1)[order] * candidate.gather(1, order)  # [B, H*nB*nB]
    chosen = candidate.gather(1, order) & (cost.cumsum(-1) <= spare)
    mask = torch.zeros_like(candidate).scatter_(1, order, chosen)
    return mask.view(b, h, nb, nb) | forced


# ----------------------------------------------------------------------------------------------
# The attention function


class OracleHandle:
    """An oracle applied to a model (see :func:`apply_oracle`); counts the pairs it computes."""

    def __init__(self, model: Any, plan: Plan, kind: str, backend: str, slab_bytes: int):
        self.model, self.plan, self.kind, self.backend = model, plan, kind, backend
        self.slab_bytes = slab_bytes
        self.name = f"moa_oracle_{next(_names)}"
        self.pairs = 0.0  # computed (query, key) pairs, over every layer, head and call
        self.causal_pairs = 0.0  # the causal pairs those calls had

    @property
    def density(self) -> float:
        """Mean fraction of the causal pairs computed over all calls so far (layers, heads, inputs)."""
        return self.pairs / self.causal_pairs if self.causal_pairs else math.nan

    def select(self, layer: int, mass: torch.Tensor, n: int) -> torch.Tensor:  # [B, H, nB, nB] bool
        if self.kind == "oracle":
            return top_blocks_per_row(mass, head_blocks(self.plan, layer, n))
        return top_blocks_in_layer(mass, n, self.plan.block_size, layer_budget(self.plan, layer, n))

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, Hq, S, D], after RoPE
        key: torch.Tensor,  # [B, Hkv, S, D]
        value: torch.Tensor,  # [B, Hkv, S, D]
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:  # ([B, S, Hq, D], None)
        n = query.shape[2]
        if not isinstance(key, torch.Tensor) or key.shape[2] != n:
            raise PlanRuntimeError("an oracle needs a full causal prefill of one call (no KV cache)")
        if attention_mask is not None:
            mask = attention_mask[..., :n]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            if not bool((allowed == causal_mask(n, n, allowed.device)).all()):
                raise PlanRuntimeError("an oracle runs unpadded inputs only (one sequence or equal lengths)")
        if dropout:
            raise PlanRuntimeError("attention dropout is not supported with an oracle; call model.eval()")
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        bs = self.plan.block_size
        mass = block_mass(query, key, scale, bs, self.slab_bytes)
        selected = self.select(module.layer_idx, mass, n)
        pairs = causal_block_pairs(n, bs).to(selected.device)
        self.pairs += float((selected * pairs).sum())
        self.causal_pairs += float(selected.shape[0] * selected.shape[1] * n * (n + 1) / 2)
        layout = BlockLayout.from_block_mask(selected, bs, n, n)
        out = block_sparse_attention(query, key, value, layout, scale=scale, backend=self.backend)
        return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def apply_oracle(
    model: Any, plan: Plan, kind: str, *, backend: str = "auto", slab_bytes: int = DEFAULT_SLAB_BYTES
) -> Iterator[OracleHandle]:
    """Run the ``kind`` oracle (one of :data:`ORACLES`) at ``plan``'s per-head densities in ``model``'s
    attention for the body; the model's attention implementation is restored on exit.

    Example::

        with torch.no_grad(), apply_oracle(model, plan, "oracle-layer") as oracle:
            logits = model(input_ids).logits
        print(oracle.density)  # <= plan.density(input_ids.shape[1])
    """
    if kind not in ORACLES:
        raise PlanRuntimeError(f"unknown oracle {kind!r}; expected one of {', '.join(ORACLES)}")
    handle = OracleHandle(model, plan, kind, backend, slab_bytes)
    # padding_mask: padded input then arrives with its mask, which the oracle refuses.
    with use_attention(model, handle.name, handle.attention, padding_mask=True, model_windows=True):
        yield handle
