"""apply_plan in tiny transformers models: dense equality, sparse vs an independent masked reference,
padding, chunked prefill, q_len < kv_len, generation with a cache, errors."""

from __future__ import annotations

import random

import pytest
import torch

from moa_compress.plan import DenseRule, ModelIdentity, Plan, PlanError, StaticRule, WindowRule
from moa_compress.runtime import (
    PlanKVCache,
    PlanRuntimeError,
    active_plan,
    apply_plan,
    cache_kwarg,
    generate_reply,
    padded_attention,
    plan_pieces,
    remove_plan,
)
from tests.factories import dense_masked_attention, tiny_model

# gemma3: a sliding-window layer (40 tokens, which plans leave to the model) before a full-attention one
FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]
BLOCK = 16


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def make_plan(model, rule_fn, block_size=BLOCK) -> Plan:
    """``rule_fn(layer, head)`` on the layers a plan chooses for; the model's window on its window layers."""
    ident = ModelIdentity.from_config(model.config)
    windows = ident.window_of
    rules = tuple(
        tuple(
            WindowRule(windows[layer]) if layer in windows else rule_fn(layer, head)
            for head in range(ident.num_heads)
        )
        for layer in range(ident.num_layers)
    )
    return Plan(ident, rules, block_size=block_size)


def mixed_rules(seed=0, beta=True):
    """Per-head rules of every shape: dense, sink-less windows, several sinks, growing bands."""
    rng = random.Random(seed)

    def rule(layer, head):
        choice = rng.random()
        if choice < 0.2:
            return DenseRule()
        return StaticRule(
            sink_blocks=rng.choice([0, 1, 2]),
            alpha=float(rng.choice([0, 10, BLOCK, 2 * BLOCK + 3])),
            beta=rng.choice([0.0, 0.1, 0.3]) if beta else 0.0,
        )

    return rule


