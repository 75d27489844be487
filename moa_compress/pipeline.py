"""The main job: calibrate -> profile -> gates -> search -> validate -> export, resumable.

:func:`compress` runs every stage on a loaded model and writes into ``out_dir``:

* ``plan.json`` — the Pareto plan with the lowest held-out loss relative to dense (mean over
  the profiled lengths);
* ``results.json``, ``report.md`` (+ plots) — a short :func:`moa_compress.evaluate.evaluate_plan` of that
  plan against dense and the uniform baseline (perplexity and fidelity on natural text);
* ``compress.json`` — the machine-readable summary (settings, densities, predicted costs, validation
  losses, stage times); written last, so its presence means the run finished.

With gate rules allowed (``settings.rules``, default static, gate and dense) a gates stage trains one
SeerAttention-style gate per layer on the profile's calibration samples, and the search costs gate
candidates on those samples' own maps (:func:`moa_compress.search.gate_costs`). With a prompt ranking
(``settings.ranking``, e.g. ``"sampled:4"``) the search first scores each calibration sample by that
ranking (one dense forward each, kept in the work folder) and costs gate candidates on the blocks it
drops; the plans carry the ranking.

Calibration (the full preset): ``mixed`` samples, the dense model's answers to long-context prompts
alternating with windows of natural prose (the "tune" split of the shipped articles, or ``data``), so
that both retrieval and running text charge a plan (:func:`moa_compress.data.calibration_set`).

Validation: the search ranks plans by a first-order prediction of the loss; held-out samples (the same
recipe with another seed, prose windows the calibration did not use) at every profiled length measure
the real loss of every Pareto plan, of dense, and of the uniform baseline at the chosen plan's density.
A variant's loss at a length is the mean over the held-out samples of each one's loss; its *score* the
mean over the lengths of that loss divided by dense's there (losses differ in scale from one length to
the next); the lowest score wins. A user is never handed a plan that validates worse than a simpler one:
the best Pareto plan competes with the uniform plan within the budget and, when the search mixed
static and gate rules, with the static-only and gate-only optima; ``compress.json`` says which was
written (``searched``, ``uniform``, ``static-only`` or ``gate-only``) and why. Scoring every length, not only the longest, matters: one sample at 8K
picked the plan that was worst on prose at 4K and 8K among seven (BENCHMARKS.md).

The work folder (default ``out_dir/work``, :mod:`moa_compress.workdir`) makes a run resumable.
Rerunning with the same settings skips finished stages and samples (the dense model's calibration
answers are cached too, see :func:`moa_compress.data.calibration_set`). A setting that changes a stage
already started raises :class:`StaleWorkError` naming it; ``force`` discards that stage and the ones
after it instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_compress.plan import PLAN_FILE, ModelIdentity, Plan, atomic_write_bytes, identity_of, save_plan
from moa_compress.profile import Profile
from moa_compress.settings import PRESETS, CompressError, CompressSettings, preset_settings
from moa_compress.workdir import (
    GATE_SAMPLES_DIR,
    GATES_DIR,
    SEARCH_FILE,
    StaleWorkError,
    WorkFolder,
    calibration_maps,
    load_search_stage,
    profile_digest,
    read_json,
    save_search_stage,
    stage_settings,
)

SUMMARY_FILE = "compress.json"
# 2: validation at every profiled length (per-length losses and a score) instead of one length.
# 3: the uniform plan within the budget is validated too ("fallback") and written when it wins ("written").
# 4: rule kinds ("rules"), the gates stage ("gates"), the static-only / gate-only optima validated too
#    ("validation.alternatives"; "written" may name them) and why the written plan won ("why").
SUMMARY_SCHEMA_VERSION = 4
READABLE_SUMMARY_VERSIONS = (3, 4)
# What "written" may say, in the order that breaks ties between equal validation scores.
WRITTEN = ("searched", "static-only", "gate-only", "uniform")
OUTPUT_FILES = (PLAN_FILE, "results.json", "report.md", SUMMARY_FILE)
# Held-out samples use the calibration recipe with this seed offset: other keys, facts and cuts.
VALIDATION_SEED_OFFSET = 7919
EVAL_TASKS = ("ppl", "fidelity")


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


@dataclass(frozen=True)
class GateStage:
    """The gates stage's result: ``gates[layer]`` (:class:`moa_compress.gates.AttnGate`) and ``losses``:
    the distillation loss before (``initial``) and after (``final``) training, ``heldout`` losses if
    any, ``steps`` and ``seconds`` (targets, training) as recorded in ``gates.json``."""

    gates: list[Any]
    losses: dict[str, Any]
    cost_gates: dict[int, list[list[Any]]] | None = None  # per sample, gates trained without it


def _gate_losses(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not body.get("losses"):
        return {}
    folds = body.get("folds") if isinstance(body.get("folds"), dict) else {}  # {} without cross-fitting
    return {
        "initial": body.get("initial_loss"),
        "final": body["losses"][-1],
        "heldout": body.get("heldout_loss", {}),
        "steps": len(body["losses"]),
        "seconds": body.get("seconds", {}),
        # How gate rules were costed: by gates trained without each sample (cross-fitting) or by
        # the final gates on their own training samples (folds 1).
        "cost_folds": folds.get("count", 1),
        "fold_losses": folds.get("losses", []),
        "extra_samples": body.get("extra_samples", {}),  # length -> samples that only trained the gates
    }


# ----------------------------------------------------------------------------------------------
# Checks before anything is written


def _model_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def check_inputs(model: Any, settings: CompressSettings, profile: Profile | None = None) -> None:
    """Every check that needs no data: settings, lengths against the model, the budget against the
    smallest possible plan, a reused profile against the model and lengths."""
    from moa_compress.data import max_positions
    from moa_compress.search import SearchError, minimum_density

    settings.check(profile)
    ranking = settings.prefill_ranking
    if ranking is not None:
        ranking.check_layers(identity_of(model).num_layers)
    limit = max_positions(model)
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
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint", "windows"):
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


def _eval_texts(settings: CompressSettings, tokenizer: Any) -> tuple[list[str] | None, str]:
    """The closing eval's texts and their source; ``(None, why)`` when no ``eval_data`` is given and the
    default text is missing or too short (the eval is then skipped, the plan still written). Text the
    user names must work: it raises :class:`DataError` otherwise."""
    from moa_compress.data import DataError, load_texts, token_windows
    from moa_compress.evaluate import default_texts

    longest = settings.lengths[-1]
    if settings.eval_data is None:
        try:
            texts, source = default_texts()
        except DataError as exc:
            return None, str(exc).split(";")[0]
        if not token_windows(texts, tokenizer, longest, limit=1):
            return None, f"the default evaluation text has no text of {longest} tokens"
        return texts, source
    texts, source = load_texts(settings.eval_data, "text"), settings.eval_data
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
    settings: CompressSettings | float,
    out_dir: str | Path,
    *,
    preset: str = "full",
    work_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    profile: Profile | None = None,
    command: str | None = None,
    **overrides: Any,
) -> CompressResult | None:
    """Compress ``model``'s attention under a density budget; write plan, report and summary to
    ``out_dir`` (see the module docstring) and return them.

    ``settings``: a :class:`CompressSettings`, or the budget alone, in which case ``preset``
    (``"full"`` or ``"fast"``) and any ``overrides`` (fields of :class:`CompressSettings`) fill the rest.
    ``profile``: reuse a profile instead of profiling (it must match the model and the lengths).
    ``force``: overwrite outputs and redo stale stages. Every input is checked before anything is
    written; existing outputs in ``out_dir`` are refused unless ``force``.

    Under ``torchrun`` (:mod:`moa_compress.distributed`, after :func:`moa_compress.distributed.init`)
    every rank calls this: profiling is shared among the ranks, the rest runs on rank 0, which alone
    writes; the other ranks return None once the profile is done (every rank leaves the group then).

    Example::

        import moa_compress as mc

        model, tokenizer = mc.load_model()
        result = mc.compress(model, tokenizer, 0.25, "out/b0.25", preset="fast")
        print(result.plan.density(2048), result.path)
    """
    if not isinstance(settings, CompressSettings):
        settings = preset_settings(preset, settings, profile=profile, **overrides)
    elif overrides:
        raise CompressError(
            f"give either CompressSettings or a budget with overrides, not both ({overrides})"
        )
    if settings.dtype == "auto":  # the model's own
        settings = dataclasses.replace(settings, dtype=_model_dtype(model))
    from moa_compress import distributed

    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "work"
    group = distributed.current()
    # Rank 0 checks and reads the work folder; every rank learns how that went and whether to profile.
    prepared = distributed.on_main(
        group,
        "the checks",
        lambda: _prepare(model, tokenizer, settings, out, work, profile, force, progress, command),
    )
    reused = prepared[0].finished_profile() if prepared is not None and profile is None else profile
    if distributed.broadcast_json(group, reused is None, "the checks") and not group.is_main:
        _join_profile(model, settings, work, force)
    if not group.is_main:
        distributed.leave(group, "profiling")
        return None
    context, record, eval_texts, eval_source = prepared
    seconds: dict[str, float | None] = {}

    started = time.perf_counter()
    profile = reused if reused is not None else context.profile_stage(record)
    distributed.leave(group, "profiling")  # the rest is rank 0's alone
    seconds["profile"] = context.elapsed("profile", started)

    gates = None
    if "gate" in settings.rules:
        started = time.perf_counter()
        gates = context.gates_stage(profile)
        seconds["gates"] = context.elapsed("gates", started)

    started = time.perf_counter()
    result = context.search_stage(profile, record, gates)
    seconds["search"] = context.elapsed("search", started)

    started = time.perf_counter()
    validation = context.validate_stage(profile, result)
    seconds["validate"] = context.elapsed("validate", started)
    plan = _chosen_plan(result, validation, context.fallback)
    if validation["written"] != "searched":
        print(f"note: {_why(validation)}; wrote it instead (compress.json says by how much)", file=sys.stderr)

    path = save_plan(plan, out, force=True)
    results = None
    if eval_texts is None:
        # One line whatever --progress says: the user must know why the report has no perplexity.
        print(f"eval skipped: {eval_source}; pass --eval-data FILE_OR_FOLDER to evaluate", file=sys.stderr)
        (out / "results.json").unlink(missing_ok=True)  # an earlier run's, for another plan
    else:
        started = time.perf_counter()
        results = _closing_eval(context, plan, profile.lengths, eval_texts, eval_source, command, out)
        seconds["eval"] = round(time.perf_counter() - started, 2)
    summary = _summary(
        settings, profile, result, validation, plan, results, seconds, command, work, eval_source, gates
    )
    if results is None:
        report = _write_skipped_report(out, eval_source, summary_table(summary))
    else:
        from moa_compress.evaluate import write_report

        report = write_report(results, out, plan)
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    return CompressResult(plan=plan, path=path, report=report, summary=summary)


def _prepare(model, tokenizer, settings, out, work, profile, force, progress, command):
    """Every check before anything is written, the texts, and the work folder's state (rank 0)."""
    from moa_compress.data import load_texts, model_digest
    from moa_compress.plan import provenance as make_provenance

    check_inputs(model, settings, profile)
    _check_outputs(out, force)
    calibration_texts = load_texts(settings.data, settings.text_field) if settings.data is not None else None
    eval_texts, eval_source = _eval_texts(settings, tokenizer)
    identity = identity_of(model)
    state = WorkFolder(work, stage_settings(settings, identity.fingerprint, model_digest(model), profile))
    discarded = state.check(force)
    if discarded:
        _say(progress, f"discarded stale work: {', '.join(discarded)}")
    record = make_provenance(command or "", **_recipe(settings))
    context = _Context(model, tokenizer, settings, state, calibration_texts, progress, force)
    return context, record, eval_texts, eval_source


