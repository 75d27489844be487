"""What :func:`moa_compress.pipeline.compress` computes: its settings and the presets that fill them.

:class:`CompressSettings` is frozen and checked before the model loads (:meth:`CompressSettings.check`);
:func:`preset_settings` fills what a user does not give from a named preset (``full`` / ``fast``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moa_compress.errors import UserInputError
from moa_compress.gates import DEFAULT_WEIGHT_DECAY, GateSettings, weight_decay_problem
from moa_compress.profile import Profile
from moa_compress.search import DEFAULT_GATE_LOCALS, DEFAULT_GATE_TAILS


class CompressError(UserInputError):
    """Settings or inputs that ``compress`` cannot work with."""


# How a stage setting is named to the user (the CLI option where there is one).
OPTION_NAMES = {
    "model": "the model",
    "weights": "the model's weights (or --dtype)",
    "profile": "--profile",
    "lengths": "--lengths",
    "samples": "--samples",
    "data": "--data",
    "text_field": "--text-field",
    "mode": "--mode",
    "seed": "--seed",
    "answer_tokens": "answer_tokens",
    "block_size": "block_size",
    "budget": "--budget",
    "extend_lengths": "--extend-lengths",
    "per_head": "--per-head",
    "rules": "--rules",
    "gate_steps": "--gate-steps",
    "gate_dim": "gate_dim",
    "gate_locals": "--gate-locals",
    "gate_tails": "--gate-tails",
    "gate_folds": "--gate-folds",
    "gate_weight_decay": "--gate-weight-decay",
    "gate_extra_samples": "--gate-extra-samples",
    "gate_floor": "the gate rules' floor of blocks per row",
    "ranking": "--ranking / --ranking-layers",
    "min_span": "--min-span",
    "kv_budget": "--kv-budget",
    "cost": "--cost",
    "pareto_size": "pareto_size",
    "validation_samples": "--validation-samples",
    "backend": "backend",
}


def _per_length(counts: tuple[int, ...] | int, lengths: tuple[int, ...], option: str) -> tuple[int, ...]:
    """``counts`` as one count per length (an int: the same at every length)."""
    if isinstance(counts, int):
        return (counts,) * len(lengths)
    if len(counts) != len(lengths):
        raise CompressError(
            f"{option} gives {len(counts)} counts for {len(lengths)} lengths; give one, or one per length"
        )
    return tuple(counts)


@dataclass(frozen=True)
class CompressSettings:
    """Everything that decides what :func:`compress` computes.

    ``lengths``: profiled (and validated, evaluated) lengths, sorted; ``samples``: calibration samples at
    each of them (one count per length, same order; an int means the same count everywhere).
    ``extend_lengths``: longer lengths the plan's density must also hold at (extrapolated rules).
    ``rules``: the rule kinds the search chooses from (``static``, ``gate``, ``dense``; at least one of
    the first two); with ``gate`` a gates stage trains one gate per layer (``gate_dim``, ``gate_steps``
    AdamW steps with weight decay ``gate_weight_decay``) on the calibration samples, and the search
    offers gate rules with each local window of ``gate_locals`` (blocks;
    :data:`moa_compress.search.DEFAULT_GATE_LOCALS`) and each dense tail of ``gate_tails`` (last rows;
    :attr:`moa_compress.plan.GateRule.tail`). ``gate_folds``: gate rules
    are costed by cross-fitting — ``gate_folds`` more gate sets, each trained without one fold of the
    calibration samples, select each sample's blocks (1: the final gates cost the samples they were
    trained on; with fewer samples than folds, as many folds as samples).
    ``gate_extra_samples``: more samples per length (same order as ``lengths``; an int means the same
    everywhere) that only train the gates, every set (:func:`moa_compress.data.gate_extra_set`).
    ``min_span``: the narrowest band a static rule may keep (tokens; None: the search's default); gate
    rules keep at least as many blocks per row.
    ``kv_budget``: the decode cache's keys at the longest length, as a fraction of dense's, the plan may
    hold (None: no limit; see :meth:`moa_compress.plan.Plan.kv_fraction`).
    ``cost``: the search's per-block measure (``"net"`` or ``"entry"``; None: the search's default).
    ``ranking``: how gate heads rank a prompt's blocks, ``"gate"`` or ``"sampled:R"`` (in
    ``ranking_layers`` only, if given; :class:`moa_compress.gate_runtime.PrefillRanking`): the search
    costs gate rules under it (each calibration sample's sampled scores, one more dense forward each)
    and the plan carries it.
    ``data``/``text_field``/``mode``/``seed``/``answer_tokens``: the calibration recipe
    (:func:`moa_compress.data.calibration_set`; ``data=None`` is the built-in synthetic set).
    ``pareto_size``: weightings of the lengths the search solves (each distinct plan is validated).
    ``validation_samples``: held-out samples at each profiled length. ``eval_limit``: text windows per
    length in the closing eval, whose text is ``eval_data`` (None: the Wikipedia articles shipped in
    ``moa_compress/texts``).
    ``dtype``: the dtype the model must be loaded in (checked; ``"auto"``: the model's, which the CLI
    loads by :func:`moa_compress.models.resolve_dtype`). ``backend``: the plan's attention backend
    during validation and eval.
    """

    budget: float
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    samples: tuple[int, ...] | int = (6, 2, 2)
    data: str | None = None
    text_field: str = "text"
    mode: str = "mixed"
    seed: int = 0
    answer_tokens: int = 32
    extend_lengths: tuple[int, ...] = ()
    per_head: bool = False
    rules: tuple[str, ...] = ("static", "gate", "dense")
    gate_dim: int = 64
    gate_steps: int = 300
    gate_locals: tuple[int, ...] = DEFAULT_GATE_LOCALS
    gate_tails: tuple[int, ...] = DEFAULT_GATE_TAILS
    gate_folds: int = 2
    gate_weight_decay: float = DEFAULT_WEIGHT_DECAY
    gate_extra_samples: tuple[int, ...] | int = 0
    min_span: float | None = None
    kv_budget: float | None = None
    cost: str | None = None
    ranking: str = "gate"
    ranking_layers: tuple[int, ...] | None = None
    pareto_size: int = 7
    validation_samples: int = 2
    eval_limit: int = 2
    eval_data: str | None = None
    dtype: str = "auto"
    block_size: int = 64
    backend: str = "auto"

    def __post_init__(self) -> None:
        lengths = tuple(int(n) for n in self.lengths)
        samples = _per_length(self.samples, lengths, "--samples")
        extra = _per_length(self.gate_extra_samples, lengths, "--gate-extra-samples")
        # Sort lengths and keep each count with its length.
        triples = sorted(zip(lengths, (int(k) for k in samples), extra, strict=True))
        object.__setattr__(self, "lengths", tuple(n for n, _, _ in triples))
        object.__setattr__(self, "samples", tuple(k for _, k, _ in triples))
        object.__setattr__(self, "gate_extra_samples", tuple(e for _, _, e in triples))
        object.__setattr__(self, "extend_lengths", tuple(sorted({int(n) for n in self.extend_lengths})))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "gate_locals", tuple(self.gate_locals))
        object.__setattr__(self, "gate_tails", tuple(self.gate_tails))
        if self.ranking_layers is not None:
            object.__setattr__(self, "ranking_layers", tuple(sorted({int(i) for i in self.ranking_layers})))
        if self.data is not None:
            object.__setattr__(self, "data", str(self.data))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", str(self.eval_data))

    @property
    def prefill_ranking(self):
        """``ranking`` / ``ranking_layers`` as a :class:`~moa_compress.gate_runtime.PrefillRanking`, or
        None for the gates."""
        from moa_compress.gate_runtime import PrefillRanking

        try:
            ranking = PrefillRanking.parse(self.ranking, self.ranking_layers)
        except UserInputError as exc:
            raise CompressError(f"--ranking: {exc}") from None
        if ranking.scope != "row":
            raise CompressError(
                f"--ranking {self.ranking}: a layer-wide allocation is chosen at run time (apply_plan, "
                "eval / generate --ranking); the search costs gate rules under gate or sampled:R"
            )
        return ranking if ranking.samples else None

    @property
    def target_lengths(self) -> tuple[int, ...]:
        """The lengths the plan's density must hold at: profiled plus extended."""
        return tuple(sorted(set(self.lengths) | set(self.extend_lengths)))

    def samples_per_length(self) -> dict[int, int]:
        return dict(zip(self.lengths, self.samples, strict=True))

    def gate_extra_per_length(self) -> dict[int, int]:
        return dict(zip(self.lengths, self.gate_extra_samples, strict=True))

    def check(self, profile: Profile | None = None) -> None:
        """Raise :class:`CompressError` for settings that are wrong whatever the model (and, given the
        ``profile`` a user passed in, for what it cannot do)."""
        from moa_compress.data import MODES
        from moa_compress.models import DTYPES
        from moa_compress.search import COSTS, SearchError, check_rule_kinds

        try:
            check_rule_kinds(self.rules, "--rules")
        except SearchError as exc:
            raise CompressError(str(exc)) from None
        if profile is not None and "gate" in self.rules:
            raise CompressError(
                "gate rules are costed on the calibration samples' own maps, which --profile does not hold; "
                "drop --profile, or pass --rules static,dense"
            )

        if not isinstance(self.budget, (int, float)) or not 0.0 < self.budget <= 1.0:
            raise CompressError(f"--budget must be in (0, 1], got {self.budget}")
        if self.kv_budget is not None:
            if isinstance(self.kv_budget, bool) or not isinstance(self.kv_budget, (int, float)):
                raise CompressError(f"--kv-budget must be a number in (0, 1], got {self.kv_budget!r}")
            if not 0.0 < self.kv_budget <= 1.0:
                raise CompressError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
            if self.per_head:
                raise CompressError(
                    "--kv-budget needs one rule per KV group (a KV head's cache serves all its query heads); "
                    "drop --per-head"
                )
        if not self.lengths or len(set(self.lengths)) != len(self.lengths) or self.lengths[0] <= 0:
            raise CompressError(f"--lengths must be distinct positive lengths, got {list(self.lengths)}")
        if any(k < 1 for k in self.samples):
            raise CompressError(f"--samples must be at least 1 per length, got {list(self.samples)}")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.gate_extra_samples):
            raise CompressError(
                f"--gate-extra-samples must be whole numbers >= 0, got {list(self.gate_extra_samples)}"
            )
        if any(n <= 0 for n in self.extend_lengths):
            raise CompressError(f"--extend-lengths must be positive, got {list(self.extend_lengths)}")
        if self.mode not in MODES:
            raise CompressError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cost is not None and self.cost not in COSTS:
            raise CompressError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise CompressError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gate_dim < 2 or self.gate_dim % 2:
            raise CompressError(f"gate_dim must be a positive even number, got {self.gate_dim}")
        problem = weight_decay_problem(self.gate_weight_decay, GateSettings.lr)  # the stage trains at its lr
        if problem:
            raise CompressError(f"--gate-weight-decay {problem}")
        if not self.gate_locals or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.gate_locals
        ):
            raise CompressError(
                f"--gate-locals must be whole numbers of blocks >= 1, got {list(self.gate_locals)}"
            )
        if not self.gate_tails or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.gate_tails
        ):
            raise CompressError(
                f"--gate-tails must be whole numbers of rows >= 0, got {list(self.gate_tails)}"
            )
        ranking = self.prefill_ranking  # a malformed --ranking is a one-line error here
        if self.ranking_layers is not None and ranking is None:
            raise CompressError("--ranking-layers needs --ranking sampled:R")
        if ranking is not None and "gate" not in self.rules:
            raise CompressError(f"--ranking {self.ranking} ranks gate rules; add gate to --rules")
        names = (
            "pareto_size",
            "validation_samples",
            "eval_limit",
            "answer_tokens",
            "block_size",
            "gate_steps",
            "gate_folds",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise CompressError(
                    f"{OPTION_NAMES.get(name, name)} must be positive, got {getattr(self, name)}"
                )


# Presets fill the settings a user does not give. "full" is the recipe for the embedded model's
# shipped plans; "fast" fits in a few minutes on a 2-core CPU (see BENCHMARKS.md).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "lengths": (2048, 4096, 8192),
        "samples": (6, 2, 2),
        "mode": "mixed",
        "pareto_size": 7,
        "validation_samples": 2,
        "eval_limit": 2,
        "gate_steps": 300,
    },
    "fast": {
        "lengths": (1024, 2048),
        "samples": (1, 1),
        "pareto_size": 3,
        "validation_samples": 1,
        "eval_limit": 1,
        "gate_steps": 100,
    },
}


