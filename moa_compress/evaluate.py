"""Quality of a plan against dense attention and the uniform baseline: perplexity, fidelity, passkey
and RULER-style retrieval tasks.

Every task runs three *variants* of one model in one call:

* ``dense`` — the model as loaded (its own attention implementation);
* ``plan`` — the model under :func:`moa_compress.runtime.apply_plan` with the plan;
* ``uniform`` — the StreamingLLM-style baseline at the plan's own density: at each length ``N``, one
  fixed window for every head, with the plan's sink, whose density is the nearest to
  ``plan.density(N)`` that block granularity allows (see :func:`uniform_baseline`);
* with ``oracle=True`` (``moa-compress eval --oracle``), on the text tasks and passkey
  (:data:`ORACLE_TASKS`), two ceilings that choose blocks from each input's true attention at the
  plan's own densities (:mod:`moa_compress.oracle`): ``oracle`` (per head and query-block row, the
  blocks of most attention mass, each head at its rule's density) and ``oracle-layer`` (the layer's
  pair budget spent over all its heads and rows by attention mass per pair). An oracle needs one full
  unpadded prefill per call, which ppl/fidelity windows and passkey batches (teacher-forced, prompts of
  one length) are; the ruler tasks decode greedily through a cache and run without oracles. The
  plan's and the baseline's perplexity and KL gaps to dense are then also given as multiples of the
  oracles' (``"oracles"`` below).

Tasks (``N`` is each requested length):

* ``ppl`` — non-overlapping cuts of ``L`` tokens (``L`` the longest requested length) from the
  evaluation texts; at length ``N`` the window is the last ``N`` tokens of each cut, so every length
  reads the same text. The loss is taken on the second half of each window (its tokens
  ``N//2 .. N-1``), so long context matters. Perplexity is ``exp`` of the token-weighted mean negative
  log-likelihood over all scored tokens.
* ``fidelity`` — on the same windows and positions, the mean KL(dense || variant) of the next-token
  distributions (nats per token) and the fraction of positions whose top-1 token agrees with dense.
  Dense final hidden states are computed once per window; logits are formed in chunks of positions
  through the output embedding, so an 8K window never holds a full ``[N, vocab]`` logits tensor.
* ``passkey`` — a 5-digit key hidden at a depth (0, 0.2, … 1) of filler text, asked through the chat
  template; the assistant turn starts with ``"The pass key is"`` and the key's tokens follow, for an
  input of exactly ``N`` tokens. Greedy accuracy is teacher-forced: a sample counts as correct when
  the argmax at every key position is the key's token — exactly the condition for greedy decoding to
  produce the key. ``answer_logprob`` is the mean log-probability of the key's tokens. Samples
  (default 30) are spread evenly over the depths; keys come from a seeded generator.
* the ruler tasks (:data:`moa_compress.tasks.RULER_TASKS`; ``ruler`` names them all) — prompts of
  exactly ``N`` tokens from :func:`moa_compress.tasks.task_samples`, answered by greedy decoding
  (batched; :func:`greedy_replies`) and scored by exact match; ``answer_logprob`` is the mean
  log-probability of the reference answer's tokens, teacher-forced on the same prefill.

``results.json`` schema (``schema_version`` 2; lengths are JSON object keys, i.e. strings)::

    {
      "schema_version": 2,
      "model": {ModelIdentity fields of the evaluated model},
      "plan": {"name": str, "path": str | null, "fingerprint": str, "block_size": int,
               "budget": float | null, "density": {N: float}, "provenance": {...}},
      "uniform": {"density": {N: float}, "rule": {N: str},        # the baseline actually run
                  "same_as_plan": {N: bool}},     # true: the plan is that window; figures copied
      "settings": {"tasks": [str], "lengths": [int], "samples": int | null, "limit": int | null,
                   "batch_size": int, "seed": int, "backend": str, "ranking": str, "dtype": str,
                   "data": str | null, "chat_template": bool, "oracle": bool},
      "oracles": {                                               # only with oracle=True
        "oracle" | "oracle-layer": {"density": {N: float}},     # measured: pairs computed / causal,
                                                                 # mean over the N-token inputs it ran
                                                                 # (text windows, passkey prompts)
        "ratio": {"plan" | "uniform": {"oracle" | "oracle-layer": {N: {
            "ppl_gap": float | null,    # (ppl / dense ppl - 1) over the oracle's; null if the
            "kl": float | null}}}}},    # oracle's gap is <= 0 or a task was not run; KL / oracle's KL
      "command": str | null,                                     # set by the CLI
      "time": str,                                               # ISO 8601, when the run finished
      "results": {
        "dense" | "plan" | "uniform" | "oracle" | "oracle-layer": {   # oracles: ppl, fidelity, passkey
          "ppl": {N: {"ppl": float, "nll": float, "windows": int, "tokens": int,
                      "window_nll": [float]}},   # mean NLL per window, in window order (paired
                                                 # across variants: the same windows for each)
          "fidelity": {N: {"kl": float, "top1": float, "windows": int, "tokens": int,
                           "window_kl": [float]}},  # not for dense; per window as window_nll
          "passkey" | <ruler task>: {N: {
              "accuracy": float, "answer_logprob": float, "samples": int,
              "correct": [bool],                  # per sample, in generation order (paired across variants)
              "replies": [str],                   # ruler tasks: the greedy replies, cut where they
                                                  # ended or could no longer match
              "by_depth": {depth: {"accuracy": float, "answer_logprob": float, "samples": int}}}}
                                                  # passkey only: the depth grid
        }
      }
    }

Only requested tasks appear. Dense has no ``fidelity`` entry: it is the reference (KL 0, top-1 1).
Readers of schema 2 written before the oracles keep working: the oracle entries are additions (on
passkey too: a passkey entry of an oracle has the record format of the other variants').
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moa_compress.data import SHIPPED_TEXTS, DataError, max_positions, shipped_texts, token_windows
from moa_compress.errors import UserInputError
from moa_compress.plan import (
    DenseRule,
    Plan,
    PlanError,
    StaticRule,
    describe_rule,
    identity_of,
    rule_density,
    rules_everywhere,
    text_config,
    uniform_plan,
)
from moa_compress.tasks import (
    PASSKEY_DEPTHS,
    PROSE_TASKS,
    RULER_TASKS,
    PasskeySample,
    Prose,
    TaskSample,
    can_still_match,
    has_chat_template,
    is_exact_match,
    passkey_samples,
    task_samples,
)

RESULTS_SCHEMA_VERSION = 2
TEXT_TASKS = ("ppl", "fidelity")
TASKS = (*TEXT_TASKS, "passkey", *RULER_TASKS)
DEFAULT_TASKS = (*TEXT_TASKS, "passkey")
TASK_GROUPS = {"ruler": RULER_TASKS}
VARIANTS = ("dense", "plan", "uniform")
ORACLES = ("oracle", "oracle-layer")  # = moa_compress.oracle.ORACLES
# Tasks the oracles run on: each forward is one full unpadded prefill (the ruler tasks decode greedily).
ORACLE_TASKS = (*TEXT_TASKS, "passkey")
DEFAULT_PASSKEY_SAMPLES = 5 * len(PASSKEY_DEPTHS)  # 30: five keys per depth
# Per ruler task and length: sized so that `--tasks ruler,passkey --lengths 1024,2048` of one plan
# (three variants) stays under 15 minutes on a 2-core CPU (BENCHMARKS.md).
DEFAULT_RULER_SAMPLES = 5
DEFAULT_BATCH_SIZE = 4
REPLY_MARGIN = 8  # greedy tokens allowed past the reference answer's length
# Twelve English Wikipedia articles carried in the package (CC BY-SA 3.0; texts/README.md): natural
# prose, 160K tokens of the embedded model's tokenizer (9K to 20K per article). Eval reads the "eval"
# split (eight articles, ~110K tokens: 11 windows of 8K); the other four tune (data.shipped_texts).
DEFAULT_DATA = SHIPPED_TEXTS
LOGIT_CHUNK = 256  # positions per lm_head chunk: 256 x 49152 fp32 logits = 48 MiB


class EvalError(UserInputError):
    """Evaluation settings that cannot work: unknown task, length too long, no usable data."""


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"ppl,ruler"`` or a sequence of names (``ruler`` stands for all :data:`RULER_TASKS`) ->
    validated tuple in canonical order."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    expanded = {task for name in names for task in TASK_GROUPS.get(name, (name,))}
    unknown = sorted(expanded - set(TASKS))
    if unknown or not names:
        raise EvalError(
            f"--tasks must list some of {', '.join([*TASKS[:3], *TASK_GROUPS])} or a ruler task "
            f"({', '.join(RULER_TASKS)}); got {','.join(names) or 'nothing'}"
        )
    return tuple(t for t in TASKS if t in expanded)


def needs_text(tasks: Sequence[str]) -> bool:
    """True when ``tasks`` read natural text: ppl/fidelity windows, or the needle tasks' haystack."""
    return bool(set(tasks) & {*TEXT_TASKS, *PROSE_TASKS})


