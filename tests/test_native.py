"""The compiled CPU kernel (kernels/csrc/block_sparse_cpu.cpp) against the float64 reference.

The kernel computes in float32 from float32 / bfloat16 / float16 inputs; the reference runs in float64 on
the same (rounded) inputs, so the tolerance is the operand dtype's, not float32's.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import pytest
import torch

from moa_compress.kernels import cpu, native
from moa_compress.kernels.layout import BlockLayout, causal_layout
from moa_compress.kernels.reference import block_sparse_attention_reference
from tests.factories import random_layout, random_qkv


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.available():
        # Where a C++ compiler exists (CI machines have one) a kernel that does not build is a
        # failure, not a skip.
        if shutil.which(native.compiler()[0]) and os.environ.get("MOA_COMPRESS_NATIVE") != "0":
            pytest.fail(f"the CPU kernel did not build: {native.problem()}")
        pytest.skip(f"the CPU kernel is not available: {native.problem()}")


# (batch, layout batch, query heads, KV heads, q_len, kv_len, head dim, block, keep probability, per group)
CASES = {
    "gqa-folded-odd": (1, 1, 9, 3, 333, 333, 64, 64, 0.5, True),
    "gqa-per-head": (1, 1, 8, 2, 300, 300, 64, 64, 0.5, False),
    "batch-own-layouts": (2, 2, 6, 2, 257, 257, 32, 32, 0.6, False),
    "q-shorter-unaligned": (1, 1, 4, 2, 150, 411, 64, 64, 0.5, True),
    "block-16-mha": (1, 1, 3, 3, 130, 130, 64, 16, 0.4, False),
    "head-96": (1, 1, 4, 1, 200, 200, 96, 64, 0.5, True),
    "head-128-dense": (1, 1, 4, 2, 300, 300, 128, 64, 1.0, True),
    "diagonal-only": (1, 1, 4, 2, 260, 260, 64, 32, 0.0, False),
    # Rows that see more keys than one 1024-key softmax chunk: earlier chunks are rescaled.
    "chunks-64": (1, 1, 4, 2, 300, 2600, 64, 64, 0.7, True),
    "chunks-16": (1, 1, 2, 1, 130, 2600, 64, 16, 0.6, False),
    # Head dims the packed operands do not take (plain path) and a 48-wide packed chunk.
    "head-40": (1, 1, 4, 2, 200, 200, 40, 64, 0.5, True),
    "head-48": (1, 1, 4, 2, 200, 200, 48, 32, 0.5, False),
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def make_case(name: str):
    b, lb, hq, hkv, sq, sk, d, bs, p, per_group = CASES[name]
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d=d, seed=sq + d)
    layout = random_layout(lb, hkv if per_group else hq, sq, sk, bs, p=p, seed=sk)
    if per_group:
        group = hq // hkv
        layout = BlockLayout(
            layout.kv_num_blocks.repeat_interleave(group, 1).contiguous(),
            layout.kv_indices.repeat_interleave(group, 1).contiguous(),
            bs,
            sq,
            sk,
        )
    return q, k, v, layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, dtype):
    q, k, v, layout = make_case(name)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    expected = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, scale)
    out = native.block_sparse_attention_native(q, k, v, layout, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=TOLERANCE[dtype])


def test_rows_that_see_nothing_are_zero():
    # Query block 0 selects only key block 2, after all of its rows; block 1 selects nothing; block 2
    # selects block 0.
    q, k, v = random_qkv(1, 2, 1, 192, 192, d=64, dtype=torch.float32, seed=3)
    num = torch.tensor([[[1, 0, 1], [1, 0, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[2], [0], [0]], [[2], [0], [0]]]], dtype=torch.int32)
    layout = BlockLayout(num, idx, 64, 192, 192)
    out = native.block_sparse_attention_native(q, k, v, layout, 0.125)
    assert bool((out[:, :, :128] == 0).all())
    assert bool((out[:, :, 128:] != 0).all())
    expected = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, 0.125)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_strided_inputs_and_threads_give_the_same_result():
    q, k, v, layout = make_case("gqa-folded-odd")
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    # [B, S, H, D] storage seen as [B, H, S, D], as a model's projections give it.
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    out = native.block_sparse_attention_native(q, k, v, layout, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native.block_sparse_attention_native(qt, kt, vt, layout, 0.125)
    finally:
        torch.set_num_threads(threads)
    # Each work item runs start to end on one thread: the result does not depend on the split.
    assert torch.equal(out, single)


def test_density_one_equals_sdpa():
    q, k, v = random_qkv(1, 9, 3, 500, 500, d=64, dtype=torch.float32, seed=5)
    out = native.block_sparse_attention_native(q, k, v, causal_layout(500, 500, 9, 64), 0.125)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=2e-5)


def test_cpu_backend_uses_the_kernel_for_prefill_only(monkeypatch):
    q, k, v, layout = make_case("gqa-folded-odd")
    q32, k32, v32 = q.float(), k.float(), v.float()
    calls = []
    real = native.block_sparse_attention_native
    monkeypatch.setattr(native, "block_sparse_attention_native", lambda *a: calls.append(1) or real(*a))
    out = cpu.block_sparse_attention_torch(q32, k32, v32, layout, 0.125)
    assert calls == [1]
    expected = block_sparse_attention_reference(q, k, v, layout, 0.125)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)
    # float64, autograd and a one-block chunk take the fused-op schedule.
    cpu.block_sparse_attention_torch(q, k, v, layout, 0.125)
    cpu.block_sparse_attention_torch(q32.requires_grad_(), k32, v32, layout, 0.125)
    short = causal_layout(64, 333, 9, 64)
    cpu.block_sparse_attention_torch(q32.detach()[:, :, :64], k32, v32, short, 0.125)
    cpu.block_sparse_attention_torch(q32.detach(), k32, v32, layout, -0.125)
    assert calls == [1]
    # 16-bit types go to the kernel only where the CPU runs them on packed operands.
    for dtype in (torch.bfloat16, torch.float16):
        calls.clear()
        cpu.block_sparse_attention_torch(q.to(dtype), k.to(dtype), v.to(dtype), layout, 0.125)
        assert calls == ([1] if native.packs(dtype, 64, 64) else [])
    assert native.packs(torch.float32, 64, 64) is False
    # Head sizes whose V chunks the packing does not take, odd blocks: never packed.
    assert native.packs(torch.bfloat16, 40, 64) is False and native.packs(torch.bfloat16, 64, 33) is False


def test_failed_build_is_reported_and_leaves_no_file(monkeypatch, tmp_path):
    saved = dict(native._state)
    monkeypatch.setenv("MOA_COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    native._state.clear()
    try:
        assert native.available() is False
        assert "compiler exited with 1" in native.problem()
        # No library and no half-written temp file: only the (empty) build lock remains.
        assert [p.suffix for p in (tmp_path / "native").iterdir()] == [".lock"]
        monkeypatch.setenv("MOA_COMPRESS_NATIVE", "0")
        native._state.clear()
        assert native.available() is False and "MOA_COMPRESS_NATIVE=0" in native.problem()
    finally:
        native._state.clear()
        native._state.update(saved)


def test_library_name_changes_with_the_source(monkeypatch, tmp_path):
    first = native.library_path()
    source = tmp_path / "block_sparse_cpu.cpp"
    source.write_bytes(native.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", source)
    assert native.library_path() != first


def test_a_library_that_does_not_load_is_built_again(monkeypatch, tmp_path):
    saved = dict(native._state)
    monkeypatch.setenv("MOA_COMPRESS_CACHE", str(tmp_path))
    target = native.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")
    built = []
    monkeypatch.setattr(native, "_build", lambda t: built.append(t) or t.write_bytes(b"still not one"))
    native._state.clear()
    try:
        assert native.available() is False
        assert built == [target] and "OSError" in native.problem()
    finally:
        native._state.clear()
        native._state.update(saved)


def test_a_layout_broadcast_over_batch_and_heads():
    q, k, v = random_qkv(3, 6, 2, 200, 200, d=64, dtype=torch.float32, seed=7)
    one = random_layout(1, 1, 200, 200, 32, p=0.5, seed=2)
    # Stride-0 views: one row of blocks for every batch entry and head.
    layout = BlockLayout(
        one.kv_num_blocks.expand(3, 6, -1), one.kv_indices.expand(3, 6, -1, -1), 32, 200, 200
    )
    out = native.block_sparse_attention_native(q, k, v, layout, 0.125)
    expected = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, 0.125)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda num, idx: idx.__setitem__((0, 0, 2, 0), 9), "outside \\[0, 4\\)"),
        (lambda num, idx: num.__setitem__((0, 1, 3), 5), "kv_num_blocks entry 5"),
        (lambda num, idx: idx[0, 0, 3, :2].copy_(torch.tensor([1, 0])), "strictly ascending"),
    ],
    ids=["index-past-the-end", "count-past-the-row", "descending"],
)
def test_bad_layout_values_raise_instead_of_reading_out_of_bounds(change, message):
    q, k, v = random_qkv(1, 2, 1, 256, 256, d=64, dtype=torch.float32, seed=1)
    layout = causal_layout(256, 256, 2, 64)
    num, idx = layout.kv_num_blocks.clone(), layout.kv_indices.clone()
    change(num, idx)
    with pytest.raises(RuntimeError, match=message):
        native.block_sparse_attention_native(q, k, v, BlockLayout(num, idx, 64, 256, 256), 0.125)


FAKE_COMPILER = """
import sys
out = sys.argv[sys.argv.index("-o") + 1]
open(out, "wb").write(b"not a shared library")
with open(sys.argv[0] + ".calls", "a") as f:
    f.write("1")
