"""The work folder that makes :func:`moa_compress.pipeline.compress` resumable.

Layout (default ``OUT/work``)::

    manifest.json      the settings each stage was made with, and whether it finished
    profile-samples/   profile_model's pooled map of each calibration sample, saved as it finishes
    profile/           the finished profile (profile.json + profile.safetensors)
    gates-samples/     train_gates' pooled Q/K and targets of each calibration sample (with gate rules)
    gates/             the trained gates (gates.json + gates.safetensors)
    search.json        the Pareto set: every plan with its weights, predicted costs and densities, and
                       the static-only / gate-only optima (search.safetensors: their gate weights)
    validation.json    the held-out loss of each variant (answers and prose tails), saved after each one

A setting that changes a stage already started raises :class:`StaleWorkError` naming it; ``force``
discards that stage and the ones after it instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moa_compress.plan import Plan, PlanError, atomic_write_bytes
from moa_compress.profile import Profile
from moa_compress.search import DEFAULT_GATE_TAILS, SampleMaps
from moa_compress.settings import OPTION_NAMES, CompressError, CompressSettings

WORK_FORMAT = "moa-compress-work"
MANIFEST_FILE = "manifest.json"
STAGES = ("profile", "gates", "search", "validate")
SEARCH_FILE = "search.json"
SEARCH_TENSORS = "search.safetensors"
GATES_DIR = "gates"
GATE_SAMPLES_DIR = "gates-samples"
PROFILE_SAMPLES_DIR = "profile-samples"


class StaleWorkError(CompressError):
    """The work folder holds a stage made with other settings."""


class WorkFolder:
    """The work folder's manifest: per stage, the settings it was made with and whether it finished.

    ``stages`` holds this run's stages only (a run without gate rules has no ``gates`` stage); a
    recorded stage this run does not use is left as it is, for a later run that does.
    """

    def __init__(self, root: Path, stages: Mapping[str, Mapping[str, Any]]):
        self.root = root
        self.stages = {name: json.loads(json.dumps(value)) for name, value in stages.items()}
        self.recorded: dict[str, Any] = {}

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def files(self, stage: str) -> list[Path]:
        return {
            # The gates' inputs and targets come from the profile's calibration samples and the model
            # alone: they go with the profile stage, and survive redoing the gates with other settings.
            "profile": [self.root / PROFILE_SAMPLES_DIR, self.root / "profile", self.root / GATE_SAMPLES_DIR],
            "gates": [self.root / GATES_DIR],
            "search": [self.root / SEARCH_FILE, self.root / SEARCH_TENSORS],
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
        used = [stage for stage in STAGES if stage in self.stages]
        for i, stage in enumerate(used):
            old = self.recorded.get(stage)
            if old is None or old.get("settings") == self.stages[stage]:
                continue
            if not force:
                raise StaleWorkError(
                    _stale_message(self.root, stage, old.get("settings", {}), self.stages[stage])
                )
            return self._discard(used[i:])
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


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


# Stage settings recorded only when they differ from these values (work folders made before the setting
# existed were made with this value, and resume); "gate_floor" is always recorded, its entry here only
# names what a search made before it did, for the stale message.
_UNRECORDED = {
    "gate_folds": 1,
    "gate_weight_decay": 0.01,
    "gate_floor": "none (a search before gate floors)",
    "gate_tails": list(DEFAULT_GATE_TAILS),
    "gate_extra_samples": [],
    "ranking": "gate",
}


def _stale_message(root: Path, stage: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [key for key in new if old.get(key) != new[key]] or sorted(set(old) - set(new))
    key = changed[0]
    name = OPTION_NAMES.get(key, key)
    was, now = (side.get(key, _UNRECORDED.get(key)) for side in (old, new))
    return (
        f"{name} changed ({_show(was)} -> {_show(now)}) since the {stage} stage in {root} "
        "was made; rerun with the same settings to resume, pass --force to redo that stage and the later "
        "ones, or use another --work"
    )


def stage_settings(
    settings: CompressSettings, fingerprint: str, weights: str, profile: Profile | None
) -> dict[str, dict[str, Any]]:
    """Each stage's own inputs (a stage is also stale when an earlier one is); the ``gates`` stage only
    when the search may choose gate rules."""
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
    stages: dict[str, dict[str, Any]] = {"profile": profiled}
    if "gate" in settings.rules:
        stages["gates"] = {"gate_dim": settings.gate_dim, "gate_steps": settings.gate_steps}
        for key in ("gate_folds", "gate_weight_decay"):
            if getattr(settings, key) != _UNRECORDED[key]:
                stages["gates"][key] = getattr(settings, key)
        if any(settings.gate_extra_samples):  # recorded when there are any (gates made before: none)
            stages["gates"]["gate_extra_samples"] = list(settings.gate_extra_samples)
            if settings.mode == "mixed":  # their prose avoids the validation's windows, so depends on them
                stages["gates"]["validation_samples"] = settings.validation_samples
    stages["search"] = {
        "budget": settings.budget,
        "extend_lengths": list(settings.extend_lengths),
        "per_head": settings.per_head,
        "rules": list(settings.rules),
        # Gate rules keep at least the narrowest band's blocks (search.gate_floor); searches made
        # before that read as stale.
        **(
            {"gate_locals": list(settings.gate_locals), "gate_floor": "the --min-span band"}
            if "gate" in settings.rules
            else {}
        ),
        # Recorded when not the default, so searches made before tails existed stay current.
        **(
            {"gate_tails": list(settings.gate_tails)}
            if "gate" in settings.rules and settings.gate_tails != DEFAULT_GATE_TAILS
            else {}
        ),
        "min_span": settings.min_span,
        **({"kv_budget": settings.kv_budget} if settings.kv_budget is not None else {}),
        # Recorded when not the gates', so searches made before rankings existed stay current.
        **(
            {"ranking": settings.prefill_ranking.describe()}
            if "gate" in settings.rules and settings.prefill_ranking is not None
            else {}
        ),
        "cost": settings.cost,
        "pareto_size": settings.pareto_size,
    }
    stages["validate"] = {
        **recipe,
        "validation_samples": settings.validation_samples,
        "backend": settings.backend,
    }
    return stages


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
# The calibration samples' maps, for gate costs


def calibration_maps(
    root: Path, profile: Profile, rankings: Mapping[int, Sequence[Mapping[str, torch.Tensor]]] | None = None
) -> dict[int, Iterator[SampleMaps]]:
    """Length -> the profile's calibration samples in order, each read when it is reached: its own maps
    (``profile-samples/N/sample-i``) and its pooled gate inputs (``gates-samples/train/N/sample-i``),
    with its prompt-ranking scores ``rankings[N][i]`` (``sampled.{layer}``) if given.
    A missing or unreadable file is a :class:`CompressError` (rerun with --force)."""
    from safetensors import SafetensorError, safe_open

    layers = profile.model.planned_layers  # a model's sliding-window layers have no gate inputs

    def read(n: int) -> Iterator[SampleMaps]:
        for i in range(profile.samples[n]):
            maps_path = root / PROFILE_SAMPLES_DIR / str(n) / f"sample-{i:04d}.safetensors"
            gate_path = root / GATE_SAMPLES_DIR / "train" / str(n) / f"sample-{i:04d}.safetensors"
            try:
                with safe_open(str(maps_path), framework="pt") as f:
                    maps = {name: f.get_tensor(name) for name in ("influence", "mass", "net")}
                with safe_open(str(gate_path), framework="pt") as f:
                    q = {layer: f.get_tensor(f"q.{layer}") for layer in layers}
                    k = {layer: f.get_tensor(f"k.{layer}") for layer in layers}
            except (OSError, SafetensorError) as exc:
                raise CompressError(
                    f"calibration sample {i} at {n} tokens: {maps_path.name} or its gate inputs are missing "
                    f"or damaged in {root} ({type(exc).__name__}); rerun with --force"
                ) from None
            sampled = (
                None if rankings is None else {layer: rankings[n][i][f"sampled.{layer}"] for layer in layers}
            )
            yield SampleMaps(maps, q, k, sampled)

    return {n: read(n) for n in profile.lengths}


# ----------------------------------------------------------------------------------------------
# The Pareto set on disk


def _tensors_path(path: Path) -> Path:
    return Path(path).with_suffix(".safetensors")  # search.json -> search.safetensors


def save_search_stage(result, path: Path) -> None:
    """Write a :class:`moa_compress.search.SearchResult` as JSON (plans, weights, costs, densities) and
    the plans' tensors once each (plans of one search share their gates' weights) in
    ``search.safetensors`` beside it; each plan names its tensors' keys there."""
    from safetensors.torch import save

    stored: dict[str, torch.Tensor] = {}
    keys: dict[tuple, str] = {}

    def store(tensor: torch.Tensor) -> str:
        tensor = tensor.detach().cpu().contiguous()
        digest = (
            str(tensor.dtype),
            tuple(tensor.shape),
            hashlib.sha256(tensor.numpy().tobytes()).hexdigest(),
        )
        if digest not in keys:
            keys[digest] = f"t{len(keys)}"
            stored[keys[digest]] = tensor.clone()
        return keys[digest]

    def entry(point) -> dict[str, Any]:
        return {
            "plan": point.plan.to_dict(),
            "tensors": {name: store(t) for name, t in sorted(point.plan.tensors.items())},
            "weights": {str(n): w for n, w in point.weights.items()},
            "predicted_cost": {str(n): c for n, c in point.predicted_cost.items()},
            "density": {str(n): d for n, d in point.density.items()},
        }

    body = {
        "lengths": list(result.lengths),
        "points": [entry(point) for point in result.points],
        "alternatives": {name: entry(point) for name, point in result.alternatives.items()},
    }
    tensors_path = _tensors_path(path)
    if stored:
        atomic_write_bytes(tensors_path, save(stored))
    else:
        tensors_path.unlink(missing_ok=True)  # an earlier search's, which no plan here names
    atomic_write_bytes(Path(path), (json.dumps(body, indent=1) + "\n").encode())


