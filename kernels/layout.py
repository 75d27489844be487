"""Block-sparse layouts in FlexAttention's form.

Causal alignment is bottom-right (as in FlashAttention for ``q_len != kv_len``): query row ``i``
sits at absolute position ``i + kv_len - q_len`` and may see key ``j`` only if ``j <= i + kv_len - q_len``.
For ``q_len = 2, kv_len = 5`` (``x`` = may attend, before the block selection)::

    x x x x .
    x x x x x

Query blocks are taken over query rows (``q_len``), key blocks over keys (``kv_len``), both of
``block_size``. The layout names, for every (batch, head, query block), which key blocks are
computed; the causal mask is applied on top inside every selected block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block computes.

    kv_num_blocks: ``[B, H, nQ]`` int32 — number of valid entries in each row of ``kv_indices``
        (``B`` may be 1 to broadcast over the batch; ``H`` is the number of query heads).
    kv_indices: ``[B, H, nQ, maxK]`` int32 — key-block indices, the first ``kv_num_blocks`` of each
        row valid, strictly ascending, each in ``[0, nK)``; the rest is padding (any value).
    block_size: tokens per block, for queries and keys alike.
    q_len, kv_len: sequence lengths the layout is for; ``nQ = ceil(q_len / block_size)``,
        ``nK = ceil(kv_len / block_size)``.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.block_size,
            self.q_len,
            self.kv_len,
        )

    @classmethod
    def from_block_mask(
        cls, block_mask: torch.Tensor, block_size: int, q_len: int, kv_len: int
    ) -> BlockLayout:
        """From a boolean ``[B, H, nQ, nK]`` block matrix (True = compute the block)."""
        kv_num_blocks, order = _ordered(block_mask.bool())
        max_k = max(int(kv_num_blocks.max()) if kv_num_blocks.numel() else 0, 1)
        return cls(kv_num_blocks, order[..., :max_k].contiguous(), block_size, q_len, kv_len)

    def to_block_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, nQ, nK]`` matrix of selected blocks."""
        b, h, nq = self.kv_num_blocks.shape
        max_k = self.kv_indices.shape[-1]
        valid = torch.arange(max_k, device=self.kv_indices.device) < self.kv_num_blocks[..., None]
        out = torch.zeros(b, h, nq, self.num_kv_blocks + 1, dtype=torch.bool, device=self.kv_indices.device)
        # Invalid entries scatter into a spare last column that is dropped.
        idx = torch.where(valid, self.kv_indices.long(), self.num_kv_blocks)
        out.scatter_(-1, idx, True)
        return out[..., : self.num_kv_blocks]

    def to_dense_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, q_len, kv_len]``: selected blocks AND bottom-right causality."""
        bs = self.block_size
        blocks = self.to_block_mask()
        dense = blocks.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
        dense = dense[:, :, : self.q_len, : self.kv_len]
        return dense & causal_mask(self.q_len, self.kv_len, device=blocks.device)

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` with the same blocks and causal masking inside them.

        Blocks every row of the query block may see in full are passed as FlexAttention's *full*
        blocks, so the mask function only runs on the blocks the causal diagonal cuts.
        """
        from torch.nn.attention.flex_attention import BlockMask

        offset = self.kv_len - self.q_len

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        selected = self.to_block_mask()  # [B, H, nQ, nK]
        first_row = torch.arange(self.num_q_blocks, device=selected.device) * self.block_size + offset
        block_end = torch.clamp(
            (torch.arange(self.num_kv_blocks, device=selected.device) + 1) * self.block_size, max=self.kv_len
        )
        visible = block_end[None, :] - 1 <= first_row[:, None]  # [nQ, nK]: every row sees every key
        # FlexAttention reads the number of key blocks from the width of kv_indices, so both index
        # tensors span all nK columns.
        partial_num, partial_idx = _ordered(selected & ~visible)
        full_num, full_idx = _ordered(selected & visible)
        return BlockMask.from_kv_blocks(
            partial_num,
            partial_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.block_size,
            mask_mod=causal,
            seq_lengths=(self.q_len, self.kv_len),
        )


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[..., nK]`` -> (count ``[...]`` int32, ascending indices first ``[..., nK]`` int32)."""
    # A stable descending sort of the mask brings selected blocks first, in ascending order.
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return blocks.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


# (id(kv_indices), name) -> (weak reference to kv_indices, stamp, value)
_DERIVED: dict[tuple[int, str], tuple[weakref.ref, tuple, Any]] = {}


def derived(layout: BlockLayout, name: str, build: Callable[[], Any]) -> Any:
    """``build()``, cached per layout tensors and ``name``: what a backend precomputes from a layout
    (a schedule, a BlockMask) is paid once per layout, which static plans build once per length.
    An in-place change to the layout's tensors invalidates the entry; it leaves with the tensors."""
    stamp = (
        id(layout.kv_num_blocks),
        layout.kv_num_blocks._version,
        layout.kv_indices._version,
        layout.block_size,
        layout.q_len,
        layout.kv_len,
    )
    key = (id(layout.kv_indices), name)
    cached = _DERIVED.get(key)
    if cached is not None and cached[0]() is layout.kv_indices and cached[1] == stamp:
        return cached[2]
    value = build()
    if cached is None:
        weakref.finalize(layout.kv_indices, _DERIVED.pop, key, None)
    _DERIVED[key] = (weakref.ref(layout.kv_indices), stamp, value)
    return value


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[q_len, kv_len]``, bottom-right aligned."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def causal_layout(q_len: int, kv_len: int, num_heads: int, block_size: int = 64) -> BlockLayout:
    """The dense causal layout: every block that holds at least one causal pair."""
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    offset = kv_len - q_len
    last_row = torch.clamp(torch.arange(nq) * block_size + block_size - 1, max=q_len - 1) + offset
    blocks = torch.arange(nk)[None, :] * block_size <= last_row[:, None]
    return BlockLayout.from_block_mask(blocks.expand(1, num_heads, nq, nk), block_size, q_len, kv_len)
