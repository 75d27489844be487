"""Decode attention in Triton over a planned cache's own storage: slots in any order, visibility by rule.

The ``triton`` backend of :func:`moa_compress.attention.decode_attention`, and so of every decode
step of :class:`moa_compress.kvcache.PlanKVCache` on CUDA. Inputs::

    q         [B, Hq, D]        the new token's queries (RoPE applied)
    k, v      [B, Hkv, C, D]    the cache's storage as allocated: C slots per KV head, any order
                                (a ring wraps around), any strides with D contiguous
    visible   SlotVisibility    which slots each query head sees (moa_compress.kernels.slots), or a
                                bool [B, Hq, C] mask

Why the rules and not a mask: the cache already holds everything visibility depends on — the
slot-position table ``[B, C]``, the query's position and a few numbers per head (sink, band
``alpha``/``beta``, block size). The kernel loads a tile's positions (8 bytes per slot, shared by a
whole GQA group) and compares them with each head's sink and band bounds, so the host builds no
``[B, Hq, C]`` mask per step (that mask would cost one launch per elementwise op and as many bytes
per head as the positions cost per row). Gate heads, whose choice depends on the input, add their
selected key blocks ``[B, Hq, nK]``: one byte per head and block, not per slot. A plain mask is still
accepted (slower: one byte per head and slot).

One program per (batch, KV head, split): the query heads of a KV head are the rows of one tile, so
each K/V tile is read once per group and scores come from tensor cores; each head masks its own
slots. Tiles that no head of the group sees (outside every band, empty, past the query) are skipped
before K/V are read, so a static head over a full buffer reads only its sink and band. Long caches
split over the slots ("split-K"); the splits merge by their log-sum-exp with the block-sparse decode's
merge kernel. With one split the kernel writes the output directly and nothing else is allocated.
A head that sees nothing returns zeros. The op is ``torch.ops.moa_compress.slot_decode``, with a fake
implementation for ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .slots import SlotVisibility
from .triton_decode import decode_launch_options, default_num_splits
from .triton_prefill import TritonInputError, interpreting, unsupported_reason

# Slots per tile: a 64 x 128 bf16 K tile and its V tile fit the pipeline stages of sm_80/sm_90.
SLOT_TILE = 64


@torch.library.custom_op("moa_compress::slot_decode", mutates_args=())
def slot_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, D]
    slot_positions: torch.Tensor | None,  # [B, C] int64 (None with a mask)
    positions: torch.Tensor | None,  # [B] int64
    sink_tokens: torch.Tensor | None,  # [Hq] int64
    alpha: torch.Tensor | None,  # [Hq] float64
    beta: torch.Tensor | None,  # [Hq] float64
    blocks: torch.Tensor | None,  # [B, Hq, nK] bool
    mask: torch.Tensor | None,  # [B, Hq, C] bool: instead of the rules
    block_size: int,
    scale: float,
    num_splits: int,
) -> torch.Tensor:  # [B, Hq, D]
    """Slot-masked decode attention; see the module docstring. Inputs are assumed valid."""
    import triton

    from ._triton_kernels import merge_splits_kernel, slot_decode_split_kernel

    b, hq, d = q.shape
    hkv, capacity = k.shape[1], k.shape[2]
    group = hq // hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    from_mask = mask is not None
    if from_mask:
        mask = mask.view(torch.uint8)  # the kernel reads bytes; a bool tensor may be any view
        mask_strides = mask.stride()
        slot_positions = positions = sink_tokens = alpha = beta = mask  # placeholders never read
        rule_strides = (0, 0)
    else:
        slot_positions = slot_positions if slot_positions.stride(-1) == 1 else slot_positions.contiguous()
        sink_tokens, alpha, beta = (t.contiguous() for t in (sink_tokens, alpha, beta))
        rule_strides = (slot_positions.stride(0), positions.stride(0))
        mask, mask_strides = slot_positions, (0, 0, 0)
    has_blocks = blocks is not None
    if has_blocks:
        blocks = blocks.view(torch.uint8)
        if blocks.stride(-1) != 1:
            blocks = blocks.contiguous()
        blocks_strides, num_key_blocks = blocks.stride()[:2], blocks.shape[2]
    else:
        blocks, blocks_strides, num_key_blocks = mask, (0, 0), 1
    single = num_splits == 1
    out_part = out if single else torch.empty(b * hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = out_part if single else torch.empty(b * hq, num_splits, dtype=torch.float32, device=q.device)
    options = slot_decode_launch_options(q.dtype)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        slot_decode_split_kernel[(b * hkv, num_splits)](
            q, k, v, slot_positions, positions, sink_tokens, alpha, beta, blocks, mask, out_part, lse_part,
            q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], *rule_strides, *blocks_strides,
            *mask_strides, capacity, hkv, num_key_blocks, block_size, scale * 1.4426950408889634,  # log2(e)
            GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), TILE=SLOT_TILE, HEAD_DIM=d,
            FROM_MASK=from_mask, HAS_BLOCKS=has_blocks, SINGLE_SPLIT=single, **options,
        )  # fmt: skip
        if not single:
            merge_splits_kernel[(b * hq,)](
                out_part, lse_part, out, num_splits, SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=d
            )
    return out


@slot_decode.register_fake
def _(
    q, k, v, slot_positions, positions, sink_tokens, alpha, beta, blocks, mask, block_size, scale, num_splits
):
    return q.new_empty(q.shape)


def slot_decode_launch_options(dtype: torch.dtype) -> dict:
    """The grouped decode kernel's choices, without FMA contraction: the band's float64 arithmetic
    must round as PyTorch's does (``SlotVisibility.mask``), or a head could see one block more or less."""
    options = decode_launch_options(dtype, grouped=True)
    if not interpreting():
        options["enable_fp_fusion"] = False
    return options


