"""The plan: which (query block, key block) pairs each attention head computes.

A plan is the only contract between the search and the runtime. It is a frozen dataclass,
serialised as ``plan.json`` (plus ``plan.safetensors`` for rules that carry tensors), bound to a
model by its :class:`ModelIdentity`, and validated once on load.

Rules are block-granular over *absolute* positions. At total sequence length ``N`` a ``static``
rule lets query block ``i`` see key blocks ``{0 .. sink_blocks-1}`` plus the band of
``band_blocks(N) = ceil((alpha + beta * N) / block_size)`` blocks that ends at the diagonal block
``i``; causality still applies inside the diagonal block. A ``dense`` rule sees every causal block.

Density (see README) is the fraction of the causal attention matrix's (query, key) pairs that are
computed, averaged over all query heads, at length ``N``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from moa_compress.errors import UserInputError

# The newest plan.json this version reads (2: gate rules; 3: gate rules with a local window; 4: gate
# rules with a floor of blocks per row; 5: gate rules with a dense tail of rows).
SCHEMA_VERSION = 7
PLAN_FILE = "plan.json"
TENSOR_FILE = "plan.safetensors"


class PlanError(UserInputError):
    """A plan that cannot be read, or does not fit the model it is applied to."""


# ----------------------------------------------------------------------------------------------
# Model identity


FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a plan was made for.

    Fields: ``name`` (free text, e.g. the hub id or folder name), ``num_layers``, ``num_heads``
    (query heads), ``num_kv_heads``, ``head_dim``, ``fingerprint``: a hash of the
    attention-relevant config entries, so a plan cannot silently run on a different model, and
    ``windows``: ``((layer, tokens), ...)`` for the layers the model runs with sliding-window attention
    (Gemma 3 interleaves them with full-attention layers). A plan leaves those layers as the model
    runs them (:class:`WindowRule`) and plans the others; empty for models whose layers all attend to
    every earlier token, and then not written (plans of such models read as before).
    """

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    windows: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelIdentity:
        text = text_config(config)
        num_heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            name=name or getattr(config, "_name_or_path", "") or text.model_type,
            num_layers=int(text.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            fingerprint=config_fingerprint(text),
            windows=sliding_windows(text),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.windows:
            out["windows"] = [list(w) for w in self.windows]
        else:
            del out["windows"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelIdentity:
        """The inverse of :meth:`to_dict`; raises ``KeyError``/``TypeError``/``ValueError`` on a bad record."""
        fields = dict(data)
        windows = fields.pop("windows", ())
        if not isinstance(windows, (list, tuple)) or not all(
            isinstance(w, (list, tuple)) and len(w) == 2 and all(type(x) is int and x >= 0 for x in w)
            for w in windows
        ):
            raise ValueError(f"model windows must be [[layer, tokens], ...], got {windows!r}")
        return cls(**fields, windows=tuple((int(a), int(b)) for a, b in windows))

    @property
    def window_of(self) -> dict[int, int]:
        """Layer -> sliding-window tokens, for the layers the model runs with a window."""
        return dict(self.windows)

    def windows_note(self) -> str:
        """How densities count the model's sliding-window layers, as a clause (empty without them)."""
        if not self.windows:
            return ""
        tokens = ", ".join(str(t) for t in sorted({t for _, t in self.windows}))
        return (
            f" of the {len(self.planned_layers)} layer(s) the plan chooses for; the model's "
            f"{len(self.windows)} sliding-window layers keep their window ({tokens} tokens) as the model "
            "runs them and are not counted"
        )

    @property
    def planned_layers(self) -> tuple[int, ...]:
        """The layers a plan chooses rules for: every layer without a sliding window."""
        windows = self.window_of
        return tuple(i for i in range(self.num_layers) if i not in windows)


def sliding_windows(config: Any) -> tuple[tuple[int, int], ...]:
    """``((layer, tokens), ...)`` of the layers ``config`` runs with sliding-window attention: those whose
    ``layer_types`` entry is ``"sliding_attention"`` (every layer, when the config names a
    ``sliding_window`` in use but no ``layer_types``, as Mistral's does)."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return ()
    layers = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is None:
        return tuple((i, int(window)) for i in range(layers))
    return tuple((i, int(window)) for i, t in enumerate(types) if t == "sliding_attention")


def text_config(model_or_config: Any) -> Any:
    """The config of a model's text decoder (of a multimodal model too), from the model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_fingerprint(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of the attention-relevant config entries."""
    values = {}
    for key in FINGERPRINT_KEYS:
        value = getattr(config, key, None)
        if key == "rope_theta" and value is None:
            # transformers 5 keeps rope_theta inside rope_parameters.
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        values[key] = value
    canonical = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Rules: one class per kind behind one protocol, found through a registry


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


class RuleKind(Protocol):
    """What every rule kind provides. A new kind is one class registered with :func:`register_rule`.

    ``kind`` names it in ``plan.json``. ``model_fixed`` kinds are what the model itself does (a
    sliding-window layer, :class:`WindowRule`): never chosen by the search, outside the budget, run by
    the model's own attention arithmetic. ``input_dependent`` kinds choose blocks per input
    (:meth:`block_mask` returns None; the runtime calls the kind's selection with the layer's gate
    scores); the others have a fixed block mask at every length. ``density(n, block_size)`` is exact
    for every input. ``kv_keep(n, block_size)`` says what a decode cache must keep at total length
    ``n``: ``(sink_blocks, window_blocks)`` for a ring buffer, or None for every key.
    """

    kind: ClassVar[str]
    input_dependent: ClassVar[bool]
    model_fixed: ClassVar[bool]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Any: ...

    def density(self, n: int, block_size: int) -> float: ...

    def block_mask(self, n: int, block_size: int) -> torch.Tensor | None: ...

    def kv_keep(self, n: int, block_size: int) -> tuple[int, int] | None: ...

    def describe(self) -> str: ...


RULE_KINDS: dict[str, type] = {}


def register_rule(cls: type) -> type:
    """Class decorator: make ``cls`` (a :class:`RuleKind`) readable from ``plan.json`` by its ``kind``."""
    if cls.kind in RULE_KINDS:
        raise ValueError(f"rule kind {cls.kind!r} is registered twice")
    RULE_KINDS[cls.kind] = cls
    return cls


def _fields(rule: Any) -> dict[str, Any]:
    return {"kind": rule.kind, **dataclasses.asdict(rule)}


@register_rule
@dataclass(frozen=True)
class DenseRule:
    """The head computes every causal pair."""

    kind: ClassVar[str] = "dense"
    input_dependent: ClassVar[bool] = False
    model_fixed: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> DenseRule:
        return cls()

    def density(self, n: int, block_size: int) -> float:
        return 1.0

    def block_mask(self, n: int, block_size: int) -> torch.Tensor:
        nb = num_blocks(n, block_size)
        return torch.ones(nb, nb, dtype=torch.bool).tril()

    def kv_keep(self, n: int, block_size: int) -> None:
        return None

    def describe(self) -> str:
        return "dense"


@register_rule
@dataclass(frozen=True)
class StaticRule:
    """Sink blocks plus a band whose span grows with the sequence length: S(N) = alpha + beta * N.

    ``sink_blocks`` >= 0 leading key blocks every query sees; ``alpha`` in tokens (may be
    negative); ``beta`` in [0, 1]. The band has ``ceil(S(N) / block_size)`` blocks (at least one: the
    diagonal block) ending at the query's own block.
    """

    sink_blocks: int
    alpha: float
    beta: float
    kind: ClassVar[str] = "static"
    input_dependent: ClassVar[bool] = False
    model_fixed: ClassVar[bool] = False

    def band_blocks(self, n: int, block_size: int) -> int:
        return max(1, math.ceil((self.alpha + self.beta * n) / block_size - 1e-9))

    def span(self, n: int) -> float:
        return self.alpha + self.beta * n

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> StaticRule:
        try:
            rule = cls(int(data["sink_blocks"]), float(data["alpha"]), float(data["beta"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: static rule needs sink_blocks, alpha, beta ({exc})") from None
        if rule.sink_blocks < 0 or not 0.0 <= rule.beta <= 1.0 or not math.isfinite(rule.alpha):
            raise PlanError(f"{where}: static rule out of range: {dict(data)}")
        return rule

    def density(self, n: int, block_size: int) -> float:
        return _mask_density(self.block_mask(n, block_size), n, block_size)

    def block_mask(self, n: int, block_size: int) -> torch.Tensor:
        nq = num_blocks(n, block_size)
        rows = torch.arange(nq)[:, None]
        cols = torch.arange(nq)[None, :]
        lo = rows - self.band_blocks(n, block_size) + 1
        return (cols <= rows) & ((cols >= lo) | (cols < self.sink_blocks))

    def kv_keep(self, n: int, block_size: int) -> tuple[int, int]:
        return self.sink_blocks, self.band_blocks(n, block_size)

    def describe(self) -> str:
        return f"sink{self.sink_blocks}+({self.alpha:g}+{self.beta:g}N)"


@register_rule
@dataclass(frozen=True)
class GateRule:
    """A learned block gate (SeerAttention-style) chooses the blocks per input.

    At total length ``N`` every query-block row keeps :meth:`blocks_per_row` key blocks — the sink
    block 0, the ``local`` blocks ending at its diagonal block (a guaranteed local window; ``local = 1``
    is the diagonal alone) and the best-scoring others by the layer's gate (rows with fewer causal
    blocks keep them all) — so the density at ``N`` is exact whatever the input. The count is the most
    whose density stays within ``target``, but at least ``min_blocks`` (and two: the sink and the
    diagonal): a floor like the static rules' narrowest band, since the first-order costs the search
    reads rate rows of two or three blocks as nearly free when they are not. Where ``local``
    would take every block a row may keep, the window shrinks to leave none for the gate
    (:meth:`local_blocks`). The gate's weights are the plan's tensors ``gates.{layer}.q_proj`` /
    ``gates.{layer}.k_proj`` (:class:`GateConfig`).

    ``tail`` > 0: the last ``tail`` query-block rows at length ``N`` keep every causal block; the other
    rows keep fewer, so the density stays within ``target`` unless the tail rows with the floor alone
    exceed it (short lengths: ``GateRule(0.1, tail=1)`` is 0.29 dense at 1024 tokens of 64-token blocks;
    the density is exact either way). Those rows hold the end of a prompt — the question a reply reads —
    and every decoding step (a step is the last row at its length), so with a tail the prompt's last
    tokens and each generated token see every key. Like every rule, a call is planned at its own length:
    a prompt fed in chunks keeps each chunk's last rows whole.
    """

    target: float
    local: int = 1
    min_blocks: int = 2
    tail: int = 0
    kind: ClassVar[str] = "gate"
    input_dependent: ClassVar[bool] = True
    model_fixed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.min_blocks < 2:  # a smaller value would write as 2 and read back unequal
            raise ValueError(
                f"min_blocks must be at least 2 (the sink and the diagonal), got {self.min_blocks}"
            )
        if self.tail < 0:
            raise ValueError(f"tail must be a number of query-block rows >= 0, got {self.tail}")

    def to_dict(self) -> dict[str, Any]:
        out = _fields(self)
        if self.local == 1:  # the schema-2 rule, readable by every version that reads gates
            del out["local"]
        if self.min_blocks <= 2:  # no floor beyond the sink and the diagonal: readable before schema 4
            del out["min_blocks"]
        if self.tail == 0:  # no dense tail: readable before schema 5
            del out["tail"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> GateRule:
        try:
            target, local, floor = float(data["target"]), data.get("local", 1), data.get("min_blocks", 2)
            tail = data.get("tail", 0)
            for name, value, unit in (("local", local, "blocks"), ("min_blocks", floor, "blocks"),
                                      ("tail", tail, "rows")):  # fmt: skip
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{name} must be an integer number of {unit}, got {value!r}")
            rule = cls(target, local, floor, tail)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"{where}: gate rule needs target and optional integers local, min_blocks and tail ({exc})"
            ) from None
        if not 0.0 < rule.target <= 1.0:
            raise PlanError(f"{where}: gate rule target must be in (0, 1], got {rule.target}")
        if rule.local < 1:
            raise PlanError(f"{where}: gate rule local must be at least 1 block, got {rule.local}")
        return rule

    def blocks_per_row(self, n: int, block_size: int) -> int:
        return min(
            max(self.min_blocks, blocks_for_density(self.target, n, block_size, self.tail)),
            num_blocks(n, block_size),
        )

    def local_blocks(self, n: int, block_size: int) -> int:
        """Blocks ending at the diagonal that every row keeps at ``n``: ``local``, but at most
        ``blocks_per_row - 1`` (the sink takes one)."""
        return max(1, min(self.local, self.blocks_per_row(n, block_size) - 1))

    def density(self, n: int, block_size: int) -> float:
        return selection_density(self.blocks_per_row(n, block_size), n, block_size, self.tail)

    def block_mask(self, n: int, block_size: int) -> None:
        return None

    def kv_keep(self, n: int, block_size: int) -> None:
        return None

    def describe(self) -> str:
        return (
            f"gate@{self.target:g}"
            + (f"+local{self.local}" if self.local > 1 else "")
            + (f"+min{self.min_blocks}" if self.min_blocks > 2 else "")
            + (f"+tail{self.tail}" if self.tail else "")
        )


@register_rule
@dataclass(frozen=True)
class WindowRule:
    """The model's own sliding-window attention over the last ``tokens`` tokens (the query's own
    included), which a plan leaves as it is: a layer the model runs with a window
    (:attr:`ModelIdentity.windows`) has this rule on every head, and no other layer has it. The
    search never chooses it and the budget does not count it (:meth:`Plan.density`); the runtime
    computes it exactly, token by token, as the model would (:func:`moa_compress.attention.window_attention`).

    ``density(n)`` is exact at token level; ``block_mask(n)`` is every block the window touches, for
    tools that read block masks."""

    tokens: int
    kind: ClassVar[str] = "window"
    input_dependent: ClassVar[bool] = False
    model_fixed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"a window must be a positive number of tokens, got {self.tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> WindowRule:
        try:
            return cls(data["tokens"])
        except (KeyError, ValueError) as exc:
            raise PlanError(f"{where}: window rule needs a positive integer tokens ({exc})") from None

    def density(self, n: int, block_size: int) -> float:
        w = min(self.tokens, n)  # query i sees min(i + 1, w) keys
        return (w * (w + 1) // 2 + (n - w) * w) / (n * (n + 1) / 2)

    def block_mask(self, n: int, block_size: int) -> torch.Tensor:
        nq = num_blocks(n, block_size)
        rows = torch.arange(nq)[:, None]
        cols = torch.arange(nq)[None, :]
        # a query block's first token reaches back tokens - 1 positions
        return (cols <= rows) & (cols >= (rows * block_size - self.tokens + 1).clamp(min=0) // block_size)

    def kv_keep(self, n: int, block_size: int) -> None:
        return None  # the decode cache keeps the window itself (the model's sliding cache layer)

    def describe(self) -> str:
        return f"window{self.tokens}(model)"


Rule = DenseRule | StaticRule | GateRule | WindowRule


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    return rule.to_dict()


def rule_from_dict(data: Mapping[str, Any], where: str) -> Rule:
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind not in RULE_KINDS:
        raise PlanError(f"{where}: unknown rule kind {kind!r} (known: {', '.join(RULE_KINDS)})")
    return RULE_KINDS[kind].from_dict(data, where)


def selection_density(k: int, n: int, block_size: int, tail: int = 0) -> float:
    """Exact fraction of the causal pairs at length ``n`` computed when every query-block row keeps
    ``min(k, row + 1)`` key blocks, the diagonal among them (``k >= 1``), and the last ``tail`` rows keep
    all of theirs. Input-independent: off-diagonal key blocks are all full (only the last block may be
    ragged, and it is only ever a diagonal).

    Counted in integers, in closed form (a decode step asks for every gate rule at every new length)."""
    bs, nb = block_size, num_blocks(n, block_size)
    c = max(k - 1, 0)  # off-diagonal blocks a row keeps at most: row i keeps min(i, c)
    full = nb - 1  # rows 0 .. nb-2 are whole blocks

    def off_diagonal(rows: int) -> int:  # sum of min(i, c) for i < rows
        return rows * (rows - 1) // 2 if rows - 1 <= c else c * (c + 1) // 2 + c * (rows - 1 - c)

    last = n - full * bs  # rows of the last block
    kept = full * (bs * (bs + 1) // 2) + off_diagonal(full) * bs * bs
    kept += last * (last + 1) // 2 + min(full, c) * bs * last
    for i in range(max(0, nb - tail), nb):  # tail rows: the blocks past the first c become kept too
        kept += (i - min(i, c)) * bs * (last if i == full else bs)
    return kept / (n * (n + 1) / 2)


def group_kv_keep(rules: Sequence[Rule], n: int, block_size: int) -> tuple[int, int] | None:
    """``(sink blocks, band blocks)`` one KV head must keep at length ``n`` for query heads with
    ``rules``: the largest sink and the largest band when every rule keeps a sink and a band
    (:meth:`RuleKind.kv_keep`), else None (dense and gate heads read any key)."""
    keeps = [r.kv_keep(n, block_size) for r in rules]
    if any(keep is None for keep in keeps):
        return None
    return max(k[0] for k in keeps), max(k[1] for k in keeps)


def group_kv_fraction(rules: Sequence[Rule], n: int, block_size: int) -> float:
    """Keys one KV head holds at length ``n`` for query heads with ``rules``, as a fraction of ``n``
    (:func:`group_kv_keep`; 1 when it must keep every key). For planned layers: a model's
    sliding-window layers keep their window in the model's own cache (:meth:`Plan.kv_fraction` leaves
    them out)."""
    keep = group_kv_keep(rules, n, block_size)
    return 1.0 if keep is None else min(1.0, (keep[0] + keep[1]) * block_size / n)


@functools.lru_cache(maxsize=65536)
def blocks_for_density(density: float, n: int, block_size: int, tail: int = 0) -> int:
    """The most key blocks per row (at least 2: the sink and the diagonal) whose
    :func:`selection_density` at ``n`` (with ``tail`` full last rows) stays within ``density``; 2 when
    even that exceeds it."""
    nb = num_blocks(n, block_size)
    lo, hi = min(2, nb), nb  # selection_density grows with k: bisect for the last k within density
    if selection_density(hi, n, block_size, tail) <= density + 1e-12:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if selection_density(mid, n, block_size, tail) <= density + 1e-12:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------------
# Block sets and density


def rule_key_blocks(rule: Rule, n: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed key blocks of every query block at length ``n`` for a rule whose mask is a band plus
    sinks (dense: the whole causal row). Returns ``(lo_band [nQ], sink [])``: query block ``i`` sees key
    blocks ``j`` with ``j < sink`` or ``lo_band[i] <= j <= i``."""
    nq = num_blocks(n, block_size)
    keep = rule.kv_keep(n, block_size)
    if rule.input_dependent:
        raise PlanError(f"rule kind {rule.kind!r} chooses its blocks per input; it has no fixed band")
    if keep is None:
        return torch.zeros(nq, dtype=torch.long), torch.tensor(0)
    sink, band = keep
    return (torch.arange(nq) - band + 1).clamp(min=0), torch.tensor(sink)


def rule_block_mask(rule: Rule, n: int, block_size: int) -> torch.Tensor:
    """Boolean ``[nQ, nK]`` matrix of computed blocks (lower-triangular part only) of an
    input-independent rule."""
    mask = rule.block_mask(n, block_size)
    if mask is None:
        raise PlanError(f"rule kind {rule.kind!r} chooses its blocks per input; it has no fixed block mask")
    return mask


def causal_block_pairs(n: int, block_size: int) -> torch.Tensor:
    """``[nQ, nK]`` float64: number of causal (query, key) pairs inside each block."""
    nb = num_blocks(n, block_size)
    starts = torch.arange(nb, dtype=torch.float64) * block_size
    sizes = torch.clamp(n - starts, max=block_size)
    full = sizes[:, None] * sizes[None, :]
    diag = sizes * (sizes + 1) / 2
    out = torch.tril(full, diagonal=-1)
    out.diagonal().copy_(diag)
    return out


def _mask_density(mask: torch.Tensor, n: int, block_size: int) -> float:
    pairs = causal_block_pairs(n, block_size)
    return float(pairs[mask].sum() / pairs.sum())


# Cached: the search checks hundreds of plans made of the same few rules, at up to 16K tokens.
@functools.lru_cache(maxsize=65536)
def rule_density(rule: Rule, n: int, block_size: int) -> float:
    """Exact fraction of the causal pairs at length ``n`` that ``rule`` computes (for any input)."""
    return rule.density(n, block_size)


# ----------------------------------------------------------------------------------------------
# Gates carried by a plan


@dataclass(frozen=True)
class GateConfig:
    """The shape of the learned gates a plan's ``gate`` rules use (see :mod:`moa_compress.gates`).

    ``gate_dim``: width of the projected block vectors; ``per_query_head``: one gate head per query
    head (default: per KV group, so heads sharing a KV head share one ranking); ``rope_theta``: the RoPE
    base applied at block positions; ``layers``: the layers whose weights the plan carries, as
    ``gates.{layer}.q_proj [H_gate, head_dim, gate_dim]`` and ``gates.{layer}.k_proj
    [H_gate, 3 * head_dim, gate_dim]`` (``dtype``) in ``plan.safetensors``.

    ``ranking_samples`` > 0: the plan's gate heads rank a prompt's key blocks by the true attention of
    that many sampled queries per block instead of the gates (in ``ranking_layers`` only, if given), as
    the search costed them (``compress --ranking``); ``apply_plan`` runs it so unless told otherwise
    (:class:`moa_compress.gate_runtime.PrefillRanking`). Decoding steps rank by the gates either way.
    """

    gate_dim: int
    per_query_head: bool
    rope_theta: float
    layers: tuple[int, ...]
    dtype: str = "float32"
    ranking_samples: int = 0
    ranking_layers: tuple[int, ...] | None = None

    def to_dict(self, model: ModelIdentity) -> dict[str, Any]:
        heads = model.num_heads if self.per_query_head else model.num_kv_heads
        out = {
            **dataclasses.asdict(self),
            "layers": list(self.layers),
            "shapes": {
                "q_proj": [heads, model.head_dim, self.gate_dim],
                "k_proj": [heads, 3 * model.head_dim, self.gate_dim],
            },
        }
        if not self.ranking_samples:  # ranked by the gates: readable before schema 7
            del out["ranking_samples"], out["ranking_layers"]
        elif self.ranking_layers is None:
            del out["ranking_layers"]
        else:
            out["ranking_layers"] = list(self.ranking_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        try:
            samples, layers = data.get("ranking_samples", 0), data.get("ranking_layers")
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
                raise ValueError(f"ranking_samples must be a whole number >= 0, got {samples!r}")
            if layers is not None and (
                not isinstance(layers, list)
                or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
            ):
                raise ValueError(f"ranking_layers must be a list of layer numbers, got {layers!r}")
            return cls(
                gate_dim=int(data["gate_dim"]),
                per_query_head=bool(data["per_query_head"]),
                rope_theta=float(data["rope_theta"]),
                layers=tuple(int(i) for i in data["layers"]),
                dtype=str(data.get("dtype", "float32")),
                ranking_samples=samples,
                ranking_layers=None if layers is None else tuple(layers),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan's gates entry is missing or has a malformed field: {exc}") from None

    def shapes(self, model: ModelIdentity) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in self.to_dict(model)["shapes"].items()}


def gate_tensor_name(layer: int, which: str) -> str:
    return f"gates.{layer}.{which}"


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True, eq=False)
class Plan:
    """A per-layer, per-query-head attention plan bound to one model.

    ``rules[layer][head]`` is the rule of query head ``head`` in layer ``layer``.
    ``lengths`` are the sequence lengths the plan was made (and its budget checked) for.
    ``provenance`` records tool version, command, data, seed and time.
    ``gates`` describes the learned gates of ``gate`` rules (None when the plan has none) and
    ``tensors`` holds their weights (saved to ``plan.safetensors``). Two plans are equal when every
    field and every tensor is.
    """

    model: ModelIdentity
    rules: tuple[tuple[Rule, ...], ...]
    block_size: int = 64
    budget: float | None = None
    lengths: tuple[int, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    schema_version: int = 1
    gates: GateConfig | None = None

    def __post_init__(self) -> None:
        if len(self.rules) != self.model.num_layers:
            raise PlanError(f"plan has {len(self.rules)} layers of rules, model {self.model.num_layers}")
        for layer, heads in enumerate(self.rules):
            if len(heads) != self.model.num_heads:
                raise PlanError(
                    f"layer {layer}: plan has {len(heads)} head rules, model has {self.model.num_heads}"
                )
        if self.block_size <= 0:
            raise PlanError(f"block_size must be positive, got {self.block_size}")
        self._check_windows()
        self._check_gates()

    def _check_windows(self) -> None:
        """Window layers (the model's) hold their window on every head; no other layer holds one."""
        windows = self.model.window_of
        for layer, heads in enumerate(self.rules):
            if layer in windows:
                expected = WindowRule(windows[layer])
                if any(r != expected for r in heads):
                    raise PlanError(
                        f"layer {layer} is a sliding-window layer of {windows[layer]} tokens in the model; "
                        f"every head must keep {expected.describe()}"
                    )
            elif any(r.model_fixed for r in heads):
                raise PlanError(
                    f"layer {layer}: window rules belong to the model's sliding-window layers only"
                )
        if not self.model.planned_layers:
            raise PlanError("every layer of this model is a sliding-window layer: there is nothing to plan")

    def _check_gates(self) -> None:
        gated = self.gate_layers
        if not gated:
            return
        if self.gates is None:
            raise PlanError(f"layers {list(gated)} have gate rules but the plan carries no gates")
        missing = sorted(set(gated) - set(self.gates.layers))
        if missing:
            raise PlanError(f"layers {missing} have gate rules but the plan has no gate weights for them")
        outside = sorted(i for i in self.gates.ranking_layers or () if not 0 <= i < self.model.num_layers)
        if outside:
            raise PlanError(f"the gates' ranking_layers {outside} are not layers of the model")
        for layer in gated:
            for which, shape in self.gates.shapes(self.model).items():
                name = gate_tensor_name(layer, which)
                tensor = self.tensors.get(name)
                if tensor is None:
                    raise PlanError(
                        f"plan tensors lack {name} (is {TENSOR_FILE} missing or from another plan?)"
                    )
                if tuple(tensor.shape) != shape:
                    raise PlanError(
                        f"plan tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}"
                    )

    @property
    def gate_layers(self) -> tuple[int, ...]:
        """Layers with at least one input-dependent (gate) head."""
        return tuple(i for i, heads in enumerate(self.rules) if any(r.input_dependent for r in heads))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        if self is other:
            return True
        mine = (self.model, self.rules, self.block_size, self.budget, self.lengths, self.gates)
        theirs = (other.model, other.rules, other.block_size, other.budget, other.lengths, other.gates)
        if mine != theirs or dict(self.provenance) != dict(other.provenance):
            return False
        if set(self.tensors) != set(other.tensors):
            return False
        return all(
            self.tensors[k] is other.tensors[k]
            or (
                self.tensors[k].shape == other.tensors[k].shape
                and self.tensors[k].dtype == other.tensors[k].dtype
                and torch.equal(self.tensors[k].cpu(), other.tensors[k].cpu())
            )
            for k in self.tensors
        )

    def __hash__(self) -> int:
        return hash((self.model, self.rules, self.block_size, self.budget, self.lengths))

    # -- density -------------------------------------------------------------------------------

    def density(self, n: int) -> float:
        """Exact fraction of causal (query, key) pairs computed at length ``n``, mean over the heads the
        plan chooses (exact for every input: gate rules keep a fixed number of blocks per row). The
        model's sliding-window layers (:class:`WindowRule`) are not counted: the plan leaves them as they
        are, and a budget is spent on the layers it plans (:meth:`model_density` counts every layer)."""
        cache: dict[Rule, float] = {}
        total = 0.0
        for layer in self.model.planned_layers:
            for rule in self.rules[layer]:
                if rule not in cache:
                    cache[rule] = rule_density(rule, n, self.block_size)
                total += cache[rule]
        return total / (len(self.model.planned_layers) * self.model.num_heads)

    def model_density(self, n: int) -> float:
        """:meth:`density` over every layer, the model's sliding-window layers included."""
        total = sum(rule_density(r, n, self.block_size) for heads in self.rules for r in heads)
        return total / (self.model.num_layers * self.model.num_heads)

    def kv_fraction(self, n: int) -> float:
        """The keys a decode cache holds at length ``n`` (prompt plus generated tokens) as a fraction of a
        dense cache's, mean over layers and KV heads: a KV head whose query heads all keep a sink and a
        band holds those (the largest sink and band among them, as
        :class:`~moa_compress.kvcache.PlanKVCache` sizes its rings), any other holds every key. Input
        independent, like :meth:`density`; gate codes and buffer rounding are not counted. Like
        :meth:`density`, over the layers the plan chooses for (the model's sliding-window layers keep
        their window in any cache)."""
        group = self.model.num_heads // self.model.num_kv_heads
        total = 0.0
        for layer in self.model.planned_layers:
            heads = self.rules[layer]
            for h in range(self.model.num_kv_heads):
                total += group_kv_fraction(heads[h * group : (h + 1) * group], n, self.block_size)
        return total / (len(self.model.planned_layers) * self.model.num_kv_heads)

    def layer_density(self, layer: int, n: int) -> float:
        heads = self.rules[layer]
        return sum(rule_density(r, n, self.block_size) for r in heads) / len(heads)

    # -- layouts -------------------------------------------------------------------------------

    def static_masks(self, layer: int, n: int) -> torch.Tensor:
        """``[H, nQ, nK]`` bool block masks of ``layer``'s heads at length ``n``; rows of gate heads are
        all False (their blocks come from :meth:`layout`'s ``selections``)."""
        nb = num_blocks(n, self.block_size)
        out = torch.zeros(len(self.rules[layer]), nb, nb, dtype=torch.bool)
        for head, rule in enumerate(self.rules[layer]):
            mask = rule.block_mask(n, self.block_size)
            if mask is not None:
                out[head] = mask
        return out

    def layout(
        self,
        layer: int,
        n: int,
        device: torch.device | str = "cpu",
        selections: torch.Tensor | None = None,
    ):
        """FlexAttention-form layout of ``layer`` for a full prefill of length ``n``: the runtime's one
        source of masks.

        ``selections [B, H, nQ, nK]`` (bool) gives the blocks of the layer's gate heads for ``B`` inputs
        (:func:`moa_compress.gates.gate_selections`); it is required when the layer has gate heads and
        only its gate heads' rows are read. Returns a
        :class:`moa_compress.kernels.layout.BlockLayout` with ``kv_num_blocks [B, H, nQ]`` and
        ``kv_indices [B, H, nQ, nK]`` (ascending, padded); ``B = 1`` without gate heads.
        """
        from moa_compress.kernels.layout import BlockLayout

        masks = self.static_masks(layer, n)[None].to(device)
        gated = torch.tensor([r.input_dependent for r in self.rules[layer]], device=device)
        if bool(gated.any()):
            if selections is None:
                raise PlanError(f"layer {layer} has gate heads: its layout needs the gates' selections")
            masks = torch.where(gated[None, :, None, None], selections.to(device), masks)
        return BlockLayout.from_block_mask(masks, self.block_size, n, n)

    def block_mask(self, n: int, layer: int | None = None, device: torch.device | str = "cpu"):
        """The layout at length ``n`` as FlexAttention ``BlockMask`` (causal inside the blocks):
        one for ``layer``, or a list with one per layer when ``layer`` is None. Plans with gate heads
        have no input-independent mask (use :meth:`layout` with the gates' selections).

        Run a layer with plain PyTorch:
        ``flex_attention(q, k, v, block_mask=plan.block_mask(n, layer), enable_gqa=True)``.
        """
        if layer is None:
            return [self.layout(i, n, device).to_flex_block_mask() for i in range(self.model.num_layers)]
        return self.layout(layer, n, device).to_flex_block_mask()

    def is_dense(self) -> bool:
        """Every head the plan chooses is dense (the model's window layers stay as they are)."""
        return all(isinstance(r, DenseRule) for heads in self.rules for r in heads if not r.model_fixed)

    # -- serialisation -------------------------------------------------------------------------

    def _needed_schema(self) -> int:
        """The oldest schema that holds this plan (older readers refuse newer files, never misread them)."""
        if self.gates is not None and self.gates.ranking_samples:
            return 7
        if self.model.windows:
            return 6
        if any(getattr(r, "tail", 0) > 0 for heads in self.rules for r in heads):
            return 5
        if any(getattr(r, "min_blocks", 2) > 2 for heads in self.rules for r in heads):
            return 4
        if any(getattr(r, "local", 1) > 1 for heads in self.rules for r in heads):
            return 3
        return 2 if self.gates is not None else 1

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": max(self.schema_version, self._needed_schema()),
            "model": self.model.to_dict(),
            "block_size": self.block_size,
            "budget": self.budget,
            "lengths": list(self.lengths),
            "density": {str(n): round(self.density(n), 6) for n in self.lengths},
            "rules": [[rule_to_dict(r) for r in heads] for heads in self.rules],
            "provenance": dict(self.provenance),
        }
        if self.gates is not None:
            out["gates"] = self.gates.to_dict(self.model)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError("plan JSON must be an object")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise PlanError("plan has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version {version} is newer than this moa-compress understands "
                f"({SCHEMA_VERSION}); upgrade moa-compress"
            )
        try:
            model = ModelIdentity.from_dict(data["model"])
            rules = tuple(
                tuple(rule_from_dict(r, f"layer {li} head {hi}") for hi, r in enumerate(heads))
                for li, heads in enumerate(data["rules"])
            )
            gates = GateConfig.from_dict(data["gates"]) if data.get("gates") is not None else None
            return cls(
                model=model,
                rules=rules,
                block_size=int(data.get("block_size", 64)),
                budget=None if data.get("budget") is None else float(data["budget"]),
                lengths=tuple(int(n) for n in data.get("lengths", ())),
                provenance=dict(data.get("provenance", {})),
                tensors=dict(tensors or {}),
                schema_version=version,
                gates=gates,
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan JSON is missing or has a malformed field: {exc}") from None

    def check_model(self, identity: ModelIdentity) -> None:
        """Raise :class:`PlanError` unless this plan fits a model with ``identity``."""
        mine = self.model
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(mine, name) != getattr(identity, name):
                raise PlanError(
                    f"plan is for a model with {name}={getattr(mine, name)}, "
                    f"this model has {getattr(identity, name)}"
                )
        if mine.fingerprint != identity.fingerprint:
            raise PlanError(
                f"plan fingerprint {mine.fingerprint} does not match the model's {identity.fingerprint} "
                f"(plan made for {mine.name!r})"
            )
        if mine.windows != identity.windows:
            raise PlanError(
                f"plan leaves sliding-window layers {dict(mine.windows)} to the model, this model has "
                f"{dict(identity.windows)}"
            )


def uniform_plan(
    identity: ModelIdentity | Any,
    density: float,
    lengths: Sequence[int],
    block_size: int = 64,
    sink_blocks: int = 1,
    provenance: Mapping[str, Any] | None = None,
) -> Plan:
    """StreamingLLM-style baseline: one sink plus the widest fixed window (``alpha`` tokens,
    ``beta = 0``) for every head that keeps density <= ``density`` at every length.

    ``identity``: a :class:`ModelIdentity`, a transformers model or its config.
    """
    identity = identity_of(identity)
    if not 0.0 < density <= 1.0:
        raise PlanError(f"density must be in (0, 1], got {density}")
    if not lengths:
        raise PlanError("uniform plan needs at least one length")
    if density >= 1.0:
        rule: Rule = DenseRule()
    else:
        best = None
        for band in range(1, num_blocks(max(lengths), block_size) + 1):
            candidate = StaticRule(sink_blocks, float(band * block_size), 0.0)
            if all(rule_density(candidate, n, block_size) <= density + 1e-12 for n in lengths):
                best = candidate
            else:
                break
        if best is None:
            smallest = StaticRule(sink_blocks, float(block_size), 0.0)
            minimum = max(rule_density(smallest, n, block_size) for n in lengths)
            raise PlanError(
                f"density {density} is below the smallest possible plan ({sink_blocks} sink block "
                f"+ the diagonal block): {minimum:.4f} at lengths {list(lengths)}"
            )
        rule = best
    rules = rules_everywhere(identity, rule)
    return Plan(
        model=identity,
        rules=rules,
        block_size=block_size,
        budget=density,
        lengths=tuple(lengths),
        provenance=dict(provenance or {}, method="uniform"),
    )


def rules_everywhere(identity: ModelIdentity, rule: Rule) -> tuple[tuple[Rule, ...], ...]:
    """``rule`` on every head of the layers a plan chooses for; the model's window on its window layers."""
    windows = identity.window_of
    return tuple(
        tuple(WindowRule(windows[layer]) if layer in windows else rule for _ in range(identity.num_heads))
        for layer in range(identity.num_layers)
    )


# ----------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename. The file gets the
    permissions of a plain ``open(path, "wb")`` (0666 less the umask), not the temp file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plan(plan: Plan, out_dir: str | Path, force: bool = False) -> Path:
    """Write ``out_dir/plan.json`` (and ``plan.safetensors`` when the plan has tensors).

    Refuses an existing ``plan.json`` unless ``force``. Returns the JSON path.
    """
    out = Path(out_dir)
    target = out / PLAN_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite")
    if plan.tensors:
        from safetensors.torch import save as st_save

        atomic_write_bytes(out / TENSOR_FILE, st_save({k: v.contiguous() for k, v in plan.tensors.items()}))
    else:
        (out / TENSOR_FILE).unlink(missing_ok=True)  # an earlier plan's, which load_plan would read
    atomic_write_bytes(target, (json.dumps(plan.to_dict(), indent=1) + "\n").encode())
    return target


def resolve_plan_path(path: str | Path) -> Path:
    """A plan folder, a ``plan.json`` path, or the name of a plan shipped in ``profiles/``."""
    p = Path(path)
    if p.is_dir():
        p = p / PLAN_FILE
    if p.exists():
        return p
    shipped = shipped_plans()
    if str(path) in shipped:
        return shipped[str(path)]
    raise PlanError(
        f"no plan at {path!s} (neither a folder with {PLAN_FILE}, a JSON file, nor a shipped plan: "
        f"{', '.join(sorted(shipped)) or 'none'})"
    )


def shipped_plans() -> dict[str, Path]:
    """Plans shipped in the package's ``profiles/`` folder, by folder name."""
    roots = [
        Path(__file__).resolve().parent / "profiles",
        Path(__file__).resolve().parent.parent / "profiles",
    ]
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for plan_json in sorted(root.glob(f"*/{PLAN_FILE}")):
                found.setdefault(plan_json.parent.name, plan_json)
    return found


def load_plan(path: str | Path, model: Any = None) -> Plan:
    """Read and validate a plan; with ``model`` (a transformers model or config, or a
    :class:`ModelIdentity`), also check that the plan fits it."""
    json_path = resolve_plan_path(path)
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{json_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise PlanError(f"{json_path}: cannot read ({exc.strerror})") from None
    tensors = None
    tensor_path = json_path.parent / TENSOR_FILE
    if tensor_path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:
            raise PlanError(f"{tensor_path}: unreadable or truncated ({exc})") from None
    plan = Plan.from_dict(data, tensors)
    if model is not None:
        plan.check_model(identity_of(model))
    return plan


def identity_of(model: Any) -> ModelIdentity:
    if isinstance(model, ModelIdentity):
        return model
    config = getattr(model, "config", model)
    return ModelIdentity.from_config(config)


def provenance(command: str = "", **extra: Any) -> dict[str, Any]:
    from moa_compress import __version__

    return {
        "tool": f"moa-compress {__version__}",
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def describe_rule(rule: Rule) -> str:
    return rule.describe()


def plan_summary(plan: Plan, lengths: Sequence[int]) -> dict[str, Any]:
    """A JSON-ready summary: overall and per-layer density at ``lengths``, rule counts per layer."""
    layers = []
    for layer, heads in enumerate(plan.rules):
        counts: dict[str, int] = {}
        for rule in heads:
            counts[describe_rule(rule)] = counts.get(describe_rule(rule), 0) + 1
        layers.append(
            {
                "layer": layer,
                "density": {str(n): round(plan.layer_density(layer, n), 6) for n in lengths},
                "rules": ", ".join(f"{c}x {name}" for name, c in counts.items()),
            }
        )
    return {
        "schema_version": plan.schema_version,
        "model": plan.model.to_dict(),
        "block_size": plan.block_size,
        "budget": plan.budget,
        "density": {str(n): round(plan.density(n), 6) for n in lengths},
        "layers": layers,
        "provenance": dict(plan.provenance),
    }