def check_lengths(model: Any, lengths: Sequence[int]) -> list[int]:
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 4:
        raise EvalError(f"--lengths must be at least 4 tokens, got {lengths}")
    limit = max_positions(model)
    if limit is not None and lengths[-1] > limit:
        raise EvalError(f"--lengths {lengths[-1]} exceeds the model's maximum of {limit} positions")
    return lengths


def default_texts() -> tuple[list[str], str]:
    """The default evaluation text: the "eval" split of the Wikipedia articles shipped in
    ``moa_compress/texts`` (the other articles tune mixed calibration; :func:`data.shipped_texts`).

    Raises :class:`DataError` (one line) when this install lacks them, naming ``--data``.
    """
    return shipped_texts("eval", DEFAULT_DATA), f"{DEFAULT_DATA} (eval split)"


# ----------------------------------------------------------------------------------------------
# The uniform baseline


def plan_sink_blocks(plan: Plan) -> int:
    """The sink the plan's static rules use most (1 when the plan has none)."""
    sinks = Counter(r.sink_blocks for heads in plan.rules for r in heads if isinstance(r, StaticRule))
    return sinks.most_common(1)[0][0] if sinks else 1


def uniform_baseline(plan: Plan, n: int) -> Plan:
    """One window for every head at length ``n``, same sink as ``plan``, density nearest to the plan's.

    :func:`moa_compress.plan.uniform_plan` gives the widest window at or below the density; block
    granularity makes that up to ~2 blocks / ``n`` sparser than the plan, which would flatter the plan,
    so the next wider window is taken when its density is nearer.
    """
    target = plan.density(n)
    sink = plan_sink_blocks(plan)
    bs = plan.block_size
    try:
        below = uniform_plan(plan.model, min(target, 1.0), [n], block_size=bs, sink_blocks=sink)
    except PlanError:  # the plan is sparser than sink + diagonal: the smallest window is nearest
        return _uniform_with(plan, StaticRule(sink, float(bs), 0.0), n)
    rule = below.rules[below.model.planned_layers[0]][0]
    if isinstance(rule, DenseRule):
        return below
    wider = StaticRule(sink, rule.alpha + bs, 0.0)
    if abs(rule_density(wider, n, bs) - target) < abs(rule_density(rule, n, bs) - target):
        rule = wider
    return _uniform_with(plan, rule, n)


