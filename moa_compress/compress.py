"""The main job: calibrate -> profile -> search -> validate -> export, resumable.

:func:`compress` runs every stage on a loaded model and writes into ``out_dir``:

* ``plan.json`` — the Pareto plan with the lowest held-out answer loss relative to dense (mean over
  the profiled lengths);
* ``results.json``, ``report.md`` (+ plots) — a short :func:`moa_compress.evaluate.evaluate_plan` of that
  plan against dense and the uniform baseline (perplexity and fidelity on natural text);
* ``compress.json`` — the machine-readable summary (settings, densities, predicted costs, validation
  losses, stage times); written last, so its presence means the run finished.

Validation: the search ranks plans by a first-order prediction of the loss; held-out samples (the same
recipe with another seed) at every profiled length measure the real answer loss of every Pareto plan,
of dense, and of the uniform baseline at the chosen plan's density. A plan's *score* is the mean over
the lengths of its loss divided by dense's there (answer losses differ in scale from one length to the
next); the lowest score wins. Scoring every length, not only the longest, matters: one sample at 8K
picked the plan that was worst on prose at 4K and 8K among seven (BENCHMARKS.md).

The work folder (default ``out_dir/work``) makes a run resumable::

    manifest.json      the settings each stage was made with, and whether it finished
    profile-samples/   profile_model's pooled map of each calibration sample, saved as it finishes
    profile/           the finished profile (profile.json + profile.safetensors)
    search.json        the Pareto set: every plan with its weights, predicted costs and densities
    validation.json    the answer loss of each variant, saved after each one

Rerunning with the same settings skips finished stages and samples (the dense model's calibration
answers are cached too, see :func:`moa_compress.data.calibration_set`). A setting that changes a stage
already started raises :class:`StaleWorkError` naming it; ``force`` discards that stage and the ones
after it instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_compress.errors import UserInputError
from moa_compress.plan import PLAN_FILE, Plan, atomic_write_bytes, identity_of, save_plan
from moa_compress.profile import Profile

SUMMARY_FILE = "compress.json"
# 2: validation at every profiled length (per-length losses and a score) instead of one length.
SUMMARY_SCHEMA_VERSION = 2
OUTPUT_FILES = (PLAN_FILE, "results.json", "report.md", SUMMARY_FILE)
WORK_FORMAT = "moa-compress-work"
MANIFEST_FILE = "manifest.json"
STAGES = ("profile", "search", "validate")
# Held-out samples use the calibration recipe with this seed offset: other keys, facts and cuts.
VALIDATION_SEED_OFFSET = 7919
EVAL_TASKS = ("ppl", "fidelity")


class CompressError(UserInputError):
    """Settings or inputs that ``compress`` cannot work with."""


class StaleWorkError(CompressError):
    """The work folder holds a stage made with other settings."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class CompressSettings:
    """Everything that decides what :func:`compress` computes.

    ``lengths``: profiled (and validated, evaluated) lengths, sorted; ``samples``: calibration samples at
    each of them (one count per length, same order; an int means the same count everywhere).
    ``extend_lengths``: longer lengths the plan's density must also hold at (extrapolated rules).
    ``min_span``: the narrowest band a static rule may keep (tokens; None: the search's default).
    ``cost``: the search's per-block measure (``"net"`` or ``"entry"``; None: the search's default).
    ``data``/``text_field``/``mode``/``seed``/``answer_tokens``: the calibration recipe
    (:func:`moa_compress.data.calibration_set`; ``data=None`` is the built-in synthetic set).
    ``pareto_size``: weightings of the lengths the search solves (each distinct plan is validated).
    ``validation_samples``: held-out samples at each profiled length. ``eval_limit``: text windows per
    length in the closing eval, whose text is ``eval_data`` (None: Debian's python3.11-doc).
    ``dtype``: the dtype the model must be loaded in (checked). ``backend``: the plan's attention backend
    during validation and eval.
    """

    budget: float
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    samples: tuple[int, ...] | int = (6, 2, 1)
    data: str | None = None
    text_field: str = "text"
    mode: str = "answers"
    seed: int = 0
    answer_tokens: int = 32
    extend_lengths: tuple[int, ...] = ()
    per_head: bool = False
    min_span: float | None = None
    cost: str | None = None
    pareto_size: int = 7
    validation_samples: int = 1
    eval_limit: int = 2
    eval_data: str | None = None
    dtype: str = "bfloat16"
    block_size: int = 64
    backend: str = "auto"

    def __post_init__(self) -> None:
        lengths = tuple(int(n) for n in self.lengths)
        samples = self.samples
        if isinstance(samples, int):
            samples = (samples,) * len(lengths)
        if len(samples) != len(lengths):
            raise CompressError(
                f"--samples gives {len(samples)} counts for {len(lengths)} lengths; give one, or one per length"
            )
        # Sort lengths and keep each count with its length.
        pairs = sorted(zip(lengths, (int(k) for k in samples), strict=True))
        object.__setattr__(self, "lengths", tuple(n for n, _ in pairs))
        object.__setattr__(self, "samples", tuple(k for _, k in pairs))
        object.__setattr__(self, "extend_lengths", tuple(sorted({int(n) for n in self.extend_lengths})))
        if self.data is not None:
            object.__setattr__(self, "data", str(self.data))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", str(self.eval_data))

    @property
    def target_lengths(self) -> tuple[int, ...]:
        """The lengths the plan's density must hold at: profiled plus extended."""
        return tuple(sorted(set(self.lengths) | set(self.extend_lengths)))

    def samples_per_length(self) -> dict[int, int]:
        return dict(zip(self.lengths, self.samples, strict=True))

    def check(self) -> None:
        """Raise :class:`CompressError` for settings that are wrong whatever the model."""
        from moa_compress.data import MODES
        from moa_compress.models import DTYPES
        from moa_compress.search import COSTS

        if not isinstance(self.budget, (int, float)) or not 0.0 < self.budget <= 1.0:
            raise CompressError(f"--budget must be in (0, 1], got {self.budget}")
        if not self.lengths or len(set(self.lengths)) != len(self.lengths) or self.lengths[0] <= 0:
            raise CompressError(f"--lengths must be distinct positive lengths, got {list(self.lengths)}")
        if any(k < 1 for k in self.samples):
            raise CompressError(f"--samples must be at least 1 per length, got {list(self.samples)}")
        if any(n <= 0 for n in self.extend_lengths):
            raise CompressError(f"--extend-lengths must be positive, got {list(self.extend_lengths)}")
        if self.mode not in MODES:
            raise CompressError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cost is not None and self.cost not in COSTS:
            raise CompressError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.dtype not in DTYPES:
            raise CompressError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("pareto_size", "validation_samples", "eval_limit", "answer_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise CompressError(f"{name} must be positive, got {getattr(self, name)}")


# Presets fill the settings a user does not give. "full" is the recipe for the embedded model's
# shipped plans; "fast" fits in a few minutes on a 2-core CPU (see BENCHMARKS.md).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "lengths": (2048, 4096, 8192),
        "samples": (6, 2, 1),
        "pareto_size": 7,
        "validation_samples": 1,
        "eval_limit": 2,
    },
    "fast": {
        "lengths": (1024, 2048),
        "samples": (1, 1),
        "pareto_size": 3,
        "validation_samples": 1,
        "eval_limit": 1,
    },
}


