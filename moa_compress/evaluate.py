"""Quality of a plan against dense attention and the uniform baseline: perplexity, fidelity, passkey.

Every task runs three *variants* of one model in one call:

* ``dense`` — the model as loaded (its own attention implementation);
* ``plan`` — the model under :func:`moa_compress.runtime.apply_plan` with the plan;
* ``uniform`` — the StreamingLLM-style baseline at the plan's own density: at each length ``N``, one
  fixed window for every head, with the plan's sink, whose density is the nearest to
  ``plan.density(N)`` that block granularity allows (see :func:`uniform_baseline`).

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
* ``passkey`` — a 5-digit key hidden at a depth (0.1 … 0.9) of filler text, asked through the chat
  template; the assistant turn starts with ``"The pass key is"`` and the key's tokens follow, for an
  input of exactly ``N`` tokens. Greedy accuracy is teacher-forced: a sample counts as correct when
  the argmax at every key position is the key's token — exactly the condition for greedy decoding to
  produce the key. ``key_logprob`` is the mean log-probability of the key's tokens. ``K`` samples per
  length are spread evenly over the depths; keys come from a seeded generator.

``results.json`` schema (``schema_version`` 1; lengths are JSON object keys, i.e. strings)::

    {
      "schema_version": 1,
      "model": {ModelIdentity fields of the evaluated model},
      "plan": {"name": str, "path": str | null, "fingerprint": str, "block_size": int,
               "budget": float | null, "density": {N: float}, "provenance": {...}},
      "uniform": {"density": {N: float}, "rule": {N: str},        # the baseline actually run
                  "same_as_plan": {N: bool}},     # true: the plan is that window; figures copied
      "settings": {"tasks": [str], "lengths": [int], "limit": int | null, "seed": int,
                   "backend": str, "dtype": str, "data": str | null, "chat_template": bool},
      "command": str | null,                                     # set by the CLI
      "time": str,                                               # ISO 8601, when the run finished
      "results": {
        "dense" | "plan" | "uniform": {
          "ppl": {N: {"ppl": float, "nll": float, "windows": int, "tokens": int}},
          "fidelity": {N: {"kl": float, "top1": float, "windows": int, "tokens": int}},  # not for dense
          "passkey": {N: {"accuracy": float, "key_logprob": float, "samples": int,
                          "by_depth": {depth: {"accuracy": float, "key_logprob": float, "samples": int}}}}
        }
      }
    }

Only requested tasks appear. Dense has no ``fidelity`` entry: it is the reference (KL 0, top-1 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moa_compress.data import DataError, token_windows
from moa_compress.errors import UserInputError
from moa_compress.plan import (
    DenseRule,
    Plan,
    PlanError,
    StaticRule,
    describe_rule,
    identity_of,
    rule_density,
    uniform_plan,
)

RESULTS_SCHEMA_VERSION = 1
TASKS = ("ppl", "fidelity", "passkey")
VARIANTS = ("dense", "plan", "uniform")
PASSKEY_DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_PASSKEY_SAMPLES = len(PASSKEY_DEPTHS)
# Twelve English Wikipedia articles carried in the package (CC BY-SA 3.0; texts/README.md): natural
# prose, ~180K tokens of the embedded model's tokenizer, every article longer than 8K tokens.
DEFAULT_DATA = Path(__file__).resolve().parent / "texts" / "wikipedia"
LOGIT_CHUNK = 256  # positions per lm_head chunk: 256 x 49152 fp32 logits = 48 MiB

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
_HAYSTACK = "@@HAYSTACK@@"


class EvalError(UserInputError):
    """Evaluation settings that cannot work: unknown task, length too long, no usable data."""


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"ppl,fidelity"`` or a sequence of names -> validated tuple in canonical order."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise EvalError(f"--tasks must list some of {', '.join(TASKS)}; got {','.join(names) or 'nothing'}")
    return tuple(t for t in TASKS if t in names)


def max_length(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_lengths(model: Any, lengths: Sequence[int]) -> list[int]:
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 4:
        raise EvalError(f"--lengths must be at least 4 tokens, got {lengths}")
    limit = max_length(model)
    if limit is not None and lengths[-1] > limit:
        raise EvalError(f"--lengths {lengths[-1]} exceeds the model's maximum of {limit} positions")
    return lengths


def default_texts(text_field: str = "text") -> tuple[list[str], str]:
    """The default evaluation text: the Wikipedia articles shipped in ``moa_compress/texts``.

    Raises :class:`DataError` (one line) when this install lacks them, naming ``--data``.
    """
    from moa_compress.data import load_texts

    if not DEFAULT_DATA.is_dir():
        raise DataError(
            f"no --data given and the default evaluation text ({DEFAULT_DATA}) is missing from this "
            "install; pass --data with a text file, folder or dataset"
        )
    return load_texts(DEFAULT_DATA, text_field=text_field), str(DEFAULT_DATA)


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
    rule = below.rules[0][0]
    if isinstance(rule, DenseRule):
        return below
    wider = StaticRule(sink, rule.alpha + bs, 0.0)
    if abs(rule_density(wider, n, bs) - target) < abs(rule_density(rule, n, bs) - target):
        rule = wider
    return _uniform_with(plan, rule, n)


def _uniform_with(plan: Plan, rule: StaticRule, n: int) -> Plan:
    rules = tuple(tuple(rule for _ in range(plan.model.num_heads)) for _ in range(plan.model.num_layers))
    return Plan(
        model=plan.model,
        rules=rules,
        block_size=plan.block_size,
        budget=plan.density(n),
        lengths=(n,),
        provenance={"method": "uniform"},
    )


# ----------------------------------------------------------------------------------------------
# Passkey


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt of exactly ``len(input_ids)`` tokens.

    ``input_ids``: the chat prompt, the assistant's ``"The pass key is"`` and then the key's tokens,
    which occupy ``input_ids[key_start:]``. ``needle_start`` is where the sentence holding the key
    begins, at ``depth`` (a fraction) of the filler.
    """

    input_ids: tuple[int, ...]
    key: str
    depth: float
    key_start: int
    needle_start: int