def _uniform_with(plan: Plan, rule: StaticRule, n: int) -> Plan:
    return Plan(
        model=plan.model,
        rules=rules_everywhere(plan.model, rule),
        block_size=plan.block_size,
        budget=plan.density(n),
        lengths=(n,),
        provenance={"method": "uniform"},
    )


# ----------------------------------------------------------------------------------------------
# Model pieces


def decoder_body(model: Any) -> Any:
    """The decoder without its output head: returns hidden states after the final norm."""
    body = model.base_model
    if body is model:
        raise EvalError(f"{type(model).__name__} has no separate decoder body to read hidden states from")
    return body


def final_hidden(model: Any, input_ids: torch.Tensor) -> torch.Tensor:  # [1, S] -> [S, hidden]
    """Last-layer hidden states (after the final norm), without forming logits."""
    return decoder_body(model)(input_ids=input_ids, use_cache=False).last_hidden_state[0]


def log_probs(model: Any, hidden: torch.Tensor) -> torch.Tensor:  # [P, hidden] -> [P, vocab], >= fp32
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
    config = text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@contextlib.contextmanager
def variant(model: Any, plan: Plan | None, backend: str, ranking: Any = None) -> Iterator[None]:
    """Run the body with ``plan`` applied (dense when None; prompts ranked by ``ranking``, see
    :func:`moa_compress.runtime.apply_plan`; the uniform baseline is run with ``"gate"``: a plain
    window whatever the plan's ranking)."""
    if plan is None:
        yield
        return
    from moa_compress.runtime import apply_plan

    with apply_plan(model, plan, backend=backend, ranking=ranking):
        yield


