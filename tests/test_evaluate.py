"""moa_compress.evaluate / report and the ``eval`` command, on tiny models with a word-level tokenizer."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from moa_compress import evaluate, oracle, report, tasks
from moa_compress.cli import app
from moa_compress.data import DataError
from moa_compress.evaluate import (
    EvalError,
    evaluate_plan,
    final_hidden,
    greedy_replies,
    log_probs,
    uniform_baseline,
)
from moa_compress.plan import (
    DenseRule,
    Plan,
    PlanError,
    StaticRule,
    causal_block_pairs,
    identity_of,
    rule_density,
    rules_everywhere,
    save_plan,
    uniform_plan,
)
from moa_compress.tasks import PasskeySample, TaskError, passkey_depths, passkey_samples
from tests.factories import (
    dense_masked_attention,
    random_qkv,
    tiny_bpe_tokenizer,
    tiny_model,
    tiny_tokenizer,
)

PROSE = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees near "
    "an old river and people walk slowly home after long days of work in the busy town"
)
WORDS = PROSE.split()
BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a loaded 2-core machine a second thread makes these
    tests ~50x slower (intra-op threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    prompts = [tasks.PASSKEY_INTRO, tasks.PASSKEY_FILLER, tasks.PASSKEY_NEEDLE, tasks.PASSKEY_QUESTION]
    return tiny_tokenizer([PROSE, *prompts])


def make_model(tokenizer, dtype=torch.float32, max_pos=1024, seed=0, family="llama"):
    return tiny_model(family, seed=seed, dtype=dtype, vocab=len(tokenizer), max_pos=max_pos)


def make_texts(count=3, words=700, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(count)]


def sparse_plan(model, heads_window=(32, 48, 64, 16)) -> Plan:
    """Different windows per head (and one dense head in layer 0): a non-uniform plan."""
    identity = identity_of(model)
    rows = []
    for layer in range(identity.num_layers):
        heads = [
            StaticRule(1, float(heads_window[h % len(heads_window)]), 0.0) for h in range(identity.num_heads)
        ]
        if layer == 0:
            heads[0] = DenseRule()
        rows.append(tuple(heads))
    return Plan(model=identity, rules=tuple(rows), block_size=BLOCK, lengths=(128, 256))


def dense_plan(model) -> Plan:
    """Every head dense (the model's window layers, if any, keep their window)."""
    identity = identity_of(model)
    return Plan(
        model=identity, rules=rules_everywhere(identity, DenseRule()), block_size=BLOCK, lengths=(128,)
    )


# ----------------------------------------------------------------------------------------------
# Passkey generator


@pytest.mark.parametrize("length", [160, 301])
def test_passkey_samples_answers_check_out(tokenizer, length):
    samples = passkey_samples(tokenizer, length, 6, seed=3)
    assert [s.depth for s in samples] == list(tasks.PASSKEY_DEPTHS)
    needle_starts = []
    for s in samples:
        assert isinstance(s, PasskeySample)
        assert len(s.input_ids) == length
        assert len(s.key) == 5 and s.key.isdigit() and s.key[0] != "0"
        # The answer at the end is the key, digit for digit.
        assert tokenizer.decode(s.input_ids[s.key_start :]).replace(" ", "") == s.key
        # The needle sentence sits at needle_start and names the same key.
        needle = tokenizer(tasks.PASSKEY_NEEDLE.format(key=s.key), add_special_tokens=False)["input_ids"]
        assert list(s.input_ids[s.needle_start : s.needle_start + len(needle)]) == needle
        assert tokenizer.decode(s.input_ids).count(" ".join(s.key)) == 3  # twice in the needle, once answered
        needle_starts.append(s.needle_start)
    assert needle_starts == sorted(needle_starts) and len(set(needle_starts)) > 1
    # The needle's position follows its depth within the filler.
    first, last = samples[0], samples[-1]
    assert first.needle_start < 0.4 * length < 0.6 * length < last.needle_start


def test_passkey_samples_are_seeded(tokenizer):
    a = passkey_samples(tokenizer, 200, 5, seed=0)
    assert a == passkey_samples(tokenizer, 200, 5, seed=0)
    b = passkey_samples(tokenizer, 200, 5, seed=1)
    assert [s.key for s in a] != [s.key for s in b]


def test_passkey_samples_through_the_chat_template(tokenizer):
    sample = passkey_samples(tokenizer, 200, 1)[0]
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|> user There is an important")
    assert "<|im_start|> assistant The pass key is" in text


def test_passkey_depths_spread_evenly():
    assert passkey_depths(1) == [0.6]
    assert passkey_depths(3) == [0.0, 0.4, 1.0]
    assert passkey_depths(6) == list(tasks.PASSKEY_DEPTHS)
    assert passkey_depths(8)[6:] == [0.0, 0.2]
    assert sorted(passkey_depths(evaluate.DEFAULT_PASSKEY_SAMPLES)) == sorted(5 * tasks.PASSKEY_DEPTHS)


def test_passkey_too_short_length_is_an_error(tokenizer):
    with pytest.raises(TaskError, match="too short for the passkey prompt"):
        passkey_samples(tokenizer, 40, 1)


# ----------------------------------------------------------------------------------------------
# Pieces


def test_chunked_log_probs_match_the_model(tokenizer):
    model = make_model(tokenizer, dtype=torch.float64)
    ids = torch.randint(0, len(tokenizer), (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0], -1)
        got = log_probs(model, final_hidden(model, ids))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_score_window_nll_and_zero_kl_against_itself(tokenizer, monkeypatch):
    monkeypatch.setattr(evaluate, "LOGIT_CHUNK", 7)  # several chunks, the last one short
    model = make_model(tokenizer, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, model.config.hidden_size, generator=g, dtype=torch.float64)
    other = hidden + 0.5 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    targets = torch.randint(0, len(tokenizer), (30,), generator=g)
    same, diff = evaluate._Sums(), evaluate._Sums()
    with torch.no_grad():
        evaluate.score_window(model, hidden, targets, hidden, same)
        evaluate.score_window(model, other, targets, hidden, diff)
        logits = model.get_output_embeddings()(other).float()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        ref = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)
        kl = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum()
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1 == 30 and same.tokens == 30
    assert diff.nll == pytest.approx(float(nll), rel=1e-5)
    assert diff.kl == pytest.approx(float(kl), rel=1e-4) and diff.kl > 0
    assert diff.window_nll == pytest.approx([float(nll) / 30], rel=1e-5)
    assert diff.window_kl == pytest.approx([float(kl) / 30], rel=1e-4)
    with torch.no_grad():  # a second window: its own entry, the totals token-weighted
        evaluate.score_window(model, hidden[:10], targets[:10], None, diff)
    assert len(diff.window_nll) == 2 and len(diff.window_kl) == 1  # no reference, no KL entry
    assert diff.nll / diff.tokens == pytest.approx((30 * diff.window_nll[0] + 10 * diff.window_nll[1]) / 40)


def test_uniform_baseline_matches_the_plan_density_and_sink(tokenizer):
    model = make_model(tokenizer)
    plan = sparse_plan(model)
    for n in (128, 256, 1000):
        base = uniform_baseline(plan, n)
        rule = base.rules[0][0]
        assert isinstance(rule, StaticRule) and rule.sink_blocks == 1 and rule.beta == 0.0
        assert len({r for heads in base.rules for r in heads}) == 1
        # No other window is nearer to the plan's density.
        target = plan.density(n)
        for alpha in range(BLOCK, n + BLOCK, BLOCK):
            other = rule_density(StaticRule(1, float(alpha), 0.0), n, BLOCK)
            assert abs(base.density(n) - target) <= abs(other - target) + 1e-12
    sink2 = uniform_plan(identity_of(model), 0.4, [256], block_size=BLOCK, sink_blocks=2)
    assert uniform_baseline(sink2, 256).rules[0][0].sink_blocks == 2
    assert uniform_baseline(dense_plan(model), 128).is_dense()


