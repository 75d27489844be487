"""Run a transformers model through an attention function of ours, by its ``AttentionInterface``.

Profiling, gate targets, oracles and plans all change how a model attends the same way: register a
function under a name, switch the model to that name, and switch back afterwards. No modeling file is
touched, so any model whose attention layers call through the interface works (STYLE.md, rule 6).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def use_attention(
    model: Any,
    name: str,
    attention: Callable[..., Any],
    *,
    padding_mask: bool = False,
    model_windows: bool = False,
) -> Iterator[None]:
    """Run ``model`` with ``attention`` (an ``AttentionInterface`` function, registered as ``name``)
    for the body. On exit the implementation the model had is restored — unless something replaced
    ours meanwhile — and ``name`` is unregistered.

    ``padding_mask``: also register the SDPA mask builder under ``name``, so that a padded batch
    arrives with its 4D boolean mask; without it transformers gives a custom function no mask at all.
    ``model_windows``: a call for one of the model's sliding-window layers (transformers passes it
    ``sliding_window``) runs that window as the model would (:func:`moa_compress.attention.window_attention`)
    and never reaches ``attention``: the layers a plan leaves to the model, for measurements of the others.

    Example::

        def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None  # [B, S, H, D]

        with use_attention(model, "my_attention", attention):
            logits = model(input_ids).logits
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    previous = model.config._attn_implementation
    AttentionInterface.register(name, _leaving_windows(attention) if model_windows else attention)
    if padding_mask:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        if model.config._attn_implementation == name:
            model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(name, None)
        if padding_mask:
            AttentionMaskInterface._global_mapping.pop(name, None)


def _leaving_windows(attention: Callable[..., Any]) -> Callable[..., Any]:
    """``attention`` for full-attention layers; the model's own window for sliding-window ones."""
    from moa_compress.attention import window_attention

    @functools.wraps(attention)
    def wrapped(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        window = kwargs.get("sliding_window")
        if window is None:
            return attention(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if dropout:
            raise RuntimeError("attention dropout is not supported here; call model.eval()")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = window_attention(query, key, value, window, scale, attention_mask)  # [B, Hq, S, D]
        return out.transpose(1, 2).contiguous(), None

    return wrapped
