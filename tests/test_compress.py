"""The compress job on a tiny model: outputs, budget, resume after interruption, stale work, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

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
    assert validation["lengths"] == [256, 512] and validation["samples"] == 1
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
        if calls["loss"] > 2:
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
    # less the two saved
    assert calls["loss"] == -100 + 2 * (points + 3) - 2
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
    assert "skipped" in report and "--eval-data" in report and "validation answer loss" in report
    assert "skipped" in load_summary(tmp_path / "o")["eval"]
    with pytest.raises(CompressError, match="not both"):
        compress(model, tokenizer, settings(None), tmp_path / "p", seed=3)


def test_presets_and_overrides():
    assert PRESETS["full"]["lengths"] == (2048, 4096, 8192) and PRESETS["full"]["samples"] == (6, 2, 1)
    fast = preset_settings("fast", 0.25)
    assert fast.lengths == PRESETS["fast"]["lengths"] and fast.budget == 0.25
    custom = preset_settings("full", 0.3, lengths=[4096, 1024], seed=None, mode="plain")
    assert custom.lengths == (1024, 4096) and custom.samples == (1, 2) and custom.mode == "plain"
    assert custom.seed == 0  # None means "not given"
    assert preset_settings("full", 0.3, lengths=[8192, 2048]).samples == (6, 1)
    assert preset_settings("full", 0.3, samples=3).samples == (3, 3, 3)
    with pytest.raises(CompressError, match="--preset"):
        preset_settings("huge", 0.3)
    with pytest.raises(CompressError, match="2 counts for 3 lengths"):
        preset_settings("full", 0.3, samples=(1, 1))
    assert dataclasses.replace(fast, seed=3).seed == 3

    identity = ModelIdentity("tiny", 1, 2, 1, 16, "0")
    influence = {n: torch.zeros(1, 2, n // 32, n // 32) for n in (256, 512)}
    recipe = {"data": "notes.txt", "mode": "plain", "seed": 4, "answer_tokens": 8}
    profile = Profile(identity, 32, influence, {256: 3, 512: 1}, provenance=recipe)
    reused = preset_settings("full", 0.5, profile=profile, seed=5)
    assert (reused.lengths, reused.samples, reused.block_size) == ((256, 512), (3, 1), 32)
    assert (reused.data, reused.mode, reused.seed, reused.answer_tokens) == ("notes.txt", "plain", 5, 8)


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
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
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