def preset_settings(
    preset: str, budget: float, *, profile: Profile | None = None, **overrides: Any
) -> CompressSettings:
    """Settings from ``preset``, with every override that is not None taking precedence.

    ``lengths`` without ``samples``: the preset's count at the lengths it names, 1 elsewhere (extra gate
    samples: the preset's count there, 0 elsewhere). With a
    reused ``profile``, its lengths, sample counts, block size and calibration recipe (data, mode, seed,
    answer tokens: the held-out samples follow it) are the defaults.
    """
    if preset not in PRESETS:
        raise CompressError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = dict(PRESETS[preset])
    given = {k: v for k, v in overrides.items() if v is not None}
    if profile is not None:
        base.update(
            lengths=profile.lengths,
            samples=tuple(profile.samples[n] for n in profile.lengths),
            block_size=profile.block_size,
        )
        # Held-out samples follow the profile's calibration recipe unless told otherwise.
        recipe = profile.provenance
        base.update({key: recipe[key] for key in ("mode", "seed", "answer_tokens") if key in recipe})
        if recipe.get("data") not in (None, "synthetic"):
            base["data"] = recipe["data"]
    if "lengths" in given and "samples" not in given:
        counts = dict(zip(base["lengths"], base["samples"], strict=True))
        given["samples"] = tuple(counts.get(int(n), 1) for n in given["lengths"])
    if "gate_extra_samples" not in given:
        named = PRESETS[preset]
        extra = dict(zip(named["lengths"], named.get("gate_extra_samples", ()), strict=False))
        given["gate_extra_samples"] = tuple(
            extra.get(int(n), 0) for n in given.get("lengths", base["lengths"])
        )
    return CompressSettings(budget=budget, **{**base, **given})