def preset_settings(
    preset: str, budget: float, *, profile: Profile | None = None, **overrides: Any
) -> CompressSettings:
    """Settings from ``preset``, with every override that is not None taking precedence.

    ``lengths`` without ``samples``: the preset's count at the lengths it names, 1 elsewhere. With a
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
    return CompressSettings(budget=budget, **{**base, **given})


# ----------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class CompressResult:
    """What :func:`compress` made: the chosen ``plan``, its ``path``, the report's path, and
    ``summary`` — the content of ``compress.json`` (:func:`summary_table` prints it)."""

    plan: Plan
    path: Path
    report: Path
    summary: dict[str, Any] = field(repr=False)


# ----------------------------------------------------------------------------------------------
# The work folder


class _Work:
    """The work folder's manifest: per stage, the settings it was made with and whether it finished."""

    def __init__(self, root: Path, stages: Mapping[str, Mapping[str, Any]]):
        self.root = root
        self.stages = {name: json.loads(json.dumps(value)) for name, value in stages.items()}
        self.recorded: dict[str, Any] = {}

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def files(self, stage: str) -> list[Path]:
        return {
            "profile": [self.root / "profile-samples", self.root / "profile"],
            "search": [self.root / "search.json"],
            "validate": [self.root / "validation.json"],
        }[stage]

    def check(self, force: bool) -> list[str]:
        """Compare the recorded stages with this run's; raise :class:`StaleWorkError` on the first that
        differs, or with ``force`` discard it and every later stage. Returns the stages whose work was
        discarded."""
        if not self.manifest.exists():
            if any(p.exists() for stage in STAGES for p in self.files(stage)) and not force:
                raise StaleWorkError(
                    f"{self.root} holds work files but no {MANIFEST_FILE}; pass --force to discard them"
                )
            return self._discard(STAGES) if force else []
        try:
            data = json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict) or data.get("format") != WORK_FORMAT:
            if not force:
                raise StaleWorkError(f"{self.manifest} is not a moa-compress work manifest; pass --force")
            return self._discard(STAGES)
        self.recorded = data.get("stages", {})
        for i, stage in enumerate(STAGES):
            old = self.recorded.get(stage)
            if old is None or old.get("settings") == self.stages[stage]:
                continue
            if not force:
                raise StaleWorkError(
                    _stale_message(self.root, stage, old.get("settings", {}), self.stages[stage])
                )
            return self._discard(STAGES[i:])
        return []

    def _discard(self, stages: Sequence[str]) -> list[str]:
        import shutil

        discarded = []
        for stage in stages:
            found = self.recorded.pop(stage, None) is not None
            for path in self.files(stage):
                found |= path.exists()
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            if found:
                discarded.append(stage)
        return discarded

    def done(self, stage: str) -> bool:
        old = self.recorded.get(stage)
        return bool(old and old.get("done") and old.get("settings") == self.stages[stage])

    def mark(self, stage: str, done: bool) -> None:
        self.recorded[stage] = {"settings": self.stages[stage], "done": done}
        body = {"format": WORK_FORMAT, "stages": self.recorded}
        atomic_write_bytes(self.manifest, (json.dumps(body, indent=1) + "\n").encode())