def register_reference(plan: Plan, name: str):
    """An independent attention implementation: dense softmax under the mask of ``plan.layout``
    (last q_len rows of the square layout at the key length), no GQA trickery."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        rule = plan.rules[module.layer_idx][0]
        if isinstance(rule, WindowRule):  # token by token: key j visible from query p when p - w < j <= p
            p = torch.arange(kv_len - q_len, kv_len)[:, None]
            j = torch.arange(kv_len)[None, :]
            mask = ((j <= p) & (j > p - rule.tokens))[None, None]
        else:
            mask = plan.layout(module.layer_idx, kv_len).to_dense_mask()[:, :, kv_len - q_len :, :]
        if attention_mask is not None:
            mask = mask & attention_mask[..., :kv_len].bool()
        out = dense_masked_attention(query, key, value, mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, reference)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def ids(b, n, seed=0, vocab=128):
    """Random token ids in [1, vocab): 0 is the pad id in these tests."""
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Layout pieces


@pytest.mark.parametrize(
    "q_len,kv_len", [(1, 1), (1, 77), (5, 77), (30, 77), (77, 77), (16, 48), (17, 48), (3, 17), (40, 130)]
)
def test_plan_pieces_cover_the_bottom_rows_of_the_square_layout(q_len, kv_len):
    model = tiny_model("llama")
    plan = make_plan(model, mixed_rules(seed=q_len * 1000 + kv_len))
    for layer in range(plan.model.num_layers):
        want = plan.layout(layer, kv_len).to_dense_mask()[0, :, kv_len - q_len :, :]
        got = torch.zeros_like(want)
        pieces = plan_pieces(plan.rules[layer], BLOCK, q_len, kv_len)
        assert len(pieces) <= 2
        for q_start, q_end, layout in pieces:
            got[:, q_start:q_end, : layout.kv_len] = layout.to_dense_mask()[0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows_per_chunk", [7, 512])
def test_padded_attention_rows_equal_their_unpadded_layout(rows_per_chunk):
    """Left-padded rows, q_len < kv_len, GQA 4/2: each row equals attention under the square
    layout of its own unpadded length (bottom rows), zeros on padded query rows."""
    from tests.factories import random_qkv

    model = tiny_model("llama")
    plan = make_plan(model, mixed_rules(seed=21))
    rules, kv_len, q_len = plan.rules[0], 70, 30
    pads = [0, 9, 45]  # the last row's queries start inside the padding
    q, k, v = random_qkv(b=3, hq=4, hkv=2, sq=q_len, sk=kv_len, d=16, seed=21)
    valid = torch.arange(kv_len)[None, :] >= torch.tensor(pads)[:, None]
    causal = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    mask = (causal[None] & valid[:, None, :])[:, None]  # what transformers' sdpa_mask builds
    got = padded_attention(rules, BLOCK, q, k, v, mask, 0.25, rows_per_chunk=rows_per_chunk)
    for b, pad in enumerate(pads):
        n = kv_len - pad
        rows = min(q_len, n)
        layout_mask = plan.layout(0, n).to_dense_mask()[:, :, n - rows :, :]
        want = dense_masked_attention(
            q[b : b + 1, :, q_len - rows :], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:], layout_mask, 0.25
        )
        assert (got[b : b + 1, :, q_len - rows :] - want).abs().max() <= 1e-12
        assert (got[b, :, : q_len - rows] == 0).all()


# ----------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize("family", FAMILIES)
def test_density_one_plan_equals_dense_sdpa(family):
    model = tiny_model(family)
    plan = make_plan(model, lambda layer, head: DenseRule())
    x = ids(2, 77)
    with torch.no_grad():
        dense = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            planned = model(x).logits
    assert (planned - dense).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_plan_equals_masked_reference(family):
    model = tiny_model(family, dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=1))
    assert not plan.is_dense() and plan.density(77) < 0.9
    x = ids(2, 77, seed=1)
    with torch.no_grad():
        model.set_attn_implementation(register_reference(plan, f"test_ref_{family}"))
        want = model(x).logits
        model.set_attn_implementation("sdpa")
        dense = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            got = model(x).logits
    assert (got - want).abs().max() <= 1e-10
    assert (got - dense).abs().max() > 1e-3  # the plan really changes the computation


def test_remove_restores_previous_implementation_and_registry():
    from transformers import AttentionInterface

    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    plan = make_plan(model, mixed_rules(seed=2))
    handle = apply_plan(model, plan, backend="reference")
    assert active_plan(model) is plan and model.config._attn_implementation == handle.name
    assert handle.name in AttentionInterface._global_mapping
    handle.remove()
    handle.remove()  # idempotent
    assert active_plan(model) is None and model.config._attn_implementation == "eager"
    assert handle.name not in AttentionInterface._global_mapping
    # A second apply replaces the first and still restores the original implementation.
    first = apply_plan(model, plan, backend="reference")
    second = apply_plan(model, plan, backend="reference")
    assert not first.active and active_plan(model) is plan
    remove_plan(model)
    assert model.config._attn_implementation == "eager" and not second.active


def test_use_attention_switches_back_and_unregisters_even_on_error():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from moa_compress.attn_interface import use_attention

    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    layers = []

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layers.append(module.layer_idx)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    name = "test_use_attention"
    with (
        pytest.raises(RuntimeError, match="inside"),
        use_attention(model, name, attention, padding_mask=True),
    ):
        assert model.config._attn_implementation == name
        model(ids(1, 8))
        raise RuntimeError("inside")
    assert layers == [0, 1] and model.config._attn_implementation == "eager"
    assert name not in AttentionInterface._global_mapping
    assert name not in AttentionMaskInterface._global_mapping
    # An implementation chosen inside the body is left alone.
    with use_attention(model, name, attention):
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_reference_rows(family):
    """Chunks of odd sizes through a DynamicCache: each chunk's rows are the bottom rows of the
    layout at the current length (q_len < kv_len, alignment to the bottom right)."""
    from transformers import DynamicCache

    model = tiny_model(family, dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=3))
    x = ids(1, 90, seed=3)
    chunks = [(0, 20), (20, 33), (33, 64), (64, 65), (65, 90)]

    def run(impl):
        cache = DynamicCache(config=model.config)
        outs = []
        for a, b in chunks:
            outs.append(model(x[:, a:b], use_cache=True, **{cache_kwarg(model): cache}).logits)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        model.set_attn_implementation(register_reference(plan, f"test_ref_chunk_{family}"))
        want = run("reference")
        model.set_attn_implementation("sdpa")
        with apply_plan(model, plan, backend="reference"):
            got = run("plan")
    assert (got - want).abs().max() <= 1e-10


def test_chunked_prefill_equals_full_prefill_for_fixed_windows():
    """With beta = 0 the band does not depend on the length: chunked and full prefill agree."""
    from transformers import DynamicCache

    model = tiny_model("llama", dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=4, beta=False))
    x = ids(1, 70, seed=4)
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        parts = [
            model(x[:, a:b], **{cache_kwarg(model): cache}).logits for a, b in ((0, 23), (23, 48), (48, 70))
        ]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-10


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padded_batch_equals_unpadded_rows(family):
    model = tiny_model(family, dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=5))
    lengths = [61, 40, 13]
    width = max(lengths)
    seqs = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        padded = model(batch, attention_mask=mask, position_ids=position_ids).logits
        assert torch.isfinite(padded).all()
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert (padded[i, width - len(s) :] - alone).abs().max() <= 1e-10


def greedy_recompute(model, prompt, steps):
    """Greedy decoding that recomputes the whole sequence at every step (no cache)."""
    seq = prompt
    logits = []
    for _ in range(steps):
        last = model(seq, use_cache=False).logits[:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recompute(family):
    model = tiny_model(family, dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=6, beta=False))
    prompt = ids(1, 45, seed=6)
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        want_seq, want_logits = greedy_recompute(model, prompt, 24)
        out = model.generate(
            prompt,
            max_new_tokens=24,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert torch.equal(out.sequences, want_seq)
    # generate hands out logits in float32
    assert (torch.stack(out.logits, 1) - want_logits).abs().max() <= 1e-6


def test_generate_left_padded_batch_equals_single_generation():
    model = tiny_model("llama", dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=7))
    a, b = ids(1, 37, seed=7), ids(1, 22, seed=8)
    batch = torch.zeros(2, 37, dtype=torch.long)
    batch[0], batch[1, 15:] = a[0], b[0]
    mask = (batch != 0).long()
    model.generation_config.eos_token_id = None  # generate all 12 tokens in every row
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        together = model.generate(
            batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
        alone = [model.generate(s, max_new_tokens=12, do_sample=False, pad_token_id=0) for s in (a, b)]
    assert torch.equal(together[0, 37:], alone[0][0, 37:])
    assert torch.equal(together[1, 37:], alone[1][0, 22:])


def test_layouts_are_built_once_per_shape_for_a_static_plan():
    model = tiny_model("llama")
    plan = make_plan(model, lambda layer, head: StaticRule(1, 20.0, 0.0))  # all layers share rules
    with torch.no_grad(), apply_plan(model, plan, backend="reference") as handle:
        model(ids(1, 50))
        model(ids(2, 50, seed=1))
        assert len(handle.layouts.entries) == 1


# ----------------------------------------------------------------------------------------------
# PlanKVCache


def generate(model, prompt, cache, steps):
    out = model.generate(
        prompt,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **{cache_kwarg(model): cache},
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_plan_kv_cache_chunked_prefill_and_decode_equal_dynamic_cache(family):
    """gemma3: the window layer keeps the model's own sliding cache layer inside the PlanKVCache."""
    from transformers import DynamicCache

    model = tiny_model(family, dtype=torch.float64)
    plan = make_plan(model, mixed_rules(seed=12))
    x = ids(1, 120, seed=12)
    chunks = [(0, 37), (37, 70), (70, 71), (71, 100), *((i, i + 1) for i in range(100, 120))]

    def run(cache):
        kw = {cache_kwarg(model): cache}
        return torch.cat([model(x[:, a:b], use_cache=True, **kw).logits for a, b in chunks], 1)

    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        want = run(DynamicCache(config=model.config))
        cache = PlanKVCache(model.config, plan, max_length=120)
        got = run(cache)
    assert (got - want).abs().max() <= 1e-10
    if family == "gemma3":  # the window layer holds its last 39 tokens, as the model's own cache does
        window = cache.layers[0]
        assert type(window).__name__ == "DynamicSlidingWindowLayer" and window.keys.shape[2] == 39