class _Sums:
    """Token-weighted sums for one (variant, length)."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.top1 = self.tokens = self.windows = 0
        self.window_nll: list[float] = []  # per window, in window order: paired across variants
        self.window_kl: list[float] = []

    def ppl(self) -> dict[str, Any]:
        nll = self.nll / self.tokens
        return {
            "ppl": math.exp(nll),
            "nll": nll,
            "windows": self.windows,
            "tokens": self.tokens,
            "window_nll": list(self.window_nll),
        }

    def fidelity(self) -> dict[str, Any]:
        return {
            "kl": self.kl / self.tokens,
            "top1": self.top1 / self.tokens,
            "windows": self.windows,
            "tokens": self.tokens,
            "window_kl": list(self.window_kl),
        }


def score_window(
    model: Any,
    hidden: torch.Tensor,  # [P, hidden]: states predicting `targets`
    targets: torch.Tensor,  # [P]
    reference: torch.Tensor | None,  # [P, hidden]: dense states, or None for the dense pass itself
    sums: _Sums,
) -> None:
    """Add one window's NLL (and, against ``reference``, KL and top-1 agreement) to ``sums``."""
    nll = kl_sum = 0.0
    for lo in range(0, hidden.shape[0], LOGIT_CHUNK):
        lp = log_probs(model, hidden[lo : lo + LOGIT_CHUNK])
        nll -= float(lp.gather(1, targets[lo : lo + LOGIT_CHUNK, None]).double().sum())
        if reference is not None:
            ref = log_probs(model, reference[lo : lo + LOGIT_CHUNK])
            kl = torch.nn.functional.kl_div(lp, ref, reduction="none", log_target=True).sum(-1)
            kl_sum += float(kl.double().sum())
            sums.top1 += int((lp.argmax(-1) == ref.argmax(-1)).sum())
    tokens = int(targets.numel())
    sums.nll += nll
    sums.window_nll.append(nll / tokens)
    if reference is not None:
        sums.kl += kl_sum
        sums.window_kl.append(kl_sum / tokens)
    sums.tokens += tokens
    sums.windows += 1


# ----------------------------------------------------------------------------------------------
# The evaluation


