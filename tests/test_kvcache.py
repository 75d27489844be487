"""The planned decode cache: ring eviction against the reference at every step, left-padded batches,
beams, sampling, growth past the planned length, and a per-step path that keeps its buffers."""

from __future__ import annotations

import pytest
import torch

from moa_compress.attention import decode_attention
from moa_compress.kernels.cpu import decode_attention_torch
from moa_compress.kernels.reference import decode_attention_reference
from moa_compress.kvcache import PlanKVCache
from moa_compress.plan import DenseRule, StaticRule
from moa_compress.runtime import PlanRuntimeError, apply_plan, cache_kwarg
from tests.factories import left_padded, random_qkv, tiny_model
from tests.test_runtime import BLOCK, ids, make_plan, register_reference


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def mixed_heads(layer, head):
    """Per layer of the 4-query / 2-KV-head tiny model: KV head 0 serves a dense and a static head
    (a full buffer), KV head 1 two static heads of different sinks and bands (a ring)."""
    rules = [
        [DenseRule(), StaticRule(1, 20.0, 0.0), StaticRule(0, 2 * BLOCK, 0.0), StaticRule(2, 10.0, 0.25)],
        [
            StaticRule(1, 3.0, 0.1),
            StaticRule(0, 40.0, 0.0),
            StaticRule(1, BLOCK, 0.0),
            StaticRule(0, 5.0, 0.2),
        ],
    ]
    return rules[layer % 2][head]


def buffers(cache):
    return [(s.keys, s.values, s.slot_positions) for layer in cache.layers for s in layer.storage]