# ----------------------------------------------------------------------------------------------
# The evaluation


def test_evaluate_plan_fills_the_schema(tokenizer):
    model = make_model(tokenizer)
    plan = sparse_plan(model)
    texts = make_texts()
    kw = {"texts": texts, "limit": 3, "backend": "reference", "progress": False}
    results = evaluate_plan(model, tokenizer, plan, lengths=(176, 112), **kw)
    assert results["schema_version"] == 2
    assert results["settings"]["lengths"] == [112, 176]
    assert results["model"]["fingerprint"] == plan.model.fingerprint
    assert set(results["results"]) == {"dense", "plan", "uniform"}
    assert results["uniform"]["same_as_plan"] == {"112": False, "176": False}
    for n in ("112", "176"):
        assert results["plan"]["density"][n] == pytest.approx(plan.density(int(n)))
        assert 0 < results["uniform"]["density"][n] < 1
        for variant in ("dense", "plan", "uniform"):
            ppl = results["results"][variant]["ppl"][n]
            assert ppl["windows"] == 3 and ppl["tokens"] == 3 * int(n) // 2
            assert math.isfinite(ppl["ppl"]) and ppl["ppl"] == pytest.approx(math.exp(ppl["nll"]))
            passkey = results["results"][variant]["passkey"][n]
            assert passkey["samples"] == 3 and 0 <= passkey["accuracy"] <= 1 and passkey["answer_logprob"] < 0
            assert passkey["accuracy"] == sum(passkey["correct"]) / 3
            assert list(passkey["by_depth"]) == ["0", "0.4", "1"]
        assert "fidelity" not in results["results"]["dense"]
        for variant in ("plan", "uniform"):
            fid = results["results"][variant]["fidelity"][n]
            assert fid["kl"] > 0 and 0 <= fid["top1"] <= 1 and fid["tokens"] == 3 * int(n) // 2
    json.dumps(results)  # JSON-ready
    again = evaluate_plan(model, tokenizer, plan, lengths=(112, 176), **kw)
    assert again["results"] == results["results"]  # deterministic


def test_a_layer_ranking_reallocates_the_plan_and_leaves_the_uniform_baseline_alone(tokenizer):
    """``ranking="sampled-layer-all:R"`` (which would change a static plan too) changes the plan's
    figures only: the uniform baseline is never ranked."""
    from tests.test_gate_runtime import gated_plan, roomy

    model = make_model(tokenizer, dtype=torch.float64)
    kw = {
        "tasks": "ppl,fidelity",
        "texts": make_texts(),
        "limit": 2,
        "backend": "reference",
        "progress": False,
    }
    plan = gated_plan(model, roomy)
    plain = evaluate_plan(model, tokenizer, plan, lengths=[320], **kw)
    ranked = evaluate_plan(model, tokenizer, plan, lengths=[320], ranking="sampled-layer-all:4", **kw)
    assert ranked["settings"]["ranking"] == "sampled-layer-all:4"
    assert ranked["results"]["uniform"] == plain["results"]["uniform"]
    assert ranked["results"]["plan"]["fidelity"] != plain["results"]["plan"]["fidelity"]


def test_density_one_plan_equals_dense(tokenizer):
    model = make_model(tokenizer, dtype=torch.float64)
    results = evaluate_plan(
        model,
        tokenizer,
        dense_plan(model),
        tasks="ppl,fidelity,passkey",
        lengths=[128],
        texts=make_texts(),
        limit=3,
        backend="reference",
        progress=False,
    )
    by = results["results"]
    assert results["plan"]["density"]["128"] == 1.0 and results["uniform"]["density"]["128"] == 1.0
    assert results["uniform"]["same_as_plan"] == {"128": True}
    for variant in ("plan", "uniform"):
        assert by[variant]["fidelity"]["128"]["kl"] == pytest.approx(0.0, abs=1e-10)
        assert by[variant]["fidelity"]["128"]["top1"] == 1.0
        assert by[variant]["ppl"]["128"]["ppl"] == pytest.approx(by["dense"]["ppl"]["128"]["ppl"], rel=1e-9)
        assert by[variant]["passkey"]["128"]["answer_logprob"] == pytest.approx(
            by["dense"]["passkey"]["128"]["answer_logprob"], rel=1e-9
        )
        assert by[variant]["passkey"]["128"]["correct"] == by["dense"]["passkey"]["128"]["correct"]


