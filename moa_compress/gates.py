"""Learned block gates (SeerAttention-style): which key blocks a query block needs, from pooled Q and K.

A gate per layer looks at the layer's queries and keys *before* RoPE, pooled over blocks of
``block_size`` tokens — queries by their mean, keys by their mean, max and min (concatenated, so a
block with one sharp key still stands out) — projects them per head with small linear maps to
``gate_dim``, applies RoPE at the blocks' first positions (so the score can still prefer nearby
blocks), and scores ``q · kᵀ / √gate_dim`` with a block-causal mask → ``[B, H_gate, nQ, nK]``.

GQA: by default a gate head per **KV group** (its query heads' pooled queries averaged), so one
selection serves every query head that shares the KV head — a decode cache can then keep one set of
blocks per KV head. ``per_query_head=True`` gives every query head its own gate head instead.

Ground truth, from the dense model (:func:`block_targets`): per head, the 2-D max-pool of the
softmax attention over each ``block_size × block_size`` block, each query-block row normalised to
sum 1; for a KV group, the max over its query heads before normalising. Computed layer by layer and
slab by slab of query rows (the profiler's way), so memory holds one slab of one layer's map.

Training (:func:`train_gates`): distillation, ``KL(target ‖ softmax(gate scores))`` per query-block
row, the base model frozen (only the gates see gradients), AdamW. The targets and pooled Q/K of each
sample are computed once (one dense forward) and kept in the work folder, so an interrupted run
resumes without another forward.

Files (:func:`save_gates`): ``gates.safetensors`` with ``layers.{i}.q_proj`` ``[H_gate, D, gate_dim]``
and ``layers.{i}.k_proj`` ``[H_gate, 3·D, gate_dim]`` float32 (cross-fitting gates, when trained, as
``folds.{f}.layers.{i}.*``), and ``gates.json`` recording those shapes and dtype, the settings, the model
identity, the loss curve and each sample's fold. No pickle.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moa_compress.attn_interface import use_attention
from moa_compress.data import CalibrationSample, progress_steps
from moa_compress.errors import UserInputError
from moa_compress.plan import (
    ModelIdentity,
    atomic_write_bytes,
    blocks_for_density,  # noqa: F401 - re-exported; the density math lives with GateRule
    identity_of,
    num_blocks,
    selection_density,  # noqa: F401 - re-exported
    text_config,
)

GATES_FILE = "gates.json"
GATES_TENSORS = "gates.safetensors"
FORMAT = "moa-compress-gates"
SCHEMA_VERSION = 1
ATTENTION_NAME = "moa_compress_gate_targets"
DEFAULT_SLAB_BYTES = 128 * 2**20  # float32 scratch of one slab of query rows in pooled_attention


class GateError(UserInputError):
    """Gate settings or files that cannot be used."""


# ----------------------------------------------------------------------------------------------
# Pooling and the gate


def _split_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [B, H, S, D]`` as its whole blocks ``[B, H, S // bs, bs, D]`` (a view where the strides allow)
    and the ragged rest ``[B, H, S % bs, D]`` (None when S is a multiple of the block)."""
    b, h, s, d = x.shape
    whole = s // block_size
    blocks = x[:, :, : whole * block_size].reshape(b, h, whole, block_size, d)
    return blocks, (x[:, :, whole * block_size :] if s % block_size else None)


