"""Search: choose one rule per KV group (or query head) under a density budget at every length.

Every group picks one candidate rule of the kinds asked for (``rules``: ``static``, ``gate``,
``dense``): ``dense``; ``sink_blocks`` sink blocks plus a band of span ``S(N) = alpha + beta * N``
tokens (a grid of ``alpha`` and ``beta``); or a learned gate that keeps a fixed number of blocks per
row at a grid of target densities, never fewer than the narrowest static band keeps (:class:`GateRule`,
:func:`gate_floor`). The cost of a rule at a profiled length ``N`` is
the influence it throws away: the profile's per-block measure summed over the causal blocks it drops
(for a gate: the blocks its selection drops on each calibration sample, see :func:`gate_costs`),
divided by the whole model's causal influence at ``N`` (so costs are fractions that compare across
lengths and across rule kinds). The constraint is the plan's density (exactly :meth:`Plan.density`, exact
for gate rules too) at every target length: the profiled ones plus ``extend_lengths``, where rules are
extrapolated and only their density counts.

That is a multiple-choice knapsack with one knapsack row per length, solved as a MILP by HiGHS
(``scipy.optimize.milp``): one binary per (group, candidate), one-hot per group. Several lengths give
several objectives; weighted sums of the per-length costs give a Pareto set of plans, each of which is
checked with :meth:`Plan.density` before it is returned. With both static and gate candidates the same
problem is also solved with static rules only and with gate rules only (``alternatives``), so that
validation can check the mix against either kind alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moa_compress.errors import UserInputError
from moa_compress.plan import (
    PLAN_FILE,
    DenseRule,
    GateRule,
    Plan,
    Rule,
    StaticRule,
    atomic_write_bytes,
    describe_rule,
    group_kv_fraction,
    num_blocks,
    rule_block_mask,
    rule_density,
    rules_everywhere,
    save_plan,
)
from moa_compress.plan import provenance as make_provenance
from moa_compress.profile import Profile

PARETO_FILE = "pareto.json"
# The rule kinds a search may choose from, in the order they are listed back.
RULE_KINDS = ("static", "gate", "dense")
# Target densities of the gate candidates (the budget is added): dense enough around typical budgets
# that a group can trade a little density for a lot of kept influence, sparse enough below them.
DEFAULT_GATE_TARGETS = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 0.9)
# Local windows (blocks ending at the diagonal) a gate candidate keeps whatever its gate says: 1 is the
# diagonal alone; wider ones let the search buy "a window plus retrieved blocks" for a head.
DEFAULT_GATE_LOCALS = (1, 2, 4, 8)
DEFAULT_GATE_TAILS = (0,)
# The restricted problems solved beside the full one when both static and gate rules are allowed.
ALTERNATIVES = {"static-only": ("static", "dense"), "gate-only": ("gate", "dense")}
# Band offsets in blocks: fixed windows from one block to a few thousand tokens at block 64, and
# negative offsets so that bands growing with N (beta > 0) can start narrow at the shortest length.
DEFAULT_ALPHA_BLOCKS = (-32, -16, -8, -4, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_BETAS = tuple(i / 8 for i in range(9))
# Plan.density sums per-head densities in another order than the solver's row: allow float noise only.
DENSITY_TOLERANCE = 1e-12
# Each weight vector that emphasises one length puts this share on it, the rest spread evenly.
EMPHASIS = 0.8
# Default relative optimality gap of each weighted problem: predicted costs are estimates from a few
# calibration samples, far noisier than 0.1%, and closing the last 0.1% costs HiGHS minutes.
DEFAULT_MIP_GAP = 1e-3
# Branch-and-bound nodes HiGHS may spend on one weighted problem after the LP bound and rounding, and
# the most columns (after reduced-cost fixing) it is given: beyond ~1000 its root node alone takes
# seconds on a 2-core machine. mip_gap=0 lifts both.
NODE_LIMIT = 300
MILP_MAX_COLUMNS = 600
# Local-search moves must gain more than this, so float noise cannot make them cycle.
MIN_GAIN = 1e-15
# Most combinations of fractional groups' rules tried when rounding the LP solution.
ROUNDING_COMBINATIONS = 4096
# Rows of the pair-move gain matrix evaluated at once (bounds its memory to ~T * PAIR_CHUNK * columns).
PAIR_CHUNK = 256


class SearchError(UserInputError):
    """A search that cannot run as asked: a budget out of range or below the smallest plan, bad lengths."""


def check_rule_kinds(kinds: Iterable[str], option: str = "rules") -> tuple[str, ...]:
    """``kinds`` as a tuple in :data:`RULE_KINDS` order, or :class:`SearchError` naming ``option``: an
    unknown kind, or no sparse kind at all (``dense`` alone cannot meet a budget below 1)."""
    given = [str(k).strip() for k in kinds]
    unknown = [k for k in given if k not in RULE_KINDS]
    if unknown:
        raise SearchError(f"{option}: unknown rule kind {unknown[0]!r} (known: {', '.join(RULE_KINDS)})")
    if not {"static", "gate"} & set(given):
        raise SearchError(
            f"{option} must include static or gate (dense alone is no compression), got {given}"
        )
    return tuple(k for k in RULE_KINDS if k in given)


@dataclass(frozen=True)
class ParetoPoint:
    """One plan of the Pareto set.

    ``weights``: profiled length -> weight of its cost in the objective that produced this plan (sum 1).
    ``predicted_cost``: profiled length -> dropped ``|E|`` / total causal ``|E|`` (a fraction).
    ``density``: every target length -> ``plan.density(N)``.
    """

    plan: Plan
    weights: dict[int, float]
    predicted_cost: dict[int, float]
    density: dict[int, float]

    @property
    def mean_cost(self) -> float:
        return sum(self.predicted_cost.values()) / len(self.predicted_cost)


@dataclass(frozen=True)
class SearchResult:
    """Distinct plans, sorted by mean predicted cost (the first is the default choice), and the target
    lengths (profiled + extended) every plan's density was checked at. ``alternatives``: the optimum
    (uniform weights) of the same problem restricted to :data:`ALTERNATIVES`' rule kinds, by name
    (``"static-only"``, ``"gate-only"``), when the search had both static and gate rules and the
    restricted problem has a plan within the budget."""

    points: list[ParetoPoint]
    lengths: tuple[int, ...]
    alternatives: dict[str, ParetoPoint] = field(default_factory=dict)


def minimum_density(lengths: Sequence[int], block_size: int, sink_blocks: int = 1) -> dict[int, float]:
    """Density at each length of the smallest possible plan: every head keeps ``sink_blocks`` sink blocks
    and its diagonal block only. No plan, whatever its shape, is sparser."""
    smallest = StaticRule(sink_blocks, float(block_size), 0.0)
    return {n: rule_density(smallest, n, block_size) for n in lengths}


# ----------------------------------------------------------------------------------------------
# Candidates


# The first-order influence only sees small changes; it rates bands of a block or two as nearly free
# when, on SmolLM2-135M, they cost far more than it predicts (BENCHMARKS.md, "Compress"). Rules keep
# at least this many blocks of band unless the budget cannot afford it.
DEFAULT_MIN_SPAN_BLOCKS = 3


def default_min_span(budget: float, lengths: Sequence[int], block_size: int, sink_blocks: int = 1) -> float:
    """The narrowest band (tokens) rules may keep by default: :data:`DEFAULT_MIN_SPAN_BLOCKS` blocks, or
    fewer where a plan of such bands everywhere would not fit ``budget`` at every length (0: any)."""
    for blocks in range(DEFAULT_MIN_SPAN_BLOCKS, 0, -1):
        floor = StaticRule(sink_blocks, float(blocks * block_size), 0.0)
        if all(rule_density(floor, n, block_size) <= budget for n in lengths):
            return float(blocks * block_size)
    return 0.0


def gate_floor(min_span: float, block_size: int, sink_blocks: int = 1) -> int:
    """The fewest key blocks per row a gate candidate keeps: as many as the narrowest static rule
    allowed (``sink_blocks`` plus a band of ``min_span`` tokens), at least 2 (the sink and the diagonal).
    The first-order costs misjudge a gate row of two or three blocks as they do a band that narrow."""
    return max(2, sink_blocks + math.ceil(min_span / block_size)) if min_span > 0 else 2


def candidate_rules(
    lengths: Sequence[int],
    block_size: int,
    alphas: Sequence[float],
    betas: Sequence[float],
    sink_blocks: int = 1,
) -> list[Rule]:
    """``dense`` plus every ``StaticRule(sink_blocks, alpha, beta)`` whose span is in ``(0, N]`` at every
    length, keeping the first of rules whose block masks are identical at every length (dense first,
    then by ``beta``, then ``alpha``)."""
    rules: list[Rule] = [DenseRule()]
    for beta in sorted(set(betas)):
        for alpha in sorted(set(alphas)):
            rule = StaticRule(sink_blocks, float(alpha), float(beta))
            if all(0 < rule.span(n) <= n for n in lengths):
                rules.append(rule)
    kept: list[Rule] = []
    seen: set[tuple[bytes, ...]] = set()
    for rule in rules:
        key = tuple(_mask_digest(rule, n, block_size) for n in lengths)
        if key not in seen:
            seen.add(key)
            kept.append(rule)
    return kept


@functools.lru_cache(maxsize=4096)
def _mask_digest_of(sink: int, band: int, n: int, block_size: int) -> bytes:
    rule = StaticRule(sink, float(band * block_size), 0.0)  # the same mask at n as any rule with this band
    return hashlib.sha256(rule_block_mask(rule, n, block_size).numpy().tobytes()).digest()


def _mask_digest(rule: Rule, n: int, block_size: int) -> bytes:
    """Digest of ``rule_block_mask(rule, n, block_size)``. A static rule's mask at ``n`` depends only on
    its sink and band, so masks are built once per (sink, band) and never per grid point."""
    nb = num_blocks(n, block_size)
    if isinstance(rule, DenseRule):
        return _mask_digest_of(0, nb, n, block_size)
    return _mask_digest_of(min(rule.sink_blocks, nb), min(rule.band_blocks(n, block_size), nb), n, block_size)


def _groups(profile: Profile, per_head: bool) -> list[tuple[int, tuple[int, ...]]]:
    """(layer, query heads) of every unit that gets one rule; GQA groups are consecutive query heads.
    The model's sliding-window layers get none (plans leave them to the model)."""
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    return [
        (layer, tuple(range(start, start + size)))
        for layer in model.planned_layers
        for start in range(0, model.num_heads, size)
    ]


