"""Gate heads at inference: the per-input block selection of a plan's ``gate`` rules.

A layer with gate heads needs its queries and keys *before* RoPE (the gates were trained on them,
see :mod:`moa_compress.gates`). :class:`GateHooks` records them from the layer's ``q_proj`` /
``k_proj`` outputs (forward hooks: nothing in the model is patched); what the layer needs of earlier
calls' keys is kept in a :class:`GateKeys` (in the :class:`~moa_compress.kvcache.PlanKVCache` layer when
there is one, so beam reordering moves it too; else in the plan's handle).

For a call of ``q_len`` queries over ``kv_len`` keys (bottom-right aligned, like the static rules)
:func:`gate_selections_for` pools this call's queries per absolute block (a block averages the queries
it has in this call: one token when decoding), scores them against the gate code of every key block
(its keys pooled by mean, max and min, projected and rotated; a complete block's code is computed once
and kept) with the layer's :class:`~moa_compress.gates.AttnGate` and keeps, per query head and
query-block row, the sink, the diagonal and the best others —
:meth:`~moa_compress.plan.GateRule.blocks_per_row` at total length ``kv_len`` (every causal block in a
rule's dense tail rows, :attr:`~moa_compress.plan.GateRule.tail`: a decoding step is such a row) — all
heads and rows at once. :func:`layer_block_rows` merges those rows with the static heads' fixed rows,
so one attention call serves every head of the layer.

A prompt can be ranked another way (:class:`PrefillRanking`, ``apply_plan(..., ranking=...)``): by the
true attention of a few sampled queries per query block (:func:`sampled_scores`), which follows the
input more closely than the pooled gate, at a cost that grows with the samples (four samples per
64-token block, with the selection: 9% of dense causal attention's time at 8K tokens on a 2-core CPU, 11%
at 4K, 22% at 2K: BENCHMARKS.md). A plan made with ``compress --ranking`` carries its ranking. Decoding
steps keep the gate: scoring one query row exactly costs as much as attending with it. A prompt can also
be allocated layer-wide (``ranking="sampled-layer:R"``, :mod:`moa_compress.allocation`): the gate
heads' free choice of blocks, pooled over the layer, goes to the heads and rows of most sampled mass.

Memory: in a :class:`~moa_compress.kvcache.PlanKVCache` a gate layer keeps ``gate_dim`` numbers per gate
head and key block plus the raw pre-RoPE keys of its unfinished last block (a few percent of its key
cache at the defaults); with the default cache it keeps every pre-RoPE key (``[B, Hkv, S, D]``, as large as the
layer's key cache) so that the cache can be cropped and padded rows pooled from their own first token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moa_compress.errors import PlanRuntimeError
from moa_compress.gates import (
    AttnGate,
    StepSelection,
    attention_layers,
    gate_selections,
    layer_gate_heads,
    pool_keys,
    pool_queries_at,
)
from moa_compress.kernels.layout import BlockLayout
from moa_compress.plan import Plan, num_blocks

# Bytes of attention scores one chunk of sampled queries holds (a few MB: the chunk's scores stay in the
# cache through the softmax and the block sums; measured at 8K, 2-8 MB chunks were fastest).
SAMPLED_CHUNK_BYTES = 1 << 23


# A ranking's name in text ("sampled-layer:16") -> its PrefillRanking.scope.
SCOPES = {"sampled": "row", "sampled-layer": "layer", "sampled-layer-all": "layer-all"}


@dataclass(frozen=True)
class PrefillRanking:
    """How a layer chooses a prompt's key blocks (calls with more than one query: a prompt, or a chunk of
    one). ``samples = 0``: the trained gates rank the gate heads' blocks (the default). ``samples = R``,
    in ``layers`` only if given (the others keep the plan as it is):

    * ``scope="row"`` (``"sampled:R"``): the gate heads rank their blocks by the true attention of ``R``
      sampled queries per query block (:func:`sampled_scores`). The blocks kept per row are the rules'
      own (sink, local window, ``blocks_per_row``), so densities and the decode cache are unchanged.
      Scores are per KV group (the mean of its query heads' sampled mass), as the default gates decide;
      a plan with per-query-head gates still shares one ranking per group here.
    * ``scope="layer"`` (``"sampled-layer:R"``): in a prompt's first call (every query of the sequence
      in one call) each head keeps what its rule keeps on every input, and the rest of the layer's pair
      budget at that length (the plan's, summed over its heads: the gate heads' free choice) goes to
      whichever heads and rows hold the most block mass per pair, estimated from ``R`` sampled queries
      per block and query head (:mod:`moa_compress.allocation`). A head's prompt density then follows
      the input; the layer's does not exceed the plan's; a layer without gate heads is unchanged. Later
      calls (prompt chunks after the first, decoding steps) run the plan's rules and gates, so the
      decode cache is the plan's too.
    * ``scope="layer-all"`` (``"sampled-layer-all:R"``): the same, but every head keeps only its sink
      and diagonal and the whole rest of the layer's budget moves (the eval's ``oracle-layer`` selection
      on estimated mass; a layer without gate heads changes too). It frees the budget that the rules'
      windows and bands hold, which finds more passkeys and costs prose fidelity at short lengths
      (BENCHMARKS.md).

    ``min_length``: calls over fewer keys than this (a prompt shorter than it, or the first chunk of
    one) keep the plan's rules and gates — e.g. to allocate long prompts only.

    Decoding steps always rank by the gate. Calls through a
    :class:`~moa_compress.kvcache.PlanKVCache` rank the prompt this way but keep the plan's rules and
    gates for later chunks (the cache keeps each storage class's keys apart)."""

    samples: int = 0
    layers: frozenset[int] | None = None
    scope: str = "row"
    min_length: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "min_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanRuntimeError(f"ranking {name} must be a whole number >= 0, got {value!r}")
        if self.scope not in SCOPES.values():
            raise PlanRuntimeError(
                f"ranking scope must be one of {', '.join(SCOPES.values())}, got {self.scope!r}"
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(int(i) for i in self.layers))

    @classmethod
    def parse(
        cls, text: str, layers: str | Iterable[int] | None = None, min_length: int = 0
    ) -> PrefillRanking:
        """``"gate"``, ``"sampled:R"``, ``"sampled-layer:R"`` or ``"sampled-layer-all:R"``; ``layers`` as
        ``"LO-HI"`` (inclusive), ``"A,B,..."`` or integers."""
        head, _, count = text.partition(":")
        if text == "gate":
            samples, scope = 0, "row"
        elif head in SCOPES and count.isdigit() and int(count) >= 1:
            samples, scope = int(count), SCOPES[head]
        else:
            raise PlanRuntimeError(
                "ranking must be gate, sampled:R, sampled-layer:R or sampled-layer-all:R with a whole R >= 1, "
                f"got {text!r}"
            )
        return cls(samples, parse_layers(layers) if isinstance(layers, str) else layers, scope, min_length)

    @classmethod
    def for_plan(cls, plan: Plan, ranking: str | PrefillRanking | None = None) -> PrefillRanking | None:
        """What ``apply_plan(model, plan, ranking=ranking)`` runs: ``ranking`` if given (``"gate"``: the
        gates), else the plan's own (:attr:`moa_compress.plan.GateConfig.ranking_samples`); None when
        the gates rank every call."""
        if ranking is None and plan.gates is not None and plan.gates.ranking_samples:
            ranking = cls(plan.gates.ranking_samples, plan.gates.ranking_layers)
        if isinstance(ranking, str):
            ranking = cls.parse(ranking)
        if ranking is None or not ranking.samples:
            return None
        ranking.check_layers(plan.model.num_layers)
        return ranking

    def check_layers(self, num_layers: int) -> None:
        outside = sorted(i for i in self.layers or () if not 0 <= i < num_layers)
        if outside:
            raise PlanRuntimeError(
                f"ranking layers {outside} are not layers of this model (0 to {num_layers - 1})"
            )

    def ranks(self, layer: int) -> bool:
        """Whether ``layer``'s prompts rank by sampled queries."""
        return self.samples > 0 and (self.layers is None or layer in self.layers)

    def applies(self, layer: int, q_len: int, kv_len: int) -> bool:
        """Whether the gate heads of ``layer`` rank a call of ``q_len`` queries over ``kv_len`` keys by
        sampled queries, row by row (decoding steps never; nor a ``"layer"`` scope, see :meth:`allocates`)."""
        return self.scope == "row" and q_len > 1 and kv_len >= self.min_length and self.ranks(layer)

    def allocates(self, layer: int, q_len: int, kv_len: int) -> bool:
        """Whether a call of ``q_len`` queries over ``kv_len`` keys in ``layer`` is allocated layer-wide:
        a layer scope and a whole prompt in one call."""
        return self.scope != "row" and 1 < q_len == kv_len >= self.min_length and self.ranks(layer)

    @property
    def keeps_rules(self) -> bool:
        """Whether a layer-wide allocation keeps each rule's fixed blocks (``"layer"``) or only every
        head's sink and diagonal (``"layer-all"``)."""
        return self.scope == "layer"

    def describe(self) -> str:
        if not self.samples:
            return "gate"
        where = "" if self.layers is None else f" in layers {format_layers(self.layers)}"
        since = f" from {self.min_length} tokens" if self.min_length else ""
        name = next(text for text, scope in SCOPES.items() if scope == self.scope)
        return f"{name}:{self.samples}{where}{since}"


def parse_layers(text: str) -> frozenset[int]:
    """``"20-29"`` (inclusive) or ``"3,5,7"`` or a mix (``"0-3,9"``) -> layer indices."""
    out: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise PlanRuntimeError(f"layers must look like 20-29 or 3,5,7, got {text!r}")
        out.update(range(int(lo), int(hi if dash else lo) + 1))
    return frozenset(out)


def format_layers(layers: Iterable[int]) -> str:
    """The inverse of :func:`parse_layers`, runs written ``LO-HI``."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class GateKeys:
    """What a gate layer keeps of its keys between calls: the gate codes of every complete key block
    (``codes [B, H_gate, nFull, gate_dim]``, :meth:`~moa_compress.gates.AttnGate.key_codes`, computed once,
    when the block fills) and the pre-RoPE keys ``raw [B, Hkv, S - offset, D]`` still needed.

    ``keep_raw=False`` (a :class:`~moa_compress.kvcache.PlanKVCache` with an unpadded batch, never cropped;
    a padded one holds :class:`RowGateKeys`) keeps the raw keys of the unfinished last block only, so the layer holds ``gate_dim``
    numbers per gate head and block instead of ``D`` per KV head and token. ``keep_raw=True`` (the
    default cache) keeps every raw key, padding included: a cropped cache drops codes and keys past
    the crop, and a left-padded batch pools each row from its own first token (:func:`row_codes`).

    :meth:`update` takes each call's new keys and the number of columns before them: 0 starts over (a
    new prompt), fewer than held drops the rest first (a cache cropped back), more than held is an
    error (the keys of some tokens were never seen)."""

    def __init__(self, block_size: int, keep_raw: bool = True) -> None:
        self.block_size, self.keep_raw = block_size, keep_raw
        self.codes: torch.Tensor | None = None
        self.raw: torch.Tensor | None = None
        self.offset = 0  # the column of raw[:, :, 0]
        self.length = 0
        # keep_raw=False, one token at a time (decoding): raw is a view of ``tail [B, Hkv, bs, D]`` and
        # codes of ``store [B, H_gate, capacity, gate_dim]``, zeros past the coded blocks (the
        # placeholder of all_codes); None until the first such step, and again after any other call.
        self.tail: torch.Tensor | None = None
        self.store: torch.Tensor | None = None

    def update(self, new: torch.Tensor, past: int, gate: AttnGate) -> None:  # new [B, Hkv, s, D]
        if (
            not self.keep_raw
            and new.shape[2] == 1
            and 0 < past == self.length
            and self.raw is not None
            and self.raw.shape[0] == new.shape[0]
        ):
            self._step(new, gate)
            return
        self.tail = self.store = None
        bs = self.block_size
        if past == 0:
            self.codes, self.raw, self.offset = None, new[:, :, :0], 0
        elif self.raw is None or self.length < past or self.raw.shape[0] != new.shape[0]:
            raise PlanRuntimeError(
                f"a gate layer got a call after {past} cached tokens but saw {self.length}: its cache was "
                "filled without the plan applied, or reordered (beam search needs a PlanKVCache)"
            )
        elif past < self.length:
            if past < self.offset:
                raise PlanRuntimeError(
                    f"a gate layer cannot go back to {past} tokens: it pooled the keys before {self.offset}"
                )
            self.raw = self.raw[:, :, : past - self.offset]
            self.codes = self.codes[:, :, : past // bs] if self.codes is not None else None
        self.raw = torch.cat([self.raw, new], dim=2)
        self.length = past + new.shape[2]
        done = 0 if self.codes is None else self.codes.shape[2]
        full = self.length // bs
        if full > done:
            piece = self.raw[:, :, done * bs - self.offset : full * bs - self.offset]
            fresh = row_codes(gate, piece, bs, first=done)
            self.codes = fresh if self.codes is None else torch.cat([self.codes, fresh], dim=2)
        if not self.keep_raw:
            self.raw = self.raw[:, :, full * bs - self.offset :].clone()
            self.offset = full * bs

    def all_codes(self, gate: AttnGate) -> torch.Tensor:  # [B, H_gate, num_blocks(length), gate_dim]
        """The codes of every key block so far: the complete blocks' and, when the last block is not
        full, a zero placeholder for it. The last key block is causal for the last query-block row only,
        where it is the diagonal, which every gate rule keeps whatever its score: pooling and projecting
        the unfinished block at every call (every decode step) would change no selection."""
        if self.length % self.block_size == 0:
            return self.codes
        if self.store is not None:  # the slot after the coded blocks holds zeros
            return self.store[:, :, : self.length // self.block_size + 1]
        heads = gate.k_proj.shape[0]  # gate heads
        placeholder = self.raw.new_zeros(self.raw.shape[0], heads, 1, gate.gate_dim, dtype=gate.k_proj.dtype)
        return placeholder if self.codes is None else torch.cat([self.codes, placeholder], dim=2)

    def _step(self, new: torch.Tensor, gate: AttnGate) -> None:  # new [B, Hkv, 1, D]
        """One decoding token without ``keep_raw``: written into the unfinished block's buffer; a block it
        completes is coded into the next slot of the code store (both made once, then reused)."""
        bs = self.block_size
        filled = self.length - self.offset  # raw keys held, < bs
        if self.tail is None:
            b, hkv, _, d = new.shape
            self.tail = new.new_empty(b, hkv, bs, d)
            self.tail[:, :, :filled].copy_(self.raw)
        self.tail.select(2, filled).copy_(new.select(2, 0))
        self.length += 1
        filled += 1
        done = self.length // bs  # complete blocks
        if self.store is None or self.store.shape[2] < done + 1:  # room for them and a zero slot
            b, heads, gate_dim = new.shape[0], gate.k_proj.shape[0], gate.gate_dim
            store = gate.k_proj.new_zeros(b, heads, done + max(8, done // 8), gate_dim)  # 1/8 headroom
            coded = 0 if self.codes is None else self.codes.shape[2]
            if coded:
                store[:, :, :coded].copy_(self.codes)
            self.store = store
        if filled == bs:  # the block just completed: code it
            code = row_codes(gate, self.tail, bs, first=done - 1)  # [B, H_gate, 1, gate_dim]
            self.store[:, :, done - 1].copy_(code.select(2, 0))
            self.codes = self.store[:, :, :done]
            self.offset, filled = self.length, 0
        self.raw = self.tail[:, :, :filled]

    def keys(self) -> torch.Tensor:  # [B, Hkv, length, D]
        if self.offset:
            raise PlanRuntimeError("this gate layer kept only the keys of its last block")
        return self.raw

    def batch_map(self, fn) -> None:
        self.tail = self.store = None
        if self.raw is not None:
            self.raw = fn(self.raw).contiguous()
        if self.codes is not None:
            self.codes = fn(self.codes).contiguous()

    def nbytes(self) -> int:
        held = (
            self.raw if self.tail is None else self.tail,
            self.codes if self.store is None else self.store,
        )
        return sum(t.numel() * t.element_size() for t in held if t is not None)


class RowGateKeys:
    """:class:`GateKeys` for a left-padded batch in a :class:`~moa_compress.kvcache.PlanKVCache`: every
    row pools its key blocks from its own first token, so rows have their own block boundaries.

    One buffer for the batch: ``codes [B, H_gate, capacity, gate_dim]`` (row ``b``'s complete blocks
    first, zeros after them: the placeholder of its unfinished block, see :meth:`GateKeys.all_codes`)
    and ``tail [B, Hkv, block_size, D]``, the pre-RoPE keys of each row's unfinished block. The row
    lengths are the cache layer's (:meth:`~moa_compress.kvcache.PlanKVLayer.lengths`), passed in. A
    decode step writes every row's key with one indexed copy and codes, batched, the blocks that the
    step completes; the capacity doubles when a row needs more blocks."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.codes: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None

    def start(self, k_pre: torch.Tensor, padding: Sequence[int], gate: AttnGate) -> None:
        """The prompt ``k_pre [B, Hkv, S, D]`` (pre-RoPE keys; row ``b`` left-padded by ``padding[b]``)."""
        bs = self.block_size
        b, hkv, s, d = k_pre.shape
        capacity = max(1, num_blocks(s, bs))
        self.codes = k_pre.new_zeros(b, gate.gate_heads, capacity, gate.gate_dim, dtype=gate.k_proj.dtype)
        self.tail = k_pre.new_zeros(b, hkv, bs, d)
        for row, pad in enumerate(padding):  # once per prompt: rows have their own block boundaries
            keys = k_pre[row : row + 1, :, pad:]
            full = keys.shape[2] // bs
            if full:
                self.codes[row : row + 1, :, :full] = row_codes(gate, keys[:, :, : full * bs], bs)
            rest = keys.shape[2] - full * bs
            self.tail[row, :, :rest] = keys[0, :, full * bs :]

    def step(self, k_new: torch.Tensor, lengths: torch.Tensor, gate: AttnGate) -> None:
        """One decoding token per row, ``k_new [B, Hkv, 1, D]``; ``lengths [B]``: each row's length with it."""
        bs = self.block_size
        rows = torch.arange(len(lengths), device=self.tail.device)
        lengths = lengths.to(self.tail.device)
        self.tail[rows, :, (lengths - 1) % bs] = k_new[:, :, 0].to(self.tail.dtype)
        needed = num_blocks(int(lengths.max()), bs)  # every row's blocks, its unfinished one included
        if needed > self.codes.shape[2]:
            grown = self.codes.new_zeros(*self.codes.shape[:2], 2 * needed, self.codes.shape[3])
            grown[:, :, : self.codes.shape[2]] = self.codes
            self.codes = grown
        done = (lengths % bs == 0).nonzero()[:, 0]  # rows whose last block this token completes
        if done.numel():
            blocks = lengths[done] // bs - 1  # the block each completes
            pooled = pool_keys(self.tail[done], bs)  # [n, Hkv, 1, 3·D], as row_codes pools
            fresh = gate.key_codes(pooled, first=blocks)  # [n, H_gate, 1, gate_dim]
            self.codes[done, :, blocks] = fresh[:, :, 0]
        # The unfinished block's placeholder stays zero: the next block of a row that just completed one
        # has never been written (the capacity grows with zeros).

    def all_codes(self, lengths: torch.Tensor) -> torch.Tensor:  # [B, H_gate, max num_blocks, gate_dim]
        """Every row's block codes up to the longest row's last block (zeros past each row's complete
        blocks: its unfinished block's placeholder, then blocks not causal for it)."""
        return self.codes[:, :, : num_blocks(int(lengths.max()), self.block_size)]

    def per_row(self, lengths: torch.Tensor) -> list[torch.Tensor]:  # [1, H_gate, num_blocks(n_b), gate_dim]
        """Each row's codes alone, up to its own last block (what :class:`GateKeys.all_codes` gives for
        that row run by itself)."""
        return [
            self.codes[r : r + 1, :, : num_blocks(int(n), self.block_size)]
            for r, n in enumerate(lengths.tolist())
        ]

    def batch_map(self, fn) -> None:
        if self.codes is not None:
            self.codes, self.tail = fn(self.codes).contiguous(), fn(self.tail).contiguous()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tail, self.codes) if t is not None)


