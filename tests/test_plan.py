import json

import pytest
import torch

from moa_compress.kernels.layout import causal_mask
from moa_compress.plan import (
    DenseRule,
    ModelIdentity,
    Plan,
    PlanError,
    StaticRule,
    WindowRule,
    causal_block_pairs,
    load_plan,
    rule_density,
    save_plan,
    sliding_windows,
    uniform_plan,
)

IDENT = ModelIdentity("tiny", 2, 3, 1, 16, "f00d")


def brute_density(rule, n, bs):
    """Count computed causal pairs token by token."""
    if isinstance(rule, DenseRule):
        return 1.0
    qb = torch.arange(n)[:, None] // bs
    kb = torch.arange(n)[None, :] // bs
    band = rule.band_blocks(n, bs)
    allowed = (kb < rule.sink_blocks) | (kb > qb - band)
    m = allowed & causal_mask(n, n)
    return m.sum().item() / (n * (n + 1) / 2)


@pytest.mark.parametrize("n", [1, 17, 64, 65, 200, 1000])
@pytest.mark.parametrize(
    "rule",
    [
        DenseRule(),
        StaticRule(1, 64, 0.0),
        StaticRule(0, 100, 0.25),
        StaticRule(2, -64, 0.5),
        StaticRule(1, 0, 1.0),
    ],
)
def test_density_exact_against_brute_force(n, rule):
    assert rule_density(rule, n, 64) == pytest.approx(brute_density(rule, n, 64), abs=1e-12)


def test_layout_matches_rule_mask():
    rules = ((StaticRule(1, 128, 0.0), DenseRule(), StaticRule(0, 10, 0.5)),) * 2
    plan = Plan(IDENT, rules)
    n = 333
    dense = plan.layout(0, n).to_dense_mask()[0]
    for h, rule in enumerate(rules[0]):
        frac = dense[h].sum().item() / (n * (n + 1) / 2)
        assert frac == pytest.approx(brute_density(rule, n, 64))
    assert plan.density(n) == pytest.approx(sum(brute_density(r, n, 64) for r in rules[0]) / 3)


def test_round_trip(tmp_path):
    plan = Plan(
        IDENT,
        ((StaticRule(1, 64.5, 0.125), DenseRule(), DenseRule()),) * 2,
        budget=0.5,
        lengths=(128, 256),
        provenance={"seed": 3},
    )
    save_plan(plan, tmp_path)
    back = load_plan(tmp_path, IDENT)
    assert back == plan
    with pytest.raises(FileExistsError):
        save_plan(plan, tmp_path)


def test_gate_rule_local_window_round_trips_and_needs_schema_3():
    """A gate rule without a window is written as schema 2 (older readers read it the same); one with a
    window needs schema 3, so an older reader refuses it instead of dropping the window."""
    from moa_compress.plan import GateConfig, GateRule, gate_tensor_name

    config = GateConfig(gate_dim=4, per_query_head=False, rope_theta=10000.0, layers=(0,))
    tensors = {
        gate_tensor_name(0, w): torch.randn(1, 3 * 16 if w == "k_proj" else 16, 4)
        for w in ("q_proj", "k_proj")
    }
    for rules, schema in (((GateRule(0.3),) * 3, 2), ((GateRule(0.3, 4), DenseRule(), GateRule(0.2)), 3)):
        plan = Plan(IDENT, (rules, (DenseRule(),) * 3), gates=config, tensors=tensors)
        data = plan.to_dict()
        assert data["schema_version"] == schema
        assert ("local" in data["rules"][0][0]) == (schema == 3)
        back = Plan.from_dict(json.loads(json.dumps(data)), tensors)
        assert back.rules == plan.rules and back.rules[0][0].local == rules[0].local
    assert GateRule(0.3, 4).describe() == "gate@0.3+local4" and GateRule(0.3).describe() == "gate@0.3"
    for local in (0, -2, "4", True, 2.5):
        with pytest.raises(PlanError, match="local"):
            GateRule.from_dict({"kind": "gate", "target": 0.3, "local": local}, "layer 0 head 0")


