"""Block-sparse decode attention in Triton: one new query token per sequence against a per-head KV cache.

Input format (what a per-head-window decode cache hands over for one layer)::

    q              [B, Hq, D]            the new token's queries (RoPE applied)
    k, v           [B, Hkv, S, D]        cache storage; S is its capacity, at least every kv_len
    kv_lens        [B, Hkv]    int32     valid tokens per KV head: positions [0, kv_len) hold keys,
                                         the rest is ignored. Heads may differ (e.g. a window head keeps
                                         sink + window tokens, a dense head keeps everything).
    kv_num_blocks  [B or 1, H]  int32    optional: how many entries of kv_indices each head reads;
                                         H = Hq (one list per query head) or Hkv (one per KV head,
                                         shared by its query heads)
    kv_indices     [B or 1, H, maxK] int32  optional: block numbers (blocks of ``block_size`` cache
                                         positions) the head reads, each once, ascending reads best; a
                                         block reaching past kv_len is cut there. Without them a head
                                         reads its whole cache.

The query is the newest token, so it may see every valid cached key (the cache already holds it):
no causal mask is needed. A head that sees nothing returns zeros. Query head ``h`` reads KV head
``h // (Hq // Hkv)`` (GQA without copies).

Long contexts are split over KV blocks ("split-K", as in FlashDecoding): ``num_splits`` programs per
head each reduce a contiguous share of the head's blocks to a normalised partial output and its
log-sum-exp; a second kernel merges them. When the query heads of a KV head read the same blocks (no
lists, or one list per KV head) they share one program: each K/V block is read once per group and
scores come from tensor cores. Lists per query head get one program per query head, since heads of one
group may then read different blocks. The op is registered as
``torch.ops.moa_compress.block_sparse_decode`` with a fake implementation.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .triton_prefill import TritonInputError, check_supported, interpreting

# Work items per streaming multiprocessor the split count aims for (a few waves hide memory latency).
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 64


@torch.library.custom_op("moa_compress::block_sparse_decode", mutates_args=())
def block_sparse_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    kv_lens: torch.Tensor,  # [B, Hkv] int32
    kv_num_blocks: torch.Tensor | None,  # [B or 1, Hq or Hkv] int32
    kv_indices: torch.Tensor | None,  # [B or 1, Hq or Hkv, maxK] int32
    block_size: int,
    scale: float,
    num_splits: int,
) -> torch.Tensor:  # [B, Hq, D]
    """Split-K decode attention; see the module docstring. Inputs are assumed valid."""
    import triton

    from ._triton_kernels import (
        block_sparse_decode_split_kernel,
        decode_group_split_kernel,
        merge_splits_kernel,
    )

    b, hq, d = q.shape
    hkv = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_lens = kv_lens.to(torch.int32)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    out_part = torch.empty(b * hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b * hq, num_splits, dtype=torch.float32, device=q.device)
    cache_strides = (*k.stride()[:3], *v.stride()[:3], kv_lens.stride(0), kv_lens.stride(1))
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels use exp2
    group = hq // hkv
    has_block_list = kv_indices is not None
    # Heads of a GQA group share a program when they read the same blocks: no list, or one per KV head.
    grouped = not has_block_list or (kv_num_blocks.shape[1] == hkv and group > 1)
    if has_block_list:
        kv_num_blocks = kv_num_blocks.to(torch.int32).contiguous()
        kv_indices = kv_indices.to(torch.int32).contiguous()
        # A block list with batch 1 serves every batch entry: stride 0.
        per_batch = kv_num_blocks.shape[0] == b
        block_list_strides = (
            kv_num_blocks.stride(0) if per_batch else 0, kv_num_blocks.stride(1),
            kv_indices.stride(0) if per_batch else 0, kv_indices.stride(1),
        )  # fmt: skip
    else:
        kv_num_blocks = kv_indices = kv_lens  # placeholders the kernel never reads
        block_list_strides = (0, 0, 0, 0)
    options = decode_launch_options(q.dtype, grouped=grouped)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if grouped:
            decode_group_split_kernel[(b * hkv, num_splits)](
                q, k, v, kv_lens, kv_num_blocks, kv_indices, out_part, lse_part, q.stride(0), q.stride(1),
                *cache_strides, *block_list_strides, hkv, qk_scale,
                GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), BLOCK=block_size, HEAD_DIM=d,
                HAS_BLOCK_LIST=has_block_list, **options,
            )  # fmt: skip
        else:
            block_sparse_decode_split_kernel[(b * hq, num_splits)](
                q, k, v, kv_lens, kv_num_blocks, kv_indices, out_part, lse_part, q.stride(0), q.stride(1),
                *cache_strides, *block_list_strides, hq, group, qk_scale,
                BLOCK=block_size, HEAD_DIM=d, **options,
            )  # fmt: skip
        merge_splits_kernel[(b * hq,)](
            out_part, lse_part, out, num_splits, SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=d
        )
    return out


@block_sparse_decode.register_fake
def _(q, k, v, kv_lens, kv_num_blocks, kv_indices, block_size, scale, num_splits):
    return q.new_empty(q.shape)


def decode_launch_options(dtype: torch.dtype, grouped: bool) -> dict:
    """Compile-time choices of the split kernels (the interpreter takes no warps or stages)."""
    options = {}
    if grouped:
        # Same dot settings as prefill: float32-accurate dots for float32, widened bf16 in the interpreter.
        options["PRECISION"] = "tf32x3" if dtype == torch.float32 else "tf32"
        options["DOT_FP32"] = interpreting() and dtype == torch.bfloat16
    if not interpreting():
        options.update(num_warps=4, num_stages=3)
    return options


def default_num_splits(programs_per_split: int, max_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over, never more splits than blocks."""
    if device.type == "cuda":
        programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 4 * programs_per_split  # the interpreter: a few splits, to exercise the merge
    return max(1, min(max_blocks, -(-programs // max(programs_per_split, 1)), _MAX_SPLITS))


def check_decode_inputs(q, k, v, kv_lens, kv_num_blocks, kv_indices) -> None:
    """Shapes and dtypes only: checking values would cost a device sync at every decode step."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        raise TritonInputError(
            f"decode takes q [B, Hq, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        raise TritonInputError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (Hq a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device == kv_lens.device):
        raise TritonInputError("q, k, v, kv_lens must share one device, and q, k, v one dtype")
    if tuple(kv_lens.shape) != (b, k.shape[1]) or kv_lens.is_floating_point():
        raise TritonInputError(
            f"kv_lens must be an integer [B, Hkv] = {[b, k.shape[1]]}; got {tuple(kv_lens.shape)}"
        )
    if (kv_num_blocks is None) != (kv_indices is None):
        raise TritonInputError("give both kv_num_blocks and kv_indices, or neither")
    if kv_indices is not None:
        heads = kv_num_blocks.shape[1] if kv_num_blocks.dim() == 2 else -1
        if kv_num_blocks.dim() != 2 or kv_num_blocks.shape[0] not in (1, b) or heads not in (hq, k.shape[1]):
            raise TritonInputError(
                f"kv_num_blocks must be [B or 1, Hq={hq} or Hkv={k.shape[1]}]; got {tuple(kv_num_blocks.shape)}"
            )
        if kv_indices.dim() != 3 or kv_indices.shape[:2] != kv_num_blocks.shape:
            raise TritonInputError(
                f"kv_indices must be [{', '.join(map(str, kv_num_blocks.shape))}, maxK]; got {tuple(kv_indices.shape)}"
            )


def block_sparse_decode_triton(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    kv_lens: torch.Tensor,  # [B, Hkv] int
    kv_num_blocks: torch.Tensor | None = None,  # [B or 1, Hq or Hkv] int
    kv_indices: torch.Tensor | None = None,  # [B or 1, Hq or Hkv, maxK] int
    *,
    block_size: int = 64,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one new token per sequence over its heads' cached keys (format: module docstring).

    ``scale`` defaults to ``1 / sqrt(D)``; ``num_splits`` (programs per head) to enough to fill the GPU.

    Example (a GPU; on CPU set ``TRITON_INTERPRET=1`` first) — two KV heads, one keeping 4096
    tokens and one a 1024-token window, 4 query heads each::

        >>> q = torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16)
        >>> kv_lens = torch.tensor([[4096, 1024]], device="cuda", dtype=torch.int32)
        >>> block_sparse_decode_triton(q, k, v, kv_lens).shape
        torch.Size([1, 8, 128])
    """
    check_decode_inputs(q, k, v, kv_lens, kv_num_blocks, kv_indices)
    check_supported(q, block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    max_blocks = kv_indices.shape[-1] if kv_indices is not None else -(-k.shape[2] // block_size)
    if num_splits is None:
        # Heads sharing blocks go one program per KV head (GQA group), lists per query head one each.
        per_query_head = kv_indices is not None and kv_indices.shape[1] != k.shape[1]
        programs_per_split = q.shape[0] * (q.shape[1] if per_query_head else k.shape[1])
        num_splits = default_num_splits(programs_per_split, max_blocks, q.device)
    if num_splits < 1:
        raise TritonInputError(f"num_splits must be at least 1; got {num_splits}")
    return block_sparse_decode(q, k, v, kv_lens, kv_num_blocks, kv_indices, block_size, scale, num_splits)


def block_sparse_decode_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    kv_lens: torch.Tensor,  # [B, Hkv]
    kv_num_blocks: torch.Tensor | None = None,  # [B or 1, Hq or Hkv]
    kv_indices: torch.Tensor | None = None,  # [B or 1, Hq or Hkv, maxK]
    *,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """The decode specification in plain PyTorch (any dtype): dense attention with a mask."""
    hq, d = q.shape[1:]
    s = k.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    positions = torch.arange(s, device=q.device)
    visible = positions < kv_lens.repeat_interleave(group, 1)[..., None].to(q.device)  # [B, Hq, S]
    if kv_indices is not None:
        if kv_indices.shape[1] != hq:  # one list per KV head, shared by its query heads
            kv_num_blocks = kv_num_blocks.repeat_interleave(group, 1)
            kv_indices = kv_indices.repeat_interleave(group, 1)
        num_k = -(-s // block_size)
        valid = torch.arange(kv_indices.shape[-1], device=q.device) < kv_num_blocks[..., None]
        # Unused entries scatter into a spare last column that is dropped.
        index = torch.where(valid, kv_indices.long(), num_k)
        blocks = torch.zeros(*kv_indices.shape[:2], num_k + 1, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, index, True)
        visible = visible & blocks[..., :num_k].repeat_interleave(block_size, -1)[..., :s]
    keys = k.repeat_interleave(group, 1)
    values = v.repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q, keys) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", probs, values)


__all__ = ["block_sparse_decode_reference", "block_sparse_decode_triton"]