def test_dense_ppl_matches_a_direct_computation(tokenizer, monkeypatch):
    """Windows at a shorter length are the ends of the longest ones; loss on their second half."""
    monkeypatch.setattr(evaluate, "variant", lambda model, plan, *runtime: evaluate.contextlib.nullcontext())
    model = make_model(tokenizer, dtype=torch.float64)
    texts = make_texts()
    results = evaluate_plan(
        model,
        tokenizer,
        sparse_plan(model),
        tasks="ppl",
        lengths=[96, 256],
        texts=texts,
        limit=3,
        progress=False,
    )
    cuts = evaluate.token_windows(texts, tokenizer, 256, limit=3)
    for n in (96, 256):
        ids = torch.tensor([cut[256 - n :] for cut in cuts])
        with torch.no_grad():
            logits = model(ids).logits[:, n // 2 - 1 : -1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, n // 2 :].reshape(-1)
        )
        got = results["results"]["dense"]["ppl"][str(n)]
        assert got["nll"] == pytest.approx(float(nll), rel=1e-9)
        assert got["windows"] == 3 and got["tokens"] == 3 * (n - n // 2)
        per_window = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, n // 2 :], reduction="none"
        ).mean(-1)  # [windows]
        assert got["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Oracles


def brute_block_mass(q, k, scale, bs):
    """Independent: the full causal softmax per query head (keys repeated), summed block by block."""
    b, hq, n, _ = q.shape
    probs = (q @ k.repeat_interleave(hq // k.shape[1], 1).transpose(-1, -2)) * scale
    probs = probs.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    nb = -(-n // bs)
    out = torch.zeros(b, hq, nb, nb, dtype=probs.dtype)
    for i in range(nb):
        for j in range(nb):
            out[..., i, j] = probs[..., i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].sum((-1, -2))
    return out


@pytest.mark.parametrize("slab_bytes", [1, 10**9])  # one query block per slab; everything at once
def test_block_mass_matches_brute_force(slab_bytes):
    q, k, _ = random_qkv(b=2, hq=6, hkv=2, sq=77, d=8, seed=3)
    got = oracle.block_mass(q, k, 0.3, BLOCK, slab_bytes=slab_bytes)
    assert got.dtype == torch.float64 and got.shape == (2, 6, 5, 5)
    torch.testing.assert_close(got, brute_block_mass(q, k, 0.3, BLOCK), rtol=1e-12, atol=1e-12)
    # Each query row's attention sums to 1: a query block of r rows holds mass r.
    torch.testing.assert_close(got.sum(-1)[0, 0], torch.tensor([16.0] * 4 + [13.0], dtype=torch.float64))


def random_mass(heads, n, seed=0):
    q, k, _ = random_qkv(b=1, hq=heads, hkv=2, sq=n, d=8, seed=seed)
    return oracle.block_mass(3 * q, k, 1.0, BLOCK)  # sharp attention: masses differ a lot


def forced_blocks(nb):
    rows, cols = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    return (cols <= rows) & ((cols == 0) | (cols == rows))


def test_oracle_keeps_sink_diagonal_and_the_best_blocks_at_each_heads_density(tokenizer):
    plan = sparse_plan(make_model(tokenizer))
    n = 200  # 12 full blocks and a ragged one
    nb, total = -(-n // BLOCK), n * (n + 1) / 2
    pairs = causal_block_pairs(n, BLOCK)
    causal = pairs > 0
    for layer in range(2):
        mass = random_mass(4, n, seed=layer)
        blocks = oracle.head_blocks(plan, layer, n)
        mask = oracle.top_blocks_per_row(mass, blocks)[0]
        assert not (mask & ~causal).any()
        assert (mask | ~forced_blocks(nb)).all()  # every sink and diagonal kept
        for h, rule in enumerate(plan.rules[layer]):
            # The head computes exactly the pairs its plan rule computes.
            assert float(pairs[mask[h]].sum()) == pytest.approx(
                rule_density(rule, n, BLOCK) * total, abs=1e-6
            )
            k = int(blocks[h])
            for row in range(nb):
                assert int(mask[h, row].sum()) == min(k, row + 1)
                others = causal[row] & ~forced_blocks(nb)[row]
                kept, dropped = (
                    mass[0, h, row][mask[h, row] & others],
                    mass[0, h, row][~mask[h, row] & others],
                )
                if len(kept) and len(dropped):
                    assert kept.min() >= dropped.max()
    dense = oracle.top_blocks_per_row(
        random_mass(4, n), oracle.head_blocks(dense_plan(make_model(tokenizer)), 0, n)
    )
    assert torch.equal(dense[0], causal.expand(4, nb, nb))


@pytest.mark.parametrize("n", [200, 256])
def test_oracle_layer_spends_the_layer_budget_by_mass_per_pair_and_never_more(tokenizer, n):
    plan = sparse_plan(make_model(tokenizer))
    nb = -(-n // BLOCK)
    pairs = causal_block_pairs(n, BLOCK)
    causal = pairs > 0
    for layer in range(2):
        mass = random_mass(4, n, seed=10 + layer)
        budget = oracle.layer_budget(plan, layer, n)
        assert budget == round(sum(rule_density(r, n, BLOCK) for r in plan.rules[layer]) * n * (n + 1) / 2)
        mask = oracle.top_blocks_in_layer(mass, n, BLOCK, budget)[0]
        assert not (mask & ~causal).any() and (mask | ~forced_blocks(nb)).all()
        spent = float((mask * pairs).sum())
        assert spent <= budget and budget - spent < BLOCK * BLOCK  # spent, to less than one block
        # Heads share the budget: they need not each get their own rule's share.
        others = causal & ~forced_blocks(nb)
        per_pair = mass[0] / pairs.clamp(min=1)
        assert per_pair[mask & others].min() >= per_pair[~mask & others].max()
    full = oracle.top_blocks_in_layer(random_mass(4, n), n, BLOCK, 4 * n * (n + 1) // 2)[0]
    assert torch.equal(full, causal.expand(4, nb, nb))


def test_the_per_head_oracle_of_the_bench_spends_each_heads_own_budget(tokenizer):
    """bench/oracle_head.py's ceiling: each head its own rule's pairs, over its rows by mass per pair."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "oracle_head.py"
    select = runpy.run_path(str(script))["per_head_selection"]
    plan = sparse_plan(make_model(tokenizer))
    n = 200
    nb = -(-n // BLOCK)
    pairs = causal_block_pairs(n, BLOCK)
    causal = pairs > 0
    others = causal & ~forced_blocks(nb)
    handle = oracle.OracleHandle(None, plan, "oracle", "torch", 1 << 20)
    for layer in range(2):
        mass = random_mass(4, n, seed=20 + layer)
        mask = select(handle, layer, mass, n)[0]
        assert not (mask & ~causal).any() and (mask | ~forced_blocks(nb)).all()
        for h, rule in enumerate(plan.rules[layer]):
            budget = rule_density(rule, n, BLOCK) * n * (n + 1) / 2
            spent = float((mask[h] * pairs).sum())
            assert spent <= budget + 1e-6 and budget - spent < BLOCK * BLOCK
            per_pair = mass[0, h] / pairs.clamp(min=1)
            if (mask[h] & others).any() and (~mask[h] & others).any():
                assert per_pair[mask[h] & others].min() >= per_pair[~mask[h] & others].max()
        # Rows differ: a head's blocks are not spread evenly over its rows as the per-row oracle's are.
        assert len({int(c) for c in (mask & others).sum(-1).flatten()}) > 2
    handle.kind = "oracle-layer"  # the other kind is the library's own
    mass = random_mass(4, n, seed=30)
    assert torch.equal(
        select(handle, 0, mass, n),
        oracle.top_blocks_in_layer(mass, n, BLOCK, oracle.layer_budget(plan, 0, n)),
    )


def test_the_pooled_gate_bench_keeps_each_inputs_block_count_and_ranks_by_gate_probability():
    """bench/pooled_gates.py: the layer's gate heads keep sink and local blocks and as many blocks in all
    as their per-row selection, the others by gate probability over heads and rows; other heads untouched."""
    import runpy
    from pathlib import Path

    from moa_compress.gates import gate_selections

    script = Path(__file__).resolve().parents[1] / "bench" / "pooled_gates.py"
    pooled_selection = runpy.run_path(str(script))["pooled_selection"]
    torch.manual_seed(0)
    b, nq, nk = 2, 9, 13  # the last 9 of 13 blocks
    scores = torch.randn(b, 2, nq, nk) * 3
    rows = torch.arange(nk - nq, nk)[:, None]
    scores = scores.masked_fill(torch.arange(nk)[None, :] > rows, float("-inf"))
    blocks = torch.tensor([3, 5, 0, 4])  # head 2 is no gate head
    gate_of_head = torch.tensor([0, 0, 1, 1])
    local = torch.tensor([1, 2, 1, 8])  # head 3's window is cut to its blocks - 1, as per row
    per_row = gate_selections(scores, blocks, gate_of_head, local)
    pooled = pooled_selection(scores, blocks, gate_of_head, local, per_row)
    forced = gate_selections(scores, torch.tensor([2, 3, 0, 4]), gate_of_head, local)
    causal = (torch.arange(nk)[None, :] <= rows).expand(b, 4, nq, nk)
    assert not (pooled & ~causal).any() and (pooled | ~forced).all()
    assert not pooled[:, 2].any()
    probs = scores.softmax(-1)[:, gate_of_head]
    for i in range(b):
        assert int(pooled[i].sum()) == int(per_row[i].sum())
        others = causal[i] & ~forced[i] & (blocks > 0)[:, None, None]
        kept, dropped = probs[i][pooled[i] & others], probs[i][~pooled[i] & others]
        assert kept.min() >= dropped.max()
        assert not torch.equal(pooled[i], per_row[i])  # heads' shares moved


def brute_oracle_mask(mass, blocks):  # [H, nB, nB], [H] -> [H, nB, nB] bool, one row at a time
    h, nb, _ = mass.shape
    out = torch.zeros(h, nb, nb, dtype=torch.bool)
    for head in range(h):
        for row in range(nb):
            others = sorted(range(1, row), key=lambda j: -float(mass[head, row, j]))
            for j in [0, row, *others][: max(int(blocks[head]), 2)]:
                out[head, row, j] = True
    return out


@pytest.mark.parametrize("kind", oracle.ORACLES)
def test_oracle_attention_computes_its_selection(tokenizer, kind):
    """One layer call through the attention function equals dense attention under the selection,
    the per-row selection built one row at a time by an independent brute force."""
    plan = sparse_plan(make_model(tokenizer))
    q, k, v = random_qkv(b=1, hq=4, hkv=2, sq=150, d=16, seed=5)
    handle = oracle.OracleHandle(None, plan, kind, "reference", oracle.DEFAULT_SLAB_BYTES)
    layer = type("Layer", (), {"layer_idx": 1})()
    out, _ = handle.attention(layer, q, k, v, None, scaling=0.25)
    mass = brute_block_mass(q, k, 0.25, BLOCK)
    if kind == "oracle":
        blocks = brute_oracle_mask(mass[0], oracle.head_blocks(plan, 1, 150))[None]
    else:
        blocks = oracle.top_blocks_in_layer(mass, 150, BLOCK, oracle.layer_budget(plan, 1, 150))
    mask = blocks.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)[..., :150, :150]
    mask &= torch.ones(150, 150, dtype=torch.bool).tril()
    expected = dense_masked_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-10, atol=1e-10)
    assert handle.density == pytest.approx(float(mask.sum()) / (4 * 150 * 151 / 2))
    assert handle.density <= plan.density(150) + 1e-12


def oracle_run(tokenizer, model, plan, tasks="ppl,fidelity", **kw):
    return evaluate_plan(
        model,
        tokenizer,
        plan,
        tasks=tasks,
        lengths=[128, 176],
        texts=make_texts(),
        limit=2,
        backend="reference",
        progress=False,
        oracle=True,
        **kw,
    )


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: its 40-token window layer stays the model's
def test_oracles_of_a_density_one_plan_equal_dense(tokenizer, family):
    model = make_model(tokenizer, dtype=torch.float64, family=family)
    before = model.config._attn_implementation
    # Passkey: two prompts per length, one batch of two.
    results = oracle_run(tokenizer, model, dense_plan(model), tasks="ppl,fidelity,passkey")
    assert model.config._attn_implementation == before  # restored
    by = results["results"]
    for name in oracle.ORACLES:
        for n in ("128", "176"):
            assert results["oracles"][name]["density"][n] == 1.0
            assert by[name]["fidelity"][n]["kl"] == pytest.approx(0.0, abs=1e-10)
            assert by[name]["fidelity"][n]["top1"] == 1.0
            assert by[name]["ppl"][n]["ppl"] == pytest.approx(by["dense"]["ppl"][n]["ppl"], rel=1e-9)
            assert results["oracles"]["ratio"]["plan"][name][n] == {"ppl_gap": None, "kl": None}
            mine, dense = by[name]["passkey"][n], by["dense"]["passkey"][n]
            assert mine["samples"] == dense["samples"] == 2
            assert mine["correct"] == dense["correct"]
            assert mine["answer_logprob"] == pytest.approx(dense["answer_logprob"], abs=1e-9)
            assert list(mine["by_depth"]) == list(dense["by_depth"])
            for depth, stats in mine["by_depth"].items():
                assert stats["accuracy"] == dense["by_depth"][depth]["accuracy"]
                assert stats["answer_logprob"] == pytest.approx(
                    dense["by_depth"][depth]["answer_logprob"], abs=1e-9
                )


def test_oracles_of_a_sparse_plan_fill_the_schema(tokenizer, tmp_path):
    model = make_model(tokenizer)
    plan = sparse_plan(model)
    results = oracle_run(tokenizer, model, plan)
    assert results["settings"]["oracle"] is True
    assert set(results["results"]) == {"dense", "plan", "uniform", *oracle.ORACLES}
    by, ratio = results["results"], results["oracles"]["ratio"]
    for n in ("128", "176"):
        dense = by["dense"]["ppl"][n]["ppl"]
        # The per-row oracle computes each head's own density: exactly the plan's.
        assert results["oracles"]["oracle"]["density"][n] == pytest.approx(plan.density(int(n)), abs=1e-12)
        assert 0 < results["oracles"]["oracle-layer"]["density"][n] <= plan.density(int(n)) + 1e-12
        for name in oracle.ORACLES:
            fid = by[name]["fidelity"][n]
            assert fid["kl"] > 0 and fid["windows"] == 2 and fid["tokens"] == 2 * (int(n) - int(n) // 2)
            for variant in ("plan", "uniform"):
                r = ratio[variant][name][n]
                assert r["kl"] == pytest.approx(by[variant]["fidelity"][n]["kl"] / fid["kl"])
                gap = by[name]["ppl"][n]["ppl"] / dense - 1
                expected = (by[variant]["ppl"][n]["ppl"] / dense - 1) / gap if gap > 0 else None
                assert r["ppl_gap"] == (pytest.approx(expected) if expected is not None else None)
    json.dumps(results)
    text = evaluate.write_report(results, tmp_path, plan).read_text()
    assert "## Oracle ceilings" in text and "× oracle-layer's" in text
    assert "| KL oracle | KL oracle-layer |" in text
    assert "plan KL = " in report.summary_text(results)
    without = evaluate_plan(
        model, tokenizer, plan, tasks="ppl", lengths=[128], texts=make_texts(), limit=2, progress=False
    )
    assert "oracles" not in without and set(without["results"]) == {"dense", "plan", "uniform"}
    assert "Oracle" not in evaluate.write_report(without, tmp_path / "plain", plan).read_text()
    with pytest.raises(EvalError, match="--oracle runs on the text tasks .* and passkey, not on the ruler"):
        evaluate_plan(
            model, tokenizer, plan, tasks="variable_tracking", lengths=[128], progress=False, oracle=True
        )


def passkey_oracle_run(tokenizer, model, plan, batch_size, **kw):
    """Passkey only, with the oracles: 4 prompts per length (batches of 3 and 1 at batch size 3)."""
    return evaluate_plan(
        model,
        tokenizer,
        plan,
        tasks="passkey",
        lengths=[128, 176],
        samples=4,
        batch_size=batch_size,
        backend="reference",
        progress=False,
        oracle=True,
        **kw,
    )


def test_oracles_run_on_passkey_in_batches_as_one_prompt_at_a_time(tokenizer):
    model = make_model(tokenizer, dtype=torch.float64)
    plan = sparse_plan(model)
    results = passkey_oracle_run(tokenizer, model, plan, batch_size=3)
    by = results["results"]
    assert set(by) == {"dense", "plan", "uniform", *oracle.ORACLES}
    for n in ("128", "176"):
        # The per-row oracle computes each head's own density on every prompt: exactly the plan's.
        assert results["oracles"]["oracle"]["density"][n] == pytest.approx(plan.density(int(n)), abs=1e-12)
        assert 0 < results["oracles"]["oracle-layer"]["density"][n] <= plan.density(int(n)) + 1e-12
        for name in oracle.ORACLES:
            mine, theirs = by[name]["passkey"][n], by["plan"]["passkey"][n]
            assert mine["samples"] == theirs["samples"] == len(mine["correct"]) == 4
            assert mine["accuracy"] == sum(mine["correct"]) / 4 and mine["answer_logprob"] < 0
            assert list(mine["by_depth"]) == list(theirs["by_depth"])
            assert [s["samples"] for s in mine["by_depth"].values()] == [
                s["samples"] for s in theirs["by_depth"].values()
            ]
            # No text task ran: nothing to give the gaps as multiples of.
            assert results["oracles"]["ratio"]["plan"][name][n] == {"ppl_gap": None, "kl": None}
    json.dumps(results)
    # Each sequence of a batch gets its own selection: batches of 3 score as prompts one by one.
    alone = passkey_oracle_run(tokenizer, model, plan, batch_size=1)["results"]
    for name in oracle.ORACLES:
        for n in ("128", "176"):
            mine, single = by[name]["passkey"][n], alone[name]["passkey"][n]
            assert mine["correct"] == single["correct"]
            assert mine["answer_logprob"] == pytest.approx(single["answer_logprob"], abs=1e-9)


def test_progress_counts_the_oracle_passes_on_passkey(tokenizer, monkeypatch):
    counted = {}

    @evaluate.contextlib.contextmanager
    def progress(enabled, total):
        counted["total"], counted["items"] = total, 0

        def advance(items, label):
            for item in items:
                counted["items"] += len(item) if isinstance(item, list | tuple) else 1
                yield item

        yield advance

    monkeypatch.setattr(evaluate, "_progress", progress)
    model = make_model(tokenizer)
    passkey_oracle_run(tokenizer, model, sparse_plan(model), batch_size=3)
    assert counted["total"] == counted["items"] == 5 * 2 * 4  # 5 variants, 2 lengths, 4 prompts


def test_report_shows_the_passkey_oracles(tokenizer, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    model = make_model(tokenizer)
    plan = sparse_plan(model)
    results = passkey_oracle_run(tokenizer, model, plan, batch_size=4)
    titles = {}
    save = report._save

    def keep_titles(fig, path):
        titles[path.name] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        save(fig, path)

    monkeypatch.setattr(report, "_save", keep_titles)
    text = evaluate.write_report(results, tmp_path, plan).read_text()
    shown = ["dense", "plan", "uniform", "oracle", "oracle-layer"]
    assert titles["needle_heatmap.png"] == [f"passkey accuracy: {v}" for v in shown] + [
        f"mean key log-prob: {v}" for v in shown
    ]
    assert "| acc oracle | acc oracle-layer | log-prob dense |" in text
    assert "| log-prob oracle | log-prob oracle-layer |" in text
    assert "| length | depth | samples | dense | plan | uniform | oracle | oracle-layer |" in text
    assert "On passkey also two **oracles**" in text and "## Oracle ceilings" in text
    accuracy = {v: round(100 * results["results"][v]["passkey"]["128"]["accuracy"]) for v in shown}
    phrase = f"plan passkey {accuracy['plan']}% vs oracle-layer's {accuracy['oracle-layer']}%"
    assert phrase in report.summary_text(results) and phrase in text
    # Without --oracle: the three variants only.
    plain = evaluate_plan(
        model, tokenizer, plan, tasks="passkey", lengths=[128], samples=2, backend="reference", progress=False
    )
    text = evaluate.write_report(plain, tmp_path / "plain", plan).read_text()
    assert len(titles["needle_heatmap.png"]) == 6 and "acc oracle" not in text


# ----------------------------------------------------------------------------------------------
# Greedy generation and the ruler tasks


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


def slow_greedy(model, prompt, reference, steps):
    """One prompt, no cache, no batch: full forwards, the spec for greedy_replies."""
    ids = torch.tensor([list(prompt) + list(reference)])
    lp = torch.log_softmax(model(ids).logits[0].double(), -1)[len(prompt) - 1 : -1]
    logprob = float(lp.gather(1, ids[0, len(prompt) :, None]).mean())
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :], logprob


def test_greedy_replies_left_padded_batch_matches_one_prompt_at_a_time(bpe):
    model = tiny_model("llama", dtype=torch.float64, vocab=len(bpe))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(bpe), (n,), generator=g).tolist() for n in (70, 45, 70)]
    references = [[5, 6, 7], [8], [9, 10]]
    plan = sparse_plan(model)
    with torch.no_grad():
        for applied in (None, plan):
            with evaluate.variant(model, applied, "reference"):
                replies, logprobs = greedy_replies(model, bpe, prompts, references, 5)
                for prompt, reference, reply, logprob in zip(
                    prompts, references, replies, logprobs, strict=True
                ):
                    alone, alone_lp = greedy_replies(model, bpe, [prompt], [reference], 5)
                    assert alone == [reply] and alone_lp[0] == pytest.approx(logprob, rel=1e-9)
                    if applied is None:
                        tokens, expected = slow_greedy(model, prompt, reference, 5)
                        assert reply == bpe.decode(tokens, skip_special_tokens=True)
                        assert logprob == pytest.approx(expected, rel=1e-9)


def test_greedy_replies_give_up_rows_early_without_touching_the_log_probs(bpe):
    model = tiny_model("llama", dtype=torch.float64, vocab=len(bpe))
    prompts, references = [[5] * 30, [6] * 30], [[7, 8], [9]]
    with torch.no_grad():
        full, full_lp = greedy_replies(model, bpe, prompts, references, 6)
        cut, cut_lp = greedy_replies(model, bpe, prompts, references, 6, give_up=lambda row, reply: row == 0)
    assert cut_lp == full_lp and cut[1] == full[1]
    first = bpe(full[0], add_special_tokens=False)["input_ids"][:1]
    assert cut[0] == bpe.decode(first) != full[0]


def test_a_reply_ends_at_end_of_sequence_a_line_break_or_a_sentence_end(bpe):
    def finished(text, extra=()):
        return evaluate._finished(bpe, bpe(text, add_special_tokens=False)["input_ids"] + list(extra), {2})

    assert not finished(" 1234567") and not finished(" 3.5") and not finished(" 11, 22")
    assert finished(" 1234567. The") and finished(" 1234567\n") and finished(" 12", [2])
    assert not finished("\n 12")  # leading whitespace is no line break: scoring skips it too


def ruler_run(model, bpe, plan, **kw):
    return evaluate_plan(
        model,
        bpe,
        plan,
        tasks="ruler",
        lengths=[512],
        texts=make_texts(count=2, words=300),
        samples=2,
        batch_size=2,
        backend="reference",
        progress=False,
        **kw,
    )


def test_ruler_tasks_fill_the_schema_and_reproduce(bpe):
    model = tiny_model("llama", vocab=len(bpe))
    results = ruler_run(model, bpe, sparse_plan(model))
    assert results["settings"]["tasks"] == list(tasks.RULER_TASKS)
    assert results["settings"]["samples"] == 2 and results["settings"]["batch_size"] == 2
    for variant in ("dense", "plan", "uniform"):
        for task in tasks.RULER_TASKS:
            entry = results["results"][variant][task]["512"]
            assert entry["samples"] == 2 and len(entry["correct"]) == 2 and len(entry["replies"]) == 2
            assert entry["accuracy"] == sum(entry["correct"]) / 2
            assert math.isfinite(entry["answer_logprob"]) and entry["answer_logprob"] < 0
            assert "by_depth" not in entry
    json.dumps(results)
    again = ruler_run(model, bpe, sparse_plan(model))
    assert again["results"] == results["results"]


def test_density_one_plan_scores_the_ruler_tasks_exactly_like_dense(bpe):
    model = tiny_model("llama", dtype=torch.float64, vocab=len(bpe))
    by = ruler_run(model, bpe, dense_plan(model))["results"]
    for task in tasks.RULER_TASKS:
        dense, plan = by["dense"][task]["512"], by["plan"][task]["512"]
        assert plan["replies"] == dense["replies"] and plan["correct"] == dense["correct"]
        assert plan["answer_logprob"] == pytest.approx(dense["answer_logprob"], rel=1e-9)


def test_ruler_replies_are_scored_by_exact_match(bpe, monkeypatch):
    """Replies that are the answers with other spacing, case and punctuation score 1; wrong ones 0."""
    model = tiny_model("llama", vocab=len(bpe))
    made = {}
    real = evaluate.task_samples

    def remember(task, *args, **kw):
        made[task] = real(task, *args, **kw)
        return made[task]

    def oracle(model, tokenizer, prompts, references, max_new, device=None, give_up=None):
        by_prompt = {s.input_ids: s for samples in made.values() for s in samples}
        answers = [by_prompt[tuple(p)].answers for p in prompts]
        return ["  " + " ,  ".join(a).upper() + " .\nmore" for a in answers], [-1.0] * len(prompts)

    monkeypatch.setattr(evaluate, "task_samples", remember)
    monkeypatch.setattr(evaluate, "greedy_replies", oracle)
    by = ruler_run(model, bpe, sparse_plan(model))["results"]
    assert all(
        by[v][t]["512"]["accuracy"] == 1.0 for v in ("dense", "plan", "uniform") for t in tasks.RULER_TASKS
    )
    monkeypatch.setattr(
        evaluate,
        "greedy_replies",
        lambda m, t, prompts, r, n, device=None, give_up=None: (["0"] * len(prompts), [-1.0] * len(prompts)),
    )
    by = ruler_run(model, bpe, sparse_plan(model))["results"]
    assert all(
        by[v][t]["512"]["accuracy"] == 0.0 for v in ("dense", "plan", "uniform") for t in tasks.RULER_TASKS
    )


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_are_clear_errors(tokenizer):
    model = make_model(tokenizer, max_pos=512)
    plan = sparse_plan(model)
    with pytest.raises(EvalError, match="exceeds the model's maximum of 512"):
        evaluate_plan(model, tokenizer, plan, lengths=[1024], texts=make_texts(), progress=False)
    with pytest.raises(EvalError, match="--tasks"):
        evaluate_plan(
            model, tokenizer, plan, tasks="ppl,speed", lengths=[128], texts=make_texts(), progress=False
        )
    with pytest.raises(DataError, match="need natural text"):
        evaluate_plan(model, tokenizer, plan, tasks="ppl", lengths=[128], texts=None, progress=False)
    with pytest.raises(DataError, match="needle_word need natural text"):
        evaluate_plan(model, tokenizer, plan, tasks="needle_word", lengths=[128], texts=None, progress=False)
    with pytest.raises(EvalError, match="--tasks"):
        evaluate_plan(model, tokenizer, plan, tasks="ruler,needle_nope", lengths=[128], progress=False)
    with pytest.raises(TaskError, match="--lengths 40 is too short for variable_tracking"):
        evaluate_plan(model, tokenizer, plan, tasks="variable_tracking", lengths=[40], progress=False)
    for option in ("samples", "batch_size", "limit"):
        with pytest.raises(EvalError, match=f"--{option.replace('_', '-')} must be a positive number"):
            evaluate_plan(
                model, tokenizer, plan, tasks="passkey", lengths=[128], progress=False, **{option: 0}
            )
    with pytest.raises(DataError, match="no window of 256 tokens"):
        evaluate_plan(model, tokenizer, plan, tasks="ppl", lengths=[256], texts=["too short"], progress=False)
    other = tiny_model("llama", vocab=len(tokenizer), layers=3)
    with pytest.raises(PlanError, match="num_layers"):
        evaluate_plan(other, tokenizer, plan, tasks="passkey", lengths=[128], progress=False)


# ----------------------------------------------------------------------------------------------
# Report


def fake_results(tokenizer, monkeypatch, plan_provenance=None):
    """Results of a real run in which every variant runs dense (no runtime needed): for the report."""
    monkeypatch.setattr(evaluate, "variant", lambda model, plan, *runtime: evaluate.contextlib.nullcontext())
    model = make_model(tokenizer)
    plan = sparse_plan(model)
    if plan_provenance is not None:
        plan = Plan(model=plan.model, rules=plan.rules, block_size=BLOCK, provenance=plan_provenance)
    results = evaluate_plan(
        model, tokenizer, plan, lengths=[128, 256], texts=make_texts(), limit=2, progress=False
    )
    return results, plan


def test_write_report_tables_and_plots(tokenizer, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    pareto = [
        {"density": {"128": 0.3, "256": 0.2}, "loss": 0.5},
        {"density": 0.5, "loss": 0.1, "chosen": True},
    ]
    results, plan = fake_results(tokenizer, monkeypatch, {"pareto": pareto})
    path = evaluate.write_report(results, tmp_path / "out", plan)
    text = path.read_text()
    for heading in ("## Density", "## Perplexity", "## Fidelity to dense", "## Passkey retrieval", "Pareto"):
        assert heading in text
    for png in ("plan_heatmap.png", "quality_vs_length.png", "needle_heatmap.png", "pareto.png"):
        assert f"]({png})" in text
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert "Plots skipped" not in text


def test_summary_leads_the_report_and_marks_wins_and_losses(tokenizer, monkeypatch, tmp_path):
    results, plan = fake_results(tokenizer, monkeypatch)
    by = results["results"]
    # Make the plan win one passkey sample at 128 and lose one at 256 against uniform.
    by["plan"]["passkey"]["128"] = by["plan"]["passkey"]["128"] | {"correct": [True, False], "accuracy": 0.5}
    by["uniform"]["passkey"]["128"] = by["uniform"]["passkey"]["128"] | {
        "correct": [False, False],
        "accuracy": 0.0,
    }
    by["dense"]["passkey"]["128"] = by["dense"]["passkey"]["128"] | {"correct": [True, True], "accuracy": 1.0}
    by["plan"]["passkey"]["256"] = by["plan"]["passkey"]["256"] | {"correct": [False, False], "accuracy": 0.0}
    by["uniform"]["passkey"]["256"] = by["uniform"]["passkey"]["256"] | {
        "correct": [False, True],
        "accuracy": 0.5,
    }
    by["dense"]["passkey"]["256"] = by["dense"]["passkey"]["256"] | {
        "correct": [False, False],
        "accuracy": 0.0,
    }
    text = evaluate.write_report(results, tmp_path, plan).read_text()
    assert text.index("## Summary") < text.index("## Density") < text.index("## Passkey retrieval")
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in text.splitlines()
        if "(accuracy)" in line
    }
    win, loss = rows[("passkey (accuracy)", "128")], rows[("passkey (accuracy)", "256")]
    assert "| 2 | 100% | 50% | 0% | 0.50 | — | +1 / −0 | ▲ win |" in win
    assert "| 2 | 0% | 0% | 50% | — | 0.00 | +0 / −1 | ▼ loss |" in loss
    assert "ppl (perplexity) | 128 | 2 windows" in text and "fidelity (KL, nats/token) | 256" in text

    # Per-window figures: the windows where the plan is lower than uniform, and the reverse.
    by["plan"]["ppl"]["128"] = by["plan"]["ppl"]["128"] | {"window_nll": [2.0, 3.0, 1.0]}
    by["uniform"]["ppl"]["128"] = by["uniform"]["ppl"]["128"] | {"window_nll": [2.5, 2.0, 1.5]}
    text = evaluate.write_report(results, tmp_path / "w", plan).read_text()
    row = next(line for line in text.splitlines() if "ppl (perplexity) | 128" in line)
    assert "| +2 / −1 |" in row


def test_report_without_matplotlib_says_plots_were_skipped(tokenizer, monkeypatch, tmp_path):
    results, plan = fake_results(tokenizer, monkeypatch)
    real = report.importlib.util.find_spec
    monkeypatch.setattr(
        report.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    text = evaluate.write_report(results, tmp_path, plan).read_text()
    assert "Plots skipped: matplotlib is not installed" in text
    assert "## Perplexity" in text and not list(tmp_path.glob("*.png"))
    assert "Pareto" not in text  # the plan's provenance has none


def test_pareto_points_reads_known_forms_and_refuses_others():
    assert report.pareto_points({}) is None
    assert report.pareto_points({"pareto": [[0.1, 0.2]]}) is None
    assert report.pareto_points({"pareto": [{"density": 0.1}]}) is None
    name, series = report.pareto_points(
        {"pareto": [{"budget": 0.5, "objective": 2}, {"density": 0.25, "cost": 3.0, "objective": 4}]}
    )
    assert name == "objective" and series == {"": [(0.25, 4.0, False), (0.5, 2.0, False)]}
    per_length = [
        {"density": {"2048": 0.3, "4096": 0.2}, "predicted_cost": {"2048": 5.0, "4096": 7.0}, "chosen": True},
        {"density": {"2048": 0.25, "4096": 0.15}, "predicted_cost": {"2048": 6.0, "4096": 6.5}},
    ]
    name, series = report.pareto_points({"pareto": per_length})
    assert name == "predicted_cost"
    assert series == {
        "2048": [(0.25, 6.0, False), (0.3, 5.0, True)],
        "4096": [(0.15, 6.5, False), (0.2, 7.0, True)],
    }


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def model_dir(tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    make_model(tokenizer, max_pos=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(make_texts(count=1, words=1500)))
    return path


def run_cli(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_cli_bad_inputs_exit_2(tokenizer, model_dir, data_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    plan_dir = tmp_path / "plan"
    save_plan(sparse_plan(AutoModelForCausalLM.from_pretrained(model_dir)), plan_dir)
    other_dir = tmp_path / "other-plan"
    save_plan(
        uniform_plan(identity_of(tiny_model(vocab=len(tokenizer), layers=3)), 0.5, [128], BLOCK), other_dir
    )
    common = [model_dir, "--plan", plan_dir, "--out", tmp_path / "out"]
    cases = [
        ([*common, "--lengths", "1024", "--data", data_file], "exceeds the model's maximum of 512"),
        ([model_dir, "--plan", other_dir, "--lengths", "128", "--data", data_file], "plan is for a model"),
        ([*common, "--lengths", "128", "--data", tmp_path / "missing.txt"], "--data"),
        ([*common, "--lengths", "128", "--tasks", "ppl,nope"], "--tasks"),
        ([*common, "--lengths", "128", "--limit", "0"], "--limit"),
        ([*common, "--lengths", "128", "--samples", "0"], "--samples"),
        ([*common, "--lengths", "128", "--batch-size", "0"], "--batch-size"),
        ([*common, "--lengths", "128", "--tasks", "ruler,needle_nope"], "--tasks"),
        ([*common, "--lengths", "40", "--tasks", "passkey"], "is too short for the passkey prompt"),
        ([*common, "--lengths", "40", "--tasks", "common_words"], "is too short for common_words"),
        ([model_dir, "--plan", tmp_path / "nowhere", "--lengths", "128"], "no plan at"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    monkeypatch.setattr(evaluate, "DEFAULT_DATA", tmp_path / "no-such-docs")
    result = run_cli(*common, "--lengths", "128", "--tasks", "ppl")
    assert result.exit_code == 2 and "pass --data" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_writes_report_and_prints_json(model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    plan_dir = tmp_path / "plan"
    save_plan(sparse_plan(AutoModelForCausalLM.from_pretrained(model_dir)), plan_dir)
    out = tmp_path / "out"
    args = [model_dir, "--plan", plan_dir, "--lengths", "128,256", "--data", data_file, "--out", out]
    result = CliRunner().invoke(
        app,
        ["eval", *map(str, args), "--limit", "2", "--backend", "reference", "--dtype", "float32", "--json"],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    saved = json.loads((out / "results.json").read_text())
    assert printed == saved
    assert isinstance(saved["command"], str)
    assert saved["plan"]["path"] == str(plan_dir / "plan.json") and saved["settings"]["data"] == str(
        data_file
    )
    assert (out / "report.md").exists()
    assert "oracles" not in saved and saved["settings"]["oracle"] is False


def test_cli_oracle_flag_adds_the_oracles(model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    plan_dir = tmp_path / "plan"
    save_plan(sparse_plan(AutoModelForCausalLM.from_pretrained(model_dir)), plan_dir)
    out = tmp_path / "out"
    args = [model_dir, "--plan", plan_dir, "--lengths", "128", "--data", data_file, "--out", out]
    options = ["--limit", "1", "--dtype", "float32", "--oracle"]
    result = run_cli(*args, "--tasks", "ppl,fidelity,passkey", *options)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["oracle"] is True
    assert set(saved["oracles"]) == {"oracle", "oracle-layer", "ratio"}
    assert saved["results"]["oracle-layer"]["fidelity"]["128"]["windows"] == 1
    assert saved["results"]["oracle-layer"]["passkey"]["128"]["samples"] == 1
    assert "plan KL = " in result.output and "plan passkey " in result.output
    assert "## Oracle ceilings" in (out / "report.md").read_text()
    bad = run_cli(*args, "--tasks", "ruler", "--oracle")
    assert bad.exit_code == 2 and "not on the ruler tasks" in bad.output


def test_the_mass_target_bench_distils_block_mass_averaged_over_the_group():
    """bench/mass_targets.py: per KV group, the mean over its query heads of each block's attention
    mass, rows summing to 1 — checked against a brute-force softmax on a small input."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "mass_targets.py"
    mass_targets = runpy.run_path(str(script))["block_targets_mass"]
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 70, 8, dtype=torch.float64), torch.randn(1, 2, 70, 8, dtype=torch.float64)
    out = mass_targets(q, k, 0.3, 16)
    assert out.shape == (1, 2, 5, 5)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    probs = scores.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    padded = torch.nn.functional.pad(probs, (0, 10, 0, 10))  # 80 = 5 blocks of 16
    mass = padded.view(1, 4, 5, 16, 5, 16).sum((3, 5)).view(1, 2, 2, 5, 5).mean(2)
    expected = mass / mass.sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    per_head = mass_targets(q, k, 0.3, 16, per_query_head=True)
    assert per_head.shape == (1, 4, 5, 5) and torch.allclose(
        per_head.sum(-1), torch.ones(1, 4, 5, dtype=per_head.dtype)
    )


def test_the_passkey_tail_bench_splits_the_prompt_between_plan_and_dense():
    """bench/passkey_tail.py: a prompt wholly in the dense tail is the dense prefill; the plan's part of a
    split prompt is the plan's own prefill of those tokens, and the dense rest differs from the plan's."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "passkey_tail.py"
    bench = runpy.run_path(str(script))
    state, greedy_key = bench["prompt_state"], bench["greedy_key"]
    model = tiny_model(dtype=torch.float64)
    plan = uniform_plan(identity_of(model), 0.3, [200], BLOCK)
    prompt = torch.randint(1, 100, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    dense = state(model, prompt, None, None)[1]
    sparse = state(model, prompt, plan, None)[1]
    tailed = state(model, prompt, plan, 16)[1]
    assert torch.allclose(state(model, prompt, plan, len(prompt))[1], dense, atol=1e-10)
    assert (sparse - dense).abs().max() > 1e-3 and (tailed - sparse[:, -16:]).abs().max() > 1e-3
    assert torch.allclose(state(model, prompt[:184], plan, None)[1], sparse[:, :184], atol=1e-10)
    reply = greedy_key(model, prompt, None, None, 6)
    assert len(reply) == 6 and greedy_key(model, prompt, plan, len(prompt), 6) == reply


def test_the_passkey_layers_bench_edits_a_plan_by_layer_range_and_scores_teacher_forced():
    """bench/passkey_layers.py: each edit changes the rules it names and no other; ``dense`` everywhere
    scores as the model's own dense forward, the plan itself does not."""
    import runpy
    from pathlib import Path

    from moa_compress.plan import GateRule
    from tests.test_gate_runtime import gated_plan

    script = Path(__file__).resolve().parents[1] / "bench" / "passkey_layers.py"
    bench = runpy.run_path(str(script))
    edited, score = bench["edited"], bench["score"]
    model = tiny_model(dtype=torch.float64, layers=3)  # 4 query heads in 2 KV groups
    rule = GateRule(0.3, local=2)
    plan = gated_plan(model, lambda layer, head: rule)
    dense = DenseRule()
    assert edited(plan, "plan") == plan
    assert edited(plan, "only:1-1").rules == ((dense,) * 4, (rule,) * 4, (dense,) * 4)
    tailed = edited(plan, "tail:0-0:1+dense:1-2:1").rules
    assert tailed[0] == (GateRule(0.3, local=2, tail=1),) * 4
    assert tailed[1] == tailed[2] == (rule, rule, dense, dense)  # KV group 1: query heads 2 and 3
    assert edited(plan, "scale:2-2:2+local:2-2:3").rules[2] == (GateRule(0.6, local=3),) * 4
    assert edited(plan, "local:0-2:1").rules == plan.rules  # a window is only ever widened
    with pytest.raises(SystemExit, match="unknown edit"):
        edited(plan, "sparse:0-1")

    seq = torch.randint(1, 100, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = [(seq, 140), (seq[:130], 121)]  # answers: the last 10 and 9 tokens
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    answer = torch.tensor(seq[140:])
    want = float(lp[139:149].gather(1, answer[:, None]).mean())
    found, logprob = score(model, edited(plan, "dense:0-2"), prompts[:1])
    assert found == [bool((lp[139:149].argmax(-1) == answer).all())]
    assert logprob == pytest.approx(want, abs=1e-9)
    alone = score(model, edited(plan, "dense:0-2"), prompts[1:])[1]
    # two lengths in one batch, the shorter padded at its end: each scores as it does alone
    found, both = score(model, edited(plan, "dense:0-2"), prompts)
    assert len(found) == 2 and both == pytest.approx((want + alone) / 2, abs=1e-9)
    assert abs(score(model, plan, prompts[:1])[1] - want) > 1e-4
    # the plan's own window through the gate-source path, and the exact-mass source in layer 2 only
    assert score(model, plan, prompts[:1], local=2) == score(model, plan, prompts[:1])
    wide = edited(plan, "scale:0-2:2")  # 3 blocks per row: with a 1-block window, one to choose
    by_gate = score(model, wide, prompts[:1], local=1)[1]
    assert by_gate != score(model, wide, prompts[:1])[1]
    assert score(model, wide, prompts[:1], "mass", range(2, 3), 1)[1] != by_gate
    # an oracle from sampled mass: with every query of a block sampled, the exact oracle
    is_estimated = bench["is_estimated_oracle"]
    assert is_estimated("oracle-layer~sampled:16") and is_estimated("oracle~sampled:2")
    assert not any(
        is_estimated(s) for s in ("oracle-layer", "plan~sampled:2", "oracle~mass", "oracle~sampled:0")
    )
    exact = score(model, plan, prompts[:1], "oracle-layer")[1]
    assert score(model, plan, prompts[:1], "oracle-layer~sampled:16")[1] == pytest.approx(exact, abs=1e-9)
    # the runtime's allocation from sampled queries (apply_plan(..., ranking="sampled-layer:R")): this plan's
    # rules keep only the sink and the diagonal at 150 tokens (two blocks a row), so with every query
    # sampled it is the oracle-layer selection
    is_layer = bench["is_layer_ranking"]
    assert is_layer("sampled-layer:4") and not any(
        is_layer(s) for s in ("sampled:4", "sampled-layer:0", "plan")
    )
    assert score(model, plan, prompts[:1], "sampled-layer:16")[1] == pytest.approx(exact, abs=1e-9)


def test_the_gate_source_bench_scores_blocks_by_sampled_bounded_or_exact_attention():
    """bench/gate_sources.py: the bound is never below a product it bounds; selecting by each query
    head's own mass with a one-block window is the eval's per-row oracle, and the plain gate the plan
    (the sampled source is the runtime's, tested in test_gate_runtime.py)."""
    import runpy
    from pathlib import Path

    from moa_compress.oracle import apply_oracle
    from moa_compress.plan import GateRule
    from moa_compress.runtime import apply_plan
    from tests.test_gate_runtime import gated_plan

    script = Path(__file__).resolve().parents[1] / "bench" / "gate_sources.py"
    bench = runpy.run_path(str(script))
    bound_scores, scored_by = bench["bound_scores"], bench["scored_by"]
    torch.manual_seed(0)
    n, bs = 70, 16  # 5 blocks, the last of 6 queries
    q, k = torch.randn(1, 4, n, 8, dtype=torch.float64), torch.randn(1, 2, n, 8, dtype=torch.float64)
    per_block = torch.tensor([16.0] * 4 + [6.0], dtype=torch.float64)[:, None]
    bound = bound_scores(q, k, bs)  # [1, 4, 5, 5]
    means = torch.nn.functional.pad(q, (0, 0, 0, 10)).view(1, 4, 5, 16, 8).sum(3) / per_block
    products = means @ k.repeat_interleave(2, 1).transpose(-1, -2)  # [1, 4, 5, n]
    block_max = torch.nn.functional.pad(products, (0, 10), value=float("-inf")).view(1, 4, 5, 5, 16).amax(-1)
    assert (bound >= block_max.float() - 1e-5).all() and (bound - block_max.float()).abs().max() > 1e-3

    model = tiny_model(dtype=torch.float64, layers=2)  # 4 query heads in 2 KV groups
    plan = gated_plan(model, lambda layer, head: GateRule(0.5, local=2))  # 5 of a row's 19 blocks
    ids = torch.randint(1, 100, (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():

        def logits(context):
            with context:
                return model(ids).logits

        with scored_by("mass-head", local=1):
            by_mass = logits(apply_plan(model, plan))
        oracle_logits = logits(apply_oracle(model, plan, "oracle"))
        torch.testing.assert_close(by_mass, oracle_logits, rtol=0, atol=1e-9)
        with scored_by("mass-head"):  # the plan's two-block window forced: not the oracle's choice
            assert (logits(apply_plan(model, plan)) - oracle_logits).abs().max() > 1e-6
        plain = logits(apply_plan(model, plan))
        with scored_by("gate"):
            torch.testing.assert_close(logits(apply_plan(model, plan)), plain, rtol=0, atol=0)
        for source in ("sampled:2", "bound", "mass"):
            with scored_by(source):
                assert (logits(apply_plan(model, plan)) - plain).abs().max() > 1e-6, source
        with scored_by("sampled:2"):  # the bench's source is the runtime's ranking
            torch.testing.assert_close(
                logits(apply_plan(model, plan)), logits(apply_plan(model, plan, ranking="sampled:2")),
                rtol=0, atol=0,
            )  # fmt: skip
        with scored_by("mass"):
            everywhere = logits(apply_plan(model, plan))
        with scored_by("mass", layers=range(1, 2)):  # layer 0 keeps the plan's gate
            second = logits(apply_plan(model, plan))
        assert min((second - plain).abs().max(), (second - everywhere).abs().max()) > 1e-6
        with scored_by("mass", layers=range(0)):
            torch.testing.assert_close(logits(apply_plan(model, plan)), plain, rtol=0, atol=0)
        # The oracle from estimated mass: every query sampled is the exact mass; two per block are not.
        exact = logits(apply_oracle(model, plan, "oracle-layer"))
        with bench["oracle_mass_from"](16):
            torch.testing.assert_close(
                logits(apply_oracle(model, plan, "oracle-layer")), exact, rtol=0, atol=1e-9
            )
        with bench["oracle_mass_from"](2):
            assert (logits(apply_oracle(model, plan, "oracle-layer")) - exact).abs().max() > 1e-6
