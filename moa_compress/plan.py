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
from typing import Any

import torch

from moa_compress.errors import UserInputError

SCHEMA_VERSION = 1
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
    (query heads), ``num_kv_heads``, ``head_dim``, and ``fingerprint``: a hash of the
    attention-relevant config entries, so a plan cannot silently run on a different model.
    """

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelIdentity:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        return cls(
            name=name or getattr(config, "_name_or_path", "") or text_config.model_type,
            num_layers=int(text_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            fingerprint=config_fingerprint(text_config),
        )


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
# Rules


@dataclass(frozen=True)
class DenseRule:
    """The head computes every causal pair."""

    kind: str = field(default="dense", init=False)


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
    kind: str = field(default="static", init=False)

    def band_blocks(self, n: int, block_size: int) -> int:
        return max(1, math.ceil((self.alpha + self.beta * n) / block_size - 1e-9))

    def span(self, n: int) -> float:
        return self.alpha + self.beta * n


Rule = DenseRule | StaticRule
RULE_KINDS: dict[str, type] = {"dense": DenseRule, "static": StaticRule}


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    return dataclasses.asdict(rule)


def rule_from_dict(data: Mapping[str, Any], where: str) -> Rule:
    kind = data.get("kind")
    if kind not in RULE_KINDS:
        raise PlanError(f"{where}: unknown rule kind {kind!r} (known: {', '.join(RULE_KINDS)})")
    if kind == "dense":
        return DenseRule()
    try:
        rule = StaticRule(
            sink_blocks=int(data["sink_blocks"]), alpha=float(data["alpha"]), beta=float(data["beta"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{where}: static rule needs sink_blocks, alpha, beta ({exc})") from None
    if rule.sink_blocks < 0 or not 0.0 <= rule.beta <= 1.0 or not math.isfinite(rule.alpha):
        raise PlanError(f"{where}: static rule out of range: {data}")
    return rule


# ----------------------------------------------------------------------------------------------
# Block sets and density


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def rule_key_blocks(rule: Rule, n: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed key blocks of every query block at length ``n`` (absolute positions).

    Returns ``(lo_band [nQ], sink [])``: query block ``i`` sees key blocks ``j`` with
    ``j < sink`` or ``lo_band[i] <= j <= i``.
    """
    nq = num_blocks(n, block_size)
    rows = torch.arange(nq)
    if isinstance(rule, DenseRule):
        return torch.zeros(nq, dtype=torch.long), torch.tensor(0)
    band = rule.band_blocks(n, block_size)
    return (rows - band + 1).clamp(min=0), torch.tensor(rule.sink_blocks)


def rule_block_mask(rule: Rule, n: int, block_size: int) -> torch.Tensor:
    """Boolean ``[nQ, nK]`` matrix of computed blocks (lower-triangular part only)."""
    nq = num_blocks(n, block_size)
    lo, sink = rule_key_blocks(rule, n, block_size)
    cols = torch.arange(nq)[None, :]
    rows = torch.arange(nq)[:, None]
    return (cols <= rows) & ((cols >= lo[:, None]) | (cols < sink))


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