def test_decode_attention_backends_match_the_reference():
    q, k, v = random_qkv(3, 6, 2, 1, 40, d=16, seed=1)
    q = q[:, :, 0]
    visible = torch.rand(3, 6, 40, generator=torch.Generator().manual_seed(2)) < 0.4
    visible[..., 7] = True  # every head sees at least one slot
    want = decode_attention_reference(q, k, v, visible, 0.25)
    keys = k.repeat_interleave(3, 1)
    manual = torch.softmax(
        (torch.einsum("bhd,bhcd->bhc", q, keys) * 0.25).masked_fill(~visible, -torch.inf), -1
    )
    torch.testing.assert_close(want, torch.einsum("bhc,bhcd->bhd", manual, v.repeat_interleave(3, 1)))
    torch.testing.assert_close(decode_attention_torch(q, k, v, visible, 0.25), want, rtol=0, atol=1e-12)
    low = [x.bfloat16() for x in (q, k, v)]
    ref_error = (decode_attention_reference(*low, visible, 0.25).double() - want).abs().max()
    error = (decode_attention(*low, visible, scale=0.25).double() - want).abs().max()
    assert error <= 3 * ref_error + 1e-6
    # A head that sees no slot: zeros on every backend, the others unchanged.
    visible[1, 4] = False
    want = decode_attention_reference(q, k, v, visible, 0.25)
    assert want[1, 4].eq(0).all() and want.isfinite().all()
    torch.testing.assert_close(decode_attention_torch(q, k, v, visible, 0.25), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_fraction", [0.0, 1.0])  # its fallback, and the gathered path
def test_selected_blocks_decode_equals_the_specification(max_fraction):
    """A full buffer (slot = position, empty slots at the end) whose heads chose key blocks, GQA 9/3,
    heads of a group choosing differently, one head seeing nothing: reading the selected blocks only
    equals the mask over every slot, in float64."""
    from moa_compress.kernels.cpu import decode_attention_selected_torch
    from moa_compress.kernels.slots import SlotVisibility

    g = torch.Generator().manual_seed(5)
    b, hq, hkv, capacity, bs, d = 2, 9, 3, 256, 16, 8
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64) for _ in range(2))
    positions = torch.tensor([200, 131])
    slot_positions = torch.arange(capacity).expand(b, -1).clone()
    slot_positions[slot_positions > positions[:, None]] = -1
    n_blocks = 13  # covers position 200 (block 12)
    blocks = torch.rand(b, hq, n_blocks, generator=g) < 0.15
    blocks[..., 0] = True
    blocks[0, 4] = False  # sees nothing
    visibility = SlotVisibility(
        slot_positions, positions, torch.zeros(hq, dtype=torch.long), torch.full((hq,), torch.inf, dtype=torch.float64),
        torch.zeros(hq, dtype=torch.float64), bs, blocks, slot_is_position=True,
    )  # fmt: skip
    some = torch.randint(0, capacity, (b, hq, 50), generator=g)  # the mask at chosen slots
    assert torch.equal(visibility.mask(some), visibility.mask().gather(-1, some))
    want = decode_attention_reference(q, k, v, visibility.mask(), 0.3)
    got = decode_attention_selected_torch(q, k, v, visibility, 0.3, max_fraction=max_fraction)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[0, 4].eq(0).all()
    # decode_attention picks this path for such a visibility on CPU
    torch.testing.assert_close(decode_attention(q, k, v, visibility, scale=0.3), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_fraction", [0.0, 1.0])  # every filled slot under a mask; the gathered blocks
@pytest.mark.parametrize("position", [200, 207, 191, 5])  # inside a block, its end, before one; the first
def test_unpadded_selected_blocks_decode_equals_the_specification(max_fraction, position):
    """The unpadded gate step (one position for the batch, known on the host): GQA 9/3, heads of a
    group choosing differently, rows choosing differently, one head seeing nothing, keys written past
    the position (they must stay unseen) — equal to the reference over the specification's mask."""
    from moa_compress.kernels.cpu import decode_attention_selected_unpadded
    from moa_compress.kernels.slots import SlotVisibility

    g = torch.Generator().manual_seed(position)
    b, hq, hkv, capacity, bs, d = 2, 9, 3, 256, 16, 8
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64) for _ in range(2))
    n_blocks = position // bs + 1
    blocks = torch.rand(b, hq, n_blocks, generator=g) < 0.2
    blocks[..., 0] = blocks[..., -1] = True
    blocks[1, 7] = False  # sees nothing
    slot_positions = torch.arange(capacity).expand(b, -1).clone()
    slot_positions[slot_positions > position] = -1
    visibility = SlotVisibility(
        slot_positions, torch.tensor([position, position]), torch.zeros(hq, dtype=torch.long),
        torch.full((hq,), torch.inf, dtype=torch.float64), torch.zeros(hq, dtype=torch.float64), bs, blocks,
        slot_is_position=True,
    )  # fmt: skip
    want = decode_attention_reference(q, k, v, visibility.mask(), 0.3)
    got = decode_attention_selected_unpadded(q, k, v, blocks, position, bs, 0.3, max_fraction=max_fraction)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[1, 7].eq(0).all() and not got[0, 7].eq(0).all()
    # every head reading a block (a gate step's promise): no zeroing pass, the same result
    blocks[1, 7, -1] = True
    want = decode_attention_reference(q, k, v, visibility.mask(), 0.3)  # the visibility holds `blocks`
    got = decode_attention_selected_unpadded(
        q, k, v, blocks, position, bs, 0.3, max_fraction=max_fraction, every_head_reads=True
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prompt_len", [10, 45, 48])  # shorter than a block, ragged, a multiple of it
@pytest.mark.parametrize("backend", ["reference", "torch"])  # torch: the unpadded step path, masks kept
def test_every_step_equals_the_reference_and_keeps_its_buffers(prompt_len, backend):
    """Static rings and full buffers mixed, GQA 4/2: every step's logits equal a dense reference of
    the plan's mask over a full cache, evictions happen, and no step reallocates storage. On the
    torch backend an unpadded batch steps through ``ClassStorage.step_unpadded``, whose visibility
    is kept from step to step (rebuilt only when a band moves)."""
    from transformers import DynamicCache

    model = tiny_model("llama", dtype=torch.float64, layers=3)  # layer 2: dense heads only
    plan = make_plan(model, lambda layer, head: DenseRule() if layer == 2 else mixed_heads(layer, head))
    prompt, steps = ids(1, prompt_len, seed=prompt_len), 70
    cache = PlanKVCache(model.config, plan, max_length=prompt_len + steps)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model.set_attn_implementation(register_reference(plan, f"test_ref_ring_{prompt_len}"))
        want = [model(prompt, **{cache_kwarg(model): reference}).logits[:, -1]]
        model.set_attn_implementation("sdpa")
        with apply_plan(model, plan, backend=backend):
            got = [model(prompt, **{cache_kwarg(model): cache}).logits[:, -1]]
            before = [tuple(t.data_ptr() for t in trio) for trio in buffers(cache)]
            capacities = [[s.kv.capacity for s in layer.storage] for layer in cache.layers]
            assert any(s.kv.is_ring for layer in cache.layers for s in layer.storage)
            tokens = got[0].argmax(-1, keepdim=True)
            for _ in range(steps - 1):
                got.append(model(tokens, **{cache_kwarg(model): cache}).logits[:, -1])
                tokens = got[-1].argmax(-1, keepdim=True)
        model.set_attn_implementation(register_reference(plan, f"test_ref_ring_{prompt_len}"))
        tokens = want[0].argmax(-1, keepdim=True)
        for _ in range(steps - 1):
            want.append(model(tokens, **{cache_kwarg(model): reference}).logits[:, -1])
            tokens = want[-1].argmax(-1, keepdim=True)
    for step, (g, w) in enumerate(zip(got, want)):
        assert (g - w).abs().max() <= 1e-10, step
    kept = [s.step_cache is not None for layer in cache.layers[:2] for s in layer.storage]
    assert all(kept) if backend == "torch" else not any(kept)  # the dense layer needs no mask
    assert [tuple(t.data_ptr() for t in trio) for trio in buffers(cache)] == before
    assert [[s.kv.capacity for s in layer.storage] for layer in cache.layers] == capacities
    memory = cache.memory()
    assert memory["allocated_bytes"] < memory["full_bytes"]
    # A ring really dropped positions: it holds fewer than the sequence has.
    rings = [s for layer in cache.layers for s in layer.storage if s.kv.is_ring]
    assert all(int((s.slot_positions >= 0).sum()) < prompt_len + steps - 1 for s in rings)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # gemma3: a 40-token window layer first
def test_left_padded_batch_generates_what_each_sequence_generates(family):
    model = tiny_model(family, dtype=torch.float64)
    model.generation_config.eos_token_id = None
    plan = make_plan(model, mixed_heads)
    seqs = [ids(1, n, seed=30 + n)[0] for n in (41, 9, 26)]
    batch, mask = left_padded(seqs)
    new = 50
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        cache = PlanKVCache(model.config, plan, max_length=batch.shape[1] + new)
        together = model.generate(
            batch, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
            **{cache_kwarg(model): cache},
        )  # fmt: skip
        for i, s in enumerate(seqs):
            alone = model.generate(
                s[None], max_new_tokens=new, do_sample=False, pad_token_id=0,
                **{cache_kwarg(model): PlanKVCache(model.config, plan, max_length=len(s) + new)},
            )  # fmt: skip
            assert torch.equal(together[i, batch.shape[1] :], alone[0, len(s) :]), i
    assert cache.layers[-1].padding.tolist() == [0, 32, 15]


@pytest.mark.parametrize(
    "mode, backend, family",
    [("beams", "reference", "llama"), ("beams", "torch", "llama"), ("sampling", "reference", "llama"),
     ("sampling", "torch", "llama"), ("beams", "torch", "gemma3"), ("sampling", "torch", "gemma3")],
)  # fmt: skip
def test_beam_search_and_sampling_equal_a_full_cache(mode, backend, family):
    from transformers import DynamicCache

    model = tiny_model(family, dtype=torch.float64)
    model.generation_config.eos_token_id = None
    plan = make_plan(model, mixed_heads)
    prompt = ids(2, 37, seed=40)
    options = {"num_beams": 3, "do_sample": False} if mode == "beams" else {"do_sample": True, "top_k": 20}
    outs = []
    with torch.no_grad(), apply_plan(model, plan, backend=backend):
        for cache in (DynamicCache(config=model.config), PlanKVCache(model.config, plan, max_length=37 + 40)):
            torch.manual_seed(0)
            outs.append(
                model.generate(
                    prompt, max_new_tokens=40, pad_token_id=0, **options, **{cache_kwarg(model): cache}
                )
            )
    assert torch.equal(outs[0], outs[1])


def test_past_the_planned_length_full_buffers_grow_and_growing_bands_refuse():
    model = tiny_model("llama", dtype=torch.float64)
    model.generation_config.eos_token_id = None
    fixed = make_plan(model, lambda layer, head: DenseRule() if head == 0 else StaticRule(1, 20.0, 0.0))
    prompt = ids(1, 30, seed=50)
    with torch.no_grad(), apply_plan(model, fixed, backend="reference"):
        want = model.generate(prompt, max_new_tokens=60, do_sample=False, pad_token_id=0)
        cache = PlanKVCache(model.config, fixed, max_length=40)  # planned for 10 new tokens only
        got = model.generate(
            prompt, max_new_tokens=60, do_sample=False, pad_token_id=0, **{cache_kwarg(model): cache}
        )
    assert torch.equal(got, want)
    full = [s for s in cache.layers[0].storage if not s.kv.is_ring]
    assert full and full[0].kv.capacity >= 89  # doubled from 48: the growth rule
    growing = make_plan(model, lambda layer, head: StaticRule(0, 0.0, 0.25))
    with torch.no_grad(), apply_plan(model, growing, backend="reference"):
        cache = PlanKVCache(model.config, growing, max_length=80)
        with pytest.raises(PlanRuntimeError, match="max_length"):
            model.generate(
                ids(1, 70, seed=51), max_new_tokens=30, do_sample=False, pad_token_id=0,
                **{cache_kwarg(model): cache},
            )  # fmt: skip
        with pytest.raises(PlanRuntimeError, match="left-padded"):
            right = torch.ones(2, 20, dtype=torch.long)
            right[1, 15:] = 0
            model(
                ids(2, 20), attention_mask=right, **{cache_kwarg(model): PlanKVCache(model.config, growing)}
            )
