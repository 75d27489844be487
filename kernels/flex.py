"""FlexAttention backend: the layout as a ``BlockMask`` (``BlockMask.from_kv_blocks``), run by a
compiled ``flex_attention``.

Eager ``flex_attention`` is a debugging path (on CPU here it does not even give the right
answer); the compiled one is what users run, so this backend always compiles. The first call per
shape compiles (tens of seconds on a small CPU), later calls reuse it. The ``BlockMask`` is built
once per layout. FlexAttention has no float64 kernel on CPU: float64 inputs run on the reference.
"""

from __future__ import annotations

import functools

import torch

from .layout import BlockLayout, derived
from .reference import block_sparse_attention_reference


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, made once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_sparse_attention_flex(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    layout: BlockLayout,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Block-sparse causal attention with FlexAttention; same contract as the reference backend."""
    if q.dtype == torch.float64 and q.device.type == "cpu":
        return block_sparse_attention_reference(q, k, v, layout, scale)
    block_mask = derived(layout, "flex-block-mask", layout.to_flex_block_mask)
    out = compiled_flex_attention()(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    # A row that sees no key comes out as zeros already; nan_to_num guards the division there.
    return out.nan_to_num_(0.0)
