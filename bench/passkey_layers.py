"""Which layers' sparsity loses passkey retrieval: the eval's teacher-forced passkey (its 30 prompts per
length, a key found when every key token is the argmax) under edits of a plan, by layer range.

Each variant is a ``+``-joined list of edits of the plan (``plan`` alone: no edit):

* ``dense:LO-HI`` — every head of layers LO..HI dense (``dense:LO-HI:G``: KV group G only);
* ``only:LO-HI`` — the plan on layers LO..HI, every other layer dense;
* ``tail:LO-HI:T`` — the gate rules of layers LO..HI keep their last T query-block rows whole;
* ``local:LO-HI:W`` — the gate rules of layers LO..HI keep a local window of W blocks (at most a row's
  blocks but the sink: W = 32 makes them a sink plus a band);
* ``scale:LO-HI:F`` — the gate rules of layers LO..HI get F times their target.

Edits keep each rule's density exact but may break the plan's budget: every line prints the edited
plan's mean density at 1K / 2K / 4K / 8K. Usage::

    python bench/passkey_layers.py --plan PLAN --lengths 1024,2048 plan only:0-9 tail:20-29:1 ...

Prints one line per length and variant: keys found of 30, the key tokens' mean log-probability and the
keys found per depth (0, 0.2, … 1; five keys each).

``--task needle_number`` asks the eval's RULER-style needle task instead (a number hidden at a random
depth of natural text, the eval split of the shipped articles), teacher-forced the same way on its
reference reply: the same question on a haystack that does not repeat.

``--selection oracle`` (or ``oracle-layer``) runs the eval's oracle at the edited plan's per-head
densities instead of the plan (:mod:`moa_compress.oracle`): with ``only:A-B``, the blocks of most true
attention mass in those layers and dense attention elsewhere — whether better block choice there would
keep the keys, or only more density; ``oracle-layer~sampled:16`` runs that oracle on block mass estimated
from 16 sampled queries per block and query head (``gate_sources.oracle_mass_from``), and
``sampled-layer:16`` the runtime's allocation that does the same (``apply_plan(..., ranking=
"sampled-layer:16")``; in the layers of ``--source-layers`` only, if given). ``--selection``
may also name a source of block scores for the
plan's gate heads in place of their trained gates (``bench/gate_sources.py``: ``sampled:4``, ``mass``, …),
in the layers of ``--source-layers LO-HI`` only if given; ``--local W`` gives every gate head a local
window of W blocks (narrower too, which the ``local`` edit never makes it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from moa_compress.errors import PlanRuntimeError
from moa_compress.evaluate import decoder_body, default_texts, log_probs
from moa_compress.gate_runtime import PrefillRanking
from moa_compress.models import load_model
from moa_compress.oracle import ORACLES, apply_oracle
from moa_compress.plan import DenseRule, GateRule, Plan, Rule, load_plan
from moa_compress.runtime import apply_plan
from moa_compress.tasks import Prose, passkey_samples, task_samples

BATCH = 5


def _edited_rule(kind: str, args: Sequence[str], rule: Rule, group: int) -> Rule:
    if kind == "dense" and (not args or group == int(args[0])):
        return DenseRule()
    if isinstance(rule, GateRule):
        if kind == "tail":
            return dataclasses.replace(rule, tail=int(args[0]))
        if kind == "local":
            return dataclasses.replace(rule, local=max(rule.local, int(args[0])))
        if kind == "scale":
            return dataclasses.replace(rule, target=min(1.0, rule.target * float(args[0])))
    return rule


def edited(plan: Plan, variant: str) -> Plan:
    """``plan`` with the edits of ``variant`` (module docstring)."""
    rules = [list(heads) for heads in plan.rules]
    per_group = plan.model.num_heads // plan.model.num_kv_heads
    for part in variant.split("+"):
        if part == "plan":
            continue
        kind, span, *args = part.split(":")
        if kind not in ("dense", "only", "tail", "local", "scale"):
            raise SystemExit(f"unknown edit {kind!r} in {variant!r}")
        lo, hi = (int(x) for x in span.split("-"))
        for layer, heads in enumerate(rules):
            inside = lo <= layer <= hi
            for head, rule in enumerate(heads):
                if kind == "only":
                    heads[head] = rule if inside else DenseRule()
                elif inside:
                    heads[head] = _edited_rule(kind, args, rule, head // per_group)
    return dataclasses.replace(plan, rules=tuple(tuple(heads) for heads in rules))


def selected(model, plan: Plan, selection: str, layers: range | None = None, local: int | None = None):
    """The context that runs ``model`` under ``plan`` (``selection`` "plan"), one of the eval's oracles
    at ``plan``'s per-head densities, or ``plan`` with its gate heads ranking blocks by a source of
    ``bench/gate_sources.py`` (in ``layers`` only, if given; every gate head's window ``local``, if given)."""
    if selection in ORACLES:
        return apply_oracle(model, plan, selection)
    if "~" in selection:  # an oracle from sampled mass, e.g. oracle-layer~sampled:16
        kind, _, source = selection.partition("~")
        return _estimated(model, plan, kind, int(source.partition(":")[2]))
    if is_layer_ranking(selection):
        return apply_plan(model, plan, ranking=PrefillRanking.parse(selection, layers))
    if selection == "plan" and local is None:
        return apply_plan(model, plan)
    return _scored(model, plan, "gate" if selection == "plan" else selection, layers, local)


def gate_sources():
    """The module ``bench/gate_sources.py``, also where this file is loaded by path (tests, runpy)."""
    name = "gate_sources"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def is_estimated_oracle(selection: str) -> bool:
    """``ORACLE~sampled:R``: an oracle choosing from block mass estimated by R sampled queries per block."""
    kind, tilde, source = selection.partition("~")
    return (
        bool(tilde) and kind in ORACLES and source.startswith("sampled:") and gate_sources().is_source(source)
    )


def is_layer_ranking(selection: str) -> bool:
    """``sampled-layer:R`` / ``sampled-layer-all:R``: the runtime's layer-wide allocations."""
    try:
        return PrefillRanking.parse(selection).scope != "row"
    except PlanRuntimeError:
        return False


@contextlib.contextmanager
def _estimated(model, plan: Plan, kind: str, samples: int):
    with gate_sources().oracle_mass_from(samples), apply_oracle(model, plan, kind):
        yield


@contextlib.contextmanager
def _scored(model, plan: Plan, source: str, layers: range | None, local: int | None):
    with gate_sources().scored_by(source, local, layers), apply_plan(model, plan):
        yield


def layer_range(text: str) -> range:
    """``"LO-HI"`` (or ``"L"``) as the layers ``LO..HI`` (an argparse ``type``: a ValueError on bad text)."""
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


@torch.no_grad()
def score(
    model,
    plan: Plan,
    prompts: Sequence[tuple[list[int], int]],
    selection: str = "plan",
    layers: range | None = None,
    local: int | None = None,
) -> tuple[list[bool], float]:
    """Per ``(ids, answer_start)``: found when every answer token is the argmax after the tokens before it
    (teacher-forced, as `moa-compress eval` scores passkey); and the answer tokens' mean log-probability."""
    found, logprobs = [], []
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([seq + seq[-1:] * (width - len(seq)) for seq, _ in batch])  # [B, N]
        with selected(model, plan, selection, layers, local):
            hidden = decoder_body(model)(input_ids=ids, use_cache=False).last_hidden_state
        for row, (seq, begin) in enumerate(batch):
            lp = log_probs(model, hidden[row, begin - 1 : len(seq) - 1])  # [answer tokens, vocab]
            answer = ids[row, begin : len(seq)]
            found.append(bool((lp.argmax(-1) == answer).all()))
            logprobs.append(float(lp.gather(1, answer[:, None]).mean()))
    return found, sum(logprobs) / len(logprobs)


def prompts_of(
    task: str, tokenizer, n: int, count: int
) -> tuple[list[tuple[list[int], int]], list[float | None]]:
    """``(ids, answer_start)`` per prompt and its depth (None where the task does not record one)."""
    if task == "passkey":
        keys = passkey_samples(tokenizer, n, count, 0)
        return [(list(s.input_ids), s.key_start) for s in keys], [s.depth for s in keys]
    samples = task_samples(task, tokenizer, n, count, 0, Prose(default_texts()[0], tokenizer))
    prompts = [(list(s.input_ids) + list(s.reference_ids), len(s.input_ids)) for s in samples]
    return prompts, [None] * len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--task", default="passkey", choices=("passkey", "needle_number"))
    parser.add_argument("--selection", default="plan", help="plan, an oracle or a gate source")
    parser.add_argument(
        "--source-layers", type=layer_range, default=None, help="LO-HI: the layers a gate source scores"
    )
    parser.add_argument("--local", type=int, default=None, help="every gate head's local window (blocks)")
    parser.add_argument("variants", nargs="+", help="edits of the plan (module docstring)")
    args = parser.parse_args()
    if not (
        args.selection in ("plan", *ORACLES)
        or gate_sources().is_source(args.selection)
        or is_estimated_oracle(args.selection)
        or is_layer_ranking(args.selection)
    ):
        parser.error(
            "--selection is plan, an oracle (or ORACLE~sampled:R), sampled-layer:R or a gate source, "
            f"got {args.selection!r}"
        )
    plan = load_plan(args.plan)
    model, tokenizer = load_model(None)
    variants = {name: edited(plan, name) for name in args.variants}
    for n in (int(x) for x in args.lengths.split(",")):
        prompts, depths_of = prompts_of(args.task, tokenizer, n, args.samples)
        for name, variant in variants.items():
            found, logprob = score(model, variant, prompts, args.selection, args.source_layers, args.local)
            by_depth: dict[float, list[bool]] = {}
            for depth, ok in zip(depths_of, found, strict=True):
                if depth is not None:
                    by_depth.setdefault(depth, []).append(ok)
            depths = " ".join(f"{d:g}:{sum(v)}" for d, v in sorted(by_depth.items())) or "-"
            density = "/".join(f"{variant.density(m):.3f}" for m in (1024, 2048, 4096, 8192))
            print(
                f"{n}  {name}: {sum(found)}/{len(found)}  log-prob {logprob:.3f}  by depth [{depths}]"
                f"  density {density}",
                flush=True,
            )


if __name__ == "__main__":
    main()
