"""Which cache slots a decode step's query heads see, in the form a planned decode cache holds.

A planned cache (:class:`moa_compress.kvcache.PlanKVCache`) stores keys in slots whose order means
nothing (a ring buffer wraps around); a table gives the absolute position each slot holds. Rather than
a ``[B, Hq, C]`` boolean mask built on the host at every step, a decode step describes visibility by
what the cache already has: that table, the query's position and, per query head, the numbers of its
rule. A kernel then decides visibility slot by slot while it reads the keys, and the step builds
nothing. :meth:`SlotVisibility.mask` is the specification of that decision.

For a query at position ``p`` (row length ``n = p + 1``) and a head with ``sink_tokens`` ``S``,
``alpha``, ``beta`` and block size ``bs``, a slot holding position ``t`` is visible iff::

    0 <= t <= p  and  (t < S  or  t >= (p // bs - band + 1) * bs),
    band = max(1, ceil((alpha + beta * n) / bs - 1e-9))          (float64, as ``StaticRule.band_blocks``)

``alpha = inf`` makes every causal slot visible (dense and gate heads). Gate heads further keep only
the key blocks their gate selected: ``blocks[b, h, t // bs]`` (positions past the last listed block
count as the last block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotVisibility:
    """The slots each query head of one decode step may see (see the module docstring).

    slot_positions: ``[B, C]`` int64 — absolute position held by each slot, ``-1`` when empty.
    positions: ``[B]`` int64 — the new token's position in each row (its own slot already written).
    sink_tokens: ``[Hq]`` int64 — leading positions the head always sees.
    alpha, beta: ``[Hq]`` float64 — the band's span ``alpha + beta * n`` in tokens; ``alpha = inf``
        for heads that see every causal slot.
    block_size: the plan's block size (sinks and bands are whole blocks of it).
    blocks: ``[B, Hq, nK]`` bool or None — key blocks (of positions) each head may read this step;
        they must cover every position held (``nK * block_size`` past the query's position).
    slot_is_position: slot ``t`` holds position ``t`` or nothing (a full buffer, not a ring): a
        backend may then read only the slots of selected blocks (visibility is unchanged by it).
    """

    slot_positions: torch.Tensor
    positions: torch.Tensor
    sink_tokens: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    block_size: int
    blocks: torch.Tensor | None = None
    slot_is_position: bool = False

    def mask(self, slots: torch.Tensor | None = None) -> torch.Tensor:  # [B, Hq, C] (or [B, Hq, L]) bool
        """The visibility as a dense boolean mask, in plain PyTorch: the specification. With ``slots``
        (``[B, Hq, L]`` int64 slot indices) only at those slots, per head: ``mask()`` gathered there."""
        positions = self.positions
        n = (positions + 1).to(torch.float64)[:, None]  # [B, 1]
        band = torch.ceil((self.alpha + self.beta * n) / self.block_size - 1e-9).clamp(min=1)  # [B, Hq]
        first_band_token = ((positions // self.block_size)[:, None] - band + 1) * self.block_size  # [B, Hq]
        if slots is None:
            held = self.slot_positions[:, None, :]  # [B, 1, C]
        else:
            held = self.slot_positions.gather(1, slots.flatten(1)).view(slots.shape)  # [B, Hq, L]
        visible = (
            (held >= 0)
            & (held <= positions[:, None, None])
            & ((held < self.sink_tokens[None, :, None]) | (held >= first_band_token[:, :, None]))
        )
        if self.blocks is not None:
            held_block = (held.clamp(min=0) // self.block_size).clamp(max=self.blocks.shape[-1] - 1)
            visible &= self.blocks.gather(-1, held_block.expand(-1, self.blocks.shape[1], -1))
        return visible

    def problem(self, batch: int, heads: int, capacity: int, device: torch.device) -> str | None:
        """What does not fit a step of ``batch`` rows, ``heads`` query heads and ``capacity`` slots
        on ``device`` (shapes, dtypes, devices; never values: that would cost a device sync), or None."""
        expected = {
            "slot_positions": ((batch, capacity), torch.int64),
            "positions": ((batch,), torch.int64),
            "sink_tokens": ((heads,), torch.int64),
            "alpha": ((heads,), torch.float64),
            "beta": ((heads,), torch.float64),
        }
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                return f"visibility {name} must be {dtype} {list(shape)}; got {tensor.dtype} {list(tensor.shape)}"
        if self.blocks is not None and (
            self.blocks.dim() != 3
            or tuple(self.blocks.shape[:2]) != (batch, heads)
            or self.blocks.shape[2] == 0
            or self.blocks.dtype != torch.bool
        ):
            return f"visibility blocks must be bool [B={batch}, Hq={heads}, nK>0]; got {self.blocks.dtype} {list(self.blocks.shape)}"
        if self.block_size < 1:
            return f"visibility block_size must be positive; got {self.block_size}"
        tensors = [self.slot_positions, self.positions, self.sink_tokens, self.alpha, self.beta]
        if any(t.device != device for t in tensors + ([self.blocks] if self.blocks is not None else [])):
            return "visibility tensors must be on the device of q, k, v"
        return None
