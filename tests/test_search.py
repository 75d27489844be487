"""The search: budget at every length, exact optimality on small cases, errors, provenance, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest
import torch

from moa_compress.plan import DenseRule, Plan, StaticRule, load_plan, rule_block_mask, rule_density
from moa_compress.report import pareto_points
from moa_compress.search import (
    COSTS,
    MIN_KEPT_MASS,
    SearchError,
    candidate_rules,
    default_min_span,
    minimum_density,
    rule_costs,
    search_plan,
    with_choice,
)
from tests.factories import random_profile

TOL = 1e-12


def lost_fraction(profile, rules_by_head, n):
    """Independent cost: dropped |E| over causal blocks, head by head, over all causal |E| at ``n``."""
    influence = profile.influence[n].double()
    nb = influence.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    total = influence[..., causal].sum()
    lost = 0.0
    for layer, heads in enumerate(rules_by_head):
        for head, rule in enumerate(heads):
            dropped = causal & ~rule_block_mask(rule, n, profile.block_size)
            lost += float(influence[layer, head][dropped].sum())
    return lost / float(total)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_holds_at_every_length_including_extended(per_head, budget):
    profile = random_profile(layers=3, heads=6, kv_heads=2, lengths=(512, 1024), seed=1)
    result = search_plan(profile, budget, extend_lengths=(2048, 4096), per_head=per_head, pareto_size=4)
    assert result.lengths == (512, 1024, 2048, 4096)
    assert result.points
    for point in result.points:
        plan = point.plan
        assert plan.budget == budget and plan.lengths == result.lengths
        assert plan.model == profile.model and plan.block_size == profile.block_size
        for n in result.lengths:
            # Recomputed from the rules alone, not from anything the search reported.
            independent = sum(rule_density(r, n, plan.block_size) for heads in plan.rules for r in heads) / 18
            assert independent <= budget + TOL
            assert plan.density(n) == pytest.approx(point.density[n], abs=1e-15)
        for n in profile.lengths:
            assert point.predicted_cost[n] == pytest.approx(lost_fraction(profile, plan.rules, n), abs=1e-12)
        if not per_head:  # the KV group's query heads share a rule
            assert all(heads[0] == heads[1] == heads[2] and heads[3] == heads[5] for heads in plan.rules)
    means = [p.mean_cost for p in result.points]
    assert means == sorted(means)
    assert len({p.plan.rules for p in result.points}) == len(result.points)


def test_budget_one_is_all_dense():
    profile = random_profile(lengths=(256,))
    result = search_plan(profile, 1.0, extend_lengths=(1024,))
    assert len(result.points) == 1
    point = result.points[0]
    assert point.plan.is_dense()
    assert point.predicted_cost == {256: 0.0}
    assert point.density == {256: 1.0, 1024: 1.0}


def test_budget_at_the_minimum_gives_the_smallest_plan():
    profile = random_profile(lengths=(256, 512))
    smallest = minimum_density((256, 512, 1024), 32)
    assert smallest[256] == pytest.approx(rule_density(StaticRule(1, 32, 0.0), 256, 32))
    budget = max(smallest.values())
    plan = search_plan(profile, budget, extend_lengths=(1024,)).points[0].plan
    narrowest = rule_block_mask(StaticRule(1, 32, 0), 256, 32)
    assert all(torch.equal(rule_block_mask(r, 256, 32), narrowest) for heads in plan.rules for r in heads)


def test_bad_budgets_and_below_minimum():
    profile = random_profile(lengths=(256, 512))
    for budget in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(SearchError, match="budget must be in"):
            search_plan(profile, budget)
    minimum = max(minimum_density((256, 512, 2048), 32).values())
    with pytest.raises(SearchError, match=f"smallest possible plan.*{minimum:.4f} at 256 ") as info:
        search_plan(profile, minimum - 1e-3, extend_lengths=(2048,))
    assert "\n" not in str(info.value)
    with pytest.raises(SearchError, match="extend lengths"):
        search_plan(profile, 0.5, extend_lengths=(0,))


def test_candidates_are_valid_and_distinct():
    lengths = (256, 512, 2048)
    rules = candidate_rules(lengths, 64, [a * 64 for a in range(-8, 33)], [i / 8 for i in range(9)])
    assert rules[0] == DenseRule()
    static = rules[1:]
    assert static and all(0 < r.span(n) <= n for r in static for n in lengths)
    masks = [tuple(rule_block_mask(r, n, 64).numpy().tobytes() for n in lengths) for r in rules]
    assert len(set(masks)) == len(masks)
    # Every dropped grid point duplicates a kept rule's masks or has an invalid span.
    kept = set(masks)
    for alpha, beta in itertools.product(range(-8, 33), [i / 8 for i in range(9)]):
        rule = StaticRule(1, alpha * 64.0, beta)
        if all(0 < rule.span(n) <= n for n in lengths):
            assert tuple(rule_block_mask(rule, n, 64).numpy().tobytes() for n in lengths) in kept


SMALL_ALPHAS = (-64.0, 0.0, 64.0, 128.0, 192.0)
SMALL_BETAS = (0.0, 0.25, 0.5)


def brute_force_optimum(profile, budget, lengths, weights, per_head):
    """Minimum weighted cost over every assignment of candidate rules to groups (costs head by head
    from the runtime's block masks, densities from rule_density), checked again with Plan.density."""
    bs = profile.block_size
    rules = candidate_rules(lengths, bs, SMALL_ALPHAS, SMALL_BETAS)
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    groups = [
        (layer, start) for layer in range(model.num_layers) for start in range(0, model.num_heads, size)
    ]
    totals = {n: float(profile.influence[n].double().sum()) for n in weights}
    lost = {}  # (group, rule) -> weighted cost
    for g, (layer, start) in enumerate(groups):
        for r, rule in enumerate(rules):
            value = 0.0
            for n, w in weights.items():
                nb = profile.influence[n].shape[-1]
                dropped = torch.ones(nb, nb, dtype=torch.bool).tril() & ~rule_block_mask(rule, n, bs)
                heads = profile.influence[n][layer, start : start + size].double()
                value += w * float(heads[:, dropped].sum()) / totals[n]
            lost[g, r] = value
    share = {
        (r, n): size * rule_density(rule, n, bs) / (model.num_layers * model.num_heads)
        for r, rule in enumerate(rules)
        for n in lengths
    }
    best = None
    for combo in itertools.product(range(len(rules)), repeat=len(groups)):
        if all(sum(share[r, n] for r in combo) <= budget + TOL for n in lengths):
            value = sum(lost[g, r] for g, r in enumerate(combo))
            if best is None or value < best[0]:
                best = (value, combo)
    table = [[None] * model.num_heads for _ in range(model.num_layers)]
    for (layer, start), r in zip(groups, best[1], strict=True):
        for head in range(start, start + size):
            table[layer][head] = rules[r]
    plan = Plan(model, tuple(tuple(row) for row in table), block_size=bs)
    assert all(plan.density(n) <= budget + TOL for n in lengths)
    return best[0], plan


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("budget", [0.3, 0.45, 0.7])
def test_milp_is_optimal_against_enumeration(per_head, budget):
    profile = random_profile(layers=2, heads=2, kv_heads=1, seed=3)
    lengths = (512, 1024, 2048)
    kw = {"extend_lengths": (2048,), "per_head": per_head, "alphas": SMALL_ALPHAS, "betas": SMALL_BETAS}
    kw["min_span"] = 0  # the enumeration tries every candidate rule
    result = search_plan(profile, budget, pareto_size=3, mip_gap=0.0, **kw)
    assert len(result.points) >= 1
    for point in result.points:
        best, _ = brute_force_optimum(profile, budget, lengths, point.weights, per_head)
        found = sum(w * point.predicted_cost[n] for n, w in point.weights.items())
        assert found == pytest.approx(best, abs=1e-12)
        assert point.plan.provenance["search"]["optimal"]
    # The default gap bounds the distance from the optimum.
    fast = search_plan(profile, budget, pareto_size=1, **kw).points[0]
    best, _ = brute_force_optimum(profile, budget, lengths, fast.weights, per_head)
    assert fast.mean_cost <= best * (1 + 1e-3) + 1e-15


def test_deterministic():
    profile = random_profile(layers=4, heads=6, kv_heads=3, lengths=(512, 1024), seed=5)
    first = search_plan(profile, 0.35, extend_lengths=(2048,), pareto_size=5, provenance={})
    second = search_plan(profile, 0.35, extend_lengths=(2048,), pareto_size=5, provenance={})
    assert [p.plan for p in first.points] == [p.plan for p in second.points]
    assert [p.predicted_cost for p in first.points] == [p.predicted_cost for p in second.points]


def test_per_head_is_at_least_as_good_as_per_group():
    profile = random_profile(layers=2, heads=4, kv_heads=2, lengths=(256, 512), seed=7)
    kw = {"extend_lengths": (1024,), "pareto_size": 1, "mip_gap": 0.0}
    grouped = search_plan(profile, 0.5, **kw).points[0]
    single = search_plan(profile, 0.5, per_head=True, **kw).points[0]
    assert single.mean_cost <= grouped.mean_cost + 1e-12
    # Heads that share a KV group differ in taste here, so the finer plan should gain something.
    assert any(heads[0] != heads[1] or heads[2] != heads[3] for heads in single.plan.rules)


def test_pareto_weights_and_points():
    profile = random_profile(layers=3, heads=6, kv_heads=3, lengths=(512, 1024, 2048), seed=2)
    result = search_plan(profile, 0.4, pareto_size=6)
    for point in result.points:
        assert sum(point.weights.values()) == pytest.approx(1.0)
        assert set(point.weights) == set(profile.lengths)
    # No returned point is beaten at every profiled length by another (weighted sums give Pareto points).
    for a, b in itertools.permutations(result.points, 2):
        assert not all(b.predicted_cost[n] < a.predicted_cost[n] - 1e-9 for n in profile.lengths)


def test_provenance_and_choice(tmp_path):
    profile = random_profile(lengths=(256, 512), provenance={"data": "d.txt", "mode": "answers", "seed": 4})
    result = search_plan(profile, 0.5, extend_lengths=(2048,), pareto_size=4, provenance={"command": "x"})
    plan = result.points[0].plan
    record = plan.provenance
    assert record["command"] == "x" and record["method"] == "search"
    assert record["search"]["budget"] == 0.5 and record["search"]["lengths"] == [256, 512, 2048]
    assert record["profile"]["data"] == "d.txt" and record["profile"]["mode"] == "answers"
    assert record["profile"]["seed"] == 4 and record["profile"]["samples"] == {"256": 1, "512": 1}
    assert len(record["pareto"]) == len(result.points)
    assert not any(entry["chosen"] for entry in record["pareto"])

    index = len(result.points) - 1
    chosen = with_choice(result, index)
    assert [e["chosen"] for e in chosen.provenance["pareto"]] == [
        i == index for i in range(len(result.points))
    ]
    assert chosen.rules == result.points[index].plan.rules
    name, series = pareto_points(chosen.provenance)
    assert name == "predicted_cost" and set(series) == {"256", "512"}
    assert sum(c for _, _, c in series["512"]) == 1
    for density, cost, _ in series["512"]:
        assert density <= 0.5 + TOL and 0.0 <= cost <= 1.0
    with pytest.raises(SearchError):
        with_choice(result, len(result.points))

    from moa_compress.plan import save_plan

    save_plan(chosen, tmp_path)
    assert load_plan(tmp_path) == chosen


def test_solver_keeps_stdout_clean(capfd):
    from moa_compress.search import _stdout_silenced

    with _stdout_silenced():  # what HiGHS's C++ does: write to descriptor 1 directly
        os.write(1, b"HighsMipSolverData noise\n")
    print("after")
    profile = random_profile(layers=2, heads=2, kv_heads=1, seed=9)
    search_plan(profile, 0.3, per_head=True, pareto_size=3, mip_gap=0.0)
    assert capfd.readouterr().out == "after\n"


# --- CLI


def saved_profile(tmp_path):
    from moa_compress.profile import save_profile

    profile = random_profile(layers=2, heads=4, kv_heads=2, lengths=(256, 512), seed=11)
    save_profile(profile, tmp_path / "profile")
    return tmp_path / "profile"


def test_search_command_writes_a_loadable_plan(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    profile_dir = saved_profile(tmp_path)
    out = tmp_path / "plan"
    runner = CliRunner()
    args = ["search", str(profile_dir), "--budget", "0.5", "--extend-lengths", "1024", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Pareto set" in result.output and "d@1024" in result.output
    plan = load_plan(out)
    assert plan.budget == 0.5 and plan.lengths == (256, 512, 1024)
    assert all(plan.density(n) <= 0.5 + TOL for n in plan.lengths)
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["chosen"] == 0 and pareto["points"][0]["chosen"]
    assert pareto["points"][0]["rules"] and set(pareto["points"][0]["density"]) == {"256", "512", "1024"}
    assert plan.provenance["pareto"][0]["chosen"]
    assert pareto_points(plan.provenance) is not None

    # Refuses to overwrite, then overwrites with --force; --json prints only JSON.
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    as_json = runner.invoke(app, [*args, "--force", "--json", "--per-head"])
    assert as_json.exit_code == 0
    summary = json.loads(as_json.stdout)
    assert summary["search"]["per_head"] is True and summary["points"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0"], "--budget must be in"),
        (["--budget", "1.5"], "--budget must be in"),
        (["--budget", "0.01"], "smallest possible plan"),
        (["--budget", "0.5", "--extend-lengths", "x"], "--extend-lengths"),
        (["--budget", "0.5", "--kv-budget", "1.5"], "--kv-budget must be in (0, 1]"),
    ],
)
def test_search_command_bad_input(tmp_path, extra, message):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    profile_dir = saved_profile(tmp_path)
    result = CliRunner().invoke(app, ["search", str(profile_dir), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_search_command_missing_or_invalid_profile(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["search", str(tmp_path / "none"), "--budget", "0.5"])
    assert missing.exit_code == 2 and "no profile" in missing.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "profile.json").write_text("{not json")
    bad = runner.invoke(app, ["search", str(tmp_path / "bad"), "--budget", "0.5"])
    assert bad.exit_code == 2 and "invalid JSON" in bad.output


def test_renormalised_cost_matches_the_row_formula():
    """With the attention mass recorded, a rule's cost for one head is sum over query blocks of the
    influence it drops there divided by the mean mass each row keeps (floored), over the total."""
    profile = random_profile(layers=1, heads=2, kv_heads=2, lengths=(200,), block_size=32, seed=4)
    n, bs = 200, 32
    nb = 7
    g = torch.Generator().manual_seed(9)
    raw = torch.rand(1, 2, nb, nb, generator=g) * torch.ones(nb, nb).tril()
    rows = torch.tensor([32.0] * 6 + [8.0])  # the last block holds 200 - 6 * 32 rows
    mass = raw / raw.sum(-1, keepdim=True) * rows[:, None]  # every row's probabilities sum to 1
    profile = dataclasses.replace(profile, mass={n: mass.float().contiguous()})
    rules = [StaticRule(1, 32.0, 0.0), StaticRule(1, 96.0, 0.0), DenseRule()]
    got = rule_costs(profile, rules, per_head=True)[n]  # [2 heads, 3 rules]
    plain = rule_costs(profile, rules, per_head=True, renormalise=False)[n]
    influence = profile.influence[n].double()[0]
    total = float(influence.sum())
    for h in range(2):
        for r, rule in enumerate(rules):
            keep = rule_block_mask(rule, n, bs)
            expected = plain_expected = 0.0
            for q in range(nb):
                dropped = [k for k in range(q + 1) if not keep[q, k]]
                lost = sum(float(influence[h, q, k]) for k in dropped)
                kept_mass = 1.0 - sum(float(mass[0, h, q, k]) for k in dropped) / float(rows[q])
                expected += lost / max(kept_mass, MIN_KEPT_MASS)
                plain_expected += lost
            assert got[h, r] == pytest.approx(expected / total, rel=1e-5)
            assert plain[h, r] == pytest.approx(plain_expected / total, rel=1e-9)
    assert got[:, 2].tolist() == [0.0, 0.0]  # dense drops nothing
    assert (got[:, :2] > plain[:, :2]).all()  # a dropped set costs more than its entries one by one


def test_cost_kinds_pick_the_profile_map():
    """The "net" cost charges the profile's net map, "entry" its sum-of-|E| map; the default is net when the
    profile recorded it; a search records which it used; a profile without net refuses "net"."""
    base = random_profile(layers=2, heads=2, kv_heads=1, lengths=(256,), block_size=32, seed=5)
    n = 256
    shuffled = random_profile(layers=2, heads=2, kv_heads=1, lengths=(256,), block_size=32, seed=6)
    net = {n: shuffled.influence[n] * 0.5}  # a different map, below the entry one nowhere in particular
    profile = dataclasses.replace(base, net=net)
    rules = [StaticRule(1, 32.0, 0.0), StaticRule(1, 96.0, 0.0), DenseRule()]
    for kind, source in (("net", profile.net), ("entry", profile.influence)):
        got = rule_costs(profile, rules, per_head=True, renormalise=False, cost=kind)[n]
        maps = source[n].double().reshape(4, 8, 8)
        for r, rule in enumerate(rules):
            dropped = torch.ones(8, 8, dtype=torch.bool).tril() & ~rule_block_mask(rule, n, 32)
            expected = (maps * dropped).sum((-1, -2)) / maps.sum()
            assert got[:, r] == pytest.approx(expected.tolist(), rel=1e-9)
    default = rule_costs(profile, rules, per_head=True, renormalise=False)[n]
    assert default == pytest.approx(rule_costs(profile, rules, True, False, "net")[n])
    assert (
        search_plan(profile, 0.5, pareto_size=1).points[0].plan.provenance["search"]["cost"].startswith("net")
    )
    assert (
        search_plan(base, 0.5, pareto_size=1).points[0].plan.provenance["search"]["cost"].startswith("entry")
    )
    with pytest.raises(SearchError, match="no net influence"):
        search_plan(base, 0.5, cost="net")
    with pytest.raises(SearchError, match="cost must be one of"):
        search_plan(profile, 0.5, cost="abs")
    # the two maps rank the rules differently here, so the plans differ
    plans = {
        kind: search_plan(profile, 0.5, cost=kind, min_span=0, pareto_size=1).points[0].plan.rules
        for kind in COSTS
    }
    assert plans["net"] != plans["entry"]


def test_min_span_keeps_bands_at_least_that_wide():
    profile = random_profile(layers=3, heads=4, kv_heads=2, lengths=(512, 1024), block_size=32, seed=2)
    lengths = (512, 1024, 2048)
    # sink + a band of 1 / 2 / 3 blocks has density 0.18 / 0.29 / 0.39 at 512 tokens (the binding length)
    assert default_min_span(0.5, lengths, 32) == 96.0
    assert default_min_span(0.3, lengths, 32) == 64.0
    assert default_min_span(0.1, lengths, 32) == 0.0
    for min_span in (None, 0, 160):
        result = search_plan(profile, 0.6, extend_lengths=(2048,), min_span=min_span, pareto_size=2)
        floor = 96.0 if min_span is None else min_span
        for point in result.points:
            assert point.plan.provenance["search"]["min_span"] == floor
            for heads in point.plan.rules:
                for rule in heads:
                    assert isinstance(rule, DenseRule) or all(rule.span(n) >= floor for n in lengths)
    unconstrained = search_plan(profile, 0.6, min_span=0, pareto_size=1).points[0].mean_cost
    assert search_plan(profile, 0.6, min_span=160, pareto_size=1).points[0].mean_cost >= unconstrained - 1e-12
    with pytest.raises(SearchError, match="bands of at least 480 tokens"):
        search_plan(profile, 0.6, min_span=480)


# --- gate candidates


def gated_profile(layers=2, heads=4, kv_heads=2, lengths=(100, 160), block_size=16, samples=2, seed=0):
    """A profile with its calibration samples' own maps and pooled gate inputs: random positive net
    influence below the block diagonal, and attention mass whose query-block rows sum to their rows."""
    from moa_compress.plan import ModelIdentity
    from moa_compress.profile import Profile
    from moa_compress.search import SampleMaps

    g = torch.Generator().manual_seed(seed)
    identity = ModelIdentity("gated", layers, heads, kv_heads, 8, f"{seed:016x}")
    per_length, means = {}, {"influence": {}, "mass": {}, "net": {}}
    for n in lengths:
        nb = -(-n // block_size)
        causal = torch.ones(nb, nb).tril()
        rows = torch.clamp(n - torch.arange(nb) * block_size, max=block_size).float()
        items = []
        for _ in range(samples):
            net = torch.rand(layers, heads, nb, nb, generator=g) * causal
            raw = torch.rand(layers, heads, nb, nb, generator=g) * causal
            mass = raw / raw.sum(-1, keepdim=True) * rows[:, None]
            maps = {"influence": net * 2, "mass": mass, "net": net}
            q = [torch.randn(heads, nb, 8, generator=g) for _ in range(layers)]
            k = [torch.randn(kv_heads, nb, 24, generator=g) for _ in range(layers)]
            items.append(SampleMaps(maps, q, k))
        per_length[n] = items
        for name, by_length in means.items():
            by_length[n] = (sum(item.maps[name] for item in items) / samples).float().contiguous()
    profile = Profile(identity, block_size, means["influence"], dict.fromkeys(lengths, samples),
                      mass=means["mass"], net=means["net"])  # fmt: skip
    return profile, per_length


def random_gates(profile, seed=0, per_query_head=False):
    from moa_compress.gates import AttnGate

    m = profile.model
    torch.manual_seed(seed)
    return [
        AttnGate(m.num_heads, m.num_kv_heads, m.head_dim, 8, profile.block_size,
                 per_query_head=per_query_head).requires_grad_(False)
        for _ in range(m.num_layers)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "per_head, per_query_head, cross", [(False, False, False), (True, False, False), (True, True, False),
                                        (False, False, True)]
)  # fmt: skip
def test_gate_cost_equals_a_per_sample_brute_force(per_head, per_query_head, cross):
    """Sample by sample, head by head, row by row: the gate's own top blocks (sorted here, not by
    gate_selections), the net influence of the causal blocks it drops divided by the row's kept mass
    (floored), mean over samples, over the profile's total net influence. ``cross``: each sample
    selected by its own gates (``sample_gates``, as cross-fitting gives), not the main ones."""
    from moa_compress.plan import GateRule
    from moa_compress.search import gate_costs

    profile, samples = gated_profile()
    gates = random_gates(profile, per_query_head=per_query_head)
    rules = [GateRule(0.2), GateRule(0.45), GateRule(0.7), GateRule(0.45, local=3)]
    chosen = {n: [gates] * len(items) for n, items in samples.items()}
    if cross:
        sets = [random_gates(profile, seed=s, per_query_head=per_query_head) for s in (1, 2)]
        chosen = {n: [sets[i % 2] for i in range(len(items))] for n, items in samples.items()}
        got = gate_costs(profile, gates, samples, rules, per_head=per_head, sample_gates=chosen)
        assert not np.allclose(
            got[profile.lengths[0]], gate_costs(profile, gates, samples, rules)[profile.lengths[0]]
        )
        for short in (
            {n: c[:1] for n, c in chosen.items()},
            {n: [g[:1] for g in c] for n, c in chosen.items()},
        ):
            with pytest.raises(SearchError, match="cost gates at 100 tokens"):
                gate_costs(profile, gates, samples, rules, sample_gates=short)
    else:
        got = gate_costs(profile, gates, samples, rules, per_head=per_head)
    m, bs = profile.model, profile.block_size
    group = m.num_heads // m.num_kv_heads
    for n in profile.lengths:
        nb = -(-n // bs)
        rows = [min(bs, n - q * bs) for q in range(nb)]
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        total = float(profile.net[n].double()[..., causal].sum())
        expected = torch.zeros(m.num_layers, m.num_heads, len(rules), dtype=torch.float64)
        for i, sample in enumerate(samples[n]):
            for layer in range(m.num_layers):
                own = chosen[n][i][layer]
                scores = own(sample.q_blocks[layer][None], sample.k_blocks[layer][None])[0]
                for head in range(m.num_heads):
                    row_scores = scores[head if per_query_head else head // group]
                    for r, rule in enumerate(rules):
                        k = rule.blocks_per_row(n, bs)
                        window = max(1, min(rule.local, k - 1))
                        for q in range(nb):
                            keep = {0, *range(max(q - window + 1, 0), q + 1)}
                            others = sorted(set(range(q + 1)) - keep, key=lambda j: -float(row_scores[q, j]))
                            keep |= set(others[: max(k - len(keep), 0)])
                            dropped = [j for j in range(q + 1) if j not in keep]
                            lost = sum(float(sample.maps["net"][layer, head, q, j]) for j in dropped)
                            lost_mass = sum(float(sample.maps["mass"][layer, head, q, j]) for j in dropped)
                            kept = max(1.0 - lost_mass / rows[q], MIN_KEPT_MASS)
                            expected[layer, head, r] += lost / kept / len(samples[n])
        size = 1 if per_head else group
        grouped = expected.reshape(-1, size, len(rules)).sum(1) / total
        assert got[n].shape == grouped.shape
        assert got[n] == pytest.approx(grouped.numpy(), rel=1e-9, abs=1e-12)
        assert (got[n][:, 0] > got[n][:, 2]).all()  # keeping more blocks loses less


def test_a_gate_that_keeps_everything_costs_nothing_and_is_no_candidate():
    from moa_compress.plan import GateRule
    from moa_compress.search import gate_candidates, gate_costs

    profile, samples = gated_profile()
    costs = gate_costs(profile, random_gates(profile), samples, [GateRule(1.0), GateRule(0.3)])
    for n in profile.lengths:
        assert (costs[n][:, 0] == 0.0).all() and (costs[n][:, 1] > 0).all()
    candidates = gate_candidates((100, 160, 1024), 16, [0.05, 0.3, 0.3001, 0.5, 1.0])
    assert GateRule(1.0) not in candidates and GateRule(0.3001) not in candidates  # same blocks as 0.3
    assert [r.target for r in candidates] == [0.05, 0.3, 0.5]
    with pytest.raises(SearchError, match="gate targets"):
        gate_candidates((100,), 16, [0.0])


def test_gate_candidates_with_local_windows_keep_only_rules_that_still_choose():
    """A window that leaves the gate nothing to pick at every length is a static band (no candidate);
    windows that clamp to the same blocks at every length are one candidate."""
    from moa_compress.plan import GateRule, num_blocks
    from moa_compress.search import gate_candidates

    lengths, bs = (1024, 4096), 16
    candidates = gate_candidates(lengths, bs, [0.1, 0.3], [1, 2, 4, 64, 65])
    assert GateRule(0.1, 1) in candidates and GateRule(0.1, 2) in candidates
    for rule in candidates:
        assert (
            any(
                rule.blocks_per_row(n, bs) - rule.local_blocks(n, bs) > 1
                and rule.blocks_per_row(n, bs) < num_blocks(n, bs)
                for n in lengths
            )
            or rule.local == 1
        )
    shapes = [tuple((r.blocks_per_row(n, bs), r.local_blocks(n, bs)) for n in lengths) for r in candidates]
    assert len(set(shapes)) == len(shapes)
    assert GateRule(0.1, 64) not in candidates and GateRule(0.1, 65) not in candidates
    for bad in ([0], [1.5], [], [True]):
        with pytest.raises(SearchError, match="local windows"):
            gate_candidates(lengths, bs, [0.1], bad)


def test_gate_candidates_keep_the_static_floor():
    """With a floor, no gate candidate keeps fewer blocks per row than it at any length (where the rows
    have that many), and the floor is the narrowest static band's blocks plus the sink."""
    from moa_compress.plan import num_blocks
    from moa_compress.search import gate_candidates, gate_floor

    assert gate_floor(192.0, 64) == 4 and gate_floor(100.0, 64) == 3 and gate_floor(0.0, 64) == 2
    assert gate_floor(64.0, 64, sink_blocks=0) == 2
    lengths, bs = (1024, 4096), 16
    unfloored = gate_candidates(lengths, bs, [0.02, 0.05, 0.1, 0.3], [1, 2])
    floored = gate_candidates(lengths, bs, [0.02, 0.05, 0.1, 0.3], [1, 2], min_blocks=12)
    assert any(r.blocks_per_row(1024, bs) < 12 for r in unfloored)
    assert floored and all(r.min_blocks == 12 for r in floored)
    for rule in floored:
        for n in lengths:
            assert rule.blocks_per_row(n, bs) >= min(12, num_blocks(n, bs))


def test_gate_candidates_with_dense_tails_and_their_costs():
    """Tails multiply the candidates (one rule per distinct shape); a tail as long as every row costs
    nothing, and the search keeps the budget with tails offered."""
    from moa_compress.plan import GateRule, num_blocks
    from moa_compress.search import gate_candidates, gate_costs

    lengths, bs = (1024, 4096), 16
    plain = gate_candidates(lengths, bs, [0.05, 0.1, 0.3], [1, 2])
    both = gate_candidates(lengths, bs, [0.05, 0.1, 0.3], [1, 2], tails=[0, 1])
    assert {r.tail for r in both} == {0, 1} and len(both) > len(plain)
    assert [r for r in both if r.tail == 0] == plain
    # A tail as long as every row is dense's shape: not a gate candidate.
    assert not gate_candidates((400, 640), bs, [0.1, 0.3], [1], tails=[40])
    assert all(
        r.tail < num_blocks(1024, bs) for r in gate_candidates((1024,), bs, [0.05], [1], tails=[0, 64])
    )
    for bad in ([], [-1], [0.5], [True]):
        with pytest.raises(SearchError, match="gate tails"):
            gate_candidates(lengths, bs, [0.1], [1], tails=bad)

    profile, samples = gated_profile(lengths=(400, 640))
    gates = random_gates(profile)
    whole = num_blocks(max(profile.lengths), profile.block_size)
    rules = [GateRule(0.1), GateRule(0.1, 1, 2, whole)]
    costs = gate_costs(profile, gates, {n: list(samples[n]) for n in profile.lengths}, rules)
    for n in profile.lengths:
        assert (costs[n][:, 0] > 0).any() and np.allclose(costs[n][:, 1], 0.0)
    result = search_plan(
        profile,
        0.4,
        rules=["gate", "dense"],
        gates=gates,
        gate_samples={n: list(samples[n]) for n in profile.lengths},
        gate_targets=[0.1, 0.3],
        gate_tails=[0, 1],
        pareto_size=1,
    )
    plan = result.points[0].plan
    assert plan.provenance["search"]["gate_tails"] == [0, 1]
    for n in profile.lengths:
        assert plan.density(n) <= 0.4 + 1e-9


def test_search_holds_gate_rules_to_the_band_floor():
    """The search's gate rules keep at least the floor of its min_span; with min_span 0 they may keep
    the sink and the diagonal alone."""
    from moa_compress.plan import GateRule
    from moa_compress.search import gate_floor

    profile, samples = gated_profile(lengths=(400, 640))
    gates = random_gates(profile)
    bs = profile.block_size

    def search(budget, min_span, sink_blocks=1):
        return search_plan(
            profile,
            budget,
            rules=["gate", "dense"],
            gates=gates,
            gate_samples={n: list(samples[n]) for n in profile.lengths},
            gate_targets=[0.01, 0.1, 0.3],
            min_span=min_span,
            sink_blocks=sink_blocks,
            pareto_size=1,
        )

    for min_span, budget, sink in ((3.0 * bs, 0.4, 1), (2.0 * bs, 0.4, 2), (0.0, 0.2, 1)):
        result = search(budget, min_span, sink)
        floor = gate_floor(min_span, bs, sink)
        assert floor == (2 if min_span == 0 else sink + int(min_span // bs))
        gated = [r for row in result.points[0].plan.rules for r in row if isinstance(r, GateRule)]
        assert gated and all(r.min_blocks == floor for r in gated)
        for n in profile.lengths:
            assert result.points[0].plan.density(n) <= budget + 1e-9
    assert min(r.blocks_per_row(n, bs) for r in gated for n in profile.lengths) < gate_floor(3.0 * bs, bs)
    # A floor the budget cannot afford is refused up front, gates or not.
    with pytest.raises(SearchError, match="bands of at least"):
        search(0.2, 8.0 * bs)


class FixedGate(torch.nn.Module):
    """A gate whose scores are given (per length), with the weights a plan carries."""

    def __init__(self, real, scores_by_blocks):
        super().__init__()
        self.real, self.scores_by_blocks = real, scores_by_blocks
        for name in ("q_proj", "k_proj", "gate_dim", "per_query_head", "rope_theta"):
            setattr(self, name, getattr(real, name))

    def forward(self, q_blocks, k_blocks):
        return self.scores_by_blocks[q_blocks.shape[2]][None]


def test_one_sample_gate_that_follows_recency_costs_what_the_static_band_costs():
    """Static and gate costs are in one unit: a gate scoring recent blocks highest keeps exactly a
    sink + band mask, and on a one-sample profile costs what rule_costs charges that static rule."""
    from moa_compress.plan import GateRule
    from moa_compress.search import gate_costs

    profile, samples = gated_profile(samples=1)
    real = random_gates(profile)
    bs, hg = profile.block_size, profile.model.num_kv_heads
    recency = {}
    for n in profile.lengths:
        nb = -(-n // bs)
        scores = torch.arange(nb, dtype=torch.float32).expand(nb, nb).clone()
        recency[nb] = scores.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf"))
        recency[nb] = recency[nb].expand(hg, nb, nb)
    gates = [FixedGate(gate, recency) for gate in real]
    rule = GateRule(0.4)
    got = gate_costs(profile, gates, samples, [rule])
    for n in profile.lengths:
        band = StaticRule(1, float((rule.blocks_per_row(n, bs) - 1) * bs), 0.0)
        assert rule_density(band, n, bs) == pytest.approx(rule.density(n, bs), abs=1e-12)
        assert got[n][:, 0] == pytest.approx(rule_costs(profile, [band])[n][:, 0], rel=1e-6)


def hot_profile(lengths=(512, 1024), block_size=16, samples=2, seed=0):
    """Influence that sits on one far key block per row and sample (half the row's distance back),
    and gates that score exactly those blocks: no band reaches them, the gate keeps them all."""
    profile, per_length = gated_profile(lengths=lengths, block_size=block_size, samples=samples, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    real = random_gates(profile)
    m = profile.model
    scores_by_blocks = {}
    for n in lengths:
        nb = -(-n // block_size)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        hot = torch.zeros(nb, nb)
        hot[torch.arange(nb), torch.arange(nb) // 2] = 1.0
        scores = (hot + 0.01 * torch.rand(nb, nb, generator=g)).masked_fill(~causal, float("-inf"))
        scores_by_blocks[nb] = scores.expand(m.num_kv_heads, nb, nb)
        for item in per_length[n]:
            item.maps["net"].copy_((hot + 0.001 * torch.rand(nb, nb, generator=g)) * causal)
        profile.net[n].copy_(sum(item.maps["net"] for item in per_length[n]) / samples)
    return profile, per_length, [FixedGate(gate, scores_by_blocks) for gate in real]


def test_the_search_picks_gates_where_they_drop_less_and_holds_the_budget_everywhere():
    from moa_compress.plan import GateRule

    profile, samples, gates = hot_profile()
    budget = 0.25
    result = search_plan(profile, budget, extend_lengths=(2048,), gates=gates, gate_samples=samples,
                         pareto_size=3, provenance={})  # fmt: skip
    best = result.points[0].plan
    heads = [rule for layer in best.rules for rule in layer]
    assert all(isinstance(rule, GateRule) for rule in heads)
    assert best.provenance["search"]["rules"] == ["static", "gate", "dense"]
    for point in [*result.points, *result.alternatives.values()]:
        assert all(point.plan.density(n) <= budget + TOL for n in (512, 1024, 2048))
        assert point.density == {n: point.plan.density(n) for n in (512, 1024, 2048)}
    # The plan carries the gates of every layer it uses them in.
    assert best.gates is not None and best.gates.layers == (0, 1)
    assert torch.equal(best.tensors["gates.1.k_proj"], gates[1].k_proj)
    # The restricted problems: static rules alone lose far more; the gate-only optimum is this plan.
    static_only, gate_only = result.alternatives["static-only"], result.alternatives["gate-only"]
    assert not any(isinstance(r, GateRule) for layer in static_only.plan.rules for r in layer)
    assert static_only.plan.gates is None and not static_only.plan.tensors
    assert static_only.mean_cost > 5 * result.points[0].mean_cost
    assert gate_only.plan.rules == best.rules
    assert static_only.plan.provenance["search"]["restricted_to"] == "static-only"

    # Static-only and gate-only searches are one argument away, and match the alternatives.
    only_static = search_plan(profile, budget, extend_lengths=(2048,), rules=("static", "dense"),
                              pareto_size=1, provenance={})  # fmt: skip
    assert only_static.points[0].plan.rules == static_only.plan.rules and not only_static.alternatives
    assert only_static.points[0].mean_cost == pytest.approx(static_only.mean_cost)


def test_gate_plans_round_trip_through_the_search_files(tmp_path):
    from moa_compress.search import save_search, search_summary
    from moa_compress.workdir import load_search_stage, save_search_stage

    profile, samples, gates = hot_profile()
    result = search_plan(profile, 0.3, gates=gates, gate_samples=samples, pareto_size=2)
    save_search_stage(result, tmp_path / "search.json")
    assert (tmp_path / "search.safetensors").exists()
    back = load_search_stage(tmp_path / "search.json")
    assert back == result
    assert (
        back.alternatives["gate-only"].plan.tensors.keys()
        == result.alternatives["gate-only"].plan.tensors.keys()
    )
    path = save_search(result, tmp_path / "plan")
    loaded = load_plan(path)
    assert loaded == with_choice(result, 0) and loaded.gates.layers == (0, 1)
    pareto = json.loads((tmp_path / "plan" / "pareto.json").read_text())
    assert set(pareto["alternatives"]) == {"static-only", "gate-only"}
    assert search_summary(result)["alternatives"]["gate-only"]["rules"]


def test_rule_kinds_are_checked():
    from moa_compress.search import check_rule_kinds

    assert check_rule_kinds(["dense", "gate", "static"]) == ("static", "gate", "dense")
    with pytest.raises(SearchError, match="unknown rule kind 'window'"):
        check_rule_kinds(["static", "window"], "--rules")
    with pytest.raises(SearchError, match="--rules must include static or gate"):
        check_rule_kinds(["dense"], "--rules")
    profile = random_profile(lengths=(256,))
    with pytest.raises(SearchError, match="need the trained gates"):
        search_plan(profile, 0.5, rules=("gate", "dense"))
    # without gates the default is what it was: static and dense
    plan = search_plan(profile, 0.5, pareto_size=1).points[0].plan
    assert plan.provenance["search"]["rules"] == ["static", "dense"] and plan.gates is None


def test_a_kv_budget_bounds_the_decode_cache_and_trades_gates_for_bands():
    """Gates keep every key: under a kv budget the search keeps as many gate heads as the cache allows
    (the rest get bands), and every plan it returns holds its keys within the budget."""
    from moa_compress.plan import GateRule, group_kv_fraction

    profile, samples, gates = hot_profile()
    budget, kv_budget, lengths = 0.25, 0.5, (512, 1024, 2048)
    free = search_plan(profile, budget, extend_lengths=(2048,), gates=gates, gate_samples=samples,
                       pareto_size=2, provenance={})  # fmt: skip
    assert free.points[0].plan.kv_fraction(2048) == 1.0  # every head a gate: every key kept
    result = search_plan(profile, budget, extend_lengths=(2048,), gates=gates, gate_samples=samples,
                         pareto_size=2, kv_budget=kv_budget, provenance={})  # fmt: skip
    best = result.points[0].plan
    m = best.model
    group = m.num_heads // m.num_kv_heads
    # Recomputed from the rules: each KV head holds every key if any of its heads has a gate.
    held = [
        group_kv_fraction(heads[h * group : (h + 1) * group], 2048, best.block_size)
        for heads in best.rules
        for h in range(m.num_kv_heads)
    ]
    assert best.kv_fraction(2048) == pytest.approx(sum(held) / len(held), abs=1e-15)
    assert best.kv_fraction(2048) <= kv_budget + TOL
    gated = sum(isinstance(r, GateRule) for layer in best.rules for r in layer)
    assert 0 < gated <= kv_budget * m.num_layers * m.num_heads  # gates where the cache allows them
    assert best.provenance["search"]["kv_budget"] == kv_budget
    assert best.provenance["search"]["kv_length"] == 2048
    assert best.provenance["pareto"][0]["kv_fraction"] == pytest.approx(best.kv_fraction(2048))
    for point in [*result.points, *result.alternatives.values()]:
        assert point.plan.kv_fraction(2048) <= kv_budget + TOL
        assert all(point.plan.density(n) <= budget + TOL for n in lengths)
    assert result.points[0].mean_cost > free.points[0].mean_cost  # the cache limit costs something
    # Gate and dense heads alone cannot hold less than every key: no gate-only optimum.
    assert "gate-only" not in result.alternatives and "static-only" in result.alternatives


def test_kv_budget_errors():
    profile = random_profile(layers=2, heads=4, kv_heads=2, lengths=(512, 1024), seed=1)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(SearchError, match="kv_budget must be in"):
            search_plan(profile, 0.5, kv_budget=bad)
    with pytest.raises(SearchError, match="drop per_head"):
        search_plan(profile, 0.5, kv_budget=0.5, per_head=True)
    with pytest.raises(SearchError, match="kv budget 0.001"):  # no band is that short
        search_plan(profile, 0.5, kv_budget=0.001)
    # At budget 1 a kv budget still trades: not every head dense.
    plan = search_plan(profile, 1.0, kv_budget=0.5, pareto_size=1).points[0].plan
    assert plan.kv_fraction(1024) <= 0.5 + TOL


def test_plan_kv_fraction_is_what_the_decode_cache_plans_to_hold():
    """Plan.kv_fraction counts the keys PlanKVCache's layer plan keeps: rings of sink + window for KV
    heads whose query heads all have bands (the largest of each), every key for the others (a dense
    head; a band that reaches back to the sink)."""
    from moa_compress.kvcache import plan_layer
    from moa_compress.plan import ModelIdentity

    n, block = 1000, 16
    rules = (
        (StaticRule(1, 64, 0.0), StaticRule(2, 32, 0.1), DenseRule(), StaticRule(1, 16, 0.0)),
        (StaticRule(0, 900, 0.5), StaticRule(1, 16, 0.0), StaticRule(1, 48, 0.0), StaticRule(1, 200, 0.0)),
    )
    model = ModelIdentity("m", 2, 4, 2, 8, "x")
    plan = Plan(model, rules, block_size=block)
    kept = 0
    for layer in rules:
        for kv in plan_layer([layer[0:2], layer[2:4]], block, n, n):
            kept += len(kv.kv_heads) * min(kv.capacity, n)
    assert plan.kv_fraction(n) == pytest.approx(kept / (2 * 2 * n), abs=1e-15)
    assert 0 < plan.kv_fraction(n) < 1


def test_a_models_window_layers_stay_the_models_and_are_outside_the_budget():
    """A profile of a model whose layer 0 has a 40-token window (its maps zero, as the profiler leaves
    them): every plan keeps that layer's window, chooses for layers 1 and 2 only, holds the budget over
    their heads and is charged what it drops there."""
    from moa_compress.plan import WindowRule

    profile, per_length = gated_profile(layers=3, lengths=(320, 480))
    windowed = dataclasses.replace(profile.model, windows=((0, 40),))
    zero = {name: {n: m[n].clone() for n in m} for name, m in (("influence", profile.influence),
                                                                ("mass", profile.mass), ("net", profile.net))}  # fmt: skip
    for maps in zero.values():
        for tensor in maps.values():
            tensor[0] = 0
    profile = dataclasses.replace(profile, model=windowed, influence=zero["influence"], mass=zero["mass"],
                                  net=zero["net"])  # fmt: skip
    budget = 0.4
    static = search_plan(
        profile, budget, rules=("static", "dense"), pareto_size=3, renormalise=False, cost="entry"
    )
    gated = search_plan(profile, budget, gates=random_gates(profile), gate_samples=per_length, pareto_size=3)
    points = static.points + gated.points + list(gated.alternatives.values())
    assert any(r.kind == "gate" for p in points for heads in p.plan.rules for r in heads)
    for point in points:
        plan = point.plan
        assert plan.rules[0] == (WindowRule(40),) * 4 and plan.model == windowed
        for n in plan.lengths:
            mine = [rule_density(r, n, 16) for heads in plan.rules[1:] for r in heads]
            assert sum(mine) / len(mine) == pytest.approx(plan.density(n), abs=1e-15)
            assert plan.density(n) <= budget + TOL
    for point in static.points:
        for n in profile.lengths:
            assert point.predicted_cost[n] == pytest.approx(
                lost_fraction(profile, point.plan.rules, n), abs=1e-12
            )


def test_gate_costs_under_a_sampled_ranking_rank_by_each_samples_scores():
    """With a prompt ranking, the ranked layers choose blocks from each sample's ``sampled`` scores (one
    per KV group), exactly as gates that return those scores would; other layers keep the gates; the
    plans of a search carry the ranking."""
    from moa_compress.gate_runtime import PrefillRanking
    from moa_compress.plan import GateRule
    from moa_compress.search import gate_costs

    profile, samples = gated_profile()
    m = profile.model
    gates = random_gates(profile)
    g = torch.Generator().manual_seed(9)
    scored = {
        n: [dataclasses.replace(s, sampled={
            layer: torch.randn(m.num_kv_heads, s.maps["net"].shape[-1], s.maps["net"].shape[-1], generator=g)
            for layer in range(m.num_layers)}) for s in items]
        for n, items in samples.items()
    }  # fmt: skip

    class Fixed(torch.nn.Module):  # a "gate" whose scores are the sample's sampled ones
        def __init__(self, layer, n, index):
            super().__init__()
            self.layer, self.n, self.index = layer, n, index

        def forward(self, q_blocks, k_blocks):
            return scored[self.n][self.index].sampled[self.layer][None]

    rules = [GateRule(0.2), GateRule(0.45, local=2), GateRule(0.7)]
    ranked = {0}  # layer 1 keeps the gates
    mixed_sets = {
        n: [[Fixed(layer, n, i) if layer in ranked else gates[layer] for layer in range(m.num_layers)]
            for i in range(len(items))]
        for n, items in samples.items()
    }  # fmt: skip
    got = gate_costs(profile, gates, scored, rules, ranking=PrefillRanking(4, ranked))
    want = gate_costs(profile, gates, samples, rules, sample_gates=mixed_sets)
    plain = gate_costs(profile, gates, samples, rules)
    for n in profile.lengths:
        assert got[n] == pytest.approx(want[n], rel=1e-12, abs=1e-15)
        assert not np.allclose(got[n], plain[n])
    with pytest.raises(SearchError, match="no sampled-query scores"):
        gate_costs(profile, gates, samples, rules, ranking=PrefillRanking(4))

    result = search_plan(
        profile, 0.5, gates=gates, gate_samples=scored, ranking=PrefillRanking(4, ranked), time_limit=10
    )
    for point in [*result.points, *result.alternatives.values()]:
        if point.plan.gates is not None:
            assert point.plan.gates.ranking_samples == 4 and point.plan.gates.ranking_layers == tuple(ranked)
