"""Prompts allocated layer-wide from sampled queries (``ranking="sampled-layer:R"``,
:mod:`moa_compress.allocation`): with every query sampled it is the ``oracle-layer`` selection; with
fewer, it never computes more pairs than the plan; padded batches, chunked prompts, the PlanKVCache and
decoding steps; parsing and the command line."""

from __future__ import annotations

import itertools

import pytest
import torch

from moa_compress import allocation
from moa_compress.gate_runtime import PrefillRanking, sampled_scores
from moa_compress.gates import pooled_attention
from moa_compress.oracle import apply_oracle, layer_budget, top_blocks_in_layer
from moa_compress.plan import DenseRule, GateRule, StaticRule, causal_block_pairs, num_blocks
from moa_compress.runtime import PlanKVCache, PlanRuntimeError, apply_plan, cache_kwarg
from tests.factories import left_padded, tiny_model
from tests.test_gate_runtime import BLOCK, gated_plan, ids, mixed, padded_run, roomy


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def static_rules(layer, head):
    """No gate heads: static bands of several widths beside a dense head."""
    kinds = (
        StaticRule(1, float(BLOCK), 0.0),
        StaticRule(0, 10.0, 0.1),
        DenseRule(),
        StaticRule(1, 30.0, 0.0),
    )
    return kinds[(layer + 2 * head) % 4]


def layer_ranking(samples, layers=None):
    return PrefillRanking(samples, layers, scope="layer")


@pytest.mark.parametrize("n,hq,hkv,samples", [(77, 6, 2, 3), (50, 4, 4, 2), (33, 2, 1, 16)])
def test_per_head_sampled_scores_are_each_heads_own_and_average_to_the_groups(n, hq, hkv, samples):
    g = torch.Generator().manual_seed(n)
    query = torch.randn(2, hq, n, 8, generator=g, dtype=torch.float64)
    key = torch.randn(2, hkv, n, 8, generator=g, dtype=torch.float64)
    per_head = sampled_scores(query, key, 0.4, BLOCK, samples, per_head=True)
    assert per_head.shape == (2, hq, num_blocks(n, BLOCK), num_blocks(n, BLOCK))
    group = hq // hkv
    for h in range(hq):  # a head alone, as its own KV group
        alone = sampled_scores(query[:, h : h + 1], key[:, h // group : h // group + 1], 0.4, BLOCK, samples)
        torch.testing.assert_close(per_head[:, h : h + 1], alone, rtol=1e-12, atol=1e-12)
    grouped = sampled_scores(query, key, 0.4, BLOCK, samples)
    mean = per_head.exp().unflatten(1, (hkv, group)).mean(2)
    torch.testing.assert_close(mean, grouped.exp(), rtol=1e-12, atol=1e-12)


def test_sampled_head_mass_of_every_query_is_the_block_mass():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 6, 70, 8, generator=g, dtype=torch.float64)
    key = torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64)
    want = pooled_attention(query, key, 0.5, BLOCK, "sum")
    got = allocation.sampled_head_mass(query, key, 0.5, BLOCK, BLOCK)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kept_blocks_are_what_each_rule_keeps_on_every_input():
    model = tiny_model("llama")
    rules = (StaticRule(1, 20.0, 0.0), DenseRule(), GateRule(0.35, local=2, tail=1), GateRule(0.2))
    plan = gated_plan(model, lambda layer, head: rules[head])
    n = 150  # 10 blocks, the last of 22 tokens
    kept = allocation.kept_blocks(plan, 0, n)
    nb = num_blocks(n, BLOCK)
    assert torch.equal(kept[0], rules[0].block_mask(n, BLOCK)) and torch.equal(
        kept[1], rules[1].block_mask(n, BLOCK)
    )
    for h in (2, 3):
        rule, want = rules[h], torch.zeros(nb, nb, dtype=torch.bool)
        k, window = rule.blocks_per_row(n, BLOCK), rule.local_blocks(n, BLOCK)
        for r in range(nb):
            for c in range(r + 1):
                whole = r + 1 <= k or r >= nb - rule.tail
                want[r, c] = whole or c == 0 or r - c < window
        assert torch.equal(kept[h], want), h
    assert kept[2].sum() > kept[3].sum()  # a wider window and a dense tail row