# Cached: the search checks hundreds of plans made of the same few rules, at up to 16K tokens.
@functools.lru_cache(maxsize=65536)
def rule_density(rule: Rule, n: int, block_size: int) -> float:
    """Exact fraction of the causal pairs at length ``n`` that ``rule`` computes."""
    pairs = causal_block_pairs(n, block_size)
    kept = pairs[rule_block_mask(rule, n, block_size)].sum()
    return float(kept / pairs.sum())


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Plan:
    """A per-layer, per-query-head attention plan bound to one model.

    ``rules[layer][head]`` is the rule of query head ``head`` in layer ``layer``.
    ``lengths`` are the sequence lengths the plan was made (and its budget checked) for.
    ``provenance`` records tool version, command, data, seed and time.
    ``tensors`` holds named tensors for rules that need them (saved to ``plan.safetensors``).
    """

    model: ModelIdentity
    rules: tuple[tuple[Rule, ...], ...]
    block_size: int = 64
    budget: float | None = None
    lengths: tuple[int, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    schema_version: int = SCHEMA_VERSION

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

    # -- density -------------------------------------------------------------------------------

    def density(self, n: int) -> float:
        """Exact fraction of causal (query, key) pairs computed at length ``n``, mean over heads."""
        cache: dict[Rule, float] = {}
        total = 0.0
        for heads in self.rules:
            for rule in heads:
                if rule not in cache:
                    cache[rule] = rule_density(rule, n, self.block_size)
                total += cache[rule]
        return total / (self.model.num_layers * self.model.num_heads)

    def layer_density(self, layer: int, n: int) -> float:
        heads = self.rules[layer]
        return sum(rule_density(r, n, self.block_size) for r in heads) / len(heads)

    # -- layouts -------------------------------------------------------------------------------

    def layout(self, layer: int, n: int, device: torch.device | str = "cpu"):
        """FlexAttention-form layout of ``layer`` for a full prefill of length ``n``.

        Returns a :class:`moa_compress.kernels.layout.BlockLayout` with
        ``kv_num_blocks [1, H, nQ]`` and ``kv_indices [1, H, nQ, nK]`` (ascending, padded).
        """
        from moa_compress.kernels.layout import BlockLayout

        masks = torch.stack([rule_block_mask(r, n, self.block_size) for r in self.rules[layer]])
        return BlockLayout.from_block_mask(masks[None], self.block_size, n, n).to(device)

    def block_mask(self, n: int, layer: int | None = None, device: torch.device | str = "cpu"):
        """The layout at length ``n`` as FlexAttention ``BlockMask`` (causal inside the blocks):
        one for ``layer``, or a list with one per layer when ``layer`` is None.

        Run a layer with plain PyTorch:
        ``flex_attention(q, k, v, block_mask=plan.block_mask(n, layer), enable_gqa=True)``.
        """
        if layer is None:
            return [self.layout(i, n, device).to_flex_block_mask() for i in range(self.model.num_layers)]
        return self.layout(layer, n, device).to_flex_block_mask()

    def is_dense(self) -> bool:
        return all(isinstance(r, DenseRule) for heads in self.rules for r in heads)

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": dataclasses.asdict(self.model),
            "block_size": self.block_size,
            "budget": self.budget,
            "lengths": list(self.lengths),
            "density": {str(n): round(self.density(n), 6) for n in self.lengths},
            "rules": [[rule_to_dict(r) for r in heads] for heads in self.rules],
            "provenance": dict(self.provenance),
        }

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
            model = ModelIdentity(**data["model"])
            rules = tuple(
                tuple(rule_from_dict(r, f"layer {li} head {hi}") for hi, r in enumerate(heads))
                for li, heads in enumerate(data["rules"])
            )
            return cls(
                model=model,
                rules=rules,
                block_size=int(data.get("block_size", 64)),
                budget=None if data.get("budget") is None else float(data["budget"]),
                lengths=tuple(int(n) for n in data.get("lengths", ())),
                provenance=dict(data.get("provenance", {})),
                tensors=dict(tensors or {}),
                schema_version=version,
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
    rules = tuple(tuple(rule for _ in range(identity.num_heads)) for _ in range(identity.num_layers))
    return Plan(
        model=identity,
        rules=rules,
        block_size=block_size,
        budget=density,
        lengths=tuple(lengths),
        provenance=dict(provenance or {}, method="uniform"),
    )


# ----------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
        from safetensors.torch import load_file

        tensors = load_file(str(tensor_path))
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
    if isinstance(rule, DenseRule):
        return "dense"
    return f"sink{rule.sink_blocks}+({rule.alpha:g}+{rule.beta:g}N)"


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
        "model": dataclasses.asdict(plan.model),
        "block_size": plan.block_size,
        "budget": plan.budget,
        "density": {str(n): round(plan.density(n), 6) for n in lengths},
        "layers": layers,
        "provenance": dict(plan.provenance),
    }
