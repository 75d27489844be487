"""Every attention backend against the reference, in float64, on random inputs and layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moa_compress.attention import AttentionInputError, block_sparse_attention
from moa_compress.kernels.cpu import block_sparse_attention_torch, build_schedule, run_schedule
from moa_compress.kernels.layout import BlockLayout, causal_layout
from moa_compress.kernels.reference import block_sparse_attention_reference
from moa_compress.plan import DenseRule, ModelIdentity, Plan, StaticRule
from tests.factories import dense_masked_attention, random_layout, random_qkv

# (batch, layout batch, query heads, KV heads, q_len, kv_len, block, keep probability)
CASES = {
    "gqa-9-3-ragged": (1, 1, 9, 3, 300, 300, 64, 0.5),
    "batch-own-layouts": (2, 2, 9, 3, 200, 200, 32, 0.5),
    "batch-shared-layout": (3, 1, 4, 2, 150, 150, 32, 0.6),
    "q-shorter-unaligned": (1, 1, 6, 2, 77, 250, 32, 0.5),
    "q-shorter-aligned": (1, 1, 4, 1, 64, 256, 32, 0.5),
    "shorter-than-block": (2, 1, 3, 1, 20, 20, 64, 0.5),
    "decode-row": (1, 1, 4, 2, 1, 70, 16, 0.5),
    "diagonal-only": (1, 1, 9, 3, 200, 200, 32, 0.0),
    "mha": (1, 1, 3, 3, 130, 130, 16, 0.3),
}


def scale_of(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    b, lb, hq, hkv, sq, sk, bs, p = CASES[request.param]
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d=16, seed=len(request.param))
    layout = random_layout(lb, hq, sq, sk, bs, p=p, seed=sq)
    return q, k, v, layout


def test_reference_equals_independent_masked_softmax(case):
    q, k, v, layout = case
    out = block_sparse_attention(q, k, v, layout, backend="reference")
    expected = dense_masked_attention(q, k, v, layout.to_dense_mask(), scale_of(q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_reference_at_density_one_equals_sdpa():
    q, k, v = random_qkv(2, 9, 3, 300, 300, d=16)
    out = block_sparse_attention(q, k, v, causal_layout(300, 300, 9, 64), backend="reference")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["auto", "strided", "gather"])
def test_torch_backend_matches_reference(case, path):
    q, k, v, layout = case
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    if path == "auto":
        out = block_sparse_attention(q, k, v, layout, backend="torch")
    else:
        schedule = build_schedule(layout, k.shape[1], allow_gather=path == "gather")
        if path == "gather":
            schedule = type(schedule)((), gather=True)
        out = run_schedule(q, k, v, layout, schedule, scale_of(q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert not out.isnan().any()


def test_empty_rows_give_zeros():
    q, k, v = random_qkv(1, 4, 2, 256, d=16)
    blocks = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    blocks[0, 0] = torch.eye(4, dtype=torch.bool)  # head 0: diagonal only; heads 1-3: nothing
    blocks[0, 1, 2, :3] = True  # head 1: one query block with three blocks, others empty
    layout = BlockLayout.from_block_mask(blocks, 64, 256, 256)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    assert out[0, 2:].abs().sum() == 0
    assert out[0, 1, :128].abs().sum() == 0 and out[0, 1, 192:].abs().sum() == 0
    torch.testing.assert_close(
        out, block_sparse_attention_reference(q, k, v, layout, 0.25), rtol=0, atol=1e-12
    )


def static_plan_layout(n: int, block: int, seed: int) -> BlockLayout:
    """Per-head static rules as a searched plan has them: dense heads, sinks, bands of all widths."""
    g = torch.Generator().manual_seed(seed)
    choices = [DenseRule(), StaticRule(1, 3 * block, 0.0), StaticRule(0, block, 0.1), StaticRule(2, 10, 0.3)]
    rules = tuple(choices[int(torch.randint(len(choices), (1,), generator=g))] for _ in range(9))
    rules = rules[:3] * 3 if seed % 2 else rules  # shared per GQA group, or not
    plan = Plan(ModelIdentity("test", 1, 9, 3, 16, "x"), (rules,), block_size=block)
    return plan.layout(0, n)


@pytest.mark.parametrize("n,block,seed", [(300, 16, 0), (300, 16, 1), (640, 32, 2), (77, 64, 3)])
def test_torch_backend_on_static_plans(n, block, seed):
    q, k, v = random_qkv(2, 9, 3, n, d=16, seed=seed)
    layout = static_plan_layout(n, block, seed)
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    forced = run_schedule(q, k, v, layout, build_schedule(layout, 3, allow_gather=False), scale_of(q))
    torch.testing.assert_close(forced, expected, rtol=0, atol=1e-12)


def test_static_band_plan_uses_few_batched_calls():
    layout = static_plan_layout(2048, 64, 1)
    schedule = build_schedule(layout, 3)
    assert not schedule.gather
    assert len(schedule.tasks) <= 12  # per rule: a causal tile plus one batched band task


@pytest.mark.parametrize("join_max", [0, 1024])  # diagonal kept apart, or joined to its band
def test_folded_band_with_its_diagonal_in_one_masked_call_equals_the_reference(join_max, monkeypatch):
    """A GQA group's heads folded into one tile whose band runs straight into the causal diagonal: the
    two pieces become one masked call (or stay apart), equal to the reference in float64 either way,
    ragged last block included."""
    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "_JOIN_MAX_KEYS", join_max)
    n, block = 300, 16
    rules = (StaticRule(1, 3 * block, 0.0),) * 9  # every group whole: folded tiles
    layout = Plan(ModelIdentity("test", 1, 9, 3, 16, "x"), (rules,), block_size=block).layout(0, n)
    schedule = build_schedule(layout, 3, allow_gather=False)
    joined = [t for t in schedule.tasks if len(cpu._join_diagonal(t.pieces)) < len(t.pieces)]
    assert bool(joined) == (join_max > 0)
    q, k, v = random_qkv(2, 9, 3, n, d=16, seed=4)
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    out = run_schedule(q, k, v, layout, schedule, scale_of(q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", [2, 3])
@pytest.mark.parametrize("n,block,seed", [(300, 16, 0), (300, 16, 1), (640, 32, 2), (333, 16, 5)])
def test_tiles_of_several_query_blocks_equal_the_reference(tile, n, block, seed, monkeypatch):
    """Low-precision tiles (several query blocks per op batch entry, each piece widened and masked),
    forced on in float64: sinks, bands with and without a joined diagonal, causal squares, folded and
    unfolded heads, counts that leave blocks over for the one-block path, a ragged last block."""
    from moa_compress.kernels import cpu

    monkeypatch.setattr(cpu, "_TILE_DTYPES", (torch.float64,))
    monkeypatch.setattr(cpu, "_TILE_BLOCKS", ((1, tile),))
    layout = static_plan_layout(n, block, seed)
    schedule = build_schedule(layout, 3, allow_gather=False)
    tiled = [
        t for t in schedule.tasks if cpu._tile_blocks(t.pieces, t.count, t.rows, block, torch.float64) > 1
    ]
    assert tiled and any(t.count % tile for t in tiled)  # tiles, and blocks left over
    q, k, v = random_qkv(2, 9, 3, n, d=16, seed=seed)
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    out = run_schedule(q, k, v, layout, schedule, scale_of(q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # the dtypes tiles are for: within a few times the reference's own bfloat16 error
    monkeypatch.setattr(cpu, "_TILE_DTYPES", (torch.bfloat16,))
    low = [x.to(torch.bfloat16) for x in (q, k, v)]
    ref_error = (block_sparse_attention_reference(*low, layout, scale_of(q)).double() - expected).abs().max()
    error = (run_schedule(*low, layout, schedule, scale_of(q)).double() - expected).abs().max()
    assert error <= 3 * ref_error + 1e-6, (error, ref_error)


def test_schedule_path_static_strided_gated_prefill_gathered_decode_row_strided():
    """Which path a layout takes: a static plan's bands stay strided; a gate-like prefill (units of
    many runs) goes to the gather path before any strided planning; a decoding row of the same
    selection stays strided (the gather path would compute a block of padded rows for it)."""
    assert not build_schedule(static_plan_layout(2048, 64, 1), 3).gather
    nq = 32
    g = torch.Generator().manual_seed(3)
    cols, rows = torch.arange(nq)[None, :], torch.arange(nq)[:, None]
    pick = torch.rand(1, 3, nq, nq, generator=g) < 0.3
    pick = ((pick | (cols == 0) | (cols == rows)) & (cols <= rows)).repeat_interleave(3, dim=1)
    assert build_schedule(BlockLayout.from_block_mask(pick, 32, nq * 32, nq * 32), 3).gather
    decode = BlockLayout.from_block_mask(pick[:, :, -1:], 32, 1, nq * 32)
    assert not build_schedule(decode, 3).gather
    q, k, v = random_qkv(1, 9, 3, 1, nq * 32, d=16, seed=3)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, decode, backend="torch"),
        block_sparse_attention_reference(q, k, v, decode, scale_of(q)),
        rtol=0,
        atol=1e-12,
    )


def test_torch_backend_sees_in_place_layout_changes():
    q, k, v = random_qkv(1, 3, 1, 128, d=16)
    layout = causal_layout(128, 128, 3, 32)
    first = block_sparse_attention(q, k, v, layout, backend="torch")
    layout.kv_num_blocks[0, 1] = 1  # head 1: first block only
    second = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(
        second, block_sparse_attention_reference(q, k, v, layout, 0.25), rtol=0, atol=1e-12
    )
    assert not torch.equal(first[0, 1], second[0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gqa-9-3-ragged", "q-shorter-unaligned"])
def test_low_precision_error_is_bounded_by_the_references_own(dtype, name):
    b, lb, hq, hkv, sq, sk, bs, p = CASES[name]
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d=64, seed=1)
    layout = random_layout(lb, hq, sq, sk, bs, p=p, seed=2)
    exact = block_sparse_attention_reference(q, k, v, layout, 0.125)
    low = [x.to(dtype) for x in (q, k, v)]
    ref_error = (block_sparse_attention_reference(*low, layout, 0.125).double() - exact).abs().max()
    for force_gather in (False, True):
        schedule = build_schedule(layout, hkv, allow_gather=False)
        if force_gather:
            schedule = type(schedule)((), gather=True)
        out = run_schedule(*low, layout, schedule, 0.125)
        assert out.dtype == dtype
        error = (out.double() - exact).abs().max()
        assert error <= 3 * ref_error + 1e-6, (error, ref_error)


def test_decode_row_seeing_every_key():
    q, k, v = random_qkv(2, 6, 2, 1, 130, d=16)
    layout = causal_layout(1, 130, 6, 64)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(
        out, block_sparse_attention_reference(q, k, v, layout, 0.25), rtol=0, atol=1e-12
    )


def test_float32_dense_layout_matches_sdpa():
    q, k, v = random_qkv(1, 9, 3, 500, d=64, dtype=torch.float32)
    out = block_sparse_attention(q, k, v, causal_layout(500, 500, 9), backend="torch")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


def test_different_value_head_size_falls_back_to_reference():
    q, k, _ = random_qkv(1, 4, 2, 100, d=16)
    v = torch.randn(1, 2, 100, 8, dtype=torch.float64)
    layout = random_layout(1, 4, 100, 100, 32, seed=3)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(
        out, block_sparse_attention_reference(q, k, v, layout, 0.25), rtol=0, atol=1e-12
    )


# ----------------------------------------------------------------------------------------------
# Input validation


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(1, 4, 2, 64, d=16)
    layout = causal_layout(64, 64, 4, 32)
    bad = [
        ((q[0], k, v, layout), "must be \\[B, H, S, D\\]"),
        ((q, k[:, :, :32], v, layout), "do not fit"),
        ((q, k[:, :1].expand(1, 3, 64, 16), v[:, :1].expand(1, 3, 64, 16), layout), "multiple of KV heads"),
        ((q, k, v.float(), layout), "one floating dtype"),
        ((q, k, v, causal_layout(64, 64, 3, 32)), "does not fit"),
        ((q, k, v, causal_layout(32, 64, 4, 32)), "layout is for"),
        (
            (torch.randn(1, 4, 80, 16, dtype=torch.float64), k, v, causal_layout(80, 64, 4, 32)),
            "q_len 80 > kv_len",
        ),
    ]
    for args, message in bad:
        with pytest.raises(AttentionInputError, match=message):
            block_sparse_attention(*args, backend="torch")
    with pytest.raises(AttentionInputError, match="unknown backend"):
        block_sparse_attention(q, k, v, layout, backend="fast")


def test_torch_backend_function_is_importable_directly():
    q, k, v = random_qkv(1, 2, 1, 40, d=8)
    layout = causal_layout(40, 40, 2, 16)
    torch.testing.assert_close(
        block_sparse_attention_torch(q, k, v, layout, 0.3),
        block_sparse_attention_reference(q, k, v, layout, 0.3),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.slow
def test_flex_backend_matches_reference():
    """Compiled FlexAttention (one compile per shape: ~10 s each here), in float32 against float64."""
    for name in ("gqa-9-3-ragged", "q-shorter-unaligned"):
        b, lb, hq, hkv, sq, sk, bs, p = CASES[name]
        q, k, v = random_qkv(b, hq, hkv, sq, sk, d=16, seed=4)
        layout = random_layout(lb, hq, sq, sk, bs, p=p, seed=5)
        exact = block_sparse_attention_reference(q, k, v, layout, 0.25)
        low = [x.float() for x in (q, k, v)]
        ref_error = (block_sparse_attention_reference(*low, layout, 0.25).double() - exact).abs().max()
        out = block_sparse_attention(*low, layout, backend="flex")
        assert (out.double() - exact).abs().max() <= 10 * ref_error + 1e-6
    # float64 runs on the reference.
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, layout, backend="flex"), exact, rtol=0, atol=1e-12
    )


def test_flex_block_mask_spans_all_key_blocks_and_splits_full_blocks():
    blocks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    blocks[0, :, torch.arange(4), torch.arange(4)] = True  # diagonal only: kv_indices one column wide
    blocks[0, 1, 3, 0] = True
    layout = BlockLayout.from_block_mask(blocks, 32, 128, 128)
    assert layout.kv_indices.shape[-1] == 2
    mask = layout.to_flex_block_mask()
    assert mask.kv_indices.shape[-1] == 4 and mask.full_kv_indices.shape[-1] == 4
    assert mask.kv_num_blocks.tolist() == [[[1, 1, 1, 1], [1, 1, 1, 1]]]
    assert mask.full_kv_num_blocks.tolist() == [[[0, 0, 0, 0], [0, 0, 0, 1]]]
    dense = mask.to_dense()  # partial and full blocks together: the layout again
    assert torch.equal(dense.bool(), blocks)


@pytest.mark.parametrize(
    "b,lb,hq,hkv,sq,sk,bs,shared",
    [
        (2, 2, 9, 3, 300, 300, 32, True),  # gate-like: one selection per KV group, a ragged last block
        (1, 1, 6, 2, 256, 256, 32, False),  # each query head its own selection
        (1, 1, 4, 2, 96, 224, 32, True),  # fewer queries than keys, aligned to blocks
        (2, 1, 4, 1, 77, 250, 32, True),  # unaligned: the masked path
    ],
)
def test_gather_path_on_gate_like_layouts(b, lb, hq, hkv, sq, sk, bs, shared):
    """Sink + diagonal + random others per row, shared by a KV group's heads or not: the grouped gather
    (a unit's blocks then its diagonal in one folded, masked call) and the masked one against the
    reference."""
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d=16, seed=sq + hq)
    nq, nk = -(-sq // bs), -(-sk // bs)
    g = torch.Generator().manual_seed(sq)
    heads = hkv if shared else hq
    rows = torch.arange(nq)[:, None] + (sk - sq) // bs
    pick = torch.rand(lb, heads, nq, nk, generator=g) < 0.4
    cols = torch.arange(nk)[None, :]
    pick = (pick | (cols == 0) | (cols == rows)) & (cols <= rows)
    if shared:
        pick = pick.repeat_interleave(hq // hkv, dim=1)
    layout = BlockLayout.from_block_mask(pick, bs, sq, sk)
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    out = run_schedule(q, k, v, layout, type(build_schedule(layout, hkv))((), gather=True), scale_of(q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_gather_path_buffers_serve_inference_mode_and_later_calls_and_its_masks_stay_few():
    """The gather path's kept K/V buffers, first made under inference mode, still take a later call
    outside it (and a call with autograd on); its masks: one per block size, group and dtype, however
    many block counts the units have."""
    from moa_compress.kernels import cpu

    cpu._WORKSPACE.__dict__.pop("buffers", None)
    cpu._PREFIX_MASKS.clear()
    q, k, v = random_qkv(1, 4, 2, 256, 256, d=16, seed=7)
    pick = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(7)) < 0.5
    cols, rows = torch.arange(8)[None, :], torch.arange(8)[:, None]
    pick = ((pick | (cols == 0) | (cols == rows)) & (cols <= rows)).repeat_interleave(2, dim=1)  # shared
    layout = BlockLayout.from_block_mask(pick, 32, 256, 256)
    gather = type(build_schedule(layout, 2))((), gather=True)
    expected = block_sparse_attention_reference(q, k, v, layout, scale_of(q))
    with torch.inference_mode():
        first = run_schedule(q, k, v, layout, gather, scale_of(q))
    second = run_schedule(q, k, v, layout, gather, scale_of(q))
    k_grad = k.clone().requires_grad_()
    third = run_schedule(q, k_grad, v, layout, gather, scale_of(q))
    for out in (first, second, third):
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    assert int(layout.kv_num_blocks.unique().numel()) > 2  # several block counts...
    assert list(cpu._PREFIX_MASKS) == [(32, 2, torch.float64)]  # ...one kept mask


@pytest.mark.parametrize("sq,sk,window", [(77, 77, 40), (77, 77, 200), (1, 61, 40), (13, 101, 7), (5, 5, 1)])
def test_window_attention_equals_a_token_window_reference(sq, sk, window):
    """The model's own sliding window (a layer plans leave to the model), GQA 9/3, float64, queries
    aligned to the last keys; with a left-padded mask, rows that see nothing return zeros."""
    from moa_compress.attention import window_attention
    from tests.factories import dense_masked_attention, random_qkv

    q, k, v = random_qkv(b=2, hq=9, hkv=3, sq=sq, sk=sk, d=16, seed=sq + sk + window)
    p = torch.arange(sk - sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    allowed = (j <= p) & (j > p - window)
    want = dense_masked_attention(q, k, v, allowed[None, None], 0.3)
    assert (window_attention(q, k, v, window, 0.3) - want).abs().max() <= 1e-12
    pad = torch.tensor([0, sk - 1])[:, None, None, None]  # row 1 keeps only its last key
    padding = (j >= pad) & (p >= -1)  # [B, 1, Sq, Sk], what transformers' mask adds for padding
    got = window_attention(q, k, v, window, 0.3, padding)
    want = dense_masked_attention(q, k, v, allowed & padding, 0.3)
    assert (got - want).abs().max() <= 1e-12 and torch.isfinite(got).all()
    assert sq == 1 or (got[1, :, :-1] == 0).all()  # row 1's earlier queries see no key