def brute_allocation(mass, n, kept, budget):
    """Loops: the ``kept`` blocks, then other causal blocks by mass per pair (ties in head, row,
    column order) while the next one fits in ``budget``."""
    pairs = causal_block_pairs(n, BLOCK)
    b, h, nb, _ = mass.shape
    out = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for s in range(b):
        forced = [(i, r, c) for i in range(h) for r in range(nb) for c in range(r + 1)
                  if kept[i, r, c]]  # fmt: skip
        spent = sum(float(pairs[r, c]) for _, r, c in forced)
        for i, r, c in forced:
            out[s, i, r, c] = True
        rest = [(-float(mass[s, i, r, c]) / float(pairs[r, c]), i, r, c) for i in range(h) for r in range(nb)
                for c in range(r + 1) if not out[s, i, r, c]]  # fmt: skip
        for _, i, r, c in sorted(rest, key=lambda t: t[0]):
            if spent + float(pairs[r, c]) > budget:
                break
            spent += float(pairs[r, c])
            out[s, i, r, c] = True
    return out


@pytest.mark.parametrize("rules", [mixed(seed=2), static_rules, roomy])
def test_every_query_sampled_allocates_by_exact_mass_around_the_kept_blocks(rules):
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=2)
    g = torch.Generator().manual_seed(8)
    n = 150
    query = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64)
    key = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
    got = allocation.allocated_rows(plan, 1, query, key, 0.5, BLOCK)
    mass = pooled_attention(query, key, 0.5, BLOCK, "sum")
    want = brute_allocation(mass, n, allocation.kept_blocks(plan, 1, n), layer_budget(plan, 1, n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("rules", [mixed(seed=3), static_rules])
def test_every_query_sampled_through_the_model_equals_a_masked_reference_of_the_brute_allocation(rules):
    """The runtime path (prompt in one call, GQA, every head kind) against dense softmax under the
    token mask of :func:`brute_allocation` on each layer's exact block mass."""
    from moa_compress.attn_interface import use_attention
    from tests.factories import dense_masked_attention

    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=3)

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        n, layer = query.shape[2], module.layer_idx
        mass = pooled_attention(query, key, scaling, BLOCK, "sum")
        rows = brute_allocation(mass, n, allocation.kept_blocks(plan, layer, n), layer_budget(plan, layer, n))
        tokens = torch.arange(n)
        mask = rows[:, :, tokens // BLOCK][..., tokens // BLOCK] & (tokens[None, :] <= tokens[:, None])
        return dense_masked_attention(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None

    x = ids(2, 150, seed=2)
    with torch.no_grad():
        with use_attention(model, "allocation_reference", reference):
            want = model(x).logits
        with apply_plan(model, plan, backend="reference", ranking=layer_ranking(BLOCK)):
            got = model(x).logits
    assert (got - want).abs().max() <= 1e-9


@pytest.mark.parametrize("rules", [mixed(seed=2), static_rules])
def test_the_whole_layer_budget_with_every_query_sampled_is_the_oracle_layer_through_the_model(rules):
    """``sampled-layer-all``: every head keeps only its sink and diagonal, so with every query sampled
    it is the eval's oracle-layer selection (a plan without gate heads changes too)."""
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=2)
    x = ids(2, 150, seed=2)
    whole = PrefillRanking(BLOCK, scope="layer-all")
    with torch.no_grad():
        with apply_oracle(model, plan, "oracle-layer", backend="reference"):
            want = model(x).logits
        with apply_plan(model, plan, backend="reference", ranking=whole):
            got = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            plain = model(x).logits
    assert (got - want).abs().max() <= 1e-9 and (got - plain).abs().max() > 1e-4


@pytest.mark.parametrize("rules,moves", [(mixed(seed=2), True), (static_rules, False)])
def test_a_layer_ranking_moves_gate_heads_blocks_only_and_in_no_layer_is_the_plan(rules, moves):
    """Static and dense heads keep their rules' blocks, so a plan without gate heads is unchanged."""
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=2)
    x = ids(2, 150, seed=2)
    with torch.no_grad():
        with apply_plan(model, plan, backend="reference", ranking=layer_ranking(4)):
            got = model(x).logits
        with apply_plan(model, plan, backend="reference", ranking=layer_ranking(4, set())):
            untouched = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            plain = model(x).logits
    assert torch.equal(untouched, plain)
    assert ((got - plain).abs().max() > 1e-4) if moves else ((got - plain).abs().max() <= 1e-12)


def test_a_few_samples_keep_the_rules_blocks_and_never_spend_more_than_the_plan(monkeypatch):
    model = tiny_model("qwen2", dtype=torch.float64)
    plan = gated_plan(model, roomy, seed=5)
    spent, chosen = [], []
    exact = allocation.allocated_rows

    def counted(plan, layer, query, key, scale, samples, keep_rules):
        assert keep_rules
        rows = exact(plan, layer, query, key, scale, samples, keep_rules)
        n = query.shape[2]
        pairs = (rows * causal_block_pairs(n, BLOCK)).sum((1, 2, 3))  # per sequence
        spent.append((pairs, layer_budget(plan, layer, n)))
        kept = allocation.kept_blocks(plan, layer, n)
        assert (rows | ~kept).all()
        mass = pooled_attention(query, key, scale, BLOCK, "sum")
        by_mass = top_blocks_in_layer(mass, n, BLOCK, layer_budget(plan, layer, n), kept)
        chosen.append(torch.equal(rows, by_mass))
        return rows

    monkeypatch.setattr(allocation, "allocated_rows", counted)
    with torch.no_grad(), apply_plan(model, plan, backend="torch", ranking=layer_ranking(1)):
        model(ids(2, 301, seed=6))
    assert len(spent) == plan.model.num_layers
    for pairs, budget in spent:
        assert (pairs <= budget).all() and (pairs > budget - BLOCK * BLOCK).all()  # within one block
    assert not all(chosen)  # one sample per block estimates the mass, not exactly


@pytest.mark.parametrize("min_length", [0, 31])  # 31: the 53-token row allocated, the 30 and 17 not
@pytest.mark.parametrize("rules", [mixed(seed=4), static_rules])
def test_left_padded_batch_allocated_equals_each_row_alone(rules, min_length, monkeypatch):
    """Prompt and decode steps of a left-padded batch through the default cache and a PlanKVCache:
    each row is allocated over its own tokens (if it is long enough), as alone."""
    from transformers import DynamicCache

    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "GATHER_MAX_FRACTION", 1.0)
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=4)
    seqs = [ids(1, n, seed=40 + n)[0] for n in (53, 30, 17)]
    batch, mask = left_padded(seqs)
    extra = ids(len(seqs), 12, seed=9)

    caches = {
        "dynamic": lambda n: DynamicCache(config=model.config),
        "plan": lambda n: PlanKVCache(model.config, plan, max_length=n + 12),
    }
    ranking = PrefillRanking(3, scope="layer", min_length=min_length)
    with torch.no_grad(), apply_plan(model, plan, backend="torch", ranking=ranking):
        for make in caches.values():
            together = padded_run(model, batch, mask, extra, make(batch.shape[1]))
            for r, q in enumerate(seqs):
                alone = padded_run(
                    model, q[None], torch.ones(1, len(q), dtype=torch.long), extra[r : r + 1], make(len(q))
                )
                pad = batch.shape[1] - len(q)
                assert (together[r, pad:] - alone[0]).abs().max() <= 1e-9, r


