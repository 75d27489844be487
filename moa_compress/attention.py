"""The public block-sparse attention function: checks inputs, then dispatches to a backend.

Backends (all computing the same thing, see ``moa_compress.kernels.reference``):

* ``reference`` — dense attention with a mask; plain PyTorch, float64-capable; the specification.
* ``torch`` — fast on CPU: computes only the selected blocks.
* ``flex`` — FlexAttention via ``BlockMask.from_kv_blocks``.
* ``triton`` — Triton kernels for CUDA GPUs (imported only when used).
* ``auto`` — the fastest available for the tensors' device.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

import torch

from moa_compress.errors import UserInputError
from moa_compress.kernels.layout import BlockLayout
from moa_compress.kernels.slots import SlotVisibility

BACKENDS = ("reference", "torch", "flex", "triton")

# backend name -> (module, function); imported lazily so optional packages stay optional.
_IMPLEMENTATIONS = {
    "reference": ("moa_compress.kernels.reference", "block_sparse_attention_reference"),
    "torch": ("moa_compress.kernels.cpu", "block_sparse_attention_torch"),
    "flex": ("moa_compress.kernels.flex", "block_sparse_attention_flex"),
    "triton": ("moa_compress.kernels.triton_prefill", "block_sparse_attention_triton"),
}


class AttentionInputError(UserInputError):
    """Inputs that do not fit together (shapes, dtypes, devices, layout)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; validate explicit names."""
    if backend == "auto":
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise AttentionInputError(
            f"unknown backend {backend!r}; expected auto or one of {', '.join(BACKENDS)}"
        )
    # TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slowly): how the tests exercise them.
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise AttentionInputError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    return backend


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionInputError(
            f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if k.shape[:3] != v.shape[:3] or bk != b or dk != d:
        raise AttentionInputError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise AttentionInputError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if sq > sk:
        raise AttentionInputError(
            f"q_len {sq} > kv_len {sk}: causal alignment is bottom-right, so q_len <= kv_len"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise AttentionInputError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise AttentionInputError("q, k, v must be on one device")
    if (layout.q_len, layout.kv_len) != (sq, sk):
        raise AttentionInputError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; inputs have {sq}, {sk}"
        )
    lb, lh, lnq = layout.kv_num_blocks.shape
    if lb not in (1, b) or lh != hq or lnq != layout.num_q_blocks:
        raise AttentionInputError(
            f"layout kv_num_blocks {tuple(layout.kv_num_blocks.shape)} does not fit "
            f"[B={b} or 1, H={hq}, nQ={layout.num_q_blocks}]"
        )
    if layout.kv_indices.shape[:3] != layout.kv_num_blocks.shape:
        raise AttentionInputError("layout kv_indices and kv_num_blocks disagree in shape")


def block_sparse_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    layout: BlockLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Causal (bottom-right aligned) attention over the blocks that ``layout`` selects.

    GQA: query head ``h`` uses KV head ``h // (Hq // Hkv)``. A query row with no visible key
    returns zeros. ``scale`` defaults to ``1 / sqrt(D)``.

    Example::

        >>> import torch
        >>> from moa_compress.attention import block_sparse_attention
        >>> from moa_compress.kernels.layout import causal_layout
        >>> q = torch.randn(1, 9, 100, 64); k = v = torch.randn(1, 3, 100, 64)
        >>> out = block_sparse_attention(q, k, v, causal_layout(100, 100, 9), backend="reference")
        >>> out.shape
        torch.Size([1, 9, 100, 64])
    """
    check_inputs(q, k, v, layout)
    name = resolve_backend(backend, q.device)
    if backend == "auto" and name == "triton":
        from moa_compress.kernels.triton_prefill import unsupported_reason

        if unsupported_reason(q, layout.block_size) is not None:  # e.g. a head dim the kernel lacks
            name = "torch"
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    module_name, fn_name = _IMPLEMENTATIONS[name]
    fn = getattr(importlib.import_module(module_name), fn_name)
    return fn(q, k, v, layout.to(q.device), scale)