def passkey_depths(count: int) -> list[float]:
    """``count`` depths spread evenly over :data:`PASSKEY_DEPTHS` (cycling when count > 9)."""
    m = len(PASSKEY_DEPTHS)
    if count >= m:
        return [PASSKEY_DEPTHS[j % m] for j in range(count)]
    if count == 1:
        return [PASSKEY_DEPTHS[m // 2]]
    return [PASSKEY_DEPTHS[round(j * (m - 1) / (count - 1))] for j in range(count)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_parts(tokenizer: Any) -> tuple[str, str, bool]:
    """Text before and after the haystack, through the chat template when the tokenizer has one."""
    content = PASSKEY_INTRO + _HAYSTACK + PASSKEY_QUESTION
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        templated = True
    else:
        text = f"User: {content}\nAssistant: "
        templated = False
    head, tail = text.split(_HAYSTACK)
    return head, tail + PASSKEY_ANSWER_PREFIX, templated


def _key_tokens(tokenizer: Any, key: str) -> list[int]:
    """The key's tokens as they follow the answer prefix."""
    prefix = _encode(tokenizer, PASSKEY_ANSWER_PREFIX)
    full = _encode(tokenizer, f"{PASSKEY_ANSWER_PREFIX} {key}")
    if full[: len(prefix)] == prefix:
        return full[len(prefix) :]
    return _encode(tokenizer, f" {key}")


def passkey_samples(tokenizer: Any, length: int, count: int, seed: int = 0) -> list[PasskeySample]:
    """``count`` seeded passkey prompts of exactly ``length`` tokens, depths from :func:`passkey_depths`."""
    head, tail = (_encode(tokenizer, part) for part in _prompt_parts(tokenizer)[:2])
    filler = _encode(tokenizer, PASSKEY_FILLER)
    rng = random.Random(f"passkey/{seed}/{length}")
    samples = []
    for depth in passkey_depths(count):
        key = str(rng.randint(10000, 99999))
        needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
        answer = _key_tokens(tokenizer, key)
        n_filler = length - len(head) - len(needle) - len(tail) - len(answer)
        if n_filler < len(filler):
            raise EvalError(
                f"--lengths {length} is too short for the passkey prompt "
                f"(needs at least {length - n_filler + len(filler)} tokens)"
            )
        # Whole filler units end the haystack (so the question follows a full sentence); the
        # partial unit opens it. The needle goes on a unit boundary at the requested depth.
        units, partial = divmod(n_filler, len(filler))
        hay = filler[len(filler) - partial :] + filler * units
        cut = partial + round(depth * units) * len(filler)
        ids = head + hay[:cut] + needle + hay[cut:] + tail + answer
        samples.append(
            PasskeySample(
                input_ids=tuple(ids),
                key=key,
                depth=depth,
                key_start=len(ids) - len(answer),
                needle_start=len(head) + cut,
            )
        )
    return samples


# ----------------------------------------------------------------------------------------------
# Model pieces


def final_hidden(model: Any, input_ids: torch.Tensor) -> torch.Tensor:  # [1, S] -> [S, hidden]
    """Last-layer hidden states (after the final norm), without forming logits."""
    body = model.base_model
    if body is model:
        raise EvalError(f"{type(model).__name__} has no separate decoder body to read hidden states from")
    return body(input_ids=input_ids, use_cache=False).last_hidden_state[0]


def log_probs(model: Any, hidden: torch.Tensor) -> torch.Tensor:  # [P, hidden] -> [P, vocab], >= fp32
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@contextlib.contextmanager
def variant(model: Any, plan: Plan | None, backend: str) -> Iterator[None]:
    """Run the body with ``plan`` applied (dense when None)."""
    if plan is None:
        yield
        return
    from moa_compress.runtime import apply_plan

    with apply_plan(model, plan, backend=backend):
        yield


class _Sums:
    """Token-weighted sums for one (variant, length)."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.top1 = self.tokens = self.windows = 0

    def ppl(self) -> dict[str, Any]:
        nll = self.nll / self.tokens
        return {"ppl": math.exp(nll), "nll": nll, "windows": self.windows, "tokens": self.tokens}

    def fidelity(self) -> dict[str, Any]:
        return {
            "kl": self.kl / self.tokens,
            "top1": self.top1 / self.tokens,
            "windows": self.windows,
            "tokens": self.tokens,
        }


def score_window(
    model: Any,
    hidden: torch.Tensor,  # [P, hidden]: states predicting `targets`
    targets: torch.Tensor,  # [P]
    reference: torch.Tensor | None,  # [P, hidden]: dense states, or None for the dense pass itself
    sums: _Sums,
) -> None:
    """Add one window's NLL (and, against ``reference``, KL and top-1 agreement) to ``sums``."""
    for lo in range(0, hidden.shape[0], LOGIT_CHUNK):
        lp = log_probs(model, hidden[lo : lo + LOGIT_CHUNK])
        sums.nll -= float(lp.gather(1, targets[lo : lo + LOGIT_CHUNK, None]).double().sum())
        if reference is not None:
            ref = log_probs(model, reference[lo : lo + LOGIT_CHUNK])
            kl = torch.nn.functional.kl_div(lp, ref, reduction="none", log_target=True).sum(-1)
            sums.kl += float(kl.double().sum())
            sums.top1 += int((lp.argmax(-1) == ref.argmax(-1)).sum())
    sums.tokens += int(targets.numel())
    sums.windows += 1


# ----------------------------------------------------------------------------------------------
# The evaluation


def evaluate_plan(
    model: Any,
    tokenizer: Any,
    plan: Plan,
    *,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int],
    texts: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``tasks`` at ``lengths`` for dense, ``plan`` and the uniform baseline; return the
    ``results.json`` object (schema in the module docstring).

    ``texts`` feed ``ppl``/``fidelity`` (required for them); ``limit`` caps windows and passkey
    samples per length (passkey default: one per depth). Deterministic for a given ``seed``.
    """
    tasks = parse_tasks(tasks)
    lengths = check_lengths(model, lengths)
    plan.check_model(identity_of(model))
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be a positive number, got {limit}")
    uniforms = {n: uniform_baseline(plan, n) for n in lengths}
    # A plan that is itself one window for all heads *is* its baseline: run it once.
    same_as_plan = {
        n: uniforms[n].rules == plan.rules and uniforms[n].block_size == plan.block_size for n in lengths
    }
    plans: dict[str, dict[int, Plan | None]] = {
        "dense": dict.fromkeys(lengths),
        "plan": dict.fromkeys(lengths, plan),
        "uniform": uniforms,
    }

    windows: dict[int, list[list[int]]] = {}
    if "ppl" in tasks or "fidelity" in tasks:
        if not texts:
            raise DataError("ppl and fidelity need evaluation text (--data)")
        longest = lengths[-1]
        cuts = token_windows(texts, tokenizer, longest, limit=limit)
        if not cuts:
            raise DataError(f"the evaluation text has no window of {longest} tokens (every text is shorter)")
        # Every length reads the same cuts (their last n tokens), so the curves over length differ
        # by context only, not by which text was read: the tokens scored at n are among those at 2n.
        windows = {n: [cut[longest - n :] for cut in cuts] for n in lengths}
    samples: dict[int, list[PasskeySample]] = {}
    if "passkey" in tasks:
        count = limit if limit is not None else DEFAULT_PASSKEY_SAMPLES
        samples = {n: passkey_samples(tokenizer, n, count, seed) for n in lengths}

    torch.manual_seed(seed)
    results: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in VARIANTS}
    total = sum(len(w) for w in windows.values()) + sum(len(s) for s in samples.values())
    device = next(model.parameters()).device
    with _progress(progress, 3 * total) as advance, torch.no_grad():
        for n in lengths:
            if n in windows:
                _run_windows(
                    model, windows[n], n, plans, same_as_plan[n], tasks, backend, device, results, advance
                )
            if n in samples:
                for name in VARIANTS:
                    label = f"passkey {n} {name}"
                    if name == "uniform" and same_as_plan[n]:
                        _skip(advance(samples[n], label))
                        results[name].setdefault("passkey", {})[str(n)] = results["plan"]["passkey"][str(n)]
                        continue
                    with variant(model, plans[name][n], backend):
                        stats = [_run_passkey(model, s, device) for s in advance(samples[n], label)]
                    results[name].setdefault("passkey", {})[str(n)] = _passkey_summary(samples[n], stats)

    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "model": dataclasses.asdict(identity_of(model)),
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
            "rule": {str(n): describe_rule(u.rules[0][0]) for n, u in uniforms.items()},
            "same_as_plan": {str(n): same_as_plan[n] for n in lengths},
        },
        "settings": {
            "tasks": list(tasks),
            "lengths": lengths,
            "limit": limit,
            "seed": seed,
            "backend": backend,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "data": None,
            "chat_template": _prompt_parts(tokenizer)[2],
        },
        "command": None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {v: r for v, r in results.items()},
    }


def _run_windows(model, windows, n, plans, same_as_plan, tasks, backend, device, results, advance) -> None:
    """ppl and fidelity at length ``n``: dense first (its states are the reference), then the others;
    a uniform baseline that ``same_as_plan`` copies the plan's figures instead of recomputing them."""
    half = n // 2
    reference: list[torch.Tensor] = []
    targets = [torch.tensor(w[half:], device=device) for w in windows]
    for name in VARIANTS:
        sums = _Sums()
        if name == "uniform" and same_as_plan:
            _skip(advance(windows, f"text {n} {name}"))
            for task in set(tasks) & {"ppl", "fidelity"}:
                results[name].setdefault(task, {})[str(n)] = results["plan"][task][str(n)]
            continue
        with variant(model, plans[name][n], backend):
            for i, window in enumerate(advance(windows, f"text {n} {name}")):
                ids = torch.tensor([window], device=device)
                hidden = final_hidden(model, ids)[half - 1 : n - 1]  # predicts tokens half .. n-1
                if name == "dense":
                    reference.append(hidden)
                score_window(model, hidden, targets[i], None if name == "dense" else reference[i], sums)
        if "ppl" in tasks:
            results[name].setdefault("ppl", {})[str(n)] = sums.ppl()
        if "fidelity" in tasks and name != "dense":
            results[name].setdefault("fidelity", {})[str(n)] = sums.fidelity()


def _run_passkey(model: Any, sample: PasskeySample, device) -> tuple[bool, float]:
    ids = torch.tensor([sample.input_ids], device=device)
    hidden = final_hidden(model, ids)[sample.key_start - 1 : -1]
    lp = log_probs(model, hidden)
    answer = ids[0, sample.key_start :]
    correct = bool((lp.argmax(-1) == answer).all())
    return correct, float(lp.gather(1, answer[:, None]).mean())


def _passkey_summary(samples: Sequence[PasskeySample], stats: Sequence[tuple[bool, float]]) -> dict[str, Any]:
    def summary(pairs: list[tuple[bool, float]]) -> dict[str, Any]:
        return {
            "accuracy": sum(c for c, _ in pairs) / len(pairs),
            "key_logprob": sum(lp for _, lp in pairs) / len(pairs),
            "samples": len(pairs),
        }

    by_depth: dict[str, list[tuple[bool, float]]] = {}
    for sample, stat in zip(samples, stats, strict=True):
        by_depth.setdefault(f"{sample.depth:g}", []).append(stat)
    return summary(list(stats)) | {"by_depth": {d: summary(by_depth[d]) for d in sorted(by_depth)}}


def _skip(items: Iterable) -> None:
    """Run an ``advance`` iterator to its end (keeps the progress bar's count right)."""
    for _ in items:
        pass


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """Yield ``advance(items, label)``: iterates ``items`` while a rich bar on stderr counts them."""
    if not enabled:
        yield lambda items, label: items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("eval", total=total)

        def advance(items: Iterable, label: str) -> Iterator:
            bar.update(task, description=label)
            for item in items:
                yield item
                bar.advance(task)

        yield advance


def write_report(results: dict[str, Any], out_dir: str | Path, plan: Plan | None = None) -> Path:
    """Write ``results.json`` and ``report.md`` (+ PNG plots when matplotlib is installed) into
    ``out_dir``; return the report's path. See :mod:`moa_compress.report`."""
    from moa_compress.report import write_report as write

    return write(results, out_dir, plan)
