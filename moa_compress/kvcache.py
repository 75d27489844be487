"""A decode cache planned once from the plan's rules, then filled and read in place at every step.

Plan once, run per step. When a :class:`PlanKVCache` layer sees its first call (the prompt: batch
size, dtype, device and padding are then known) it plans its storage. The KV heads of the layer are
sorted into *classes* of equal capacity; each class owns one buffer pair ``[B, Hkv_c, capacity, D]``
and a slot-position table ``[B, capacity]`` (the absolute position held by each slot, ``-1`` when
empty). Two kinds of class:

* **ring** — every query head of the KV head has a static rule. Capacity = sink + window: the sink
  region holds positions ``[0, S)`` with ``S = max sink_blocks * block_size``; the ring holds the
  last ``W`` positions from ``S`` on, ``W = max band_blocks(L) * block_size`` at the planned length
  ``L``: a query at position ``p`` needs band blocks from ``p // bs - band + 1``, all inside the last
  ``band * bs`` positions. Position ``t >= S`` lives in slot ``S + (t - S) % W``.
* **full** — a KV head serving a dense or gate head (or whose ring would not be smaller): slot =
  position. KV heads of gate heads get a full class of their own, apart from the dense ones.

A decode step writes the new token's keys/values into its slot (one indexed write per class, no
allocation of storage), updates the slot-position table and makes one attention call per class
(:func:`moa_compress.attention.decode_attention`) over the storage as it is. Which slots each query
head sees is not built as a mask: the call gets a :class:`~moa_compress.kernels.slots.SlotVisibility`
— the slot-position table, each row's position and the heads' rule tensors (sinks, bands), all held
by the storage — from which it decides per slot (positions, sinks and bands, per row, so left-padded
rows with different lengths are exact). What runs where: on CUDA (``auto`` or ``triton``) the Triton
slot decode kernel (:mod:`moa_compress.kernels.triton_slot_decode`) reads that table directly, the
query heads of a KV head sharing each K/V read, and skips tiles no head sees; the call allocates its
output only (plus a small float32 split-K workspace when the cache is split across programs). On CPU
(``auto``, ``torch``; ``flex`` everywhere) the visibility becomes a ``[B, Hq, capacity]`` mask (a few
elementwise ops) for one fused SDPA call — for gate heads over the slots of the blocks their gates
selected only, gathered once per KV group — ``reference`` is the float64 specification. Full buffers
are read up to the columns seen (their later slots are empty). Nothing is built on the host per step.
An unpadded batch on the ``torch`` backend (every row at one position, a Python int: CPU, or CUDA
when ``torch`` is asked for) takes a shorter path
(:meth:`ClassStorage.step_unpadded`, :meth:`ClassStorage.step_selected`): the slot is computed on the
host, each class keeps its additive mask between steps and changes one slot of it per step (rebuilt
from the specification only when a band moves), and gate heads' visibility is their blocks widened to
slots — a third of the small ops per step, which is most of a batch-1 step's attention time on a CPU.

Multi-token calls (the prompt, chunks of a long prompt) attend with the block-sparse kernels over
the retained tokens in position order plus the new ones, then write what the storage keeps.

How another rule kind joins (e.g. learned block gates, whose selection depends on the input): a
storage class of its own — a full buffer, plus whatever state it updates per token (pooled key
blocks) — whose :meth:`ClassStorage.visible` computes the step's selection; the step, the attention
call and the Cache API stay as they are.

Planned length and growth: rings are planned at ``max_length`` when given, else at the model's
``max_position_embeddings``, so their window is the one the rules ask for at that length (memory
bounded by the rules). Full buffers start at ``max_length`` (else the prompt length plus
:data:`FULL_HEADROOM` tokens) and double when a call would overflow them: a reallocation every
doubling, amortised, and never otherwise. A ring whose band grows with the length (``beta > 0``)
cannot follow a sequence past its planned length exactly (the keys it would need were overwritten):
that call raises :class:`PlanRuntimeError`. Rings with fixed bands never change.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moa_compress.errors import PlanRuntimeError
from moa_compress.kernels.slots import SlotVisibility
from moa_compress.plan import Plan, Rule, group_kv_keep, identity_of, text_config

# Tokens a full buffer holds beyond the prompt before its first doubling (without max_length).
FULL_HEADROOM = 256


@dataclass(frozen=True)
class KVClass:
    """KV heads of one layer that share a buffer.

    kv_heads: the layer's KV head indices stored here, ascending.
    q_heads: the query heads that read them, ascending (GQA: ``group`` per KV head).
    rules: the rules of ``q_heads``.
    sink_tokens: ``S``, the sink region (ring only; 0 for full).
    window: ``W`` tokens of the ring; 0 for a full buffer.
    capacity: slots per KV head: ``S + W`` (ring) or the current length limit (full).
    valid_until: the longest sequence the class follows exactly (None: any).
    """

    kv_heads: tuple[int, ...]
    q_heads: tuple[int, ...]
    rules: tuple[Rule, ...]
    sink_tokens: int
    window: int
    capacity: int
    valid_until: int | None

    @property
    def is_ring(self) -> bool:
        return self.window > 0

    @functools.cached_property
    def gated(self) -> bool:
        """Some query head has a gate rule: its decode steps take the gates' block selections."""
        return any(r.input_dependent for r in self.rules)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position (same shape)."""
        if not self.is_ring:
            return positions
        s = self.sink_tokens
        return torch.where(positions < s, positions, s + (positions - s).remainder(self.window))

    def slot_of(self, position: int) -> int:
        """:meth:`slots` of one position, on the host."""
        s = self.sink_tokens
        return position if not self.is_ring or position < s else s + (position - s) % self.window

    def keeps(self, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Which of ``positions`` [B, T] stay stored once rows reach ``lengths`` [B, 1]."""
        if not self.is_ring:
            return positions >= 0
        return (positions >= 0) & ((positions < self.sink_tokens) | (positions >= lengths - self.window))