def _planned_rows(lost: torch.Tensor, profile: Profile, size: int) -> torch.Tensor:
    """``lost [L*H, R]`` (every layer's query heads) -> ``[groups, R]``: summed over each group's ``size``
    heads, for the groups of :func:`_groups` only."""
    model = profile.model
    per_layer = lost.reshape(model.num_layers, model.num_heads // size, size, -1).sum(2)
    return per_layer[list(model.planned_layers)].reshape(-1, per_layer.shape[-1])


# A rule that leaves a query block less than this share of its attention mass is charged as if it
# left this much: the renormalisation 1 / kept mass would otherwise grow without bound.
MIN_KEPT_MASS = 0.02

COSTS = ("net", "entry")


def cost_kind(profile: Profile, cost: str | None) -> str:
    """The per-block measure a search charges: ``cost``, or by default ``"net"`` where the profile
    recorded it (profiles written before it was did not) and ``"entry"`` otherwise."""
    if cost is None:
        return "net" if profile.net else "entry"
    if cost not in COSTS:
        raise SearchError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if cost == "net" and not profile.net:
        raise SearchError(
            "this profile has no net influence (it predates it); profile again or use cost 'entry'"
        )
    return cost


def rule_costs(
    profile: Profile,
    rules: Sequence[Rule],
    per_head: bool = False,
    renormalise: bool = True,
    cost: str | None = None,
) -> dict[int, np.ndarray]:
    """Profiled length -> float64 ``[groups, rules]``: the fraction of the model's causal influence at
    that length that each group loses with each rule (groups in :func:`_groups` order).

    ``cost`` picks the per-block measure (default: :func:`cost_kind`). ``"entry"`` is MoA's: the sum
    over the block of ``|E_ij|``, each entry's first-order effect when it alone is dropped and its row
    renormalised by ``1 / (1 - A_ij)``. It counts every entry's effect as harm, so a block whose many
    small effects have mixed signs (common in early layers, whose keys and values feed every later
    position) is charged in proportion to its number of entries. ``"net"`` is ``|sum E_ij|`` over the
    block, taken per calibration sample: the first-order loss change of dropping the block, the unit
    a rule keeps or drops. Dropping a whole set ``S`` renormalises the row by ``1 / (1 - A_S)``
    rather than entry by entry, so with ``renormalise`` (and a profile that recorded the attention mass)
    each query block's lost influence is divided by the mean mass its rows keep under the rule, at
    least :data:`MIN_KEPT_MASS`. Without it the cost is the plain sum over dropped blocks, which
    underrates rules that keep little of a head's mass.
    """
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    bs = profile.block_size
    maps = profile.net if cost_kind(profile, cost) == "net" else profile.influence
    costs: dict[int, np.ndarray] = {}
    for n in profile.lengths:
        nb = num_blocks(n, bs)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        influence = maps[n].double() * causal  # [L, H, nB, nB]
        dropped = torch.stack([causal & ~rule_block_mask(r, n, bs) for r in rules]).double()  # [R, nB, nB]
        heads = influence.reshape(-1, nb, nb)  # [L*H, nB, nB]
        if renormalise and profile.mass:
            rows = torch.full((nb,), float(bs), dtype=torch.float64)
            rows[-1] = n - (nb - 1) * bs  # a ragged last block has fewer rows
            lost_mass = torch.einsum("uqk,rqk->urq", profile.mass[n].double().reshape(-1, nb, nb), dropped)
            kept = (1.0 - lost_mass / rows).clamp_(min=MIN_KEPT_MASS)  # [L*H, R, nB] mean kept mass per row
            lost = (torch.einsum("uqk,rqk->urq", heads, dropped) / kept).sum(-1)  # [L*H, R]
        else:
            lost = heads.reshape(-1, nb * nb) @ dropped.reshape(len(rules), nb * nb).T  # [L*H, R]
        grouped = _planned_rows(lost, profile, size)  # [groups, R]
        total = float(influence.sum())
        costs[n] = (grouped / total).numpy() if total > 0 else np.zeros(tuple(grouped.shape))
    return costs


def gate_candidates(
    lengths: Sequence[int],
    block_size: int,
    targets: Sequence[float],
    locals_: Sequence[int] = (1,),
    min_blocks: int = 2,
    tails: Sequence[int] = (0,),
) -> list[GateRule]:
    """``GateRule(t, l, min_blocks, tail)`` for every target ``t`` in (0, 1], local window ``l`` (blocks,
    >= 1) and dense tail ``tail`` (rows, >= 0), smallest first, keeping the first of rules that keep the
    same blocks per row, the same window and the same tail at every length, and dropping those that keep
    every block at every length (``dense`` does that) and those whose window leaves the gate no block to
    choose at any length (a fixed band: ``static`` does that, with a smaller cache). ``min_blocks``: the
    fewest blocks any row keeps (:func:`gate_floor`)."""
    everything = tuple((num_blocks(n, block_size), 1, 0) for n in lengths)
    kept: list[GateRule] = []
    seen: set[tuple[tuple[int, int, int], ...]] = {everything}
    if not locals_ or any(isinstance(w, bool) or int(w) != w or w < 1 for w in locals_):
        raise SearchError(f"gate local windows must be whole numbers of blocks >= 1, got {list(locals_)}")
    if not tails or any(isinstance(t, bool) or int(t) != t or t < 0 for t in tails):
        raise SearchError(f"gate tails must be whole numbers of rows >= 0, got {list(tails)}")
    for target in sorted({float(t) for t in targets}):
        if not 0.0 < target <= 1.0:
            raise SearchError(f"gate targets must lie in (0, 1], got {target}")
        for local in sorted({int(w) for w in locals_}):
            for tail in sorted({int(t) for t in tails}):
                rule = GateRule(target, local, max(2, int(min_blocks)), tail)
                shape = []
                for n in lengths:
                    keep = rule.blocks_per_row(n, block_size)  # at most the row count (GateRule caps it)
                    rows = num_blocks(n, block_size)
                    shape.append(
                        (rows, 1, 0)  # every block of every row: dense's shape
                        if keep >= rows or tail >= rows
                        else (keep, rule.local_blocks(n, block_size), tail)
                    )
                key = tuple(shape)
                gated = any(keep - window > 1 for keep, window, _ in key)  # some block left for the gate
                if key not in seen and (local == 1 or gated):
                    seen.add(key)
                    kept.append(rule)
    return kept


@dataclass(frozen=True)
class SampleMaps:
    """One calibration sample of length ``N``, as the profile and the gates saw it.

    ``maps``: ``"influence"``, ``"mass"`` and ``"net"`` -> float32 ``[layers, query_heads, nB, nB]``, the
    sample's own block maps (:func:`moa_compress.profile.profile_model` averages them into the profile);
    ``q_blocks[layer]`` ``[Hq, nB, D]`` and ``k_blocks[layer]`` ``[Hkv, nB, 3·D]``: its pooled pre-RoPE
    queries and keys, the gates' inputs (:func:`moa_compress.gates.sample_targets`).
    """

    maps: Mapping[str, torch.Tensor]
    q_blocks: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]  # indexed by layer
    k_blocks: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]
    # [Hkv, nB, nB] per layer: the block scores of a prompt ranking by sampled queries
    # (moa_compress.gate_runtime.sample_rankings), when the search costs gate rules under it
    sampled: Mapping[int, torch.Tensor] | None = None


