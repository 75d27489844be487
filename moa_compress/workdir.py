"""The work folder that makes :func:`moa_compress.pipeline.compress` resumable.

Layout (default ``OUT/work``)::

    manifest.json      the settings each stage was made with, and whether it finished
    profile-samples/   profile_model's pooled map of each calibration sample, saved as it finishes
    profile/           the finished profile (profile.json + profile.safetensors)
    search.json        the Pareto set: every plan with its weights, predicted costs and densities
    validation.json    the answer loss of each variant, saved after each one

A setting that changes a stage already started raises :class:`StaleWorkError` naming it; ``force``
discards that stage and the ones after it instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_compress.plan import Plan, atomic_write_bytes
from moa_compress.profile import Profile
from moa_compress.settings import CompressError, CompressSettings

WORK_FORMAT = "moa-compress-work"
MANIFEST_FILE = "manifest.json"
STAGES = ("profile", "search", "validate")


class StaleWorkError(CompressError):
    """The work folder holds a stage made with other settings."""


class WorkFolder:
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


def stage_settings(
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


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a stage to redo)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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

    data = read_json(Path(path))
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