def evaluate_plan(
    model: Any,
    tokenizer: Any,
    plan: Plan,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int],
    texts: Sequence[str] | None = None,
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    oracle: bool = False,
    ranking: Any = None,
) -> dict[str, Any]:
    """Run ``tasks`` at ``lengths`` for dense, ``plan`` and the uniform baseline (and with ``oracle``
    the two oracles, on ``ppl``/``fidelity``/``passkey``: :data:`ORACLE_TASKS`; the ruler tasks run
    without them); return the ``results.json`` object (schema in the module docstring).

    ``texts`` (natural prose) feed ``ppl``/``fidelity`` and are the needle tasks' haystack; they are
    required for those. ``samples`` is the number of prompts per generation task and length
    (default :data:`DEFAULT_PASSKEY_SAMPLES` for passkey, :data:`DEFAULT_RULER_SAMPLES` for each
    ruler task); ``limit`` caps windows and samples per length. Prompts run ``batch_size`` at a
    time. Deterministic for a given ``seed`` and ``batch_size``. ``ranking``: how the plan's gate heads
    rank a prompt's blocks (``"gate"``, ``"sampled:R"``, ``"sampled-layer:R"`` or a
    :class:`~moa_compress.gate_runtime.PrefillRanking`; default as the plan says), as
    :func:`~moa_compress.runtime.apply_plan` takes it; the uniform baseline is never ranked.
    """
    from moa_compress.gate_runtime import PrefillRanking

    ranking = PrefillRanking.for_plan(plan, ranking) or "gate"
    tasks = parse_tasks(tasks)
    lengths = check_lengths(model, lengths)
    plan.check_model(identity_of(model))
    for value, option in ((limit, "--limit"), (samples, "--samples"), (batch_size, "--batch-size")):
        if value is not None and value < 1:
            raise EvalError(f"{option} must be a positive number, got {value}")
    if oracle and not set(tasks) & set(ORACLE_TASKS):
        raise EvalError(oracle_tasks_error(tasks))
    if needs_text(tasks) and not texts:
        raise DataError(f"{', '.join(t for t in tasks if needs_text([t]))} need natural text (--data)")
    uniforms = {n: uniform_baseline(plan, n) for n in lengths}
    # A plan that is itself one window for all heads *is* its baseline: run it once (no ranking changes
    # a plan without gate heads).
    same_as_plan = {
        n: uniforms[n].rules == plan.rules and uniforms[n].block_size == plan.block_size for n in lengths
    }
    plans: dict[str, dict[int, Plan | None]] = {
        "dense": dict.fromkeys(lengths),
        "plan": dict.fromkeys(lengths, plan),
        "uniform": uniforms,
    }

    # Every input is built before the model runs, so a length too short for a prompt fails at once.
    windows: dict[int, list[list[int]]] = {}
    if set(tasks) & set(TEXT_TASKS):
        longest = lengths[-1]
        cuts = token_windows(texts, tokenizer, longest, limit=limit)
        if not cuts:
            raise DataError(f"the evaluation text has no window of {longest} tokens (every text is shorter)")
        # Every length reads the same cuts (their last n tokens), so the curves over length differ
        # by context only, not by which text was read: the tokens scored at n are among those at 2n.
        windows = {n: [cut[longest - n :] for cut in cuts] for n in lengths}

    def count(default: int) -> int:
        wanted = samples if samples is not None else default
        return min(wanted, limit) if limit is not None else wanted

    keys: dict[int, list[PasskeySample]] = {}
    if "passkey" in tasks:
        keys = {n: passkey_samples(tokenizer, n, count(DEFAULT_PASSKEY_SAMPLES), seed) for n in lengths}
    prose = Prose(texts, tokenizer) if set(tasks) & set(PROSE_TASKS) else None
    prompts: dict[str, dict[int, list[TaskSample]]] = {
        task: {
            n: task_samples(task, tokenizer, n, count(DEFAULT_RULER_SAMPLES), seed, prose) for n in lengths
        }
        for task in tasks
        if task in RULER_TASKS
    }

    torch.manual_seed(seed)
    oracles = ORACLES if oracle else ()
    results: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in (*VARIANTS, *oracles)}
    # Per oracle and length: (measured density, inputs) of each group of inputs it ran on.
    measured: dict[str, dict[int, list[tuple[float, int]]]] = {
        name: {n: [] for n in lengths} for name in oracles
    }
    total = (
        len(VARIANTS + oracles) * sum(len(w) for w in windows.values())
        + len(VARIANTS + oracles) * sum(len(k) for k in keys.values())
        + len(VARIANTS) * sum(len(p) for by_length in prompts.values() for p in by_length.values())
    )
    device = next(model.parameters()).device

    def run(task: str, n: int, items: Sequence, score) -> None:
        """``score(batch) -> [per-sample records]`` for each variant; the uniform baseline that
        ``same_as_plan`` copies the plan's figures."""
        for name in VARIANTS:
            label = f"{task} {n} {name}"
            if name == "uniform" and same_as_plan[n]:
                _skip(advance(_batches(items, batch_size), label))
                results[name].setdefault(task, {})[str(n)] = results["plan"][task][str(n)]
                continue
            with variant(model, plans[name][n], backend, ranking if name == "plan" else "gate"):
                records = [r for batch in advance(_batches(items, batch_size), label) for r in score(batch)]
            results[name].setdefault(task, {})[str(n)] = _summary(items, records)

    def run_oracles(task: str, n: int, items: Sequence, score) -> None:
        """``score`` under each oracle, on the same batches as :func:`run`. The prompts share one
        length, so each batch is one unpadded full prefill, and the oracle selects for each of its
        sequences from that sequence's own attention (:func:`~moa_compress.oracle.apply_oracle`)."""
        from moa_compress.oracle import apply_oracle

        for name in oracles:
            with apply_oracle(model, plan, name, backend=backend) as handle:
                batches = advance(_batches(items, batch_size), f"{task} {n} {name}")
                records = [r for batch in batches for r in score(batch)]
            results[name].setdefault(task, {})[str(n)] = _summary(items, records)
            measured[name][n].append((handle.density, len(items)))

    with _progress(progress, total) as advance, torch.no_grad():
        for n in lengths:
            if n in windows:
                reference = _run_windows(
                    model, windows[n], n, plans, same_as_plan[n], tasks, (backend, ranking), device, results,
                    advance,
                )  # fmt: skip
                for name in oracles:
                    density = _run_oracle(
                        model, windows[n], reference, plan, name, tasks, backend, device, results, advance
                    )
                    measured[name][n].append((density, len(windows[n])))
            if n in keys:
                run("passkey", n, keys[n], lambda batch: _score_passkeys(model, batch, device))
                run_oracles("passkey", n, keys[n], lambda batch: _score_passkeys(model, batch, device))
            for task, by_length in prompts.items():
                run(task, n, by_length[n], lambda batch: _score_replies(model, tokenizer, batch, device))

    out = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "model": identity_of(model).to_dict(),
        "plan": {
            "name": plan.model.name,
            "path": None,
            "fingerprint": plan.model.fingerprint,
            "block_size": plan.block_size,
            "budget": plan.budget,
            "density": {str(n): plan.density(n) for n in lengths},
            "provenance": dict(plan.provenance),
        },
        "uniform": {
            "density": {str(n): u.density(n) for n, u in uniforms.items()},
            "rule": {
                str(n): describe_rule(u.rules[u.model.planned_layers[0]][0]) for n, u in uniforms.items()
            },
            "same_as_plan": {str(n): same_as_plan[n] for n in lengths},
        },
        "settings": {
            "tasks": list(tasks),
            "lengths": lengths,
            "samples": samples,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "backend": backend,
            "ranking": ranking if isinstance(ranking, str) else ranking.describe(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "data": None,
            "chat_template": has_chat_template(tokenizer),
            "oracle": oracle,
        },
        "command": None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {v: r for v, r in results.items()},
    }
    if oracle:
        out["oracles"] = {
            name: {"density": {str(n): _mean_density(measured[name][n]) for n in lengths}} for name in oracles
        }
        out["oracles"]["ratio"] = oracle_ratios(out)
    return out