def plan_layer(
    groups: list[tuple[Rule, ...]], block_size: int, ring_length: int, full_capacity: int
) -> list[KVClass]:
    """The storage classes of one layer: ``groups[h]`` are the rules of KV head ``h``'s query heads."""
    group = len(groups[0])
    shapes: dict[tuple[int, int, bool], list[int]] = {}
    for h, rules in enumerate(groups):
        # Full buffers of gate heads apart from the others: their steps read selected blocks only.
        shape = (0, 0, any(r.input_dependent for r in rules))
        keep = group_kv_keep(rules, ring_length, block_size)
        if keep is not None:  # every head keeps a sink + window: a ring
            sink, window = keep[0] * block_size, keep[1] * block_size
            if sink + window < ring_length:  # else a ring would hold no less than a full buffer
                shape = (sink, window, False)
        shapes.setdefault(shape, []).append(h)
    classes = []
    for (sink, window, _), heads in sorted(shapes.items()):
        q_heads = tuple(q for h in heads for q in range(h * group, (h + 1) * group))
        rules = tuple(r for h in heads for r in groups[h])
        grows = any(getattr(r, "beta", 0.0) > 0 for r in rules)
        classes.append(
            KVClass(
                tuple(heads),
                q_heads,
                rules,
                sink,
                window,
                sink + window if window else full_capacity,
                ring_length if window and grows else None,
            )
        )
    return classes


def _span(heads: tuple[int, ...]) -> tuple[int, int] | None:
    """``(first, count)`` when ``heads`` are consecutive, else None."""
    return (heads[0], len(heads)) if heads == tuple(range(heads[0], heads[0] + len(heads))) else None


def _some_heads(
    t: torch.Tensor, every: bool, span: tuple[int, int] | None, index: torch.Tensor
) -> torch.Tensor:
    """Heads ``index`` (dim 1) of ``t``: ``t`` itself when they are all of them, a slice (a view) when
    they are consecutive (``span``), else an ``index_select`` copy."""
    if every:
        return t
    return t.narrow(1, *span) if span is not None else t.index_select(1, index)