def test_plan_kv_cache_refuses_a_missing_or_different_plan():
    model = tiny_model("llama")
    plan = make_plan(model, mixed_rules(seed=13))
    batch = ids(2, 30)
    with torch.no_grad():
        with pytest.raises(PlanRuntimeError, match="apply_plan"):
            model(batch, **{cache_kwarg(model): PlanKVCache(model.config, plan)})
        other = make_plan(model, mixed_rules(seed=14))
        with (
            apply_plan(model, other, backend="reference"),
            pytest.raises(PlanRuntimeError, match="different"),
        ):
            model(batch, **{cache_kwarg(model): PlanKVCache(model.config, plan)})


def test_generate_reply_with_plan_cache_equals_full_cache():
    from tests.factories import tiny_tokenizer

    model = tiny_model("llama", vocab=300)
    model.generation_config.eos_token_id = None
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    tokenizer = tiny_tokenizer([prompt])
    plan = make_plan(model, mixed_rules(seed=15))
    with_cache = generate_reply(model, tokenizer, prompt, plan=plan, max_new_tokens=40, backend="reference")
    without = generate_reply(
        model, tokenizer, prompt, plan=plan, max_new_tokens=40, backend="reference", plan_cache=False
    )
    dense = generate_reply(model, tokenizer, prompt, max_new_tokens=40)
    assert with_cache == without and len(with_cache) > 0
    assert active_plan(model) is None and model.config._attn_implementation == "sdpa"
    assert isinstance(dense, str)