@pytest.mark.parametrize("rules", [mixed(seed=2), roomy])
def test_only_a_prompts_first_call_is_allocated_and_plan_kv_cache_decodes_as_the_default_cache(
    rules, monkeypatch
):
    """A prompt in chunks then one token at a time: the first chunk allocated (its queries are every
    query so far), later chunks and steps by the plan's rules and gates — the same logits through the
    default cache and a PlanKVCache, and the first chunk's logits those of the allocated prompt alone."""
    from transformers import DynamicCache

    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "GATHER_MAX_FRACTION", 1.0)
    model = tiny_model("mistral", dtype=torch.float64)
    plan = gated_plan(model, rules, seed=6)
    x = ids(1, 260, seed=7)
    steps = [*itertools.pairwise((0, 197, 230)), *((i, i + 1) for i in range(230, 260))]
    ranking = layer_ranking(4)

    def run(cache):
        kw = {cache_kwarg(model): cache, "use_cache": True}
        return torch.cat([model(x[:, a:b], **kw).logits for a, b in steps], 1)

    with torch.no_grad():
        with apply_plan(model, plan, backend="torch", ranking=ranking):
            dynamic = run(DynamicCache(config=model.config))
            planned = run(PlanKVCache(model.config, plan, max_length=270))
            first = model(x[:, :197]).logits
        with apply_plan(model, plan, backend="torch"):
            plain = run(DynamicCache(config=model.config))
    assert (dynamic - planned).abs().max() <= 1e-9
    assert (dynamic[:, :197] - first).abs().max() <= 1e-12
    assert (dynamic - plain).abs().max() > 1e-4


