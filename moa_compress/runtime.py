"""Run a plan inside a transformers model: an attention function, a decode cache, and generation.

``apply_plan(model, plan)`` registers one attention function with transformers' ``AttentionInterface``
and switches the model to it with ``model.set_attn_implementation``. Nothing in the modeling files is
patched and nothing depends on the model family: any model whose attention dispatches through
``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, ...) runs the plan.

What the attention function computes, for query heads with static rules at total length ``N`` (the
number of keys, i.e. tokens seen so far including this call's)::

    query at position p (block p // block_size) sees key blocks
        {0 .. sink_blocks-1}  ∪  [p // block_size - band_blocks(N) + 1,  p // block_size]
    with causality (key <= p) inside the blocks.

For a prefill of length ``N`` this is exactly ``plan.layout(layer, N)``. When the call has fewer
queries than keys (chunked prefill, decoding with a cache) the queries are the *last* rows of that
square layout (bottom-right alignment), so decoding token by token computes, for every new token,
the row a full recompute at that length would compute.

Masks. transformers gives a custom implementation ``attention_mask=None`` on unpadded input, so
causality is applied here. For the mask to exist at all on padded input we register transformers'
own SDPA mask builder under our name: padded batches then arrive with a 4D boolean mask
``[B, 1, q_len, kv_len]`` (causality AND padding). Such calls run a masked dense path in which
positions are counted per row over the non-padding keys, so a left-padded row computes what it
would compute unpadded; padding keys are never attended and padded query rows return zeros.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from moa_compress.attention import as_bool_mask, block_sparse_attention, window_attention
from moa_compress.attn_interface import use_attention
from moa_compress.errors import PlanRuntimeError
from moa_compress.kernels.layout import BlockLayout, causal_mask
from moa_compress.kvcache import PlanKVCache, StoredKV
from moa_compress.plan import Plan, Rule, identity_of, rule_key_blocks, text_config

__all__ = [
    "PlanHandle",
    "PlanKVCache",
    "PlanRuntimeError",
    "active_plan",
    "apply_plan",
    "cache_kwarg",
    "generate_reply",
    "remove_plan",
]


_HANDLE_ATTR = "_moa_plan_handle"
_names = itertools.count()

# Attention features that change the scores in ways a block-sparse plan does not model.
_UNSUPPORTED_CONFIG = {
    "attn_logit_softcapping": "attention logit softcapping",
    "attention_chunk_size": "chunked attention",
}


# ----------------------------------------------------------------------------------------------
# Layouts for (rules, q_len, kv_len)


def block_rows(
    rules: Sequence[Rule], n: int, block_size: int, rows: range, num_cols: int
) -> torch.Tensor:  # [1, H, len(rows), num_cols] bool
    """Rows ``rows`` (absolute query blocks) of the plan's block matrix at total length ``n``,
    restricted to the first ``num_cols`` key blocks."""
    cols = torch.arange(num_cols)[None, :]
    r = torch.tensor(list(rows), dtype=torch.long)[:, None]
    heads = []
    for rule in rules:
        lo, sink = rule_key_blocks(rule, n, block_size)
        heads.append((cols <= r) & ((cols >= lo[r]) | (cols < sink)))
    return torch.stack(heads)[None]


def plan_pieces(
    rules: Sequence[Rule],
    block_size: int,
    q_len: int,
    kv_len: int,
    evicted: tuple[int, int] = (0, 0),
) -> list[tuple[int, int, BlockLayout]]:
    """Split ``q_len`` bottom-right aligned queries into pieces whose query blocks coincide with
    the plan's absolute blocks; returns ``(q_start, q_end, layout)``, ``layout`` over the first
    ``layout.kv_len`` stored keys.

    A :class:`BlockLayout` groups query rows into blocks from its first row, while the plan's
    blocks start at absolute position 0. When the first query's position ``kv_len - q_len`` is not
    a multiple of the block size, the rows up to the next block boundary form their own piece.

    ``evicted = (first, end)``: key blocks ``[first, end)`` are absent from storage (a
    :class:`PlanKVCache` dropped them), so stored block ``j >= first`` is absolute block
    ``j + end - first``. The rules must not select an evicted block.
    """
    first_row = kv_len - q_len
    head = min(q_len, (-first_row) % block_size)
    gap = evicted[1] - evicted[0]
    pieces = []
    for q_start, q_end in ((0, head), (head, q_len)):
        if q_end <= q_start:
            continue
        kv_end = first_row + q_end
        rows = range((first_row + q_start) // block_size, -(-kv_end // block_size))
        mask = block_rows(rules, kv_len, block_size, rows, -(-kv_end // block_size))
        if gap:
            if mask[..., evicted[0] : evicted[1]].any():
                raise PlanRuntimeError(
                    f"this call (q_len={q_len}, length {kv_len}) needs key blocks the PlanKVCache already "
                    "dropped; for several multi-token calls create it with max_length=<longest sequence>"
                )
            mask = torch.cat([mask[..., : evicted[0]], mask[..., evicted[1] :]], dim=-1)
        layout = BlockLayout.from_block_mask(mask, block_size, q_end - q_start, kv_end - gap * block_size)
        pieces.append((q_start, q_end, layout))
    return pieces


class LayoutCache:
    """Layouts keyed by (layer rules, q_len, kv_len, device), least recently used dropped first.

    Layers with identical rules share entries, so a static plan builds each shape once."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, list[tuple[int, int, BlockLayout]]] = OrderedDict()

    def get(
        self,
        rules: tuple[Rule, ...],
        block_size: int,
        q_len: int,
        kv_len: int,
        device: torch.device,
        evicted: tuple[int, int] = (0, 0),
    ) -> list[tuple[int, int, BlockLayout]]:
        key = (rules, q_len, kv_len, evicted, str(device))
        found = self.entries.get(key)
        if found is None:
            pieces = plan_pieces(rules, block_size, q_len, kv_len, evicted)
            found = [(a, b, lay.to(device)) for a, b, lay in pieces]
            self.entries[key] = found
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return found