def load_search_stage(path: Path):
    """Read what :func:`save_search_stage` wrote (search results written before plans had tensors have
    no ``tensors`` entries and no ``alternatives``)."""
    from moa_compress.search import ParetoPoint, SearchResult

    data = read_json(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(data, dict) and any(p.get("tensors") for p in _entries(data)):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(_tensors_path(path)))
        except (OSError, SafetensorError) as exc:
            raise CompressError(f"{_tensors_path(path)}: missing or damaged ({type(exc).__name__})") from None

    def point(p: Mapping[str, Any]):
        return ParetoPoint(
            plan=Plan.from_dict(
                p["plan"], {name: tensors[key] for name, key in p.get("tensors", {}).items()}
            ),
            weights={int(n): float(w) for n, w in p["weights"].items()},
            predicted_cost={int(n): float(c) for n, c in p["predicted_cost"].items()},
            density={int(n): float(d) for n, d in p["density"].items()},
        )

    try:
        points = [point(p) for p in data["points"]]
        alternatives = {str(name): point(p) for name, p in data.get("alternatives", {}).items()}
        lengths = tuple(int(n) for n in data["lengths"])
    except (KeyError, TypeError, ValueError, AttributeError, PlanError) as exc:
        raise CompressError(f"{path}: malformed search result ({exc})") from None
    if not points:
        raise CompressError(f"{path}: no Pareto points")
    return SearchResult(points=points, lengths=lengths, alternatives=alternatives)


def _entries(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    points = data.get("points") if isinstance(data.get("points"), list) else []
    alternatives = data.get("alternatives") if isinstance(data.get("alternatives"), dict) else {}
    return [p for p in [*points, *alternatives.values()] if isinstance(p, dict)]
