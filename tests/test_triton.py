"""The Triton kernels against the plain-PyTorch specification.

Without CUDA they run through Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before triton
is imported); lengths stay <= 512 so this stays fast. float32 kernels are compared with float64
references; float16/bfloat16 kernels are bounded by the reference's own error in that precision.
``gpu`` tests run the same kernels natively at longer lengths.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moa_compress.attention import AttentionInputError, block_sparse_attention, decode_attention
from moa_compress.kernels.layout import BlockLayout, causal_layout
from moa_compress.kernels.reference import block_sparse_attention_reference
from moa_compress.kernels.slots import SlotVisibility
from moa_compress.kernels.triton_decode import (
    block_sparse_decode,
    block_sparse_decode_reference,
    block_sparse_decode_triton,
)
from moa_compress.kernels.triton_prefill import TritonInputError, block_sparse_prefill
from moa_compress.kernels.triton_slot_decode import slot_decode, slot_decode_reference, slot_decode_triton

from .factories import random_layout, random_qkv, tiny_model

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def max_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return (out.double() - expected.double()).abs().max().item()


def run_prefill(q, k, v, layout, dtype, scale=None):
    cast = [t.to(DEVICE, dtype) for t in (q, k, v)]
    return block_sparse_attention(*cast, layout.to(DEVICE), scale=scale, backend="triton").cpu()


# ---------------------------------------------------------------- prefill


PREFILL_CASES = [
    # batch, q heads, kv heads, q_len, kv_len, head dim, block size
    pytest.param(1, 9, 3, 100, 100, 64, 64, id="gqa9/3-odd"),
    pytest.param(2, 4, 2, 37, 200, 128, 64, id="qlen<kvlen-d128"),
    pytest.param(1, 32, 8, 70, 70, 128, 64, id="gqa32/8"),
    pytest.param(1, 9, 3, 20, 20, 64, 64, id="n<block"),
    pytest.param(1, 3, 3, 1, 130, 64, 64, id="one-query"),
    pytest.param(1, 6, 2, 128, 128, 64, 64, id="exact-blocks"),
    pytest.param(1, 4, 1, 150, 301, 64, 32, id="block32"),
    pytest.param(1, 4, 2, 200, 330, 128, 128, id="block128"),
    pytest.param(1, 2, 1, 45, 77, 64, 16, id="block16"),
]


@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, bs", PREFILL_CASES)
def test_prefill_float32_matches_float64_reference(b, hq, hkv, sq, sk, d, bs):
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, seed=sq + sk)
    layout = random_layout(b, hq, sq, sk, block_size=bs, p=0.5, seed=d + bs)
    expected = block_sparse_attention_reference(q, k, v, layout, scale=d**-0.5)
    out = run_prefill(q, k, v, layout, torch.float32)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert max_error(out, expected) < 2e-5


def test_prefill_dense_causal_matches_sdpa():
    q, k, v = random_qkv(1, 8, 2, 190, 190, 64, seed=3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = run_prefill(q, k, v, causal_layout(190, 190, 8), torch.float32)
    assert max_error(out, expected) < 2e-5


def test_prefill_large_logits_stay_finite():
    """Scores in the hundreds: the running max must keep exp2 in range. (The bound allows for the
    split-TF32 dots a GPU uses for float32, whose error grows with the scores.)"""
    q, k, v = random_qkv(1, 2, 1, 130, 130, 64, seed=15)
    layout = random_layout(1, 2, 130, 130, seed=16)
    expected = block_sparse_attention_reference(q * 30, k, v, layout, scale=0.125)
    out = run_prefill(q * 30, k, v, layout, torch.float32)
    assert not out.isnan().any() and max_error(out, expected) < 1e-3


def test_prefill_layout_batch_one_broadcasts_and_custom_scale():
    q, k, v = random_qkv(3, 4, 2, 90, 150, 64, seed=5)
    layout = random_layout(1, 4, 90, 150, p=0.4, seed=6)
    expected = block_sparse_attention_reference(q, k, v, layout, scale=0.3)
    assert max_error(run_prefill(q, k, v, layout, torch.float32, scale=0.3), expected) < 2e-5


def test_prefill_skips_blocks_no_query_can_see():
    """A layout may list every block, including ones wholly above the causal diagonal."""
    q, k, v = random_qkv(1, 2, 1, 150, 150, 64, seed=7)
    every_block = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    layout = BlockLayout.from_block_mask(every_block, 64, 150, 150)
    expected = block_sparse_attention_reference(q, k, v, layout, scale=0.125)
    assert max_error(run_prefill(q, k, v, layout, torch.float32), expected) < 2e-5


def test_prefill_empty_rows_are_zero_not_nan():
    q, k, v = random_qkv(1, 3, 1, 150, 150, 64, seed=8)
    blocks = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    blocks[0, 0] = torch.eye(3, dtype=torch.bool)  # head 0: diagonal only; heads 1, 2: nothing
    blocks[0, 1, 2, 0] = True  # head 1, last query block: only the first key block
    out = run_prefill(q, k, v, BlockLayout.from_block_mask(blocks, 64, 150, 150), torch.float32)
    assert not out.isnan().any()
    assert out[0, 2].abs().max() == 0 and out[0, 1, :128].abs().max() == 0
    assert out[0, 1, 128:].abs().min() > 0 and out[0, 0].abs().min() > 0


def test_prefill_strided_inputs_from_bshd():
    """transformers hands attention [B, H, S, D] views of [B, S, H, D] tensors."""
    q, k, v = (
        t.transpose(1, 2).contiguous().transpose(1, 2) for t in random_qkv(2, 4, 2, 77, 77, 64, seed=9)
    )
    assert not q.is_contiguous()
    layout = random_layout(2, 4, 77, 77, seed=10)
    expected = block_sparse_attention_reference(q, k, v, layout, scale=0.125)
    assert max_error(run_prefill(q, k, v, layout, torch.float32), expected) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, bs", [(64, 64), (128, 64), (128, 128)])
def test_prefill_low_precision_within_reference_error(dtype, d, bs):
    q, k, v = random_qkv(1, 6, 2, 150, 300, d, seed=11)
    layout = random_layout(1, 6, 150, 300, block_size=bs, p=0.6, seed=12)
    exact = block_sparse_attention_reference(q, k, v, layout, scale=d**-0.5)
    low = [t.to(dtype) for t in (q, k, v)]
    reference_error = max_error(block_sparse_attention_reference(*low, layout, scale=d**-0.5), exact)
    out = run_prefill(q, k, v, layout, dtype)
    assert out.dtype == dtype and not out.isnan().any()
    assert max_error(out, exact) <= 2 * reference_error


@pytest.mark.parametrize(
    "dtype, d, bs, match",
    [
        (torch.float64, 64, 64, "float16, bfloat16 or float32"),
        (torch.float32, 96, 64, "head dims"),
        (torch.float32, 64, 48, "block sizes"),
    ],
)
def test_prefill_rejects_unsupported_inputs(dtype, d, bs, match):
    q, k, v = random_qkv(1, 2, 1, 50, 50, d, dtype=dtype, device=DEVICE)
    layout = causal_layout(50, 50, 2, block_size=bs)
    with pytest.raises(TritonInputError, match=match):
        block_sparse_attention(q, k, v, layout, backend="triton")


def test_prefill_custom_op_passes_opcheck():
    q, k, v = (t.float().to(DEVICE) for t in random_qkv(1, 4, 2, 70, 70, 64, seed=13))
    layout = random_layout(1, 4, 70, 70, seed=14).to(DEVICE)
    torch.library.opcheck(block_sparse_prefill, (q, k, v, layout.kv_num_blocks, layout.kv_indices, 64, 0.125))


# ---------------------------------------------------------------- decode


def random_cache(b, hq, hkv, capacity, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def random_block_lists(b, hq, kv_lens, group, block_size, seed, p=0.5):
    """Per query head, a random ascending subset of its KV head's blocks (some heads empty)."""
    g = torch.Generator().manual_seed(seed)
    num_k = -(-int(kv_lens.max()) // block_size)
    chosen = torch.rand(b, hq, num_k, generator=g) < p
    head_blocks = -(-kv_lens.repeat_interleave(group, 1) // block_size)  # [B, Hq]
    chosen &= torch.arange(num_k) < head_blocks[..., None]
    chosen[0, 0] = False
    kv_num_blocks = chosen.sum(-1).to(torch.int32)
    order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return kv_num_blocks, order[..., : max(int(kv_num_blocks.max()), 1)].to(torch.int32)


def run_decode(q, k, v, kv_lens, *block_lists, dtype=torch.float32, **kw):
    cast = [t.to(DEVICE, dtype) for t in (q, k, v)]
    rest = [t.to(DEVICE) for t in (kv_lens, *block_lists)]
    return block_sparse_decode_triton(*cast, *rest, **kw).cpu()


def test_decode_reference_matches_prefill_reference_per_head():
    """The decode specification is the prefill one with a single query row at each head's length."""
    b, hq, hkv, bs = 2, 6, 3, 16
    q, k, v = random_cache(b, hq, hkv, 100, 64, seed=20)
    kv_lens = torch.tensor([[100, 37, 64], [5, 81, 1]], dtype=torch.int32)
    num, idx = random_block_lists(b, hq, kv_lens, 2, bs, seed=21)
    out = block_sparse_decode_reference(q, k, v, kv_lens, num, idx, block_size=bs)
    blocks = BlockLayout(num[..., None], idx[:, :, None, :], bs, 1, 100).to_block_mask()  # [B, Hq, 1, nK]
    for bi in range(b):
        for h in range(hq):
            n = int(kv_lens[bi, h // 2])
            layout = BlockLayout.from_block_mask(blocks[bi : bi + 1, h : h + 1, :, : -(-n // bs)], bs, 1, n)
            expected = block_sparse_attention_reference(
                q[bi, h][None, None, None], k[bi, h // 2, :n][None, None], v[bi, h // 2, :n][None, None],
                layout, scale=0.125,
            )  # fmt: skip
            torch.testing.assert_close(out[bi, h], expected[0, 0, 0])


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_mixed_windows_matches_reference(num_splits):
    """Per-KV-head lengths differ (a dense head, window heads, an empty head); more splits than blocks."""
    q, k, v = random_cache(2, 9, 3, 300, 64, seed=22)
    kv_lens = torch.tensor([[300, 70, 129], [0, 257, 64]], dtype=torch.int32)
    expected = block_sparse_decode_reference(q, k, v, kv_lens)
    out = run_decode(q, k, v, kv_lens, num_splits=num_splits)
    assert max_error(out, expected) < 2e-5
    assert out[1, :3].abs().max() == 0  # KV head 0 of batch 1 holds nothing


@pytest.mark.parametrize("hq, hkv", [(4, 4), (20, 1)])
def test_decode_whole_cache_any_group_size(hq, hkv):
    """Whole-cache heads run one program per GQA group: groups of 1 and of more than 16 heads."""
    q, k, v = random_cache(1, hq, hkv, 150, 64, seed=hq)
    kv_lens = torch.arange(150 - hkv + 1, 151, dtype=torch.int32)[None]
    expected = block_sparse_decode_reference(q, k, v, kv_lens)
    assert max_error(run_decode(q, k, v, kv_lens, num_splits=2), expected) < 2e-5


@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (32, 8, 128)])
def test_decode_block_lists_match_reference(hq, hkv, d):
    q, k, v = random_cache(2, hq, hkv, 400, d, seed=hq)
    kv_lens = torch.randint(1, 401, (2, hkv), generator=torch.Generator().manual_seed(d), dtype=torch.int32)
    num, idx = random_block_lists(2, hq, kv_lens, hq // hkv, 64, seed=d)
    expected = block_sparse_decode_reference(q, k, v, kv_lens, num, idx, block_size=64)
    out = run_decode(q, k, v, kv_lens, num, idx, num_splits=2)
    assert max_error(out, expected) < 2e-5
    assert out[0, 0].abs().max() == 0  # the empty block list


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_block_lists_per_kv_head_match_reference(dtype):
    """One list per KV head, shared by its query heads (the grouped kernel), some blocks past kv_len."""
    q, k, v = random_cache(2, 8, 2, 300, 64, seed=28)
    kv_lens = torch.tensor([[300, 100], [7, 0]], dtype=torch.int32)
    num = torch.tensor([[3, 2], [1, 0]], dtype=torch.int32)
    idx = torch.tensor([[[0, 2, 4], [1, 3, 0]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.int32)
    exact = block_sparse_decode_reference(q, k, v, kv_lens, num, idx, block_size=64)
    out = run_decode(q, k, v, kv_lens, num, idx, dtype=dtype, num_splits=2)
    if dtype == torch.float32:
        assert max_error(out, exact) < 2e-5
    else:
        low = [t.to(dtype) for t in (q, k, v)]
        reference_error = max_error(
            block_sparse_decode_reference(*low, kv_lens, num, idx, block_size=64), exact
        )
        assert max_error(out, exact) <= 2 * reference_error
    assert not out.isnan().any() and out[1, 4:].abs().max() == 0


def test_decode_block_list_batch_one_broadcasts():
    q, k, v = random_cache(3, 4, 2, 200, 64, seed=23)
    kv_lens = torch.tensor([[200, 150]] * 3, dtype=torch.int32)
    num, idx = random_block_lists(1, 4, kv_lens[:1], 2, 32, seed=24, p=0.7)
    expected = block_sparse_decode_reference(q, k, v, kv_lens, num, idx, block_size=32)
    assert max_error(run_decode(q, k, v, kv_lens, num, idx, block_size=32), expected) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision_within_reference_error(dtype):
    q, k, v = random_cache(1, 8, 2, 500, 128, seed=25)
    kv_lens = torch.tensor([[500, 200]], dtype=torch.int32)
    exact = block_sparse_decode_reference(q, k, v, kv_lens)
    low = [t.to(dtype) for t in (q, k, v)]
    reference_error = max_error(block_sparse_decode_reference(*low, kv_lens), exact)
    out = run_decode(q, k, v, kv_lens, dtype=dtype, num_splits=3)
    assert out.dtype == dtype and max_error(out, exact) <= 2 * reference_error


def test_decode_rejects_bad_inputs():
    q, k, v = (t.to(DEVICE) for t in random_cache(1, 4, 2, 64, 64, seed=26, dtype=torch.float32))
    lens = torch.tensor([[64, 64]], device=DEVICE)
    with pytest.raises(TritonInputError, match="kv_lens"):
        block_sparse_decode_triton(q, k, v, lens[0])
    with pytest.raises(TritonInputError, match="both"):
        block_sparse_decode_triton(q, k, v, lens, kv_num_blocks=torch.ones(1, 4, device=DEVICE))
    with pytest.raises(TritonInputError, match="head dims"):
        block_sparse_decode_triton(q[..., :32], k[..., :32], v[..., :32], lens)


def test_decode_custom_op_passes_opcheck():
    q, k, v = (t.float().to(DEVICE) for t in random_cache(1, 4, 2, 100, 64, seed=27))
    kv_lens = torch.tensor([[100, 30]], dtype=torch.int32, device=DEVICE)
    num = torch.tensor([[1, 2, 0, 1]], dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([[[1, 0], [0, 1], [0, 0], [0, 0]]], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(block_sparse_decode, (q, k, v, kv_lens, None, None, 64, 0.125, 2))
    torch.library.opcheck(block_sparse_decode, (q, k, v, kv_lens, num, idx, 64, 0.125, 2))


# ---------------------------------------------------------------- slot decode (the planned cache's step)

# Per query head: sink tokens, alpha, beta (inf: a dense head). With block size 16: a dense head, sinks
# with bands, a one-block band (the query's own block only), growing bands, a negative alpha.
SLOT_RULES = [
    (0, math.inf, 0.0), (16, 40.0, 0.0), (0, -100.0, 0.0), (16, 20.0, 0.1), (0, 3.0, 0.2),
    (0, 50.0, 0.0), (32, 100.0, 0.0), (0, 1.0, 0.0), (16, 16.0, 0.0),
]  # fmt: skip


def ring_table(lengths, sink, window):
    """The slot-position table of a ring of ``sink + window`` slots after rows of ``lengths`` tokens
    (as PlanKVCache fills it: position t >= sink in slot sink + (t - sink) % window), and the query
    positions; a row of length 0 holds nothing."""
    table = torch.full((len(lengths), sink + window), -1, dtype=torch.long)
    for row, n in enumerate(lengths):
        kept = [t for t in range(n) if t < sink or t >= n - window]
        slots = [t if t < sink else sink + (t - sink) % window for t in kept]
        table[row, slots] = torch.tensor(kept, dtype=torch.long)
    return table, torch.tensor([max(n - 1, 0) for n in lengths])


def slot_rules(heads, table, positions, block_size=16, blocks=None):
    rules = [SLOT_RULES[h % len(SLOT_RULES)] for h in range(heads)]
    return SlotVisibility(
        table, positions, torch.tensor([r[0] for r in rules]),
        torch.tensor([r[1] for r in rules], dtype=torch.float64),
        torch.tensor([r[2] for r in rules], dtype=torch.float64), block_size, blocks,
    )  # fmt: skip


def on_device(visible, device=DEVICE):
    if isinstance(visible, torch.Tensor):
        return visible.to(device)
    fields = {f.name: getattr(visible, f.name) for f in dataclasses.fields(visible)}
    return SlotVisibility(
        **{n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in fields.items()}
    )


def run_slot_decode(q, k, v, visible, dtype=torch.float32, **kw):
    cast = [t.to(DEVICE, dtype) for t in (q, k, v)]
    return slot_decode_triton(*cast, on_device(visible), **kw).cpu()


def test_ring_table_visibility_covers_the_cases():
    """The inputs below really have wrapped rings, one-slot heads, empty rows and partial fills."""
    table, positions = ring_table([400, 131, 65, 0], sink=16, window=115)
    mask = slot_rules(9, table, positions).mask()  # [B, Hq, C]
    assert table.shape[1] == 131 and (table[0] >= 0).all() and not (table[0] == torch.arange(131)).all()
    assert int(mask[2, 2].sum()) == 1  # the one-block band at position 64: only its own slot
    assert not mask[3].any() and (table[2] == -1).any()
    wrapped_band = mask[0, 4].nonzero().flatten()  # a band across the ring's wrap: two runs of slots
    assert table[0, wrapped_band].max() == 399 and (wrapped_band.diff() > 1).any()


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("d", [64, 128])
def test_slot_decode_ring_matches_float64_reference(num_splits, d):
    """GQA 9/3, an odd capacity, a wrapped ring, rows of different lengths (one empty): every rule."""
    table, positions = ring_table([400, 131, 65, 0], sink=16, window=115)
    q, k, v = random_cache(4, 9, 3, 131, d, seed=40 + d)
    visible = slot_rules(9, table, positions)
    expected = slot_decode_reference(q, k, v, visible)
    out = run_slot_decode(q, k, v, visible, num_splits=num_splits)
    assert out.shape == (4, 9, d) and max_error(out, expected) < 2e-5
    assert out[3].abs().max() == 0  # a row that holds nothing: zeros, not NaN


@pytest.mark.parametrize("hq, hkv", [(4, 4), (20, 1), (9, 3)])
def test_slot_decode_full_buffer_any_group_size(hq, hkv):
    """slot = position (a full buffer), partly filled; groups of 1, 3 and more than 16 heads."""
    table = torch.arange(77).repeat(2, 1)
    table[1, 30:] = -1
    q, k, v = random_cache(2, hq, hkv, 77, 64, seed=hq)
    visible = slot_rules(hq, table, torch.tensor([76, 29]))
    expected = slot_decode_reference(q, k, v, visible)
    assert max_error(run_slot_decode(q, k, v, visible, num_splits=2), expected) < 2e-5


@pytest.mark.parametrize("num_key_blocks", [25, 10])
def test_slot_decode_gate_blocks_restrict_each_head(num_key_blocks):
    """Gate heads' selected key blocks on top of the rules; positions past the last listed block
    count as it; a head that selects nothing returns zeros."""
    table, positions = ring_table([400, 131, 65], sink=16, window=115)
    blocks = torch.rand(3, 9, num_key_blocks, generator=torch.Generator().manual_seed(41)) < 0.5
    blocks[0, 0] = False
    visible = slot_rules(9, table, positions, blocks=blocks)
    q, k, v = random_cache(3, 9, 3, 131, 64, seed=42)
    expected = slot_decode_reference(q, k, v, visible)
    out = run_slot_decode(q, k, v, visible, num_splits=2)
    assert max_error(out, expected) < 2e-5 and out[0, 0].abs().max() == 0


@pytest.mark.parametrize("num_splits", [1, 3])
def test_slot_decode_from_a_mask(num_splits):
    """A plain bool mask (any view) instead of the rules; empty heads give zeros."""
    mask = torch.rand(2, 131, 6, generator=torch.Generator().manual_seed(43)) < 0.3
    mask = mask.transpose(1, 2)  # [B, Hq, C], not contiguous
    mask[1, 5] = False
    q, k, v = random_cache(2, 6, 2, 131, 64, seed=44)
    expected = slot_decode_reference(q, k, v, mask)
    out = run_slot_decode(q, k, v, mask, num_splits=num_splits)
    assert max_error(out, expected) < 2e-5 and out[1, 5].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slot_decode_low_precision_within_reference_error(dtype):
    table, positions = ring_table([400, 131, 65], sink=16, window=115)
    visible = slot_rules(9, table, positions)
    q, k, v = random_cache(3, 9, 3, 131, 128, seed=45)
    exact = slot_decode_reference(q, k, v, visible)
    reference_error = max_error(slot_decode_reference(*(t.to(dtype) for t in (q, k, v)), visible), exact)
    out = run_slot_decode(q, k, v, visible, dtype=dtype, num_splits=2)
    assert out.dtype == dtype and max_error(out, exact) <= 2 * reference_error


def test_decode_attention_dispatches_triton_with_rules_or_mask():
    table, positions = ring_table([300, 70], sink=16, window=115)
    q, k, v = (t.float() for t in random_cache(2, 9, 3, 131, 64, seed=46))
    visible = slot_rules(9, table, positions)
    want = decode_attention(q, k, v, visible, backend="reference")
    for given in (visible, visible.mask()):
        got = decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(given), backend="triton")
        assert max_error(got.cpu(), want) < 2e-5


def test_slot_decode_rejects_bad_inputs():
    table, positions = ring_table([100], sink=16, window=115)
    q, k, v = (t.to(DEVICE) for t in random_cache(1, 9, 3, 131, 64, seed=47, dtype=torch.float32))
    visible = on_device(slot_rules(9, table, positions))
    with pytest.raises(TritonInputError, match="positions must be torch.int64"):
        slot_decode_triton(q, k, v, dataclasses.replace(visible, positions=visible.positions.int()))
    with pytest.raises(TritonInputError, match="blocks must be bool"):
        slot_decode_triton(q, k, v, dataclasses.replace(visible, blocks=torch.ones(1, 3, 4, device=DEVICE)))
    with pytest.raises(TritonInputError, match="head dims"):
        slot_decode_triton(q[..., :32], k[..., :32], v[..., :32], visible)
    with pytest.raises(AttentionInputError, match="sink_tokens"):
        decode_attention(q, k, v, dataclasses.replace(visible, sink_tokens=visible.sink_tokens[:3]))


def test_slot_decode_custom_op_passes_opcheck():
    table, positions = ring_table([200, 50], sink=16, window=115)
    q, k, v = (t.float().to(DEVICE) for t in random_cache(2, 6, 2, 131, 64, seed=48))
    r = on_device(slot_rules(6, table, positions))
    blocks = torch.ones(2, 6, 13, dtype=torch.bool, device=DEVICE)
    rules = (r.slot_positions, r.positions, r.sink_tokens, r.alpha, r.beta)
    torch.library.opcheck(slot_decode, (q, k, v, *rules, None, None, 16, 0.125, 1))
    torch.library.opcheck(slot_decode, (q, k, v, *rules, blocks, None, 16, 0.125, 2))
    torch.library.opcheck(slot_decode, (q, k, v, None, None, None, None, None, None, r.mask(), 16, 0.125, 2))


def test_plan_kv_cache_decode_steps_through_the_slot_kernel():
    """PlanKVCache (a ring and a full buffer per layer, GQA 4/2, head dim 64) decoding token by
    token with backend triton gives the logits of backend reference."""
    from moa_compress.kvcache import PlanKVCache
    from moa_compress.runtime import apply_plan, cache_kwarg
    from tests.test_kvcache import mixed_heads
    from tests.test_runtime import ids, make_plan

    model = tiny_model("llama", head_dim=64)
    plan = make_plan(model, mixed_heads)
    tokens = ids(1, 60, seed=49)
    logits = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            cache = PlanKVCache(model.config, plan, max_length=60)
            with apply_plan(model, plan, backend=backend):
                steps = [model(tokens[:, :48], **{cache_kwarg(model): cache}).logits[:, -1]]
                for i in range(48, 60):
                    steps.append(model(tokens[:, i : i + 1], **{cache_kwarg(model): cache}).logits[:, -1])
            logits[backend] = torch.stack(steps)
            assert any(s.kv.is_ring for layer in cache.layers for s in layer.storage)
    assert max_error(logits["triton"], logits["reference"]) < 1e-4


# ---------------------------------------------------------------- real compiler, no GPU needed

COMPILE_SCRIPT = Path(__file__).with_name("triton_compile_check.py")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively instead")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the real compiler rejects: build every kernel variant to cubin."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, str(COMPILE_SCRIPT), "--arch", "90", "--quick"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_long_matches_reference(dtype):
    sq, sk, d = 3000, 4097, 128
    q, k, v = random_qkv(1, 8, 2, sq, sk, d, dtype=torch.float32, device="cuda", seed=30)
    layout = random_layout(1, 8, sq, sk, p=0.3, seed=31).to("cuda")
    exact = block_sparse_attention_reference(q, k, v, layout, scale=d**-0.5)
    low = [t.to(dtype) for t in (q, k, v)]
    reference_error = max_error(block_sparse_attention_reference(*low, layout, scale=d**-0.5), exact)
    out = block_sparse_attention(*low, layout, backend="triton")
    assert max_error(out, exact) <= 2 * reference_error


@pytest.mark.gpu
def test_gpu_auto_falls_back_where_triton_does_not_fit():
    q, k, v = random_qkv(1, 4, 2, 100, 100, 96, dtype=torch.float32, device="cuda", seed=35)
    layout = random_layout(1, 4, 100, 100, seed=36).to("cuda")
    expected = block_sparse_attention_reference(q, k, v, layout, scale=96**-0.5)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_prefill_under_torch_compile():
    q, k, v = random_qkv(1, 8, 2, 1000, 1000, 128, dtype=torch.bfloat16, device="cuda", seed=32)
    layout = random_layout(1, 8, 1000, 1000, seed=33).to("cuda")
    eager = block_sparse_prefill(q, k, v, layout.kv_num_blocks, layout.kv_indices, 64, 0.1)
    compiled = torch.compile(block_sparse_prefill, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, layout.kv_num_blocks, layout.kv_indices, 64, 0.1), eager)


@pytest.mark.gpu
def test_gpu_decode_long_and_cuda_graph():
    q, k, v = random_cache(1, 32, 8, 16384, 128, seed=34, dtype=torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    kv_lens = torch.tensor([[16384, 4096, 1000, 16000, 64, 9000, 16384, 2]], dtype=torch.int32, device="cuda")
    expected = block_sparse_decode_reference(q.float(), k.float(), v.float(), kv_lens)
    out = block_sparse_decode_triton(q, k, v, kv_lens)
    assert max_error(out, expected) < 2e-2
    graph = torch.cuda.CUDAGraph()
    block_sparse_decode_triton(q, k, v, kv_lens)  # compile outside the capture
    with torch.cuda.graph(graph):
        captured = block_sparse_decode_triton(q, k, v, kv_lens)
    graph.replay()
    torch.testing.assert_close(captured, out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_plan_kv_cache_decode_through_the_slot_kernel(backend):
    """On CUDA a PlanKVCache decode step runs the slot kernel (auto picks it too): token by token,
    rings wrapping many times, the logits of backend reference."""
    from moa_compress.kvcache import PlanKVCache
    from moa_compress.runtime import apply_plan, cache_kwarg
    from tests.test_kvcache import mixed_heads
    from tests.test_runtime import ids, make_plan

    model = tiny_model("llama", head_dim=128).cuda()
    plan = make_plan(model, mixed_heads)
    tokens = ids(2, 400, seed=50).cuda()
    logits = {}
    with torch.no_grad():
        for name in ("reference", backend):
            cache = PlanKVCache(model.config, plan, max_length=400)
            with apply_plan(model, plan, backend=name):
                steps = [model(tokens[:, :100], **{cache_kwarg(model): cache}).logits[:, -1]]
                for i in range(100, 400):
                    steps.append(model(tokens[:, i : i + 1], **{cache_kwarg(model): cache}).logits[:, -1])
            logits[name] = torch.stack(steps).cpu()
    assert max_error(logits[backend], logits["reference"]) < 1e-3


@pytest.mark.gpu
def test_gpu_slot_decode_long_cache_and_cuda_graph():
    table, positions = ring_table([20000, 9000], sink=64, window=8128)
    q, k, v = (t.cuda() for t in random_cache(2, 32, 8, 8192, 128, seed=51, dtype=torch.bfloat16))
    visible = on_device(slot_rules(32, table, positions), "cuda")
    expected = slot_decode_reference(q.float(), k.float(), v.float(), visible)
    out = slot_decode_triton(q, k, v, visible)
    assert max_error(out, expected) < 2e-2
    slot_decode_triton(q, k, v, visible)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = slot_decode_triton(q, k, v, visible)
    graph.replay()
    torch.testing.assert_close(captured, out)


# ---------------------------------------------------------------- integration


def test_triton_stays_optional_and_auto_never_picks_it_on_cpu():
    """Importing the package and the backend modules imports no triton; ``auto`` on CPU is ``torch``."""
    code = (
        "import sys, torch\n"
        "import moa_compress, moa_compress.attention as a\n"
        "import moa_compress.kernels.triton_prefill, moa_compress.kernels.triton_decode\n"
        "import moa_compress.kernels.triton_slot_decode, moa_compress.kvcache\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert a.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_prefill_op_traces_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 300, 128, dtype=torch.bfloat16)
        k = v = torch.empty(2, 2, 500, 128, dtype=torch.bfloat16)
        num = torch.empty(1, 8, 5, dtype=torch.int32)
        idx = torch.empty(1, 8, 5, 8, dtype=torch.int32)
        out = block_sparse_prefill(q, k, v, num, idx, 64, 0.1)
        decoded = block_sparse_decode(
            q[:, :, 0], k, v, torch.empty(2, 2, dtype=torch.int32), None, None, 64, 0.1, 4
        )
        rules = (torch.empty(2, 500, dtype=torch.long), torch.empty(2, dtype=torch.long))
        rules += (torch.empty(8, dtype=torch.long), *(torch.empty(8, dtype=torch.float64),) * 2)
        slots = slot_decode(q[:, :, 0], k, v, *rules, None, None, 64, 0.1, 4)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert decoded.shape == slots.shape == (2, 8, 128) and slots.dtype == q.dtype


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu_check itself runs on the GPU")
def test_gpu_check_dry_run():
    """The GPU script's whole path (layouts, timing, table) at tiny sizes through the interpreter."""
    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--densities", "1,0.2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout[result.stdout.index("| kind |") :]
    assert "| prefill | 200 | 0.2" in table and "| decode | 300 | blocks 0.1" in table
    assert "Error" not in table