# How a stage setting is named to the user (the CLI option where there is one).
_SETTING_NAMES = {
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
    "min_span": "--min-span",
    "cost": "--cost",
    "pareto_size": "pareto_size",
    "validation_samples": "validation_samples",
    "backend": "backend",
}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _stale_message(root: Path, stage: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [key for key in new if old.get(key) != new[key]] or sorted(set(old) - set(new))
    key = changed[0]
    name = _SETTING_NAMES.get(key, key)
    return (
        f"{name} changed ({_show(old.get(key))} -> {_show(new.get(key))}) since the {stage} stage in {root} "
        "was made; rerun with the same settings to resume, pass --force to redo that stage and the later "
        "ones, or use another --work"
    )


def _stage_settings(
    settings: CompressSettings, fingerprint: str, weights: str, profile: Profile | None
) -> dict[str, dict[str, Any]]:
    """Each stage's own inputs (a stage is also stale when an earlier one is)."""
    recipe = {
        "data": settings.data,
        "text_field": settings.text_field if settings.data is not None else None,
        "mode": settings.mode,
        "seed": settings.seed,
        "answer_tokens": settings.answer_tokens,
    }
    model = {"model": fingerprint, "weights": weights}
    if profile is None:
        profiled = {
            **model,
            "lengths": list(settings.lengths),
            "samples": list(settings.samples),
            **recipe,
            "block_size": settings.block_size,
        }
    else:
        profiled = {**model, "profile": profile_digest(profile)}
    return {
        "profile": profiled,
        "search": {
            "budget": settings.budget,
            "extend_lengths": list(settings.extend_lengths),
            "per_head": settings.per_head,
            "min_span": settings.min_span,
            "cost": settings.cost,
            "pareto_size": settings.pareto_size,
        },
        "validate": {
            **recipe,
            "validation_samples": settings.validation_samples,
            "backend": settings.backend,
        },
    }


def profile_digest(profile: Profile) -> str:
    """16 hex digits identifying a profile's influence tensors and sample counts."""
    h = hashlib.sha256()
    for n in profile.lengths:
        h.update(f"{n}:{profile.samples[n]}:{profile.block_size}:".encode())
        h.update(profile.influence[n].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Checks before anything is written


def _max_positions(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _model_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def check_inputs(model: Any, settings: CompressSettings, profile: Profile | None = None) -> None:
    """Every check that needs no data: settings, lengths against the model, the budget against the
    smallest possible plan, a reused profile against the model and lengths."""
    from moa_compress.search import SearchError, minimum_density

    settings.check()
    limit = _max_positions(model)
    for option, values in (("--lengths", settings.lengths), ("--extend-lengths", settings.extend_lengths)):
        if limit is not None and values and max(values) > limit:
            raise CompressError(f"{option} {max(values)} is over the model's maximum positions ({limit})")
    if _model_dtype(model) != settings.dtype:
        raise CompressError(
            f"the model is loaded in {_model_dtype(model)}, the settings say --dtype {settings.dtype}"
        )
    block = profile.block_size if profile is not None else settings.block_size
    smallest = minimum_density(settings.target_lengths, block)
    worst = max(smallest, key=smallest.__getitem__)
    if settings.budget < smallest[worst] - 1e-12:
        raise SearchError(
            f"--budget {settings.budget} is below the smallest possible plan (1 sink block + the diagonal "
            f"block for every head): density {smallest[worst]:.4f} at {worst} tokens"
        )
    if profile is not None:
        _check_profile(model, profile, settings)


def _check_profile(model: Any, profile: Profile, settings: CompressSettings) -> None:
    from moa_compress.data import model_digest

    identity = identity_of(model)
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint"):
        if getattr(profile.model, name) != getattr(identity, name):
            raise CompressError(
                f"--profile was made for another model ({name} {getattr(profile.model, name)}, this model "
                f"{getattr(identity, name)})"
            )
    weights = profile.provenance.get("model_weights")
    if weights is not None and weights != model_digest(model):
        raise CompressError(
            "--profile was made with other weights than this model's (another checkpoint or --dtype)"
        )
    if profile.lengths != settings.lengths:
        raise CompressError(
            f"--profile holds lengths {','.join(map(str, profile.lengths))}, --lengths asks "
            f"{','.join(map(str, settings.lengths))}"
        )
    if profile.block_size != settings.block_size:
        raise CompressError(
            f"--profile uses block size {profile.block_size}, the settings {settings.block_size}"
        )


def _check_outputs(out: Path, force: bool) -> None:
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out / existing[0]} exists; pass --force to overwrite, or use another --out")


def _eval_texts(settings: CompressSettings, tokenizer: Any) -> tuple[list[str], str]:
    from moa_compress.data import DataError, load_texts, token_windows
    from moa_compress.evaluate import default_texts

    if settings.eval_data is None:
        texts, source = default_texts()
    else:
        texts, source = load_texts(settings.eval_data, "text"), settings.eval_data
    longest = settings.lengths[-1]
    if not token_windows(texts, tokenizer, longest, limit=1):
        raise DataError(f"the evaluation text ({source}) has no text of {longest} tokens; pass --eval-data")
    return texts, source


# ----------------------------------------------------------------------------------------------
# The job


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def compress(
    model: Any,
    tokenizer: Any,
    settings: CompressSettings,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    profile: Profile | None = None,
    command: str | None = None,
) -> CompressResult:
    """Compress ``model``'s attention under ``settings.budget``; write plan, report and summary to
    ``out_dir`` (see the module docstring). ``profile``: reuse a profile instead of profiling (it must
    match the model and ``settings.lengths``). ``force``: overwrite outputs and redo stale stages.

    Every input is checked before anything is written; existing outputs in ``out_dir`` are refused
    unless ``force``.
    """
    from moa_compress.data import load_texts, model_digest
    from moa_compress.plan import provenance as make_provenance

    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "work"
    check_inputs(model, settings, profile)
    _check_outputs(out, force)
    calibration_texts = load_texts(settings.data, settings.text_field) if settings.data is not None else None
    eval_texts, eval_source = _eval_texts(settings, tokenizer)
    identity = identity_of(model)
    state = _Work(work, _stage_settings(settings, identity.fingerprint, model_digest(model), profile))
    discarded = state.check(force)
    if discarded:
        _say(progress, f"discarded stale work: {', '.join(discarded)}")

    record = make_provenance(command or "", **_recipe(settings))
    context = _Context(model, tokenizer, settings, state, calibration_texts, progress, force)
    seconds: dict[str, float | None] = {}

    started = time.perf_counter()
    if profile is None:
        profile = context.profile_stage(record)
    seconds["profile"] = context.elapsed("profile", started)

    started = time.perf_counter()
    result = context.search_stage(profile, record)
    seconds["search"] = context.elapsed("search", started)

    started = time.perf_counter()
    validation = context.validate_stage(profile, result)
    seconds["validate"] = context.elapsed("validate", started)
    plan = _chosen_plan(result, validation)

    from moa_compress.evaluate import evaluate_plan, write_report

    started = time.perf_counter()
    _say(progress, "eval: perplexity and fidelity of dense, the plan and uniform on natural text")
    results = evaluate_plan(
        model,
        tokenizer,
        plan,
        tasks=EVAL_TASKS,
        lengths=profile.lengths,
        texts=eval_texts,
        limit=settings.eval_limit,
        seed=settings.seed,
        backend=settings.backend,
        progress=progress,
    )
    seconds["eval"] = round(time.perf_counter() - started, 2)
    results["command"] = command
    results["plan"]["path"] = str(out / PLAN_FILE)
    results["settings"]["data"] = eval_source

    path = save_plan(plan, out, force=True)
    report = write_report(results, out, plan)
    summary = _summary(settings, profile, result, validation, results, seconds, command, work)
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    return CompressResult(plan=plan, path=path, report=report, summary=summary)


def _recipe(settings: CompressSettings) -> dict[str, Any]:
    return {
        "data": settings.data or "synthetic",
        "mode": settings.mode,
        "seed": settings.seed,
        "answer_tokens": settings.answer_tokens,
        "dtype": settings.dtype,
    }


class _Context:
    """The stages, sharing the model, the settings and the work folder."""

    def __init__(self, model, tokenizer, settings, state: _Work, texts, progress: bool, force: bool):
        self.model, self.tokenizer, self.settings, self.state = model, tokenizer, settings, state
        self.texts, self.progress, self.force = texts, progress, force
        self.resumed: set[str] = set()

    def elapsed(self, stage: str, started: float) -> float | None:
        """Seconds the stage took in this run; None when it was read back from the work folder."""
        return None if stage in self.resumed else round(time.perf_counter() - started, 2)

    def calibration(self, lengths: Sequence[int], counts: Mapping[int, int], seed: int):
        from moa_compress.data import calibration_set

        s = self.settings
        return calibration_set(
            self.model,
            self.tokenizer,
            lengths=lengths,
            samples_per_length=dict(counts),
            data=self.texts,
            mode=s.mode,
            seed=seed,
            progress=self.progress,
            answer_tokens=s.answer_tokens,
        )

    def profile_stage(self, record: Mapping[str, Any]) -> Profile:
        from moa_compress.profile import ProfileError, load_profile, profile_model, save_profile

        folder = self.state.root / "profile"
        if self.state.done("profile"):
            try:
                profile = load_profile(folder)
            except ProfileError:
                pass  # damaged or missing: profile again (finished samples are still reused)
            else:
                _say(self.progress, f"profile: reusing {folder}")
                self.resumed.add("profile")
                return profile
        self.state.mark("profile", done=False)
        s = self.settings
        calibration = self.calibration(s.lengths, s.samples_per_length(), s.seed)
        profile = profile_model(
            self.model,
            calibration,
            block_size=s.block_size,
            work_dir=self.state.root / "profile-samples",
            progress=self.progress,
            force=self.force,
            provenance=record,
        )
        save_profile(profile, folder, force=True)
        self.state.mark("profile", done=True)
        return profile

    def search_stage(self, profile: Profile, record: Mapping[str, Any]):
        from moa_compress.search import search_plan

        path = self.state.root / "search.json"
        if self.state.done("search") and path.exists():
            try:
                result = load_search_stage(path)
            except (CompressError, OSError):
                pass  # damaged: search again (it is deterministic)
            else:
                _say(self.progress, f"search: reusing {path}")
                self.resumed.add("search")
                return result
        self.state.mark("search", done=False)
        s = self.settings
        result = search_plan(
            profile,
            s.budget,
            extend_lengths=s.extend_lengths,
            per_head=s.per_head,
            min_span=s.min_span,
            cost=s.cost,
            pareto_size=s.pareto_size,
            progress=self.progress,
            provenance=record,
        )
        save_search_stage(result, path)
        self.state.mark("search", done=True)
        # What later stages see is what a resumed run reads back: the same plans either way.
        return load_search_stage(path)

    def validate_stage(self, profile: Profile, result) -> dict[str, Any]:
        from moa_compress.evaluate import uniform_baseline

        s = self.settings
        lengths = list(profile.lengths)
        path = self.state.root / "validation.json"
        shape = {"lengths": lengths, "samples": s.validation_samples, "points": len(result.points)}
        record = _read_json(path) if self.state.recorded.get("validate") else None
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in shape.items()):
            record = {**shape, "seed": s.seed + VALIDATION_SEED_OFFSET, "loss": {}}
        losses: dict[str, float] = record["loss"]  # "<variant>@<length>" -> answer loss
        if self.state.done("validate") and all(f"uniform@{n}" in losses for n in lengths):
            _say(self.progress, f"validate: reusing {path}")
            self.resumed.add("validate")
        self.state.mark("validate", done=False)

        held_out: dict[int, list] = {}

        def measure(name: str, plan: Plan | None, n: int, label: str) -> None:
            key = f"{name}@{n}"
            if key in losses:
                return
            if not held_out:
                held_out.update(
                    self.calibration(lengths, dict.fromkeys(lengths, s.validation_samples), record["seed"])
                )
            _say(self.progress, f"validate: answer loss of {label} at {n} tokens")
            losses[key] = self.loss(plan, held_out[n])
            atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())

        for n in lengths:
            measure("dense", None, n, "dense")
            for i, point in enumerate(result.points):
                measure(f"plan-{i}", point.plan, n, f"plan-{i}")
        best = _best_point(losses, len(result.points), lengths)
        record["uniform"] = {}
        for n in lengths:
            uniform = uniform_baseline(result.points[best].plan, n)
            record["uniform"][str(n)] = {"density": uniform.density(n), "rule": _rule_name(uniform)}
            measure("uniform", uniform, n, f"uniform at density {uniform.density(n):.4f}")
        atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
        self.state.mark("validate", done=True)
        return {**record, "chosen": best}

    def loss(self, plan: Plan | None, samples) -> float:
        from moa_compress.profile import answer_loss
        from moa_compress.runtime import apply_plan

        if plan is None:
            return answer_loss(self.model, samples)
        with apply_plan(self.model, plan, backend=self.settings.backend):
            return answer_loss(self.model, samples)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _rule_name(plan: Plan) -> str:
    from moa_compress.plan import describe_rule

    return describe_rule(plan.rules[0][0])