def pool_queries(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``q [B, H, S, D]`` over each block of tokens -> ``[B, H, nB, D]`` (a ragged last block
    averages the tokens it has), summed and returned in float32 at least (a bfloat16 input is read
    once, never copied whole to float32 or padded)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    blocks, rest = _split_blocks(q, block_size)
    if q.dtype == acc:
        mean = blocks.sum(3).div_(block_size)
    else:  # summed in float32 ~4 MB of it at a time: the op casts its input to float32 first, and one
        # fresh input-sized float32 copy (tens of MB at 8K) costs more in page faults than the sum
        per_head = blocks[:, :1].numel() * 4  # bytes of one head's float32 copy, every batch row
        step = max(1, (4 << 20) // max(1, per_head))  # heads per piece
        mean = torch.cat(
            [blocks[:, h : h + step].sum(3, dtype=acc) for h in range(0, blocks.shape[1], step)], dim=1
        ).div_(block_size)
    if rest is None:
        return mean
    return torch.cat([mean, rest.sum(2, keepdim=True, dtype=acc).div_(rest.shape[2])], dim=2)


def pool_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean, max and min of ``k [B, H, S, D]`` over each block -> ``[B, H, nB, 3·D]``, in float32 at
    least (max and min taken in the input's dtype, where they are exact)."""
    acc = torch.promote_types(k.dtype, torch.float32)
    blocks, rest = _split_blocks(k, block_size)
    high, low = blocks.amax(3), blocks.amin(3)
    if rest is not None:
        high = torch.cat([high, rest.amax(2, keepdim=True)], dim=2)
        low = torch.cat([low, rest.amin(2, keepdim=True)], dim=2)
    return torch.cat([pool_queries(k, block_size), high.to(acc), low.to(acc)], dim=-1)


@functools.lru_cache(maxsize=64)
def _rope_frequencies(half: int, theta: float, device: torch.device) -> torch.Tensor:  # [half] float32
    """``theta ** (-i / half)``, made once per shape and device (a decode step rotates at every token)."""
    return theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (half-split convention) of ``x [B, H, n, E]`` at ``positions [n]`` (shared by the batch) or
    ``[B, n]`` (each batch row its own, e.g. the rows of a left-padded batch)."""
    half = x.shape[-1] // 2
    freqs = _rope_frequencies(half, theta, x.device)
    angles = positions.to(torch.float32)[..., None] * freqs  # [n, E/2] or [B, n, E/2]
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, n, E/2]: every head of a row at the row's positions
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class AttnGate(nn.Module):
    """One layer's gate: pooled pre-RoPE Q/K -> block scores ``[B, H_gate, nQ, nK]`` (masked above the
    block diagonal with ``-inf``).

    ``num_heads``/``num_kv_heads``/``head_dim``: the layer's attention shape. ``H_gate`` is
    ``num_kv_heads`` (default: one gate head per KV group) or ``num_heads`` (``per_query_head``).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate_dim: int = 64,
        block_size: int = 64,
        rope_theta: float = 10000.0,
        per_query_head: bool = False,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise GateError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
        if gate_dim % 2:
            raise GateError(f"gate_dim must be even (RoPE pairs), got {gate_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.gate_dim, self.block_size, self.rope_theta = gate_dim, block_size, rope_theta
        self.per_query_head = per_query_head
        heads = num_heads if per_query_head else num_kv_heads
        self.q_proj = nn.Parameter(torch.randn(heads, head_dim, gate_dim) / math.sqrt(head_dim))
        self.k_proj = nn.Parameter(torch.randn(heads, 3 * head_dim, gate_dim) / math.sqrt(3 * head_dim))

    @property
    def gate_heads(self) -> int:
        return self.q_proj.shape[0]

    def forward(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor) -> torch.Tensor:
        """``q_blocks [B, Hq, nQ, D]`` (pooled queries), ``k_blocks [B, Hkv, nK, 3·D]`` (pooled keys);
        query block ``i`` is the ``nK - nQ + i``-th block of the sequence (bottom-right aligned)."""
        nq, nk = q_blocks.shape[2], k_blocks.shape[2]
        return self.scores(self.query_codes(q_blocks, nk - nq), self.key_codes(k_blocks))

    def query_codes(self, q_blocks: torch.Tensor, first: int | torch.Tensor) -> torch.Tensor:
        """Pooled queries ``[B, Hq, nQ, D]`` of blocks ``first, first + 1, …`` -> their gate codes
        ``[B, H_gate, nQ, gate_dim]`` (projected, RoPE at the blocks' first positions). ``first`` is one
        block index for the batch or a ``[B]`` tensor of them (rows of a left-padded batch)."""
        b, hq, nq, d = q_blocks.shape
        if not self.per_query_head:
            q_blocks = q_blocks.view(b, self.num_kv_heads, hq // self.num_kv_heads, nq, d).mean(2)
        qg = torch.einsum("bhnd,hde->bhne", q_blocks.to(self.q_proj.dtype), self.q_proj)
        return _rotate(qg, self._positions(first, nq, qg.device), self.rope_theta)

    def key_codes(self, k_blocks: torch.Tensor, first: int | torch.Tensor = 0) -> torch.Tensor:
        """Pooled keys ``[B, Hkv, nK, 3·D]`` of blocks ``first, first + 1, …`` (``first``: as for
        :meth:`query_codes`) -> their gate codes ``[B, H_gate, nK, gate_dim]``. A block's code depends on that block alone, so a decode cache
        computes it once, when the block is complete (:class:`moa_compress.gate_runtime.GateKeys`)."""
        if self.per_query_head:
            k_blocks = k_blocks.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        kg = torch.einsum("bhnd,hde->bhne", k_blocks.to(self.k_proj.dtype), self.k_proj)
        return _rotate(kg, self._positions(first, k_blocks.shape[2], kg.device), self.rope_theta)

    def scores(self, q_codes: torch.Tensor, k_codes: torch.Tensor) -> torch.Tensor:
        """Block scores ``[B, H_gate, nQ, nK]`` from :meth:`query_codes` of the last ``nQ`` blocks and
        :meth:`key_codes` of all ``nK``: q·kᵀ/√gate_dim, ``-inf`` above the block diagonal."""
        nq, nk = q_codes.shape[2], k_codes.shape[2]
        scores = torch.matmul(q_codes, k_codes.transpose(-1, -2)) / math.sqrt(self.gate_dim)
        if nq == 1:  # the last block's row (a decode step): every key block is causal
            return scores
        rows = torch.arange(nq, device=scores.device)[:, None] + (nk - nq)
        return scores.masked_fill(torch.arange(nk, device=scores.device)[None, :] > rows, float("-inf"))

    def step_query_map(self, block: int) -> torch.Tensor:  # [H_gate, G·D, gate_dim]
        """:meth:`query_codes` of one query in key block ``block``, scaled as :meth:`scores` scales
        them, as one linear map: ``q [B, H_gate, 1, G·D] @ map`` is ``query_codes(q, block) /
        √gate_dim`` up to rounding, with ``G`` the query heads per gate head (their mean, the
        projection, RoPE at the block's position and the scale are each linear). A decode step of an
        unpadded batch makes it once per block (:class:`StepSelection`) and then scores its query with
        one matmul instead of a mean, a projection and a rotation per step."""
        heads, _, e = self.q_proj.shape
        group = self.num_heads // heads  # 1 with per_query_head
        eye = torch.eye(e, dtype=self.q_proj.dtype, device=self.q_proj.device)[None, None]  # rows: e_i
        at = torch.full((e,), block * self.block_size, device=eye.device)
        rotation = _rotate(eye, at, self.rope_theta)[0, 0]  # [E, E]: x @ rotation = x rotated
        mapped = self.q_proj.detach() @ rotation / math.sqrt(self.gate_dim)  # [H_gate, D, E]
        return (mapped / group).repeat(1, group, 1)  # the mean over the group's heads: [H_gate, G·D, E]

    def _positions(self, first: int | torch.Tensor, n: int, device) -> torch.Tensor:  # [n] or [B, n]
        steps = torch.arange(n, device=device)
        if isinstance(first, torch.Tensor):
            return (steps[None, :] + first.to(device)[:, None]) * self.block_size
        return (steps + first) * self.block_size


# ----------------------------------------------------------------------------------------------
# Selection: top-k key blocks per query-block row, density exact for any input


def select_blocks(scores: torch.Tensor, k: int, local: int = 1) -> torch.Tensor:
    """Block mask ``[B, H, nQ, nK]`` (bool) from gate ``scores`` (``-inf`` above the block diagonal,
    bottom-right aligned): each row keeps the sink block 0, the ``local`` blocks ending at its diagonal
    block (at most ``k - 1``) and the best-scoring others, ``k`` in all (``k < 2`` counts as 2); rows with
    at most ``k`` causal blocks keep them all. Density at length N is :func:`selection_density` of ``k``,
    whatever the scores. Batched over every head and row (no Python loop); a row is never empty."""
    heads = scores.shape[1]
    full = torch.full((heads,), k, dtype=torch.long)
    return gate_selections(scores, full, torch.arange(heads), torch.full((heads,), local, dtype=torch.long))


def _selection_widths(
    blocks: torch.Tensor, local: torch.Tensor, nk: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What a selection of ``blocks [..., H]`` key blocks per row (``k < 2`` counts as 2) with local
    windows ``local [H]`` needs over ``nk`` key blocks: each head's window ``[..., H]`` (at least 1, at
    most its blocks - 1), the top-k width ``take`` and which of the ``take`` picks each head keeps
    ``[..., H, take]``."""
    least = blocks.clamp(min=2)
    window = torch.minimum(local, least - 1).clamp(min=1)
    take = max(1, min(int(least.max()) if blocks.shape[-1] else 1, nk))
    keep = torch.arange(take, device=blocks.device) < least[..., None]
    return window, take, keep


def gate_selections(
    scores: torch.Tensor,  # [B, H_gate, nQ, nK], -inf above the block diagonal (bottom-right aligned)
    blocks: torch.Tensor,  # [H] or [B, H] int: key blocks per row of each query head (0: no gate)
    gate_of_head: torch.Tensor,  # [H] int: the gate head whose scores each query head follows
    local: torch.Tensor | None = None,  # [H] int: blocks ending at the diagonal always kept (default 1)
    tail: torch.Tensor | None = None,  # [H] int: last rows that keep every causal block (default 0)
    last: torch.Tensor | None = None,  # [B] int: each batch row's last query block (default nK - 1)
) -> torch.Tensor:  # [B, H, nQ, nK] bool
    """Every query head's block mask from its gate head's scores: the sink, the ``local[h]`` blocks
    ending at the diagonal (at most ``blocks[h] - 1``) and the best others, ``blocks[h]`` per row (rows
    with fewer causal blocks keep them all); the last ``tail[h]`` rows of the sequence keep every causal
    block (:attr:`moa_compress.plan.GateRule.tail`). Query heads that follow one gate head share its
    scores; the ranking is per query head (their windows may differ); batched over heads and rows.

    The query blocks are the last ``nQ`` of the sequence. In a left-padded batch each row has its own
    length: ``last[b]`` is the block of row ``b``'s last query (key blocks after it are not causal for
    that row, whatever ``scores`` holds there) and ``blocks[b, h]`` follows the row's length."""
    b, _, nq, nk = scores.shape
    device = scores.device
    heads = blocks.shape[-1]
    blocks = (blocks if blocks.dim() == 2 else blocks[None]).to(device)  # [B|1, H]
    local = torch.ones(heads, dtype=torch.long, device=device) if local is None else local.to(device)
    ends = torch.full((1,), nk - 1, device=device) if last is None else last.to(device)  # [B|1]
    rows = (torch.arange(nq, device=device)[None, :] + (ends[:, None] - nq + 1))[:, :, None]  # [B|1, nQ, 1]
    cols = torch.arange(nk, device=device)
    causal = (cols <= rows)[:, None]  # [B|1, 1, nQ, nK]
    window, take, keep = _selection_widths(blocks, local, nk)  # [B|1, H], int, [B|1, H, take]
    forced = (cols == 0) | ((rows[:, None] - cols < window[:, :, None, None]) & causal)  # [B|1, H, nQ, nK]
    ranked = scores[:, gate_of_head.to(device)].masked_fill(~causal, float("-inf"))  # [B, H, nQ, nK]
    ranked = ranked.masked_fill(forced, float("inf"))
    top = ranked.topk(take, dim=-1).indices  # [B, H, nQ, take]
    keep = keep[:, :, None]  # [B|1, H, 1, take]
    mask = torch.zeros(b, heads, nq, nk + 1, dtype=torch.bool, device=device)
    spare = torch.full_like(top, nk)  # dropped picks land in a spare column
    mask.scatter_(-1, torch.where(keep, top, spare), True)
    mask = mask[..., :nk]
    if tail is not None and bool((tail > 0).any()):
        in_tail = (
            rows[:, None] > ends[:, None, None, None] - tail.to(device)[None, :, None, None]
        )  # [B|1, H, nQ, 1]
        mask = mask | in_tail
    return mask & causal & (blocks > 0)[:, :, None, None]


class StepSelection:
    """:func:`gate_selections` for a decode step of an unpadded batch, with what depends only on the
    length made once per length: one query-block row (the last), every key block causal, the rows of
    the batch all at the same length. Per step: one gather of the gate heads' scores, one fill of the
    forced blocks, one top-k, one scatter — equal, tie for tie, to :func:`gate_selections` (the same
    ranked values, the same top-k).

    ``blocks``, ``gate_of_head``, ``local``, ``tail``: as :func:`layer_gate_heads` gives them at the
    length; ``gated [H]`` bool: the heads with a gate rule. A step is the last row at its length, so a
    head with a dense tail (``tail > 0``) sees every block, as a head without a gate does.
    :meth:`__call__` returns ``[B, H, nK]`` bool, all True for heads without a gate (their own rule
    limits them), as :func:`moa_compress.gate_runtime.decode_visible_blocks` does. Given the layer's
    ``gate``, :meth:`scores` scores the step's query through :meth:`AttnGate.step_query_map` of the last
    block."""

    def __init__(
        self, nk: int, blocks, gate_of_head, local, tail, gated, device, gate: AttnGate | None = None
    ):
        heads = blocks.shape[0]
        gated = gated & (tail < 1)  # a tail row keeps every block
        cols = torch.arange(nk, device=device)
        window, self.take, kept = _selection_widths(blocks, local, nk)  # [H], int, [H, take]
        self.forced = ((cols == 0) | (nk - 1 - cols < window.to(device)[:, None]))[
            None, :, None
        ]  # [1, H, 1, nK]
        self.drop = ~kept.to(device)[None, :, None]  # [1, H, 1, take]: picks past a head's blocks
        # Heads without a gate see every block: their rows start True (the spare last column takes
        # the dropped picks). A gate head with no blocks would see none (never, at a real length).
        gated = gated.to(device)
        self.start = (~gated)[None, :, None, None].expand(1, heads, 1, nk + 1).clone()  # [1, H, 1, nK + 1]
        reads = (blocks.to(device) > 0) | ~gated
        self.reads = None if bool(reads.all()) else reads[None, :, None]  # [1, H, 1]
        self.gate_of_head = gate_of_head.to(device)
        self.query_map = None if gate is None else gate.step_query_map(nk - 1).to(device)
        self.nk, self.heads = nk, heads

    def scores(self, q_pre: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:  # -> [B, H_gate, 1, nK]
        """Block scores of the step's pre-RoPE queries ``q_pre [B, Hq, 1, D]`` against every key block's
        code ``codes [B, H_gate, nK, gate_dim]``: :meth:`AttnGate.scores` of its query codes, up to
        rounding (two matmuls)."""
        qmap = self.query_map  # [H_gate, G·D, gate_dim]
        b, heads = q_pre.shape[0], qmap.shape[0]
        q = q_pre.to(qmap.dtype).reshape(b, heads, qmap.shape[1]).transpose(0, 1)  # [H_gate, B, G·D]
        q_codes = torch.bmm(q, qmap).transpose(0, 1).reshape(b * heads, 1, -1)  # [B·H_gate, 1, gate_dim]
        scores = torch.bmm(q_codes, codes.flatten(0, 1).transpose(1, 2))  # [B·H_gate, 1, nK]
        return scores.view(b, heads, 1, -1)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:  # scores [B, H_gate, 1, nK] -> [B, H, nK]
        ranked = scores.index_select(1, self.gate_of_head).masked_fill_(self.forced, float("inf"))
        top = ranked.topk(self.take, dim=-1).indices.masked_fill_(self.drop, self.nk)  # [B, H, 1, take]
        mask = self.start.expand(scores.shape[0], -1, -1, -1).clone()
        mask.scatter_(-1, top, True)  # dropped picks: the spare column
        seen = mask[:, :, 0, : self.nk]
        return seen if self.reads is None else seen & self.reads


def pool_queries_at(q: torch.Tensor, first: int, block_size: int) -> torch.Tensor:
    """Mean of the queries ``q [B, H, S, D]`` whose first sits at absolute position ``first``, per
    absolute block they touch -> ``[B, H, nQ, D]`` (a block averages the queries it has)."""
    if q.shape[2] == 1:  # one query (a decode step): its block's mean is itself
        return q
    head = first % block_size
    if head == 0:
        return pool_queries(q, block_size)
    b, h, s, d = q.shape
    padded = torch.cat([q.new_zeros(b, h, head, d), q], dim=2)
    pooled = pool_queries(padded, block_size)  # float32 at least
    counts = _block_counts(head + s, block_size, pooled)
    sums = pooled * counts[:, None]
    counts[0] -= head  # the first block's padding zeros are not queries
    return sums / counts[:, None]


def _block_counts(s: int, block_size: int, like: torch.Tensor) -> torch.Tensor:
    nb = num_blocks(s, block_size)
    counts = torch.full((nb,), float(block_size), device=like.device, dtype=like.dtype)
    counts[-1] = s - (nb - 1) * block_size
    return counts


def gates_to_plan_tensors(gates: Sequence[AttnGate], layers: Sequence[int]):
    """``(GateConfig, tensors)`` carrying the gates of ``layers`` in a plan (float32, contiguous)."""
    from moa_compress.plan import GateConfig, gate_tensor_name

    first = gates[0]
    config = GateConfig(
        gate_dim=first.gate_dim,
        per_query_head=first.per_query_head,
        rope_theta=first.rope_theta,
        layers=tuple(sorted(int(i) for i in layers)),
    )
    tensors = {}
    for layer in config.layers:
        tensors[gate_tensor_name(layer, "q_proj")] = gates[layer].q_proj.detach().float().contiguous().clone()
        tensors[gate_tensor_name(layer, "k_proj")] = gates[layer].k_proj.detach().float().contiguous().clone()
    return config, tensors


def gates_from_plan(plan) -> dict[int, AttnGate]:
    """The :class:`AttnGate` of every layer with gate heads, from the plan's tensors (frozen)."""
    from moa_compress.plan import gate_tensor_name

    out: dict[int, AttnGate] = {}
    if plan.gates is None:
        return out
    m = plan.model
    for layer in plan.gate_layers:
        gate = AttnGate(
            m.num_heads, m.num_kv_heads, m.head_dim, plan.gates.gate_dim, plan.block_size,
            plan.gates.rope_theta, plan.gates.per_query_head,
        )  # fmt: skip
        with torch.no_grad():
            gate.q_proj.copy_(plan.tensors[gate_tensor_name(layer, "q_proj")])
            gate.k_proj.copy_(plan.tensors[gate_tensor_name(layer, "k_proj")])
        out[layer] = gate.requires_grad_(False)
    return out


def layer_gate_heads(
    plan, layer: int, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(blocks [H], gate_of_head [H], local [H], tail [H])`` of ``layer`` at total length ``n``: key
    blocks per row of each gate head (0 for other heads), the gate head each query head follows, each
    head's local window in blocks (:attr:`moa_compress.plan.GateRule.local`; 1 for other heads) and its
    dense tail rows (:attr:`moa_compress.plan.GateRule.tail`; 0 for other heads)."""
    m = plan.model
    blocks = torch.tensor(
        [r.blocks_per_row(n, plan.block_size) if r.input_dependent else 0 for r in plan.rules[layer]]
    )
    group = m.num_heads // m.num_kv_heads
    per_query = plan.gates is not None and plan.gates.per_query_head
    gate_of_head = torch.arange(m.num_heads) if per_query else torch.arange(m.num_heads) // group
    local = torch.tensor([getattr(r, "local", 1) for r in plan.rules[layer]])
    tail = torch.tensor([getattr(r, "tail", 0) for r in plan.rules[layer]])
    return blocks, gate_of_head, local, tail


# ----------------------------------------------------------------------------------------------
# Ground truth from the dense model


def pooled_attention(
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    block_size: int,
    pool: str,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> torch.Tensor:  # [B, Hq, nB, nB], at least float32; 0 above the block diagonal
    """The dense causal softmax attention of each query head, pooled over every ``block_size × block_size``
    block by ``pool``: ``"sum"`` (the attention mass, :func:`moa_compress.oracle.block_mass`) or ``"max"``
    (the gates' ground truth before grouping and normalising, :func:`block_targets`).

    GQA by grouping: each KV head's keys serve its query heads in one batched product, never repeated
    in memory. Slabs of whole query blocks bound the scratch to about ``slab_bytes``.
    """
    if pool not in ("sum", "max"):
        raise ValueError(f"pool must be 'sum' or 'max', got {pool!r}")
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    nb = num_blocks(s, block_size)
    work = torch.promote_types(query.dtype, torch.float32)
    q = (query.to(work) * scale).view(b, hkv, group, s, d)
    k = key.to(work)[:, :, None]  # [B, Hkv, 1, S, D]
    pooled = torch.zeros(b, hq, nb, nb, dtype=work, device=query.device)
    row_bytes = torch.finfo(work).bits // 8 * b * hq * s
    rows_per_slab = max(1, slab_bytes // (row_bytes * block_size)) * block_size
    positions = torch.arange(s, device=query.device)
    for r0 in range(0, s, rows_per_slab):
        r1 = min(s, r0 + rows_per_slab)
        scores = torch.matmul(q[:, :, :, r0:r1], k[..., :r1, :].transpose(-1, -2))  # [B, Hkv, G, R, K]
        scores = scores.reshape(b, hq, r1 - r0, r1)
        scores.masked_fill_(positions[None, :r1] > positions[r0:r1, None], float("-inf"))
        probs = F.pad(scores.softmax(-1), (0, -r1 % block_size, 0, -(r1 - r0) % block_size))
        nr, nk = probs.shape[2] // block_size, probs.shape[3] // block_size
        blocks = probs.view(b, hq, nr, block_size, nk, block_size)
        first = r0 // block_size
        pooled[:, :, first : first + nr, :nk] = blocks.sum((3, 5)) if pool == "sum" else blocks.amax((3, 5))
        del scores, probs, blocks
    return pooled


def block_targets(
    query: torch.Tensor,  # [B, Hq, S, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, S, D] after RoPE
    scale: float,
    block_size: int,
    per_query_head: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> torch.Tensor:
    """The gate's target ``[B, H_gate, nB, nB]``: the max of the causal softmax attention over each block,
    max over each KV group's query heads (unless ``per_query_head``), each row normalised to sum 1.

    Slabs of whole query blocks bound the float32 scratch to about ``slab_bytes``.
    """
    pooled = pooled_attention(query, key, scale, block_size, "max", slab_bytes)
    if not per_query_head:
        b, hq, nb, _ = pooled.shape
        hkv = key.shape[1]
        pooled = pooled.view(b, hkv, hq // hkv, nb, nb).amax(2)
    return pooled / pooled.sum(-1, keepdim=True)


@dataclass
class _Capture:
    """One forward's per-layer pooled queries/keys (pre-RoPE) and targets, filled by hooks."""

    block_size: int
    per_query_head: bool
    slab_bytes: int
    q_blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hq, nB, D]
    k_blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hkv, nB, 3D]
    targets: dict[int, torch.Tensor] = field(default_factory=dict)  # [H_gate, nB, nB]


_ACTIVE: _Capture | None = None


def _target_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function while computing targets: dense causal SDPA, plus the layer's target."""
    if _ACTIVE is None:
        raise RuntimeError("the gate-target attention ran outside gate_samples")
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("gate targets need a full causal prefill (no KV cache)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cap = _ACTIVE
    cap.targets[module.layer_idx] = (
        block_targets(query, key, scale, cap.block_size, cap.per_query_head, cap.slab_bytes)[0].float().cpu()
    )
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def attention_layers(model) -> list[nn.Module]:
    """The model's attention modules in layer order: those with a ``layer_idx`` and q/k projections."""
    layers = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj")
    ]
    return sorted(layers, key=lambda m: m.layer_idx)


@contextlib.contextmanager
def _capturing(model, capture: _Capture) -> Iterator[None]:
    """Hooks on each layer's q/k projections (their outputs are the pre-RoPE queries and keys) and the
    target attention function; undone on exit."""
    global _ACTIVE
    identity = identity_of(model)
    d = identity.head_dim

    def hook(layer: int, which: str):
        def record(module, inputs, output):  # output [B, S, H * D]
            x = output.detach().view(output.shape[0], output.shape[1], -1, d).transpose(1, 2).float()
            pooled = pool_queries(x, capture.block_size) if which == "q" else pool_keys(x, capture.block_size)
            (capture.q_blocks if which == "q" else capture.k_blocks)[layer] = pooled[0].cpu()

        return record

    handles = []
    planned = set(identity.planned_layers)
    for attention in attention_layers(model):
        if attention.layer_idx not in planned:
            continue
        handles.append(attention.q_proj.register_forward_hook(hook(attention.layer_idx, "q")))
        handles.append(attention.k_proj.register_forward_hook(hook(attention.layer_idx, "k")))
    _ACTIVE = capture
    try:
        with use_attention(model, ATTENTION_NAME, _target_attention, model_windows=True):
            yield
    finally:
        _ACTIVE = None
        for handle in handles:
            handle.remove()


def sample_targets(
    model, input_ids: torch.Tensor, block_size: int = 64, per_query_head: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One dense forward of ``input_ids [S]``: per layer ``i``, ``q.{i}`` ``[Hq, nB, D]`` and ``k.{i}``
    ``[Hkv, nB, 3D]`` (pooled pre-RoPE) and ``target.{i}`` ``[H_gate, nB, nB]`` (float32, CPU) — for the
    layers a plan may choose rules for (not the model's sliding-window layers, whose gates stay untrained)."""
    capture = _Capture(block_size, per_query_head, slab_bytes)
    planned = identity_of(model).planned_layers
    with _capturing(model, capture), torch.no_grad():
        model(input_ids=input_ids.to(model.device)[None], use_cache=False, logits_to_keep=1)
    missing = [i for i in planned if i not in capture.targets or i not in capture.q_blocks]
    if missing:
        raise GateError(
            f"layers {missing} gave no queries/keys or attention; the model must call its attention through "
            "AttentionInterface and name its projections q_proj / k_proj"
        )
    out: dict[str, torch.Tensor] = {}
    for i in planned:
        out[f"q.{i}"], out[f"k.{i}"], out[f"target.{i}"] = (
            capture.q_blocks[i],
            capture.k_blocks[i],
            capture.targets[i],
        )
    return out


# ----------------------------------------------------------------------------------------------
# Training


# AdamW's decoupled weight decay. A few calibration samples are all the gates see, and they fit them far
# better than new text; a strong decay narrows that gap (BENCHMARKS.md, "Gate weight decay": from 0.01
# to 3.0 the KL on the samples left out of training fell 23% on the default recipe, 10% on prose).
DEFAULT_WEIGHT_DECAY = 3.0


@dataclass(frozen=True)
class GateSettings:
    """``gate_dim``: width of the projected block vectors; ``per_query_head``: a gate head per query head
    (default: per KV group); ``steps``/``lr``/``weight_decay``: AdamW over all layers' gates at once,
    every step on every sample (:data:`DEFAULT_WEIGHT_DECAY`); ``seed``: the gates' initialisation."""

    block_size: int = 64
    gate_dim: int = 64
    per_query_head: bool = False
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    seed: int = 0

    def check(self) -> None:
        for name in ("block_size", "gate_dim", "steps"):
            if getattr(self, name) < 1:
                raise GateError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.gate_dim % 2:
            raise GateError(f"--gate-dim must be even, got {self.gate_dim}")
        if not self.lr > 0:
            raise GateError(f"--lr must be positive, got {self.lr}")
        problem = weight_decay_problem(self.weight_decay, self.lr)
        if problem:
            raise GateError(f"--weight-decay {problem}")


def weight_decay_problem(decay: Any, lr: float) -> str | None:
    """Why ``decay`` cannot be AdamW's weight decay at learning rate ``lr`` (None when it can): AdamW
    shrinks the weights by ``lr * decay`` each step, so it must be a number from 0 to below ``1 / lr``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1 / lr:
        return (
            f"must be a number >= 0 and below {1 / lr:g} (1 / the learning rate: AdamW shrinks the weights by "
            f"lr * decay each step), got {decay!r}"
        )
    return None


@dataclass(frozen=True)
class TrainedGates:
    """``gates[i]``: layer ``i``'s :class:`AttnGate`; ``losses``: the mean distillation loss (KL per
    query-block row, nats) on the training samples at each step; ``initial_loss``: before training;
    ``heldout``: the loss on held-out samples before and after training (when given)."""

    model: ModelIdentity
    settings: GateSettings
    gates: list[AttnGate]
    losses: list[float]
    initial_loss: float
    lengths: tuple[int, ...]
    samples: dict[int, int]
    extra: dict[int, int] = field(default_factory=dict)  # length -> extra samples trained on (not costed)
    seconds: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] = field(default_factory=dict)  # "initial" / "final" loss on held-out samples
    # Cross-fitting (``folds > 1``): ``fold_gates[f]`` trained on every sample outside fold ``f``;
    # ``fold_of[N][i]``: the fold of sample ``i`` at ``N`` (:func:`sample_folds`); ``fold_losses[f]``:
    # ``fold_gates[f]``'s final loss on its training samples and its loss on fold ``f``'s.
    fold_gates: list[list[AttnGate]] = field(default_factory=list)
    fold_of: dict[int, list[int]] = field(default_factory=dict)
    fold_losses: list[dict[str, float]] = field(default_factory=list)

    def sample_gates(self) -> dict[int, list[list[AttnGate]]] | None:
        """Length -> for each calibration sample, the gates to cost it with: those trained without it
        (None without folds)."""
        return held_out_gates(self.fold_gates, self.fold_of)


def sample_folds(counts: Mapping[int, int], folds: int) -> dict[int, list[int]]:
    """Length -> the fold of each of its ``counts[N]`` samples: the samples taken in length order, then
    in their own order, dealt to ``folds`` folds in turn (so every fold holds samples of each length
    that has at least ``folds`` of them)."""
    out: dict[int, list[int]] = {}
    dealt = 0
    for n in sorted(counts):
        out[n] = [(dealt + i) % folds for i in range(counts[n])]
        dealt += counts[n]
    return out


def held_out_gates(
    fold_gates: Sequence[Sequence[AttnGate]], fold_of: Mapping[int, Sequence[int]]
) -> dict[int, list[list[AttnGate]]] | None:
    """Length -> per sample, ``fold_gates[its fold]`` (None when there are no fold gates)."""
    if not fold_gates:
        return None
    return {n: [list(fold_gates[f]) for f in folds] for n, folds in fold_of.items()}


def distillation_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over query-block rows of ``KL(target ‖ softmax(scores))``; ``scores`` and ``target``
    ``[..., nQ, nK]``, masked scores are ``-inf`` (target 0 there)."""
    log_q = scores.log_softmax(-1)
    kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), torch.zeros_like(target))
    return kl.sum(-1).mean()


def _make_gates(identity: ModelIdentity, settings: GateSettings, rope_theta: float) -> list[AttnGate]:
    torch.manual_seed(settings.seed)
    return [
        AttnGate(
            identity.num_heads,
            identity.num_kv_heads,
            identity.head_dim,
            settings.gate_dim,
            settings.block_size,
            rope_theta,
            settings.per_query_head,
        )
        for _ in range(identity.num_layers)
    ]


def _rope_theta(model) -> float:
    config = text_config(model)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta"
    )
    return float(theta or 10000.0)


def train_gates(
    model,
    samples: Mapping[int, Sequence[CalibrationSample]],
    settings: GateSettings | None = None,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
    heldout: Mapping[int, Sequence[CalibrationSample]] | None = None,
    folds: int = 1,
    extra: Mapping[int, Sequence[CalibrationSample]] | None = None,
) -> TrainedGates:
    """Distil one :class:`AttnGate` per layer from ``model``'s dense attention on ``samples``
    (``{N: [sample, ...]}``; only their ``input_ids`` are used). ``heldout`` samples, never trained on,
    measure the loss before and after.

    ``folds > 1`` (cross-fitting): besides the gates trained on every sample, ``folds`` more sets are
    trained the same way, set ``f`` on every sample outside fold ``f`` (:func:`sample_folds`), so a
    sample can be scored by gates that never saw it — what the search charges gate rules with, since
    gates fit their own training samples far better than new text. Needs at least ``folds`` samples.

    ``extra`` samples (:func:`moa_compress.data.gate_extra_set`) train every set, the fold sets
    included: they are never costed, so no set is scored on them, and more text is what the gates lack.

    With ``work_dir`` each sample's pooled Q/K and targets are written there as they are computed and
    read back on a rerun with the same model and settings (training itself takes a minute or two).
    """
    from moa_compress.data import model_digest
    from moa_compress.profile import samples_digest

    settings = settings or GateSettings()
    settings.check()
    if not samples or any(len(v) == 0 for v in samples.values()):
        raise GateError("gate training needs at least one sample per length")
    counts = {n: len(v) for n, v in samples.items()}
    if folds < 1:
        raise GateError(f"--gate-folds must be positive, got {folds}")
    if folds > 1 and sum(counts.values()) < folds:
        raise GateError(
            f"--gate-folds {folds} needs at least {folds} calibration samples, got {sum(counts.values())}"
        )
    identity = identity_of(model)
    work = Path(work_dir) if work_dir is not None else None
    key = {"model_weights": model_digest(model), "block_size": settings.block_size,
           "per_query_head": settings.per_query_head}  # fmt: skip
    started = time.perf_counter()
    sets = {"train": samples, "extra": extra or {}, "heldout": heldout or {}}
    data: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in sets}
    total = sum(len(v) for group in sets.values() for v in group.values())
    with progress_steps(progress, total, "gate targets") as step:
        for name, group in sets.items():
            for n in sorted(group):
                for i, sample in enumerate(group[n]):
                    folder = work / name / str(n) if work is not None else None
                    path = folder / f"sample-{i:04d}.safetensors" if folder is not None else None
                    # An extra sample's file also names its tokens: which text sample i is can
                    # change with the recipe's other counts (the prose reserved around it).
                    own = {**key, "input": samples_digest([sample])} if name == "extra" else key
                    found = load_sample_tensors(path, own) if path is not None else None
                    if found is None:
                        found = sample_targets(
                            model, sample.input_ids, settings.block_size, settings.per_query_head
                        )
                        if path is not None:
                            save_sample_tensors(path, found, own)
                    data[name].append(found)
                    step(f"gate targets ({name}) at {n} tokens ({i + 1}/{len(group[n])})")
    targets_s = time.perf_counter() - started

    started = time.perf_counter()
    theta = _rope_theta(model)
    gates, losses, initial = _fit(
        data["train"] + data["extra"], identity, settings, theta, progress, "training gates"
    )
    heldout_losses: dict[str, float] = {}
    if data["heldout"]:
        fresh = _make_gates(identity, settings, theta)
        heldout_losses = {
            "initial": _mean_loss(fresh, data["heldout"]),
            "final": _mean_loss(gates, data["heldout"]),
        }
    fold_of = sample_folds(counts, folds) if folds > 1 else {}
    dealt = [f for n in sorted(fold_of) for f in fold_of[n]]  # data["train"] is in the same order
    fold_gates, fold_losses = [], []
    for f in range(folds if folds > 1 else 0):
        inside = [item for item, g in zip(data["train"], dealt, strict=True) if g != f]
        left_out = [item for item, g in zip(data["train"], dealt, strict=True) if g == f]
        label = f"training gates without fold {f + 1}/{folds}"
        fitted, fold_curve, _ = _fit(inside + data["extra"], identity, settings, theta, progress, label)
        fold_gates.append(fitted)
        fold_losses.append({"train": fold_curve[-1], "held_out": _mean_loss(fitted, left_out)})
    return TrainedGates(
        model=identity,
        settings=settings,
        gates=gates,
        losses=losses,
        initial_loss=initial,
        lengths=tuple(sorted(samples)),
        samples={n: len(samples[n]) for n in sorted(samples)},
        extra={n: len(v) for n, v in sorted((extra or {}).items()) if len(v)},
        seconds={"targets": round(targets_s, 2), "training": round(time.perf_counter() - started, 2)},
        heldout=heldout_losses,
        fold_gates=fold_gates,
        fold_of=fold_of,
        fold_losses=fold_losses,
    )


def _fit(
    items: list[dict[str, torch.Tensor]],
    identity: ModelIdentity,
    settings: GateSettings,
    rope_theta: float,
    progress: bool,
    label: str,
) -> tuple[list[AttnGate], list[float], float]:
    """Fresh gates (seeded by ``settings.seed``) trained on ``items`` (:func:`sample_targets`' tensors):
    ``(gates, loss at each step, loss before training)``. Every step sees every item."""
    gates = _make_gates(identity, settings, rope_theta)
    params = [p for gate in gates for p in gate.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    batches = _stacked(items)
    initial = _mean_loss(gates, batches)
    losses: list[float] = []
    with progress_steps(progress, settings.steps, label) as step:
        for _ in range(settings.steps):
            optimizer.zero_grad()
            loss = _loss_of_all(gates, batches)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step(f"{label} (KL {losses[-1]:.4f})")
    for gate in gates:
        gate.requires_grad_(False)
    return gates, losses, initial


def _stacked(items: Sequence[dict[str, torch.Tensor]]) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """``items`` (:func:`sample_targets`' tensors) grouped by length, each group's tensors stacked on a
    new batch dimension: ``[(count, {name: [count, ...]}), ...]``. One gate call per group and layer
    instead of one per item and layer: training is call-bound, not compute-bound."""
    groups: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}
    for item in items:
        first = next(name for name in item if name.startswith("target."))
        groups.setdefault(tuple(item[first].shape), []).append(item)
    return [
        (len(group), {name: torch.stack([item[name] for item in group]) for name in group[0]})
        for group in groups.values()
    ]


def _loss_of_all(
    gates: Sequence[AttnGate],
    items: Sequence[dict[str, torch.Tensor]] | Sequence[tuple[int, dict[str, torch.Tensor]]],
) -> torch.Tensor:
    """Mean distillation loss over ``items`` and the layers they hold targets for (a model's
    sliding-window layers have none): every item weighs the same. ``items`` may be :func:`_stacked`
    already (a training loop stacks once)."""
    batches = _stacked(items) if items and isinstance(items[0], dict) else items
    total_loss = torch.zeros(())
    count = 0
    for n, batch in batches:
        layers = [i for i in range(len(gates)) if f"target.{i}" in batch]
        count += n * len(layers)
        for layer in layers:
            scores = gates[layer](batch[f"q.{layer}"], batch[f"k.{layer}"])
            total_loss = total_loss + n * distillation_loss(scores, batch[f"target.{layer}"])
    return total_loss / count


def _mean_loss(gates: Sequence[AttnGate], items: Sequence[Any]) -> float:
    with torch.no_grad():
        return float(_loss_of_all(gates, items))


def save_sample_tensors(path: Path, tensors: Mapping[str, torch.Tensor], key: Mapping[str, Any]) -> None:
    """A calibration sample's tensors, atomically, with ``key`` (what made them) in the metadata."""
    from safetensors.torch import save

    body = save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"key": json.dumps(key, sort_keys=True)}
    )
    atomic_write_bytes(path, body)


