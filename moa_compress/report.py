"""The compression report: ``results.json``, ``report.md`` and PNG plots from an evaluation's results.

Plots need matplotlib (the ``plot`` extra), imported only here and only when present; without it the
report is still written and says the plots were skipped. Input: the object
:func:`moa_compress.evaluate.evaluate_plan` returns (schema in that module's docstring).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_compress.plan import ModelIdentity, Plan, atomic_write_bytes, rule_density

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
VARIANTS = ("dense", "plan", "uniform")
# Present with results["oracles"] (eval --oracle), on ppl, fidelity and passkey (not the ruler tasks)
ORACLES = ("oracle", "oracle-layer")
COLORS = {"dense": "#333333", "plan": "#1f77b4", "uniform": "#ff7f0e", "oracle": "#2ca02c"}
COLORS["oracle-layer"] = "#9467bd"
STYLES = {"dense": "o-", "plan": "s-", "uniform": "^--", "oracle": "v:", "oracle-layer": "D:"}


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / RESULTS_FILE
    atomic_write_bytes(path, (json.dumps(results, indent=1) + "\n").encode())
    return path


def write_report(results: Mapping[str, Any], out_dir: str | Path, plan: Plan | None = None) -> Path:
    """Write ``results.json``, the PNG plots (when matplotlib is installed) and ``report.md`` into
    ``out_dir``; return the path of ``report.md``. ``plan`` adds the per-head density heatmap."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out)
    if importlib.util.find_spec("matplotlib") is not None:
        plots = _write_plots(results, out, plan)
        plot_note = ""
    else:
        plots = {}
        plot_note = "Plots skipped: matplotlib is not installed (`pip install moa-compress[plot]`)."
    text = render_markdown(results, plots, plot_note, plan)
    path = out / REPORT_FILE
    atomic_write_bytes(path, text.encode())
    return path


def summary_text(results: Mapping[str, Any]) -> str:
    """A few terminal lines: per length, each task's headline figure for dense / plan / uniform."""
    by = results["results"]
    lines = ["(dense / plan / uniform)"]
    for n in _lengths(results):
        parts = [
            f"density plan {results['plan']['density'][n]:.3f}, uniform {results['uniform']['density'][n]:.3f}"
        ]
        if "ppl" in by["dense"]:
            parts.append("ppl " + " / ".join(f"{by[v]['ppl'][n]['ppl']:.3f}" for v in VARIANTS))
        if "fidelity" in by["plan"]:
            parts.append("KL " + " / ".join(f"{by[v]['fidelity'][n]['kl']:.4f}" for v in VARIANTS[1:]))
        for task in _generation_tasks(results):
            parts.append(
                f"{task} " + " / ".join(f"{100 * by[v][task][n]['accuracy']:.0f}%" for v in VARIANTS)
            )
        lines.append(f"{n:>6}: " + "; ".join(parts))
        if _oracles(results):
            lines.append("        " + "; ".join(_oracle_phrases(results, n)))
    return "\n".join(lines)


def _oracles(results: Mapping[str, Any]) -> list[str]:
    """The oracle variants this run has (none unless it ran with --oracle)."""
    return [o for o in ORACLES if o in results.get("oracles", {})]


def _task_variants(results: Mapping[str, Any], task: str) -> list[str]:
    """The variants with results for ``task``: dense, plan, uniform, then the oracles where they ran
    on it (passkey with --oracle, not the ruler tasks)."""
    by = results["results"]
    return [*VARIANTS, *(o for o in _oracles(results) if task in by.get(o, {}))]


