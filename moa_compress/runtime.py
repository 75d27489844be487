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

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moa_compress.attention import block_sparse_attention
from moa_compress.errors import UserInputError
from moa_compress.kernels.layout import BlockLayout, causal_mask
from moa_compress.plan import DenseRule, Plan, Rule, StaticRule, identity_of, rule_key_blocks

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


class PlanRuntimeError(UserInputError):
    """A plan cannot run on this model or these inputs (unsupported feature, mismatched plan)."""


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
) -> torch.Tensor:  # [B, H, Sq, Sk] bool
    """The plan's token-level mask with positions counted per row over the valid keys only.

    The queries are the last ``q_len`` keys' tokens. A row's total length is its number of valid
    keys, so a left-padded row gets exactly the mask it would get unpadded.
    """
    pos = key_valid.long().cumsum(-1) - 1  # [B, Sk]: position among the row's valid tokens
    n = key_valid.sum(-1)  # [B]
    qpos = pos[:, -q_len:]
    kb = (pos // block_size)[:, None, :]  # [B, 1, Sk]
    qb = (qpos // block_size)[:, :, None]  # [B, Sq, 1]
    base = (kb <= qb) & (pos[:, None, :] <= qpos[:, :, None]) & key_valid[:, None, :]
    base &= key_valid[:, -q_len:, None]
    heads = []
    for rule in rules:
        if isinstance(rule, DenseRule):
            heads.append(base)
            continue
        band = torch.tensor([rule.band_blocks(int(x), block_size) for x in n.tolist()], device=pos.device)
        lo = qb - band[:, None, None] + 1
        heads.append(base & ((kb >= lo) | (kb < rule.sink_blocks)))
    return torch.stack(heads, dim=1)


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


def as_bool_mask(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:  # [B, 1|H, Sq, Sk]
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    # Additive float masks: 0 where allowed, a large negative number where masked.
    return mask > torch.finfo(mask.dtype).min / 2


# ----------------------------------------------------------------------------------------------
# The attention function and the handle


class PlanHandle:
    """A plan applied to a model. Use as a context manager, or call :meth:`remove`.

    Holds the registered attention-implementation name, the implementation it replaced, and the
    layout cache.
    """

    def __init__(self, model: Any, plan: Plan, backend: str):
        self.model = model
        self.plan = plan
        self.backend = backend
        self.layouts = LayoutCache()
        self.name = f"moa_plan_{next(_names)}"
        self.previous: str | None = None
        self.active = False

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
        for name, feature in (
            ("sliding_window", "sliding-window attention"),
            ("softcap", "logit softcapping"),
            ("s_aux", "attention sinks (s_aux)"),
        ):
            if kwargs.get(name) is not None:
                raise PlanRuntimeError(f"this model uses {feature}, which moa-compress plans do not support")
        if dropout:
            raise PlanRuntimeError("attention dropout is not supported with a plan; call model.eval()")
        if not getattr(module, "is_causal", True):
            raise PlanRuntimeError("plans apply to causal (decoder) attention only")
        layer = module.layer_idx
        rules = self.plan.rules[layer]
        if query.shape[1] != len(rules):
            raise PlanRuntimeError(
                f"layer {layer}: model has {query.shape[1]} query heads, plan {len(rules)}"
            )
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        q_len = query.shape[2]

        if isinstance(key, StoredKV):  # a PlanKVCache: per-KV-head storage without evicted blocks
            if key.plan != self.plan:
                raise PlanRuntimeError("this PlanKVCache was built for a different plan than the applied one")
            if attention_mask is not None and not is_plain_causal(as_bool_mask(attention_mask, key.length)):
                raise PlanRuntimeError(
                    "PlanKVCache does not support padded batches; generate without it (a DynamicCache)"
                )
            out = self.attend_stored(rules, query, key, scale)
            return out.transpose(1, 2).contiguous(), None

        kv_len = key.shape[2]
        if attention_mask is not None:
            mask = as_bool_mask(attention_mask, kv_len)
            if not is_plain_causal(mask):
                key_valid = mask[:, 0, -1, :]  # the last query row sees every non-padding key
                token_mask = padded_token_mask(rules, self.plan.block_size, key_valid, q_len) & mask
                out = masked_attention(query, key, value, token_mask, scale)
                return out.transpose(1, 2).contiguous(), None

        out = self.block_sparse(rules, query, key, value, scale)
        return out.transpose(1, 2).contiguous(), None

    def attend_stored(
        self,
        rules: tuple[Rule, ...],
        query: torch.Tensor,  # [B, Hq, Sq, D]
        stored: StoredKV,
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, Sq, D]
        """Attention over a PlanKVCache layer: one block-sparse call per KV head, whose storage
        lacks the evicted blocks; the layout skips them (see :func:`plan_pieces`)."""
        q_len = query.shape[2]
        group = query.shape[1] // len(stored.keys)
        outs = []
        for h, (keys, values) in enumerate(zip(stored.keys, stored.values)):
            head_rules = rules[h * group : (h + 1) * group]
            pieces = self.layouts.get(
                head_rules, self.plan.block_size, q_len, stored.length, query.device, stored.evicted[h]
            )
            q = query[:, h * group : (h + 1) * group]
            rows = [
                block_sparse_attention(
                    q[:, :, q_start:q_end],
                    keys[:, None, : layout.kv_len],
                    values[:, None, : layout.kv_len],
                    layout,
                    scale=scale,
                    backend=self.backend,
                )
                for q_start, q_end, layout in pieces
            ]
            outs.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=2))
        return torch.cat(outs, dim=1)

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
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(self.name, self.attention)
        # Registering the SDPA mask builder under our name makes padded batches arrive with a 4D
        # boolean mask; without it transformers passes no mask to custom implementations at all.
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        self.previous = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(self.name)
        except BaseException:
            self.unregister()
            raise
        setattr(self.model, _HANDLE_ATTR, self)
        self.active = True

    def unregister(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)

    def remove(self) -> None:
        """Restore the attention implementation the model had before; idempotent."""
        if not self.active:
            return
        self.active = False
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.model.set_attn_implementation(self.previous)
        self.unregister()

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
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    if sliding or any(t != "full_attention" for t in layer_types):
        raise PlanRuntimeError(
            "this model uses sliding-window (or other non-full) attention layers, which moa-compress plans "
            "do not support"
        )
    for key, feature in _UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None) is not None:
            raise PlanRuntimeError(
                f"this model uses {feature} ({key}), which moa-compress plans do not support"
            )
    if not getattr(config, "is_causal", True) is True:
        raise PlanRuntimeError("plans apply to causal (decoder) models only")