def _join_profile(model, settings: CompressSettings, work: Path, force: bool) -> None:
    """A rank other than 0: profile this rank's share of the samples rank 0 sends (its profile_stage)."""
    from moa_compress.profile import broadcast_samples, profile_model

    samples = broadcast_samples(None, settings.samples_per_length())
    profile_model(
        model,
        samples,
        block_size=settings.block_size,
        work_dir=work / "profile-samples",
        progress=False,
        force=force,
    )


def _closing_eval(context, plan: Plan, lengths, texts, source: str, command: str | None, out: Path):
    """Perplexity and fidelity of dense, the plan and uniform on natural text (results.json's shape)."""
    from moa_compress.evaluate import evaluate_plan

    s = context.settings
    _say(context.progress, "eval: perplexity and fidelity of dense, the plan and uniform on natural text")
    results = evaluate_plan(
        context.model,
        context.tokenizer,
        plan,
        tasks=EVAL_TASKS,
        lengths=lengths,
        texts=texts,
        limit=s.eval_limit,
        seed=s.seed,
        backend=s.backend,
        progress=context.progress,
    )
    results["command"] = command
    results["plan"]["path"] = str(out / PLAN_FILE)
    results["settings"]["data"] = source
    return results


def _write_skipped_report(out: Path, why: str, table: str) -> Path:
    """``report.md`` when the closing eval was skipped: why, how to evaluate, and the summary table."""
    path = out / "report.md"
    body = (
        "# moa-compress report\n\nThe closing evaluation on natural text was skipped: "
        f"{why}. Rerun with `--eval-data FILE_OR_FOLDER`, or run `moa-compress eval --plan "
        f"{out / PLAN_FILE} --data FILE_OR_FOLDER`.\n\nThe compress summary:\n\n```\n{table}\n```\n"
    )
    atomic_write_bytes(path, body.encode())
    return path


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

    def __init__(self, model, tokenizer, settings, state: WorkFolder, texts, progress: bool, force: bool):
        self.model, self.tokenizer, self.settings, self.state = model, tokenizer, settings, state
        self.texts, self.progress, self.force = texts, progress, force
        self.resumed: set[str] = set()
        self.fallback: Plan | None = None  # the uniform plan within the budget (validate_stage)
        self._calibration: dict[int, list] | None = None  # the profile's samples, built once a run

    def elapsed(self, stage: str, started: float) -> float | None:
        """Seconds the stage took in this run; None when it was read back from the work folder."""
        return None if stage in self.resumed else round(time.perf_counter() - started, 2)

    def calibration(
        self, lengths: Sequence[int], counts: Mapping[int, int], seed: int, held_out: bool = False
    ):
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
            held_out=held_out,
        )

    def calibration_samples(self) -> dict[int, list]:
        """The calibration samples of the profile (and the gates), in the order of its sample files."""
        if self._calibration is None:
            s = self.settings
            self._calibration = self.calibration(s.lengths, s.samples_per_length(), s.seed)
        return self._calibration

    def gate_extra_samples(self) -> dict[int, list]:
        """Samples that only train the gates (``--gate-extra-samples``), from the calibration recipe; in
        mixed mode their prose avoids the calibration's windows and the validation's."""
        from moa_compress.data import gate_extra_set

        s = self.settings
        counts = s.gate_extra_per_length()
        if not any(counts.values()):
            return {}
        reserved = {n: (k // 2, s.validation_samples // 2) for n, k in s.samples_per_length().items()}
        return gate_extra_set(
            self.tokenizer, lengths=s.lengths, counts=counts, data=self.texts, text_field=s.text_field,
            mode=s.mode, seed=s.seed, reserved=reserved,
        )  # fmt: skip

    def finished_profile(self) -> Profile | None:
        """The profile stage's result when it finished in an earlier run (else None: profile)."""
        from moa_compress.profile import ProfileError, load_profile

        folder = self.state.root / "profile"
        if not self.state.done("profile"):
            return None
        try:
            profile = load_profile(folder)
        except ProfileError:
            return None  # damaged or missing: profile again (finished samples are still reused)
        _say(self.progress, f"profile: reusing {folder}")
        self.resumed.add("profile")
        return profile

    def profile_stage(self, record: Mapping[str, Any]) -> Profile:
        """Profile the calibration samples (data-parallel under torchrun: the other ranks are in
        :func:`_join_profile`), then save the profile and mark the stage done."""
        from moa_compress.profile import broadcast_samples, profile_model, save_profile

        self.state.mark("profile", done=False)
        s = self.settings
        calibration = broadcast_samples(self.calibration_samples(), s.samples_per_length())
        profile = profile_model(
            self.model,
            calibration,
            block_size=s.block_size,
            work_dir=self.state.root / "profile-samples",
            progress=self.progress,
            force=self.force,
            provenance=record,
        )
        save_profile(profile, self.state.root / "profile", force=True)
        self.state.mark("profile", done=True)
        return profile

    def gates_stage(self, profile: Profile) -> GateStage:
        """Train one gate per layer on the profile's calibration samples (their pooled Q/K and targets
        kept in ``work/gates-samples``, so an interrupted run resumes without the dense forwards), save
        them in ``work/gates`` and mark the stage done; a finished stage is read back instead."""
        from moa_compress.gates import (
            GATES_FILE,
            GateError,
            GateSettings,
            held_out_gates,
            load_gates_with_folds,
            save_gates,
            train_gates,
        )

        folder = self.state.root / GATES_DIR
        if self.state.done("gates"):
            try:
                gates, fold_gates, fold_of = load_gates_with_folds(folder, self.model)
                record = read_json(folder / GATES_FILE)
            except GateError:
                pass  # damaged: train again (the samples' targets are still reused)
            else:
                _say(self.progress, f"gates: reusing {folder}")
                self.resumed.add("gates")
                return GateStage(gates, _gate_losses(record), held_out_gates(fold_gates, fold_of))
        self.state.mark("gates", done=False)
        s = self.settings
        samples = self.calibration_samples()
        count = sum(len(v) for v in samples.values())
        folds = min(s.gate_folds, count)
        if folds == 1 < s.gate_folds:  # what --gate-folds asked for cannot be done: say so once
            print("note: one calibration sample: gate rules are costed on it in-sample (cross-fitting needs two)",
                  file=sys.stderr)  # fmt: skip
        elif folds < s.gate_folds:
            print(f"note: --gate-folds {s.gate_folds} with {count} calibration samples: {folds} folds, one sample each",
                  file=sys.stderr)  # fmt: skip
        crossfit = (
            f", and {folds} more sets each without one fold of them to cost the rules" if folds > 1 else ""
        )
        extra = self.gate_extra_samples()
        more = sum(len(v) for v in extra.values())
        more_text = f" and {more} extra sample(s) that only train them" if more else ""
        _say(
            self.progress,
            f"gates: training one gate per layer on {count} calibration sample(s){more_text}{crossfit}",
        )
        recipe = GateSettings(
            block_size=s.block_size, gate_dim=s.gate_dim, steps=s.gate_steps, weight_decay=s.gate_weight_decay,
            seed=s.seed,
        )  # fmt: skip
        trained = train_gates(
            self.model,
            samples,
            recipe,
            work_dir=self.state.root / GATE_SAMPLES_DIR,
            progress=self.progress,
            folds=folds,
            extra=extra,
        )
        path = save_gates(trained, folder, force=True)
        self.state.mark("gates", done=True)
        _say(self.progress, f"gates: KL per row {trained.initial_loss:.4f} -> {trained.losses[-1]:.4f}")
        for f, losses in enumerate(trained.fold_losses):
            _say(
                self.progress,
                f"gates without fold {f + 1}: KL per row {losses['train']:.4f} on their samples, "
                f"{losses['held_out']:.4f} on the fold's",
            )
        return GateStage(trained.gates, _gate_losses(read_json(path)), trained.sample_gates())

    def search_stage(self, profile: Profile, record: Mapping[str, Any], gates: GateStage | None = None):
        from moa_compress.search import search_plan

        path = self.state.root / SEARCH_FILE
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
        ranking = s.prefill_ranking
        rankings = (
            self.sample_rankings(ranking.samples) if ranking is not None and gates is not None else None
        )
        result = search_plan(
            profile,
            s.budget,
            extend_lengths=s.extend_lengths,
            per_head=s.per_head,
            rules=s.rules,
            gates=gates.gates if gates is not None else None,
            gate_samples=calibration_maps(self.state.root, profile, rankings) if gates is not None else None,
            cost_gates=gates.cost_gates if gates is not None else None,
            gate_locals=s.gate_locals,
            gate_tails=s.gate_tails,
            min_span=s.min_span,
            kv_budget=s.kv_budget,
            cost=s.cost,
            pareto_size=s.pareto_size,
            progress=self.progress,
            provenance=record,
            ranking=ranking,
        )
        save_search_stage(result, path)
        self.state.mark("search", done=True)
        # What later stages see is what a resumed run reads back: the same plans either way.
        return load_search_stage(path)

    def sample_rankings(self, samples: int) -> dict[int, list[dict[str, Any]]]:
        """Per length, each calibration sample's prompt-ranking scores by ``samples`` sampled queries per
        block (:func:`moa_compress.gate_runtime.sample_rankings`; one dense forward each), kept in
        ``work/gates-samples/sampled-R`` so an interrupted run resumes without them."""
        from moa_compress.data import model_digest, progress_steps
        from moa_compress.gate_runtime import sample_rankings
        from moa_compress.gates import load_sample_tensors, save_sample_tensors

        key = {"model_weights": model_digest(self.model), "block_size": self.settings.block_size,
               "samples": samples}  # fmt: skip
        folder = self.state.root / GATE_SAMPLES_DIR / f"sampled-{samples}"
        calibration = self.calibration_samples()
        total = sum(len(v) for v in calibration.values())
        out: dict[int, list[dict[str, Any]]] = {}  # [N][i]: "sampled.{layer}" -> [Hkv, nB, nB]
        _say(
            self.progress,
            f"search: scoring {total} calibration sample(s) by {samples} sampled queries per block",
        )
        with progress_steps(self.progress, total, "sampled rankings") as step:
            for n in sorted(calibration):
                for i, sample in enumerate(calibration[n]):
                    path = folder / str(n) / f"sample-{i:04d}.safetensors"
                    found = load_sample_tensors(path, key)
                    if found is None:
                        found = sample_rankings(
                            self.model, sample.input_ids, self.settings.block_size, samples
                        )
                        save_sample_tensors(path, found, key)
                    out.setdefault(n, []).append(found)
                    step(f"sampled rankings at {n} tokens ({i + 1}/{len(calibration[n])})")
        return out

    def validate_stage(self, profile: Profile, result) -> dict[str, Any]:
        from moa_compress.evaluate import uniform_baseline

        s = self.settings
        lengths = list(profile.lengths)
        path = self.state.root / "validation.json"
        names = sorted(result.alternatives)
        shape = {"lengths": lengths, "samples": s.validation_samples, "points": len(result.points)}
        record = read_json(path) if self.state.recorded.get("validate") else None
        if (
            not isinstance(record, dict)
            or any(record.get(k) != v for k, v in shape.items())
            or sorted(record.get("alternatives", {})) != names
        ):
            record = {**shape, "seed": s.seed + VALIDATION_SEED_OFFSET, "loss": {}}
        losses: dict[str, float] = record["loss"]  # "<variant>@<length>" -> held-out loss (mean over samples)
        variants = ("uniform", "fallback", *names)
        if self.state.done("validate") and all(f"{name}@{n}" in losses for name in variants for n in lengths):
            _say(self.progress, f"validate: reusing {path}")
            self.resumed.add("validate")
        self.state.mark("validate", done=False)

        held_out: dict[int, list] = {}

        def measure(name: str, plan: Plan | None, n: int, label: str) -> None:
            key = f"{name}@{n}"
            if key in losses:
                return
            if not held_out:
                counts = dict.fromkeys(lengths, s.validation_samples)
                held_out.update(self.calibration(lengths, counts, record["seed"], held_out=True))
            _say(self.progress, f"validate: held-out loss of {label} at {n} tokens")
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
        # The plan a user gets if no searched plan beats it: one window for every head, within the
        # budget at every target length. Validated like the Pareto plans, never handed out worse.
        self.fallback = self.fallback_plan(result)
        record["fallback"] = {
            "rule": _rule_name(self.fallback),
            "density": {str(n): self.fallback.density(n) for n in result.lengths},
            "kv_fraction": self.fallback.kv_fraction(result.lengths[-1]),
        }
        for n in lengths:
            measure("fallback", self.fallback, n, f"uniform within the budget ({record['fallback']['rule']})")
        # The optima of static rules alone and of gate rules alone: a mix must beat both to be written.
        # One that is also a Pareto plan shares that plan's losses instead of being run again.
        record["alternatives"] = {}
        for name in names:
            plan = result.alternatives[name].plan
            same = next((i for i, p in enumerate(result.points) if p.plan.rules == plan.rules), None)
            record["alternatives"][name] = {"same_as_point": same}
            for n in lengths:
                if same is not None:
                    losses.setdefault(f"{name}@{n}", losses[f"plan-{same}@{n}"])
                measure(name, plan, n, f"the {name} optimum")
        atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
        self.state.mark("validate", done=True)
        scores = {
            "searched": validation_score(losses, f"plan-{best}", lengths),
            "uniform": validation_score(losses, "fallback", lengths),
            **{name: validation_score(losses, name, lengths) for name in names},
        }
        eligible = [w for w in WRITTEN if w in scores]
        kv_budget = self.settings.kv_budget
        if kv_budget is not None and record["fallback"]["kv_fraction"] > kv_budget + 1e-9:
            eligible.remove("uniform")  # its window holds more keys than the kv budget allows
        written = min(eligible, key=lambda w: (scores[w], WRITTEN.index(w)))
        return {**record, "chosen": best, "written": written, "scores": scores}

    def fallback_plan(self, result) -> Plan:
        from moa_compress.evaluate import plan_sink_blocks
        from moa_compress.plan import uniform_plan

        first = result.points[0].plan
        return uniform_plan(
            first.model,
            self.settings.budget,
            result.lengths,
            first.block_size,
            sink_blocks=plan_sink_blocks(first),
            provenance=first.provenance,
        )

    def loss(self, plan: Plan | None, samples) -> float:
        """Mean over ``samples`` of each one's loss: a prose window (hundreds of scored tokens) and an
        answer (a few dozen) count alike, as they do in the profile."""
        from moa_compress.profile import answer_loss
        from moa_compress.runtime import apply_plan

        def mean_loss() -> float:
            return sum(answer_loss(self.model, [sample]) for sample in samples) / len(samples)

        if plan is None:
            return mean_loss()
        with apply_plan(self.model, plan, backend=self.settings.backend):
            return mean_loss()


def _rule_name(plan: Plan) -> str:
    from moa_compress.plan import describe_rule

    return describe_rule(plan.rules[plan.model.planned_layers[0]][0])


def validation_score(losses: Mapping[str, float], name: str, lengths: Sequence[int]) -> float:
    """Mean over ``lengths`` of variant ``name``'s held-out loss divided by dense's."""
    return sum(losses[f"{name}@{n}"] / losses[f"dense@{n}"] for n in lengths) / len(lengths)


def _best_point(losses: Mapping[str, float], count: int, lengths: Sequence[int]) -> int:
    """The Pareto point with the lowest validation score; ties go to the lower predicted cost (index)."""
    return min(range(count), key=lambda i: (validation_score(losses, f"plan-{i}", lengths), i))


def _chosen_plan(result, validation: Mapping[str, Any], fallback: Plan) -> Plan:
    """The plan to write — the best-validated Pareto point's, or ``fallback`` (the uniform plan within
    the budget) where that validated better — its Pareto entries carrying their validation losses."""
    from moa_compress.search import with_choice

    index, written = validation["chosen"], validation["written"]
    if written == "searched":
        plan = with_choice(result, index)
    elif written == "uniform":
        plan = fallback
    else:
        plan = result.alternatives[written].plan
    record = json.loads(json.dumps(dict(plan.provenance)))
    losses, lengths = validation["loss"], validation["lengths"]
    for i, entry in enumerate(record.get("pareto", [])):
        entry["validation_score"] = validation_score(losses, f"plan-{i}", lengths)
        entry["chosen"] = entry.get("chosen", False) and validation["written"] == "searched"
    record["validation"] = {
        "written": written,
        "why": _why(validation),
        "scores": validation["scores"],
        "fallback": {**validation["fallback"], "score": validation_score(losses, "fallback", lengths)},
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
# Summary


_LABELS = {
    "searched": "the best searched plan",
    "uniform": "the uniform plan within the budget",
    "static-only": "the static-only optimum",
    "gate-only": "the gate-only optimum",
}


def _why(validation: Mapping[str, Any]) -> str:
    """One sentence: which validated candidate was written and what it beat (scores: loss vs dense)."""
    scores, written = validation["scores"], validation["written"]
    others = ", ".join(
        f"{_LABELS[name]} {_relative(score, 1.0)}" for name, score in scores.items() if name != written
    )
    return (
        f"{_LABELS[written]} validated best ({_relative(scores[written], 1.0)} held-out loss vs "
        f"dense; {others})"
    )


def _summary(
    settings, profile, result, validation, written, results, seconds, command, work, eval_source, gates=None
) -> dict[str, Any]:
    index = validation["chosen"]
    kind = validation["written"]
    point = result.points[index] if kind in ("searched", "uniform") else result.alternatives[kind]
    losses, lengths = validation["loss"], validation["lengths"]

    def per_length(name: str) -> dict[str, float]:
        return {str(n): losses[f"{name}@{n}"] for n in lengths}

    if results is None:
        closing_eval: dict[str, Any] = {"skipped": eval_source}
    else:
        closing_eval = {
            "lengths": results["settings"]["lengths"],
            "limit": results["settings"]["limit"],
            "data": results["settings"]["data"],
            "ppl": {
                variant: {n: v["ppl"] for n, v in results["results"][variant].get("ppl", {}).items()}
                for variant in ("dense", "plan", "uniform")
            },
            "fidelity": {
                variant: results["results"][variant].get("fidelity", {}) for variant in ("plan", "uniform")
            },
        }
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "command": command,
        "model": profile.model.to_dict(),
        "settings": {**dataclasses.asdict(settings), "lengths": list(settings.lengths)},
        "budget": settings.budget,
        "lengths": list(result.lengths),
        "profiled_lengths": list(profile.lengths),
        "profile_samples": {str(n): profile.samples[n] for n in profile.lengths},
        "rules": list(settings.rules),
        "gates": None if gates is None else gates.losses,
        "chosen": index,
        "written": kind,
        "why": _why(validation),
        "density": {str(n): written.density(n) for n in result.lengths},
        "kv_fraction": {  # the decode cache's keys at the longest length, against dense
            "length": result.lengths[-1],
            "value": written.kv_fraction(result.lengths[-1]),
            "budget": settings.kv_budget,
        },
        "predicted_cost": {} if kind == "uniform" else {str(n): c for n, c in point.predicted_cost.items()},
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
            "fallback": {
                "loss": per_length("fallback"),
                "score": validation_score(losses, "fallback", lengths),
                "rule": validation["fallback"]["rule"],
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
            "alternatives": {
                name: {
                    "loss": per_length(name),
                    "score": validation_score(losses, name, lengths),
                    "mean_predicted_cost": alternative.mean_cost,
                    "density": {str(n): d for n, d in alternative.density.items()},
                    "same_as_point": validation["alternatives"][name]["same_as_point"],
                }
                for name, alternative in result.alternatives.items()
            },
        },
        "eval": closing_eval,
        "seconds": seconds,
        "work_dir": str(work),
        "files": {
            "plan": PLAN_FILE,
            "report": "report.md",
            **({} if results is None else {"results": "results.json"}),
        },
    }


def _relative(value: float, base: float) -> str:
    if not math.isfinite(value) or not math.isfinite(base) or base == 0:
        return ""
    return f"{100 * (value - base) / abs(base):+.1f}%"


def summary_table(summary: Mapping[str, Any]) -> str:
    """The closing table: budget; density at each target length; predicted cost; validation losses of
    dense, the uniform baseline at the same density, the candidates and the written plan; eval
    perplexities. Reads schema 3 summaries too."""
    v = summary["validation"]
    written = summary["written"]
    alternatives = v.get("alternatives", {})
    basis = (
        f"held-out loss relative to dense, mean over {len(v['lengths'])} length(s), "
        f"{v['samples']} sample(s) each"
    )
    if written == "uniform":
        headline = (
            f"budget {summary['budget']:g}: wrote the uniform plan ({v['fallback']['rule']} for every head), "
            f"not a searched one: it validated better than all {len(v['points'])} Pareto plans ({basis}: "
            f"{_relative(v['fallback']['score'], 1.0)} vs the best searched plan's {_relative(v['score'], 1.0)})"
        )
    elif written in alternatives:
        headline = (
            f"budget {summary['budget']:g}: wrote {_LABELS[written]}, not a mixed Pareto plan: it validated "
            f"better than all {len(v['points'])} Pareto plans ({basis}: "
            f"{_relative(alternatives[written]['score'], 1.0)} vs the best searched plan's "
            f"{_relative(v['score'], 1.0)})"
        )
    else:
        headline = f"budget {summary['budget']:g}: chose Pareto plan {summary['chosen']} of {len(v['points'])} (lowest {basis})"
    lines = [headline]
    if summary.get("why"):
        lines.append(f"why: {summary['why']}")
    lines += ["", f"{'length':>8}  {'density':>8}  {'predicted cost':>14}"]
    for n, d in summary["density"].items():
        cost = summary["predicted_cost"].get(n)
        missing = "(uniform)" if written == "uniform" else "(extended)"
        lines.append(f"{n:>8}  {d:>8.4f}  {missing if cost is None else f'{cost:.4f}':>14}")
    if summary.get("model", {}).get("windows"):
        lines.append(f"(density{ModelIdentity.from_dict(summary['model']).windows_note()})")
    kv = summary.get("kv_fraction")
    if kv:
        limit = "" if kv["budget"] is None else f" (kv budget {kv['budget']:g})"
        lines.append(
            f"decode cache at {kv['length']} tokens: {kv['value']:.3f} of a dense cache's keys{limit}"
        )
    lengths = [str(n) for n in v["lengths"]]
    densities = ", ".join(f"{v['uniform']['density'][n]:.3f}" for n in lengths)

    def row(label: str, loss: Mapping[str, float], score: float | None = None) -> str:
        tail = "" if score is None else f"{_relative(score, 1.0):>10}"
        return f"{label:<24}" + "".join(f"{loss[n]:>10.4f}" for n in lengths) + tail

    lines += [
        "",
        f"{'validation loss':<24}" + "".join(f"{n:>10}" for n in lengths) + f"{'vs dense':>10}",
        row("dense", v["dense"]),
        row("uniform", v["uniform"]["loss"], v["uniform"]["score"]),
        row("uniform within budget", v["fallback"]["loss"], v["fallback"]["score"]),
        row("best searched plan", v["plan"], v["score"]),
        *(row(f"{name} optimum", alt["loss"], alt["score"]) for name, alt in alternatives.items()),
        f"(uniform at density {densities}; vs dense: mean over lengths of the loss ratio)",
    ]
    if v["uniform"]["score"] < v["score"]:
        lines.append("note: the uniform baseline beats every searched plan on the held-out samples")
    if written == "uniform":
        lines.append("the uniform plan within the budget was written (plan.json); eval rows are for it")
    elif written in alternatives:
        lines.append(f"{_LABELS[written]} was written (plan.json); eval rows are for it")
    gates = summary.get("gates")
    if gates:
        lines.append(
            f"gates: KL per query-block row {gates['initial']:.4f} -> {gates['final']:.4f} "
            f"after {gates['steps']} steps"
            + (
                f" (with {sum(gates['extra_samples'].values())} extra training samples)"
                if gates.get("extra_samples")
                else ""
            )
        )
        if gates.get("fold_losses"):
            held = ", ".join(f"{f['held_out']:.4f}" for f in gates["fold_losses"])
            lines.append(f"gate rules costed by {len(gates['fold_losses'])} gate sets each without one fold "
                         f"of the samples (KL per row on the fold left out: {held})")  # fmt: skip
    ppl = summary["eval"].get("ppl", {})
    if "skipped" in summary["eval"]:
        lines += ["", f"eval skipped: {summary['eval']['skipped']}"]
    if ppl.get("dense"):
        lines += ["", f"{'eval perplexity':<16}" + "".join(f"{n:>10}" for n in ppl["dense"])]
        for variant in ("dense", "uniform", "plan"):
            label = "chosen plan" if variant == "plan" else variant
            lines.append(f"{label:<16}" + "".join(f"{ppl[variant][n]:>10.3f}" for n in ppl["dense"]))
        lines.append(f"({summary['eval']['limit']} window(s) per length of {summary['eval']['data']})")
    return "\n".join(lines)


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """Read ``compress.json`` from a finished run's folder (schema 3 or 4; a schema 3 summary reads as
    one with static and dense rules, no gates and no alternatives)."""
    path = Path(out_dir) / SUMMARY_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema_version") not in READABLE_SUMMARY_VERSIONS:
        raise CompressError(f"{path} is missing or not a compress summary")
    if data["schema_version"] == 3:
        data.setdefault("rules", ["static", "dense"])
        data.setdefault("gates", None)
        data["validation"].setdefault("alternatives", {})
    return data


__all__ = [
    "PRESETS",
    "CompressError",
    "CompressResult",
    "CompressSettings",
    "GateStage",
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