def validation_score(losses: Mapping[str, float], name: str, lengths: Sequence[int]) -> float:
    """Mean over ``lengths`` of variant ``name``'s held-out answer loss divided by dense's."""
    return sum(losses[f"{name}@{n}"] / losses[f"dense@{n}"] for n in lengths) / len(lengths)


def _best_point(losses: Mapping[str, float], count: int, lengths: Sequence[int]) -> int:
    """The Pareto point with the lowest validation score; ties go to the lower predicted cost (index)."""
    return min(range(count), key=lambda i: (validation_score(losses, f"plan-{i}", lengths), i))


def _chosen_plan(result, validation: Mapping[str, Any]) -> Plan:
    """The chosen point's plan, its Pareto entries carrying their validation losses."""
    from moa_compress.search import with_choice

    index = validation["chosen"]
    plan = with_choice(result, index)
    record = json.loads(json.dumps(dict(plan.provenance)))
    losses, lengths = validation["loss"], validation["lengths"]
    for i, entry in enumerate(record.get("pareto", [])):
        entry["validation_score"] = validation_score(losses, f"plan-{i}", lengths)
    record["validation"] = {
        "lengths": lengths,
        "samples": validation["samples"],
        "seed": validation["seed"],
        "loss": {
            name: {str(n): losses[f"{key}@{n}"] for n in lengths}
            for name, key in (("dense", "dense"), ("uniform", "uniform"), ("plan", f"plan-{index}"))
        },
        "score": {
            "uniform": validation_score(losses, "uniform", lengths),
            "plan": validation_score(losses, f"plan-{index}", lengths),
        },
        "uniform": validation["uniform"],
        "chosen": index,
    }
    return dataclasses.replace(plan, provenance=record)


