"""The compress job on a tiny model: outputs, budget, resume after interruption, stale work, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from moa_compress import profile as profile_module
from moa_compress.pipeline import (
    PRESETS,
    CompressError,
    CompressSettings,
    StaleWorkError,
    compress,
    load_summary,
    preset_settings,
)
from moa_compress.plan import ModelIdentity, load_plan, rule_block_mask
from moa_compress.profile import Profile, load_profile
from tests.factories import tiny_bpe_tokenizer, tiny_model

MODEL = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 512, "max_pos": 1024}
SETTINGS = {
    "budget": 0.5,
    "lengths": (256, 512),
    "samples": (2, 1),
    "answer_tokens": 4,
    "block_size": 32,
    "extend_lengths": (1024,),
    "dtype": "float32",
    "eval_limit": 1,
    "rules": ("static", "dense"),  # today's search; the gate tests below ask for gates
    "gate_steps": 20,
}


def text_file(folder):
    path = folder / "text.txt"
    sentences = (f"The fox number {i} jumps over the lazy dog and runs to the river." for i in range(300))
    path.write_text(" ".join(sentences))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One answer cache for the module (the tests must not touch the user's)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_COMPRESS_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", **MODEL)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("text"))


def settings(eval_text, **changes):
    return CompressSettings(**{**SETTINGS, "eval_data": eval_text and str(eval_text), **changes})


@pytest.fixture(scope="module")
def finished(cache, model, tokenizer, eval_text, tmp_path_factory):
    """One uninterrupted run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = compress(model, tokenizer, settings(eval_text), out, progress=False)
    return out, result


def token_density(rule, n, block_size):
    """Fraction of causal (query, key) token pairs a rule keeps, counted token by token."""
    blocks = rule_block_mask(rule, n, block_size)
    tokens = blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return float((tokens & causal).sum()) / float(causal.sum())


def test_end_to_end_writes_plan_report_summary_within_budget(finished, model):
    out, result = finished
    for name in ("plan.json", "report.md", "results.json", "compress.json"):
        assert (out / name).is_file(), name
    plan = load_plan(out, model)
    assert plan.rules == result.plan.rules
    for n in (256, 512, 1024):  # profiled and extended
        heads = [rule for layer in plan.rules for rule in layer]
        density = sum(token_density(rule, n, 32) for rule in heads) / len(heads)
        assert density <= 0.5 + 1e-9
        assert density == pytest.approx(plan.density(n), abs=1e-12)

    summary = load_summary(out)
    assert summary == json.loads(json.dumps(result.summary))
    assert set(summary["density"]) == {"256", "512", "1024"}
    assert set(summary["predicted_cost"]) == {"256", "512"}  # only profiled lengths have a cost
    validation = summary["validation"]
    assert validation["lengths"] == [256, 512] and validation["samples"] == 2  # an answer and a prose window
    # the score: mean over the profiled lengths of the loss relative to dense, recomputed here
    dense = validation["dense"]
    scores = [sum(p["loss"][n] / dense[n] for n in ("256", "512")) / 2 for p in validation["points"]]
    assert [p["score"] for p in validation["points"]] == pytest.approx(scores)
    assert validation["score"] == min(scores) and scores[summary["chosen"]] == min(scores)
    assert validation["plan"] == validation["points"][summary["chosen"]]["loss"]
    uniform = validation["uniform"]
    for n in (256, 512):
        assert abs(uniform["density"][str(n)] - plan.density(n)) <= 2 * 32 * n / (n * (n + 1) / 2)
    assert all(summary["seconds"][stage] is not None for stage in ("profile", "search", "validate", "eval"))

    provenance = plan.provenance
    assert [e["chosen"] for e in provenance["pareto"]] == [i == summary["chosen"] for i in range(len(scores))]
    assert [e["validation_score"] for e in provenance["pareto"]] == pytest.approx(scores)
    assert provenance["validation"]["loss"]["dense"] == validation["dense"]
    report = (out / "report.md").read_text()
    assert "Pareto" in report and "Perplexity" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]["plan"]) == {"ppl", "fidelity"}
    assert results["settings"]["lengths"] == [256, 512]


def test_rerun_with_force_resumes_every_stage(finished, model, tokenizer, eval_text, monkeypatch):
    out, first = finished
    calls = []
    monkeypatch.setattr(profile_module, "_profile_one", lambda *a: calls.append(a) or 1 / 0)
    again = compress(model, tokenizer, settings(eval_text), out, force=True, progress=False)
    assert calls == []
    assert again.plan.rules == first.plan.rules
    assert all(again.summary["seconds"][stage] is None for stage in ("profile", "search", "validate"))


