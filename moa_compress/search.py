"""Search: choose one rule per KV group (or query head) under a density budget at every length.

Every group picks one candidate rule: ``dense``, or ``sink_blocks`` sink blocks plus a band of span
``S(N) = alpha + beta * N`` tokens (a grid of ``alpha`` and ``beta``). The cost of a rule at a profiled
length ``N`` is the influence it throws away: the sum of the profile's ``|E|`` over the causal blocks
its mask drops, divided by the whole model's causal influence at ``N`` (so costs are fractions that
compare across lengths). The constraint is the plan's density (exactly :meth:`Plan.density`) at every
target length: the profiled ones plus ``extend_lengths``, where rules are extrapolated and only their
density counts.

That is a multiple-choice knapsack with one knapsack row per length, solved as a MILP by HiGHS
(``scipy.optimize.milp``): one binary per (group, candidate), one-hot per group. Several lengths give
several objectives; weighted sums of the per-length costs give a Pareto set of plans, each of which is
checked with :meth:`Plan.density` before it is returned.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moa_compress.errors import UserInputError
from moa_compress.plan import (
    PLAN_FILE,
    DenseRule,
    Plan,
    Rule,
    StaticRule,
    atomic_write_bytes,
    describe_rule,
    num_blocks,
    rule_block_mask,
    rule_density,
    save_plan,
)
from moa_compress.plan import provenance as make_provenance
from moa_compress.profile import Profile

PARETO_FILE = "pareto.json"
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
    lengths (profiled + extended) every plan's density was checked at."""

    points: list[ParetoPoint]
    lengths: tuple[int, ...]


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
    """(layer, query heads) of every unit that gets one rule; GQA groups are consecutive query heads."""
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    return [
        (layer, tuple(range(start, start + size)))
        for layer in range(model.num_layers)
        for start in range(0, model.num_heads, size)
    ]


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
        grouped = lost.reshape(-1, size, len(rules)).sum(1)  # [groups, R]
        total = float(influence.sum())
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
) -> Plan:
    table: list[list[Rule]] = [
        [DenseRule()] * profile.model.num_heads for _ in range(profile.model.num_layers)
    ]
    for (layer, heads), index in zip(groups, choice, strict=True):
        for head in heads:
            table[layer][head] = rules[int(index)]
    return Plan(
        model=profile.model,
        rules=tuple(tuple(row) for row in table),
        block_size=profile.block_size,
        budget=budget,
        lengths=lengths,
    )