def slot_decode_triton(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, D]
    visible: SlotVisibility | torch.Tensor,  # or a bool [B, Hq, C] mask
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """One new token per sequence over the cache slots each query head sees (format: module docstring).

    ``scale`` defaults to ``1 / sqrt(D)``; ``num_splits`` (programs per KV head) to enough to fill
    the GPU. Shapes, dtypes and devices are checked, values not (that would cost a device sync).

    Example (a GPU; on CPU set ``TRITON_INTERPRET=1`` first) — a 4-slot ring holding positions 4..7
    out of order, and a head with a 1-block band of 2 tokens::

        >>> from moa_compress.kernels.slots import SlotVisibility
        >>> q = torch.randn(1, 1, 64, device="cuda"); k = v = torch.randn(1, 1, 4, 64, device="cuda")
        >>> visible = SlotVisibility(
        ...     slot_positions=torch.tensor([[4, 5, 6, 7]], device="cuda").roll(1, -1),
        ...     positions=torch.tensor([7], device="cuda"),
        ...     sink_tokens=torch.tensor([0], device="cuda"),
        ...     alpha=torch.tensor([2.0], dtype=torch.float64, device="cuda"),
        ...     beta=torch.tensor([0.0], dtype=torch.float64, device="cuda"),
        ...     block_size=2,
        ... )  # sees the slots holding 6 and 7
        >>> slot_decode_triton(q, k, v, visible).shape
        torch.Size([1, 1, 64])
    """
    problem = decode_problem(q, k, v, visible)
    if problem is not None:
        raise TritonInputError(problem)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if num_splits is None:
        tiles = -(-k.shape[2] // SLOT_TILE)
        num_splits = default_num_splits(q.shape[0] * k.shape[1], tiles, q.device)
    if num_splits < 1:
        raise TritonInputError(f"num_splits must be at least 1; got {num_splits}")
    if isinstance(visible, torch.Tensor):
        return slot_decode(q, k, v, None, None, None, None, None, None, visible, 1, scale, num_splits)
    return slot_decode(
        q, k, v, visible.slot_positions, visible.positions, visible.sink_tokens, visible.alpha,
        visible.beta, visible.blocks, None, visible.block_size, scale, num_splits,
    )  # fmt: skip


def decode_problem(q, k, v, visible) -> str | None:
    """Why the kernel cannot take these inputs (shapes, dtypes, devices, support), or None."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        return (
            f"decode takes q [B, Hq, D] and k, v [B, Hkv, C, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        return f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (Hq a multiple of Hkv)"
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return "q, k, v must share one device and one dtype"
    reason = unsupported_reason(q, None)
    if reason is not None:
        return reason
    if isinstance(visible, torch.Tensor):
        if tuple(visible.shape) != (b, hq, k.shape[2]) or visible.dtype != torch.bool:
            return f"visible must be bool [B, Hq, C] = {[b, hq, k.shape[2]]}; got {visible.dtype} {tuple(visible.shape)}"
        return None if visible.device == q.device else "visible must be on the device of q, k, v"
    return visible.problem(b, hq, k.shape[2], q.device)


def slot_decode_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, D]
    visible: SlotVisibility | torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """The specification (any dtype): the visibility's mask, then ``decode_attention_reference``."""
    from .reference import decode_attention_reference

    mask = visible if isinstance(visible, torch.Tensor) else visible.mask()
    return decode_attention_reference(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


__all__ = ["slot_decode_reference", "slot_decode_triton"]