def gate_costs(
    profile: Profile,
    gates: Sequence[Any],
    samples: Mapping[int, Iterable[SampleMaps]],
    rules: Sequence[GateRule],
    per_head: bool = False,
    renormalise: bool = True,
    cost: str | None = None,
    *,
    sample_gates: Mapping[int, Sequence[Sequence[Any]]] | None = None,
    ranking: Any = None,
) -> dict[int, np.ndarray]:
    """Profiled length -> float64 ``[groups, rules]``: the fraction of the model's causal influence at
    that length that each group loses with each gate rule, in the unit :func:`rule_costs` charges static
    rules, so the two compare.

    ``sample_gates[N][i]``: the per-layer gates that select sample ``i``'s blocks at ``N`` instead of
    ``gates`` — gates trained without that sample (:func:`moa_compress.gates.train_gates` with
    ``folds``), so a gate rule is charged what it drops on text its gates did not fit, as a static rule
    (fitted to nothing) is.

    A gate's blocks depend on the input, so the cost is taken sample by sample: on each calibration
    sample ``s`` (``samples[N]``, iterated once, in the profile's sample order, ``profile.samples[N]`` of
    them) the layer's gate (``gates[layer]``, an :class:`moa_compress.gates.AttnGate`) scores the
    sample's pooled queries and keys, and every query head keeps ``rule.blocks_per_row(N)`` blocks per
    row (:func:`moa_compress.gates.gate_selections`). The head loses, for each query-block row, the
    sample's per-block measure (``cost``: ``net`` or ``entry``, see :func:`rule_costs`) summed over the
    causal blocks it drops, divided (with ``renormalise`` and a profile with attention mass) by the mean
    mass the row's queries keep on that sample, at least :data:`MIN_KEPT_MASS`. The cost is the mean
    over samples of that loss summed over rows and the group's heads, divided by the model's total of the
    same measure in the profile at ``N`` (the mean over samples, as :func:`rule_costs` divides by).

    ``ranking`` (a :class:`moa_compress.gate_runtime.PrefillRanking`): in the layers it ranks, the blocks
    are chosen from each sample's ``sampled`` scores (its KV group's, for every head of the group), as
    the runtime ranks a prompt, instead of the gates'.

    Batched over heads, rows and rules; loops run over lengths, samples and layers only.
    """
    from moa_compress.gates import gate_selections

    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    bs = profile.block_size
    name = "net" if cost_kind(profile, cost) == "net" else "influence"
    means = profile.net if name == "net" else profile.influence
    renormalise = renormalise and bool(profile.mass)
    heads = model.num_heads
    per_query = bool(getattr(gates[0], "per_query_head", False)) if len(gates) else False
    group_of_head = torch.arange(heads) // (heads // model.num_kv_heads)
    gate_of_head = torch.arange(heads) if per_query else group_of_head
    ranked = {i for i in model.planned_layers if ranking is not None and ranking.ranks(i)}
    for n in profile.lengths if sample_gates is not None else ():
        given = sample_gates.get(n, ())
        if len(given) != profile.samples[n] or any(len(chosen) != model.num_layers for chosen in given):
            raise SearchError(
                f"cost gates at {n} tokens: {len(given)} set(s) of {[len(c) for c in given]} layer gates, "
                f"the profile has {profile.samples[n]} sample(s) and {model.num_layers} layers"
            )
    costs: dict[int, np.ndarray] = {}
    for n in profile.lengths:
        nb = num_blocks(n, bs)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        rows = torch.full((nb,), float(bs), dtype=torch.float64)
        rows[-1] = n - (nb - 1) * bs  # a ragged last block has fewer rows
        blocks = torch.tensor([r.blocks_per_row(n, bs) for r in rules], dtype=torch.long)  # [R]
        windows = torch.tensor([r.local for r in rules], dtype=torch.long)  # [R]
        tails = torch.tensor([r.tail for r in rules], dtype=torch.long)  # [R]
        # Every rule's selection at once: the query heads repeated once per rule.
        tiled_blocks = blocks.repeat_interleave(heads)  # [R*H]
        tiled_gates = gate_of_head.repeat(len(rules))  # [R*H]
        tiled_groups = group_of_head.repeat(len(rules))  # [R*H]: a sampled ranking's scores are per group
        tiled_windows = windows.repeat_interleave(heads)  # [R*H]
        tiled_tails = tails.repeat_interleave(heads)  # [R*H]
        lost = torch.zeros(model.num_layers, len(rules), heads, dtype=torch.float64)  # [L, R, H]
        count = 0
        for sample in samples[n]:
            count += 1
            chosen = gates if sample_gates is None else sample_gates[n][count - 1]
            measure, mass = sample.maps[name], sample.maps.get("mass")
            if tuple(measure.shape) != (model.num_layers, heads, nb, nb):
                raise SearchError(
                    f"calibration sample {count} at {n} tokens has maps of shape {list(measure.shape)}, "
                    f"the profile {[model.num_layers, heads, nb, nb]}"
                )
            if ranked and sample.sampled is None:
                raise SearchError(
                    f"calibration sample {count} at {n} tokens has no sampled-query scores to cost the "
                    f"ranking {ranking.describe()}"
                )
            for layer in model.planned_layers:
                if layer in ranked:
                    scores, followed = sample.sampled[layer][None].float(), tiled_groups  # [1, Hkv, nB, nB]
                else:
                    with torch.no_grad():
                        scores = chosen[layer](
                            sample.q_blocks[layer][None].float(), sample.k_blocks[layer][None].float()
                        )  # [1, Hg, nB, nB]
                    followed = tiled_gates
                keep = gate_selections(scores, tiled_blocks, followed, tiled_windows, tiled_tails)[0]
                keep = keep.view(len(rules), heads, nb, nb)
                dropped = (causal & ~keep).double()  # [R, H, nB, nB]
                values = measure[layer].double() * causal  # [H, nB, nB]
                per_row = torch.einsum("hqk,rhqk->rhq", values, dropped)  # [R, H, nB]
                if renormalise:
                    lost_mass = torch.einsum("hqk,rhqk->rhq", mass[layer].double(), dropped)
                    per_row = per_row / (1.0 - lost_mass / rows).clamp_(min=MIN_KEPT_MASS)
                lost[layer] += per_row.sum(-1)
        if count != profile.samples[n]:
            raise SearchError(
                f"gate costs at {n} tokens got {count} calibration samples, the profile averages "
                f"{profile.samples[n]}"
            )
        grouped = _planned_rows(lost.permute(0, 2, 1).reshape(-1, len(rules)), profile, size) / count
        total = float((means[n].double() * causal).sum())
        costs[n] = (grouped / total).numpy() if total > 0 else np.zeros(tuple(grouped.shape))
    return costs