def search_plan(
    profile: Profile,
    budget: float,
    *,
    extend_lengths: Sequence[int] = (),
    per_head: bool = False,
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
) -> SearchResult:
    """Pareto set of plans with density <= ``budget`` at every profiled and extended length.

    ``alphas`` in tokens (default: :data:`DEFAULT_ALPHA_BLOCKS` times the block size), ``betas`` in
    [0, 1] (default: steps of 1/8). One rule per KV group, or per query head with ``per_head``.
    ``pareto_size`` weight vectors over the profiled lengths' costs are solved, each to within
    ``mip_gap`` (relative) of its optimum (0: exactly), all together in about ``time_limit`` seconds at
    most; distinct plans are returned sorted by mean predicted cost. ``renormalise``: charge each rule
    for the row renormalisation its whole dropped set causes (see :func:`rule_costs`). ``min_span``:
    the narrowest band (tokens, at every target length) a static rule may keep; None picks
    :func:`default_min_span`, 0 allows any. ``cost``: the per-block measure (see :func:`rule_costs`;
    default :func:`cost_kind`). ``provenance`` is the base of each plan's provenance
    (default: tool and time).
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
    cost = cost_kind(profile, cost)
    block = profile.block_size
    alphas = [a * block for a in DEFAULT_ALPHA_BLOCKS] if alphas is None else list(alphas)
    betas = list(DEFAULT_BETAS) if betas is None else list(betas)
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise SearchError(f"alphas must be finite numbers of tokens, got {alphas}")
    if not betas or not all(0.0 <= b <= 1.0 for b in betas):
        raise SearchError(f"betas must lie in [0, 1], got {betas}")
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
    if budget < 1.0 and min_span > 0:
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

    solutions: list[tuple[dict[int, float], _Solution]] = []
    if budget >= 1.0:  # nothing to trade: every head dense, nothing lost
        rules: list[Rule] = [DenseRule()]
        costs = {n: np.zeros((len(groups), 1)) for n in profiled}
        solutions.append(
            (pareto_weights(profiled, 1)[0], _Solution(np.zeros(len(groups), int), 0.0, 0.0, True))
        )
    else:
        rules = [
            r
            for r in candidate_rules(lengths, block, alphas, betas, sink_blocks)
            if isinstance(r, DenseRule) or all(r.span(n) >= min_span for n in lengths)
        ]
        costs = rule_costs(profile, rules, per_head, renormalise, cost)
        densities = np.array([[rule_density(r, n, block) for r in rules] for n in lengths])  # [T, R]
        sizes = np.array([len(heads) for _, heads in groups], dtype=np.float64)  # [groups]
        total_heads = profile.model.num_layers * profile.model.num_heads
        shares = densities[:, None, :] * sizes[None, :, None] / total_heads  # [T, groups, R]
        weight_list = pareto_weights(profiled, pareto_size)
        with progress_steps(progress, len(weight_list), "search") as step:
            for i, weights in enumerate(weight_list):
                objective = sum(w * costs[n] for n, w in weights.items())  # [groups, R]

                def check(choice: np.ndarray) -> dict[int, float]:
                    plan = _build_plan(profile, groups, rules, choice, budget, lengths)
                    return {n: plan.density(n) for n in lengths}

                solved = _solve_within_budget(
                    objective, shares, budget, check, mip_gap, time_limit / len(weight_list)
                )
                solutions.append((weights, solved))
                step(f"search: weights {i + 1}/{len(weight_list)}")

    found: list[tuple[dict[int, float], _Solution, Plan]] = []
    seen: set[tuple] = set()
    for weights, solved in solutions:
        plan = _build_plan(profile, groups, rules, solved.choice, budget, lengths)
        if plan.rules not in seen:
            seen.add(plan.rules)
            found.append((weights, solved, plan))
    cost_of = [{n: float(costs[n][rows, s.choice].sum()) for n in profiled} for _, s, _ in found]
    density_of = [{n: plan.density(n) for n in lengths} for _, _, plan in found]
    for density in density_of:
        over = {n: d for n, d in density.items() if d > budget + DENSITY_TOLERANCE}
        if over:  # _solve_within_budget rules this out: a plan over budget is a bug, never a result
            raise RuntimeError(f"search produced a plan over budget {budget}: {over}")
    # Sorted by mean cost; the weight order (uniform first) breaks ties.
    order = sorted(range(len(found)), key=lambda i: (sum(cost_of[i].values()) / len(profiled), i))

    pareto = [
        {
            "density": {str(n): d for n, d in density_of[i].items()},
            "predicted_cost": {str(n): c for n, c in cost_of[i].items()},
            "weights": {str(n): w for n, w in found[i][0].items()},
            "chosen": False,
        }
        for i in order
    ]
    settings = {
        "budget": budget,
        "lengths": list(lengths),
        "profiled_lengths": list(profiled),
        "extend_lengths": sorted({int(n) for n in extend_lengths}),
        "per_head": per_head,
        "sink_blocks": sink_blocks,
        "alphas": [float(a) for a in alphas],
        "betas": [float(b) for b in betas],
        "candidates": len(rules),
        "pareto_size": pareto_size,
        "mip_gap": mip_gap,
        "cost": cost + (", renormalised" if renormalise and profile.mass else ", additive"),
        "min_span": float(min_span),
        "solver": "scipy.optimize.milp (HiGHS) after its LP relaxation",
    }
    profile_record = {
        key: profile.provenance[key]
        for key in ("data", "mode", "seed", "answer_tokens", "dtype", "data_digest", "model_weights")
        if key in profile.provenance
    }
    profile_record["samples"] = {str(n): profile.samples[n] for n in profiled}
    base = dict(provenance) if provenance is not None else make_provenance()
    points = []
    for i in order:
        weights, solved, plan = found[i]
        record = {
            **base,
            "method": "search",
            "search": {
                **settings,
                "weights": {str(n): w for n, w in weights.items()},
                # Proven relative distance of this plan's objective from the optimum.
                "gap": 0.0 if solved.cost <= solved.bound else (solved.cost - solved.bound) / solved.cost,
                "optimal": solved.optimal,
            },
            "profile": profile_record,
            "predicted_cost": pareto[len(points)]["predicted_cost"],
            "pareto": pareto,
        }
        points.append(
            ParetoPoint(
                plan=dataclasses.replace(plan, provenance=json.loads(json.dumps(record))),
                weights=weights,
                predicted_cost=cost_of[i],
                density=density_of[i],
            )
        )
    return SearchResult(points=points, lengths=lengths)


def _solve_within_budget(
    objective: np.ndarray,  # [groups, rules]
    shares: np.ndarray,  # [T, groups, rules]
    budget: float,
    check: Callable[[np.ndarray], dict[int, float]],
    mip_gap: float,
    time_limit: float,
) -> _Solution:
    """Solve, then measure the plan with ``check`` (:meth:`Plan.density` at every length). The solver
    accepts rows over their bound by its feasibility tolerance (~1e-7), so a length found over budget is
    solved again with its row tightened by the excess."""
    limits = np.full(shares.shape[0], budget)
    for _ in range(5):
        solved = _solve(objective, shares, limits, mip_gap, time_limit)
        if solved is None:
            sparsest = shares.sum(1).min(1)
            raise SearchError(
                f"no plan of the candidate rules fits budget {budget} at every length (the sparsest "
                f"candidate's density: {', '.join(f'{d:.4f}' for d in sparsest)}); add a narrower rule"
            )
        excess = np.array(list(check(solved.choice).values())) - budget
        if (excess <= DENSITY_TOLERANCE).all():
            return solved
        limits = np.where(excess > DENSITY_TOLERANCE, limits - excess - 1e-9, limits)
    raise RuntimeError(f"the solver kept returning plans over budget {budget} (excess {excess.max():.3g})")


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
    """JSON-ready description of every point: density per target length, predicted cost per profiled
    length, mean cost, weights and rule counts."""
    first = result.points[0].plan
    return {
        "budget": first.budget,
        "lengths": list(result.lengths),
        "search": first.provenance.get("search", {}),
        "chosen": chosen,
        "points": [
            {
                "index": i,
                "chosen": i == chosen,
                "density": {str(n): d for n, d in point.density.items()},
                "predicted_cost": {str(n): c for n, c in point.predicted_cost.items()},
                "mean_cost": point.mean_cost,
                "weights": {str(n): w for n, w in point.weights.items()},
                "rules": rule_counts(point.plan),
            }
            for i, point in enumerate(result.points)
        ],
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
    "DEFAULT_ALPHA_BLOCKS",
    "DEFAULT_BETAS",
    "PARETO_FILE",
    "ParetoPoint",
    "SearchError",
    "SearchResult",
    "candidate_rules",
    "default_min_span",
    "minimum_density",
    "pareto_weights",
    "rule_costs",
    "rule_counts",
    "save_search",
    "search_plan",
    "search_summary",
    "with_choice",
]