"""


def test_a_fresh_build_that_does_not_load_is_not_built_again(monkeypatch, tmp_path):
    compiler = tmp_path / "fake_cxx.py"
    compiler.write_text(FAKE_COMPILER)
    saved = dict(native._state)
    monkeypatch.setenv("MOA_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", f"{sys.executable} {compiler}")  # split like a shell
    native._state.clear()
    try:
        assert native.available() is False and "OSError" in native.problem()
        target = native.library_path()
        assert (target.stat().st_mode & 0o777) == 0o755  # not mkstemp's private mode
        assert target.with_suffix(".failed").is_file()
        native._state.clear()
        assert native.available() is False and "did not load" in native.problem()
        assert (tmp_path / "fake_cxx.py.calls").read_text() == "1"  # built once, not once per process
    finally:
        native._state.clear()
        native._state.update(saved)


def test_a_cache_folder_of_another_user_is_refused(monkeypatch, tmp_path):
    saved = dict(native._state)
    monkeypatch.setenv("MOA_COMPRESS_CACHE", str(tmp_path))
    (tmp_path / "native").mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    native._state.clear()
    try:
        assert native.available() is False and "belongs to another user" in native.problem()
    finally:
        native._state.clear()
        native._state.update(saved)


def test_the_op_passes_torch_library_checks_with_its_fake_kernel():
    """Schema, autograd registration and the fake (shape-only) kernel that tracing uses."""
    q, k, v, layout = make_case("gqa-per-head")
    native._load()  # a second load in one process (the tests clear state) must not fail
    op = torch.ops.moa_compress_cpu.block_sparse_attention.default
    torch.library.opcheck(
        op, (q.float(), k.float(), v.float(), layout.kv_num_blocks, layout.kv_indices, 64, 0.125)
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    q32, k32, v32 = q.float(), k.float(), v.float()
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q32, k32, v32))
        out = op(
            fq, fk, fv, mode.from_tensor(layout.kv_num_blocks), mode.from_tensor(layout.kv_indices), 64, 0.125
        )
    assert out.shape == q.shape and out.dtype == torch.float32