def row_codes(gate: AttnGate, k_pre: torch.Tensor, block_size: int, first: int = 0) -> torch.Tensor:
    """Gate codes ``[B, H_gate, nK, gate_dim]`` of every key block of ``k_pre [B, Hkv, S, D]``, pooled
    from its first column, which is the first column of block ``first`` (no cache)."""
    return gate.key_codes(pool_keys(k_pre, block_size), first=first)


class GateHooks:
    """Forward hooks on the ``q_proj`` / ``k_proj`` of the gate layers; :meth:`take` hands the attention
    function the last call's pre-RoPE queries ``[B, Hq, S, D]`` and keys ``[B, Hkv, S, D]``."""

    def __init__(self, model: Any, layers: tuple[int, ...], head_dim: int):
        self.head_dim = head_dim
        self.seen: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        found = {m.layer_idx: m for m in attention_layers(model)}
        missing = [i for i in layers if i not in found]
        if missing:
            raise PlanRuntimeError(
                f"layers {missing} have gate heads but no attention module with q_proj / k_proj to read"
            )
        for layer in layers:
            for which in ("q", "k"):
                proj = getattr(found[layer], f"{which}_proj")
                self.handles.append(proj.register_forward_hook(self._record(layer, which)))

    def _record(self, layer: int, which: str):
        def record(module, inputs, output):  # output [B, S, H * D]
            b, s = output.shape[:2]
            self.seen[(layer, which)] = output.detach().view(b, s, -1, self.head_dim).transpose(1, 2)

        return record

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.seen.pop((layer, "q")), self.seen.pop((layer, "k"))
        except KeyError:
            raise PlanRuntimeError(
                f"layer {layer}: the gate saw no q_proj/k_proj output for this call (the attention was "
                "called without the layer's projections)"
            ) from None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.seen.clear()


