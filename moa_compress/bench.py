"""Benchmarks behind ``moa-compress bench ...``: they return rows of measurements; the CLI prints.

Every ratio compares times measured in the same run, with the candidates interleaved round by
round and the best round of each kept, so a load change on a shared machine hits both sides.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def best_times(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, Any]:
    """Best wall-clock and best process CPU seconds per call of each candidate: (optionally) one
    warm-up call each, then ``repeats`` rounds that run every candidate once.

    Returns ``{name: seconds}`` (wall) and ``{name + "_cpu": seconds}``. With one torch thread the
    CPU time is the work done, whatever else loads the machine; the wall time is what a user waits.
    """
    if warmup:
        for fn in candidates.values():
            fn()
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in candidates.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = min(best.get(name, float("inf")), wall)
            best[name + "_cpu"] = min(best.get(name + "_cpu", float("inf")), cpu)
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
    gates: bool = True,
    progress: Callable[[str], None] | None = None,
    ranking_samples: int = 4,
    layer_samples: int = 16,
) -> list[dict[str, Any]]:
    """Time each backend and dense causal SDPA on the embedded model's attention shape.

    One row per (length, dtype, density): ``sdpa_s``, and per backend ``<name>_s``,
    ``<name>_speedup`` (SDPA time / backend time) and ``<name>_ideal`` (speedup × density: the
    fraction of the ideal 1/density reached). With ``gates`` (densities below 1): ``gate_select_s``,
    what a layer whose heads all have gate rules adds before attending — pool Q/K, score the blocks
    with a (random) gate of the default width, select per row, build the layout — ``gate_share``
    (that over the SDPA time) and ``gate_speedup`` (SDPA time over selection + the torch backend); with
    ``ranking_samples`` > 0 also ``sampled_select_s`` / ``sampled_share``, the same selection ranked by
    that many sampled queries per block instead (``apply_plan(..., ranking="sampled:R")``, a prompt's cost);
    with ``layer_samples`` > 0 also ``layer_select_s`` / ``layer_share``, the layer's blocks allocated over
    all its heads and rows from that many sampled queries per block and query head instead, layout
    included (``ranking="sampled-layer:R"``, :mod:`moa_compress.allocation`), and ``layer_speedup``,
    SDPA time over that allocation and its attention (torch backend).
    """
    check_backends(backends)
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise BenchError(f"densities must be in (0, 1], got {d}")
    for value, option in ((ranking_samples, "--ranking-samples"), (layer_samples, "--layer-samples")):
        if value < 0:
            raise BenchError(f"{option} must be 0 or more, got {value}")
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
                    "sdpa_cpu_s": times["sdpa_cpu"],
                }
                if gates and d < 1.0:
                    row.update(
                        gate_times(
                            q,
                            k,
                            v,
                            d,
                            repeats,
                            times["sdpa"],
                            samples=ranking_samples,
                            layer_samples=layer_samples,
                        )
                    )
                for name in backends:
                    speedup = times["sdpa"] / times[name]
                    row.update(
                        {
                            f"{name}_s": times[name],
                            f"{name}_speedup": speedup,
                            f"{name}_ideal": speedup * exact,
                            f"{name}_cpu_s": times[f"{name}_cpu"],
                            f"{name}_cpu_speedup": times["sdpa_cpu"] / times[f"{name}_cpu"],
                        }
                    )
                rows.append(row)
                if progress:
                    progress(attention_table([row], backends).splitlines()[-1])
    return rows


def gate_times(
    q,
    k,
    v,
    density: float,
    repeats: int,
    sdpa_s: float,
    block_size: int = 64,
    samples: int = 0,
    layer_samples: int = 0,
) -> dict[str, Any]:
    """Selection time of one layer whose heads all have ``GateRule(density)`` (random gate weights:
    the cost does not depend on them), and selection + block-sparse attention (torch backend); with
    ``samples``, the selection ranked by that many sampled queries per block as well; with
    ``layer_samples``, the layer's blocks allocated from that many sampled queries per block and query
    head (selection with layout, and with the attention)."""
    from moa_compress.allocation import allocated_attention, allocated_rows
    from moa_compress.attention import block_sparse_attention
    from moa_compress.gate_runtime import PrefillRanking, call_selections, layer_block_rows, row_codes
    from moa_compress.gates import AttnGate, gates_to_plan_tensors
    from moa_compress.kernels.layout import BlockLayout
    from moa_compress.plan import GateRule, ModelIdentity, Plan

    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    n = q.shape[2]
    identity = ModelIdentity("bench", 1, heads, kv_heads, head_dim, "bench")
    torch.manual_seed(0)
    config, tensors = gates_to_plan_tensors([AttnGate(heads, kv_heads, head_dim, block_size=block_size)], [0])
    rules = ((GateRule(density),) * heads,)
    plan = Plan(identity, rules, block_size, gates=config, tensors=tensors)
    from moa_compress.gates import gates_from_plan

    gate = gates_from_plan(plan)[0]

    def select(ranking=None):
        with torch.no_grad():  # q and k stand for the pre-RoPE ones too: the cost is the same
            codes = row_codes(gate, k, block_size)
            selections = call_selections(plan, 0, gate, q, k, q, codes, q.shape[-1] ** -0.5, ranking)
            rows = layer_block_rows(plan, 0, n, n, selections)
            return BlockLayout.from_block_mask(rows, block_size, n, n)

    def gated():
        return block_sparse_attention(q, k, v, select(), backend="torch")

    calls = {"select": select, "gated": gated}
    if samples:
        calls["sampled"] = lambda: select(PrefillRanking(samples))
    scale = q.shape[-1] ** -0.5

    def allocate():
        with torch.no_grad():
            rows = allocated_rows(plan, 0, q, k, scale, layer_samples)
            return BlockLayout.from_block_mask(rows, block_size, n, n)

    if layer_samples:
        calls["layer"] = allocate
        ranking = PrefillRanking(layer_samples, scope="layer")
        calls["layer_attention"] = lambda: allocated_attention(plan, 0, q, k, v, scale, "torch", ranking)
    times = best_times(calls, repeats)
    out = {
        "gate_select_s": times["select"],
        "gate_share": times["select"] / sdpa_s,
        "gate_speedup": sdpa_s / times["gated"],
        "gate_density": round(plan.density(n), 4),
    }
    if samples:
        out.update(
            {
                "sampled_samples": samples,
                "sampled_select_s": times["sampled"],
                "sampled_share": times["sampled"] / sdpa_s,
            }
        )
    if layer_samples:
        out.update(
            {
                "layer_samples": layer_samples,
                "layer_select_s": times["layer"],
                "layer_share": times["layer"] / sdpa_s,
                "layer_speedup": sdpa_s / times["layer_attention"],
            }
        )
    return out


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
    """Markdown table: wall times in ms, speedup over dense causal SDPA, speedup × density, and the
    speedup in process CPU time."""
    header = ["N", "dtype", "density", "SDPA ms"]
    for name in backends:
        header += [f"{name} ms", f"{name} speedup", f"{name} × d", f"{name} CPU-time speedup"]
    with_gates = any("gate_select_s" in row for row in rows)
    sampled = next((row["sampled_samples"] for row in rows if "sampled_samples" in row), 0)
    if with_gates:
        header += ["gate select ms", "select / SDPA", "gate + torch speedup"]
    if sampled:
        header += [f"sampled:{sampled} select ms", "sampled / SDPA"]
    layer = next((row["layer_samples"] for row in rows if "layer_samples" in row), 0)
    if layer:
        header += [
            f"sampled-layer:{layer} select ms",
            "sampled-layer / SDPA",
            "sampled-layer + torch speedup",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["n"]), row["dtype"], f"{row['exact_density']:.3f}", f"{row['sdpa_s'] * 1e3:.1f}"]
        for name in backends:
            cells += [
                f"{row[f'{name}_s'] * 1e3:.1f}",
                f"{row[f'{name}_speedup']:.2f}x",
                f"{row[f'{name}_ideal']:.2f}",
                f"{row[f'{name}_cpu_speedup']:.2f}x",
            ]
        if with_gates:
            if "gate_select_s" in row:
                cells += [
                    f"{row['gate_select_s'] * 1e3:.1f}",
                    f"{row['gate_share'] * 100:.1f}%",
                    f"{row['gate_speedup']:.2f}x",
                ]
            else:
                cells += ["–"] * 3
        if sampled:
            if "sampled_select_s" in row:
                cells += [f"{row['sampled_select_s'] * 1e3:.1f}", f"{row['sampled_share'] * 100:.1f}%"]
            else:
                cells += ["–"] * 2
        if layer:
            if "layer_select_s" in row:
                cells += [
                    f"{row['layer_select_s'] * 1e3:.1f}",
                    f"{row['layer_share'] * 100:.1f}%",
                    f"{row['layer_speedup']:.2f}x",
                ]
            else:
                cells += ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Whole-model prefill and decode


def random_tokens(model: Any, n: int, seed: int = 0) -> torch.Tensor:  # [1, n] int64
    """Token ids for timing: speed does not depend on the text, only on its length."""
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(model.config.vocab_size, (1, n), generator=g).to(model.device)


def prefill(model: Any, ids: torch.Tensor) -> None:
    """One prompt forward as generation runs it: no cache kept, logits of the last token only."""
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)


def bench_prefill(
    model: Any,
    lengths: Sequence[int] = (2048, 4096, 8192),
    density: float = 0.25,
    backends: Sequence[str] = ATTENTION_BACKENDS,
    *,
    repeats: int = 2,
    plans: Mapping[str, Any] | None = None,
    rankings: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Whole forward of ``model`` at each length: its own dense attention (SDPA) vs a uniform
    sink + window plan of ``density`` per backend, and each of ``plans`` (name -> plan, e.g. a shipped
    mixed plan) through the first backend — as the plan says, and under each of ``rankings`` (column
    ``<name>+<ranking>``, e.g. ``mixed+sampled-layer:16``: ``apply_plan(..., ranking=...)``). One row
    per length: ``dense_s``, and per column ``<name>_s`` and ``<name>_speedup`` (a plan's density at the
    length: ``<name>_density``)."""
    from moa_compress.plan import identity_of, uniform_plan
    from moa_compress.runtime import apply_plan

    check_backends(backends)
    plans = dict(plans or {})
    if plans and not backends:
        raise BenchError("plans run through the first of the backends; give at least one")
    taken = [name for name in plans if name in ("dense", *backends)]
    if taken:
        raise BenchError(f"plan names {taken} collide with the dense / backend columns; rename the folders")
    identity = identity_of(model)
    rows = []
    for n in lengths:
        plan = uniform_plan(identity, density, [n], block_size=64)
        ids = random_tokens(model, n)
        candidates: dict[str, Callable[[], Any]] = {"dense": lambda ids=ids: prefill(model, ids)}
        runs = [(name, plan, name, None) for name in backends]
        runs += [
            (plan_column(name, r), p, backends[0], r) for name, p in plans.items() for r in (None, *rankings)
        ]
        for name, run_plan, backend, ranking in runs:
            # One handle per column keeps its layout cache across rounds; it is switched on only
            # for its own calls so the rounds can interleave with the dense ones.
            handle = apply_plan(model, run_plan, backend=backend, ranking=ranking)
            handle.remove()
            candidates[name] = lambda handle=handle, ids=ids: run_with_plan(handle, model, ids)
        if "flex" in candidates:
            candidates["flex"]()  # compiles; the other candidates' first calls cost what later ones do
        times = best_times(candidates, repeats, warmup=False)
        row: dict[str, Any] = {
            "n": n,
            "dtype": str(model.dtype).removeprefix("torch."),
            "density": round(plan.density(n), 4),
            "dense_attention": model.config._attn_implementation,
            "dense_s": times["dense"],
            "dense_cpu_s": times["dense_cpu"],
        }
        for name, run_plan, _, _ in runs:
            row.update(
                {
                    f"{name}_s": times[name],
                    f"{name}_speedup": times["dense"] / times[name],
                    f"{name}_cpu_s": times[f"{name}_cpu"],
                    f"{name}_cpu_speedup": times["dense_cpu"] / times[f"{name}_cpu"],
                }
            )
            if run_plan is not plan:
                row[f"{name}_density"] = round(run_plan.density(n), 4)
        rows.append(row)
        if progress:
            progress(prefill_table([row], prefill_columns(backends, plans, rankings)).splitlines()[-1])
    return rows


def plan_column(name: str, ranking: str | None = None) -> str:
    """:func:`bench_prefill`'s column of plan ``name`` as it says (``ranking`` None) or ranked so."""
    return name if ranking is None else f"{name}+{ranking}"


def prefill_columns(backends: Sequence[str], plans: Iterable[str], rankings: Sequence[str] = ()) -> list[str]:
    """:func:`bench_prefill`'s columns besides dense, in order: each backend, then each plan as it says
    and under each of ``rankings``."""
    return [*backends, *(plan_column(name, r) for name in plans for r in (None, *rankings))]


def run_with_plan(handle: Any, model: Any, ids: torch.Tensor) -> None:
    handle.install()
    try:
        prefill(model, ids)
    finally:
        handle.remove()


def prefill_table(rows: Sequence[dict[str, Any]], backends: Sequence[str]) -> str:
    """Markdown table of :func:`bench_prefill` rows; ``backends``: its backend and plan names."""
    header = ["N", "dtype", "plan density", "dense s", "dense CPU s"]
    for name in backends:
        header += [f"{name} s", f"{name} speedup", f"{name} CPU s", f"{name} CPU-time speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            str(row["n"]),
            row["dtype"],
            f"{row['density']:.3f}",
            f"{row['dense_s']:.2f}",
            f"{row['dense_cpu_s']:.2f}",
        ]
        for name in backends:
            density = f" (d {row[f'{name}_density']:.3f})" if f"{name}_density" in row else ""
            cells += [
                f"{row[f'{name}_s']:.2f}{density}",
                f"{row[f'{name}_speedup']:.2f}x",
                f"{row[f'{name}_cpu_s']:.2f}",
                f"{row[f'{name}_cpu_speedup']:.2f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dynamic_cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def random_kv(model: Any, batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys/values ``[B, Hkv, length, D]`` in the model's dtype, shared by every layer (the
    speed of a step does not depend on the values)."""
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    shape = (batch, kv_heads, length, head_dim)
    return tuple(torch.randn(shape, generator=g).to(model.dtype).to(model.device) for _ in range(2))


def filled_dynamic_cache(model: Any, batch: int, length: int) -> Any:
    """A ``DynamicCache`` holding ``length`` random tokens per layer (one copy per layer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keys, values = random_kv(model, batch, length)
    for layer in range(model.config.num_hidden_layers):
        cache.update(keys.clone(), values.clone(), layer)
    return cache


def filled_plan_cache(model: Any, plan: Any, batch: int, length: int, max_length: int) -> Any:
    """A :class:`PlanKVCache` planned for ``max_length`` and filled as after a ``length``-token
    prompt: every layer stores what it keeps of random keys/values (no model forward)."""
    from moa_compress.gate_runtime import GateKeys
    from moa_compress.gates import gates_from_plan
    from moa_compress.kvcache import PlanKVCache

    cache = PlanKVCache(model.config, plan, max_length=max_length)
    keys, values = random_kv(model, batch, length)
    gates = gates_from_plan(plan)
    for i, layer in enumerate(cache.layers):
        stored = layer.update(keys, values)[0]
        layer.plan_storage(keys, None)
        layer.store(stored)
        if i in plan.gate_layers:  # what a gate layer keeps of the prompt: its key blocks' gate codes
            layer.gate_keys = GateKeys(plan.block_size, keep_raw=False)
            layer.gate_keys.update(keys, 0, gates[i].to(keys.device))
    return cache


def time_steps(model: Any, cache: Any, batch: int, steps: int) -> float:
    """Seconds per decode step of ``batch`` sequences through ``cache``: the median of ``steps``
    steps timed one by one (one untimed step first). The median, not the mean: on a shared machine
    one step in eight can take 20% longer, and a step (tens of milliseconds at least) is long enough
    to time alone."""
    from moa_compress.runtime import cache_kwarg

    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    token = torch.ones(batch, 1, dtype=torch.long, device=model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        model(input_ids=token, **kwargs)
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            model(input_ids=token, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_decode(
    model: Any,
    contexts: Sequence[int] = (2048, 8192),
    densities: Sequence[float] = (0.5, 0.25),
    batches: Sequence[int] = (1, 16, 32),
    backend: str = "torch",
    *,
    steps: int = 8,
    budget_bytes: int = 4 << 30,
    plans: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Decode steps after a context of each length: dense attention with a ``DynamicCache`` vs a
    uniform plan of each density with :class:`PlanKVCache` (d = 1: every head dense, the plan's step
    path without sparsity), at each batch size; ``plans`` (name ->
    :class:`~moa_compress.plan.Plan`, e.g. a searched static or mixed plan) join as further variants.

    The caches are filled with random keys/values of the shapes a prompt would leave (no prefill of
    32 x 8K tokens); the timed steps are real model forwards. One row per (context, variant, batch):
    ``ms_per_step`` (the median step, :func:`time_steps`), ``tokens_per_s``, ``kv_bytes`` (allocated), ``rss_bytes`` (process RSS after
    the steps), and per (context, variant) a row with ``budget_batch``: the largest batch whose KV
    fits ``budget_bytes``, timed at that batch.
    """
    import gc

    from moa_compress.plan import identity_of, uniform_plan
    from moa_compress.runtime import apply_plan

    check_backends([backend])
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise BenchError(f"densities must be in (0, 1], got {d}")
    if min(batches) < 1 or steps < 1:
        raise BenchError("batches and steps must be positive")
    identity = identity_of(model)
    config = model.config
    rows: list[dict[str, Any]] = []

    def run(context: int, name: str, batch: int, make_cache, plan=None, density=1.0, budget=False):
        gc.collect()
        cache = make_cache(batch)
        if plan is None:
            seconds = time_steps(model, cache, batch, steps)
            kv = dynamic_cache_bytes(cache)
        else:
            with apply_plan(model, plan, backend=backend):
                seconds = time_steps(model, cache, batch, steps)
            kv = cache.memory()["allocated_bytes"]
        row = {
            "context": context,
            "variant": name,
            "density": round(density, 4),
            "batch": batch,
            "budget_row": budget,
            "ms_per_step": seconds * 1e3,
            "tokens_per_s": batch / seconds,
            "kv_bytes": kv,
            "rss_bytes": rss_bytes(),
        }
        del cache
        rows.append(row)
        if progress:
            progress(decode_table([row]).splitlines()[-1])
        return row

    element = torch.empty((), dtype=model.dtype).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for n in contexts:
        final = n + steps + 1
        variants: list[tuple[str, Any, float]] = [("dense", None, 1.0)]
        for d in densities:
            plan = uniform_plan(identity, d, [final], block_size=64)
            variants.append((f"plan d={d}", plan, plan.density(final)))
        for name, plan in (plans or {}).items():
            plan.check_model(identity)
            variants.append((name, plan, plan.density(final)))
        for name, plan, density in variants:
            if plan is None:
                make = lambda b, n=n: filled_dynamic_cache(model, b, n)
                per_sequence = (
                    2 * config.num_hidden_layers * config.num_key_value_heads * final * head_dim * element
                )
            else:
                make = lambda b, n=n, plan=plan, final=final: filled_plan_cache(model, plan, b, n, final)
                probe = make(1)
                per_sequence = probe.memory()["allocated_bytes"]
                del probe
            for batch in batches:
                run(n, name, batch, make, plan, density)
            run(n, name, max(1, budget_bytes // per_sequence), make, plan, density, budget=True)
    return rows


def decode_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["context", "variant", "density", "batch", "ms/step", "tokens/s", "KV MiB", "RSS MiB", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["context"]),
            r["variant"],
            f"{r['density']:.3f}",
            str(r["batch"]),
            f"{r['ms_per_step']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['kv_bytes'] / 2**20:.1f}",
            f"{r['rss_bytes'] / 2**20:.0f}",
            "largest batch in the KV budget" if r["budget_row"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