# ----------------------------------------------------------------------------------------------
# Weights of the Pareto set


def pareto_weights(lengths: Sequence[int], count: int) -> list[dict[int, float]]:
    """Up to ``count`` distinct weight vectors over ``lengths``: uniform, then each length emphasised,
    then points of ever finer lattices on the simplex. Deterministic."""
    k = len(lengths)
    vectors: list[tuple[float, ...]] = [tuple(1.0 / k for _ in range(k))]
    if k > 1:
        for i in range(k):
            vectors.append(tuple(EMPHASIS if j == i else (1 - EMPHASIS) / (k - 1) for j in range(k)))
        steps = 2
        # Lattice points sum to ``steps``; with count bounded the loop ends once enough are found.
        while len(vectors) < count and steps <= 64:
            for combo in itertools.product(range(steps + 1), repeat=k):
                if sum(combo) == steps:
                    vec = tuple(c / steps for c in combo)
                    if all(not np.allclose(vec, v) for v in vectors):
                        vectors.append(vec)
            steps += 1
    return [dict(zip(lengths, vec, strict=True)) for vec in vectors[: max(1, count)]]


# ----------------------------------------------------------------------------------------------
# The solver


@dataclass(frozen=True)
class _Solution:
    choice: np.ndarray  # [groups] rule index per group
    cost: float  # objective of ``choice``
    bound: float  # proven lower bound on the optimum
    optimal: bool  # within the requested gap of the bound


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: HiGHS's MIP code prints debug lines from C++ straight to it
    even with ``disp=False``, which would corrupt the CLI's ``--json`` output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (an embedding host): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _greedy(objective: np.ndarray, shares: np.ndarray, limits: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Best-improvement local search from a feasible ``choice``: switch one group at a time to the rule
    that lowers the objective most while every length stays within ``limits``."""
    rows = np.arange(len(choice))
    while True:
        current = shares[:, rows, choice]  # [T, groups]
        # Density at each length if group g switched to rule r: [T, groups, rules]
        switched = current.sum(1)[:, None, None] + shares - current[:, :, None]
        gain = objective[rows, choice][:, None] - objective  # [groups, rules]
        gain[~(switched <= limits[:, None, None]).all(0)] = 0.0
        group, rule = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[group, rule] <= MIN_GAIN:
            return choice
        choice = choice.copy()
        choice[group] = rule


def _pair_moves(
    objective: np.ndarray, shares: np.ndarray, limits: np.ndarray, choice: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """Local search by two simultaneous switches (one group gives up density that another spends),
    each alternating with :func:`_greedy`, among ``columns`` (flat ``group * rules + rule`` indices)."""
    rules = objective.shape[1]
    col_group, col_rule = columns // rules, columns % rules
    while True:
        rows = np.arange(len(choice))
        used = shares[:, rows, choice].sum(1)  # [T]
        delta = shares[:, col_group, col_rule] - shares[:, col_group, choice[col_group]]  # [T, K]
        gain = objective[col_group, choice[col_group]] - objective[col_group, col_rule]  # [K]
        best, move = MIN_GAIN, None
        for start in range(0, len(columns), PAIR_CHUNK):
            part = slice(start, start + PAIR_CHUNK)
            fits = (
                (used[:, None, None] + delta[:, part, None] + delta[:, None, :]) <= limits[:, None, None]
            ).all(0)
            total = gain[part, None] + gain[None, :]  # [chunk, K]
            total[~fits | (col_group[part, None] == col_group[None, :])] = 0.0
            i, j = np.unravel_index(np.argmax(total), total.shape)
            if total[i, j] > best:
                best, move = total[i, j], (start + i, j)
        if move is None:
            return choice
        choice = choice.copy()
        choice[col_group[list(move)]] = col_rule[list(move)]
        choice = _greedy(objective, shares, limits, choice)


def _round(objective: np.ndarray, shares: np.ndarray, limits: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """A feasible integer choice near the LP solution ``x [groups, rules]``. A basic LP solution has at
    most one fractional group per length; each takes one of its fractional rules or the sparsest rule,
    whichever combination fits and costs least."""
    choice = x.argmax(1)
    fractional = [g for g in range(len(x)) if x[g].max() < 1 - 1e-9]
    sparsest = int(np.argmin(shares.sum((0, 1))))
    options = [sorted({*np.flatnonzero(x[g] > 1e-9).tolist(), sparsest}) for g in fractional]
    if math.prod(len(o) for o in options) > ROUNDING_COMBINATIONS:  # not a basic solution: play safe
        options = [[sparsest] for _ in fractional]
    best = None
    for combo in itertools.product(*options):
        trial = choice.copy()
        trial[fractional] = combo
        if (shares[:, np.arange(len(trial)), trial].sum(1) <= limits).all():
            value = objective[np.arange(len(trial)), trial].sum()
            if best is None or value < best[0]:
                best = (value, trial)
    return None if best is None else best[1]


def _solve(
    objective: np.ndarray,  # [groups, rules]
    shares: np.ndarray,  # [T, groups, rules] each choice's share of the plan density at each length
    limits: np.ndarray,  # [T] right-hand sides (the budget, maybe tightened)
    mip_gap: float,
    time_limit: float,
) -> _Solution | None:
    """Minimise the objective with one rule per group under the density rows; None if infeasible.

    HiGHS's branch and bound alone needs minutes here (thousands of nearly tied columns), so: solve the
    LP relaxation (its optimum bounds the MILP's), round it and improve greedily; stop if that is within
    ``mip_gap`` of the bound, else drop every column whose LP reduced cost exceeds the remaining gap (it
    cannot be in a better solution) and let HiGHS finish the smaller MILP.
    """
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp
    from scipy.sparse import csr_matrix, kron

    groups, rules = objective.shape
    cost = objective.reshape(-1)
    one_hot = kron(np.eye(groups), np.ones((1, rules)), format="csr")  # [groups, groups*rules]
    density_rows = csr_matrix(shares.reshape(len(limits), groups * rules))
    with _stdout_silenced():
        lp = linprog(
            cost,
            A_ub=density_rows,
            b_ub=limits,
            A_eq=one_hot,
            b_eq=np.ones(groups),
            bounds=(0, 1),
            method="highs",
        )
    if lp.status == 2:
        return None
    if lp.status != 0:
        raise RuntimeError(f"the LP relaxation of the search failed: {lp.message}")
    bound = float(lp.fun)
    rows = np.arange(groups)
    x = lp.x.reshape(groups, rules)
    choice = _round(objective, shares, limits, x)
    if choice is not None:
        choice = _greedy(objective, shares, limits, choice)
        best = float(objective[rows, choice].sum())
        if best - bound <= mip_gap * abs(best):
            return _Solution(choice, best, bound, True)
        # Any solution that uses column j costs at least bound + reduced_cost[j] (LP duality), so only
        # columns with reduced cost within the gap can improve on ``choice``.
        reduced = cost - density_rows.T @ lp.ineqlin.marginals - one_hot.T @ lp.eqlin.marginals
        keep = reduced <= best - bound + 1e-12
        keep[rows * rules + choice] = True
        choice = _pair_moves(objective, shares, limits, choice, np.flatnonzero(keep))
        best = float(objective[rows, choice].sum())
        if best - bound <= mip_gap * abs(best):
            return _Solution(choice, best, bound, True)
        keep = reduced <= best - bound + 1e-12
        keep[rows * rules + choice] = True
        if mip_gap > 0 and keep.sum() > MILP_MAX_COLUMNS:
            # The rest of the gap is mostly the LP bound's weakness: HiGHS would spend seconds per
            # weight proving little. The plan is returned with its proven gap.
            return _Solution(choice, best, bound, False)
    else:  # rounding found nothing feasible (a grid without a rule sparser than the others): full MILP
        keep = np.ones(groups * rules, dtype=bool)
    with _stdout_silenced():
        result = milp(
            c=cost[keep],
            integrality=np.ones(int(keep.sum())),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_hot[:, keep], 1, 1),
                LinearConstraint(density_rows[:, keep], -np.inf, limits),
            ],
            # A node limit, not the clock, ends a hard solve, so that results do not depend on speed;
            # time_limit is only a backstop. mip_gap 0 asks for the proven optimum: no node limit.
            options={
                "disp": False,
                "mip_rel_gap": mip_gap,
                "time_limit": time_limit,
                **({"node_limit": NODE_LIMIT} if mip_gap > 0 else {}),
            },
        )
    if result.x is not None:
        columns = np.flatnonzero(keep)[np.round(result.x) > 0.5]
        found = np.empty(groups, dtype=np.int64)
        found[columns // rules] = columns % rules
        value = float(objective[rows, found].sum())
        if choice is None or value < best:
            choice, best = found, value
        bound = max(bound, float(getattr(result, "mip_dual_bound", bound) or bound))
    if choice is None:
        if result.status == 2:
            return None
        raise SearchError(
            f"the solver found no plan ({result.message}); allow a longer time_limit than {time_limit}s"
        )
    return _Solution(choice, best, bound, best - bound <= mip_gap * abs(best) + 1e-12)


def _build_plan(
    profile: Profile,
    groups: Sequence[tuple[int, tuple[int, ...]]],
    rules: Sequence[Rule],
    choice: np.ndarray,
    budget: float,
    lengths: tuple[int, ...],
    gate_weights: tuple[Any, Mapping[str, torch.Tensor]] | None = None,
) -> Plan:
    """The plan of ``choice`` (a rule index per group). ``gate_weights``: ``(GateConfig, tensors)`` of
    every layer's gate; a plan with gate rules carries those of the layers that use them."""
    table = [list(heads) for heads in rules_everywhere(profile.model, DenseRule())]
    for (layer, heads), index in zip(groups, choice, strict=True):
        for head in heads:
            table[layer][head] = rules[int(index)]
    rows = tuple(tuple(row) for row in table)
    gated = tuple(i for i, heads in enumerate(rows) if any(r.input_dependent for r in heads))
    gates, tensors = None, {}
    if gated:
        config, weights = gate_weights
        gates = dataclasses.replace(config, layers=gated)
        tensors = {
            name: tensor
            for name, tensor in weights.items()
            if int(name.split(".")[1]) in gated  # gates.{layer}.{q_proj|k_proj}
        }
    return Plan(
        model=profile.model,
        rules=rows,
        block_size=profile.block_size,
        budget=budget,
        lengths=lengths,
        tensors=tensors,
        gates=gates,
    )


def search_plan(
    profile: Profile,
    budget: float,
    *,
    extend_lengths: Sequence[int] = (),
    per_head: bool = False,
    rules: Sequence[str] | None = None,
    gates: Sequence[Any] | None = None,
    gate_samples: Mapping[int, Iterable[SampleMaps]] | None = None,
    cost_gates: Mapping[int, Sequence[Sequence[Any]]] | None = None,
    gate_targets: Sequence[float] | None = None,
    gate_locals: Sequence[int] | None = None,
    gate_tails: Sequence[int] | None = None,
    kv_budget: float | None = None,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    sink_blocks: int = 1,
    pareto_size: int = 7,
    time_limit: float = 60.0,
    mip_gap: float = DEFAULT_MIP_GAP,
    renormalise: bool = True,
    min_span: float | None = None,
    cost: str | None = None,
    progress: bool = False,
    provenance: Mapping[str, Any] | None = None,
    ranking: Any = None,
) -> SearchResult:
    """Pareto set of plans with density <= ``budget`` at every profiled and extended length.

    ``rules``: the rule kinds to choose from (:data:`RULE_KINDS`; default all three with ``gates``,
    else static and dense). Gate candidates need ``gates`` (one trained
    :class:`moa_compress.gates.AttnGate` per layer) and ``gate_samples`` (the profile's calibration
    samples, see :func:`gate_costs`; ``cost_gates``: per sample, the gates to cost it with instead, e.g.
    gates that never saw it); ``gate_targets`` are their target densities (default
    :data:`DEFAULT_GATE_TARGETS` plus the budget), each with every local window of ``gate_locals``
    (blocks ending at the diagonal kept whatever the gate says; default :data:`DEFAULT_GATE_LOCALS`) and
    every dense tail of ``gate_tails`` (last query-block rows that keep every block, see
    :attr:`GateRule.tail`; default :data:`DEFAULT_GATE_TAILS`). Plans with gate rules carry the gates of
    the layers that use them. ``alphas`` in tokens (default: :data:`DEFAULT_ALPHA_BLOCKS` times the block size),
    ``betas`` in [0, 1] (default: steps of 1/8). One rule per KV group, or per query head with
    ``per_head``. ``pareto_size`` weight vectors over the profiled lengths' costs are solved, each to
    within ``mip_gap`` (relative) of its optimum (0: exactly), all together in about ``time_limit``
    seconds at most; distinct plans are returned sorted by mean predicted cost. With static and gate
    rules, the uniformly weighted problem is also solved with each kind alone (plus dense), giving
    :attr:`SearchResult.alternatives`. ``renormalise``: charge each rule for the row renormalisation its
    whole dropped set causes (see :func:`rule_costs`). ``min_span``: the narrowest band (tokens, at every
    target length) a static rule may keep, and so the fewest blocks per row of a gate rule
    (:func:`gate_floor`); None picks :func:`default_min_span`, 0 allows any. ``cost``:
    the per-block measure (see :func:`rule_costs`; default :func:`cost_kind`). ``kv_budget``: also keep
    the decode cache at the longest target length within this fraction of a dense cache's keys
    (:meth:`Plan.kv_fraction`: gate and dense heads hold every key, static ones their sink and band);
    one more row of the same MILP, for plans with one rule per KV group. ``provenance`` is the base of
    each plan's provenance (default: tool and time). ``ranking`` (a
    :class:`moa_compress.gate_runtime.PrefillRanking`): gate rules are costed under that prompt ranking
    (the samples' ``sampled`` scores, see :func:`gate_costs`) and the plans carry it.
    """
    from moa_compress.data import progress_steps

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise SearchError(f"budget must be in (0, 1], got {budget}")
    if any(int(n) != n or n <= 0 for n in extend_lengths):
        raise SearchError(f"extend lengths must be positive integers, got {list(extend_lengths)}")
    if sink_blocks < 0:
        raise SearchError(f"sink_blocks must be >= 0, got {sink_blocks}")
    if pareto_size < 1:
        raise SearchError(f"pareto_size must be at least 1, got {pareto_size}")
    if not mip_gap >= 0.0 or not time_limit > 0.0:
        raise SearchError(f"mip_gap must be >= 0 and time_limit > 0, got {mip_gap} and {time_limit}")
    kinds = check_rule_kinds(
        rules if rules is not None else RULE_KINDS if gates is not None else ("static", "dense")
    )
    if "gate" in kinds and (gates is None or gate_samples is None):
        raise SearchError(
            "gate rules need the trained gates and the calibration samples' maps (gate_samples)"
        )
    if "gate" in kinds and len(gates) != profile.model.num_layers:
        raise SearchError(
            f"gate rules need one gate per layer ({profile.model.num_layers}), got {len(gates)}"
        )
    if kv_budget is not None:
        if (
            isinstance(kv_budget, bool)
            or not isinstance(kv_budget, (int, float))
            or not 0.0 < kv_budget <= 1.0
        ):
            raise SearchError(f"kv_budget must be in (0, 1], got {kv_budget}")
        if per_head:
            raise SearchError(
                "kv_budget needs one rule per KV group (a KV head's cache serves all its query heads); "
                "drop per_head"
            )
        kv_budget = float(kv_budget)
    cost = cost_kind(profile, cost)
    block = profile.block_size
    alphas = [a * block for a in DEFAULT_ALPHA_BLOCKS] if alphas is None else list(alphas)
    betas = list(DEFAULT_BETAS) if betas is None else list(betas)
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise SearchError(f"alphas must be finite numbers of tokens, got {alphas}")
    if not betas or not all(0.0 <= b <= 1.0 for b in betas):
        raise SearchError(f"betas must lie in [0, 1], got {betas}")
    targets = sorted({*(DEFAULT_GATE_TARGETS if gate_targets is None else gate_targets), float(budget)})
    windows = list(DEFAULT_GATE_LOCALS if gate_locals is None else gate_locals)  # gate_candidates checks
    tails = list(DEFAULT_GATE_TAILS if gate_tails is None else gate_tails)
    profiled = profile.lengths
    lengths = tuple(sorted(set(profiled) | {int(n) for n in extend_lengths}))
    smallest = minimum_density(lengths, block, sink_blocks)
    worst = max(smallest, key=smallest.__getitem__)
    if budget < smallest[worst] - DENSITY_TOLERANCE:
        raise SearchError(
            f"budget {budget} is below the smallest possible plan ({sink_blocks} sink block(s) + the "
            f"diagonal block for every head): density {smallest[worst]:.4f} at {worst} tokens"
        )
    if min_span is None:
        min_span = default_min_span(budget, lengths, block, sink_blocks)
    if not math.isfinite(min_span) or min_span < 0:
        raise SearchError(f"min_span must be a number of tokens >= 0, got {min_span}")
    if budget < 1.0 and min_span > 0:  # gate rules keep the same floor (gate_floor)
        floor = StaticRule(sink_blocks, float(min_span), 0.0)
        over = [(n, d) for n in lengths if (d := rule_density(floor, n, block)) > budget]
        if over:
            n, density = over[0]
            raise SearchError(
                f"budget {budget} is below the sparsest plan with bands of at least {min_span:g} tokens "
                f"(density {density:.4f} at {n} tokens); lower min_span"
            )
    groups = _groups(profile, per_head)
    rows = np.arange(len(groups))
    gate_weights = None
    if "gate" in kinds:
        from moa_compress.gates import gates_to_plan_tensors

        config, tensors = gates_to_plan_tensors(gates, range(profile.model.num_layers))
        if ranking is not None and ranking.samples:  # the plans rank prompts as their gate rules were costed
            layers = None if ranking.layers is None else tuple(sorted(ranking.layers))
            config = dataclasses.replace(config, ranking_samples=ranking.samples, ranking_layers=layers)
        gate_weights = config, tensors

    solutions: list[tuple[dict[int, float], _Solution]] = []
    alternative_solutions: dict[str, tuple[dict[int, float], _Solution]] = {}
    if budget >= 1.0 and "dense" in kinds and (kv_budget is None or kv_budget >= 1.0):  # nothing to trade
        candidates: list[Rule] = [DenseRule()]
        costs = {n: np.zeros((len(groups), 1)) for n in profiled}
        solutions.append(
            (pareto_weights(profiled, 1)[0], _Solution(np.zeros(len(groups), int), 0.0, 0.0, True))
        )
    else:
        candidates = []
        if "dense" in kinds:
            candidates.append(DenseRule())
        if "static" in kinds:
            candidates += [
                r
                for r in candidate_rules(lengths, block, alphas, betas, sink_blocks)
                if not isinstance(r, DenseRule) and all(r.span(n) >= min_span for n in lengths)
            ]
        costs = rule_costs(profile, candidates, per_head, renormalise, cost) if candidates else {}
        if "gate" in kinds:
            gate_rules = gate_candidates(
                lengths, block, targets, windows, gate_floor(min_span, block, sink_blocks), tails
            )
            extra = gate_costs(
                profile, gates, gate_samples, gate_rules, per_head, renormalise, cost, sample_gates=cost_gates,
                ranking=ranking,
            )  # fmt: skip
            candidates += gate_rules
            costs = {
                n: np.concatenate([costs[n], extra[n]], axis=1) if n in costs else extra[n] for n in profiled
            }
        densities = np.array([[rule_density(r, n, block) for r in candidates] for n in lengths])  # [T, R]
        sizes = np.array([len(heads) for _, heads in groups], dtype=np.float64)  # [groups]
        total_heads = len(profile.model.planned_layers) * profile.model.num_heads  # Plan.density's count
        shares = densities[:, None, :] * sizes[None, :, None] / total_heads  # [T, groups, R]
        limits = np.full(len(lengths), float(budget))
        if kv_budget is not None:  # one more row: the decode cache's keys at the longest length
            kv = np.array([group_kv_fraction([r], lengths[-1], block) for r in candidates])  # [R]
            kv_shares = np.broadcast_to(kv / len(groups), (1, len(groups), len(candidates)))
            shares = np.concatenate([shares, kv_shares])  # [T + 1, groups, R]
            limits = np.append(limits, kv_budget)
        weight_list = pareto_weights(profiled, pareto_size)

        def solve(weights: Mapping[int, float], columns: np.ndarray, limit: float) -> _Solution:
            """The weighted problem over the candidate ``columns`` only; choices index all candidates."""
            objective = sum(w * costs[n][:, columns] for n, w in weights.items())  # [groups, R']
            subset = [candidates[int(c)] for c in columns]

            def check(choice: np.ndarray) -> np.ndarray:  # each row's measured value, as limits
                plan = _build_plan(profile, groups, subset, choice, budget, lengths, gate_weights)
                measured = [plan.density(n) for n in lengths]
                return np.array(measured + ([plan.kv_fraction(lengths[-1])] if kv_budget is not None else []))

            solved = _solve_within_budget(
                objective, shares[:, :, columns], limits, check, mip_gap, limit, kv_budget is not None
            )
            return dataclasses.replace(solved, choice=columns[solved.choice])

        restricted = {}
        if {"static", "gate"} <= set(kinds):
            restricted = {
                name: np.flatnonzero([r.kind in allowed for r in candidates])
                for name, allowed in ALTERNATIVES.items()
            }
        everything = np.arange(len(candidates))
        steps = len(weight_list) + len(restricted)
        with progress_steps(progress, steps, "search") as step:
            for i, weights in enumerate(weight_list):
                solutions.append((weights, solve(weights, everything, time_limit / steps)))
                step(f"search: weights {i + 1}/{len(weight_list)}")
            for name, columns in restricted.items():
                try:
                    alternative_solutions[name] = (
                        weight_list[0],
                        solve(weight_list[0], columns, time_limit / steps),
                    )
                except SearchError:  # that kind alone cannot meet the budget: nothing to compare
                    pass
                step(f"search: {name}")

    def plan_of(solved: _Solution) -> Plan:
        return _build_plan(profile, groups, candidates, solved.choice, budget, lengths, gate_weights)

    found: list[tuple[dict[int, float], _Solution, Plan]] = []
    seen: set[tuple] = set()
    for weights, solved in solutions:
        plan = plan_of(solved)
        if plan.rules not in seen:
            seen.add(plan.rules)
            found.append((weights, solved, plan))
    alternatives = [(name, w, s, plan_of(s)) for name, (w, s) in alternative_solutions.items()]
    cost_of = [{n: float(costs[n][rows, s.choice].sum()) for n in profiled} for _, s, _ in found]
    density_of = [{n: plan.density(n) for n in lengths} for _, _, plan in found]
    for _, _, _, plan in alternatives:
        density_of_alt = {n: plan.density(n) for n in lengths}
        if any(d > budget + DENSITY_TOLERANCE for d in density_of_alt.values()):
            raise RuntimeError(f"search produced a plan over budget {budget}: {density_of_alt}")
    for density in density_of:
        over = {n: d for n, d in density.items() if d > budget + DENSITY_TOLERANCE}
        if over:  # _solve_within_budget rules this out: a plan over budget is a bug, never a result
            raise RuntimeError(f"search produced a plan over budget {budget}: {over}")
    if kv_budget is not None:
        for plan in [p for _, _, p in found] + [p for _, _, _, p in alternatives]:
            if plan.kv_fraction(lengths[-1]) > kv_budget + DENSITY_TOLERANCE:  # as above: a bug
                raise RuntimeError(f"search produced a plan over kv_budget {kv_budget}")
    # Sorted by mean cost; the weight order (uniform first) breaks ties.
    order = sorted(range(len(found)), key=lambda i: (sum(cost_of[i].values()) / len(profiled), i))

    pareto = [
        {
            "density": {str(n): d for n, d in density_of[i].items()},
            **({"kv_fraction": found[i][2].kv_fraction(lengths[-1])} if kv_budget is not None else {}),
            "predicted_cost": {str(n): c for n, c in cost_of[i].items()},
            "weights": {str(n): w for n, w in found[i][0].items()},
            "chosen": False,
        }
        for i in order
    ]
    gate_count = sum(isinstance(r, GateRule) for r in candidates)
    settings = {
        "budget": budget,
        "lengths": list(lengths),
        "profiled_lengths": list(profiled),
        "extend_lengths": sorted({int(n) for n in extend_lengths}),
        "per_head": per_head,
        "rules": list(kinds),
        "sink_blocks": sink_blocks,
        "alphas": [float(a) for a in alphas],
        "betas": [float(b) for b in betas],
        **({"gate_targets": targets, "gate_locals": windows, "gate_tails": tails} if "gate" in kinds else {}),
        "candidates": len(candidates),
        "gate_candidates": gate_count,
        **({"gate_costs": "cross-fitted" if cost_gates is not None else "in-sample"} if gate_count else {}),
        "pareto_size": pareto_size,
        "mip_gap": mip_gap,
        "cost": cost + (", renormalised" if renormalise and profile.mass else ", additive"),
        "min_span": float(min_span),
        **({"kv_budget": kv_budget, "kv_length": lengths[-1]} if kv_budget is not None else {}),
        "solver": "scipy.optimize.milp (HiGHS) after its LP relaxation",
    }
    profile_record = {
        key: profile.provenance[key]
        for key in ("data", "mode", "seed", "answer_tokens", "dtype", "data_digest", "model_weights")
        if key in profile.provenance
    }
    profile_record["samples"] = {str(n): profile.samples[n] for n in profiled}
    base = dict(provenance) if provenance is not None else make_provenance()

    def point(weights, solved: _Solution, plan: Plan, restricted_to: str | None = None) -> ParetoPoint:
        predicted = {n: float(costs[n][rows, solved.choice].sum()) for n in profiled}
        search_record = {
            **settings,
            "weights": {str(n): w for n, w in weights.items()},
            # Proven relative distance of this plan's objective from the optimum.
            "gap": 0.0 if solved.cost <= solved.bound else (solved.cost - solved.bound) / solved.cost,
            "optimal": solved.optimal,
        }
        if restricted_to is not None:
            search_record["restricted_to"] = restricted_to
        record = {
            **base,
            "method": "search",
            "search": search_record,
            "profile": profile_record,
            "predicted_cost": {str(n): c for n, c in predicted.items()},
            "pareto": pareto,
        }
        return ParetoPoint(
            plan=dataclasses.replace(plan, provenance=json.loads(json.dumps(record))),
            weights=dict(weights),
            predicted_cost=predicted,
            density={n: plan.density(n) for n in lengths},
        )

    return SearchResult(
        points=[point(*found[i]) for i in order],
        lengths=lengths,
        alternatives={name: point(w, s, plan, name) for name, w, s, plan in alternatives},
    )


def _solve_within_budget(
    objective: np.ndarray,  # [groups, rules]
    shares: np.ndarray,  # [T (+1), groups, rules]: density at each length (and the decode cache's keys)
    limits: np.ndarray,  # [T (+1)]: the budget per length (and the kv budget)
    check: Callable[[np.ndarray], np.ndarray],
    mip_gap: float,
    time_limit: float,
    kv_row: bool = False,  # the last row is the kv budget's
) -> _Solution:
    """Solve, then measure the plan with ``check`` (each row's value: :meth:`Plan.density` at every
    length, then :meth:`Plan.kv_fraction` with a kv budget). The solver accepts rows over their bound
    by its feasibility tolerance (~1e-7), so a row found over its limit is solved again, tightened by
    the excess."""
    wanted = np.asarray(limits, dtype=np.float64)
    limits = wanted.copy()
    for _ in range(5):
        solved = _solve(objective, shares, limits, mip_gap, time_limit)
        if solved is None:
            sparsest = shares.sum(1).min(1)  # per row: every group on its smallest share
            kv = f" and kv budget {wanted[-1]:g}" if kv_row else ""
            raise SearchError(
                f"no plan of the candidate rules fits budget {wanted[0]:g} at every length{kv} (the sparsest "
                f"choices give {', '.join(f'{d:.4f}' for d in sparsest)}); add a narrower rule"
                + (" or allow static rules" if kv_row else "")
            )
        excess = check(solved.choice) - wanted
        if (excess <= DENSITY_TOLERANCE).all():
            return solved
        limits = np.where(excess > DENSITY_TOLERANCE, limits - excess - 1e-9, limits)
    raise RuntimeError(
        f"the solver kept returning plans over their limits {wanted} (excess {excess.max():.3g})"
    )


# ----------------------------------------------------------------------------------------------
# Choosing and saving


def with_choice(result: SearchResult, index: int) -> Plan:
    """Point ``index``'s plan with ``"chosen": true`` on its entry of ``provenance["pareto"]``."""
    if not 0 <= index < len(result.points):
        raise SearchError(f"no Pareto point {index}; the search found {len(result.points)}")
    plan = result.points[index].plan
    record = json.loads(json.dumps(dict(plan.provenance)))
    for i, entry in enumerate(record["pareto"]):
        entry["chosen"] = i == index
    return dataclasses.replace(plan, provenance=record)


def rule_counts(plan: Plan) -> dict[str, int]:
    """How many query heads use each rule (``describe_rule`` names), most used first."""
    counts: dict[str, int] = {}
    for heads in plan.rules:
        for rule in heads:
            counts[describe_rule(rule)] = counts.get(describe_rule(rule), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def search_summary(result: SearchResult, chosen: int | None = None) -> dict[str, Any]:
    """JSON-ready description of every point (and of each alternative, by name): density per target
    length, predicted cost per profiled length, mean cost, weights and rule counts."""
    first = result.points[0].plan

    def describe(point: ParetoPoint) -> dict[str, Any]:
        return {
            "density": {str(n): d for n, d in point.density.items()},
            "predicted_cost": {str(n): c for n, c in point.predicted_cost.items()},
            "mean_cost": point.mean_cost,
            "weights": {str(n): w for n, w in point.weights.items()},
            "rules": rule_counts(point.plan),
        }

    return {
        "budget": first.budget,
        "lengths": list(result.lengths),
        "search": first.provenance.get("search", {}),
        "chosen": chosen,
        "points": [
            {"index": i, "chosen": i == chosen, **describe(point)} for i, point in enumerate(result.points)
        ],
        "alternatives": {name: describe(point) for name, point in result.alternatives.items()},
    }


def save_search(result: SearchResult, out_dir: str | Path, index: int = 0, force: bool = False) -> Path:
    """Write ``out_dir/plan.json`` (point ``index``, marked chosen) and ``out_dir/pareto.json`` (all
    points); refuses existing files unless ``force``. Returns the plan's path."""
    out = Path(out_dir)
    for name in (PLAN_FILE, PARETO_FILE):
        if (out / name).exists() and not force:
            raise FileExistsError(f"{out / name} exists; pass --force to overwrite")
    plan = with_choice(result, index)
    path = save_plan(plan, out, force=force)
    atomic_write_bytes(
        out / PARETO_FILE, (json.dumps(search_summary(result, index), indent=1) + "\n").encode()
    )
    return path


__all__ = [
    "ALTERNATIVES",
    "DEFAULT_ALPHA_BLOCKS",
    "DEFAULT_BETAS",
    "DEFAULT_GATE_LOCALS",
    "DEFAULT_GATE_TAILS",
    "DEFAULT_GATE_TARGETS",
    "PARETO_FILE",
    "RULE_KINDS",
    "ParetoPoint",
    "SampleMaps",
    "SearchError",
    "SearchResult",
    "candidate_rules",
    "check_rule_kinds",
    "default_min_span",
    "gate_candidates",
    "gate_costs",
    "gate_floor",
    "minimum_density",
    "pareto_weights",
    "rule_costs",
    "rule_counts",
    "save_search",
    "search_plan",
    "search_summary",
    "with_choice",
]