def apply_plan(model: Any, plan: Plan, *, backend: str = "auto") -> PlanHandle:
    """Run ``plan`` in ``model``'s attention until the returned handle is removed.

    Registers an attention function with transformers' ``AttentionInterface`` under a unique name
    and switches the model to it. A model that already has a plan has that one removed first. A
    plan whose rules are all dense still runs through the plan path (useful as a control).

    Example::

        with apply_plan(model, load_plan("plan-uniform", model)):
            logits = model(input_ids).logits
    """
    from moa_compress.attention import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise PlanRuntimeError(f"unknown backend {backend!r}; expected auto or one of {', '.join(BACKENDS)}")
    plan.check_model(identity_of(model))
    for layer, heads in enumerate(plan.rules):
        for head, rule in enumerate(heads):
            if not isinstance(rule, (DenseRule, StaticRule)):
                raise PlanRuntimeError(
                    f"layer {layer} head {head}: rule kind {rule.kind!r} has no runtime here"
                )
    check_model_features(model)
    remove_plan(model)
    handle = PlanHandle(model, plan, backend)
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
# Decoding with per-KV-head windows


def kept_blocks(
    rules: Sequence[Rule], seen: int, incoming: int, block_size: int, max_length: int | None = None
) -> tuple[int, int]:
    """``(sink, start)``: the key blocks a KV head shared by ``rules`` must keep when ``incoming``
    new tokens arrive after ``seen``: blocks ``< sink`` and ``>= start``; ``[sink, start)`` can go.

    A call with queries at positions ``p`` and total length ``N`` needs, per static rule, key
    blocks from ``p // block_size - band(N) + 1``. The current call has ``N = seen + incoming``.
    Later calls are covered too, in two regimes:

    * one token per call (decoding): a query in block ``b`` needs the most at the block's last
      length ``(b + 1) * block_size``; from one block to the next ``b`` grows by one and ``band`` by
      at most ``ceil(beta) <= 1``, so the current block's bound holds for every later token;
    * with ``max_length``: any later call with ``N <= max_length`` (e.g. chunked prefill).

    A later multi-token call beyond what was kept is refused by :func:`plan_pieces`. Dense rules
    keep everything (``start = 0``).
    """
    if any(isinstance(r, DenseRule) for r in rules):
        return 0, 0
    b = seen // block_size
    horizon = max(seen + incoming, (b + 1) * block_size, max_length or 0)
    start = min(b - r.band_blocks(horizon, block_size) + 1 for r in rules)
    return max(r.sink_blocks for r in rules), max(start, 0)