def test_gate_rule_floor_keeps_min_blocks_exactly_and_needs_schema_4():
    """``min_blocks`` raises a row's block count where the target would give fewer (never above the
    causal blocks), the density stays exact, and a plan with a floor is schema 4 so older readers refuse
    it instead of reading a sparser rule."""
    from moa_compress.plan import (
        GateConfig,
        GateRule,
        blocks_for_density,
        gate_tensor_name,
        num_blocks,
        selection_density,
    )

    bs = 16
    for n in (17, 100, 160, 1024, 4000):
        for target in (0.05, 0.2, 0.6):
            plain, floored = GateRule(target), GateRule(target, 1, 5)
            want = min(max(5, blocks_for_density(target, n, bs)), num_blocks(n, bs))
            assert floored.blocks_per_row(n, bs) == want
            assert plain.blocks_per_row(n, bs) == blocks_for_density(target, n, bs)
            assert floored.density(n, bs) == selection_density(want, n, bs) >= plain.density(n, bs)
    assert GateRule(0.05, 1, 5).blocks_per_row(1024, bs) == 5 > GateRule(0.05).blocks_per_row(1024, bs)
    config = GateConfig(gate_dim=4, per_query_head=False, rope_theta=10000.0, layers=(0,))
    tensors = {
        gate_tensor_name(0, w): torch.randn(1, 3 * 16 if w == "k_proj" else 16, 4)
        for w in ("q_proj", "k_proj")
    }
    rules = (GateRule(0.1, 2, 4), GateRule(0.1), DenseRule())
    plan = Plan(IDENT, (rules, (DenseRule(),) * 3), gates=config, tensors=tensors)
    data = plan.to_dict()
    assert data["schema_version"] == 4
    assert data["rules"][0][0]["min_blocks"] == 4 and "min_blocks" not in data["rules"][0][1]
    assert Plan.from_dict(json.loads(json.dumps(data)), tensors).rules == plan.rules
    assert GateRule(0.1, 2, 4).describe() == "gate@0.1+local2+min4"
    with pytest.raises(ValueError, match="min_blocks"):
        GateRule(0.1, 1, 1)
    for floor in (1, 0, "4", True, 2.5):
        with pytest.raises(PlanError, match="min_blocks"):
            GateRule.from_dict({"kind": "gate", "target": 0.3, "min_blocks": floor}, "layer 0 head 0")