def oracle_tasks_error(tasks: Sequence[str]) -> str:
    """The one-line complaint when ``--oracle`` has none of :data:`ORACLE_TASKS` to run on."""
    return (
        "--oracle runs on the text tasks (ppl, fidelity) and passkey, not on the ruler tasks (they "
        f"decode greedily); --tasks has {','.join(tasks)}"
    )


def _mean_density(groups: Sequence[tuple[float, int]]) -> float:
    """Mean over inputs of ``(mean density, inputs)`` groups (all inputs of one length)."""
    return sum(d * count for d, count in groups) / sum(count for _, count in groups)


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_windows(
    model, windows, n, plans, same_as_plan, tasks, runtime, device, results, advance
) -> list[torch.Tensor]:
    """ppl and fidelity at length ``n``: dense first (its states are the reference), then the others
    (``runtime``: :func:`variant`'s backend and ranking);
    a uniform baseline that ``same_as_plan`` copies the plan's figures instead of recomputing them.
    Returns the dense reference states of every window (``[n - n//2, hidden]`` each)."""
    half = n // 2
    reference: list[torch.Tensor] = []
    targets = [torch.tensor(w[half:], device=device) for w in windows]
    for name in VARIANTS:
        sums = _Sums()
        if name == "uniform" and same_as_plan:
            _skip(advance(windows, f"text {n} {name}"))
            for task in set(tasks) & set(TEXT_TASKS):
                results[name].setdefault(task, {})[str(n)] = results["plan"][task][str(n)]
            continue
        backend, ranking = runtime
        with variant(model, plans[name][n], backend, ranking if name == "plan" else "gate"):
            for i in advance(range(len(windows)), f"text {n} {name}"):  # counts windows, not tokens
                ids = torch.tensor([windows[i]], device=device)
                hidden = final_hidden(model, ids)[half - 1 : n - 1]  # predicts tokens half .. n-1
                if name == "dense":
                    reference.append(hidden)
                score_window(model, hidden, targets[i], None if name == "dense" else reference[i], sums)
        if "ppl" in tasks:
            results[name].setdefault("ppl", {})[str(n)] = sums.ppl()
        if "fidelity" in tasks and name != "dense":
            results[name].setdefault("fidelity", {})[str(n)] = sums.fidelity()
    return reference


def _run_oracle(model, windows, reference, plan, name, tasks, backend, device, results, advance) -> float:
    """ppl and fidelity of oracle ``name`` on ``windows`` (one length) against the dense
    ``reference`` states of :func:`_run_windows`; returns the oracle's measured density (mean over
    the windows)."""
    from moa_compress.oracle import apply_oracle

    n = len(windows[0])
    half = n // 2
    sums = _Sums()
    density = []
    for i in advance(range(len(windows)), f"text {n} {name}"):
        ids = torch.tensor([windows[i]], device=device)
        with apply_oracle(model, plan, name, backend=backend) as handle:
            hidden = final_hidden(model, ids)[half - 1 : n - 1]
        density.append(handle.density)
        score_window(model, hidden, ids[0, half:], reference[i], sums)
    if "ppl" in tasks:
        results[name].setdefault("ppl", {})[str(n)] = sums.ppl()
    if "fidelity" in tasks:
        results[name].setdefault("fidelity", {})[str(n)] = sums.fidelity()
    return sum(density) / len(density)