def gate_scores_for(
    gate: AttnGate,
    q_pre: torch.Tensor,  # [B, Hq, Sq, D] this call's pre-RoPE queries
    k_codes: torch.Tensor,  # [B, H_gate, nK, gate_dim] every key block's code (GateKeys.all_codes)
    kv_len: int,
    block_size: int,
) -> torch.Tensor:  # [B, H_gate, nQ_call, nK]
    """The gate's scores of the call's query blocks (absolute blocks ``(kv_len - Sq) // block_size`` to
    the last; each pools the call's queries in it) against every key block."""
    first = kv_len - q_pre.shape[2]
    q_blocks = pool_queries_at(q_pre, first, block_size)
    return gate.scores(gate.query_codes(q_blocks, first // block_size), k_codes)


def sample_positions(
    first: int, kv_len: int, block_size: int, samples: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:  # ([nQ_call, R] long, [nQ_call, R] bool)
    """The sampled queries of a call's query blocks (absolute blocks ``first // block_size`` to the
    last; the call's queries are positions ``first`` to ``kv_len - 1``): offsets ``block_size - 1``
    within the block, then down in steps of ``block_size / samples``. A position outside the call is not
    valid (its column holds a clamped stand-in); a block with none in it samples the call's last query in
    that block."""
    bs = block_size
    blocks = torch.arange(first // bs, num_blocks(kv_len, bs), device=device)
    offsets = torch.tensor([bs - 1 - (i * bs) // samples for i in range(samples)], device=device)
    positions = blocks[:, None] * bs + offsets  # [nQ, R]
    valid = (positions >= first) & (positions < kv_len)
    empty = ~valid.any(-1)
    last = (blocks * bs + bs - 1).clamp(max=kv_len - 1)
    positions[:, 0] = torch.where(empty, last, positions[:, 0])
    valid[:, 0] |= empty
    return positions.clamp(first, kv_len - 1), valid


def sampled_scores(
    query: torch.Tensor,  # [B, Hq, Sq, D] after RoPE: positions kv_len - Sq .. kv_len - 1
    key: torch.Tensor,  # [B, Hkv, Sk, D] after RoPE, every key from position 0
    scale: float,
    block_size: int,
    samples: int,
    chunk_bytes: int = SAMPLED_CHUNK_BYTES,
    per_head: bool = False,
) -> torch.Tensor:  # [B, Hkv | Hq, nQ_call, nK], at least float32; -inf above the block diagonal
    """Block scores of the call's query blocks from ``samples`` sampled queries each
    (:func:`sample_positions`): the log of the causal softmax attention each sampled query puts on every
    key block, averaged over the block's valid samples and the KV group's query heads (``per_head``: per
    query head, not averaged over its group). With every query of a block sampled it is the log of the
    block's attention mass per query.

    Cost: ``samples / block_size`` of the full score product (at most; the queries of a chunk see only
    the keys up to its last block) plus a softmax per sampled row, in chunks of about ``chunk_bytes`` of
    scores, batched over heads and rows; the query heads of a KV group share its keys (no repeat)."""
    b, hq, sq, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    group, bs, first = hq // hkv, block_size, kv_len - sq
    positions, valid = sample_positions(first, kv_len, bs, samples, query.device)
    nq, nk, rows = positions.shape[0], num_blocks(kv_len, bs), group * samples
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query[:, :, (positions - first).flatten()].to(dtype) * scale  # [B, Hq, nQ * R, D]
    q = q.view(b, hkv, group, nq, samples, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nq, rows, d)
    k = key.to(dtype)
    weight = valid.to(dtype) / valid.sum(-1, keepdim=True)  # [nQ, R]
    row_positions = positions.repeat(1, group)  # [nQ, G·R], the row order of q (head-major)
    columns = torch.arange(kv_len, device=query.device)
    out = torch.zeros(b, hkv, group, nq, nk, dtype=dtype, device=query.device)
    step = max(1, chunk_bytes // (b * hkv * rows * kv_len * k.element_size()))  # query blocks per chunk
    for j0 in range(0, nq, step):
        j1 = min(nq, j0 + step)
        end = min(kv_len, (first // bs + j1) * bs)  # keys causal for some query of the chunk
        scores = q[:, :, j0:j1].flatten(2, 3) @ k[:, :, :end].transpose(-1, -2)  # [B, Hkv, c·G·R, end]
        scores = scores.unflatten(2, (j1 - j0, rows))
        seen = (first // bs + j0) * bs  # every query of the chunk sees the keys before its first block
        ahead = columns[seen:end] > row_positions[j0:j1, :, None]  # [c, G·R, end - seen]
        scores[..., seen:].masked_fill_(ahead, float("-inf"))
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        scores.div_(scores.sum(-1, keepdim=True))  # [B, Hkv, c, G·R, end]: each row's attention
        full = end // bs
        per_block = scores[..., : full * bs].unflatten(-1, (full, bs)).sum(-1)
        if end > full * bs:  # a last, shorter key block
            per_block = torch.cat([per_block, scores[..., full * bs :].sum(-1, keepdim=True)], -1)
        per_block = per_block.unflatten(3, (group, samples))  # [B, Hkv, c, G, R, blocks]
        out[:, :, :, j0:j1, : per_block.shape[-1]] = torch.einsum(
            "bhcgrk,cr->bhgck", per_block, weight[j0:j1]
        )
    return out.flatten(1, 2).log() if per_head else out.mean(2).log()


def sample_rankings(
    model: Any, input_ids: torch.Tensor, block_size: int, samples: int
) -> dict[str, torch.Tensor]:  # "sampled.{layer}" -> [Hkv, nB, nB] float32, CPU
    """One dense forward of ``input_ids [S]`` (a calibration sample): per planned layer, the block scores
    :func:`sampled_scores` ranks its prompt by, so that the search can cost gate rules under that
    ranking (:func:`moa_compress.search.gate_costs`)."""
    import torch.nn.functional as F

    from moa_compress.attn_interface import use_attention
    from moa_compress.plan import identity_of

    found: dict[str, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = sampled_scores(query, key, scale, block_size, samples)
        found[f"sampled.{module.layer_idx}"] = scores[0].float().cpu()
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    with use_attention(model, "moa_compress_sample_rankings", attention, model_windows=True), torch.no_grad():
        model(input_ids=input_ids.to(model.device)[None], use_cache=False, logits_to_keep=1)
    planned = identity_of(model).planned_layers
    missing = [i for i in planned if f"sampled.{i}" not in found]
    if missing:
        raise PlanRuntimeError(f"layers {missing} did not call their attention through AttentionInterface")
    return {f"sampled.{i}": found[f"sampled.{i}"] for i in planned}


def call_selections(
    plan: Plan,
    layer: int,
    gate: AttnGate,
    query: torch.Tensor,  # [B, Hq, Sq, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, Sk, D] after RoPE
    q_pre: torch.Tensor,  # [B, Hq, Sq, D] pre-RoPE
    k_codes: torch.Tensor,  # [B, H_gate, nK, gate_dim] (GateKeys.all_codes)
    scale: float,
    ranking: PrefillRanking | None = None,
) -> torch.Tensor:  # [B, H, nQ_call, nK] bool
    """The gate heads' blocks for an unpadded call: :func:`gate_selections_for`, or where ``ranking``
    applies to the call, the same rules' selection from :func:`sampled_scores`."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if ranking is None or not ranking.applies(layer, q_len, kv_len):
        return gate_selections_for(plan, layer, gate, q_pre, k_codes, kv_len)
    scores = sampled_scores(query, key, scale, plan.block_size, ranking.samples)
    blocks, _, local, tail = layer_gate_heads(plan, layer, kv_len)
    group_of_head = torch.arange(query.shape[1]) // (query.shape[1] // key.shape[1])
    return gate_selections(scores, blocks, group_of_head, local, tail)


def gate_selections_for(
    plan: Plan,
    layer: int,
    gate: AttnGate,
    q_pre: torch.Tensor,  # [B, Hq, Sq, D] this call's pre-RoPE queries
    k_codes: torch.Tensor,  # [B, H_gate, nK, gate_dim] every key block's code (GateKeys.all_codes)
    kv_len: int,
) -> torch.Tensor:  # [B, H, nQ_call, nK] bool
    """The gate heads' blocks for the call's query blocks (:func:`gate_scores_for`), over every key
    block; rows of heads without a gate are all False."""
    scores = gate_scores_for(gate, q_pre, k_codes, kv_len, plan.block_size)
    return gate_selections(scores, *layer_gate_heads(plan, layer, kv_len))


def layer_block_rows(
    plan: Plan,
    layer: int,
    kv_len: int,
    q_len: int,
    selections: torch.Tensor | None,  # [B, H, nQ_call, nK] from gate_selections_for
) -> torch.Tensor:  # [B|1, H, nQ_call, nK] bool
    """Rows of the layer's block matrix at total length ``kv_len`` for the call's query blocks: the static
    heads' fixed rows and the gate heads' selected ones."""
    first = (kv_len - q_len) // plan.block_size
    rows = plan.static_masks(layer, kv_len)[:, first:]  # [H, nQ_call, nK]
    if selections is None:
        return rows[None]
    gated = torch.tensor([r.input_dependent for r in plan.rules[layer]], device=selections.device)
    return torch.where(gated[None, :, None, None], selections, rows.to(selections.device)[None])


def gated_attention(
    plan: Plan,
    layer: int,
    gate: AttnGate,
    query: torch.Tensor,  # [B, Hq, Sq, D] after RoPE
    key: torch.Tensor,  # [B, Hkv, Sk, D]
    value: torch.Tensor,
    q_pre: torch.Tensor,  # [B, Hq, Sq, D]
    k_codes: torch.Tensor,  # [B, H_gate, nK, gate_dim] (GateKeys.all_codes)
    scale: float,
    backend: str,
    ranking: PrefillRanking | None = None,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """One unpadded call of a layer with gate heads: every head in one block-sparse call per piece
    (:func:`rows_attention`), the gate heads' blocks by :func:`call_selections` — or every head's by
    :func:`moa_compress.allocation.allocated_rows` where ``ranking`` allocates the call layer-wide."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if ranking is not None and ranking.allocates(layer, q_len, kv_len):
        from moa_compress.allocation import allocated_attention

        return allocated_attention(plan, layer, query, key, value, scale, backend, ranking)
    selections = call_selections(plan, layer, gate, query, key, q_pre, k_codes, scale, ranking)
    rows = layer_block_rows(plan, layer, kv_len, q_len, selections)  # [B, H, nQ_call, nK]
    return rows_attention(rows, query, key, value, plan.block_size, scale, backend)


def rows_attention(
    rows: torch.Tensor,  # [B, Hq, nQ_call, nK] bool: block rows of the call's query blocks
    query: torch.Tensor,  # [B, Hq, Sq, D], the last Sq of the Sk positions
    key: torch.Tensor,  # [B, Hkv, Sk, D], in position order from position 0
    value: torch.Tensor,
    block_size: int,
    scale: float,
    backend: str,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Block-sparse attention of a call's queries under the given block rows, one call per piece (the
    queries before the first block boundary, if the call starts inside a block, are a piece of their
    own: a layout groups rows into blocks from its first row)."""
    from moa_compress.attention import block_sparse_attention

    bs = block_size
    q_len, kv_len = query.shape[2], key.shape[2]
    first_row = kv_len - q_len
    head = min(q_len, (-first_row) % bs)
    outs = []
    for q_start, q_end in ((0, head), (head, q_len)):
        if q_end <= q_start:
            continue
        kv_end = first_row + q_end
        r0 = (first_row + q_start) // bs - first_row // bs
        r1 = -(-kv_end // bs) - first_row // bs
        mask = rows[:, :, r0:r1, : num_blocks(kv_end, bs)]
        layout = BlockLayout.from_block_mask(mask, bs, q_end - q_start, kv_end)
        q, k, v = query[:, :, q_start:q_end], key[:, :, :kv_end], value[:, :, :kv_end]
        outs.append(block_sparse_attention(q, k, v, layout, scale=scale, backend=backend))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def gated_padded_attention(
    plan: Plan,
    layer: int,
    gate: AttnGate,
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Sk, D]
    value: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,  # [B, Hkv, Sk, D] every raw pre-RoPE key (GateKeys.keys)
    padding: torch.Tensor,  # [B] left-padding columns
    scale: float,
    backend: str,
    codes: Sequence[torch.Tensor] | None = None,  # per row [1, H_gate, nK_row, gate_dim], if held already
    ranking: PrefillRanking | None = None,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """A left-padded batch, one row at a time over its own tokens (positions counted from its first
    real token, as unpadded: its key blocks are pooled from there, unless the caller holds each row's
    ``codes``, e.g. :meth:`RowGateKeys.per_row`); padding query rows return zeros."""
    q_len, kv_len = query.shape[2], key.shape[2]
    out = torch.zeros_like(query)
    for row, pad in enumerate(padding.tolist()):
        q0 = max(0, pad - (kv_len - q_len))  # the row's first real query of this call
        if q0 >= q_len:
            continue
        r = slice(row, row + 1)
        held = codes[row] if codes is not None else row_codes(gate, k_pre[r, :, pad:], plan.block_size)
        out[r, :, q0:] = gated_attention(
            plan, layer, gate, query[r, :, q0:], key[r, :, pad:], value[r, :, pad:],
            q_pre[r, :, q0:], held, scale, backend, ranking,
        )  # fmt: skip
    return out


def decode_visible_blocks(
    plan: Plan,
    layer: int,
    gate: AttnGate,
    q_pre: torch.Tensor,  # [B, Hq, 1, D]
    k_codes: torch.Tensor,  # [B, H_gate, nK, gate_dim] (GateKeys.all_codes / RowGateKeys.all_codes)
    kv_len: int | torch.Tensor,  # the length with this token: one for the batch, or [B] (padded rows)
    memo: dict | None = None,  # an unpadded batch: the caller's, kept between steps (see below)
) -> torch.Tensor:  # [B, H, nK] bool
    """A decode step's key blocks per query head: the gate heads' selection, everything for the others
    (their own rule limits them). With per-row lengths (a left-padded batch, blocks counted from each
    row's first token) every row is selected at its own length, in one batched call. With one length
    and a ``memo`` dict the selection's constants (:class:`~moa_compress.gates.StepSelection`) are made
    once per length's block count and kept there."""
    bs, rules = plan.block_size, plan.rules[layer]
    if isinstance(kv_len, int) and memo is not None:
        key = (
            k_codes.shape[2],
            tuple(r.blocks_per_row(kv_len, bs) if r.input_dependent else 0 for r in rules),
        )
        select = memo.get(key)
        if select is None:
            memo.clear()  # lengths only grow: the previous block count's constants are done with
            gated = torch.tensor([r.input_dependent for r in rules])
            heads = layer_gate_heads(plan, layer, kv_len)
            select = StepSelection(key[0], *heads, gated, k_codes.device, gate=gate)
            memo[key] = select
        return select(select.scores(q_pre, k_codes))
    if isinstance(kv_len, int):
        selections = gate_selections_for(plan, layer, gate, q_pre, k_codes, kv_len)[:, :, 0]  # [B, H, nK]
    else:
        last = (kv_len - 1) // bs  # [B]: each row's block of this token
        scores = gate.scores(gate.query_codes(q_pre.to(gate.q_proj.dtype), last), k_codes)  # [B, Hg, 1, nK]
        ns = kv_len.tolist()
        per_length = {n: layer_gate_heads(plan, layer, n) for n in set(ns)}
        blocks = torch.stack([per_length[n][0] for n in ns])  # [B, H]
        _, gate_of_head, local, tail = per_length[ns[0]]
        selections = gate_selections(scores, blocks, gate_of_head, local, tail, last=last)[:, :, 0]
    gated = torch.tensor([r.input_dependent for r in rules], device=selections.device)
    return selections | ~gated[None, :, None]