def test_interrupted_run_resumes_to_the_same_plan(
    finished, model, tokenizer, eval_text, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real_profile, real_loss = profile_module._profile_one, profile_module.answer_loss
    calls = {"profile": 0, "loss": 0}

    def profile_then_stop(*args):
        calls["profile"] += 1
        if calls["profile"] > 1:
            raise KeyboardInterrupt
        return real_profile(*args)

    monkeypatch.setattr(profile_module, "_profile_one", profile_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compress(model, tokenizer, settings(eval_text), out, progress=False)
    assert len(list((out / "work" / "profile-samples").glob("*/sample-*.safetensors"))) == 1
    assert not (out / "plan.json").exists() and not (out / "compress.json").exists()

    # Resume: the finished sample is read back, the other two are profiled; stop again in validation.
    calls["profile"] = -100

    def loss_then_stop(*args):
        calls["loss"] += 1
        if calls["loss"] > 4:  # two measurements of two held-out samples each
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(profile_module, "answer_loss", loss_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compress(model, tokenizer, settings(eval_text), out, progress=False)
    assert calls["profile"] == -100 + 2
    assert len(json.loads((out / "work" / "validation.json").read_text())["loss"]) == 2

    calls["loss"] = -100
    result = compress(model, tokenizer, settings(eval_text), out, progress=False)
    points = len(result.summary["validation"]["points"])
    # dense, each point, uniform and the uniform plan within the budget at each of the 2 lengths,
    # less the two saved; each measurement scores the 2 held-out samples one by one
    assert calls["loss"] == -100 + 2 * (2 * (points + 3) - 2)
    assert calls["profile"] == -100 + 2
    assert result.summary["seconds"]["profile"] is None  # the finished profile was read back
    assert result.plan.rules == finished[1].plan.rules
    assert result.summary["validation"] == finished[1].summary["validation"]


def test_changed_settings_are_detected(finished, model, tokenizer, eval_text, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0] / "work", work)
    with pytest.raises(StaleWorkError, match=r"--budget changed \(0.5 -> 0.6\)"):
        compress(
            model, tokenizer, settings(eval_text, budget=0.6), tmp_path / "a", work_dir=work, progress=False
        )
    with pytest.raises(StaleWorkError, match=r"--seed changed \(0 -> 1\).*profile stage"):
        compress(model, tokenizer, settings(eval_text, seed=1), tmp_path / "a", work_dir=work, progress=False)
    assert not (tmp_path / "a").exists()

    # --force redoes the search (and what follows) but keeps the profile.
    forced = compress(
        model,
        tokenizer,
        settings(eval_text, budget=0.6),
        tmp_path / "b",
        work_dir=work,
        force=True,
        progress=False,
    )
    assert forced.summary["seconds"]["profile"] is None
    assert forced.summary["seconds"]["search"] is not None
    assert max(forced.summary["density"].values()) <= 0.6 + 1e-9
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["stages"]["search"]["settings"]["budget"] == 0.6


def test_reused_profile_gives_the_same_plan(finished, model, tokenizer, eval_text, tmp_path):
    out, first = finished
    profile = load_profile(out / "work" / "profile")
    reused = compress(
        model, tokenizer, settings(eval_text), tmp_path / "out", profile=profile, progress=False
    )
    assert reused.plan.rules == first.plan.rules
    assert not (tmp_path / "out" / "work" / "profile-samples").exists()

    with pytest.raises(CompressError, match="--profile holds lengths 256,512"):
        compress(
            model, tokenizer, settings(eval_text, lengths=(512,), samples=1), tmp_path / "x", profile=profile
        )
    other = tiny_model("llama", seed=1, **MODEL)
    with pytest.raises(CompressError, match="other weights"):
        compress(other, tokenizer, settings(eval_text), tmp_path / "x", profile=profile)
    assert not (tmp_path / "x").exists()


def test_the_uniform_plan_is_written_when_it_validates_better(
    finished, model, tokenizer, eval_text, tmp_path, monkeypatch
):
    """Never hand a user a plan that validates worse than the simple baseline: when the uniform plan
    within the budget has the lower held-out loss, it is what plan.json holds, and the summary says so."""
    from moa_compress import pipeline

    out, _ = finished
    summary = load_summary(out)
    assert (
        summary["written"] == "searched"
        or summary["validation"]["fallback"]["score"] < summary["validation"]["score"]
    )
    real = pipeline._Context.loss

    def fallback_wins(self, plan, samples):
        loss = real(self, plan, samples)
        return loss / 100 if plan is not None and plan == self.fallback else loss

    monkeypatch.setattr(pipeline._Context, "loss", fallback_wins)
    result = compress(model, tokenizer, settings(eval_text), tmp_path / "out", progress=False)
    plan = load_plan(tmp_path / "out", model)
    assert plan.rules == result.plan.rules and len({r for heads in plan.rules for r in heads}) == 1
    assert all(plan.density(n) <= 0.5 + 1e-9 for n in (256, 512, 1024))
    written = load_summary(tmp_path / "out")
    assert written["written"] == "uniform" and written["predicted_cost"] == {}
    assert written["validation"]["fallback"]["score"] < written["validation"]["score"]
    assert plan.provenance["validation"]["written"] == "uniform"
    assert not any(entry["chosen"] for entry in plan.provenance["pareto"])
    assert "wrote the uniform plan" in pipeline.summary_table(written)


def test_without_default_text_the_eval_is_skipped_and_the_plan_still_written(
    finished, model, tokenizer, tmp_path, monkeypatch, capsys
):
    """No --eval-data and no default text: the plan, a report saying why, and the summary; the budget
    form of the call (preset + overrides) gives the same plan as the settings object."""
    from moa_compress import evaluate

    out, first = finished
    monkeypatch.setattr(evaluate, "DEFAULT_DATA", tmp_path / "no-such-text")
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)  # finished stages: only the eval differs
    overrides = {k: v for k, v in SETTINGS.items() if k != "budget"}
    result = compress(model, tokenizer, SETTINGS["budget"], tmp_path / "o", work_dir=work, **overrides)
    assert result.plan.rules == first.plan.rules
    said = [line for line in capsys.readouterr().err.splitlines() if "eval skipped" in line]
    assert len(said) == 1 and "--eval-data" in said[0]
    assert (tmp_path / "o" / "plan.json").is_file() and not (tmp_path / "o" / "results.json").exists()
    report = (tmp_path / "o" / "report.md").read_text()
    assert "skipped" in report and "--eval-data" in report and "validation loss" in report
    assert "skipped" in load_summary(tmp_path / "o")["eval"]
    with pytest.raises(CompressError, match="not both"):
        compress(model, tokenizer, settings(None), tmp_path / "p", seed=3)


def test_presets_and_overrides(monkeypatch):
    assert PRESETS["full"]["lengths"] == (2048, 4096, 8192) and PRESETS["full"]["samples"] == (6, 2, 2)
    assert PRESETS["full"]["mode"] == "mixed" and PRESETS["full"]["validation_samples"] == 2
    fast = preset_settings("fast", 0.25)
    assert fast.lengths == PRESETS["fast"]["lengths"] and fast.budget == 0.25
    custom = preset_settings("full", 0.3, lengths=[4096, 1024], seed=None, mode="plain")
    assert custom.lengths == (1024, 4096) and custom.samples == (1, 2) and custom.mode == "plain"
    assert custom.seed == 0  # None means "not given"
    assert preset_settings("full", 0.3, lengths=[8192, 2048]).samples == (6, 2)
    assert preset_settings("full", 0.3, samples=3).samples == (3, 3, 3)
    with pytest.raises(CompressError, match="--preset"):
        preset_settings("huge", 0.3)
    with pytest.raises(CompressError, match="2 counts for 3 lengths"):
        preset_settings("full", 0.3, samples=(1, 1))
    assert dataclasses.replace(fast, seed=3).seed == 3
    # Extra gate samples: none in either preset; a preset's count at the lengths it names, 0 elsewhere.
    assert fast.gate_extra_samples == (0, 0) and preset_settings("full", 0.3).gate_extra_samples == (0, 0, 0)
    monkeypatch.setitem(PRESETS["full"], "gate_extra_samples", (24, 8, 4))
    assert preset_settings("full", 0.3, lengths=[4096, 1024]).gate_extra_samples == (0, 8)
    assert preset_settings("full", 0.3).gate_extra_samples == (24, 8, 4)
    assert preset_settings("full", 0.3, gate_extra_samples=2).gate_extra_samples == (2, 2, 2)
    with pytest.raises(CompressError, match="--gate-extra-samples gives 2 counts for 3 lengths"):
        preset_settings("full", 0.3, gate_extra_samples=(1, 1))
    with pytest.raises(CompressError, match="--gate-extra-samples must be whole numbers >= 0"):
        preset_settings("full", 0.3, gate_extra_samples=(1, -1, 0)).check()

    identity = ModelIdentity("tiny", 1, 2, 1, 16, "0")
    influence = {n: torch.zeros(1, 2, n // 32, n // 32) for n in (256, 512)}
    recipe = {"data": "notes.txt", "mode": "plain", "seed": 4, "answer_tokens": 8}
    profile = Profile(identity, 32, influence, {256: 3, 512: 1}, provenance=recipe)
    reused = preset_settings("full", 0.5, profile=profile, seed=5)
    assert (reused.lengths, reused.samples, reused.block_size) == ((256, 512), (3, 1), 32)
    assert (reused.data, reused.mode, reused.seed, reused.answer_tokens) == ("notes.txt", "plain", 5, 8)
    assert reused.gate_extra_samples == (0, 0)


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_runs_and_refuses_bad_input(cache, model_dir, eval_text, tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    base = [
        "compress",
        str(model_dir),
        "--budget",
        "0.5",
        "--out",
        str(out),
        "--lengths",
        "256,512",
        "--samples",
        "1",
        "--block-size",
        "32",
        "--dtype",
        "float32",
        "--eval-data",
        str(eval_text),
        "--no-progress",
        "--rules",
        "static,dense",
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    from moa_compress.profile import save_profile

    profile_dir = tmp_path / "profile"
    identity = ModelIdentity("tiny", 1, 2, 1, 16, "0")
    save_profile(Profile(identity, 32, {256: torch.zeros(1, 2, 8, 8)}, {256: 1}), profile_dir)
    cases = [
        (["--budget", "0"], "--budget must be in (0, 1]"),
        (["--budget", "1.5"], "--budget must be in (0, 1]"),
        (["--lengths", "2048"], "over the model's maximum positions (1024)"),
        (["--extend-lengths", "4096"], "--extend-lengths 4096 is over"),
        (["--data", str(empty)], "no non-empty text"),
        (["--budget", "0.05"], "below the smallest possible plan"),
        (["--samples", "1,2,3"], "3 counts for 2 lengths"),
        (["--mode", "chat"], "--mode"),
        (["--preset", "huge"], "--preset"),
        (["--profile", str(tmp_path / "nowhere")], "no profile at"),
        (["--rules", "dense"], "--rules must include static or gate"),
        (["--rules", "static,windows"], "unknown rule kind 'windows'"),
        (["--rules", "static,gate,dense", "--profile", str(profile_dir)], "drop --profile"),
        (["--gate-locals", "1,0"], "--gate-locals must"),
        (["--kv-budget", "0"], "--kv-budget must be in (0, 1]"),
        (["--validation-samples", "0"], "--validation-samples must be positive"),
        (["--kv-budget", "0.3", "--per-head"], "drop --per-head"),
        (["--gate-locals", "two"], "--gate-locals must"),
        (["--gate-tails", "0,-1"], "--gate-tails must"),
        (["--gate-tails", "last"], "--gate-tails must"),
        (["--gate-extra-samples", "1,2,3"], "--gate-extra-samples gives 3 counts for 2 lengths"),
        (["--gate-extra-samples", "2,-1"], "--gate-extra-samples must list whole numbers >= 0"),
        (["--gate-weight-decay", "-1"], "--gate-weight-decay must be a number >= 0"),
        (["--gate-weight-decay", "inf"], "--gate-weight-decay must be a number >= 0"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists(), extra  # nothing half-written

    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "budget 0.5: chose Pareto plan" in result.output and "chosen plan" in result.output
    assert load_summary(out)["command"].startswith("moa-compress")

    again = runner.invoke(app, base)
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    changed = runner.invoke(
        app, [*base, "--seed", "5", "--out", str(tmp_path / "other"), "--work", str(out / "work")]
    )
    assert changed.exit_code == 2 and "--seed changed (0 -> 5)" in changed.output


# ----------------------------------------------------------------------------------------------
# Gate rules

ALL_RULES = ("static", "gate", "dense")


@pytest.fixture(scope="module")
def gated(cache, model, tokenizer, eval_text, tmp_path_factory):
    """One run that may choose gate rules: a gates stage, gate candidates, alternatives validated."""
    out = tmp_path_factory.mktemp("gated") / "out"
    result = compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), out, progress=False)
    return out, result


def test_static_and_dense_rules_search_as_before(finished):
    """--rules static,dense is the search without gates: no gates stage, the plan search_plan gives the
    profile with its pre-gate defaults, nothing but the uniform fallback to compare with."""
    from moa_compress import pipeline
    from moa_compress.search import search_plan

    out, result = finished
    summary = load_summary(out)
    assert summary["rules"] == ["static", "dense"] and summary["gates"] is None
    assert summary["validation"]["alternatives"] == {} and summary["written"] in ("searched", "uniform")
    assert "gates" not in summary["seconds"] and not (out / "work" / "gates").exists()
    profile = load_profile(out / "work" / "profile")
    again = search_plan(profile, 0.5, extend_lengths=(1024,))  # no gates: static and dense
    assert [p.plan.rules for p in again.points] == [
        p.plan.rules for p in pipeline.load_search_stage(out / "work" / "search.json").points
    ]
    if summary["written"] == "searched":
        assert result.plan.rules == again.points[summary["chosen"]].plan.rules
    assert not any(r.input_dependent for heads in result.plan.rules for r in heads)


def test_gate_run_trains_gates_validates_every_candidate_and_writes_the_best(gated, model):
    from moa_compress.pipeline import WRITTEN, summary_table

    out, result = gated
    summary = load_summary(out)
    assert summary["schema_version"] == 4 and summary["rules"] == list(ALL_RULES)
    gates = summary["gates"]
    assert gates["steps"] == 20 and gates["final"] <= gates["initial"]
    assert set(gates["seconds"]) == {"targets", "training"} and summary["seconds"]["gates"] is not None
    assert (out / "work" / "gates" / "gates.json").is_file()
    # Gate rules were costed by cross-fitting: two more gate sets, each without one fold of the three
    # samples (dealt 256: [0, 1], 512: [0]).
    assert gates["cost_folds"] == 2 and len(gates["fold_losses"]) == 2
    assert "without one fold of the samples" in summary_table(summary)
    validation = summary["validation"]
    assert set(validation["alternatives"]) == {"static-only", "gate-only"}
    scores = {
        "searched": validation["score"],
        "uniform": validation["fallback"]["score"],
        **{name: alt["score"] for name, alt in validation["alternatives"].items()},
    }
    best = min(WRITTEN, key=lambda w: (scores[w], WRITTEN.index(w)))
    assert summary["written"] == best and summary["why"].startswith("the ")
    plan = load_plan(out, model)
    assert plan == result.plan and plan.provenance["validation"]["written"] == best
    assert all(plan.density(n) <= 0.5 + 1e-9 for n in (256, 512, 1024))
    # The search considered gate candidates and stored the gate plans' weights beside search.json.
    search = json.loads((out / "work" / "search.json").read_text())
    assert search["points"][0]["plan"]["provenance"]["search"]["gate_candidates"] > 0
    assert search["points"][0]["plan"]["provenance"]["search"]["gate_costs"] == "cross-fitted"
    gate_only = search["alternatives"]["gate-only"]
    assert gate_only["tensors"] and (out / "work" / "search.safetensors").is_file()
    assert any(r["kind"] == "gate" for heads in gate_only["plan"]["rules"] for r in heads)
    # A schema 3 summary (before gate rules) still reads.
    old = {k: v for k, v in summary.items() if k not in ("rules", "gates", "why")}
    old["schema_version"] = 3
    old["validation"] = {k: v for k, v in validation.items() if k != "alternatives"}
    folder = out.parent / "old"
    folder.mkdir()
    (folder / "compress.json").write_text(json.dumps(old))
    read = load_summary(folder)
    assert read["rules"] == ["static", "dense"] and read["validation"]["alternatives"] == {}


def test_the_gates_stage_resumes(gated, model, tokenizer, eval_text, tmp_path, monkeypatch):
    from moa_compress import gates as gates_module

    out, first = gated
    # A finished stage is read back: no training, no targets.
    monkeypatch.setattr(gates_module, "train_gates", lambda *a, **k: 1 / 0)
    again = compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), out, force=True, progress=False)
    assert again.plan == first.plan and again.summary["seconds"]["gates"] is None
    assert again.summary["gates"] == first.summary["gates"]
    monkeypatch.undo()

    # An unfinished stage trains again from the saved targets: no dense forward for them.
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    shutil.rmtree(work / "gates")
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["gates"]["done"] = False
    (work / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(gates_module, "sample_targets", lambda *a, **k: 1 / 0)
    resumed = compress(
        model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "o", work_dir=work, progress=False
    )
    assert resumed.summary["seconds"]["gates"] is not None
    assert (work / "gates" / "gates.safetensors").read_bytes() == (
        out / "work" / "gates" / "gates.safetensors"
    ).read_bytes()
    assert resumed.plan == first.plan

    # A search redone on read-back gates costs each sample with the gates of the fold that left it out.
    from moa_compress import search as search_module
    from moa_compress.gates import held_out_gates, load_gates_with_folds

    seen = {}
    real_costs = search_module.gate_costs

    def spy(*args, **kwargs):
        seen.update(kwargs["sample_gates"])
        return real_costs(*args, **kwargs)

    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["search"]["done"] = False
    (work / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(search_module, "gate_costs", spy)
    searched = compress(
        model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "s", work_dir=work, progress=False
    )
    monkeypatch.setattr(search_module, "gate_costs", real_costs)
    _, fold_gates, fold_of = load_gates_with_folds(work / "gates")
    expected = held_out_gates(fold_gates, fold_of)
    assert fold_of == {256: [0, 1], 512: [0]} and set(seen) == set(expected)
    for n, per_sample in expected.items():
        for got, want in zip(seen[n], per_sample, strict=True):
            assert all(torch.equal(a.k_proj, b.k_proj) for a, b in zip(got, want, strict=True))
    assert searched.plan.rules == first.plan.rules and searched.summary["seconds"]["search"] is not None

    # Other gate windows make the search stale (the gates stage stays).
    with pytest.raises(StaleWorkError, match=r"--gate-locals changed \(1,2,4,8 -> 1\).*search stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_locals=(1,)), tmp_path / "p",
                 work_dir=work, progress=False)  # fmt: skip

    # Offering dense tails makes the search stale too (the default, none, is not recorded).
    assert (
        "gate_tails" not in json.loads((work / "manifest.json").read_text())["stages"]["search"]["settings"]
    )
    with pytest.raises(StaleWorkError, match=r"--gate-tails changed \(0 -> 0,1\).*search stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_tails=(0, 1)), tmp_path / "p",
                 work_dir=work, progress=False)  # fmt: skip

    # Other gate settings make the gates stage (and what follows) stale.
    with pytest.raises(StaleWorkError, match=r"--gate-steps changed \(20 -> 5\).*gates stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_steps=5), tmp_path / "p",
                 work_dir=work, progress=False)  # fmt: skip
    with pytest.raises(StaleWorkError, match=r"--gate-folds changed \(2 -> 1\).*gates stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_folds=1), tmp_path / "p",
                 work_dir=work, progress=False)  # fmt: skip
    with pytest.raises(StaleWorkError, match=r"--gate-weight-decay changed \(3.0 -> 0.5\).*gates stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_weight_decay=0.5), tmp_path / "p",
                 work_dir=work, progress=False)  # fmt: skip
    # A search made before gate rules kept the band floor is stale.
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["stages"]["search"]["settings"].pop("gate_floor") == "the --min-span band"
    (work / "manifest.json").write_text(json.dumps(manifest))
    stale = r"floor of blocks per row changed \(none \(a search before gate floors\) -> the --min-span band\)"
    with pytest.raises(StaleWorkError, match=stale + r".*search stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "p", work_dir=work,
                 progress=False)  # fmt: skip
    # A work folder made before the setting was recorded trained its gates with a decay of 0.01.
    manifest = json.loads((work / "manifest.json").read_text())
    del manifest["stages"]["gates"]["settings"]["gate_weight_decay"]
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleWorkError, match=r"--gate-weight-decay changed \(0.01 -> 3.0\).*gates stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "p", work_dir=work,
                 progress=False)  # fmt: skip
    # --force redoes the gates with the new settings from the kept targets (sample_targets still fails).
    redone = compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, gate_folds=1, gate_weight_decay=0.5),
                      tmp_path / "p", work_dir=work, force=True, progress=False)  # fmt: skip
    assert json.loads((work / "gates" / "gates.json").read_text())["settings"]["weight_decay"] == 0.5
    assert redone.summary["gates"]["cost_folds"] == 1 and not redone.summary["gates"]["fold_losses"]
    assert redone.summary["seconds"]["gates"] is not None


def test_extra_gate_samples_train_the_gates_and_make_the_gates_stage_stale(
    gated, model, tokenizer, eval_text, tmp_path
):
    from moa_compress.gates import load_gates
    from moa_compress.pipeline import summary_table

    out, _ = gated
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    more = settings(eval_text, rules=ALL_RULES, gate_extra_samples=(2, 1))
    with pytest.raises(StaleWorkError, match=r"--gate-extra-samples changed \(none -> 2,1\).*gates stage"):
        compress(model, tokenizer, more, tmp_path / "p", work_dir=work, progress=False)
    result = compress(model, tokenizer, more, tmp_path / "p", work_dir=work, force=True, progress=False)
    record = json.loads((work / "gates" / "gates.json").read_text())
    assert record["extra_samples"] == {"256": 2, "512": 1} == result.summary["gates"]["extra_samples"]
    assert len(list((work / "gates-samples" / "extra").rglob("sample-*.safetensors"))) == 3
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["stages"]["gates"]["settings"]["gate_extra_samples"] == [2, 1]
    # Their prose avoids the validation's windows: more validation samples change the gates' text.
    with pytest.raises(StaleWorkError, match=r"--validation-samples changed \(2 -> 4\).*gates stage"):
        compress(model, tokenizer, dataclasses.replace(more, validation_samples=4), tmp_path / "q",
                 work_dir=work, progress=False)  # fmt: skip
    before, after = load_gates(out / "work" / "gates"), load_gates(work / "gates")
    assert not all(torch.equal(a.k_proj, b.k_proj) for a, b in zip(before, after, strict=True))
    assert "with 3 extra training samples" in summary_table(result.summary)


def test_one_calibration_sample_is_costed_in_sample_with_a_note(model, tokenizer, tmp_path, capsys):
    run = settings(None, rules=ALL_RULES, lengths=(256,), samples=(1,), extend_lengths=(), gate_steps=3)
    result = compress(model, tokenizer, run, tmp_path / "out", progress=False)
    assert "one calibration sample: gate rules are costed on it in-sample" in capsys.readouterr().err
    assert result.summary["gates"]["cost_folds"] == 1 and not result.summary["gates"]["fold_losses"]
    search = json.loads((tmp_path / "out" / "work" / "search.json").read_text())
    assert search["points"][0]["plan"]["provenance"]["search"]["gate_costs"] == "in-sample"


def test_a_model_with_sliding_window_layers_plans_its_full_layers_only(cache, tokenizer, eval_text, tmp_path):
    """Gemma-style: window layers 0 and 2 (40 tokens) stay the model's, every candidate (searched,
    alternatives, uniform) plans layers 1 and 3 within the budget counted over them, and the plan runs."""
    from moa_compress.pipeline import summary_table
    from moa_compress.plan import WindowRule
    from moa_compress.runtime import apply_plan

    model = tiny_model("gemma3", **{**MODEL, "layers": 4})
    run = settings(eval_text, rules=ALL_RULES)
    result = compress(model, tokenizer, run, tmp_path / "out", progress=False)
    plan = load_plan(tmp_path / "out", model)
    assert plan.model.windows == ((0, 40), (2, 40))
    assert plan.rules[0] == plan.rules[2] == (WindowRule(40),) * 4
    assert not any(r.model_fixed for layer in (1, 3) for r in plan.rules[layer])
    for n in (256, 512, 1024):
        heads = [rule for layer in (1, 3) for rule in plan.rules[layer]]
        assert sum(r.density(n, 32) for r in heads) / len(heads) == pytest.approx(plan.density(n))
        assert plan.density(n) <= 0.5 + 1e-9  # the windows are outside the budget
        assert plan.model_density(n) == pytest.approx((plan.density(n) + WindowRule(40).density(n, 32)) / 2)
    search = json.loads((tmp_path / "out" / "work" / "search.json").read_text())
    points = search["points"] + list(search["alternatives"].values())
    assert len(points) > 2 and all(
        p["plan"]["rules"][2][0] == {"kind": "window", "tokens": 40} for p in points
    )
    assert "2 sliding-window layers keep their window (40 tokens)" in summary_table(result.summary)
    assert "2 sliding-window layers keep their window" in (tmp_path / "out" / "report.md").read_text()
    with torch.no_grad():
        x = torch.randint(1, 512, (1, 200))
        dense = model(x).logits
        with apply_plan(model, plan):
            planned = model(x).logits
    assert torch.isfinite(planned).all() and (planned - dense).abs().max() > 0


def test_a_kv_budget_bounds_the_written_plans_decode_cache(gated, model, tokenizer, eval_text, tmp_path):
    """--kv-budget is a search setting: the saved profile and gates serve, the search and what follows
    run again, and the written plan (searched, an alternative or uniform) holds its decode cache within it."""
    from moa_compress.pipeline import summary_table

    out, first = gated
    longest = max(first.plan.lengths)
    assert first.summary["kv_fraction"] == {
        "length": longest, "value": first.plan.kv_fraction(longest), "budget": None,
    }  # fmt: skip
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    with pytest.raises(StaleWorkError, match=r"--kv-budget changed \(none -> 0.3\).*search stage"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, kv_budget=0.3), tmp_path / "o",
                 work_dir=work, progress=False)  # fmt: skip
    result = compress(model, tokenizer, settings(eval_text, rules=ALL_RULES, kv_budget=0.3), tmp_path / "o",
                      work_dir=work, force=True, progress=False)  # fmt: skip
    assert result.summary["seconds"]["gates"] is None  # read back, not trained again
    assert result.plan.kv_fraction(longest) <= 0.3 + 1e-9
    assert result.summary["kv_fraction"]["budget"] == 0.3
    assert f"decode cache at {longest} tokens" in summary_table(result.summary)
    assert "(kv budget 0.3)" in summary_table(result.summary)


def test_an_alternative_is_written_when_it_validates_best(
    gated, model, tokenizer, eval_text, tmp_path, monkeypatch
):
    """Never hand a user a mix that validates worse than one kind alone: when the gate-only optimum has
    the lowest held-out loss, plan.json is it, with its gates, and the summary says why."""
    from moa_compress import pipeline

    out, first = gated
    search = pipeline.load_search_stage(out / "work" / "search.json")
    gate_only = search.alternatives["gate-only"].plan
    assert first.summary["validation"]["alternatives"]["gate-only"]["same_as_point"] is None
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    (work / "validation.json").unlink()
    real = pipeline._Context.loss

    def gate_only_wins(self, plan, samples):
        loss = real(self, plan, samples)
        return loss / 100 if plan is not None and plan.rules == gate_only.rules else loss

    monkeypatch.setattr(pipeline._Context, "loss", gate_only_wins)
    result = compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "o", work_dir=work,
                      progress=False)  # fmt: skip
    plan = load_plan(tmp_path / "o", model)
    assert plan.rules == gate_only.rules and plan.gates is not None and plan.tensors
    summary = load_summary(tmp_path / "o")
    assert summary["written"] == "gate-only" and summary["why"].startswith(
        "the gate-only optimum validated best"
    )
    assert summary["predicted_cost"] == {
        str(n): c for n, c in search.alternatives["gate-only"].predicted_cost.items()
    }
    assert not any(entry["chosen"] for entry in plan.provenance["pareto"])
    assert "wrote the gate-only optimum" in pipeline.summary_table(summary)
    assert result.plan == plan