class ClassStorage:
    """The buffers of one :class:`KVClass` and the per-head rule tensors its steps read."""

    def __init__(self, kv: KVClass, batch: int, head_dim: int, dtype, device, block_size: int):
        self.kv = kv
        shape = (batch, len(kv.kv_heads), kv.capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv_c, C, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_positions = torch.full((batch, kv.capacity), -1, dtype=torch.long, device=device)  # [B, C]
        # Heads that keep every key (dense, gate) see every slot their rule reaches: alpha = inf.
        dense = [r.kv_keep(block_size, block_size) is None for r in kv.rules]
        self.sink_tokens = torch.tensor(
            [0 if d else r.sink_blocks * block_size for d, r in zip(dense, kv.rules)], device=device
        )
        self.alpha = torch.tensor(
            [float("inf") if d else r.alpha for d, r in zip(dense, kv.rules)],
            dtype=torch.float64,
            device=device,
        )
        self.beta = torch.tensor(
            [0.0 if d else r.beta for d, r in zip(dense, kv.rules)], dtype=torch.float64, device=device
        )
        # Index tensors a step reuses: which KV / query heads of the layer belong here.
        self.kv_index = torch.tensor(kv.kv_heads, device=device)
        self.q_index = torch.tensor(kv.q_heads, device=device)
        self.all_heads = False
        # Consecutive heads are a slice (a view) instead of an index_select copy: (first, count) or None.
        self.q_span, self.kv_span = _span(kv.q_heads), _span(kv.kv_heads)
        self.rows = torch.arange(batch, device=device)
        # The unpadded step path (:meth:`step_unpadded`): static rules for the host-side key of the
        # kept mask (None: the head sees every causal slot), and that mask between steps.
        self.step_rules = [None if d else r for d, r in zip(dense, kv.rules)]
        self.bands_grow = any(r is not None and r.beta > 0 for r in self.step_rules)
        self.step_cache: tuple[int, tuple[int, tuple[int, ...]], torch.Tensor] | None = None
        # Every head sees whole blocks up to the query (gate and dense heads: no sink or band).
        self.sees_whole_blocks = not kv.is_ring and all(r is None for r in self.step_rules)

    def visible(
        self,
        positions: torch.Tensor,  # [B] int64: the query's position in each row
        block_size: int,
        blocks: torch.Tensor | None = None,  # [B, Hq_c, nK] bool: key blocks gate heads selected
        used: int | None = None,  # a full buffer's leading slots that may be filled
    ) -> SlotVisibility:
        """Which slots each of the class's query heads sees from a query at ``positions``: the
        slot-position table and the heads' rules as they are (the decode kernel's input; no mask)."""
        table = self.slot_positions if used is None else self.slot_positions[:, :used]
        return SlotVisibility(
            table, positions, self.sink_tokens, self.alpha, self.beta, block_size, blocks, not self.kv.is_ring
        )

    def step_unpadded(
        self,
        q: torch.Tensor,  # [B, Hq_c, D]: the class's query heads
        keys: torch.Tensor,  # [B, Hkv_layer, 1, D]: the new token's keys/values, every KV head of the layer
        values: torch.Tensor,
        position: int,  # the new token's position, the same in every row
        block_size: int,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq_c, D]
        """A decode step of an unpadded batch on the ``torch`` backend, for a class without gate heads:
        the :meth:`write_token` + ``decode_attention`` pair with the step's numbers on the host.

        Every row holds the same positions, so the slot is a Python int and one visibility row serves
        the batch. The visibility is kept between steps as an additive mask ``[1, Hq_c, C]`` (0 seen,
        ``-inf`` not): from one step to the next only the written slot changes (it now holds the new
        token, which every head sees), unless some head's band moved (a new query block, a band
        growing with the length) or the buffer's width changed — then the mask is rebuilt from
        :meth:`SlotVisibility.mask`, the specification, once. A class of dense heads (full buffer)
        attends over its first ``position + 1`` slots with no mask. One fused SDPA call either way, a
        KV group's query heads as its rows (K/V not repeated)."""
        self.write_at(keys, values, position)
        b, hq, d = q.shape
        hkv = self.keys.shape[1]
        if self.sees_whole_blocks:  # dense heads (full buffer): every slot up to the query's
            width, mask = position + 1, None
        else:  # a ring, or a full buffer filled up to the query's block
            width = self.kv.capacity
            if not self.kv.is_ring:
                width = min(width, (position // block_size + 1) * block_size)
            mask = self.step_mask(position, block_size, width, q.dtype).view(1, hkv, hq // hkv, width)
        keys, values = self.keys, self.values
        if width < self.kv.capacity:
            keys, values = keys[:, :, :width], values[:, :, :width]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(b, hkv, hq // hkv, d), keys, values, attn_mask=mask, scale=scale
        )
        return out.view(b, hq, d)

    def write_at(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """:meth:`write_token` for an unpadded batch: one ``position`` for every row, its slot on the host."""
        slot = self.kv.slot_of(position)
        self.keys.select(2, slot).copy_(self.kv_heads_of(keys[:, :, 0]))  # [B, Hkv_c, D]
        self.values.select(2, slot).copy_(self.kv_heads_of(values[:, :, 0]))
        self.slot_positions.select(1, slot).fill_(position)

    def query_heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, Hq_layer, ...] -> [B, Hq_c, ...]
        """The class's query heads of a per-head tensor of the layer (see :func:`_some_heads`)."""
        return _some_heads(t, self.all_heads, self.q_span, self.q_index)

    def kv_heads_of(self, t: torch.Tensor) -> torch.Tensor:  # [B, Hkv_layer, ...] -> [B, Hkv_c, ...]
        """The class's KV heads of a per-KV-head tensor of the layer (see :func:`_some_heads`)."""
        return _some_heads(t, self.all_heads, self.kv_span, self.kv_index)

    def put_query_heads(self, out: torch.Tensor, o: torch.Tensor) -> None:
        """Write the class's heads ``o [B, Hq_c, ...]`` into the layer's ``out [B, Hq_layer, ...]``."""
        if self.q_span is not None:
            out.narrow(1, *self.q_span).copy_(o)
        else:
            out.index_copy_(1, self.q_index, o)

    def step_selected(
        self,
        q: torch.Tensor,  # [B, Hq_c, D]
        keys: torch.Tensor,  # [B, Hkv_layer, 1, D]
        values: torch.Tensor,
        blocks: torch.Tensor,  # [B, Hq_c, nK] bool: the key blocks each head reads this step
        position: int,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq_c, D]
        """:meth:`step_unpadded` for a class of gate (and dense) heads, whose visibility is the blocks
        they read up to the query (:func:`~moa_compress.kernels.cpu.decode_attention_selected_unpadded`)."""
        from moa_compress.kernels.cpu import decode_attention_selected_unpadded

        self.write_at(keys, values, position)
        # Every head here reads a block: a gate rule keeps the sink and the diagonal, a dense head all.
        return decode_attention_selected_unpadded(
            q, self.keys, self.values, blocks, position, block_size, scale, every_head_reads=True
        )

    def step_mask(self, position: int, block_size: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive visibility ``[1, Hq_c, width]`` of an unpadded step at ``position``, its slot
        already written (see :meth:`step_unpadded`)."""
        n = position + 1
        bands = None  # fixed bands move with the query block only
        if self.bands_grow:
            bands = tuple(0 if r is None else r.band_blocks(n, block_size) for r in self.step_rules)
        key = (position // block_size, bands)
        kept = self.step_cache
        if kept is not None and kept[0] == position - 1 and kept[1] == key:
            mask = kept[2]
            if mask.shape[-1] == width and mask.dtype == dtype:
                mask.select(2, self.kv.slot_of(position)).zero_()
                self.step_cache = (position, key, mask)
                return mask
        visibility = SlotVisibility(
            self.slot_positions[:1, :width],
            torch.full((1,), position, dtype=torch.long, device=self.keys.device),
            self.sink_tokens,
            self.alpha,
            self.beta,
            block_size,
        )
        mask = torch.zeros((1, len(self.step_rules), width), dtype=dtype, device=self.keys.device)
        mask.masked_fill_(~visibility.mask(), float("-inf"))
        self.step_cache = (position, key, mask)
        return mask

    def grow(self, capacity: int) -> None:
        """Enlarge a full buffer (slot = position) to ``capacity`` slots, keeping its contents."""
        self.step_cache = None
        old_k, old_v, old_pos = self.keys, self.values, self.slot_positions
        b, h, c, d = old_k.shape
        self.keys = old_k.new_zeros(b, h, capacity, d)
        self.values = old_v.new_zeros(b, h, capacity, d)
        self.slot_positions = old_pos.new_full((b, capacity), -1)
        self.keys[:, :, :c], self.values[:, :, :c], self.slot_positions[:, :c] = old_k, old_v, old_pos
        self.kv = dataclasses.replace(self.kv, capacity=capacity)

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor):
        """Store ``keys``/``values`` [B, Hkv_layer, T, D] of absolute ``positions`` [B, T] (-1:
        padding) that the class keeps once rows reach ``lengths`` [B, 1]."""
        self.step_cache = None
        keys, values = self.kv_heads_of(keys), self.kv_heads_of(values)
        keep = self.kv.keeps(positions, lengths)  # [B, T]
        rows, cols = keep.nonzero(as_tuple=True)
        slots = self.kv.slots(positions[rows, cols])
        # [B, C, Hkv_c, D] views: one indexed write per buffer, in place.
        self.keys.transpose(1, 2).index_put_((rows, slots), keys.transpose(1, 2)[rows, cols])
        self.values.transpose(1, 2).index_put_((rows, slots), values.transpose(1, 2)[rows, cols])
        self.slot_positions.index_put_((rows, slots), positions[rows, cols])

    def write_token(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """The decode step's write: one token per row, ``keys``/``values`` [B, Hkv_layer, 1, D] at
        ``positions`` [B]."""
        self.step_cache = None
        keys, values = self.kv_heads_of(keys), self.kv_heads_of(values)
        slots = self.kv.slots(positions)
        self.keys.transpose(1, 2).index_put_((self.rows, slots), keys[:, :, 0])
        self.values.transpose(1, 2).index_put_((self.rows, slots), values[:, :, 0])
        self.slot_positions.index_put_((self.rows, slots), positions)

    def ordered(self, length: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Retained keys/values of an unpadded batch at ``length`` in position order
        ``[B, Hkv_c, L, D]``, and the absent key blocks ``(first, end)`` (see ``plan_pieces``)."""
        if not self.kv.is_ring:
            return self.keys[:, :, :length], self.values[:, :, :length], (0, 0)
        s = self.kv.sink_tokens
        if length <= s:
            return self.keys[:, :, :length], self.values[:, :, :length], (0, 0)
        first_kept = max(s, length - self.kv.window)
        first_kept = -(-first_kept // block_size) * block_size  # whole blocks only
        positions = torch.cat([torch.arange(s), torch.arange(first_kept, length)]).to(self.keys.device)
        slots = self.kv.slots(positions)
        evicted = (s // block_size, first_kept // block_size) if first_kept > s else (0, 0)
        return self.keys.index_select(2, slots), self.values.index_select(2, slots), evicted

    def batch_map(self, fn, in_place: bool = True) -> None:
        """Apply ``fn`` (a batch reordering, a device move) to every buffer; a reordering that keeps
        the batch size writes back into the same buffers (beam search reorders at every step)."""
        self.step_cache = None
        for name in ("keys", "values", "slot_positions"):
            buf = getattr(self, name)
            new = fn(buf)
            if in_place and new.shape == buf.shape and new.device == buf.device:
                buf.copy_(new)
            else:
                setattr(self, name, new.contiguous())
        self.rows = torch.arange(self.keys.shape[0], device=self.keys.device)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of filled slots, bytes allocated), keys and values together."""
        per_slot = 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        return int((self.slot_positions >= 0).sum()) * per_slot, self.slot_positions.numel() * per_slot


class StoredKV:
    """What :class:`PlanKVCache` hands the attention function in place of key/value tensors: the
    layer and this call's new keys/values ``[B, Hkv, T, D]`` (not stored yet: the attention function
    stores them, since only it sees the padding mask). Only the plan's attention function
    understands it."""

    __slots__ = ("keys", "layer", "plan", "start", "values")

    def __init__(self, layer: PlanKVLayer, keys: torch.Tensor, values: torch.Tensor, start: int):
        self.layer, self.keys, self.values, self.start, self.plan = layer, keys, values, start, layer.plan

    @property
    def length(self) -> int:
        """Columns seen including this call's (padding included): the mask's key length."""
        return self.start + self.keys.shape[2]

    def __getattr__(self, name: str):
        raise PlanRuntimeError(
            f"PlanKVCache storage has no tensor attribute {name!r}: it only works under apply_plan(model, plan) "
            "with the same plan"
        )


class PlanKVLayer(CacheLayerMixin):
    """One layer of a :class:`PlanKVCache` (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, groups: list[tuple[Rule, ...]], plan: Plan, ring_length: int, max_length: int | None):
        super().__init__()
        self.groups = groups
        self.plan = plan
        self.block_size = plan.block_size
        self.ring_length = ring_length
        self.max_length = max_length
        self.reset()

    def reset(self) -> None:
        self.storage: list[ClassStorage] = []
        # A gate layer's key codes: moa_compress.gate_runtime.GateKeys, or RowGateKeys for a padded batch.
        self.gate_keys = None
        # A gate layer's unpadded decode steps: their selection constants, made once per block count.
        self.step_memo: dict = {}
        self.padding: torch.Tensor | None = None  # [B] left-padding columns per row
        self.seen = 0  # columns seen, padding included
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    # -- planning -------------------------------------------------------------------------------

    def plan_storage(self, keys: torch.Tensor, padding: torch.Tensor | None) -> None:
        """Plan and allocate the buffers for batch ``keys.shape[0]`` (the first call)."""
        b, hkv, t, d = keys.shape
        full = self.max_length or t + FULL_HEADROOM
        full = -(-max(full, t) // self.block_size) * self.block_size
        classes = plan_layer(self.groups, self.block_size, self.ring_length, full)
        self.storage = [ClassStorage(c, b, d, keys.dtype, keys.device, self.block_size) for c in classes]
        for s in self.storage:
            s.all_heads = len(s.kv.kv_heads) == hkv
        self.padding = padding

    def lengths(self, columns: int) -> torch.Tensor:  # [B] int64
        """Each row's length (tokens, padding excluded) once ``columns`` columns are seen."""
        if self.padding is None:
            return torch.full((self.storage[0].keys.shape[0],), columns, dtype=torch.long, device=self.device)
        return columns - self.padding

    def check_length(self, length: int) -> None:
        """Grow full buffers for ``length`` columns; refuse rings that cannot follow."""
        for s in self.storage:
            if s.kv.valid_until is not None and length > s.kv.valid_until:
                raise PlanRuntimeError(
                    f"the sequence reached {length} tokens, past the {s.kv.valid_until} its PlanKVCache was "
                    "planned for (bands growing with the length need the keys it dropped); create it with "
                    "PlanKVCache(config, plan, max_length=<longest sequence>)"
                )
            if not s.kv.is_ring and length > s.kv.capacity:
                s.grow(max(2 * s.kv.capacity, -(-length // self.block_size) * self.block_size))

    # -- the three kinds of call (the attention function picks one) ----------------------------

    def store(self, stored: StoredKV) -> None:
        """Write this call's keys/values (padding columns skipped)."""
        b = stored.keys.shape[0]
        columns = torch.arange(stored.start, stored.length, device=self.device)  # [T]
        pad = (
            self.padding if self.padding is not None else torch.zeros(b, dtype=torch.long, device=self.device)
        )
        positions = columns[None, :] - pad[:, None]  # [B, T]; < 0 on padding
        lengths = self.lengths(stored.length)[:, None]
        for s in self.storage:
            s.write(stored.keys, stored.values, positions, lengths)

    def decode_step(
        self,
        query: torch.Tensor,  # [B, Hq, 1, D]
        stored: StoredKV,
        scale: float,
        backend: str,
        blocks: torch.Tensor | None = None,  # [B, Hq, nK] bool: key blocks each head may read (gates)
    ) -> torch.Tensor:  # [B, Hq, 1, D]
        """Write the new token, then one attention call per class over its slots. ``blocks`` (a layer
        with gate heads) further limits each head to the key blocks its gate selected this step."""
        from moa_compress.attention import decode_attention, resolve_backend

        self.check_length(stored.length)
        positions = None  # [B]: the new token's position in each row
        q = query[:, :, 0]  # [B, Hq, D]
        out = torch.empty_like(q) if len(self.storage) > 1 else None
        # An unpadded batch on the torch backend: classes without gate heads step with host numbers.
        unpadded = self.padding is None and resolve_backend(backend, q.device) in ("torch", "flex")
        for s in self.storage:
            if unpadded and (not s.kv.gated or (blocks is not None and s.sees_whole_blocks)):
                q_class = s.query_heads(q)
                if s.kv.gated:
                    chosen = s.query_heads(blocks)
                    o = s.step_selected(
                        q_class, stored.keys, stored.values, chosen, stored.start, self.block_size, scale
                    )
                else:
                    o = s.step_unpadded(
                        q_class, stored.keys, stored.values, stored.start, self.block_size, scale
                    )
                if out is None:
                    return o[:, :, None]
                s.put_query_heads(out, o)
                continue
            if positions is None:
                positions = self.lengths(stored.start)
            s.write_token(stored.keys, stored.values, positions)
            # Gate heads (their layer's ``blocks``) keep only the key blocks their gate selected.
            chosen = None
            if blocks is not None and s.kv.gated:
                chosen = blocks if s.all_heads else blocks.index_select(1, s.q_index)
            keys, values, used = s.keys, s.values, None
            if not s.kv.is_ring:  # slot = position < columns seen: the slots after are empty
                used = min(s.kv.capacity, -(-stored.length // self.block_size) * self.block_size)
                keys, values = keys[:, :, :used], values[:, :, :used]
            visible = s.visible(positions, self.block_size, chosen, used)
            # Copies, not query_heads' views: every decode backend (Triton included) gets them dense.
            q_class = q if s.all_heads else q.index_select(1, s.q_index)
            o = decode_attention(q_class, keys, values, visible, scale=scale, backend=backend)
            if out is None:
                return o[:, :, None]
            s.put_query_heads(out, o)
        return out[:, :, None]

    # -- Cache API ------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hand ``[B, Hkv, S, D]`` keys/values to the attention function (which stores them)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = StoredKV(self, key_states, value_states, self.seen)
        self.seen += key_states.shape[2]
        return view, view

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise PlanRuntimeError("PlanKVCache drops keys for good and cannot be cropped")

    def _batch_map(self, fn, in_place: bool = True) -> None:
        for s in self.storage:
            s.batch_map(fn, in_place)
        if self.gate_keys is not None:
            self.gate_keys.batch_map(fn)
        if self.padding is not None:
            self.padding = fn(self.padding)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_map(lambda b: b.index_select(0, beam_idx.to(b.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda b: b.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_map(lambda b: b[indices])

    def offload(self) -> None:
        self._batch_map(lambda b: b.to("cpu", non_blocking=True), in_place=False)

    def prefetch(self) -> None:
        self._batch_map(lambda b: b.to(self.device, non_blocking=True), in_place=False)

    def nbytes(self) -> tuple[int, int]:
        """Bytes of filled slots and bytes allocated, a gate layer's key codes included."""
        live = allocated = 0
        for s in self.storage:
            stored, alloc = s.nbytes()
            live, allocated = live + stored, allocated + alloc
        if self.gate_keys is not None:
            gate = self.gate_keys.nbytes()
            live, allocated = live + gate, allocated + gate
        return live, allocated


def window_layer(window: int) -> CacheLayerMixin:
    """The cache layer of a sliding-window layer the plan leaves to the model: transformers' own,
    holding the last ``window - 1`` tokens between calls (what the model's default cache holds)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return DynamicSlidingWindowLayer(sliding_window=window)


class PlanKVCache(Cache):
    """A transformers ``Cache`` whose storage is planned from the plan's rules: per layer, ring
    buffers (sink + window at the planned length) for KV heads whose query heads all have static
    rules, full buffers for the others (see :mod:`moa_compress.kvcache`). Memory follows the rules.

    Use it under ``apply_plan(model, plan)`` with the same plan; generation (greedy, sampling, beam
    search, left-padded batches) then matches a full cache token for token. ``max_length`` (prompt
    plus new tokens) sizes everything at once; without it rings are planned at the model's
    ``max_position_embeddings`` and full buffers double as needed. Chunked prefill: several
    multi-token calls of an unpadded batch; a padded batch takes its prompt in one call.

    Example::

        with apply_plan(model, plan):
            cache = PlanKVCache(model.config, plan, max_length=input_ids.shape[1] + 100)
            model.generate(input_ids, past_key_values=cache, max_new_tokens=100)
            print(cache.memory())
    """

    def __init__(self, config: Any, plan: Plan, max_length: int | None = None):
        plan.check_model(identity_of(config))
        if max_length is not None and max_length < 1:
            raise PlanRuntimeError(f"max_length must be positive, got {max_length}")
        self.plan = plan
        ring_length = max_length or getattr(text_config(config), "max_position_embeddings", None)
        if ring_length is None:
            raise PlanRuntimeError(
                "the model config has no max_position_embeddings: give PlanKVCache a max_length"
            )
        kv_heads = plan.model.num_kv_heads
        group = plan.model.num_heads // kv_heads
        windows = plan.model.window_of
        layers = [
            window_layer(windows[i])
            if i in windows
            else PlanKVLayer(
                [heads[h * group : (h + 1) * group] for h in range(kv_heads)], plan, ring_length, max_length
            )
            for i, heads in enumerate(plan.rules)
        ]
        super().__init__(layers=layers)

    def memory(self) -> dict[str, int | float]:
        """Bytes of filled slots, bytes allocated, the bytes a full cache would hold for the same
        columns (padding included, as a ``DynamicCache`` holds them), and
        ``fraction = allocated / full``."""
        live = allocated = full = 0
        for layer in self.layers:
            if not isinstance(layer, PlanKVLayer):  # a sliding-window layer: the model's own cache layer,
                # which the model's default cache holds too
                held = 2 * layer.keys.nbytes if layer.is_initialized and layer.keys is not None else 0
                live, allocated, full = live + held, allocated + held, full + held
                continue
            stored, alloc = layer.nbytes()
            live, allocated = live + stored, allocated + alloc
            if layer.storage:
                k = layer.storage[0].keys
                full += 2 * layer.seen * k.shape[0] * len(layer.groups) * k.shape[3] * k.element_size()
        return {
            "stored_bytes": live,
            "allocated_bytes": allocated,
            "full_bytes": full,
            "fraction": allocated / full if full else 0.0,
        }
