"""Block-sparse prefill attention in Triton (CUDA GPUs; the CPU interpreter for tests).

The ``triton`` backend of :func:`moa_compress.attention.block_sparse_attention`. The kernel follows
FlashAttention-2: one program per (query tile, batch, query head) keeps a running max and sum in
float32 and visits only the key blocks its row of ``kv_indices`` names. GQA reads K/V head
``h // (Hq // Hkv)`` in place; nothing is repeated in memory. Causality is bottom-right aligned (see
``moa_compress.kernels.layout``) and applied only inside blocks that cross the diagonal.

Supported: float16 / bfloat16 / float32 inputs (float32 accumulation; float32 inputs get float32-accurate
dots from three TF32 products), head dims 64 and 128, block sizes 16 to 128 (powers of two), any lengths
with ``q_len <= kv_len``; ``backend="auto"`` falls back to ``torch`` outside that. The op is registered as ``torch.ops.moa_compress.block_sparse_prefill`` with a fake
implementation so ``torch.compile`` can trace it.

Triton itself is imported only when the kernel first runs. Without a GPU, set ``TRITON_INTERPRET=1``
before anything imports triton; the kernel then runs (slowly) on CPU tensors.
"""

from __future__ import annotations

import contextlib
import os

import torch

from moa_compress.errors import UserInputError

from .layout import BlockLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
# How many kv_indices entries the kernel reads at once when it splits a row into full / diagonal blocks.
_SCAN = 128


class TritonInputError(UserInputError):
    """Inputs the Triton kernels do not handle (dtype, head dim, block size, device)."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(q: torch.Tensor, block_size: int | None) -> str | None:
    """Why the Triton kernels cannot take ``q`` [B, H, (S,) D] with this block size (None: a kernel
    whose tiles do not follow the plan's blocks), or None if they can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"backend 'triton' takes float16, bfloat16 or float32; got {q.dtype} (use backend 'torch')"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"backend 'triton' supports head dims {SUPPORTED_HEAD_DIMS}; got {q.shape[-1]} (use backend 'flex')"
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        return f"backend 'triton' supports block sizes {SUPPORTED_BLOCK_SIZES}; got {block_size}"
    if q.device.type != "cuda" and not interpreting():
        return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)"
    return None


def check_supported(q: torch.Tensor, block_size: int) -> None:
    """Raise TritonInputError for inputs outside what the kernels were written for."""
    reason = unsupported_reason(q, block_size)
    if reason is not None:
        raise TritonInputError(reason)


def launch_options(dtype: torch.dtype, block_size: int, head_dim: int) -> dict:
    """Compile-time choices of the prefill kernel: tiles, dot precision, interpreter widening, warps, stages.

    Tiles may be smaller than the layout's blocks: a program takes ``BLOCK_M`` query rows of one query
    block and walks each selected key block in ``BLOCK_N``-key steps.
    """
    wide = dtype == torch.float32
    options = {
        "BLOCK_M": min(block_size, 64 if wide else 128),
        "BLOCK_N": min(block_size, 32 if wide else 64),
        # float32 inputs get float32-accurate dots from three TF32 products: plain TF32 would cost
        # ~1e-3 relative error, true float32 (FMA) dots compile for minutes and run slowly.
        "PRECISION": "tf32x3" if wide else "tf32",
        # The CPU interpreter's dot returns garbage for bfloat16 operands (seen with triton 3.9); the
        # products of bfloat16 values are exact in float32, so widening there changes nothing else.
        "DOT_FP32": interpreting() and dtype == torch.bfloat16,
    }
    if not interpreting():
        # Pipeline stages hold K and V tiles in shared memory: fewer for big tiles and for float32,
        # whose split-TF32 dots keep extra copies (sm_90 builds checked by tests/triton_compile_check.py).
        tile = options["BLOCK_M"] * head_dim * (2 if wide else 1)
        options["num_warps"] = 8 if tile >= 128 * 128 else 4
        options["num_stages"] = 3 if tile <= 64 * 128 else 2
    return options


@torch.library.custom_op("moa_compress::block_sparse_prefill", mutates_args=())
def block_sparse_prefill(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    kv_num_blocks: torch.Tensor,  # [B or 1, Hq, nQ] int32
    kv_indices: torch.Tensor,  # [B or 1, Hq, nQ, maxK] int32
    block_size: int,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Block-sparse causal attention; see the module docstring. Inputs are assumed valid."""
    import triton

    from ._triton_kernels import block_sparse_prefill_kernel

    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    # The kernel steps along D with stride 1.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # The kernel steps along the last dim of both with stride 1.
    kv_num_blocks = kv_num_blocks.to(torch.int32).contiguous()
    kv_indices = kv_indices.to(torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    options = launch_options(q.dtype, block_size, d)
    if out.numel() == 0:
        return out
    # A layout with batch 1 serves every batch entry: stride 0.
    layout_batch_strides = (
        (kv_num_blocks.stride(0), kv_indices.stride(0)) if kv_num_blocks.shape[0] == b else (0, 0)
    )
    grid = (triton.cdiv(sq, options["BLOCK_M"]), b * hq)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        block_sparse_prefill_kernel[grid](
            q, k, v, out, kv_num_blocks, kv_indices,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            layout_batch_strides[0], kv_num_blocks.stride(1),
            layout_batch_strides[1], kv_indices.stride(1), kv_indices.stride(2),
            hq, hq // hkv, sq, sk, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
            BLOCK=block_size, HEAD_DIM=d, SCAN=_SCAN, **options,
        )  # fmt: skip
    return out


@block_sparse_prefill.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_size, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def block_sparse_attention_triton(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    layout: BlockLayout,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """The ``triton`` backend: shapes were checked by ``block_sparse_attention``; this checks support.

    Example (on a GPU; on CPU set ``TRITON_INTERPRET=1`` first)::

        >>> from moa_compress.kernels.layout import causal_layout
        >>> q = torch.randn(1, 32, 1000, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
        >>> out = block_sparse_attention_triton(q, k, v, causal_layout(1000, 1000, 32).to("cuda"), 128**-0.5)
    """
    check_supported(q, layout.block_size)
    return block_sparse_prefill(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_size, scale)