def oracle_ratios(results: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """``{"plan" | "uniform": {oracle: {N: {"ppl_gap", "kl"}}}}``: each variant's perplexity gap to
    dense (``ppl / dense - 1``) and KL as multiples of the oracle's; None where the oracle's is not
    positive (no ratio means anything) or the task was not run."""
    by = results["results"]

    def ratio(variant: str, other: str, task: str, n: str) -> float | None:
        mine, theirs = by[variant].get(task, {}).get(n), by[other].get(task, {}).get(n)
        if mine is None or theirs is None:
            return None
        if task == "ppl":
            dense = by["dense"]["ppl"][n]["ppl"]
            gap, base = mine["ppl"] / dense - 1, theirs["ppl"] / dense - 1
        else:
            gap, base = mine["kl"], theirs["kl"]
        return gap / base if base > 0 else None

    lengths = [str(n) for n in results["settings"]["lengths"]]
    return {
        variant: {
            other: {n: {"ppl_gap": ratio(variant, other, "ppl", n), "kl": ratio(variant, other, "fidelity", n)}
                    for n in lengths}
            for other in ORACLES
        }
        for variant in ("plan", "uniform")
    }  # fmt: skip


def _score_passkeys(model: Any, batch: Sequence[PasskeySample], device) -> list[dict[str, Any]]:
    """Teacher-forced: correct when the argmax at every key position is the key's token."""
    ids = torch.tensor([s.input_ids for s in batch], device=device)  # [B, N]: one length, no padding
    hidden = decoder_body(model)(input_ids=ids, use_cache=False).last_hidden_state  # [B, N, hidden]
    records = []
    for row, sample in enumerate(batch):
        lp = log_probs(model, hidden[row, sample.key_start - 1 : -1])  # [key tokens, vocab]
        answer = ids[row, sample.key_start :]
        correct = bool((lp.argmax(-1) == answer).all())
        records.append({"correct": correct, "logprob": float(lp.gather(1, answer[:, None]).mean())})
    return records


def _score_replies(model: Any, tokenizer: Any, batch: Sequence[TaskSample], device) -> list[dict[str, Any]]:
    """Greedy replies, exact match and the reference answer's mean token log-probability."""
    max_new = max(len(s.reference_ids) for s in batch) + REPLY_MARGIN
    replies, logprobs = greedy_replies(
        model,
        tokenizer,
        [s.input_ids for s in batch],
        [s.reference_ids for s in batch],
        max_new,
        device,
        # A reply that can no longer match is scored already: decoding it further costs time only.
        give_up=lambda row, reply: not can_still_match(reply, batch[row]),
    )
    return [
        {"correct": is_exact_match(reply, sample), "logprob": lp, "reply": reply}
        for sample, reply, lp in zip(batch, replies, logprobs, strict=True)
    ]


def _summary(items: Sequence, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean answer log-prob and per-sample records of one (variant, task, length); passkey
    also by depth."""

    def stats(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "answer_logprob": sum(r["logprob"] for r in rs) / len(rs),
            "samples": len(rs),
        }

    out = stats(records) | {"correct": [r["correct"] for r in records]}
    if "reply" in records[0]:
        out["replies"] = [r["reply"] for r in records]
    if isinstance(items[0], PasskeySample):  # the depth grid
        by_depth: dict[float, list[dict[str, Any]]] = {}
        for item, record in zip(items, records, strict=True):
            by_depth.setdefault(item.depth, []).append(record)
        out["by_depth"] = {f"{d:g}": stats(by_depth[d]) for d in sorted(by_depth)}
    return out


# ----------------------------------------------------------------------------------------------
# Greedy generation


def greedy_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    max_new_tokens: int,
    device: Any = None,
    give_up: Callable[[int, str], bool] | None = None,
) -> tuple[list[str], list[float]]:
    """Greedy replies to a batch of prompts and each reference continuation's mean log-probability.

    Prompts of different lengths are left-padded, with the padding masked and positions counted
    from each row's first real token (the plan's runtime computes for such a row what it computes
    unpadded). One prefill serves both jobs: the references are scored teacher-forced on top of it,
    the cache is cropped back to the prompt, and greedy decoding continues from the prompt until
    every row has ended (end-of-sequence, a line break, or a finished sentence), ``give_up(row,
    reply so far)`` is true for it, or ``max_new_tokens`` are produced.
    """
    device = device if device is not None else next(model.parameters()).device
    body = decoder_body(model)
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, S]
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, S]: 1 on real tokens
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    padded = not bool(mask.all())
    prompt_lengths = mask.sum(-1, keepdim=True)  # [B, 1]

    from transformers import DynamicCache

    from moa_compress.runtime import cache_kwarg

    cache = DynamicCache(config=model.config)  # filled in place by every forward below
    cache_name = cache_kwarg(body)

    def forward(tokens, positions, mask):  # [B, T], [B, T], [B, past + T] -> [B, T, hidden]
        return body(
            input_ids=tokens,
            attention_mask=mask if padded else None,  # unpadded: the plain causal (fast) path
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
        ).last_hidden_state

    hidden = forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
    first = log_probs(model, hidden[:, -1])  # [B, vocab]: the first reply token

    # The references, teacher-forced after the prompt (right-padded; causality keeps padding inert).
    steps = max(len(r) for r in references)
    refs = torch.zeros(batch, steps, dtype=torch.long, device=device)  # [B, A]
    for row, ref in enumerate(references):
        refs[row, : len(ref)] = torch.tensor(ref, device=device)
    ref_mask = torch.cat([mask, mask.new_ones(batch, steps)], dim=1)
    ref_hidden = forward(refs, prompt_lengths + torch.arange(steps, device=device), ref_mask)
    logprobs = []
    for row, ref in enumerate(references):
        lp = torch.cat(
            [first[row : row + 1], log_probs(model, ref_hidden[row, : len(ref) - 1])]
        )  # [a, vocab]
        logprobs.append(float(lp.gather(1, refs[row, : len(ref), None]).mean()))
    cache.crop(-steps)  # back to the prompt: greedy decoding starts there

    stop = _stop_ids(model, tokenizer)
    token = first.argmax(-1)  # [B]
    generated = [[int(t)] for t in token]

    def ended(row: int) -> bool:
        if _finished(tokenizer, generated[row], stop):
            return True
        return give_up is not None and give_up(
            row, tokenizer.decode(generated[row], skip_special_tokens=True)
        )

    done = [ended(row) for row in range(batch)]
    for step in range(max_new_tokens - 1):
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        hidden = forward(token[:, None], prompt_lengths + step, mask)
        token = log_probs(model, hidden[:, -1]).argmax(-1)
        for row in range(batch):
            if not done[row]:
                generated[row].append(int(token[row]))
                done[row] = ended(row)
    replies = [tokenizer.decode([t for t in g if t not in stop], skip_special_tokens=True) for g in generated]
    return replies, logprobs


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the tokenizer and the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def _finished(tokenizer: Any, tokens: Sequence[int], stop: set[int]) -> bool:
    """A reply has ended at an end-of-sequence token, a line break or a sentence end (scoring reads
    no further: :func:`moa_compress.tasks.answer_items`)."""
    if tokens[-1] in stop:
        return True
    text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
    return "\n" in text or bool(re.search(r"\.\s", text))


def _skip(items: Iterable) -> None:
    """Run an ``advance`` iterator to its end (keeps the progress bar's count right)."""
    for _ in items:
        pass


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """Yield ``advance(batches, label)``: iterates ``batches`` while a rich bar on stderr counts their
    items (a batch that is not a sequence counts as one item)."""
    if not enabled:
        yield lambda items, label: items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("eval", total=total)

        def advance(items: Iterable, label: str) -> Iterator:
            bar.update(task, description=label)
            for item in items:
                yield item
                bar.advance(task, len(item) if isinstance(item, Sequence) else 1)

        yield advance


def write_report(results: dict[str, Any], out_dir: str | Path, plan: Plan | None = None) -> Path:
    """Write ``results.json`` and ``report.md`` (+ PNG plots when matplotlib is installed) into
    ``out_dir``; return the report's path. See :mod:`moa_compress.report`."""
    from moa_compress.report import write_report as write

    return write(results, out_dir, plan)