_DECODE_IMPLEMENTATIONS = {
    "reference": ("moa_compress.kernels.reference", "decode_attention_reference"),
    "torch": ("moa_compress.kernels.cpu", "decode_attention_torch"),
}


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, D]
    visible: torch.Tensor | SlotVisibility,  # [B, Hq, C] bool, or the rules that decide it
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one new token per sequence over the cache slots each query head may see.

    The decode step of a planned cache (:class:`moa_compress.kvcache.PlanKVCache`): ``k``/``v``
    are its storage, ``visible`` says which slots hold keys the head's rule reaches — a bool mask, or
    a :class:`~moa_compress.kernels.slots.SlotVisibility` (the cache's slot-position table and each
    head's rule: no mask is built for the ``triton`` backend). Slot order is irrelevant (a ring buffer
    is fine). Backends:

    * ``reference`` — the float64-capable specification (a rule visibility becomes its mask first);
    * ``torch`` — one fused SDPA call with the mask (any device); over a full buffer whose gate heads
      selected key blocks (``slot_is_position``), over the selected blocks' slots only, gathered once
      per KV group;
    * ``triton`` — the slot decode kernel (:mod:`moa_compress.kernels.triton_slot_decode`): GQA
      groups share K/V reads, tiles nobody sees are skipped, split-K over long caches (CUDA, or
      CPU tensors under ``TRITON_INTERPRET=1`` for tests);
    * ``auto`` — ``triton`` for CUDA tensors when triton is importable and takes the dtype and head
      dim (float16/bfloat16/float32, 64 or 128), else ``torch``; ``flex`` runs ``torch``.

    Shapes are checked, values not (a check would cost a device sync per token). A head that sees
    no slot yields zeros on every backend.

    Example::

        >>> q = torch.randn(2, 9, 64); k = v = torch.randn(2, 3, 128, 64)
        >>> visible = torch.ones(2, 9, 128, dtype=torch.bool)
        >>> decode_attention(q, k, v, visible).shape
        torch.Size([2, 9, 64])
    """
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        raise AttentionInputError(
            f"decode takes q [B, Hq, D] and k, v [B, Hkv, C, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        raise AttentionInputError(
            f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (Hq a multiple of Hkv)"
        )
    if isinstance(visible, SlotVisibility):
        problem = visible.problem(b, hq, k.shape[2], q.device)
        if problem is not None:
            raise AttentionInputError(problem)
    elif tuple(visible.shape) != (b, hq, k.shape[2]) or visible.dtype != torch.bool:
        raise AttentionInputError(
            f"visible must be bool [B, Hq, C] = {[b, hq, k.shape[2]]}; got {visible.dtype} {tuple(visible.shape)}"
        )
    elif visible.device != q.device:
        raise AttentionInputError("q, k, v, visible must be on one device")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise AttentionInputError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise AttentionInputError("q, k, v, visible must be on one device")
    name = "torch" if backend == "flex" else resolve_backend(backend, q.device)
    if backend == "auto" and name == "triton":
        from moa_compress.kernels.triton_prefill import unsupported_reason

        if unsupported_reason(q, None) is not None:  # e.g. a head dim the kernel lacks
            name = "torch"
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if name == "triton":
        from moa_compress.kernels.triton_slot_decode import slot_decode_triton

        return slot_decode_triton(q, k, v, visible, scale=scale)
    if isinstance(visible, SlotVisibility):
        if name == "torch" and visible.blocks is not None and visible.slot_is_position:
            from moa_compress.kernels.cpu import decode_attention_selected_torch

            return decode_attention_selected_torch(q, k, v, visible, scale)
        visible = visible.mask()
    module_name, fn_name = _DECODE_IMPLEMENTATIONS[name]
    fn = getattr(importlib.import_module(module_name), fn_name)
    return fn(q, k, v, visible, scale)


def as_bool_mask(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:  # [B, 1|H, Sq, Sk]
    """A transformers attention mask's first ``kv_len`` columns as booleans (True: attend)."""
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    # Additive float masks: 0 where allowed, a large negative number where masked.
    return mask > torch.finfo(mask.dtype).min / 2


def window_attention(
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Sk, D]
    value: torch.Tensor,  # [B, Hkv, Sk, D]
    window: int,
    scale: float,
    attention_mask: torch.Tensor | None = None,  # [B, 1|H, Sq, >=Sk], bool or additive
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """A model's own sliding-window attention, token by token: the query at position ``p`` sees keys
    ``p - window < j <= p`` (``window`` keys, its own included; transformers' ``sliding_window``), queries
    aligned to the last keys (a cache's or a chunk's call). ``attention_mask`` (a padded batch's) is
    also applied; a query row that sees no key returns zeros. Plain SDPA with an explicit mask: what a
    plan runs for the layers it leaves to the model (:class:`moa_compress.plan.WindowRule`)."""
    sq, sk = query.shape[2], key.shape[2]
    q_pos = torch.arange(sk - sq, sk, device=query.device)[:, None]
    k_pos = torch.arange(sk, device=query.device)[None, :]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos < window)  # [Sq, Sk]
    if attention_mask is not None:
        allowed = allowed & as_bool_mask(attention_mask, sk)
    else:
        allowed = allowed[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    empty = ~allowed.any(-1, keepdim=True)  # [B|1, 1|H, Sq, 1]
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out
