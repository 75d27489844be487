"""Benchmarks behind ``moa-compress bench ...``: they return rows of measurements; the CLI prints.

Every ratio compares times measured in the same run, with the candidates interleaved round by
round and the best round of each kept, so a load change on a shared machine hits both sides.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moa_compress.errors import UserInputError

ATTENTION_BACKENDS = ("torch", "flex")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(UserInputError):
    """Benchmark options that cannot run."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def best_times(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Seconds per call of each candidate: one warm-up call each, then ``repeats`` rounds that
    run every candidate once; the minimum over rounds."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_backends(backends: Sequence[str]) -> None:
    for name in backends:
        if name not in ATTENTION_BACKENDS:
            raise BenchError(f"unknown backend {name!r}; expected some of {', '.join(ATTENTION_BACKENDS)}")


# ----------------------------------------------------------------------------------------------
# Attention kernels


def uniform_layout(n: int, density: float, num_heads: int = 9, block_size: int = 64):
    """The layout of a uniform sink + window plan (what ``plan uniform`` makes) at length ``n``:
    returns ``(layout, exact density)``."""
    from moa_compress.plan import ModelIdentity, uniform_plan

    identity = ModelIdentity("bench", 1, num_heads, 1, 64, "bench")
    plan = uniform_plan(identity, density, [n], block_size=block_size)
    return plan.layout(0, n), plan.density(n)


def bench_attention(
    lengths: Sequence[int] = (2048, 4096, 8192),
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    densities: Sequence[float] = (1.0, 0.5, 0.25, 0.1),
    backends: Sequence[str] = ATTENTION_BACKENDS,
    *,
    heads: int = 9,
    kv_heads: int = 3,
    head_dim: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each backend and dense causal SDPA on the embedded model's attention shape.

    One row per (length, dtype, density): ``sdpa_s``, and per backend ``<name>_s``,
    ``<name>_speedup`` (SDPA time / backend time) and ``<name>_ideal`` (speedup × density: the
    fraction of the ideal 1/density reached).
    """
    check_backends(backends)
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise BenchError(f"densities must be in (0, 1], got {d}")
    rows = []
    for n in lengths:
        for dtype_name in dtypes:
            dtype = dtype_of(dtype_name)
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
            k = torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype)
            v = torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype)
            for d in densities:
                layout, exact = uniform_layout(n, d, heads)
                times = best_times(attention_candidates(q, k, v, layout, backends), repeats)
                row: dict[str, Any] = {
                    "n": n,
                    "dtype": dtype_name,
                    "density": d,
                    "exact_density": round(exact, 4),
                    "sdpa_s": times["sdpa"],
                }
                for name in backends:
                    speedup = times["sdpa"] / times[name]
                    row.update(
                        {
                            f"{name}_s": times[name],
                            f"{name}_speedup": speedup,
                            f"{name}_ideal": speedup * exact,
                        }
                    )
                rows.append(row)
                if progress:
                    progress(attention_table([row], backends).splitlines()[-1])
    return rows


def attention_candidates(q, k, v, layout, backends: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """Dense causal SDPA and each backend on the same inputs, as zero-argument calls."""
    import torch.nn.functional as F

    from moa_compress.attention import block_sparse_attention

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def backend(name: str):
        return lambda: block_sparse_attention(q, k, v, layout, backend=name)

    return {"sdpa": sdpa, **{name: backend(name) for name in backends}}


def attention_table(rows: Sequence[dict[str, Any]], backends: Sequence[str]) -> str:
    """Markdown table: times in ms, speedup over dense causal SDPA, speedup × density."""
    header = ["N", "dtype", "density", "SDPA ms"]
    for name in backends:
        header += [f"{name} ms", f"{name} speedup", f"{name} × d"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["n"]), row["dtype"], f"{row['exact_density']:.3f}", f"{row['sdpa_s'] * 1e3:.1f}"]
        for name in backends:
            cells += [
                f"{row[f'{name}_s'] * 1e3:.1f}",
                f"{row[f'{name}_speedup']:.2f}x",
                f"{row[f'{name}_ideal']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