# ----------------------------------------------------------------------------------------------
# The Pareto set on disk


def save_search_stage(result, path: Path) -> None:
    """Write a :class:`moa_compress.search.SearchResult` as JSON (plans, weights, costs, densities)."""
    body = {
        "lengths": list(result.lengths),
        "points": [
            {
                "plan": point.plan.to_dict(),
                "weights": {str(n): w for n, w in point.weights.items()},
                "predicted_cost": {str(n): c for n, c in point.predicted_cost.items()},
                "density": {str(n): d for n, d in point.density.items()},
            }
            for point in result.points
        ],
    }
    atomic_write_bytes(Path(path), (json.dumps(body, indent=1) + "\n").encode())


def load_search_stage(path: Path):
    """Read what :func:`save_search_stage` wrote."""
    from moa_compress.search import ParetoPoint, SearchResult

    data = _read_json(Path(path))
    try:
        points = [
            ParetoPoint(
                plan=Plan.from_dict(p["plan"]),
                weights={int(n): float(w) for n, w in p["weights"].items()},
                predicted_cost={int(n): float(c) for n, c in p["predicted_cost"].items()},
                density={int(n): float(d) for n, d in p["density"].items()},
            )
            for p in data["points"]
        ]
        lengths = tuple(int(n) for n in data["lengths"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CompressError(f"{path}: malformed search result ({exc})") from None
    if not points:
        raise CompressError(f"{path}: no Pareto points")
    return SearchResult(points=points, lengths=lengths)


# ----------------------------------------------------------------------------------------------
# Summary


def _summary(settings, profile, result, validation, results, seconds, command, work) -> dict[str, Any]:
    index = validation["chosen"]
    point = result.points[index]
    losses, lengths = validation["loss"], validation["lengths"]

    def per_length(name: str) -> dict[str, float]:
        return {str(n): losses[f"{name}@{n}"] for n in lengths}

    ppl = {
        variant: {n: v["ppl"] for n, v in results["results"][variant].get("ppl", {}).items()}
        for variant in ("dense", "plan", "uniform")
    }
    fidelity = {variant: results["results"][variant].get("fidelity", {}) for variant in ("plan", "uniform")}
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "command": command,
        "model": dataclasses.asdict(profile.model),
        "settings": {**dataclasses.asdict(settings), "lengths": list(settings.lengths)},
        "budget": settings.budget,
        "lengths": list(result.lengths),
        "profiled_lengths": list(profile.lengths),
        "profile_samples": {str(n): profile.samples[n] for n in profile.lengths},
        "chosen": index,
        "density": {str(n): point.plan.density(n) for n in result.lengths},
        "predicted_cost": {str(n): c for n, c in point.predicted_cost.items()},
        "validation": {
            "lengths": lengths,
            "samples": validation["samples"],
            "seed": validation["seed"],
            "dense": per_length("dense"),
            "uniform": {
                "loss": per_length("uniform"),
                "score": validation_score(losses, "uniform", lengths),
                "density": {n: u["density"] for n, u in validation["uniform"].items()},
                "rule": {n: u["rule"] for n, u in validation["uniform"].items()},
            },
            "plan": per_length(f"plan-{index}"),
            "score": validation_score(losses, f"plan-{index}", lengths),
            "points": [
                {
                    "index": i,
                    "loss": per_length(f"plan-{i}"),
                    "score": validation_score(losses, f"plan-{i}", lengths),
                    "mean_predicted_cost": sum(p.predicted_cost.values()) / len(p.predicted_cost),
                    "density": {str(n): d for n, d in p.density.items()},
                }
                for i, p in enumerate(result.points)
            ],
        },
        "eval": {
            "lengths": results["settings"]["lengths"],
            "limit": results["settings"]["limit"],
            "data": results["settings"]["data"],
            "ppl": ppl,
            "fidelity": fidelity,
        },
        "seconds": seconds,
        "work_dir": str(work),
        "files": {"plan": PLAN_FILE, "report": "report.md", "results": "results.json"},
    }


def _relative(value: float, base: float) -> str:
    if not math.isfinite(value) or not math.isfinite(base) or base == 0:
        return ""
    return f"{100 * (value - base) / abs(base):+.1f}%"


def summary_table(summary: Mapping[str, Any]) -> str:
    """The closing table: budget; density at each target length; predicted cost; validation losses of
    dense, the uniform baseline at the same density and the chosen plan; eval perplexities."""
    v = summary["validation"]
    headline = (
        f"budget {summary['budget']:g}: chose Pareto plan {summary['chosen']} of {len(v['points'])} "
        f"(lowest held-out answer loss relative to dense, mean over {len(v['lengths'])} length(s), "
        f"{v['samples']} sample(s) each)"
    )
    lines = [headline, "", f"{'length':>8}  {'density':>8}  {'predicted cost':>14}"]
    for n, d in summary["density"].items():
        cost = summary["predicted_cost"].get(n)
        lines.append(f"{n:>8}  {d:>8.4f}  {'(extended)' if cost is None else f'{cost:.4f}':>14}")
    lengths = [str(n) for n in v["lengths"]]
    densities = ", ".join(f"{v['uniform']['density'][n]:.3f}" for n in lengths)
    lines += [
        "",
        f"{'validation answer loss':<24}" + "".join(f"{n:>10}" for n in lengths) + f"{'vs dense':>10}",
        f"{'dense':<24}" + "".join(f"{v['dense'][n]:>10.4f}" for n in lengths),
        f"{'uniform':<24}"
        + "".join(f"{v['uniform']['loss'][n]:>10.4f}" for n in lengths)
        + f"{_relative(v['uniform']['score'], 1.0):>10}",
        f"{'chosen plan':<24}"
        + "".join(f"{v['plan'][n]:>10.4f}" for n in lengths)
        + f"{_relative(v['score'], 1.0):>10}",
        f"(uniform at density {densities}; vs dense: mean over lengths of the loss ratio)",
    ]
    if v["uniform"]["score"] < v["score"]:
        lines.append("note: the uniform baseline beats every searched plan on the held-out samples")
    ppl = summary["eval"]["ppl"]
    if ppl.get("dense"):
        lines += ["", f"{'eval perplexity':<16}" + "".join(f"{n:>10}" for n in ppl["dense"])]
        for variant in ("dense", "uniform", "plan"):
            label = "chosen plan" if variant == "plan" else variant
            lines.append(f"{label:<16}" + "".join(f"{ppl[variant][n]:>10.3f}" for n in ppl["dense"]))
        lines.append(f"({summary['eval']['limit']} window(s) per length of {summary['eval']['data']})")
    return "\n".join(lines)


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """Read ``compress.json`` from a finished run's folder."""
    path = Path(out_dir) / SUMMARY_FILE
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("schema_version") != SUMMARY_SCHEMA_VERSION:
        raise CompressError(f"{path} is missing or not a compress summary")
    return data


__all__ = [
    "PRESETS",
    "CompressError",
    "CompressResult",
    "CompressSettings",
    "StaleWorkError",
    "check_inputs",
    "compress",
    "load_search_stage",
    "load_summary",
    "preset_settings",
    "profile_digest",
    "save_search_stage",
    "summary_table",
    "validation_score",
]
