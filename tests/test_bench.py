"""The benchmark programs run end to end on tiny sizes and reject bad options cleanly."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moa_compress.bench import attention_table, bench_attention
from moa_compress.cli import app


def test_bench_attention_rows_and_table():
    rows = bench_attention([512], ["float32"], [1.0, 0.5], ["torch"], repeats=1)
    assert [r["density"] for r in rows] == [1.0, 0.5]
    assert all(r["sdpa_s"] > 0 and r["torch_s"] > 0 for r in rows)
    assert rows[1]["exact_density"] <= 0.5
    assert abs(rows[1]["torch_ideal"] - rows[1]["torch_speedup"] * rows[1]["exact_density"]) < 1e-3
    table = attention_table(rows, ["torch"])
    assert table.count("\n") == 3 and "torch speedup" in table


def test_bench_attention_cli_json():
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "attention",
            "--lengths",
            "512",
            "--dtypes",
            "bfloat16",
            "--densities",
            "0.5",
            "--backends",
            "torch",
            "--repeats",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"][0]["n"] == 512 and "machine" in data


def test_bench_attention_cli_rejects_bad_options():
    runner = CliRunner()
    for args, message in [
        (["--dtypes", "float8"], "unknown dtype"),
        (["--backends", "cuda"], "unknown backend"),
        (["--densities", "0"], "densities must be in"),
        (["--lengths", "x"], "--lengths"),
    ]:
        result = runner.invoke(app, ["bench", "attention", "--lengths", "128", "--repeats", "1", *args])
        assert result.exit_code == 2, result.output
        assert message in result.stderr


def test_bench_prefill_and_decode_on_a_tiny_model():
    from moa_compress.bench import bench_decode, bench_prefill, decode_table, prefill_table
    from tests.factories import tiny_model

    model = tiny_model("llama")
    rows = bench_prefill(model, [512], density=0.5, backends=["torch"], repeats=1)
    assert rows[0]["n"] == 512 and rows[0]["density"] <= 0.5 and rows[0]["torch_s"] > 0
    assert "torch CPU-time speedup" in prefill_table(rows, ["torch"])
    rows = bench_decode(model, [1024], [0.5], [1, 3], steps=2, budget_bytes=1 << 20)
    by = {(r["variant"], r["batch"], r["budget_row"]): r for r in rows}
    dense, plan = by[("dense", 3, False)], by[("plan d=0.5", 3, False)]
    assert 0 < plan["kv_bytes"] < 0.75 * dense["kv_bytes"] and plan["ms_per_step"] > 0
    budget = {r["variant"]: r["batch"] for r in rows if r["budget_row"]}
    assert budget["plan d=0.5"] > budget["dense"]  # more sequences fit the same KV budget
    assert "tokens/s" in decode_table(rows)
    assert model.config._attn_implementation == "sdpa"  # plans removed afterwards


def test_bench_attention_gate_rows_and_decode_of_a_mixed_plan():
    from moa_compress.bench import BenchError, bench_decode
    from tests.factories import tiny_model
    from tests.test_gate_runtime import gated_plan, mixed

    rows = bench_attention([1024], ["float32"], [1.0, 0.25], ["torch"], repeats=1)
    assert "gate_select_s" not in rows[0] and rows[1]["gate_select_s"] > 0
    assert rows[1]["gate_density"] <= 0.25 and rows[1]["gate_speedup"] > 0
    assert rows[1]["sampled_samples"] == 4 and rows[1]["sampled_select_s"] > 0
    table = attention_table(rows, ["torch"])
    assert rows[1]["layer_samples"] == 16 and rows[1]["layer_select_s"] > 0 and rows[1]["layer_speedup"] > 0
    table = attention_table(rows, ["torch"])
    assert (
        "select / SDPA" in table and "sampled:4 select ms" in table and "sampled-layer:16 select ms" in table
    )
    with pytest.raises(BenchError, match="ranking-samples"):
        bench_attention([1024], ["float32"], [0.25], ["torch"], ranking_samples=-1)
    with pytest.raises(BenchError, match="layer-samples"):
        bench_attention([1024], ["float32"], [0.25], ["torch"], layer_samples=-1)
    bare = bench_attention(
        [1024], ["float32"], [0.25], ["torch"], repeats=1, ranking_samples=0, layer_samples=0
    )
    assert "sampled_select_s" not in bare[0] and "layer_select_s" not in bare[0]
    assert "sampled-layer" not in attention_table(bare, ["torch"])

    model = tiny_model("llama")
    plan = gated_plan(model, mixed(seed=2), seed=2)
    rows = bench_decode(model, [700], [0.5], [2], steps=2, budget_bytes=1 << 20, plans={"mixed": plan})
    mixed_rows = [r for r in rows if r["variant"] == "mixed"]
    assert mixed_rows and all(r["ms_per_step"] > 0 and r["kv_bytes"] > 0 for r in mixed_rows)

    # whole-model prefill of the same plan beside the uniform one; names must not shadow a column
    from moa_compress.bench import bench_prefill, prefill_table

    rows = bench_prefill(
        model, [700], 0.5, ["torch"], repeats=1, plans={"mixed": plan}, rankings=["sampled-layer:4"]
    )
    assert rows[0]["mixed_s"] > 0 and rows[0]["mixed_density"] == round(plan.density(700), 4)
    assert rows[0]["mixed+sampled-layer:4_s"] > 0 and rows[0]["mixed+sampled-layer:4_density"] > 0
    assert "mixed speedup" in prefill_table(rows, ["torch", "mixed", "mixed+sampled-layer:4"])
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(BenchError, match="collide"):
        bench_prefill(model, [700], 0.5, ["torch"], repeats=1, plans={"torch": plan})
    with pytest.raises(BenchError, match="at least one"):
        bench_prefill(model, [700], 0.5, [], repeats=1, plans={"mixed": plan})


def test_bench_prefill_refuses_a_ranking_without_a_plan_or_a_bad_one_in_one_line():
    args = ["bench", "prefill", "--lengths", "64", "--backends", "torch", "--repeats", "1"]
    for extra in (
        ["--ranking", "sampled-layer:4"],
        ["--plan", "smollm2-135m-instruct-b0.25", "--ranking", "x"],
    ):
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_bench_prefill_refuses_two_plans_of_one_name_in_one_line():
    """A shipped plan by name and by its plan.json would share a column: exit 2, one line."""
    from moa_compress.plan import shipped_plans

    name = "smollm2-135m-instruct-b0.25"
    args = ["bench", "prefill", "--lengths", "64", "--backends", "torch", "--repeats", "1"]
    args += ["--plan", name, "--plan", str(shipped_plans()[name])]  # its plan.json
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "two --plan values are both named" in result.stderr and "Traceback" not in result.output