# ----------------------------------------------------------------------------------------------
# The masked path for padded batches


def padded_token_mask(
    rules: Sequence[Rule],
    block_size: int,
    key_valid: torch.Tensor,  # [B, Sk] bool: False for padding keys
    q_len: int,
    lengths: torch.Tensor | None = None,  # [B]: each row's total length; default key_valid.sum(-1)
) -> torch.Tensor:  # [B, H, Sq, Sk] bool
    """The plan's token-level mask with positions counted per row over the valid keys only.

    The queries are the tokens of the last ``q_len`` keys. A row's total length (which sets the
    band) is its number of valid keys, so a left-padded row gets exactly the mask it would get
    unpadded. Pass ``lengths`` when ``key_valid`` is a prefix of the row (query chunks).
    """
    pos = key_valid.long().cumsum(-1) - 1  # [B, Sk]: position among the row's valid tokens
    n = key_valid.sum(-1) if lengths is None else lengths
    qpos = pos[:, -q_len:]
    kb = (pos // block_size)[:, None, :]  # [B, 1, Sk]
    qb = (qpos // block_size)[:, :, None]  # [B, Sq, 1]
    base = (kb <= qb) & (pos[:, None, :] <= qpos[:, :, None]) & key_valid[:, None, :]
    base &= key_valid[:, -q_len:, None]
    heads = []
    for rule in rules:
        keeps = [rule.kv_keep(int(x), block_size) for x in n.tolist()]  # (sink, band) at each row's length
        if any(keep is None for keep in keeps):  # the rule keeps every causal key (dense)
            heads.append(base)
            continue
        band = torch.tensor([keep[1] for keep in keeps], device=pos.device)
        sink = torch.tensor([keep[0] for keep in keeps], device=pos.device)
        lo = qb - band[:, None, None] + 1
        heads.append(base & ((kb >= lo) | (kb < sink[:, None, None])))
    return torch.stack(heads, dim=1)


def padded_attention(
    rules: Sequence[Rule],
    block_size: int,
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Sk, D]
    value: torch.Tensor,  # [B, Hkv, Sk, D]
    mask: torch.Tensor,  # [B, 1|Hq, Sq, Sk] bool from transformers (causality and padding)
    scale: float,
    rows_per_chunk: int = 512,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """The plan on a padded batch, densely under a mask, ``rows_per_chunk`` query rows at a time so
    the scores stay ``[B, Hq, rows_per_chunk, Sk]``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    key_valid = mask[:, 0, -1, :]  # the last query row sees every non-padding key
    lengths = key_valid.sum(-1)
    outs = []
    for start in range(0, q_len, rows_per_chunk):
        end = min(q_len, start + rows_per_chunk)
        kv_end = kv_len - q_len + end
        rows_mask = padded_token_mask(rules, block_size, key_valid[:, :kv_end], end - start, lengths)
        rows_mask &= mask[:, :, start:end, :kv_end]
        outs.append(
            masked_attention(
                query[:, :, start:end], key[:, :, :kv_end], value[:, :, :kv_end], rows_mask, scale
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def masked_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    mask: torch.Tensor,  # [B, Hq, Sq, Sk] bool
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Dense attention under a boolean mask, GQA by grouping queries (K/V are not repeated).
    Rows with no allowed key return zeros. Half precision is computed in float32."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.to(work).reshape(b, hkv, hq // hkv * sq, d)
    scores = torch.matmul(qg, k.to(work).transpose(-1, -2)) * scale  # [B, Hkv, G*Sq, Sk]
    scores = scores.masked_fill(~mask.reshape(b, hkv, hq // hkv * sq, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.to(work)).reshape(b, hq, sq, d).to(q.dtype)


def is_plain_causal(mask: torch.Tensor) -> bool:  # mask [B, 1|H, Sq, Sk] bool
    """True when ``mask`` is exactly bottom-right causal (no padding, nothing else)."""
    q_len, kv_len = mask.shape[-2:]
    return bool(mask[:, :, -1, :].all()) and bool((mask == causal_mask(q_len, kv_len, mask.device)).all())


def left_padding(mask: torch.Tensor) -> torch.Tensor:  # mask [B, 1|H, Sq, Sk] bool -> [B] int64
    """Padding columns at the start of each row, from the last query row of a padded batch's mask;
    right or inner padding is refused (positions would not be a row's count of earlier tokens)."""
    valid = mask[:, 0, -1, :]  # [B, Sk]: the last query sees every non-padding key
    pad = (~valid).sum(-1)
    if not torch.equal(valid, torch.arange(valid.shape[-1], device=valid.device)[None, :] >= pad[:, None]):
        raise PlanRuntimeError("PlanKVCache supports left-padded batches only (padding before the tokens)")
    return pad


# ----------------------------------------------------------------------------------------------
# The attention function and the handle


class PlanHandle:
    """A plan applied to a model. Use as a context manager, or call :meth:`remove`.

    Holds the registered attention-implementation name, the switch to it (which restores the
    implementation it replaced), and the layout cache.
    """

    def __init__(self, model: Any, plan: Plan, backend: str, ranking=None):
        self.model = model
        self.plan = plan
        self.backend = backend
        self.ranking = ranking  # moa_compress.gate_runtime.PrefillRanking or None (the gates)
        self.layouts = LayoutCache()
        self.name = f"moa_plan_{next(_names)}"
        self.switch = contextlib.ExitStack()  # while installed: undoes the switch to ``name``
        self.active = False
        self.gates: dict = {}  # layer -> AttnGate, for layers with gate heads
        self.hooks = None  # moa_compress.gate_runtime.GateHooks while installed
        self.gate_keys: dict = {}  # layer -> GateKeys, for calls without a PlanKVCache

    # -- attention ------------------------------------------------------------------------------

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, Hq, Sq, D], after RoPE
        key: torch.Tensor,  # [B, Hkv, Sk, D]
        value: torch.Tensor,  # [B, Hkv, Sk, D]
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:  # ([B, Sq, Hq, D], None)
        layer = module.layer_idx
        rules = self.plan.rules[layer]
        window = kwargs.get("sliding_window")
        if rules[0].model_fixed:  # one of the model's sliding-window layers: run as the model would
            if window != rules[0].tokens:
                raise PlanRuntimeError(
                    f"layer {layer}: the plan leaves it to the model's window of {rules[0].tokens} tokens, "
                    f"the model attends with sliding_window={window}"
                )
            if dropout:
                raise PlanRuntimeError("attention dropout is not supported with a plan; call model.eval()")
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            out = window_attention(query, key, value, window, scale, attention_mask)
            return out.transpose(1, 2).contiguous(), None
        for name, feature in (
            ("sliding_window", "sliding-window attention in a layer the plan does not leave to the model"),
            ("softcap", "logit softcapping"),
            ("s_aux", "attention sinks (s_aux)"),
        ):
            if kwargs.get(name) is not None:
                raise PlanRuntimeError(f"this model uses {feature}, which moa-compress plans do not support")
        if dropout:
            raise PlanRuntimeError("attention dropout is not supported with a plan; call model.eval()")
        if not getattr(module, "is_causal", True):
            raise PlanRuntimeError("plans apply to causal (decoder) attention only")
        if query.shape[1] != len(rules):
            raise PlanRuntimeError(
                f"layer {layer}: model has {query.shape[1]} query heads, plan {len(rules)}"
            )
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        if layer in self.gates:
            out = self.gated(layer, query, key, value, attention_mask, scale)
            return out.transpose(1, 2).contiguous(), None

        if isinstance(key, StoredKV):  # a PlanKVCache layer: planned storage, see moa_compress.kvcache
            if key.plan != self.plan:
                raise PlanRuntimeError("this PlanKVCache was built for a different plan than the applied one")
            out = self.attend_stored(layer, query, key, attention_mask, scale)
            return out.transpose(1, 2).contiguous(), None

        mask = None if attention_mask is None else as_bool_mask(attention_mask, key.shape[2])
        out = self.static_call(layer, query, key, value, mask, scale)
        return out.transpose(1, 2).contiguous(), None

    def static_call(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, Sq, D]
        key: torch.Tensor,  # [B, Hkv, Sk, D] every key of the call (from position 0)
        value: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1|H, Sq, Sk] bool
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """A call of a layer without gate heads over all its keys: the rules' block-sparse attention
        (per row, from its first real token, in a left-padded batch), or a prompt allocated layer-wide
        (:mod:`moa_compress.allocation`) where the ranking says so."""
        from moa_compress.allocation import allocated_attention

        rules, ranking = self.plan.rules[layer], self.ranking
        q_len, kv_len = query.shape[2], key.shape[2]
        if mask is None or is_plain_causal(mask):
            if ranking is not None and ranking.allocates(layer, q_len, kv_len):
                return allocated_attention(self.plan, layer, query, key, value, scale, self.backend, ranking)
            return self.block_sparse(rules, query, key, value, scale)
        pads = left_padding(mask).tolist()  # each row over its own tokens, as it would run alone
        own = [
            r
            for r, p in enumerate(pads)
            if ranking is not None and ranking.allocates(layer, q_len - p, kv_len - p)
        ]
        if len(own) < len(pads):
            out = padded_attention(rules, self.plan.block_size, query, key, value, mask, scale)
        else:
            out = torch.zeros_like(query)
        for r in own:
            p, row = pads[r], slice(r, r + 1)
            out[row, :, p:] = allocated_attention(
                self.plan, layer, query[row, :, p:], key[row, :, p:], value[row, :, p:], scale, self.backend,
                ranking,
            )  # fmt: skip
        return out

    def gated(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, Sq, D]
        key: torch.Tensor | StoredKV,
        value: torch.Tensor | StoredKV,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """A layer with gate heads (see :mod:`moa_compress.gate_runtime`): the gate selects blocks
        from this call's pre-RoPE queries and every pre-RoPE key so far, then one attention call (per
        piece) serves static, gate and dense heads together."""
        from moa_compress.gate_runtime import GateKeys, gated_attention, gated_padded_attention

        gate = self.gates[layer]
        if gate.q_proj.device != query.device:
            gate = self.gates[layer] = gate.to(query.device)
        q_pre, k_new = self.hooks.take(layer)
        if isinstance(key, StoredKV):
            if key.plan != self.plan:
                raise PlanRuntimeError("this PlanKVCache was built for a different plan than the applied one")
            return self.gated_stored(layer, gate, query, key, attention_mask, q_pre, k_new, scale)
        kv_len = key.shape[2]
        held = self.gate_keys.setdefault(layer, GateKeys(self.plan.block_size, keep_raw=True))
        held.update(k_new, kv_len - query.shape[2], gate)
        if attention_mask is not None:
            mask = as_bool_mask(attention_mask, kv_len)
            if not is_plain_causal(mask):
                return gated_padded_attention(
                    self.plan, layer, gate, query, key, value, q_pre, held.keys(), left_padding(mask), scale,
                    self.backend, ranking=self.ranking,
                )  # fmt: skip
        return gated_attention(
            self.plan, layer, gate, query, key, value, q_pre, held.all_codes(gate), scale, self.backend,
            self.ranking,
        )  # fmt: skip

    def gated_stored(
        self,
        layer: int,
        gate,  # the layer's moa_compress.gates.AttnGate
        query: torch.Tensor,  # [B, Hq, Sq, D]
        stored: StoredKV,
        attention_mask: torch.Tensor | None,
        q_pre: torch.Tensor,  # [B, Hq, Sq, D] this call's pre-RoPE queries
        k_new: torch.Tensor,  # [B, Hkv, Sq, D] this call's pre-RoPE keys
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """A gate layer's call through a :class:`PlanKVCache` layer: the prompt (possibly left-padded;
        a padded batch's rows then run one by one, as with the default cache), a later chunk of an
        unpadded prompt, or one decoding token. The layer keeps its gate's key codes:
        :class:`~moa_compress.gate_runtime.GateKeys` for an unpadded batch, or
        :class:`~moa_compress.gate_runtime.RowGateKeys` for a padded one (each row's blocks pooled from
        the row's first token)."""
        from moa_compress.gate_runtime import (
            GateKeys,
            RowGateKeys,
            decode_visible_blocks,
            gate_selections_for,
            gated_attention,
            gated_padded_attention,
            layer_block_rows,
        )

        cache_layer, bs = stored.layer, self.plan.block_size
        mask = None if attention_mask is None else as_bool_mask(attention_mask, stored.length)
        padded = mask is not None and not is_plain_causal(mask)
        if stored.start == 0:  # the prompt: plan the storage
            if padded:  # each row's codes, pooled from its first token, serve the prompt and the steps
                pad = left_padding(mask)
                held = cache_layer.gate_keys = RowGateKeys(bs)
                held.start(k_new, pad.tolist(), gate)
                out = gated_padded_attention(
                    self.plan, layer, gate, query, stored.keys, stored.values, q_pre, k_new, pad, scale,
                    self.backend, held.per_row(stored.length - pad), self.ranking,
                )  # fmt: skip
            else:
                pad = None
                cache_layer.gate_keys = GateKeys(bs, keep_raw=False)
                cache_layer.gate_keys.update(k_new, 0, gate)
                codes = cache_layer.gate_keys.all_codes(gate)
                out = gated_attention(
                    self.plan, layer, gate, query, stored.keys, stored.values, q_pre, codes, scale,
                    self.backend, self.ranking,
                )  # fmt: skip
            cache_layer.plan_storage(stored.keys, pad)
            cache_layer.check_length(stored.length)
            cache_layer.store(stored)
            return out
        if cache_layer.padding is not None or padded:
            if query.shape[2] != 1 or (padded and cache_layer.padding is None):
                raise PlanRuntimeError(
                    "PlanKVCache takes a padded batch's prompt in one call; later calls must be single tokens"
                )
            lengths = cache_layer.lengths(stored.length)  # [B]: each row's length with this token
            held = cache_layer.gate_keys
            held.step(k_new, lengths, gate)
            blocks = decode_visible_blocks(self.plan, layer, gate, q_pre, held.all_codes(lengths), lengths)
            return cache_layer.decode_step(query, stored, scale, self.backend, blocks=blocks)
        cache_layer.gate_keys.update(k_new, stored.start, gate)
        k_codes = cache_layer.gate_keys.all_codes(gate)
        if query.shape[2] != 1:  # a prompt chunk: each class over its keys, gate rows where full
            selections = gate_selections_for(self.plan, layer, gate, q_pre, k_codes, stored.length)
            rows = layer_block_rows(self.plan, layer, stored.length, query.shape[2], selections)
            return self.chunk_stored(self.plan.rules[layer], query, stored, scale, rows)
        blocks = decode_visible_blocks(
            self.plan, layer, gate, q_pre, k_codes, stored.length, memo=cache_layer.step_memo
        )
        return cache_layer.decode_step(query, stored, scale, self.backend, blocks=blocks)

    def attend_stored(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, Sq, D]
        stored: StoredKV,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """A call through a :class:`PlanKVCache` layer, one of three kinds:

        * the first call (the prompt, possibly left-padded): attention over this call's keys as
          without a cache, then the layer plans its storage and stores what it keeps;
        * one token (decoding): the layer's per-step path, one fused call per storage class;
        * later multi-token calls (chunked prefill, unpadded): block-sparse attention over the
          retained keys in position order plus the new ones, absent blocks skipped, then stored.
        """
        cache_layer = stored.layer
        if stored.start > 0 and query.shape[2] == 1:  # the per-step path: padding is known already
            return cache_layer.decode_step(query, stored, scale, self.backend)
        mask = None if attention_mask is None else as_bool_mask(attention_mask, stored.length)
        padded = mask is not None and not is_plain_causal(mask)
        if stored.start == 0:
            out = self.static_call(layer, query, stored.keys, stored.values, mask, scale)
            cache_layer.plan_storage(stored.keys, left_padding(mask) if padded else None)
            cache_layer.check_length(stored.length)
            cache_layer.store(stored)
            return out
        if cache_layer.padding is not None or padded:
            raise PlanRuntimeError(
                "PlanKVCache takes a padded batch's prompt in one call; later calls must be single tokens"
            )
        return self.chunk_stored(self.plan.rules[layer], query, stored, scale)

    def chunk_stored(
        self,
        rules: tuple[Rule, ...],
        query: torch.Tensor,  # [B, Hq, Sq, D]
        stored: StoredKV,
        scale: float,
        rows: torch.Tensor | None = None,  # [B, Hq, nQ_call, nK]: a gate layer's block rows
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """A later multi-token call (a prompt chunk, unpadded) through a :class:`PlanKVCache` layer: each
        storage class over its keys (:meth:`chunk_through_class`; full buffers under ``rows`` when the
        layer has gate heads), then the call's keys are stored."""
        layer = stored.layer
        layer.check_length(stored.length)
        out = torch.empty_like(query)
        for s in layer.storage:
            class_rows = None if rows is None or s.kv.is_ring else rows.index_select(1, s.q_index)
            out.index_copy_(
                1, s.q_index, self.chunk_through_class(s, rules, query, stored, scale, class_rows)
            )
        layer.store(stored)
        return out

    def chunk_through_class(
        self,
        s,  # a moa_compress.kvcache.ClassStorage
        rules: tuple[Rule, ...],
        query: torch.Tensor,  # [B, Hq, Sq, D] every query head of the layer
        stored: StoredKV,
        scale: float,
        rows: torch.Tensor | None = None,  # [B, Hq_c, nQ_call, nK] the class's block rows (full buffers)
    ) -> torch.Tensor:  # [B, Hq_c, Sq, D]
        """One storage class of :meth:`chunk_stored`: block-sparse attention over its retained keys in
        position order plus this call's, absent blocks skipped. ``rows`` (a full buffer of a layer with
        gate heads: slot = position) are the rows to compute, the gate heads' selected ones among them;
        without them the class's rules give the rows."""
        from moa_compress.gate_runtime import rows_attention

        keys, values, evicted = s.ordered(stored.start, self.plan.block_size)
        keys = torch.cat([keys, stored.keys.index_select(1, s.kv_index)], dim=2)
        values = torch.cat([values, stored.values.index_select(1, s.kv_index)], dim=2)
        q = query.index_select(1, s.q_index)
        if rows is not None:
            return rows_attention(rows, q, keys, values, self.plan.block_size, scale, self.backend)
        class_rules = tuple(rules[i] for i in s.kv.q_heads)
        pieces = self.layouts.get(
            class_rules, self.plan.block_size, query.shape[2], stored.length, query.device, evicted
        )
        outs = [
            block_sparse_attention(
                q[:, :, q_start:q_end],
                keys[:, :, : layout.kv_len],
                values[:, :, : layout.kv_len],
                layout,
                scale=scale,
                backend=self.backend,
            )
            for q_start, q_end, layout in pieces
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def block_sparse(
        self,
        rules: tuple[Rule, ...],
        query: torch.Tensor,  # [B, Hq, Sq, D]
        key: torch.Tensor,  # [B, Hkv, Sk, D]
        value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        q_len, kv_len = query.shape[2], key.shape[2]
        pieces = self.layouts.get(rules, self.plan.block_size, q_len, kv_len, query.device)
        outs = []
        for q_start, q_end, layout in pieces:
            kv_end = layout.kv_len
            outs.append(
                block_sparse_attention(
                    query[:, :, q_start:q_end],
                    key[:, :, :kv_end],
                    value[:, :, :kv_end],
                    layout,
                    scale=scale,
                    backend=self.backend,
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    # -- lifecycle ------------------------------------------------------------------------------

    def install(self) -> None:
        if self.plan.gate_layers:
            from moa_compress.gate_runtime import GateHooks
            from moa_compress.gates import gates_from_plan

            self.gates = gates_from_plan(self.plan)
            self.hooks = GateHooks(self.model, self.plan.gate_layers, self.plan.model.head_dim)
        self.switch = contextlib.ExitStack()
        try:
            # Padded batches must arrive with their mask (module docstring, "Masks").
            self.switch.enter_context(use_attention(self.model, self.name, self.attention, padding_mask=True))
        except BaseException:
            self.remove_gate_hooks()
            raise
        setattr(self.model, _HANDLE_ATTR, self)
        self.active = True

    def remove_gate_hooks(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        self.gate_keys.clear()

    def remove(self) -> None:
        """Restore the attention implementation the model had before; idempotent."""
        if not self.active:
            return
        self.active = False
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.switch.close()
        self.remove_gate_hooks()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"PlanHandle({self.name}, {state}, backend={self.backend!r}, plan for {self.plan.model.name!r})"
        )


def check_model_features(model: Any) -> None:
    """Raise :class:`PlanRuntimeError` for attention features a plan cannot express."""
    config = text_config(model)
    other = sorted(set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"})
    if other:
        raise PlanRuntimeError(
            f"this model has {', '.join(other)} layers, which moa-compress plans do not support (full and "
            "sliding-window attention layers only)"
        )
    for key, feature in _UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None) is not None:
            raise PlanRuntimeError(
                f"this model uses {feature} ({key}), which moa-compress plans do not support"
            )
    if not getattr(config, "is_causal", True) is True:
        raise PlanRuntimeError("plans apply to causal (decoder) models only")


def apply_plan(model: Any, plan: Plan, *, backend: str = "auto", ranking: Any = None) -> PlanHandle:
    """Run ``plan`` in ``model``'s attention until the returned handle is removed.

    Registers an attention function with transformers' ``AttentionInterface`` under a unique name
    and switches the model to it. A model that already has a plan has that one removed first. A
    plan whose rules are all dense still runs through the plan path (useful as a control).

    ``ranking``: how a prompt's blocks are chosen — ``"gate"`` (the plan's trained gates rank its gate
    heads' blocks), ``"sampled-layer:R"`` (the gate heads' free choice pooled over the layer and spent
    on the heads and rows of most block mass estimated from ``R`` sampled queries per block and query
    head: :mod:`moa_compress.allocation`), ``"sampled:R"`` (``R`` sampled queries per block rank each
    gate head's own blocks) or a
    :class:`~moa_compress.gate_runtime.PrefillRanking` (optionally in some layers only, or from some
    prompt length on); None: as the plan says (``compress --ranking``), else the gates. Decoding steps
    keep the plan's rules and gates.

    Example::

        with apply_plan(model, load_plan("plan-uniform", model)):
            logits = model(input_ids).logits
    """
    from moa_compress.attention import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise PlanRuntimeError(f"unknown backend {backend!r}; expected auto or one of {', '.join(BACKENDS)}")
    from moa_compress.gate_runtime import PrefillRanking

    plan.check_model(identity_of(model))
    check_model_features(model)
    ranking = PrefillRanking.for_plan(plan, ranking)
    remove_plan(model)
    handle = PlanHandle(model, plan, backend, ranking)
    handle.install()
    return handle


def remove_plan(model: Any) -> None:
    """Remove the plan applied to ``model`` (if any), restoring its previous attention."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` in recent transformers,
    ``past_key_values`` in older ones (5.17)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def active_plan(model: Any) -> Plan | None:
    """The plan currently applied to ``model``, or None."""
    handle = getattr(model, _HANDLE_ATTR, None)
    return handle.plan if handle is not None and handle.active else None


# ----------------------------------------------------------------------------------------------
# Generation


def chat_inputs(tokenizer: Any, prompt: str) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[1, S]`` for one user turn, through the chat template
    when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def generate_reply(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    plan: Plan | None = None,
    max_new_tokens: int = 256,
    streamer: Any = None,
    backend: str = "auto",
    plan_cache: bool = True,
    ranking: Any = None,
) -> str:
    """Greedy chat reply to ``prompt`` (one user turn, chat template applied).

    With ``plan``, the plan is applied for the call (gate heads ranking the prompt's blocks by
    ``ranking``, see :func:`apply_plan`) and decoding keeps only what the plan can see
    (:class:`PlanKVCache`) unless ``plan_cache=False`` (then a full cache, same tokens). ``streamer``
    (e.g. ``transformers.TextStreamer``) receives tokens as they come. Returns the reply text.
    """
    if max_new_tokens <= 0:
        raise PlanRuntimeError(f"max_new_tokens must be positive, got {max_new_tokens}")
    inputs = {k: v.to(model.device) for k, v in chat_inputs(tokenizer, prompt).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "streamer": streamer,
        "pad_token_id": pad,
        # Sampling settings from the model's generation config would only produce warnings here.
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    with torch.no_grad():
        if plan is None:
            out = model.generate(**inputs, **options)
        else:
            with apply_plan(model, plan, backend=backend, ranking=ranking):
                if plan_cache:
                    length = inputs["input_ids"].shape[1] + max_new_tokens
                    options[cache_kwarg(model)] = PlanKVCache(model.config, plan, max_length=length)
                out = model.generate(**inputs, **options)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