def _multiple(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "—"


def _oracle_phrases(results: Mapping[str, Any], n: str) -> list[str]:
    """``"plan ppl gap = 2.99× oracle-layer's"``-style phrases for length ``n``; on passkey the plan's
    accuracy beside the oracle's (``"plan passkey 80% vs oracle's 93%"``)."""
    ratio = results["oracles"]["ratio"]["plan"]
    plan_passkey = _get(results, "plan", "passkey", n)
    phrases = []
    for oracle in _oracles(results):
        r = ratio[oracle][n]
        if r["ppl_gap"] is not None:
            phrases.append(f"plan ppl gap = {_multiple(r['ppl_gap'])} {oracle}'s")
        if r["kl"] is not None:
            phrases.append(f"plan KL = {_multiple(r['kl'])} {oracle}'s")
        theirs = _get(results, oracle, "passkey", n)
        if plan_passkey is not None and theirs is not None:
            phrases.append(
                f"plan passkey {100 * plan_passkey['accuracy']:.0f}% vs {oracle}'s "
                f"{100 * theirs['accuracy']:.0f}%"
            )
    return phrases


def _generation_tasks(results: Mapping[str, Any]) -> list[str]:
    """The tasks scored by accuracy (passkey and the ruler tasks), in the run's order."""
    return [t for t in results["settings"]["tasks"] if t not in ("ppl", "fidelity")]


# ----------------------------------------------------------------------------------------------
# Markdown


def _lengths(results: Mapping[str, Any]) -> list[str]:
    return [str(n) for n in results["settings"]["lengths"]]


def _get(results: Mapping[str, Any], variant: str, task: str, n: str) -> Mapping[str, Any] | None:
    return results["results"].get(variant, {}).get(task, {}).get(n)


def _delta(value: float, base: float) -> str:
    return f"{value:.3f} ({100 * (value / base - 1):+.1f}%)"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _windows_phrase(results: Mapping[str, Any]) -> str:
    model = results.get("model")
    return ModelIdentity.from_dict(model).windows_note() if model else ""


def render_markdown(
    results: Mapping[str, Any], plots: Mapping[str, str], plot_note: str = "", plan: Plan | None = None
) -> str:
    settings = results["settings"]
    tasks = settings["tasks"]
    lengths = _lengths(results)
    lines = [
        f"# Compression report: plan for {results['plan']['name']} on {results['model']['name']}",
        "",
        f"- command: `{results.get('command') or 'evaluate_plan(...) (library call)'}`",
        (
            f"- finished: {results['time']}; dtype {settings['dtype']}; backend {settings['backend']}; "
            f"seed {settings['seed']}; samples {settings.get('samples') or 'default'}; limit "
            f"{settings['limit']}; batch size {settings.get('batch_size', 1)}"
        ),
        (
            f"- plan: {results['plan'].get('path') or results['plan']['name']} (fingerprint "
            f"{results['plan']['fingerprint']}, block {results['plan']['block_size']}, budget "
            f"{results['plan']['budget']})"
        ),
        f"- natural text (ppl/fidelity, needle haystacks): {settings.get('data') or 'passed by the caller'}",
        "",
        (
            "Variants: **dense** (the model's own attention), **plan**, and **uniform**: one sink + one "
            "fixed window for every head, at the density nearest to the plan's at each length."
            + (
                f" On {_oracle_tasks_phrase(results)} also two **oracles**, which choose blocks from each "
                "input's true attention at the plan's densities (ceilings no plan can pass; see below)."
                if _oracles(results)
                else ""
            )
        ),
        "",
    ]
    lines += summary_section(results)
    lines += oracle_section(results)
    lines += [
        "## Density",
        "",
        "Fraction of the causal attention matrix computed, mean over layers and heads"
        + _windows_phrase(results)
        + ".",
        "",
    ]
    lines += _table(
        ["length", "plan", "uniform", "uniform rule"],
        [
            [
                n,
                f"{results['plan']['density'][n]:.4f}",
                f"{results['uniform']['density'][n]:.4f}",
                results["uniform"]["rule"][n]
                + (
                    " (= the plan: figures shared)"
                    if results["uniform"].get("same_as_plan", {}).get(n)
                    else ""
                ),
            ]
            for n in lengths
        ],
    )
    if "plan_heatmap" in plots:
        lines += [f"![per-head density]({plots['plan_heatmap']})", ""]

    if "ppl" in tasks:
        lines += [
            "## Perplexity",
            "",
            "Loss on the second half of non-overlapping N-token windows (change vs dense in brackets).",
            "",
        ]
        rows = []
        for n in lengths:
            dense = _get(results, "dense", "ppl", n)
            row = [n, str(dense["windows"]), str(dense["tokens"]), f"{dense['ppl']:.3f}"]
            row += [
                _delta(_get(results, v, "ppl", n)["ppl"], dense["ppl"])
                for v in ("plan", "uniform", *_oracles(results))
            ]
            rows.append(row)
        lines += _table(["length", "windows", "tokens", "dense", "plan", "uniform", *_oracles(results)], rows)

    if "fidelity" in tasks:
        lines += [
            "## Fidelity to dense",
            "",
            (
                "Mean KL(dense ‖ variant) of next-token distributions (nats/token) and top-1 agreement "
                "with dense, over the same scored positions. Lower KL, higher agreement is better."
            ),
            "",
        ]
        rows = []
        shown = ("plan", "uniform", *_oracles(results))
        for n in lengths:
            figures = [_get(results, v, "fidelity", n) for v in shown]
            rows.append(
                [n, str(figures[0]["windows"])]
                + [f"{f['kl']:.4f}" for f in figures]
                + [f"{100 * f['top1']:.1f}%" for f in figures]
            )
        lines += _table(
            ["length", "windows", *(f"KL {v}" for v in shown), *(f"top-1 {v}" for v in shown)], rows
        )
    if "quality" in plots:
        lines += [f"![quality vs length]({plots['quality']})", ""]

    if "passkey" in tasks:
        lines += [
            "## Passkey retrieval",
            "",
            (
                "A 5-digit key hidden in filler, asked through the chat template. Accuracy is greedy "
                "(teacher-forced: every key token is the argmax); log-prob is the mean over the key's "
                "tokens."
            ),
            "",
        ]
        lines += _accuracy_table(results, "passkey")
        shown = _task_variants(results, "passkey")
        rows = []
        for n in lengths:
            depths = _get(results, "dense", "passkey", n)["by_depth"]
            for depth in depths:
                stats = [_get(results, v, "passkey", n)["by_depth"][depth] for v in shown]
                rows.append(
                    [n, depth, str(stats[0]["samples"])] + [f"{100 * s['accuracy']:.0f}%" for s in stats]
                )
        lines += ["Accuracy by depth (0: right after the instruction, 1: right before the question):", ""]
        lines += _table(["length", "depth", "samples", *shown], rows)
        if "needle_heatmap" in plots:
            lines += [
                f"![passkey accuracy and key log-prob over length and depth]({plots['needle_heatmap']})",
                "",
            ]

    ruler = [t for t in _generation_tasks(results) if t != "passkey"]
    if ruler:
        lines += [
            "## Retrieval tasks (RULER-style)",
            "",
            (
                "Greedy replies through the chat template after an answer prefix, scored by exact match "
                "(case, whitespace and surrounding punctuation ignored; list order only where the task "
                "asks for it). Log-prob is the mean over the reference answer's tokens, teacher-forced. "
                "Haystacks: natural prose for the needle tasks, repeated filler for variable tracking."
            ),
            "",
        ]
        for task in ruler:
            lines += [f"### {task}", ""] + _accuracy_table(results, task)

    lines += _pareto_section(results, plots)
    if plot_note:
        lines += [plot_note, ""]
    return "\n".join(lines)


def _oracle_tasks_phrase(results: Mapping[str, Any]) -> str:
    """``"perplexity, fidelity and passkey"``: the tasks of this run the oracles ran on."""
    names = {"ppl": "perplexity", "fidelity": "fidelity", "passkey": "passkey"}
    ran = [names[t] for t in results["settings"]["tasks"] if t in names]
    return " and ".join([", ".join(ran[:-1]), ran[-1]] if len(ran) > 1 else ran)


def _accuracy_table(results: Mapping[str, Any], task: str) -> list[str]:
    shown = _task_variants(results, task)
    rows = []
    for n in _lengths(results):
        stats = [_get(results, v, task, n) for v in shown]
        rows.append(
            [n, str(stats[0]["samples"])]
            + [f"{100 * s['accuracy']:.0f}%" for s in stats]
            + [f"{s['answer_logprob']:.3f}" for s in stats]
        )
    header = ["length", "samples", *(f"acc {v}" for v in shown), *(f"log-prob {v}" for v in shown)]
    return _table(header, rows)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "—"  # nothing to compare against a zero


def _verdict(plan: float, uniform: float, higher_is_better: bool) -> str:
    if plan == uniform:
        return "= tie"
    return "▲ win" if (plan > uniform) == higher_is_better else "▼ loss"


def _windows_won(results: Mapping[str, Any], task: str, key: str, n: int) -> str:
    """``+won / −lost``: text windows where the plan's per-window figure (lower is better) beats the
    uniform baseline's and the reverse; empty for results written before per-window figures."""
    plan, uniform = (_get(results, v, task, n).get(key) for v in ("plan", "uniform"))
    if not plan or not uniform or len(plan) != len(uniform):
        return ""
    won = sum(a < b for a, b in zip(plan, uniform, strict=True))
    lost = sum(b < a for a, b in zip(plan, uniform, strict=True))
    return f"+{won} / −{lost}"


def summary_section(results: Mapping[str, Any]) -> list[str]:
    """One row per task and length: the plan against dense and uniform, the gap as a ratio, the
    number of samples, and whether the plan beats the uniform baseline (marked either way)."""
    tasks = results["settings"]["tasks"]
    rows = []
    for task in tasks:
        for n in _lengths(results):
            if task == "ppl":
                d, p, u = (_get(results, v, "ppl", n)["ppl"] for v in VARIANTS)
                count = _get(results, "dense", "ppl", n)["windows"]
                cells = [
                    f"{d:.3f}",
                    f"{p:.3f}",
                    f"{u:.3f}",
                    _ratio(p, d),
                    _ratio(p, u),
                    _windows_won(results, "ppl", "window_nll", n),
                    _verdict(p, u, False),
                ]
                rows.append([task + " (perplexity)", n, f"{count} windows", *cells])
            elif task == "fidelity":
                p, u = (_get(results, v, "fidelity", n)["kl"] for v in ("plan", "uniform"))
                count = _get(results, "plan", "fidelity", n)["windows"]
                cells = [
                    "0 (reference)",
                    f"{p:.4f}",
                    f"{u:.4f}",
                    "—",
                    _ratio(p, u),
                    _windows_won(results, "fidelity", "window_kl", n),
                    _verdict(p, u, False),
                ]
                rows.append([task + " (KL, nats/token)", n, f"{count} windows", *cells])
            else:
                d, p, u = (_get(results, v, task, n) for v in VARIANTS)
                won = sum(a and not b for a, b in zip(p["correct"], u["correct"], strict=True))
                lost = sum(b and not a for a, b in zip(p["correct"], u["correct"], strict=True))
                cells = [f"{100 * x['accuracy']:.0f}%" for x in (d, p, u)]
                cells += [_ratio(p["accuracy"], d["accuracy"]), _ratio(p["accuracy"], u["accuracy"])]
                cells += [f"+{won} / −{lost}", _verdict(p["accuracy"], u["accuracy"], True)]
                rows.append([task + " (accuracy)", n, str(d["samples"]), *cells])
    lines = [
        "## Summary",
        "",
        (
            "Per task and length: the plan against dense and the uniform baseline; ratios are plan ÷ "
            "dense and plan ÷ uniform (lower is better for perplexity and KL, higher for accuracy). "
            '"Samples won / lost" counts the prompts the plan answers right and uniform wrong, and '
            "the reverse (for perplexity and KL: the text windows where the plan's figure is lower than "
            "uniform's, and the reverse). The verdict compares the plan with uniform; with n samples, accuracy "
            "differences below about 1/√n are within noise."
        ),
        "",
    ]
    header = ["task", "length", "samples", "dense", "plan", "uniform", "plan ÷ dense", "plan ÷ uniform"]
    return lines + _table([*header, "samples won / lost", "plan vs uniform"], rows)


def oracle_section(results: Mapping[str, Any]) -> list[str]:
    """The plan and the uniform baseline against the oracles: per length, each oracle's measured
    density, perplexity and KL, and the plan's and uniform's gaps to dense as multiples of its (and,
    in the list above the table, the plan's passkey accuracy beside the oracles')."""
    oracles = _oracles(results)
    if not oracles:
        return []
    tasks = results["settings"]["tasks"]
    ratio = results["oracles"]["ratio"]
    rows = []
    for n in _lengths(results):
        for oracle in oracles:
            ppl, fid = _get(results, oracle, "ppl", n), _get(results, oracle, "fidelity", n)
            dense = _get(results, "dense", "ppl", n)
            row = [n, oracle, f"{results['oracles'][oracle]['density'][n]:.4f}"]
            row += [_delta(ppl["ppl"], dense["ppl"]) if ppl else "—"]
            row += [f"{fid['kl']:.4f}" if fid else "—", f"{100 * fid['top1']:.1f}%" if fid else "—"]
            for variant in ("plan", "uniform"):
                r = ratio[variant][oracle][n]
                row += [_multiple(r["ppl_gap"]) if "ppl" in tasks else "—", _multiple(r["kl"])]
            rows.append(row)
    lines = [
        "## Oracle ceilings",
        "",
        (
            "Two selections that read each input's true attention before choosing (so no plan can run "
            "them; they bound what a block selection at the plan's density can reach). Per layer, the "
            "causal softmax attention of that layer's own queries and keys is summed over each block; "
            "every query-block row keeps its sink and diagonal. **oracle**: per head and row, the other "
            "blocks of most mass, each head at its plan rule's density. **oracle-layer**: the layer's "
            "pair budget (the plan's, summed over its heads) spent over all its heads and rows by "
            "attention mass per pair. Density is measured (pairs computed ÷ causal pairs, over every "
            "input the oracle ran at that length). The last columns give the plan's and uniform's "
            "perplexity gap to dense (ppl ÷ dense − 1) and KL as multiples of the oracle's: 1× would be "
            "the ceiling. On passkey the oracles' accuracy is in the passkey tables below."
        ),
        "",
    ]
    phrases = [f"{n}: " + ", ".join(_oracle_phrases(results, n)) for n in _lengths(results)]
    lines += [f"- {p}" for p in phrases] + [""]
    header = ["length", "oracle", "density", "ppl (vs dense)", "KL", "top-1"]
    header += ["plan ppl gap ÷", "plan KL ÷", "uniform ppl gap ÷", "uniform KL ÷"]
    return lines + _table(header, rows)


def _pareto_section(results: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    provenance = results["plan"].get("provenance") or {}
    if "pareto" not in provenance:
        return []
    found = pareto_points(provenance)
    lines = ["## The search's Pareto set", ""]
    if found is None:
        return lines + ["The plan's provenance has a Pareto set in a form this report does not read.", ""]
    name, series = found
    rows = [
        [length or "all", f"{d:.4f}", f"{o:.6g}", "yes" if chosen else ""]
        for length, points in series.items()
        for d, o, chosen in points
    ]
    lines += _table(["length", "density", name, "chosen"], rows)
    if "pareto" in plots:
        lines += [f"![pareto]({plots['pareto']})", ""]
    return lines


# Names the search may give a Pareto point's fields, in order of preference.
_DENSITY_KEYS = ("density", "budget")
_OBJECTIVE_KEYS = (
    "loss",
    "validation_score",
    "validation_loss",
    "predicted_loss",
    "predicted_cost",
    "objective",
    "lost_influence",
    "cost",
)

ParetoSeries = dict[str, list[tuple[float, float, bool]]]


def pareto_points(provenance: Mapping[str, Any]) -> tuple[str, ParetoSeries] | None:
    """Read ``provenance["pareto"]``: a list of mappings, each with a density (``density`` or
    ``budget``: a number, or a mapping length -> number), an objective (first of ``_OBJECTIVE_KEYS``,
    likewise) and optionally ``chosen``.

    Returns ``(objective name, {length: [(density, objective, chosen)]})`` sorted by density; the
    length is ``""`` when the objective is one number per point (a per-length density is then
    averaged). None when the entries do not have that form.
    """
    entries = provenance.get("pareto")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        return None
    name = next((k for k in _OBJECTIVE_KEYS if isinstance(entries[0], Mapping) and k in entries[0]), None)
    if name is None:
        return None
    series: ParetoSeries = {}
    try:
        for entry in entries:
            density = next(entry[k] for k in _DENSITY_KEYS if k in entry)
            objective, chosen = entry[name], bool(entry.get("chosen", False))
            per_length = objective if isinstance(objective, Mapping) else {"": objective}
            for length, value in per_length.items():
                if isinstance(density, Mapping):
                    d = density[length] if length else sum(map(float, density.values())) / len(density)
                else:
                    d = density
                series.setdefault(str(length), []).append((float(d), float(value), chosen))
    except (TypeError, ValueError, KeyError, StopIteration):
        return None
    return name, {length: sorted(points) for length, points in series.items()}


# ----------------------------------------------------------------------------------------------
# Plots


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _write_plots(results: Mapping[str, Any], out: Path, plan: Plan | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    tasks = results["settings"]["tasks"]
    lengths = _lengths(results)
    xs = [int(n) for n in lengths]
    try:
        if plan is not None:
            n = xs[-1]
            grid = [[rule_density(r, n, plan.block_size) for r in heads] for heads in plan.rules]
            fig, ax = plt.subplots(
                figsize=(max(4.0, 0.35 * len(grid[0]) + 2), max(3.0, 0.22 * len(grid) + 1))
            )
            image = ax.imshow(
                grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.set(
                xlabel="query head",
                ylabel="layer",
                title=f"per-head density at {n} tokens (mean {plan.density(n):.3f})",
            )
            fig.colorbar(image, ax=ax)
            _save(fig, out / "plan_heatmap.png")
            plots["plan_heatmap"] = "plan_heatmap.png"
            plt.close(fig)

        panels = [t for t in ("ppl", "fidelity") if t in tasks]
        if panels:
            fig, axes = plt.subplots(
                1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, layout="constrained"
            )
            for ax, task in zip(axes[0], panels, strict=True):
                key, label = (
                    ("ppl", "perplexity") if task == "ppl" else ("kl", "KL(dense ‖ variant), nats/token")
                )
                shown = VARIANTS if task == "ppl" else ("plan", "uniform")
                for v in (*shown, *_oracles(results)):
                    ax.plot(
                        xs,
                        [_get(results, v, task, n)[key] for n in lengths],
                        STYLES[v],
                        color=COLORS[v],
                        label=v,
                    )
                ax.set(xscale="log", xlabel="length (tokens)", ylabel=label, xticks=xs, xticklabels=lengths)
                ax.minorticks_off()
                ax.legend()
            _save(fig, out / "quality_vs_length.png")
            plots["quality"] = "quality_vs_length.png"
            plt.close(fig)

        if "passkey" in tasks:
            _needle_heatmap(plt, results, out / "needle_heatmap.png")
            plots["needle_heatmap"] = "needle_heatmap.png"

        found = pareto_points(results["plan"].get("provenance") or {})
        if found:
            name, series = found
            fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
            for length, points in series.items():
                label = f"Pareto set at {length}" if length else "Pareto set"
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
                chosen = [p for p in points if p[2]]
                ax.plot([p[0] for p in chosen], [p[1] for p in chosen], "*", ms=14, color="red")
            ax.set(xlabel="density", ylabel=name, title="search Pareto set (red star: chosen)")
            ax.legend()
            _save(fig, out / "pareto.png")
            plots["pareto"] = "pareto.png"
            plt.close(fig)
    finally:
        plt.close("all")
    return plots


def gate_loss_report(trained, out_dir: str | Path) -> Path:
    """``report.md`` for :func:`moa_compress.gates.train_gates`: the settings, the distillation loss
    before and after, and the loss curve (``gate_loss.png`` when matplotlib is installed)."""
    out = Path(out_dir)
    s = trained.settings
    curve = trained.losses
    marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
    lines = [
        "# moa-compress gates",
        "",
        (
            f"Model `{trained.model.name}`: {trained.model.num_layers} layers, one gate per layer, "
            f"{'a gate head per query head' if s.per_query_head else 'a gate head per KV group'}; "
            f"blocks of {s.block_size} tokens, gate width {s.gate_dim}."
        ),
        (
            f"Distilled on {', '.join(f'{k} sample(s) of {n} tokens' for n, k in trained.samples.items())}; "
            f"{s.steps} AdamW steps, lr {s.lr:g}. Targets {trained.seconds['targets']:.0f} s, "
            f"training {trained.seconds['training']:.0f} s."
        ),
        "",
        "Distillation loss, KL(dense block attention ‖ gate) per query-block row (nats):",
        "",
        *_table(
            ["step", "loss"],
            [["0 (initial)", f"{trained.initial_loss:.4f}"]]
            + [[str(i + 1), f"{curve[i]:.4f}"] for i in marks],
        ),
    ]
    if trained.heldout:
        lines += [
            "",
            (
                f"On held-out samples (never trained on): {trained.heldout['initial']:.4f} before, "
                f"{trained.heldout['final']:.4f} after."
            ),
        ]
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        try:
            ax.plot(range(len(curve) + 1), [trained.initial_loss, *curve])
            ax.set_xlabel("step")
            ax.set_ylabel("KL per query-block row (nats)")
            ax.set_title("gate distillation loss")
            _save(fig, out / "gate_loss.png")
        finally:
            plt.close(fig)
        lines += ["", "![loss curve](gate_loss.png)"]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _needle_heatmap(plt, results: Mapping[str, Any], path: Path) -> None:
    """Passkey accuracy (top row) and mean key log-prob (bottom row) over length x depth, one column
    per variant that ran passkey (the oracles too, with --oracle); each cell is annotated with its
    value and sample count."""
    lengths = _lengths(results)
    shown = _task_variants(results, "passkey")
    depths = list(_get(results, "dense", "passkey", lengths[0])["by_depth"])
    fig, axes = plt.subplots(
        2,
        len(shown),
        figsize=(4.2 * len(shown), 1.2 * len(lengths) + 4.5),
        squeeze=False,
        layout="constrained",
    )
    grids = {
        (key, v): [
            [_get(results, v, "passkey", n)["by_depth"].get(d, {}).get(key, math.nan) for d in depths]
            for n in lengths
        ]
        for key in ("accuracy", "answer_logprob")
        for v in shown
    }
    lowest = min((x for g in grids.values() for row in g for x in row if not math.isnan(x)), default=-1.0)
    for r, (key, title, cmap, limits) in enumerate(
        (
            ("accuracy", "passkey accuracy", "RdYlGn", (0.0, 1.0)),
            ("answer_logprob", "mean key log-prob", "viridis", (min(lowest, -1e-3), 0.0)),
        )
    ):
        for c, v in enumerate(shown):
            ax = axes[r][c]
            grid = grids[(key, v)]
            image = ax.imshow(
                grid, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest"
            )
            for i, n in enumerate(lengths):
                for j, d in enumerate(depths):
                    cell = _get(results, v, "passkey", n)["by_depth"].get(d)
                    if cell:
                        text = f"{100 * cell[key]:.0f}%" if key == "accuracy" else f"{cell[key]:.2f}"
                        ax.text(j, i, f"{text}\nn={cell['samples']}", ha="center", va="center", fontsize=7)
            ax.set(
                title=f"{title}: {v}",
                xlabel="needle depth",
                ylabel="length (tokens)",
                xticks=range(len(depths)),
                xticklabels=depths,
                yticks=range(len(lengths)),
                yticklabels=lengths,
            )
        fig.colorbar(image, ax=axes[r][-1])
    _save(fig, path)
    plt.close(fig)