# ----------------------------------------------------------------------------------------------
# Errors


def test_a_model_whose_every_layer_has_a_window_has_nothing_to_plan():
    from transformers import AutoModelForCausalLM

    from tests.factories import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 32  # and no layer_types: every layer attends through the window
    model = AutoModelForCausalLM.from_config(config)
    assert ModelIdentity.from_config(config).planned_layers == ()
    with pytest.raises(PlanError, match="every layer of this model is a sliding-window layer"):
        make_plan(model, lambda layer, head: DenseRule())


def test_a_plan_without_the_models_windows_is_refused():
    import dataclasses

    model = tiny_model("gemma3")
    plan = make_plan(model, lambda layer, head: DenseRule())
    flat = dataclasses.replace(plan.model, windows=())
    unwindowed = Plan(flat, tuple((DenseRule(),) * flat.num_heads for _ in range(flat.num_layers)), BLOCK)
    with pytest.raises(PlanError, match="sliding-window layers"):
        apply_plan(model, unwindowed, backend="reference")
    assert active_plan(model) is None


def test_plan_for_another_model_is_refused():
    plan = make_plan(tiny_model("llama"), lambda layer, head: DenseRule())
    with pytest.raises(PlanError):
        apply_plan(tiny_model("llama", heads=8, kv_heads=2, head_dim=8), plan)
    with pytest.raises(PlanRuntimeError, match="backend"):
        apply_plan(tiny_model("llama"), plan, backend="nope")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_generate_with_a_plan_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app
    from moa_compress.plan import save_plan
    from tests.factories import tiny_tokenizer

    prompt = "the quick brown fox jumps over the lazy dog"
    tokenizer = tiny_tokenizer([prompt])
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_plan(make_plan(model, mixed_rules(seed=17)), tmp_path / "plan")
    runner = CliRunner()
    base = [
        "generate",
        str(tmp_path / "model"),
        "--prompt",
        prompt,
        "--dtype",
        "float32",
        "--max-new-tokens",
        "8",
    ]
    result = runner.invoke(app, [*base, "--plan", str(tmp_path / "plan"), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    for extra, message in (
        (["--plan", str(tmp_path / "missing")], "no plan"),
        (["--backend", "nope"], "--backend"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    other = make_plan(tiny_model("llama", heads=8, kv_heads=2, head_dim=8), lambda layer, head: DenseRule())
    save_plan(other, tmp_path / "other")
    result = runner.invoke(app, [*base, "--plan", str(tmp_path / "other/plan.json")])
    assert result.exit_code == 2 and "error:" in result.output