def load_sample_tensors(path: Path, key: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """A sample's tensors saved by :func:`save_sample_tensors`, or None when absent, torn or made with
    another ``key`` (model, settings)."""
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != json.dumps(key, sort_keys=True):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except (OSError, SafetensorError):
        return None


# ----------------------------------------------------------------------------------------------
# Files


def save_gates(trained: TrainedGates, out_dir: str | Path, force: bool = False) -> Path:
    """Write ``gates.json`` + ``gates.safetensors`` atomically; returns the JSON path."""
    from safetensors.torch import save

    out = Path(out_dir)
    target = out / GATES_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite")
    tensors = {}
    sets = [("", trained.gates)] + [(f"folds.{f}.", g) for f, g in enumerate(trained.fold_gates)]
    for prefix, gates in sets:
        for i, gate in enumerate(gates):
            tensors[f"{prefix}layers.{i}.q_proj"] = gate.q_proj.detach().float().contiguous()
            tensors[f"{prefix}layers.{i}.k_proj"] = gate.k_proj.detach().float().contiguous()
    atomic_write_bytes(out / GATES_TENSORS, save(tensors))
    body = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": trained.model.to_dict(),
        "settings": asdict(trained.settings),
        "rope_theta": trained.gates[0].rope_theta,
        "tensors": {name: {"shape": list(t.shape), "dtype": "float32"} for name, t in tensors.items()},
        "lengths": list(trained.lengths),
        "samples": {str(n): k for n, k in trained.samples.items()},
        **({"extra_samples": {str(n): k for n, k in trained.extra.items()}} if trained.extra else {}),
        "initial_loss": trained.initial_loss,
        "losses": trained.losses,
        "heldout_loss": trained.heldout,
        "seconds": trained.seconds,
    }
    if trained.fold_gates:
        body["folds"] = {
            "count": len(trained.fold_gates),
            "of": {str(n): folds for n, folds in trained.fold_of.items()},
            "losses": trained.fold_losses,
        }
    atomic_write_bytes(target, (json.dumps(body, indent=1) + "\n").encode())
    return target


