"""The specification: block-sparse attention as dense attention with a boolean mask.

Plain PyTorch, any dtype (float64 for tests). Rows that may attend to nothing yield zeros.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout


def block_sparse_attention_reference(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, Dv]
    layout: BlockLayout,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, Dv]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = layout.to(q.device).to_dense_mask()  # [B|1, Hq, Sq, Sk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return torch.matmul(probs, v)


def decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, Dv]
    visible: torch.Tensor,  # [B, Hq, C] bool
    scale: float,
) -> torch.Tensor:  # [B, Hq, Dv]
    """One query token per (sequence, head) against cache slots: softmax over the ``visible`` slots
    (their order does not matter, so a ring buffer needs no unrolling). A head that sees no slot
    yields zeros."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhcd->bhc", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhc,bhcd->bhd", probs, v)
