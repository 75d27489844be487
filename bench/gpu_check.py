"""The one GPU check of the Triton kernels: native tests, then prefill and decode timings, table last.

On a machine with an NVIDIA GPU, PyTorch and Triton (the project's is an H200 with torch 2.11 and
triton 3.6, no flash-attn, no network), from the repository root::

    python -m pip install --no-deps --no-build-isolation --no-index -e .   # once, if not installed
    python bench/gpu_check.py                  # tests + timings, < 5 minutes
    python bench/gpu_check.py --block-sizes 64,128   # also layouts of 128-token blocks
    python bench/gpu_check.py --dry-run        # no GPU: tiny sizes through the Triton interpreter

Prefill: triton vs dense causal attention (flash-attn if importable, else PyTorch SDPA's flash
backend) vs FlexAttention on the same block layout, 32 query / 8 KV heads x 128 dims, bf16, at
8K / 32K / 128K tokens and densities 1 / 0.5 / 0.2 / 0.1 of the causal blocks (each query block keeps
its diagonal and the first (sink) block plus random causal blocks). Decode: one token against a 32K /
128K cache: whole cache, mixed per-head windows, 10% of the blocks per query head and per KV head;
triton vs SDPA on the whole cache. Planned cache step: one layer of a PlanKVCache planned at that length
from random rules (a full buffer for KV heads with a dense head, a sink + window ring for the others),
filled, then one decode step's attention: the Triton slot kernel vs the torch path (mask + SDPA).
Every measurement that fails prints its error in the table instead of stopping the run; measurements
left when the time budget runs out are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DECODE_PATTERNS = ("whole cache", "mixed windows", "blocks 0.1", "kv-head blocks 0.1")


@dataclass
class Row:
    """One line of the final table; times in milliseconds, None when not measured."""

    kind: str
    tokens: int
    density: str
    block: int
    triton_ms: float | None = None
    dense_ms: float | None = None
    flex_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU through the Triton interpreter"
    )
    parser.add_argument(
        "--lengths", default="32768,8192,131072", help="prefill lengths, most important first"
    )
    parser.add_argument("--densities", default="1,0.5,0.2,0.1")
    parser.add_argument("--decode-lengths", default="32768,131072")
    parser.add_argument("--block-sizes", default="64", help="layout block sizes to time, e.g. 64,128")
    parser.add_argument("--budget-s", type=float, default=250.0, help="stop starting measurements after this")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("moa_compress") is None or not (ROOT / "kernels").is_dir():
        raise SystemExit("run from a moa-compress checkout with the package installed (see below)")
    try:
        importlib.import_module("moa_compress.kernels")
    except ImportError:
        # kernels/ becomes moa_compress.kernels only through the package's install mapping.
        raise SystemExit(
            "moa_compress.kernels is not importable: install the checkout first, offline:\n"
            "    python -m pip install --no-deps --no-build-isolation --no-index -e ."
        ) from None
    if args.dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    elif not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA GPU here: run with --dry-run to exercise the script through the interpreter"
        )
    start = time.monotonic()
    deadline = start + args.budget_s
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print_environment(device)
    test_summary = "not run (--dry-run)" if args.dry_run else "not run (--skip-tests)"
    if not args.dry_run and not args.skip_tests:
        test_summary = run_tests()
    if args.dry_run:
        shape = {"heads": 4, "kv_heads": 2, "head_dim": 64}
        lengths, decode_lengths = [200], [300]
    else:
        shape = {"heads": 32, "kv_heads": 8, "head_dim": 128}
        lengths = [int(x) for x in args.lengths.split(",")]
        decode_lengths = [int(x) for x in args.decode_lengths.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    dtype = torch.bfloat16

    # Most important first, so a spent time budget drops the least: the first length's prefill at every
    # block size, then decode, then the other prefill lengths.
    first, rest = lengths[:1], lengths[1:]
    work = [("prefill", n, density, block) for block in block_sizes for n in first for density in densities]
    work += [("decode", n, pattern, 64) for n in decode_lengths for pattern in DECODE_PATTERNS]
    work += [("cache step", n, "planned rules", 64) for n in decode_lengths]
    work += [("prefill", n, density, block) for block in block_sizes for n in rest for density in densities]
    rows: list[Row] = []
    for kind, n, setting, block in work:
        row = Row(kind, n, setting if isinstance(setting, str) else f"{setting:g}", block)
        rows.append(row)
        if time.monotonic() > deadline:
            row.notes.append("skipped: time budget")
        elif kind == "prefill":
            measure_prefill(row, n, setting, block, shape, dtype, device, use_flex=not args.no_flex)
        elif kind == "cache step":
            measure_cache_step(row, n, block, shape, dtype, device)
        else:
            measure_decode(row, n, setting, shape, dtype, device)
        print(format_row(row), flush=True)
    rows.sort(key=lambda r: (r.kind != "prefill", r.block, r.tokens))  # stable: densities keep their order

    print()
    print(f"tests: {test_summary}")
    print(f"total {time.monotonic() - start:.0f} s; {describe_device(device)}; times in ms (median)")
    print_table(rows, dry_run=args.dry_run)


# ---------------------------------------------------------------- setup and tests


def describe_device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "CPU through TRITON_INTERPRET=1 (timings meaningless)"


def print_environment(device: str) -> None:
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {describe_device(device)}", flush=True)
    try:
        import flash_attn

        print(f"flash-attn {flash_attn.__version__}")
    except ImportError:
        print("flash-attn not importable: dense baseline is SDPA's flash backend")


def run_tests() -> str:
    """The kernel tests, natively on this GPU; returns pytest's summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or not slow", "tests/test_triton.py"]
    print("$", " ".join(command), flush=True)
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    except subprocess.TimeoutExpired:
        return "TIMED OUT after 150 s"
    print(result.stdout[-4000:], result.stderr[-2000:], flush=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output") + ("" if result.returncode == 0 else " (FAILED)")


# ---------------------------------------------------------------- inputs


def random_layout(heads: int, n: int, density: float, block: int, device: str):
    """Per head and query block: the diagonal block, the first block, and random causal blocks with
    probability chosen so that about ``density`` of the causal blocks are kept."""
    from moa_compress.kernels.layout import BlockLayout, causal_layout

    if density >= 1:
        return causal_layout(n, n, heads, block).to(device), 1.0
    nq = -(-n // block)
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.arange(nq, device=device)
    causal = rows[None, :] <= rows[:, None]  # [nQ, nK]
    forced = (rows[None, :] == rows[:, None]) | (rows[None, :] == 0)
    # Extra blocks needed beyond the forced ones to reach the target count of causal blocks.
    total = int(causal.sum())
    extra = max(density * total - int((forced & causal).sum()), 0) / max(int((causal & ~forced).sum()), 1)
    chosen = torch.rand(1, heads, nq, nq, generator=g, device=device) < extra
    blocks = (chosen & causal) | (forced & causal)
    actual = blocks.sum().item() / (heads * total)
    return BlockLayout.from_block_mask(blocks, block, n, n), actual


def random_tensors(shape: dict, n: int, dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(1, hkv, n, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(1, hkv, n, d, generator=g, device=device, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------- timing


def time_ms(fn, device: str, min_seconds: float = 0.3, max_reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls (the first compiles)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    begin = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - begin < min_seconds):
        if device == "cuda":
            started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            started.record()
            fn()
            ended.record()
            ended.synchronize()
            times.append(started.elapsed_time(ended))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def attempt(row: Row, label: str, fn):
    """Run one measurement; a failure becomes a note in the table."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - the table reports whatever went wrong
        row.notes.append(
            f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def dense_attention():
    """The dense causal baseline: flash-attn when importable, else SDPA (flash backend on CUDA)."""
    try:
        from flash_attn import flash_attn_func

        def run(q, k, v):
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

        return run, "flash-attn"
    except ImportError:
        pass
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return run, "sdpa"


def measure_prefill(
    row: Row, n: int, density: float, block: int, shape, dtype, device, use_flex: bool
) -> None:
    from moa_compress.attention import block_sparse_attention

    q, k, v = random_tensors(shape, n, dtype, device)
    made = attempt(row, "layout", lambda: random_layout(shape["heads"], n, density, block, device))
    if made is None:
        return
    layout, actual = made
    row.density = f"{density:g} ({actual:.3f})"
    run_triton = lambda: block_sparse_attention(q, k, v, layout, backend="triton")
    row.triton_ms = attempt(row, "triton", lambda: time_ms(run_triton, device))
    dense, dense_name = dense_attention()
    if density >= 1:
        row.dense_ms = attempt(row, dense_name, lambda: time_ms(lambda: dense(q, k, v), device))
        if row.triton_ms is not None and n <= 32768:
            error = attempt(
                row, "check", lambda: (run_triton().float() - dense(q, k, v).float()).abs().max().item()
            )
            if error is not None:
                row.notes.append(f"max abs diff vs {dense_name} {error:.1e}")
    if use_flex and device == "cuda":
        row.flex_ms = attempt(row, "flex", lambda: time_flex(q, k, v, layout, device))


_compiled_flex = None


def time_flex(q, k, v, layout, device) -> float:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = layout.to_flex_block_mask()
    return time_ms(lambda: _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True), device)


def decode_inputs(n: int, pattern: str, shape, dtype, device):
    """A cache of ``n`` tokens per KV head and, per pattern, the lengths and block lists the heads read."""
    h, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, h, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(1, hkv, n, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(1, hkv, n, d, generator=g, device=device, dtype=dtype)
    kv_lens = torch.full((1, hkv), n, dtype=torch.int32, device=device)
    if pattern == "mixed windows":
        # Half the KV heads keep a sink + window of 4096 tokens (compacted to the front of their cache).
        kv_lens[0, ::2] = min(n, 4096)
        return q, k, v, kv_lens, None, None
    if pattern in ("blocks 0.1", "kv-head blocks 0.1"):
        # 10% of the blocks plus the first and last, per query head or shared by each KV head's group.
        num_k = -(-n // 64)
        lists = h if pattern == "blocks 0.1" else hkv
        chosen = torch.rand(1, lists, num_k, generator=g, device=device) < 0.1
        chosen[..., 0] = chosen[..., -1] = True
        num = chosen.sum(-1).to(torch.int32)
        order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return q, k, v, kv_lens, num, order[..., : int(num.max())].to(torch.int32).contiguous()
    return q, k, v, kv_lens, None, None


def measure_decode(row: Row, n: int, pattern: str, shape, dtype, device) -> None:
    from moa_compress.kernels.triton_decode import block_sparse_decode_triton

    made = attempt(row, "inputs", lambda: decode_inputs(n, pattern, shape, dtype, device))
    if made is None:
        return
    q, k, v, kv_lens, num, idx = made
    run = lambda: block_sparse_decode_triton(q, k, v, kv_lens, num, idx)
    row.triton_ms = attempt(row, "triton", lambda: time_ms(run, device))
    if pattern == "whole cache":
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        row.dense_ms = attempt(row, "sdpa", lambda: time_ms(sdpa, device))
        error = attempt(row, "check", lambda: (run().float() - sdpa()[:, :, 0].float()).abs().max().item())
        if error is not None:
            row.notes.append(f"max abs diff vs sdpa {error:.1e}")
    if row.triton_ms is not None:
        read = kv_bytes_read(k, kv_lens, num, idx, shape)
        row.notes.append(f"{read / row.triton_ms / 1e6:.0f} GB/s (K/V bytes read / time)")


def kv_bytes_read(k, kv_lens, num, idx, shape) -> float:
    """Bytes of K and V the kernel reads: once per KV head for the whole cache or lists per KV head
    (the query heads of a group share a program), once per query head for lists per query head."""
    per_token = 2 * k.shape[-1] * k.element_size()
    if num is None:
        return float(kv_lens.sum().item()) * per_token
    return float(num.sum().item()) * 64 * per_token


def planned_cache(n: int, block: int, shape, dtype, device):
    """One layer's PlanKVCache storage planned at ``n`` tokens from random rules and filled with
    ``n`` random tokens: KV heads whose group has a dense head share a full buffer, the others a ring
    (sink + the widest band of their heads)."""
    from moa_compress.kvcache import ClassStorage, plan_layer
    from moa_compress.plan import DenseRule, StaticRule

    h, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    group = h // hkv
    g = torch.Generator().manual_seed(2)
    longest = max(n // 8, 2 * block)  # bands up to an eighth of the context
    groups = []
    for kv_head in range(hkv):
        rules = [
            StaticRule(
                int(torch.randint(0, 3, (1,), generator=g)),
                float(torch.randint(block, longest, (1,), generator=g)),
                0.0,
            )
            for _ in range(group)
        ]
        if kv_head < max(hkv // 4, 1):
            rules[0] = DenseRule()
        groups.append(tuple(rules))
    classes = plan_layer(groups, block, n, -(-n // block) * block)
    storage = [ClassStorage(c, 1, d, dtype, device, block) for c in classes]
    keys = torch.randn(1, hkv, n, d, generator=torch.Generator(device=device).manual_seed(3), device=device)
    positions = torch.arange(n, device=device)[None]  # [1, n]
    lengths = torch.full((1, 1), n, device=device)
    for s in storage:
        s.all_heads = len(s.kv.kv_heads) == hkv
        s.write(keys.to(dtype), keys.flip(2).to(dtype), positions, lengths)
    q = torch.randn(1, h, d, generator=torch.Generator(device=device).manual_seed(4), device=device).to(dtype)
    return q, storage


def measure_cache_step(row: Row, n: int, block: int, shape, dtype, device) -> None:
    """One decode step's attention over a planned cache, class by class: the slot kernel reads the
    cache's slot table and rules (``triton``); the torch path builds the mask and runs SDPA."""
    from moa_compress.attention import decode_attention

    made = attempt(row, "cache", lambda: planned_cache(n, block, shape, dtype, device))
    if made is None:
        return
    q, storage = made
    position = torch.full((1,), n - 1, device=device)
    queries = [q if s.all_heads else q.index_select(1, s.q_index) for s in storage]

    def step(backend):
        return [
            decode_attention(q_class, s.keys, s.values, s.visible(position, block), backend=backend)
            for q_class, s in zip(queries, storage)
        ]

    row.triton_ms = attempt(row, "triton", lambda: time_ms(lambda: step("triton"), device))
    row.dense_ms = attempt(row, "torch", lambda: time_ms(lambda: step("torch"), device))
    error = attempt(
        row,
        "check",
        lambda: max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(step("triton"), step("torch"))
        ),
    )
    if error is not None:
        row.notes.append(f"max abs diff vs torch {error:.1e}")
    row.notes.append(
        "dense = torch path; classes "
        + ", ".join(
            f"{'ring' if s.kv.is_ring else 'full'} {len(s.kv.kv_heads)} KV x {s.kv.capacity}" for s in storage
        )
    )


# ---------------------------------------------------------------- table


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}" if ms < 1 else f"{ms:.2f}"


def format_row(row: Row) -> str:
    speedup = "-"
    if row.triton_ms and row.dense_ms:
        speedup = f"{row.dense_ms / row.triton_ms:.2f}x"
    goal = "-"
    if row.kind == "prefill":
        target = float(row.density.split()[0])
        goal = f">= {0.8 / target:.1f}x" if target < 1 else ">= 0.83x"
    cells = [row.kind, str(row.tokens), row.density, str(row.block), fmt(row.triton_ms), fmt(row.dense_ms)]
    cells += [fmt(row.flex_ms), speedup, goal, "; ".join(row.notes)]
    return "| " + " | ".join(cells) + " |"


def print_table(rows: list[Row], dry_run: bool) -> None:
    # Dense time per length (density 1, same block size) is the baseline for every density.
    dense = {(r.kind, r.tokens, r.block): r.dense_ms for r in rows if r.dense_ms is not None}
    for row in rows:
        if row.dense_ms is None and row.kind == "prefill":
            row.dense_ms = dense.get((row.kind, row.tokens, row.block))
        if row.dense_ms is None and row.kind == "decode":
            row.dense_ms = dense.get((row.kind, row.tokens, 64))
    header = "| kind | tokens | density (actual) | block | triton ms | dense ms | flex ms | dense/triton | goal | notes |"
    print(header)
    print("|" + "|".join(["---"] * 10) + "|")
    for row in rows:
        print(format_row(row))
    if dry_run:
        print("(dry run: interpreter timings, not performance)")


if __name__ == "__main__":
    main()