def load_gates(path: str | Path, model: Any = None) -> list[AttnGate]:
    """Read :func:`save_gates`' files (a folder or its ``gates.json``); with ``model``, check the gates
    were trained for it. Every tensor's shape is checked against the JSON; errors are one line."""
    return _read_gates(path, model, with_folds=False)[0]


def load_gates_with_folds(
    path: str | Path, model: Any = None
) -> tuple[list[AttnGate], list[list[AttnGate]], dict[int, list[int]]]:
    """:func:`load_gates` and the cross-fitting gates :func:`save_gates` wrote beside them:
    ``(gates, fold_gates, fold_of)`` as in :class:`TrainedGates` (the last two empty for gates trained
    without folds)."""
    return _read_gates(path, model, with_folds=True)


def _read_gates(
    path: str | Path, model: Any, with_folds: bool
) -> tuple[list[AttnGate], list[list[AttnGate]], dict[int, list[int]]]:
    """``(gates, fold gates, fold_of)``; the fold gates are built only ``with_folds`` (their record is
    checked either way)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    json_path = path / GATES_FILE if path.is_dir() else path
    try:
        body = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GateError(f"{json_path}: cannot read gates ({type(exc).__name__})") from None
    if (
        not isinstance(body, dict)
        or body.get("format") != FORMAT
        or body.get("schema_version") != SCHEMA_VERSION
    ):
        raise GateError(f"{json_path} is not a moa-compress gates file (format {FORMAT} v{SCHEMA_VERSION})")
    try:
        identity = ModelIdentity.from_dict(body["model"])
        settings = GateSettings(**body["settings"])
        rope_theta = float(body["rope_theta"])
        shapes = {key: tuple(entry["shape"]) for key, entry in body["tensors"].items()}
        folds = body.get("folds") or {"count": 0, "of": {}}
        fold_count = int(folds["count"])
        fold_of = {int(n): [int(f) for f in of] for n, of in folds["of"].items()}
        counts = {int(n): int(k) for n, k in body["samples"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GateError(f"{json_path}: malformed gates file ({type(exc).__name__}: {exc})") from None
    if fold_count and (
        fold_count < 2
        or {n: len(of) for n, of in fold_of.items()} != counts
        or {f for of in fold_of.values() for f in of} != set(range(fold_count))
    ):
        raise GateError(
            f"{json_path}: its folds ({fold_count}) do not deal its samples ({counts}) into every fold once"
        )
    if model is not None and identity_of(model).fingerprint != identity.fingerprint:
        raise GateError(f"{json_path}: the gates were trained for another model ({identity.name})")
    try:
        tensors = load_file(str(json_path.parent / GATES_TENSORS))
    except (OSError, SafetensorError) as exc:
        raise GateError(
            f"{json_path.parent / GATES_TENSORS}: missing or damaged ({type(exc).__name__})"
        ) from None

    def gate_set(prefix: str) -> list[AttnGate]:
        gates = _make_gates(identity, settings, rope_theta)
        for i, gate in enumerate(gates):
            for name in ("q_proj", "k_proj"):
                key = f"{prefix}layers.{i}.{name}"
                found = tensors.get(key)
                expected = tuple(getattr(gate, name).shape)
                if found is None or tuple(found.shape) != expected or shapes.get(key) != expected:
                    raise GateError(
                        f"{json_path.parent / GATES_TENSORS}: {key} is missing or not of shape {expected}"
                    )
                getattr(gate, name).data.copy_(found)
            gate.requires_grad_(False)
        return gates

    fold_gates = [gate_set(f"folds.{f}.") for f in range(fold_count)] if with_folds else []
    return gate_set(""), fold_gates, fold_of