def test_layer_ranking_parses_describes_and_is_refused_where_it_cannot_apply():
    ranking = PrefillRanking.parse("sampled-layer:16", "0-1")
    assert (
        ranking == PrefillRanking(16, {0, 1}, "layer")
        and ranking.describe() == "sampled-layer:16 in layers 0-1"
    )
    assert (
        ranking.allocates(1, 80, 80) and not ranking.allocates(1, 40, 80) and not ranking.allocates(2, 80, 80)
    )
    assert not ranking.allocates(0, 1, 1) and not ranking.applies(0, 80, 80)  # row ranking is the other scope
    assert not PrefillRanking(4).allocates(0, 80, 80)
    longer = PrefillRanking.parse("sampled-layer:16", min_length=100)
    assert longer.allocates(0, 100, 100) and not longer.allocates(0, 99, 99)
    assert longer.describe() == "sampled-layer:16 from 100 tokens"
    assert PrefillRanking(4, min_length=100).applies(0, 20, 100) and not PrefillRanking(
        4, min_length=100
    ).applies(0, 20, 99)
    with pytest.raises(PlanRuntimeError, match="min_length must be a whole number"):
        PrefillRanking(4, min_length=-1)
    with pytest.raises(PlanRuntimeError, match="scope must be one of row, layer, layer-all"):
        PrefillRanking(4, scope="head")
    whole = PrefillRanking.parse("sampled-layer-all:8")
    assert whole == PrefillRanking(8, scope="layer-all") and whole.describe() == "sampled-layer-all:8"
    assert whole.allocates(0, 80, 80) and not whole.keeps_rules and ranking.keeps_rules
    for bad in ("sampled-layer:0", "sampled-layer", "layer:4", "sampled-layer-all:x"):
        with pytest.raises(PlanRuntimeError, match="sampled-layer:R") as err:
            PrefillRanking.parse(bad)
        assert "\n" not in str(err.value)


def test_eval_and_generate_take_a_layer_ranking(tmp_path):
    import json

    from typer.testing import CliRunner

    from moa_compress.cli import app
    from tests.test_gate_runtime import saved_model_and_plan

    base = saved_model_and_plan(tmp_path, static_rules)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", *base, "--tasks", "passkey", "--lengths", "160", "--limit", "1",
                                      "--ranking", "sampled-layer:4", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["settings"]["ranking"] == "sampled-layer:4"
    result = CliRunner().invoke(app, ["generate", *base, "--prompt", "hi there", "--max-new-tokens", "2",
                                      "--ranking", "sampled-layer:2", "--ranking-layers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", *base, "--tasks", "passkey", "--lengths", "160", "--limit", "1",
                                      "--ranking", "sampled-layer:4", "--ranking-min-length", "1000",
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["ranking"] == "sampled-layer:4 from 1000 tokens"
    for bad in (
        ["--ranking-min-length", "64"],
        ["--ranking", "sampled-layer:4", "--ranking-min-length", "-1"],
    ):
        result = CliRunner().invoke(app, ["eval", *base, "--tasks", "passkey", "--lengths", "160", *bad])
        assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output, bad
