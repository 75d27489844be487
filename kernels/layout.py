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

from dataclasses import dataclass

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
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_size, self.q_len, self.kv_len
        )

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> BlockLayout:
        """From a boolean ``[B, H, nQ, nK]`` block matrix (True = compute the block)."""
        block_mask = block_mask.bool()
        kv_num_blocks = block_mask.sum(-1).to(torch.int32)
        # A stable descending sort of the mask brings selected blocks first, in ascending order.
        order = torch.sort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
        max_k = max(int(kv_num_blocks.max()) if kv_num_blocks.numel() else 0, 1)
        kv_indices = order[..., :max_k].to(torch.int32).contiguous()
        return cls(kv_num_blocks.contiguous(), kv_indices, block_size, q_len, kv_len)

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
        """A FlexAttention ``BlockMask`` with the same blocks and causal masking inside them."""
        from torch.nn.attention.flex_attention import BlockMask

        offset = self.kv_len - self.q_len

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=causal,
            seq_lengths=(self.q_len, self.kv_len),
        )


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