def test_gate_rule_tail_keeps_its_last_rows_whole_and_needs_schema_5():
    """``tail`` last rows keep every causal block; the other rows keep fewer so the density stays within
    the target (exactly as counted), and a plan with a tail is schema 5 so older readers refuse it."""
    from moa_compress.plan import GateConfig, GateRule, gate_tensor_name, num_blocks, selection_density

    bs = 16
    for n in (17, 100, 160, 1024, 4000):
        nb = num_blocks(n, bs)
        pairs = causal_block_pairs(n, bs)
        for target in (0.05, 0.2, 0.6):
            for tail in (1, 3):
                plain, tailed = GateRule(target), GateRule(target, 1, 2, tail)
                k = tailed.blocks_per_row(n, bs)
                assert k <= plain.blocks_per_row(n, bs)
                # brute force: row i keeps min(k, i + 1) blocks, a tail row all i + 1 (which ones does
                # not matter: off-diagonal blocks are all whole)
                kept = torch.zeros(nb, nb, dtype=torch.bool)
                for i in range(nb):
                    count = i + 1 if i >= nb - tail else min(k, i + 1)
                    kept[i, i] = True  # the diagonal (the last one may be ragged) and others
                    kept[i, : count - 1] = True
                want = float(pairs[kept].sum() / pairs.sum())
                assert tailed.density(n, bs) == pytest.approx(want, abs=1e-12)
                assert tailed.density(n, bs) == selection_density(k, n, bs, tail)
                if k > 2:  # the floor aside, the target holds
                    assert tailed.density(n, bs) <= target + 1e-12
    config = GateConfig(gate_dim=4, per_query_head=False, rope_theta=10000.0, layers=(0,))
    tensors = {
        gate_tensor_name(0, w): torch.randn(1, 3 * 16 if w == "k_proj" else 16, 4)
        for w in ("q_proj", "k_proj")
    }
    rules = (GateRule(0.1, 2, 4, 1), GateRule(0.1), DenseRule())
    plan = Plan(IDENT, (rules, (DenseRule(),) * 3), gates=config, tensors=tensors)
    data = plan.to_dict()
    assert data["schema_version"] == 5
    assert data["rules"][0][0]["tail"] == 1 and "tail" not in data["rules"][0][1]
    assert Plan.from_dict(json.loads(json.dumps(data)), tensors).rules == plan.rules
    assert GateRule(0.1, 2, 4, 1).describe() == "gate@0.1+local2+min4+tail1"
    with pytest.raises(ValueError, match="tail"):
        GateRule(0.1, 1, 2, -1)
    for tail in (-1, "1", True, 1.5):
        with pytest.raises(PlanError, match="tail"):
            GateRule.from_dict({"kind": "gate", "target": 0.3, "tail": tail}, "layer 0 head 0")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=99), "newer"),
        (lambda d: d["rules"][0].__setitem__(0, {"kind": "magic"}), "unknown rule kind"),
        (lambda d: d.pop("model"), "missing"),
        (lambda d: d["rules"].pop(), "layers"),
    ],
)
def test_bad_plans(tmp_path, mutate, message):
    plan = uniform_plan(IDENT, 0.5, [512])
    data = plan.to_dict()
    mutate(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        load_plan(tmp_path)


def test_truncated_json_and_wrong_model(tmp_path):
    plan = uniform_plan(IDENT, 0.5, [512])
    save_plan(plan, tmp_path)
    text = (tmp_path / "plan.json").read_text()
    other = ModelIdentity("tiny", 2, 3, 1, 16, "beef")
    with pytest.raises(PlanError, match="fingerprint"):
        load_plan(tmp_path, other)
    with pytest.raises(PlanError, match="num_heads"):
        load_plan(tmp_path, ModelIdentity("tiny", 2, 6, 1, 16, "f00d"))
    (tmp_path / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="invalid JSON"):
        load_plan(tmp_path)


def test_uniform_is_widest_within_density():
    lengths = [1024, 2048]
    plan = uniform_plan(IDENT, 0.25, lengths)
    rule = plan.rules[0][0]
    assert all(plan.density(n) <= 0.25 for n in lengths)
    wider = StaticRule(rule.sink_blocks, rule.alpha + 64, 0.0)
    assert any(rule_density(wider, n, 64) > 0.25 for n in lengths)
    assert uniform_plan(IDENT, 1.0, lengths).is_dense()
    with pytest.raises(PlanError, match="smallest possible"):
        uniform_plan(IDENT, 0.01, lengths)


def test_block_mask_runs_with_flex_attention_equal_to_reference():
    from torch.nn.attention.flex_attention import flex_attention

    from moa_compress.kernels.reference import block_sparse_attention_reference
    from tests.factories import random_qkv

    rules = ((StaticRule(1, 64, 0.0), DenseRule(), StaticRule(0, 10, 0.25)),) * 2
    plan = Plan(IDENT, rules)
    n = 200
    q, k, v = random_qkv(hq=3, hkv=1, sq=n, d=16, dtype=torch.float32)
    masks = plan.block_mask(n)
    assert len(masks) == 2
    # Eager flex_attention on CPU is a debugging path; compiled is what users run.
    out = torch.compile(flex_attention)(q, k, v, block_mask=masks[1], enable_gqa=True)
    ref = block_sparse_attention_reference(q, k, v, plan.layout(1, n), scale=16**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_written_files_get_the_umask_permissions_not_the_temp_files_0600(tmp_path):
    import os
    import stat

    from moa_compress.plan import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


# ----------------------------------------------------------------------------------------------
# Models with sliding-window layers: the plan leaves those layers to the model

WINDOWED = ModelIdentity("gemma-like", 3, 2, 1, 16, "0ddba11", windows=((0, 100), (2, 100)))


def window_pairs(tokens, n):
    """Computed causal pairs of a token window, counted token by token."""
    p = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return ((j <= p) & (j > p - tokens)).sum().item()


@pytest.mark.parametrize("n", [1, 17, 64, 99, 100, 101, 333, 1000])
@pytest.mark.parametrize("tokens", [1, 40, 64, 100, 512])
def test_window_rule_density_is_exact_and_its_blocks_cover_the_window(n, tokens):
    rule = WindowRule(tokens)
    assert rule.density(n, 64) == pytest.approx(window_pairs(tokens, n) / (n * (n + 1) / 2), abs=1e-12)
    blocks = rule.block_mask(n, 64)
    p = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    window = (j <= p) & (j > p - tokens)
    covered = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:n, :n]
    assert not (window & ~covered).any()  # every pair the window computes lies in a kept block
    touched = torch.zeros_like(blocks)  # and no block is kept that the window does not touch
    touched[p.expand(n, n)[window] // 64, j.expand(n, n)[window] // 64] = True
    assert torch.equal(blocks, touched)


def test_windowed_plans_count_the_budget_over_planned_layers_and_round_trip(tmp_path):
    plan = uniform_plan(WINDOWED, 0.25, [1024], block_size=64)
    assert plan.rules[0] == (WindowRule(100),) * 2 and plan.rules[2] == (WindowRule(100),) * 2
    planned = plan.rules[1][0]
    assert isinstance(planned, StaticRule) and plan.density(1024) == pytest.approx(
        rule_density(planned, 1024, 64)
    )
    everything = (2 * WindowRule(100).density(1024, 64) + rule_density(planned, 1024, 64)) / 3
    assert plan.model_density(1024) == pytest.approx(everything)
    assert plan.kv_fraction(1024) == pytest.approx(min(1.0, 2 * 64 / 1024))  # the planned layer only
    data = plan.to_dict()
    assert data["schema_version"] == 6 and data["model"]["windows"] == [[0, 100], [2, 100]]
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path, WINDOWED) == plan
    assert "windows" not in uniform_plan(IDENT, 0.5, [512]).to_dict()["model"]  # as before for the rest
    with pytest.raises(PlanError, match="sliding-window layers"):
        load_plan(tmp_path, ModelIdentity("gemma-like", 3, 2, 1, 16, "0ddba11", windows=((0, 100),)))


@pytest.mark.parametrize(
    "rules, message",
    [
        (((DenseRule(),) * 2,) * 3, "layer 0 is a sliding-window layer of 100 tokens"),
        (((WindowRule(100),) * 2, (WindowRule(100),) * 2, (WindowRule(100),) * 2), "window rules belong"),
        (((WindowRule(50),) * 2, (DenseRule(),) * 2, (WindowRule(100),) * 2), "window100"),
        (((WindowRule(100), DenseRule()), (DenseRule(),) * 2, (WindowRule(100),) * 2), "every head"),
    ],
)
def test_window_rules_sit_exactly_on_the_models_window_layers(rules, message):
    with pytest.raises(PlanError, match=message):
        Plan(WINDOWED, rules)


def test_bad_window_records_are_one_line_errors(tmp_path):
    data = uniform_plan(WINDOWED, 0.5, [512]).to_dict()
    for bad in ([[0, -1]], [[0]], "all", [[0, 1.5]]):
        data["model"]["windows"] = bad
        (tmp_path / "plan.json").write_text(json.dumps(data))
        with pytest.raises(PlanError, match="malformed"):
            load_plan(tmp_path)
    for tokens in (0, "64", None):
        with pytest.raises(PlanError, match="window rule"):
            WindowRule.from_dict({"kind": "window", "tokens": tokens}, "layer 0 head 0")


def test_sliding_windows_from_configs():
    from types import SimpleNamespace as Config

    gemma = Config(num_hidden_layers=3, sliding_window=512,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"])  # fmt: skip
    assert sliding_windows(gemma) == ((0, 512), (1, 512))
    assert sliding_windows(Config(num_hidden_layers=2, sliding_window=4096)) == ((0, 4096), (1, 4096))
    qwen = Config(num_hidden_layers=2, sliding_window=4096, use_sliding_window=False, layer_types=None)
    assert sliding_windows(qwen) == ()
    assert sliding_windows(Config(num_hidden_layers=2, sliding_window=None)) == ()
