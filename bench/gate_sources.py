"""Other sources of block scores for a plan's gate heads, to tell how much of the gap between the trained
gates and the attention-mass oracle a better ranking could close, and what it would cost to compute.

A gate rule keeps, per query-block row, the sink, its local window and the best of the other blocks, as
many as its density at the length allows (:func:`moa_compress.gates.gate_selections`). Which blocks are
"best" comes from the trained gate's scores. This swaps those scores, at prefill, for one of:

* ``mean`` — the block-mean query (after RoPE) against the block-mean key: the gate's input, untrained;
* ``bound`` — the block-mean query against an upper bound of its product with every key of the block
  (per channel the larger of ``q·max k`` and ``q·min k``, the keys' channel extremes over the block, in
  the manner of Quest); training-free, about one block-level product per row;
* ``sampled:R`` — the true attention of ``R`` queries per query block (evenly spaced, the block's last
  one first) over every causal key, summed per key block: the runtime's
  :func:`moa_compress.gate_runtime.sampled_scores` (``apply_plan(..., ranking="sampled:R")``), here
  for comparison with the others;
* ``mass`` — the exact attention mass of the block, as the oracle ranks: the full score product, so a
  ceiling, not a method; ``mass-head`` ranks each query head by its own mass, as the oracle does, where
  every other source shares one ranking per KV group, as the plan's gates do.

Every source but ``mass-head`` scores per KV group (the mean over the group's query heads of mass-like
scores, the max of bound-like ones). The selection is the plan's: same blocks per row, sink and local
window forced, unless ``local`` overrides every gate head's window. Static and dense heads are untouched,
and so are decode steps and later prompt chunks (the plan's gate); a left-padded batch's prompt is ranked
row by row like an unpadded one. Used by ``bench/fidelity_layers.py`` (variants name a source in place of
``plan``: ``sampled:4@plan``) and ``bench/passkey_layers.py`` (``--selection sampled:4``).

What each source costs, against dense causal attention of one layer of the embedded model's shape
(9 query heads, 3 KV heads, head size 64) on random inputs, with the trained gate's selection beside
it (``moa-compress bench attention``'s gate row: random gate weights, the cost does not depend on them)::

    python bench/gate_sources.py --length 8192 --dtypes float32,bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from moa_compress import gate_runtime
from moa_compress.gates import gate_selections, layer_gate_heads, pooled_attention
from moa_compress.plan import num_blocks

SOURCES = ("mean", "bound", "sampled:R", "mass", "mass-head")


def is_source(name: str) -> bool:
    """Whether ``name`` is one of :data:`SOURCES` (``sampled:R`` with a whole ``R >= 1``)."""
    head, _, r = name.partition(":")
    if head == "sampled":
        return r.isdigit() and int(r) >= 1
    return name in SOURCES


def _blocks_of(x: torch.Tensor, bs: int, fill: float) -> torch.Tensor:  # [..., S, D] -> [..., nB, bs, D]
    n = x.shape[-2]
    return F.pad(x, (0, 0, 0, -n % bs), value=fill).unflatten(-2, (num_blocks(n, bs), bs))


def _block_means(x: torch.Tensor, bs: int) -> torch.Tensor:  # [..., S, D] -> [..., nB, D]
    counts = _blocks_of(torch.ones_like(x[..., :1]), bs, 0.0).sum(-2)  # [..., nB, 1]
    return _blocks_of(x, bs, 0.0).sum(-2) / counts


def bound_scores(query: torch.Tensor, key: torch.Tensor, bs: int) -> torch.Tensor:  # -> [B, Hq, nQ, nK]
    """Per query head, the block-mean query's largest possible product with any key of each key block:
    ``Σ_c max(q_c · max_k k_c, q_c · min_k k_c)`` over the block's keys (padding excluded)."""
    group = query.shape[1] // key.shape[1]
    q = _block_means(query.float(), bs)  # [B, Hq, nQ, D]
    high = _blocks_of(key.float(), bs, float("-inf")).amax(-2).repeat_interleave(group, 1)  # [B, Hq, nK, D]
    low = _blocks_of(key.float(), bs, float("inf")).amin(-2).repeat_interleave(group, 1)
    return q.clamp(min=0) @ high.transpose(-1, -2) + q.clamp(max=0) @ low.transpose(-1, -2)