def test_gate_rules_need_the_profiles_own_samples(finished, model, tokenizer, eval_text, tmp_path):
    profile = load_profile(finished[0] / "work" / "profile")
    with pytest.raises(CompressError, match="drop --profile, or pass --rules static,dense"):
        compress(model, tokenizer, settings(eval_text, rules=ALL_RULES), tmp_path / "x", profile=profile)
    with pytest.raises(CompressError, match="--rules must include static or gate"):
        compress(model, tokenizer, settings(eval_text, rules=("dense",)), tmp_path / "x")
    with pytest.raises(CompressError, match="unknown rule kind 'window'"):
        settings(eval_text, rules=("static", "window")).check()
    assert not (tmp_path / "x").exists()


def test_the_gate_decay_bench_retrains_the_fold_gates_of_a_run(gated, monkeypatch, capsys):
    """bench/gate_decay.py trains each fold's gates as the gates stage does: at the run's own settings its
    last row is the held-out KL the run recorded for its fold gates."""
    import runpy

    out, _ = gated
    record = json.loads((out / "work" / "gates" / "gates.json").read_text())
    steps, decay = record["settings"]["steps"], record["settings"]["weight_decay"]
    script = Path(__file__).resolve().parents[1] / "bench" / "gate_decay.py"
    argv = [str(script), str(out / "work"), "--decays", f"{decay!r}", "--steps", str(steps), "--every", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    rows = [
        line.split("|")[1:-1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(f"| {decay:g} |")
    ]
    assert [int(r[1]) for r in rows] == list(range(5, steps + 1, 5))
    recorded = [fold["held_out"] for fold in record["folds"]["losses"]]
    assert float(rows[-1][3]) == pytest.approx(sum(recorded) / len(recorded), abs=2e-4)


def test_a_ranking_costs_gate_rules_under_it_and_the_plan_carries_it(gated, model, tokenizer, eval_text, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """--ranking sampled:R: the search stage is stale, then scores each calibration sample by sampled
    queries (kept in the work folder, reused when the search is redone) and writes plans that carry the
    ranking; gate rules cost differently under it."""
    from moa_compress import gate_runtime
    from moa_compress import search as search_module

    out, _ = gated
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)
    ranked = settings(eval_text, rules=ALL_RULES, ranking="sampled:2", ranking_layers=(1,))
    stale = r"--ranking / --ranking-layers changed \(gate -> sampled:2 in layers 1\).*search stage"
    with pytest.raises(StaleWorkError, match=stale):
        compress(model, tokenizer, ranked, tmp_path / "o", work_dir=work, progress=False)
    seen = []
    real_costs = search_module.gate_costs

    def spy(*args, **kwargs):
        seen.append(real_costs(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(search_module, "gate_costs", spy)
    result = compress(model, tokenizer, ranked, tmp_path / "o", work_dir=work, force=True, progress=False)
    assert sorted(p.name for p in (work / "gates-samples" / "sampled-2").iterdir()) == ["256", "512"]
    gates = result.plan.gates
    if gates is not None:
        assert (gates.ranking_samples, gates.ranking_layers) == (2, (1,))
    assert result.summary["settings"]["ranking"] == "sampled:2"
    search = json.loads((work / "search.json").read_text())
    carried = [p["plan"]["gates"] for p in search["points"] if p["plan"].get("gates")]
    assert carried and all(g["ranking_samples"] == 2 and g["ranking_layers"] == [1] for g in carried)
    # The same search again from the kept scores: no dense forward for them, the same costs.
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["search"]["done"] = False
    (work / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(gate_runtime, "sample_rankings", lambda *a, **k: 1 / 0)
    again = compress(model, tokenizer, ranked, tmp_path / "o2", work_dir=work, progress=False)
    assert again.plan.rules == result.plan.rules and again.plan.gates == result.plan.gates
    assert len(seen) == 2 and all((seen[0][n] == seen[1][n]).all() for n in seen[0])
    with pytest.raises(CompressError, match="ranks gate rules; add gate to --rules"):
        settings(eval_text, rules=("static", "dense"), ranking="sampled:2").check()
    with pytest.raises(CompressError, match="--ranking-layers needs --ranking sampled:R"):
        settings(eval_text, rules=ALL_RULES, ranking_layers=(1,)).check()
    with pytest.raises(
        CompressError,
        match="--ranking: ranking must be gate, sampled:R, sampled-layer:R or sampled-layer-all:R",
    ):
        settings(eval_text, rules=ALL_RULES, ranking="sampled").check()
    with pytest.raises(CompressError, match="sampled-layer:4: a layer-wide allocation is chosen at run time"):
        settings(eval_text, rules=ALL_RULES, ranking="sampled-layer:4").check()
    with pytest.raises(CompressError, match="chosen at run time"):
        settings(eval_text, rules=ALL_RULES, ranking="sampled-layer-all:4").check()
