"""Plans with gate heads: mixed (static, gate, dense) plans through apply_plan against an independent
masked reference built from the same selections, at prefill and token by token at decode (default
cache and PlanKVCache), padded batches, files and errors."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from moa_compress.gates import AttnGate, attention_layers, gates_from_plan, gates_to_plan_tensors, pool_keys
from moa_compress.plan import (
    DenseRule,
    GateRule,
    ModelIdentity,
    Plan,
    PlanError,
    StaticRule,
    load_plan,
    num_blocks,
    save_plan,
)
from moa_compress.runtime import PlanKVCache, PlanRuntimeError, apply_plan, cache_kwarg
from tests.factories import dense_masked_attention, left_padded, tiny_model

BLOCK = 16


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def gated_plan(model, rule_fn, per_query_head=False, seed=0, gate_dim=8) -> Plan:
    """A plan of ``rule_fn(layer, head)`` rules with random gates in every layer that uses one."""
    ident = ModelIdentity.from_config(model.config)
    rules = tuple(
        tuple(rule_fn(layer, head) for head in range(ident.num_heads)) for layer in range(ident.num_layers)
    )
    torch.manual_seed(seed)
    gates = [
        AttnGate(
            ident.num_heads, ident.num_kv_heads, ident.head_dim, gate_dim, BLOCK, 10000.0, per_query_head
        )
        for _ in range(ident.num_layers)
    ]
    layers = [i for i, heads in enumerate(rules) if any(r.input_dependent for r in heads)]
    config, tensors = gates_to_plan_tensors(gates, layers)
    return Plan(ident, rules, block_size=BLOCK, gates=config if layers else None, tensors=tensors)


def mixed(seed=0):
    rng = random.Random(seed)

    def rule(layer, head):
        choice = rng.random()
        if choice < 0.15:
            return DenseRule()
        if choice < 0.55:
            return GateRule(rng.choice([0.2, 0.35, 0.6]), rng.choice([1, 1, 2, 3]))
        return StaticRule(
            rng.choice([0, 1]), float(rng.choice([10, BLOCK, 2 * BLOCK])), rng.choice([0.0, 0.2])
        )

    return rule


def per_group(seed=0, group=2):
    """One rule kind per KV group (as a kv-budget search gives): gate, dense or static, the gate heads
    of a group at their own densities and windows."""
    rng = random.Random(seed)
    kinds: dict[tuple[int, int], str] = {}

    def rule(layer, head):
        kind = kinds.setdefault((layer, head // group), rng.choice(["gate", "gate", "dense", "static"]))
        if kind == "dense":
            return DenseRule()
        if kind == "gate":
            return GateRule(rng.choice([0.2, 0.35, 0.6]), rng.choice([1, 2]))
        return StaticRule(rng.choice([0, 1]), float(rng.choice([10, BLOCK])), rng.choice([0.0, 0.2]))

    return rule


def tailed(seed=0):
    """Mixed rules whose gate heads keep a dense tail of 1 to 3 rows (or none)."""
    base = mixed(seed)
    rng = random.Random(seed + 100)

    def rule(layer, head):
        chosen = base(layer, head)
        if isinstance(chosen, GateRule):
            return GateRule(chosen.target, chosen.local, chosen.min_blocks, rng.choice([0, 1, 1, 2, 3]))
        return chosen

    return rule


def ids(b, n, seed=0, vocab=128):
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


class Reference:
    """An independent implementation of a gated plan: dense softmax under a token mask; the gate heads'
    blocks chosen row by row and head by head with plain Python loops from pooled pre-RoPE queries
    (this call's, per absolute block) and keys (every one so far), captured by its own hooks.

    With ``ranking`` (a :class:`~moa_compress.gate_runtime.PrefillRanking`), calls of more than one query
    in its layers rank by :meth:`sampled_row` instead (only the first call, a prompt, with
    ``prompt_only``: what a PlanKVCache does)."""

    def __init__(self, model, plan: Plan, name: str, ranking=None, prompt_only=False):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        from moa_compress.gates import gates_from_plan

        self.plan, self.gates = plan, gates_from_plan(plan)
        self.q: dict[int, torch.Tensor] = {}
        self.k_new: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        d = plan.model.head_dim
        for m in attention_layers(model):

            def grab(store, layer=m.layer_idx):
                def hook(module, inputs, output):
                    store[layer] = output.detach().view(*output.shape[:2], -1, d).transpose(1, 2)

                return hook

            m.q_proj.register_forward_hook(grab(self.q))
            m.k_proj.register_forward_hook(grab(self.k_new))
        AttentionInterface.register(name, self.attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        self.name = name
        self.ranking, self.prompt_only = ranking, prompt_only

    def sampled_row(self, query, key, r, g, row, past, scale):
        """Brute force: the mean, over KV group ``g``'s query heads and the sampled queries of block
        ``row`` that this call holds (offsets BLOCK - 1, then down by BLOCK / R; else the call's last
        query in the block), of each one's softmax attention summed per key block; its log."""
        samples, kv_len = self.ranking.samples, key.shape[2]
        group = query.shape[1] // key.shape[1]
        wanted = [row * BLOCK + BLOCK - 1 - (i * BLOCK) // samples for i in range(samples)]
        positions = [p for p in wanted if past <= p < kv_len] or [min(row * BLOCK + BLOCK - 1, kv_len - 1)]
        total = [0.0] * (row + 1)
        for h in range(g * group, (g + 1) * group):
            for p in positions:
                weights = torch.softmax(key[r, g, : p + 1] @ query[r, h, p - past] * scale, 0)
                for j in range(p + 1):
                    total[j // BLOCK] += float(weights[j])
        return torch.tensor(total).div(len(positions) * group).log()

    def block_choice(self, layer, scores_row, head, n, row):
        """Blocks row ``row`` of ``head`` keeps, by brute force: sink, the local window ending at the
        diagonal (at most k - 1 blocks), then best scores."""
        rule = self.plan.rules[layer][head]
        if row >= num_blocks(n, BLOCK) - rule.tail:  # a dense tail row: every causal block
            return set(range(row + 1))
        k = rule.blocks_per_row(n, BLOCK)
        window = max(1, min(rule.local, max(k, 2) - 1))
        chosen = {0, *range(max(0, row - window + 1), row + 1)}
        order = sorted(range(row + 1), key=lambda j: -float(scores_row[j]))
        for j in order:
            if len(chosen) >= max(k, 2):
                break
            chosen.add(j)
        return chosen

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        plan = self.plan
        b, hq, q_len, _ = query.shape
        kv_len = key.shape[2]
        past = kv_len - q_len
        new = self.k_new[layer]
        self.keys[layer] = new if past == 0 else torch.cat([self.keys[layer][:, :, :past], new], 2)
        mask = torch.zeros(b, hq, q_len, kv_len, dtype=torch.bool)
        group = hq // plan.model.num_kv_heads
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        sampled = (
            self.ranking is not None
            and self.ranking.applies(layer, q_len, kv_len)
            and not (self.prompt_only and past > 0)
        )
        for h, rule in enumerate(plan.rules[layer]):
            for i in range(q_len):
                p = past + i
                row = p // BLOCK
                if not rule.input_dependent:
                    allowed = rule.block_mask(kv_len, BLOCK)[row]
                    for j in range(kv_len):
                        mask[:, h, i, j] = bool(allowed[j // BLOCK]) and j <= p
                    continue
                gate = self.gates[layer]
                for r in range(b):
                    if sampled:
                        scores_row = self.sampled_row(query, key, r, h // group, row, past, scale)
                    else:
                        in_block = [t for t in range(q_len) if (past + t) // BLOCK == row]
                        q_block = self.q[layer][r : r + 1, :, in_block].mean(2, keepdim=True)  # [1, Hq, 1, D]
                        k_blocks = pool_keys(self.keys[layer][r : r + 1].float(), BLOCK)
                        scores = gate(q_block.float(), k_blocks[:, :, : row + 1])[0]  # [Hg, 1, row + 1]
                        scores_row = scores[h if gate.per_query_head else h // group, 0]
                    chosen = self.block_choice(layer, scores_row, h, kv_len, row)
                    for j in range(p + 1):
                        mask[r, h, i, j] = (j // BLOCK) in chosen
        out = dense_masked_attention(query, key, value, mask, scale)
        return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("with_tails", [False, True])
@pytest.mark.parametrize("with_windows", [False, True])
def test_gate_selection_batched_equals_brute_force_top_k(with_windows, with_tails):
    """Heads sharing a gate head but keeping different local windows rank on their own; rows in a
    head's dense tail keep every causal block."""
    from moa_compress.gates import gate_selections

    torch.manual_seed(0)
    b, hg, nq, nk = 2, 2, 5, 9
    scores = torch.randn(b, hg, nq, nk, dtype=torch.float64)
    rows = torch.arange(nq)[:, None] + nk - nq
    scores = scores.masked_fill(torch.arange(nk)[None] > rows, float("-inf"))
    blocks = torch.tensor([3, 0, 4, 2, 5, 5])  # six query heads, head 1 has no gate
    of = torch.tensor([0, 0, 1, 1, 1, 0])
    local = torch.tensor([2, 1, 3, 4, 1, 9]) if with_windows else None
    tail = torch.tensor([1, 0, 0, 3, 0, 2]) if with_tails else None
    got = gate_selections(scores, blocks, of, local, tail)
    for r in range(b):
        for h in range(len(blocks)):
            for i in range(nq):
                row = i + nk - nq
                if blocks[h] == 0:
                    assert not got[r, h, i].any()
                    continue
                if tail is not None and row >= nk - int(tail[h]):
                    assert got[r, h, i, : row + 1].all() and not got[r, h, i, row + 1 :].any()
                    continue
                window = 1 if local is None else max(1, min(int(local[h]), int(blocks[h]) - 1))
                chosen = {0, *range(row - window + 1, row + 1)}
                assert len(chosen) <= blocks[h]
                for j in sorted(range(row + 1), key=lambda j: -float(scores[r, of[h], i, j])):
                    if len(chosen) >= blocks[h]:
                        break
                    chosen.add(j)
                assert set(torch.nonzero(got[r, h, i]).flatten().tolist()) == chosen


@pytest.mark.parametrize("nk", [1, 2, 5, 13])
@pytest.mark.parametrize("ties", [False, True])
def test_step_selection_equals_gate_selections_of_the_last_row(nk, ties):
    """The unpadded decode step's selection with its per-length constants made once: the same blocks
    as gate_selections for the last row, heads keeping different numbers of blocks and windows, ties
    in the scores broken the same way, heads without a gate seeing every block."""
    from moa_compress.gates import StepSelection, gate_selections

    g = torch.Generator().manual_seed(nk)
    scores = torch.randn(3, 2, 1, nk, generator=g, dtype=torch.float64)
    if ties:
        scores = scores.round()  # many equal scores
    blocks = torch.tensor([3, 0, 4, 2, 5, 1, 7])  # head 1: no gate
    of = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    local = torch.tensor([2, 1, 3, 4, 1, 9, 1])
    gated = blocks > 0
    none = torch.zeros_like(blocks)
    want = gate_selections(scores, blocks, of, local)[:, :, 0] | ~gated[None, :, None]
    got = StepSelection(nk, blocks, of, local, none, gated, scores.device)(scores)
    assert torch.equal(got, want)
    assert got[:, 1].all() and (got[:, 0].sum(-1) == min(3, nk)).all()
    # a gate head with no blocks (never at a real length) reads none, as gate_selections says
    every = torch.ones_like(gated)
    got = StepSelection(nk, blocks, of, local, none, every, scores.device)(scores)
    assert torch.equal(got, gate_selections(scores, blocks, of, local)[:, :, 0]) and not got[:, 1].any()
    # a dense tail: the step is the last row, so those heads see every block, as gate_selections says
    tail = torch.tensor([1, 0, 0, 2, 0, 0, 1])
    want = gate_selections(scores, blocks, of, local, tail)[:, :, 0] | ~gated[None, :, None]
    got = StepSelection(nk, blocks, of, local, tail, gated, scores.device)(scores)
    assert torch.equal(got, want) and got[:, [0, 3, 6]].all()
    if nk > 7:
        assert not got[:, 2].all()


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("nk", [1, 6])
def test_step_scores_through_the_block_query_map_equal_the_gates_scores(per_query_head, nk):
    """A decode step scores its query with the gate's per-block map (mean over the group, projection,
    RoPE at the block, scale: one matmul): the gate's own scores up to float32 rounding, GQA 6/2."""
    from moa_compress.gates import StepSelection

    torch.manual_seed(nk)
    gate = AttnGate(6, 2, 16, 8, BLOCK, 10000.0, per_query_head)
    q = torch.randn(3, 6, 1, 16, dtype=torch.bfloat16)  # the model's dtype; the gate's is float32
    codes = gate.key_codes(pool_keys(torch.randn(3, 2, nk * BLOCK, 16), BLOCK))  # [3, H_gate, nK, 8]
    want = gate.scores(gate.query_codes(q.float(), nk - 1), codes)
    blocks = torch.full((6,), 2)
    select = StepSelection(
        nk,
        blocks,
        torch.arange(6) // (1 if per_query_head else 3),
        blocks,
        blocks * 0,
        blocks > 0,
        "cpu",
        gate,
    )
    got = select.scores(q, codes)
    assert got.shape == want.shape == (3, gate.gate_heads, 1, nk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, gate.scores(gate.query_codes(q.float(), nk), codes))  # the block matters


@pytest.mark.parametrize(
    "family,per_query_head,rules", [("llama", False, mixed), ("qwen2", True, mixed), ("llama", False, tailed)]
)
def test_mixed_plan_prefill_equals_masked_reference_of_the_same_selections(family, per_query_head, rules):
    model = tiny_model(family, dtype=torch.float64)
    plan = gated_plan(model, rules(seed=1), per_query_head=per_query_head)
    if rules is tailed:
        assert any(getattr(r, "tail", 0) for heads in plan.rules for r in heads)
    assert plan.gate_layers and plan.density(77) < 0.9
    x = ids(2, 77, seed=1)
    with torch.no_grad():
        ref = Reference(model, plan, f"gate_ref_{family}")
        model.set_attn_implementation(ref.name)
        want = model(x).logits
        model.set_attn_implementation("sdpa")
        dense = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            got = model(x).logits
    assert (got - want).abs().max() <= 1e-9
    assert (got - dense).abs().max() > 1e-3  # the gates really select


def test_gate_plan_at_density_one_equals_dense():
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, lambda layer, head: GateRule(1.0))
    x = ids(1, 70, seed=2)
    with torch.no_grad():
        dense = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            got = model(x).logits
    assert (got - dense).abs().max() <= 1e-9


@pytest.mark.parametrize(
    "cache, backend, chunks, rules, seed",
    [
        ("dynamic", "reference", (41,), mixed, 3),
        ("plan", "reference", (41,), mixed, 3),
        ("plan", "torch", (41,), mixed, 3),
        ("dynamic", "reference", (23, 41, 58), mixed, 3),
        ("plan", "reference", (23, 41, 58), mixed, 3),
        ("plan", "torch", (7, 16, 41, 58), mixed, 3),
        ("plan", "torch", (41,), per_group, 1),  # gate and static groups
        ("plan", "torch", (7, 16, 41, 58), per_group, 4),  # gate and dense groups
        ("plan", "torch", (5,), per_group, 4),  # decoding from inside the first block
        ("dynamic", "reference", (41,), tailed, 3),  # gate heads with dense tails
        ("plan", "torch", (23, 41, 58), tailed, 5),
    ],
)  # torch: the CPU step reading the selected blocks only (forced below, whatever they save); chunks:
# the prompt fed in pieces ending at these lengths (chunked prefill, inside and at block boundaries);
# per_group: KV groups of gate (or dense) heads alone, which an unpadded step reads through
# ClassStorage.step_selected
def test_mixed_plan_decode_equals_reference_token_by_token(cache, backend, chunks, rules, seed, monkeypatch):
    model = tiny_model("mistral", dtype=torch.float64)
    plan = gated_plan(model, rules(seed=seed), seed=seed)
    decode_equals_reference(model, plan, cache, backend, chunks, monkeypatch)


def test_gate_class_of_kv_heads_apart_decodes_as_the_reference(monkeypatch):
    """KV groups 0 and 2 gated, group 1 static: the gate class's heads are not consecutive (its query
    heads are picked and written back by index, not as a slice)."""
    model = tiny_model("mistral", dtype=torch.float64, heads=6, kv_heads=3)

    def rule(layer, head):
        return StaticRule(1, float(BLOCK), 0.0) if head // 2 == 1 else GateRule(0.35, 1 + head % 2)

    plan = gated_plan(model, rule, seed=2)
    decode_equals_reference(model, plan, "plan", "torch", (7, 16, 41, 58), monkeypatch)


def decode_equals_reference(model, plan, cache, backend, chunks, monkeypatch, ranking=None, length=75):
    """Logits of the prompt fed in ``chunks`` then one token at a time to ``length`` through ``apply_plan``
    (``cache``: "dynamic" or "plan"; with ``ranking``) equal the :class:`Reference`'s within 1e-9."""
    from transformers import DynamicCache

    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "GATHER_MAX_FRACTION", 1.0)
    x = ids(1, length, seed=3)
    ends = (0, *chunks)
    tokens = ((i, i + 1) for i in range(chunks[-1], length))
    steps = [*itertools.pairwise(ends), *tokens]  # the prompt's chunks, then one token at a time

    def run(make):
        c = make()
        kw = {cache_kwarg(model): c}
        return torch.cat([model(x[:, a:b], use_cache=True, **kw).logits for a, b in steps], 1)

    with torch.no_grad():
        ref = Reference(model, plan, f"gate_ref_decode_{cache}", ranking, prompt_only=cache == "plan")
        model.set_attn_implementation(ref.name)
        want = run(lambda: DynamicCache(config=model.config))
        model.set_attn_implementation("sdpa")
        make = (
            (lambda: DynamicCache(config=model.config))
            if cache == "dynamic"
            else (lambda: PlanKVCache(model.config, plan, max_length=length + 5))
        )
        with apply_plan(model, plan, backend=backend, ranking=ranking):
            got = run(make)
    assert (got - want).abs().max() <= 1e-9
    return got


@pytest.mark.parametrize("ranking", [None, "sampled:2"])
def test_left_padded_batch_with_gate_heads_equals_each_row_alone(ranking):
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, mixed(seed=4), seed=4)
    a, b = ids(1, 53, seed=4), ids(1, 30, seed=5)
    batch = torch.zeros(2, 53, dtype=torch.long)
    batch[0], batch[1, 23:] = a[0], b[0]
    model.generation_config.eos_token_id = None
    with torch.no_grad(), apply_plan(model, plan, backend="reference", ranking=ranking):
        together = model.generate(
            batch, attention_mask=(batch != 0).long(), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
        alone = [model.generate(s, max_new_tokens=10, do_sample=False, pad_token_id=0) for s in (a, b)]
    assert torch.equal(together[0, 53:], alone[0][0, 53:])
    assert torch.equal(together[1, 53:], alone[1][0, 30:])


def padded_run(model, tokens, mask, following, cache):
    """Logits of a (left-padded) prompt ``tokens`` under ``mask``, then of the ``following`` tokens
    fed one at a time, through ``cache``."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(tokens, attention_mask=mask, position_ids=position, **kw).logits]
    for t in range(following.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = mask.sum(-1, keepdim=True) - 1
        logits.append(model(following[:, t : t + 1], attention_mask=mask, position_ids=position, **kw).logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("backend,ranking", [("reference", None), ("torch", None), ("torch", "sampled:3")])
def test_plan_kv_cache_left_padded_gate_batch_equals_each_row_alone(backend, ranking, monkeypatch):
    """Prompt and 20 decode steps of a left-padded batch through one PlanKVCache, logits of every real
    token against each row run alone (unpadded, its own PlanKVCache): gate layers keep codes per row."""
    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "GATHER_MAX_FRACTION", 1.0)
    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, mixed(seed=4), seed=4)
    seqs = [ids(1, n, seed=40 + n)[0] for n in (53, 30, 17)]
    batch, mask = left_padded(seqs)
    extra = ids(len(seqs), 20, seed=9)

    with torch.no_grad(), apply_plan(model, plan, backend=backend, ranking=ranking):
        together = padded_run(
            model, batch, mask, extra, PlanKVCache(model.config, plan, max_length=batch.shape[1] + 20)
        )
        for r, q in enumerate(seqs):
            cache = PlanKVCache(model.config, plan, max_length=len(q) + 20)
            alone = padded_run(
                model, q[None], torch.ones(1, len(q), dtype=torch.long), extra[r : r + 1], cache
            )
            pad = batch.shape[1] - len(q)
            assert (together[r, pad:] - alone[0]).abs().max() <= 1e-9, r


def test_left_padded_gate_batch_beam_search_through_plan_kv_cache_equals_each_row_alone():
    """Beam search reorders and repeats rows: the per-row gate codes follow."""
    model = tiny_model("llama", dtype=torch.float64)
    model.generation_config.eos_token_id = None
    plan = gated_plan(model, mixed(seed=6), seed=6)
    seqs = [ids(1, n, seed=50 + n)[0] for n in (37, 21)]
    batch, mask = left_padded(seqs)
    new = 12
    options = {"max_new_tokens": new, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        cache = PlanKVCache(model.config, plan, max_length=batch.shape[1] + new)
        together = model.generate(batch, attention_mask=mask, **options, **{cache_kwarg(model): cache})
        for r, q in enumerate(seqs):
            alone = model.generate(
                q[None],
                **options,
                **{cache_kwarg(model): PlanKVCache(model.config, plan, max_length=len(q) + new)},
            )
            assert torch.equal(together[r, batch.shape[1] :], alone[0, len(q) :]), r


def test_plan_kv_cache_refuses_a_padded_gate_batch_in_chunks_in_one_line():
    model = tiny_model("llama")
    plan = gated_plan(model, mixed(seed=5), seed=5)
    batch = ids(2, 40, seed=6)
    batch[1, :9] = 0
    mask = (batch != 0).long()
    cache = PlanKVCache(model.config, plan, max_length=60)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad(), apply_plan(model, plan):
        model(batch[:, :30], attention_mask=mask[:, :30], **kw)
        with pytest.raises(PlanRuntimeError, match="prompt in one call"):
            model(batch[:, 30:], attention_mask=mask, **kw)


def test_gate_plan_round_trips_with_its_tensors_and_bad_files_are_one_line_errors(tmp_path):
    model = tiny_model("llama")
    plan = gated_plan(model, mixed(seed=6), seed=6)
    save_plan(plan, tmp_path / "p")
    back = load_plan(tmp_path / "p", model)
    assert back == plan and back.gates == plan.gates
    changed = dict(plan.tensors)
    name = next(iter(changed))
    changed[name] = changed[name] + 1e-3
    assert Plan(plan.model, plan.rules, BLOCK, gates=plan.gates, tensors=changed) != plan  # tensors count

    tensors = tmp_path / "p" / "plan.safetensors"
    body = tensors.read_bytes()
    tensors.write_bytes(body[: len(body) // 2])
    with pytest.raises(PlanError, match="truncated"):
        load_plan(tmp_path / "p")
    tensors.unlink()
    with pytest.raises(PlanError, match="lack"):
        load_plan(tmp_path / "p")
    from safetensors.torch import save_file

    wrong = {k: v[..., :2].contiguous() for k, v in plan.tensors.items()}
    save_file(wrong, str(tensors))
    with pytest.raises(PlanError, match="shape"):
        load_plan(tmp_path / "p")


def test_cli_eval_of_a_plan_with_missing_gate_weights_exits_2(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer(["hi there"])
    model = tiny_model("llama", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_plan(gated_plan(model, mixed(seed=7), seed=7), tmp_path / "p")
    (tmp_path / "p" / "plan.safetensors").unlink()
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "model"), "--plan", str(tmp_path / "p"),
                                      "--prompt", "hi", "--dtype", "float32"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 333])
@pytest.mark.parametrize("target", [0.05, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("local,tail", [(1, 0), (3, 0), (50, 0), (1, 1), (3, 4)])
def test_gate_rule_density_is_exact_for_any_scores_and_no_row_is_empty(n, target, local, tail):
    from moa_compress.gates import gate_selections
    from moa_compress.plan import causal_block_pairs

    rule = GateRule(target, local, tail=tail)
    nb = num_blocks(n, BLOCK)
    pairs = causal_block_pairs(n, BLOCK)
    for seed in range(3):
        scores = torch.randn(2, 1, nb, nb, generator=torch.Generator().manual_seed(seed))
        scores = scores.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
        blocks = torch.tensor([rule.blocks_per_row(n, BLOCK)])
        mask = gate_selections(
            scores, blocks, torch.tensor([0]), torch.tensor([local]), torch.tensor([tail])
        )[:, 0]  # [2, nB, nB]
        first_tail = max(0, nb - tail)  # the tail rows keep every causal block
        assert (mask[:, first_tail:] == torch.ones(nb, nb, dtype=torch.bool).tril()[first_tail:]).all()
        assert mask.any(-1).all() and mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., 0].all()
        window = rule.local_blocks(n, BLOCK)
        band = torch.ones(nb, nb, dtype=torch.bool).tril() & ~torch.ones(nb, nb, dtype=torch.bool).tril(
            -window
        )
        assert (mask | ~band).all()  # the local window is always kept
        for row_mask in mask:
            assert float(pairs[row_mask].sum() / pairs.sum()) == pytest.approx(
                rule.density(n, BLOCK), abs=1e-12
            )
    assert rule.density(n, BLOCK) <= max(target, GateRule(1e-9, tail=tail).density(n, BLOCK)) + 1e-12


def test_greedy_replies_of_a_gate_plan_batched_equal_one_prompt_at_a_time():
    """The eval's batched generation (left padding, reference scoring, a cropped cache) with gate heads."""
    from moa_compress import evaluate
    from tests.factories import tiny_bpe_tokenizer

    bpe = tiny_bpe_tokenizer()
    model = tiny_model("llama", dtype=torch.float64, vocab=len(bpe))
    plan = gated_plan(model, mixed(seed=8), seed=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(bpe), (n,), generator=g).tolist() for n in (70, 45, 70)]
    references = [[5, 6, 7], [8], [9, 10]]
    with torch.no_grad(), evaluate.variant(model, plan, "reference"):
        replies, logprobs = evaluate.greedy_replies(model, bpe, prompts, references, 5)
        for prompt, reference, reply, logprob in zip(prompts, references, replies, logprobs, strict=True):
            alone, alone_lp = evaluate.greedy_replies(model, bpe, [prompt], [reference], 5)
            assert alone == [reply] and alone_lp[0] == pytest.approx(logprob, rel=1e-9)


@pytest.mark.parametrize("keep_raw", [False, True])
def test_gate_keys_fed_piece_by_piece_code_every_block_as_pooling_all_keys_at_once(keep_raw):
    from moa_compress.gate_runtime import GateKeys, row_codes

    torch.manual_seed(4)
    gate = AttnGate(6, 2, 8, 8, BLOCK, 10000.0, per_query_head=keep_raw)
    keys = torch.randn(2, 2, 83, 8, dtype=torch.float64)
    held = GateKeys(BLOCK, keep_raw=keep_raw)
    cuts = [0, 21, 32, 33, *range(34, 84)]  # a prompt inside a block, one at a block's end, then tokens
    for a, b in itertools.pairwise(cuts):
        if a in (40, 64):  # a beam reorder inside a block and at a block's start: rows swap
            held.batch_map(lambda t: t.index_select(0, torch.tensor([1, 0])))
            keys = keys.flip(0)
        held.update(keys[:, :, a:b], a, gate)
        want = row_codes(gate, keys[:, :, :b], BLOCK)
        if b % BLOCK:  # the unfinished last block (only ever a diagonal, kept unscored) has a placeholder
            want[:, :, -1] = 0.0
        got = held.all_codes(gate)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
        assert held.raw.shape[2] == (b if keep_raw else b % BLOCK)  # only the unfinished block's keys
    if keep_raw:  # the default cache can be cropped back, into a coded block too
        held.update(keys[:, :, 40:41], 40, gate)
        want = row_codes(gate, keys[:, :, :41], BLOCK)
        want[:, :, -1] = 0.0
        assert torch.allclose(held.all_codes(gate), want, atol=1e-6)
    else:
        with pytest.raises(PlanRuntimeError, match="pooled the keys before 80"):
            held.update(keys[:, :, 40:41], 40, gate)
    with pytest.raises(PlanRuntimeError, match="saw"):
        held.update(keys[:, :, :1], held.length + 1, gate)


def test_row_gate_keys_code_each_row_from_its_own_first_token_as_pooling_it_at_once():
    """A left-padded batch's codes, fed a prompt then token by token: every row's complete blocks equal
    pooling that row's keys at once, its unfinished block (and anything after) is zero, and the
    capacity grows past the prompt's blocks."""
    from moa_compress.gate_runtime import RowGateKeys, row_codes

    torch.manual_seed(5)
    gate = AttnGate(6, 2, 8, 8, BLOCK, 10000.0)
    padding = [0, 13, 32, 40]  # one row unpadded, one padded by exactly two blocks, one to a single token
    width, steps = 41, 60
    keys = torch.randn(len(padding), 2, width + steps, 8, dtype=torch.float64)
    held = RowGateKeys(BLOCK)
    held.start(keys[:, :, :width], padding, gate)
    for t in range(steps + 1):
        lengths = torch.tensor([width + t - p for p in padding])
        if t:
            held.step(keys[:, :, width + t - 1 : width + t], lengths, gate)
        got = held.all_codes(lengths)
        assert got.shape[2] == -(-int(lengths.max()) // BLOCK)
        for r, p in enumerate(padding):
            n = int(lengths[r])
            want = row_codes(gate, keys[r : r + 1, :, p : p + n], BLOCK)
            if n % BLOCK:
                want[:, :, -1] = 0.0
            assert torch.allclose(got[r : r + 1, :, : want.shape[2]], want, atol=1e-9), (t, r)
            assert not got[r, :, want.shape[2] :].any()


def test_decode_selection_of_a_padded_batch_equals_each_row_at_its_own_length():
    """One batched selection for rows of different lengths (their own blocks per row and diagonal)
    equals selecting each row alone."""
    from moa_compress.gate_runtime import decode_visible_blocks

    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, mixed(seed=2), seed=2)
    gate = gates_from_plan(plan)[plan.gate_layers[0]]
    torch.manual_seed(3)
    lengths = torch.tensor([150, 17, 96, 1, 97])
    nk = -(-int(lengths.max()) // BLOCK)
    q = torch.randn(len(lengths), model.config.num_attention_heads, 1, 16, dtype=torch.float64)
    codes = torch.randn(len(lengths), gate.gate_heads, nk, gate.gate_dim, dtype=gate.k_proj.dtype)
    layer = plan.gate_layers[0]
    together = decode_visible_blocks(plan, layer, gate, q, codes, lengths)
    for r, n in enumerate(lengths.tolist()):
        own = -(-n // BLOCK)
        alone = decode_visible_blocks(plan, layer, gate, q[r : r + 1], codes[r : r + 1, :, :own], n)
        assert torch.equal(together[r, :, :own], alone[0]), r
        gated = torch.tensor([rule.input_dependent for rule in plan.rules[layer]])
        assert not together[r][gated][:, own:].any()  # blocks after the row's own hold nothing for it


def test_plan_kv_cache_of_a_gate_plan_counts_and_bounds_what_its_gate_layers_keep():
    model = tiny_model("llama", dtype=torch.float32)
    plan = gated_plan(model, lambda layer, head: GateRule(0.3))
    x = ids(1, 100, seed=5)
    with torch.no_grad(), apply_plan(model, plan, backend="torch"):
        cache = PlanKVCache(model.config, plan, max_length=110)
        model(x, use_cache=True, **{cache_kwarg(model): cache})
        for t in range(100, 104):
            model(ids(1, 1, seed=t), use_cache=True, **{cache_kwarg(model): cache})
    layer = cache.layers[0]
    held = layer.gate_keys
    assert held.length == 104 and held.codes.shape[2] == 104 // BLOCK and held.raw.shape[2] == 104 % BLOCK
    storage = sum(s.nbytes()[1] for s in layer.storage)
    assert layer.nbytes()[1] == storage + held.nbytes() and held.nbytes() < storage / 4


# ----------------------------------------------------------------------------------------------
# Prompts ranked by sampled queries (PrefillRanking)


def brute_sampled_scores(query, key, scale, samples):
    """:func:`sampled_scores` with loops: per KV group and query block of the call, the mean of the
    sampled queries' softmax attention summed per key block (as :meth:`Reference.sampled_row`)."""
    b, hq, sq, _ = query.shape
    hkv, n = key.shape[1], key.shape[2]
    group, first = hq // hkv, n - sq
    rows = range(first // BLOCK, num_blocks(n, BLOCK))
    out = torch.full((b, hkv, len(rows), num_blocks(n, BLOCK)), float("-inf"), dtype=torch.float64)
    for r in range(b):
        for g in range(hkv):
            for i, row in enumerate(rows):
                wanted = [row * BLOCK + BLOCK - 1 - (t * BLOCK) // samples for t in range(samples)]
                positions = [p for p in wanted if first <= p < n] or [min(row * BLOCK + BLOCK - 1, n - 1)]
                total = torch.zeros(row + 1, dtype=torch.float64)
                for h in range(g * group, (g + 1) * group):
                    for p in positions:
                        weights = torch.softmax(key[r, g, : p + 1] @ query[r, h, p - first] * scale, 0)
                        for j in range(p + 1):
                            total[j // BLOCK] += weights[j]
                out[r, g, i, : row + 1] = (total / (len(positions) * group)).log()
    return out


@pytest.mark.parametrize(
    "n,first,samples,hq,hkv",
    [(77, 0, 3, 6, 2), (77, 37, 4, 6, 3), (50, 49, 2, 4, 4), (40, 0, 16, 4, 2), (33, 21, 5, 2, 1)],
)  # odd lengths, a call starting inside a block (no sampled query of its first block in it), GQA,
# every query sampled, more samples than a call's last block holds
def test_sampled_scores_equal_brute_force(n, first, samples, hq, hkv):
    from moa_compress.gate_runtime import sampled_scores

    g = torch.Generator().manual_seed(n + first)
    query = torch.randn(2, hq, n - first, 8, generator=g, dtype=torch.float64)
    key = torch.randn(2, hkv, n, 8, generator=g, dtype=torch.float64)
    want = brute_sampled_scores(query, key, 0.4, samples)
    for chunk_bytes in (1, 1 << 23):  # a chunk per query block, and all in one
        got = sampled_scores(query, key, 0.4, BLOCK, samples, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.float64 and torch.equal(got.isfinite(), want.isfinite())
        torch.testing.assert_close(got[got.isfinite()], want[want.isfinite()], rtol=1e-12, atol=1e-12)


def test_sampled_scores_of_every_query_are_the_block_mass_per_query():
    from moa_compress.gate_runtime import sampled_scores
    from moa_compress.gates import pooled_attention

    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 6, 70, 8, generator=g, dtype=torch.float64)
    key = torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64)
    mass = pooled_attention(query, key, 0.5, BLOCK, "sum")  # [1, 6, nB, nB]
    per_query = torch.tensor([BLOCK] * 4 + [70 - 4 * BLOCK], dtype=torch.float64)[:, None]
    want = (mass / per_query).unflatten(1, (2, 3)).mean(2)
    got = sampled_scores(query, key, 0.5, BLOCK, BLOCK).exp()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def roomy(layer, head):
    """Gate rules with room to choose at 150 tokens (10 blocks: 3 to 5 blocks a row, not 2), beside
    static and dense heads."""
    kinds = (GateRule(0.6), GateRule(0.45, 2), StaticRule(1, float(BLOCK), 0.0), DenseRule())
    return kinds[(layer + head) % 4]


@pytest.mark.parametrize("family,per_query_head,layers", [("llama", False, None), ("qwen2", True, {1})])
def test_prompt_ranked_by_sampled_queries_equals_the_reference(family, per_query_head, layers):
    from moa_compress.gate_runtime import PrefillRanking

    model = tiny_model(family, dtype=torch.float64)
    plan = gated_plan(model, roomy, per_query_head=per_query_head)
    ranking = PrefillRanking(3, layers)
    x = ids(2, 150, seed=1)
    with torch.no_grad():
        ref = Reference(model, plan, f"gate_ref_sampled_{family}", ranking)
        model.set_attn_implementation(ref.name)
        want = model(x).logits
        model.set_attn_implementation("sdpa")
        with apply_plan(model, plan, backend="reference", ranking=ranking):
            got = model(x).logits
        with apply_plan(model, plan, backend="reference"):
            by_gate = model(x).logits
    assert (got - want).abs().max() <= 1e-9
    assert (got - by_gate).abs().max() > 1e-4  # the sampled ranking chose other blocks


@pytest.mark.parametrize(
    "cache, backend, chunks", [("dynamic", "reference", (71, 97, 130)), ("plan", "torch", (130,)),
                               ("plan", "torch", (130, 141))],
)  # fmt: skip
def test_sampled_prompt_ranking_then_gate_steps_decode_as_the_reference(cache, backend, chunks, monkeypatch):
    """A prompt ranked by sampled queries (each chunk with the default cache; the first only through a
    PlanKVCache), then decoding steps ranked by the gate."""
    from moa_compress.gate_runtime import PrefillRanking

    model = tiny_model("mistral", dtype=torch.float64)
    plan = gated_plan(model, roomy, seed=3)
    run = (model, plan, cache, backend, chunks, monkeypatch)
    got = decode_equals_reference(*run, PrefillRanking(2), length=150)
    by_gate = decode_equals_reference(*run, length=150)
    assert (got - by_gate).abs().max() > 1e-4


def test_prefill_ranking_parses_layers_and_refuses_bad_specs_in_one_line():
    from moa_compress.gate_runtime import PrefillRanking, format_layers, parse_layers

    assert PrefillRanking.parse("sampled:4", "20-22,25") == PrefillRanking(4, {20, 21, 22, 25})
    assert PrefillRanking.parse("gate").samples == 0
    assert format_layers(parse_layers("0-3,9,11-12")) == "0-3,9,11-12"
    assert PrefillRanking(4, range(20, 30)).describe() == "sampled:4 in layers 20-29"
    assert not PrefillRanking(4, {3}).applies(2, 100, 100) and not PrefillRanking(4).applies(3, 1, 100)
    for spec, layers in (("sampled:0", None), ("sampled", None), ("mass", None), ("sampled:4", "9-3"),
                         ("sampled:4", "a")):  # fmt: skip
        with pytest.raises(PlanRuntimeError) as err:
            PrefillRanking.parse(spec, layers)
        assert "\n" not in str(err.value)
    model = tiny_model("llama")
    plan = gated_plan(model, mixed(seed=1))
    with pytest.raises(PlanRuntimeError, match="sampled:R"):
        apply_plan(model, plan, ranking="sampled:x")
    with pytest.raises(PlanRuntimeError, match=r"layers \[2, 3\] are not layers"):
        apply_plan(model, plan, ranking=PrefillRanking.parse("sampled:2", "1-3"))


def saved_model_and_plan(tmp_path, rule_fn) -> list[str]:
    """A tiny model with a word tokenizer and a ``gated_plan`` of ``rule_fn`` saved under ``tmp_path``:
    the command-line arguments ``MODEL --plan P --dtype float32``."""
    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer(["hi there"])
    model = tiny_model("llama", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_plan(gated_plan(model, rule_fn), tmp_path / "p")
    return [str(tmp_path / "model"), "--plan", str(tmp_path / "p"), "--dtype", "float32"]


def test_eval_and_generate_take_a_ranking_and_refuse_a_bad_one_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    base = saved_model_and_plan(tmp_path, roomy)
    for command, extra in (("generate", ["--prompt", "hi", "--max-new-tokens", "2"]),
                           ("eval", ["--tasks", "passkey", "--lengths", "160", "--limit", "1"])):  # fmt: skip
        for bad in (["--ranking", "sampled:0"], ["--ranking", "exact"], ["--ranking-layers", "0-1"],
                    ["--ranking", "sampled:2", "--ranking-layers", "1-0"],
                    ["--ranking", "sampled:2", "--ranking-layers", "0-5"]):  # fmt: skip
            result = CliRunner().invoke(app, [command, *base, *extra, *bad])
            assert result.exit_code == 2, (command, bad, result.output)
            assert "error:" in result.output and "Traceback" not in result.output
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", *base, "--tasks", "passkey", "--lengths", "160", "--limit", "1",
                                      "--ranking", "sampled:2", "--ranking-layers", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["settings"]["ranking"] == "sampled:2 in layers 1"
    result = CliRunner().invoke(app, ["generate", *base, "--prompt", "hi there", "--max-new-tokens", "2",
                                      "--ranking", "sampled:2"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_plan_carries_its_ranking_and_apply_plan_runs_it_unless_told_otherwise(tmp_path):
    import dataclasses

    from moa_compress.gate_runtime import PrefillRanking

    model = tiny_model("llama", dtype=torch.float64)
    plan = gated_plan(model, roomy)
    ranked = dataclasses.replace(
        plan, gates=dataclasses.replace(plan.gates, ranking_samples=3, ranking_layers=(1,))
    )
    assert ranked != plan
    save_plan(ranked, tmp_path / "r")
    data = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert data["schema_version"] == 7 and data["gates"]["ranking_samples"] == 3
    assert data["gates"]["ranking_layers"] == [1]
    assert load_plan(tmp_path / "r", model) == ranked
    save_plan(plan, tmp_path / "p")  # ranked by the gates: nothing written, an older schema
    plain = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert "ranking_samples" not in plain["gates"] and plain["schema_version"] < 7
    from typer.testing import CliRunner

    from moa_compress.cli import app

    shown = CliRunner().invoke(app, ["plan", "show", str(tmp_path / "r")])
    assert shown.exit_code == 0 and "ranking: sampled:3 in layers 1 (" in shown.output, shown.output
    assert PrefillRanking.for_plan(ranked) == PrefillRanking(3, {1})
    assert PrefillRanking.for_plan(ranked, "gate") is None and PrefillRanking.for_plan(plan) is None
    x = ids(2, 150, seed=1)
    with torch.no_grad():

        def logits(p, **kw):
            with apply_plan(model, p, backend="reference", **kw):
                return model(x).logits

        own = logits(ranked)
        torch.testing.assert_close(own, logits(plan, ranking=PrefillRanking(3, {1})), rtol=0, atol=0)
        torch.testing.assert_close(logits(ranked, ranking="gate"), logits(plan), rtol=0, atol=0)
        assert (own - logits(plan)).abs().max() > 1e-4
    for bad, message in (({"ranking_samples": -1}, "ranking_samples"), ({"ranking_samples": True}, "ranking_samples"),
                         ({"ranking_samples": 2, "ranking_layers": "1"}, "ranking_layers"),
                         ({"ranking_samples": 2, "ranking_layers": [5]}, r"ranking_layers \[5\]")):  # fmt: skip
        broken = json.loads(json.dumps(data))
        broken["gates"].update(bad)
        (tmp_path / "r" / "plan.json").write_text(json.dumps(broken))
        with pytest.raises(PlanError, match=message) as err:
            load_plan(tmp_path / "r", model)
        assert "\n" not in str(err.value)