def source_scores(
    source: str, query: torch.Tensor, key: torch.Tensor, scale: float, bs: int
) -> torch.Tensor:  # [B, H_gate, nB, nB] (H_gate: KV groups, or query heads for mass-head)
    """``source``'s block scores of a whole prefill (``query [B, Hq, S, D]``, ``key [B, Hkv, S, D]`` after
    RoPE), higher for blocks to keep; mass-like sources as log-probabilities."""
    hq = query.shape[1]
    hkv = key.shape[1]

    def per_group(x: torch.Tensor, how: str) -> torch.Tensor:
        x = x.unflatten(1, (hkv, hq // hkv))
        return x.mean(2) if how == "mean" else x.amax(2)

    if source == "mean":
        group = hq // hkv
        keys = _block_means(key.float(), bs).repeat_interleave(group, 1)
        return per_group(_block_means(query.float(), bs) @ keys.transpose(-1, -2), "max")
    if source == "bound":
        return per_group(bound_scores(query, key, bs), "max")
    if source in ("mass", "mass-head"):
        mass = pooled_attention(query, key, scale, bs, "sum")
        return (mass if source == "mass-head" else per_group(mass, "mean")).log()
    return gate_runtime.sampled_scores(query, key, scale, bs, int(source.partition(":")[2]))


@contextlib.contextmanager
def oracle_mass_from(samples: int):
    """Within the block, the oracles (:mod:`moa_compress.oracle`) choose from block mass estimated by
    :func:`moa_compress.allocation.sampled_head_mass` instead of the exact mass: ``oracle-layer`` so
    becomes the layer-wide allocation of the plan's pair budget that ``ranking="sampled-layer:R"``
    computes at run time."""
    from moa_compress import oracle
    from moa_compress.allocation import sampled_head_mass

    exact = oracle.block_mass
    oracle.block_mass = lambda q, k, scale, bs, slab_bytes=None: sampled_head_mass(q, k, scale, bs, samples)
    try:
        yield
    finally:
        oracle.block_mass = exact


@contextlib.contextmanager
def scored_by(source: str, local: int | None = None, layers: range | None = None):
    """Within the block, unpadded prefill calls of gate layers (of ``layers``, if given; the others keep
    the plan's gate) select by ``source`` (``"gate"``: the plan's own gate) with every gate head's local
    window ``local`` if given."""
    plain = gate_runtime.gated_attention

    def attention(plan, layer, gate, query, key, value, q_pre, k_codes, scale, backend, ranking=None):
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len != kv_len or (layers is not None and layer not in layers):  # as the plan is applied
            return plain(plan, layer, gate, query, key, value, q_pre, k_codes, scale, backend, ranking)
        bs = plan.block_size
        if source == "gate":
            scores = gate_runtime.gate_scores_for(gate, q_pre, k_codes, kv_len, bs)
        else:
            scores = source_scores(source, query, key, scale, bs)
        blocks, gate_of_head, window, tail = layer_gate_heads(plan, layer, kv_len)
        if source == "mass-head":
            gate_of_head = torch.arange(query.shape[1])
        if local is not None:
            window = torch.full_like(window, local)
        selections = gate_selections(scores, blocks, gate_of_head, window, tail)
        rows = gate_runtime.layer_block_rows(plan, layer, kv_len, q_len, selections)
        return gate_runtime.rows_attention(rows, query, key, value, bs, scale, backend)

    gate_runtime.gated_attention = attention
    try:
        yield
    finally:
        gate_runtime.gated_attention = plain


def source_times(q, k, v, density: float, repeats: int, bs: int = 64) -> tuple[float, dict[str, float]]:
    """Dense causal SDPA's seconds, and each source's scores plus selection (one layer, every head a
    gate head at ``density``) beside the trained gate's (``moa_compress.bench.gate_times``)."""
    from moa_compress.bench import best_times, gate_times

    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[3]
    blocks = torch.full((heads,), max(2, round(density * num_blocks(q.shape[2], bs))))
    gate_of_head = torch.arange(heads) // (heads // kv_heads)
    local = torch.ones(heads, dtype=torch.long)

    def select(source):
        def run():
            with torch.no_grad():
                scores = source_scores(source, q, k, d**-0.5, bs)
                return gate_selections(scores, blocks, gate_of_head, local)

        return run

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    sources = {"bound": select("bound"), **{f"sampled:{r}": select(f"sampled:{r}") for r in (1, 4, 16)}}
    times = best_times({"sdpa": sdpa, **sources}, repeats)
    gate = gate_times(q, k, v, density, repeats, times["sdpa"], bs)
    return times["sdpa"], {"trained gate": gate["gate_select_s"], **{s: times[s] for s in sources}}


def main() -> None:
    from moa_compress.bench import dtype_of

    parser = argparse.ArgumentParser(description="the cost of each gate source against dense attention")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.25, help="the gate rule's density")
    args = parser.parse_args()
    n, heads, kv_heads, d = args.length, 9, 3, 64
    print("| dtype | dense SDPA ms | source | scores + selection ms | share of dense |")
    print("|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, h, n, d, generator=g).to(dtype_of(name)) for h in (heads, kv_heads, kv_heads)
        )
        dense, times = source_times(q, k, v, args.density, args.repeats)
        for source, seconds in times.items():
            print(
                f"| {name} | {dense * 1e3:.1f} | {source} | {seconds * 1e3:.1f} | {seconds / dense:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