class StoredKV:
    """What :class:`PlanKVCache` hands the attention function in place of key/value tensors.

    ``keys[h]``/``values[h]``: ``[B, L_h, D]`` stored tokens of KV head ``h`` in position order;
    ``evicted[h] = (first, end)``: absolute key blocks ``[first, end)`` missing from them;
    ``length``: tokens seen including the current call's; ``plan``: the plan the cache follows.
    Only the plan's attention function understands it.
    """

    __slots__ = ("evicted", "keys", "length", "plan", "values")

    def __init__(self, keys, values, evicted, length, plan):
        self.keys, self.values, self.evicted, self.length, self.plan = keys, values, evicted, length, plan

    def __getattr__(self, name: str):
        raise PlanRuntimeError(
            f"PlanKVCache storage has no tensor attribute {name!r}: it only works under apply_plan(model, plan) "
            "with the same plan"
        )


class PlanKVLayer(CacheLayerMixin):
    """One layer of a :class:`PlanKVCache`: per KV head a buffer ``[B, capacity, D]`` holding the
    sink tokens followed by the kept window; evicted blocks are cut out once per block."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, groups: list[tuple[Rule, ...]], block_size: int, plan: Plan, max_length: int | None):
        super().__init__()
        self.groups = groups
        self.block_size = block_size
        self.plan = plan
        self.max_length = max_length
        self.reset()

    def reset(self) -> None:
        hkv = len(self.groups)
        self.key_buffers: list[torch.Tensor | None] = [None] * hkv
        self.value_buffers: list[torch.Tensor | None] = [None] * hkv
        self.stored = [0] * hkv  # tokens in each buffer
        self.evicted = [(0, 0)] * hkv
        self.seen = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def evict(self, h: int, incoming: int) -> None:
        """Drop the blocks of KV head ``h`` that neither the incoming call nor later ones can see."""
        sink, start = kept_blocks(self.groups[h], self.seen, incoming, self.block_size, self.max_length)
        end = max(self.evicted[h][1], sink)
        if start <= end:
            return
        bs = self.block_size
        # Stored tokens: [0, sink*bs) then absolute [end*bs, seen); cut [end*bs, start*bs).
        cut_from, cut = sink * bs, (start - end) * bs
        for buf in (self.key_buffers[h], self.value_buffers[h]):
            live = buf[:, cut_from + cut : self.stored[h]].clone()
            buf[:, cut_from : cut_from + live.shape[1]] = live
        self.stored[h] -= cut
        self.evicted[h] = (sink, start)

    def append(self, h: int, keys: torch.Tensor, values: torch.Tensor) -> None:  # [B, S, D]
        need = self.stored[h] + keys.shape[1]
        buf = self.key_buffers[h]
        if buf is None or buf.shape[1] < need:
            # Grow by a quarter (at least a block): amortised O(1) per token, little slack.
            capacity = need + max(need // 4, self.block_size)
            for name, new in (("key_buffers", keys), ("value_buffers", values)):
                grown = new.new_empty(new.shape[0], capacity, new.shape[2])
                old = getattr(self, name)[h]
                if old is not None:
                    grown[:, : self.stored[h]] = old[:, : self.stored[h]]
                getattr(self, name)[h] = grown
        self.key_buffers[h][:, self.stored[h] : need] = keys
        self.value_buffers[h][:, self.stored[h] : need] = values
        self.stored[h] = need

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, S, D]`` keys/values; return :class:`StoredKV` for both."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for h in range(len(self.groups)):
            self.evict(h, key_states.shape[2])
            self.append(h, key_states[:, h], value_states[:, h])
        self.seen += key_states.shape[2]
        view = StoredKV(
            [buf[:, :n] for buf, n in zip(self.key_buffers, self.stored)],
            [buf[:, :n] for buf, n in zip(self.value_buffers, self.stored)],
            list(self.evicted),
            self.seen,
            self.plan,
        )
        return view, view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise PlanRuntimeError("PlanKVCache drops keys for good and cannot be cropped")

    def _map_buffers(self, fn) -> None:
        self.key_buffers = [None if b is None else fn(b) for b in self.key_buffers]
        self.value_buffers = [None if b is None else fn(b) for b in self.value_buffers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda b: b.index_select(0, beam_idx.to(b.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda b: b.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda b: b[indices])

    def offload(self) -> None:
        self._map_buffers(lambda b: b.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_buffers(lambda b: b.to(self.device, non_blocking=True))

    def nbytes(self) -> tuple[int, int]:
        """(bytes of stored tokens, bytes allocated) for keys and values together."""
        live = allocated = 0
        for bufs in (self.key_buffers, self.value_buffers):
            for buf, n in zip(bufs, self.stored):
                if buf is not None:
                    per_token = buf.shape[0] * buf.shape[2] * buf.element_size()
                    live += n * per_token
                    allocated += buf.shape[1] * per_token
        return live, allocated


class PlanKVCache(Cache):
    """A transformers ``Cache`` that keeps, per layer and KV head, only the keys/values the plan's
    rules can still see: the sink blocks plus the band window (the union over the KV head's query
    heads; a dense head keeps everything). Memory shrinks with the plan's density.

    Use it under ``apply_plan(model, plan)`` with the same plan; generation then matches a full
    cache token for token. Storage is ragged per KV head (``[B, L_h, D]`` buffers), so the attention
    function runs one block-sparse call per KV head. Padded batches are not supported (the rules
    count positions per row, the storage is shared by the batch): the attention function raises.
    The whole prompt's KV is held during the prefill call and trimmed before the next one.

    What is kept: for the prompt, then one token per call (``generate``), exactly what later
    tokens can see. Rules whose band grows with the length (``beta > 0``) apply the band at a
    call's total length to all its queries, so several *multi-token* calls (chunked prefill after
    eviction) need ``max_length``: the cache then keeps what any call up to that length needs
    (more memory for growing bands; no difference for fixed windows). A call that needs dropped
    keys raises :class:`PlanRuntimeError` rather than compute something else.

    Example::

        with apply_plan(model, plan):
            cache = PlanKVCache(model.config, plan)
            model.generate(input_ids, past_key_values=cache, max_new_tokens=100)
            print(cache.memory())
    """

    def __init__(self, config: Any, plan: Plan, max_length: int | None = None):
        plan.check_model(identity_of(config))
        self.plan = plan
        kv_heads = plan.model.num_kv_heads
        group = plan.model.num_heads // kv_heads
        layers = [
            PlanKVLayer(
                [heads[h * group : (h + 1) * group] for h in range(kv_heads)],
                plan.block_size,
                plan,
                max_length,
            )
            for heads in plan.rules
        ]
        super().__init__(layers=layers)

    def memory(self) -> dict[str, int | float]:
        """Bytes of stored keys/values, bytes allocated, the bytes a full cache would hold for the
        same tokens, and ``fraction = stored / full``."""
        live = allocated = full = 0
        for layer in self.layers:
            stored, alloc = layer.nbytes()
            live, allocated = live + stored, allocated + alloc
            for buf in layer.key_buffers:
                if buf is not None:
                    full += 2 * layer.seen * buf.shape[0] * buf.shape[2] * buf.element_size()
        return {
            "stored_bytes": live,
            "allocated_bytes": allocated,
            "full_bytes": full,
            "fraction": live / full if full else 0.0,
        }


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
) -> str:
    """Greedy chat reply to ``prompt`` (one user turn, chat template applied).

    With ``plan``, the plan is applied for the call and decoding keeps only what the plan can see
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
            with apply_plan(model, plan, backend=backend):
                if plan_cache:
                    options[cache_kwarg(model)] = PlanKVCache(model.config, plan)
                out = model.generate(**inputs, **options)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
