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

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
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
    seen: set[str] = set()
    for rule in rules:
        digest = hashlib.sha256()
        for n in lengths:
            digest.update(rule_block_mask(rule, n, block_size).numpy().tobytes())
        if digest.hexdigest() not in seen:
            seen.add(digest.hexdigest())
            kept.append(rule)
    return kept


def _groups(profile: Profile, per_head: bool) -> list[tuple[int, tuple[int, ...]]]:
    """(layer, query heads) of every unit that gets one rule; GQA groups are consecutive query heads."""
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    return [
        (layer, tuple(range(start, start + size)))
        for layer in range(model.num_layers)
        for start in range(0, model.num_heads, size)
    ]


def rule_costs(
    profile: Profile, rules: Sequence[Rule], per_head: bool = False
) -> dict[int, np.ndarray]:
    """Profiled length -> float64 ``[groups, rules]``: the fraction of the model's causal influence at
    that length that each group loses with each rule (groups in :func:`_groups` order)."""
    model = profile.model
    size = 1 if per_head else model.num_heads // model.num_kv_heads
    costs: dict[int, np.ndarray] = {}
    for n in profile.lengths:
        nb = num_blocks(n, profile.block_size)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        influence = profile.influence[n].double() * causal  # [L, H, nB, nB]
        grouped = influence.reshape(model.num_layers, model.num_heads // size, size, nb * nb).sum(2)
        grouped = grouped.reshape(-1, nb * nb)  # [groups, nB*nB]
        dropped = torch.stack([causal & ~rule_block_mask(r, n, profile.block_size) for r in rules])
        lost = grouped @ dropped.reshape(len(rules), nb * nb).double().T  # [groups, rules]
        total = float(influence.sum())
        costs[n] = (lost / total).numpy() if total > 0 else np.zeros(tuple(lost.shape))
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


def _solve(
    objective: np.ndarray,  # [groups, rules]
    sizes: np.ndarray,  # [groups] query heads per group
    densities: np.ndarray,  # [lengths, rules]
    limits: np.ndarray,  # [lengths] right-hand sides (the budget, maybe tightened)
    total_heads: int,
    time_limit: float,
) -> tuple[np.ndarray, bool] | None:
    """One-hot choice ``[groups]`` of rule indices minimising the objective under the density rows, and
    whether HiGHS proved it optimal. None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, kron

    groups, rules = objective.shape
    one_hot = kron(np.eye(groups), np.ones((1, rules)), format="csr")  # [groups, groups*rules]
    # Row t: sum over groups and rules of heads(g) * density(rule, N_t) / all heads = plan density.
    density_rows = csr_matrix(
        (densities[:, None, :] * sizes[None, :, None] / total_heads).reshape(len(limits), groups * rules)
    )
    result = milp(
        c=objective.reshape(-1),
        integrality=np.ones(groups * rules),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_hot, 1, 1),
            LinearConstraint(density_rows, -np.inf, limits),
        ],
        # disp=False keeps HiGHS off stdout (the CLI's --json output); a gap of 0 asks for the optimum.
        options={"disp": False, "time_limit": time_limit, "mip_rel_gap": 0.0},
    )
    if result.x is None:
        if result.status == 2:
            return None
        raise SearchError(f"the solver found no plan ({result.message}); allow more time_limit than {time_limit}s")
    choice = np.round(result.x).reshape(groups, rules).argmax(axis=1)
    return choice, result.status == 0


def _build_plan(
    profile: Profile,
    groups: Sequence[tuple[int, tuple[int, ...]]],
    rules: Sequence[Rule],
    choice: np.ndarray,
    budget: float,
    lengths: tuple[int, ...],
) -> Plan:
    table: list[list[Rule]] = [[DenseRule()] * profile.model.num_heads for _ in range(profile.model.num_layers)]
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
    progress: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Pareto set of plans with density <= ``budget`` at every profiled and extended length.

    ``alphas`` in tokens (default: :data:`DEFAULT_ALPHA_BLOCKS` times the block size), ``betas`` in
    [0, 1] (default: steps of 1/8). One rule per KV group, or per query head with ``per_head``.
    ``pareto_size`` weight vectors over the profiled lengths' costs are solved (``time_limit`` seconds
    each); distinct plans are returned sorted by mean predicted cost. ``provenance`` is the base of
    each plan's provenance (default: tool and time).
    """
    from moa_compress.data import progress_steps

    if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise SearchError(f"budget must be in (0, 1], got {budget}")
    if any(int(n) != n or n <= 0 for n in extend_lengths):
        raise SearchError(f"extend lengths must be positive integers, got {list(extend_lengths)}")
    if sink_blocks < 0:
        raise SearchError(f"sink_blocks must be >= 0, got {sink_blocks}")
    if pareto_size < 1:
        raise SearchError(f"pareto_size must be at least 1, got {pareto_size}")
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
    groups = _groups(profile, per_head)
    settings = {
        "budget": budget,
        "lengths": list(lengths),
        "profiled_lengths": list(profiled),
        "extend_lengths": sorted({int(n) for n in extend_lengths}),
        "per_head": per_head,
        "sink_blocks": sink_blocks,
        "alphas": [float(a) for a in alphas],
        "betas": [float(b) for b in betas],
        "pareto_size": pareto_size,
        "solver": "scipy.optimize.milp (HiGHS)",
    }

    if budget >= 1.0:
        rules: list[Rule] = [DenseRule()]
        solutions = [(pareto_weights(profiled, 1)[0], np.zeros(len(groups), dtype=np.int64), True)]
    else:
        rules = candidate_rules(lengths, block, alphas, betas, sink_blocks)
        costs = rule_costs(profile, rules, per_head)
        densities = np.array([[rule_density(r, n, block) for r in rules] for n in lengths])  # [T, R]
        sizes = np.array([len(heads) for _, heads in groups], dtype=np.float64)
        total_heads = profile.model.num_layers * profile.model.num_heads
        weight_list = pareto_weights(profiled, pareto_size)
        solutions = []
        with progress_steps(progress, len(weight_list), "search") as step:
            for i, weights in enumerate(weight_list):
                objective = sum(w * costs[n] for n, w in weights.items())
                solved = _solve_within_budget(
                    profile, groups, rules, objective, sizes, densities, budget, lengths, total_heads, time_limit
                )
                solutions.append((weights, *solved))
                step(f"search: weights {i + 1}/{len(weight_list)}")

    points: list[tuple[int, dict[int, float], Plan, dict[int, float], dict[int, float], bool]] = []
    seen: set[tuple] = set()
    for order, (weights, choice, optimal) in enumerate(solutions):
        plan = _build_plan(profile, groups, rules, choice, budget, lengths)
        if plan.rules in seen:
            continue
        seen.add(plan.rules)
        density = {n: plan.density(n) for n in lengths}
        over = {n: d for n, d in density.items() if d > budget + DENSITY_TOLERANCE}
        if over:  # _solve_within_budget guarantees this; a violation is a bug, never a plan to return
            raise RuntimeError(f"search produced a plan over budget {budget}: {over}")
        if budget >= 1.0:
            cost = {n: 0.0 for n in profiled}
        else:
            cost = {n: float(costs[n][np.arange(len(groups)), choice].sum()) for n in profiled}
        points.append((order, weights, plan, cost, density, optimal))
    points.sort(key=lambda p: (sum(p[3].values()) / len(p[3]), p[0]))

    pareto = [
        {
            "density": {str(n): round(d, 6) for n, d in density.items()},
            "predicted_cost": {str(n): c for n, c in cost.items()},
            "weights": {str(n): w for n, w in weights.items()},
            "chosen": False,
        }
        for _, weights, _, cost, density, _ in points
    ]
    base = dict(provenance) if provenance is not None else make_provenance()
    profile_record = {
        key: profile.provenance[key]
        for key in ("data", "mode", "seed", "answer_tokens", "dtype", "data_digest", "model_weights")
        if key in profile.provenance
    }
    profile_record["samples"] = {str(n): profile.samples[n] for n in profiled}
    profile_record["block_size"] = block
    result_points = []
    for _, weights, plan, cost, density, optimal in points:
        record = {
            **base,
            "method": "search",
            "search": {**settings, "candidates": len(rules), "weights": {str(n): w for n, w in weights.items()},
                       "optimal": optimal},
            "profile": profile_record,
            "predicted_cost": {str(n): c for n, c in cost.items()},
            "pareto": pareto,
        }
        result_points.append(
            ParetoPoint(
                plan=dataclasses.replace(plan, provenance=json.loads(json.dumps(record))),
                weights=weights,
                predicted_cost=cost,
                density=density,
            )
        )
    return SearchResult(points=result_points, lengths=lengths)


def _solve_within_budget(
    profile: Profile,
    groups: Sequence[tuple[int, tuple[int, ...]]],
    rules: Sequence[Rule],
    objective: np.ndarray,
    sizes: np.ndarray,
    densities: np.ndarray,
    budget: float,
    lengths: tuple[int, ...],
    total_heads: int,
    time_limit: float,
) -> tuple[np.ndarray, bool]:
    """Solve, then check the plan with :meth:`Plan.density`. HiGHS accepts rows that exceed their bound
    by its feasibility tolerance (1e-7), so a length found over budget is solved again with its row
    tightened by the excess."""
    limits = np.full(len(lengths), budget)
    for _ in range(5):
        solved = _solve(objective, sizes, densities, limits, total_heads, time_limit)
        if solved is None:
            reachable = {n: float(densities[t].min()) for t, n in enumerate(lengths)}
            raise SearchError(
                f"no plan from the candidate rules fits budget {budget} at every length; the sparsest "
                f"candidate's density: " + ", ".join(f"{d:.4f} at {n}" for n, d in reachable.items())
            )
        plan = _build_plan(profile, groups, rules, solved[0], budget, lengths)
        excess = np.array([plan.density(n) - budget for n in lengths])
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
    atomic_write_bytes(out / PARETO_FILE, (json.dumps(search_summary(result, index), indent=1) + "\n").encode())
    return path


__all__ = [
    "DEFAULT_ALPHA_BLOCKS",
    "DEFAULT_BETAS",
    "PARETO_FILE",
    "ParetoPoint",
    "SearchError",
    "SearchResult",
    "candidate_rules",
    "minimum_density",
    "pareto_weights",
    "rule_costs",
    "rule_counts",
    "save_search",
    "search_plan",
    "search_summary",
    "with_choice",
]
