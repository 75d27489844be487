"""The ``moa-compress`` command: parses arguments, calls library functions, prints. No logic here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moa_compress.errors import UserInputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress an LLM's attention into a per-head sparse plan and run it fast.",
)
plan_app = typer.Typer(no_args_is_help=True, help="Make, inspect and validate plans.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print tables (and --json).")
app.add_typer(plan_app, name="plan")
app.add_typer(bench_app, name="bench")

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Hugging Face folder, hub id, or .gguf file. Default: the embedded SmolLM2-135M-Instruct."
    ),
]
DTYPE_HELP = (
    "auto (bfloat16 where the device computes it natively: a GPU, or a CPU with AVX512-BF16, AMX or Arm "
    "BF16; float32 on other CPUs) | bfloat16 | float32 | float16"
)
DtypeOpt = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]
RankingOpt = Annotated[
    str | None,
    typer.Option(
        help="How a prompt's key blocks are chosen: gate (the plan's trained gates rank its gate heads' "
        "blocks); sampled:R (the true attention of R sampled queries per 64-token block ranks them: closer "
        "to the oracle, costs about R/64 of dense attention); sampled-layer:R (every head keeps its "
        "rule's fixed blocks; the gate heads' free choice, pooled over the layer, goes to the heads and "
        "rows of most attention mass estimated from R sampled queries per block and query head; R = 16 "
        "costs about 30% of dense attention's time); or sampled-layer-all:R (the same with the "
        "whole layer budget moving: every head keeps only its sink and diagonal). Default: as the plan "
        "says (compress --ranking), else gate. Decoding steps keep the plan's rules and gates either way.",
    ),
]
RankingLayersOpt = Annotated[
    str | None,
    typer.Option(help="Layers that rank by --ranking (LO-HI or A,B,...). Default: every layer."),
]
RankingMinLengthOpt = Annotated[
    int,
    typer.Option(
        help="Prompts shorter than this many tokens keep the plan's own selection (--ranking applies from here)."
    ),
]


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn):
    """Turn :class:`UserInputError` (and missing files) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from moa_compress import distributed

        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            _fail_once(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2)
        except (FileExistsError, FileNotFoundError) as exc:
            _fail_once(str(exc).splitlines()[0], 2)
        except distributed.RankFailedError as exc:
            _fail_once(str(exc), 1)
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        finally:
            distributed.close()

    return wrapper


def _fail_once(message: str, code: int) -> None:
    """Under torchrun only rank 0 prints the error (every rank exits with ``code``)."""
    from moa_compress import distributed

    if distributed.current().is_main:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_lengths(text: str, option: str = "--lengths", least: int = 1) -> list[int]:
    """Comma-separated integers, each at least ``least`` (positive lengths by default)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated integers, got {text!r}")
    if not lengths or any(n < least for n in lengths):
        fail(
            f"{option} must list {'positive lengths' if least == 1 else f'whole numbers >= {least}'}, got {text!r}"
        )
    return lengths


def _counts(text: str | None, option: str, least: int = 1) -> int | tuple[int, ...] | None:
    """A count per length (``--samples 6,2,2``) or one for every length (``--samples 4``)."""
    if not text:
        return None
    counts = parse_lengths(text, option, least=least)
    return counts[0] if len(counts) == 1 else tuple(counts)


def check_fraction(value: float, option: str) -> float:
    if not 0.0 < value <= 1.0:
        fail(f"{option} must be in (0, 1], got {value}")
    return value


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


DeviceMapOpt = Annotated[
    str | None,
    typer.Option(help="Spread a model too big for one device: auto (accelerate's device map)."),
]
MaxMemoryOpt = Annotated[
    str | None, typer.Option(help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
]


def named_plans(paths: list[str], net: Any) -> dict[str, Any]:
    """``--plan`` values loaded for ``net``, each named by its folder (a ``plan.json`` path by the
    folder holding it); two with the same name are a one-line error."""
    from moa_compress.plan import load_plan

    plans: dict[str, Any] = {}
    for given in paths:
        path = Path(str(given))
        name = (path.parent.name if path.suffix == ".json" else path.name) or str(given)
        if name in plans:
            fail(f"two --plan values are both named {name!r}; give plans in folders of different names")
        plans[name] = load_plan(given, net)
    return plans


def load(model: str | None, dtype: str, device_map: str | None = None, max_memory: str | None = None):
    """The model and tokenizer; under torchrun with NCCL on this rank's GPU (see moa_compress.distributed)."""
    from moa_compress import distributed
    from moa_compress.models import ModelLoadError, load_model, parse_max_memory

    if max_memory and not device_map:
        raise ModelLoadError("--max-memory needs --device-map")
    quiet_transformers()
    return load_model(
        model,
        dtype=dtype,
        device=distributed.device(),
        device_map=device_map,
        max_memory=parse_max_memory(max_memory),
    )


# ----------------------------------------------------------------------------------------------
# plan


@plan_app.command("uniform")
@user_errors
def plan_uniform(
    model: ModelArg = None,
    density: Annotated[float, typer.Option(help="Target density in (0, 1].")] = 0.25,
    lengths: Annotated[
        str, typer.Option(help="Comma-separated lengths the density must hold at.")
    ] = "2048,4096,8192",
    sink_blocks: Annotated[int, typer.Option(help="Leading key blocks every query sees.")] = 1,
    block_size: Annotated[int, typer.Option(help="Block size in tokens.")] = 64,
    out: Annotated[Path, typer.Option(help="Output folder for plan.json.")] = Path("plan-uniform"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing plan.")] = False,
) -> None:
    """One sink + the widest window for every head that keeps density <= D at every length."""
    from moa_compress.models import load_config
    from moa_compress.plan import ModelIdentity, provenance, save_plan, uniform_plan

    check_fraction(density, "--density")
    ns = parse_lengths(lengths)
    if (out / "plan.json").exists() and not force:
        fail(f"{out / 'plan.json'} exists; pass --force to overwrite")
    identity = ModelIdentity.from_config(load_config(model), name=model or "SmolLM2-135M-Instruct")
    plan = uniform_plan(
        identity,
        density,
        ns,
        block_size=block_size,
        sink_blocks=sink_blocks,
        provenance=provenance(" ".join(["moa-compress", *sys.argv[1:]])),
    )
    path = save_plan(plan, out, force=force)
    typer.echo(f"wrote {path}: {describe_densities(plan, ns)}")


def describe_densities(plan, lengths) -> str:
    return ", ".join(f"density@{n}={plan.density(n):.4f}" for n in lengths)


@plan_app.command("show")
@user_errors
def plan_show(
    plan_path: Annotated[
        str, typer.Argument(metavar="PLAN", help="Plan folder, plan.json, or shipped plan name.")
    ],
    lengths: Annotated[str | None, typer.Option(help="Lengths to report (default: the plan's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable object.")] = False,
) -> None:
    """Per-layer summary of a plan and its density at lengths."""
    from moa_compress.gate_runtime import PrefillRanking
    from moa_compress.plan import load_plan, plan_summary

    plan = load_plan(plan_path)
    ns = parse_lengths(lengths) if lengths else list(plan.lengths or (2048, 4096, 8192))
    summary = plan_summary(plan, ns)
    ranking = PrefillRanking.for_plan(plan)
    summary["ranking"] = "gate" if ranking is None else ranking.describe()  # how gate heads rank prompts
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    model = summary["model"]
    typer.echo(
        f"plan for {model['name']} ({model['num_layers']} layers x {model['num_heads']} heads, "
        f"{model['num_kv_heads']} KV heads), block {plan.block_size}, budget {plan.budget}"
    )
    typer.echo("density: " + ", ".join(f"{n}: {d:.4f}" for n, d in summary["density"].items()))
    if ranking is not None:
        typer.echo(
            f"ranking: {summary['ranking']} (how gate heads rank a prompt's blocks; decoding: the gates)"
        )
    header = "layer  " + "  ".join(f"d@{n:<6}" for n in ns) + "  rules"
    typer.echo(header)
    for row in summary["layers"]:
        dens = "  ".join(f"{row['density'][str(n)]:<8.4f}" for n in ns)
        typer.echo(f"{row['layer']:>5}  {dens}  {row['rules']}")


@plan_app.command("validate")
@user_errors
def plan_validate(
    plan_path: Annotated[
        str, typer.Argument(metavar="PLAN", help="Plan folder, plan.json, or shipped plan name.")
    ],
    model: ModelArg = None,
    check_model: Annotated[bool, typer.Option(help="Also check the plan against MODEL.")] = True,
) -> None:
    """Check a plan's schema, rules, and (by default) that it fits MODEL."""
    from moa_compress.models import load_config
    from moa_compress.plan import ModelIdentity, load_plan

    plan = load_plan(plan_path)
    if check_model:
        plan.check_model(ModelIdentity.from_config(load_config(model)))
    typer.echo(
        f"ok: {plan.model.name}, schema {plan.schema_version}, "
        f"{describe_densities(plan, plan.lengths or (2048, 4096, 8192))}"
    )


# --- bench


def parse_ranking(ranking: str | None, layers: str | None, min_length: int = 0):
    """``--ranking`` / ``--ranking-layers`` / ``--ranking-min-length`` -> a
    :class:`~moa_compress.gate_runtime.PrefillRanking`, or None (as the plan says)."""
    from moa_compress.gate_runtime import PrefillRanking

    for given, option in (
        (layers is not None, "--ranking-layers"),
        (min_length != 0, "--ranking-min-length"),
    ):
        if given and ranking in (None, "gate"):
            fail(f"{option} needs a --ranking other than gate")
    if ranking is None:
        return None
    try:
        return PrefillRanking.parse(ranking, layers, min_length)
    except UserInputError as exc:
        fail(f"--ranking / --ranking-layers / --ranking-min-length: {exc}")


def parse_ranking_layers(text: str | None) -> tuple[int, ...] | None:
    from moa_compress.gate_runtime import parse_layers

    if text is None:
        return None
    try:
        return tuple(sorted(parse_layers(text)))
    except UserInputError as exc:
        fail(f"--ranking-layers: {exc}")


def parse_list(text: str, option: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be a comma-separated list, got {text!r}")
    if not values:
        fail(f"{option} must not be empty")
    return values


ThreadsOpt = Annotated[int, typer.Option(help="torch threads (the shared CPU machine: 2 at most).")]
RepeatsOpt = Annotated[int, typer.Option(help="Timed rounds; each time is the best round.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable object instead of tables.")]


def echo_progress(line: str) -> None:
    typer.echo(line, err=True)


def command_line() -> str:
    return " ".join(["moa-compress", *sys.argv[1:]])


@bench_app.command("attention")
@user_errors
def bench_attention_cmd(
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths.")] = "2048,4096,8192",
    dtypes: Annotated[str, typer.Option(help="Comma-separated: float32, bfloat16.")] = "float32,bfloat16",
    densities: Annotated[str, typer.Option(help="Comma-separated densities in (0, 1].")] = "1,0.5,0.25,0.1",
    backends: Annotated[str, typer.Option(help="Comma-separated: torch, flex.")] = "torch,flex",
    repeats: RepeatsOpt = 3,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
    ranking_samples: Annotated[
        int,
        typer.Option(
            help="Also time the gate heads' selection ranked by this many sampled queries per block "
            "(--ranking sampled:R); 0 leaves it out."
        ),
    ] = 4,
    layer_samples: Annotated[
        int,
        typer.Option(
            help="Also time a layer's blocks allocated over all its heads from this many sampled queries "
            "per block and query head (--ranking sampled-layer:R); 0 leaves it out."
        ),
    ] = 16,
) -> None:
    """Block-sparse attention (9 query / 3 KV heads x 64, uniform sink + window layouts) vs dense causal SDPA."""
    import torch

    from moa_compress.bench import attention_table, bench_attention, machine

    torch.set_num_threads(threads)
    names = parse_list(backends, "--backends", str)
    typer.echo(f"machine: {machine()}", err=True)
    rows = bench_attention(
        parse_lengths(lengths),
        parse_list(dtypes, "--dtypes", str),
        parse_list(densities, "--densities"),
        names,
        repeats=repeats,
        progress=echo_progress,
        ranking_samples=ranking_samples,
        layer_samples=layer_samples,
    )
    if as_json:
        typer.echo(json.dumps({"command": command_line(), "machine": machine(), "rows": rows}, indent=1))
    else:
        typer.echo(attention_table(rows, names))


ModelDtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: " + DTYPE_HELP)]


@bench_app.command("prefill")
@user_errors
def bench_prefill_cmd(
    model: ModelArg = None,
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "2048,4096,8192",
    density: Annotated[float, typer.Option(help="Density of the uniform plan.")] = 0.25,
    backends: Annotated[str, typer.Option(help="Comma-separated: torch, flex.")] = "torch,flex",
    plan: Annotated[
        list[str] | None,
        typer.Option(
            help="A plan (folder, plan.json or shipped name) to time as well, through the first backend; "
            "repeatable."
        ),
    ] = None,
    ranking: Annotated[
        list[str] | None,
        typer.Option(
            help="Also time each --plan with its prompt ranked this way (gate, sampled:R, sampled-layer:R, "
            "sampled-layer-all:R; see eval --ranking), a column each; repeatable."
        ),
    ] = None,
    dtype: ModelDtypeOpt = "auto",
    repeats: RepeatsOpt = 2,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Whole-model prefill: dense SDPA vs a uniform plan per backend (and any --plan)."""
    import torch

    from moa_compress.bench import bench_prefill, machine, prefill_columns, prefill_table

    check_fraction(density, "--density")
    rankings = list(ranking or [])
    if rankings and not plan:
        fail("--ranking ranks the prompts of a --plan; give one")
    for given in rankings:
        parse_ranking(given, None)
    torch.set_num_threads(threads)
    names = parse_list(backends, "--backends", str)
    net, _ = load(model, dtype)
    plans = named_plans(plan or [], net)
    typer.echo(f"machine: {machine()}", err=True)
    rows = bench_prefill(
        net, parse_lengths(lengths), density, names, repeats=repeats, plans=plans, rankings=rankings,
        progress=echo_progress,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"command": command_line(), "machine": machine(), "rows": rows}, indent=1))
    else:
        typer.echo(prefill_table(rows, prefill_columns(names, plans, rankings)))


@bench_app.command("decode")
@user_errors
def bench_decode_cmd(
    model: ModelArg = None,
    contexts: Annotated[str, typer.Option(help="Comma-separated context lengths.")] = "2048,8192",
    densities: Annotated[
        str,
        typer.Option(
            help="Densities of the uniform plans (1: every head dense, through the plan cache and its step)."
        ),
    ] = "0.5,0.25",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,16,32",
    budget_gib: Annotated[float, typer.Option(help="KV budget for the largest-batch rows, GiB.")] = 4.0,
    backend: Annotated[str, typer.Option(help="Attention backend for the plan: torch or flex.")] = "torch",
    steps: Annotated[int, typer.Option(help="Timed decode steps per row.")] = 8,
    plan: Annotated[
        list[str] | None,
        typer.Option(help="A plan (folder, plan.json or shipped name) to time as well; repeatable."),
    ] = None,
    dtype: ModelDtypeOpt = "auto",
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Decode steps: ms/step, tokens/s, KV bytes and RSS, dense DynamicCache vs plans + PlanKVCache,
    per batch size, and the largest batch whose KV fits the budget."""
    import torch

    from moa_compress.bench import bench_decode, decode_table, machine

    density_list = parse_list(densities, "--densities")
    for d in density_list:
        check_fraction(d, "--densities")
    batches = parse_list(batch, "--batch", int)
    if steps < 1 or min(batches) < 1 or budget_gib <= 0:
        fail("--steps, --batch and --budget-gib must be positive")
    torch.set_num_threads(threads)
    net, _ = load(model, dtype)

    plans = named_plans(plan or [], net)
    typer.echo(f"machine: {machine()}", err=True)
    rows = bench_decode(
        net,
        parse_lengths(contexts, "--contexts"),
        density_list,
        batches,
        backend,
        steps=steps,
        budget_bytes=int(budget_gib * 2**30),
        plans=plans,
        progress=echo_progress,
    )
    if as_json:
        typer.echo(json.dumps({"command": command_line(), "machine": machine(), "rows": rows}, indent=1))
    else:
        typer.echo(decode_table(rows))


# --- eval


@app.command("eval")
@user_errors
def eval_command(
    model: ModelArg = None,
    plan: Annotated[str, typer.Option("--plan", help="Plan folder, plan.json, or shipped plan name.")] = ...,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated: ppl, fidelity, passkey, ruler (all of: needle_number, needle_word, "
            "needle_uuid, needle_multikey, needle_multivalue, needle_multiquery, variable_tracking, "
            "common_words) or any of those."
        ),
    ] = "ppl,fidelity,passkey",
    lengths: Annotated[str, typer.Option(help="Comma-separated lengths in tokens.")] = "2048,4096,8192",
    data: Annotated[
        str | None,
        typer.Option(
            help="Text for ppl/fidelity and the needle tasks' haystack: file, folder or dataset. Default: the shipped Wikipedia articles."
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in structured data.")] = "text",
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md and plots.")] = Path(
        "eval-report"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    samples: Annotated[
        int | None,
        typer.Option(
            help="Prompts per generation task and length. Default: 30 for passkey, 5 per ruler task."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="At most K text windows and K samples per task and length.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass in passkey and ruler tasks.")] = 4,
    backend: Annotated[
        str, typer.Option(help="Attention backend for the plan: auto, torch, flex, triton, reference.")
    ] = "auto",
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the generated prompts (keys, needles, lists).")] = 0,
    oracle: Annotated[
        bool,
        typer.Option(
            "--oracle",
            help="Also run the two oracles (blocks chosen from each input's true attention at the plan's "
            "densities) on ppl/fidelity and passkey, and give the plan's perplexity and KL gaps as "
            "multiples of theirs. Not on the ruler tasks (they decode greedily).",
        ),
    ] = False,
    ranking: RankingOpt = None,
    ranking_layers: RankingLayersOpt = None,
    ranking_min_length: RankingMinLengthOpt = 0,
) -> None:
    """Quality of a plan vs dense and the uniform baseline: perplexity, KL/top-1 fidelity, passkey,
    and RULER-style retrieval tasks; with --oracle, against the attention-mass oracles too (on
    ppl/fidelity and passkey)."""
    from moa_compress.evaluate import (
        ORACLE_TASKS,
        check_lengths,
        default_texts,
        evaluate_plan,
        needs_text,
        oracle_tasks_error,
        parse_tasks,
        write_report,
    )
    from moa_compress.plan import load_plan, resolve_plan_path
    from moa_compress.report import summary_text

    task_names = parse_tasks(tasks)
    ns = parse_lengths(lengths)
    prefill_ranking = parse_ranking(ranking, ranking_layers, ranking_min_length)
    if oracle and not set(task_names) & set(ORACLE_TASKS):
        fail(oracle_tasks_error(task_names))
    for value, option in ((limit, "--limit"), (samples, "--samples"), (batch_size, "--batch-size")):
        if value is not None and value < 1:
            fail(f"{option} must be a positive number, got {value}")
    plan_path = resolve_plan_path(plan)
    net, tokenizer = load(model, dtype)
    check_lengths(net, ns)
    the_plan = load_plan(plan_path, net)
    texts, source = None, None
    if needs_text(task_names):
        if data is None:
            texts, source = default_texts()
        else:
            from moa_compress.data import load_texts

            texts, source = load_texts(data, text_field=text_field), data
    results = evaluate_plan(
        net,
        tokenizer,
        the_plan,
        tasks=task_names,
        lengths=ns,
        texts=texts,
        samples=samples,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        backend=backend,
        progress=True,
        oracle=oracle,
        ranking=prefill_ranking,
    )
    results["command"] = " ".join(["moa-compress", *sys.argv[1:]])
    results["plan"]["path"] = str(plan_path)
    results["settings"]["data"] = source
    report = write_report(results, out, the_plan)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
    else:
        typer.echo(summary_text(results))
        typer.echo(f"wrote {report} and {report.parent / 'results.json'}")


# --- runtime


@app.command("generate")
@user_errors
def generate_command(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option(help="The user message (the chat template is applied).")] = ...,
    plan: Annotated[
        str | None,
        typer.Option("--plan", help="Plan folder, plan.json, or shipped plan name. Default: dense."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    backend: Annotated[
        str, typer.Option(help="Attention backend for the plan: auto, torch, flex, triton, reference.")
    ] = "auto",
    dtype: DtypeOpt = "auto",
    full_cache: Annotated[
        bool, typer.Option(help="Keep every key/value while decoding instead of the plan's windows.")
    ] = False,
    ranking: RankingOpt = None,
    ranking_layers: RankingLayersOpt = None,
    ranking_min_length: RankingMinLengthOpt = 0,
) -> None:
    """Stream a greedy chat reply, with or without a plan."""
    from transformers import TextStreamer

    from moa_compress.attention import BACKENDS
    from moa_compress.plan import load_plan, resolve_plan_path
    from moa_compress.runtime import generate_reply

    if max_new_tokens <= 0:
        fail(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if backend != "auto" and backend not in BACKENDS:
        fail(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    if not prompt.strip():
        fail("--prompt is empty")
    prefill_ranking = parse_ranking(ranking, ranking_layers, ranking_min_length)
    plan_path = resolve_plan_path(plan) if plan is not None else None
    net, tokenizer = load(model, dtype)
    the_plan = load_plan(plan_path, net) if plan_path is not None else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_reply(
        net,
        tokenizer,
        prompt,
        plan=the_plan,
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        backend=backend,
        plan_cache=not full_cache,
        ranking=prefill_ranking,
    )


# --- profile


def parse_counts(text: str, lengths: list[int]) -> dict[int, int]:
    """``--samples``: one count for every length, or one per length (``4,2,1``) -> ``{length: count}``."""
    counts = parse_lengths(text, "--samples")
    if len(counts) == 1:
        return dict.fromkeys(lengths, counts[0])
    if len(counts) != len(lengths):
        fail(f"--samples gives {len(counts)} counts for {len(lengths)} lengths; give one, or one per length")
    return dict(zip(sorted(lengths), counts, strict=True))


@app.command("profile")
@user_errors
def profile_command(
    model: ModelArg = None,
    out: Annotated[
        Path, typer.Option(help="Output folder: profile.json + profile.safetensors (work/ resumes).")
    ] = Path("profile"),
    data: Annotated[
        str | None,
        typer.Option(help="Calibration text: .txt/.jsonl/.parquet file or folder, or hub dataset."),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Text field of structured --data.")] = "text",
    mode: Annotated[
        str,
        typer.Option(
            help="answers (the dense model's own answers) | plain (text windows) | mixed (both, alternating)"
        ),
    ] = "answers",
    lengths: Annotated[
        str, typer.Option(help="Comma-separated sequence lengths to profile.")
    ] = "2048,4096,8192",
    samples: Annotated[str, typer.Option(help="Samples per length: one count, or one per length.")] = "4,2,1",
    seed: Annotated[int, typer.Option(help="Seed of the calibration set.")] = 0,
    answer_tokens: Annotated[int, typer.Option(help="Most tokens of each generated answer.")] = 32,
    block_size: Annotated[int, typer.Option(help="Block size in tokens.")] = 64,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    force: Annotated[
        bool, typer.Option(help="Overwrite a profile and discard a stale work/ folder.")
    ] = False,
) -> None:
    """Measure each head's block influence on the loss of calibration answers (bounded memory, resumable).

    Under `torchrun --nproc-per-node N moa-compress profile ...` the samples are shared among the ranks.
    """
    import time

    from moa_compress import distributed
    from moa_compress.data import calibration_set
    from moa_compress.plan import provenance
    from moa_compress.profile import PROFILE_FILE, broadcast_samples, profile_model, save_profile

    ns = parse_lengths(lengths)
    counts = parse_counts(samples, ns)
    group = distributed.init()  # a group of one unless launched by torchrun

    def check_out() -> None:
        if (out / PROFILE_FILE).exists() and not force:
            raise FileExistsError(f"{out / PROFILE_FILE} exists; pass --force to overwrite")

    distributed.on_main(group, "the checks", check_out)  # before the model loads; every rank stops
    started = time.monotonic()
    from moa_compress.models import resolve_dtype

    dtype = resolve_dtype(dtype, distributed.device())
    lm, tokenizer = load(model, dtype, device_map, max_memory)
    record = provenance(
        " ".join(["moa-compress", *sys.argv[1:]]),
        data=data or "synthetic",
        mode=mode,
        seed=seed,
        answer_tokens=answer_tokens,
        dtype=dtype,
    )

    def make_samples():
        return calibration_set(
            lm,
            tokenizer,
            lengths=ns,
            samples_per_length=counts,
            data=data,
            text_field=text_field,
            mode=mode,
            seed=seed,
            progress=progress,
            answer_tokens=answer_tokens,
        )

    # Rank 0 builds the samples (and generates the answers) once; every rank profiles its share.
    calibration = broadcast_samples(
        distributed.on_main(group, "building calibration samples", make_samples), counts
    )
    profile = profile_model(
        lm,
        calibration,
        block_size=block_size,
        work_dir=out / "work",
        progress=progress and group.is_main,
        force=force,
        provenance=record,
    )
    distributed.leave(group, "profiling")
    if group.is_main:
        path = save_profile(profile, out, force=force)
        summary = ", ".join(f"{n} ({profile.samples[n]} samples)" for n in profile.lengths)
        typer.echo(f"wrote {path}: {summary} in {time.monotonic() - started:.0f} s")


@app.command("train-gates")
@user_errors
def train_gates_command(
    model: ModelArg = None,
    out: Annotated[
        Path, typer.Option(help="Output folder: gates.json + gates.safetensors (work/ resumes).")
    ] = Path("gates"),
    data: Annotated[
        str | None,
        typer.Option(
            help="Text to distil on: file, folder or dataset (default: the built-in synthetic set)."
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Text field of structured --data.")] = "text",
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths.")] = "2048,4096,8192",
    samples: Annotated[str, typer.Option(help="Samples per length: one count, or one per length.")] = "2,1,1",
    seed: Annotated[int, typer.Option(help="Seed of the samples and of the gates' initialisation.")] = 0,
    block_size: Annotated[int, typer.Option(help="Block size in tokens.")] = 64,
    gate_dim: Annotated[int, typer.Option(help="Width of the gate's projected block vectors.")] = 64,
    per_query_head: Annotated[
        bool, typer.Option(help="A gate head per query head (default: one per KV group).")
    ] = False,
    steps: Annotated[int, typer.Option(help="AdamW steps (each over every sample).")] = 300,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW (decoupled) weight decay (default 3.0).")
    ] = None,
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    force: Annotated[bool, typer.Option(help="Overwrite existing gates.")] = False,
) -> None:
    """Distil SeerAttention-style block gates from the dense model's attention (base model frozen)."""
    from moa_compress.data import calibration_set
    from moa_compress.gates import GATES_FILE, GateSettings, save_gates, train_gates
    from moa_compress.report import gate_loss_report

    ns = parse_lengths(lengths)
    counts = parse_counts(samples, ns)
    settings = GateSettings(
        block_size=block_size, gate_dim=gate_dim, per_query_head=per_query_head, steps=steps, lr=lr, seed=seed,
        **({} if weight_decay is None else {"weight_decay": weight_decay}),
    )  # fmt: skip
    settings.check()
    if (out / GATES_FILE).exists() and not force:
        fail(f"{out / GATES_FILE} exists; pass --force to overwrite")
    lm, tokenizer = load(model, dtype)

    def windows(lengths, count, seed):
        return calibration_set(
            lm, tokenizer, lengths=lengths, samples_per_length=count, data=data, text_field=text_field,
            mode="plain", seed=seed, progress=progress,
        )  # fmt: skip

    # One held-out window at the shortest length (another seed) says whether the gates generalise.
    heldout = windows(ns[:1], 1, seed + 7919)
    trained = train_gates(lm, windows(ns, counts, seed), settings, work_dir=out / "work", progress=progress,
                          heldout=heldout)  # fmt: skip
    path = save_gates(trained, out, force=force)
    report = gate_loss_report(trained, out)
    typer.echo(
        f"wrote {path} and {report}: KL per query-block row {trained.initial_loss:.4f} -> {trained.losses[-1]:.4f} "
        f"on the training samples, {trained.heldout['initial']:.4f} -> {trained.heldout['final']:.4f} held out "
        f"(targets {trained.seconds['targets']:.0f} s, training {trained.seconds['training']:.0f} s)"
    )


# --- search


PerHeadOpt = Annotated[bool, typer.Option(help="One rule per query head instead of per KV group.")]
MinSpanOpt = Annotated[
    float | None,
    typer.Option(
        help="Narrowest band a rule may keep, in tokens; gate rows keep the sink plus as many blocks "
        "(default: 3 blocks where the budget allows; 0: any)."
    ),
]
KvBudgetOpt = Annotated[
    float | None,
    typer.Option(
        help="Also keep the decode cache within this fraction of a dense cache's keys at the longest length, "
        "in (0, 1] (gate and dense heads hold every key; default: no limit)."
    ),
]
CostOpt = Annotated[
    str | None,
    typer.Option(
        help="Per-block cost: net (|sum of E| over the block; default) | entry (sum of |E|, MoA's)."
    ),
]


@app.command("search")
@user_errors
def search_command(
    profile_dir: Annotated[Path, typer.Argument(metavar="PROFILE_DIR", help="Folder written by `profile`.")],
    budget: Annotated[float, typer.Option(help="Density budget in (0, 1], held at every length.")] = ...,
    extend_lengths: Annotated[
        str | None, typer.Option(help="Comma-separated longer lengths the budget must also hold at.")
    ] = None,
    per_head: PerHeadOpt = False,
    min_span: MinSpanOpt = None,
    kv_budget: KvBudgetOpt = None,
    cost: CostOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder: plan.json + pareto.json.")] = Path("plan"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing plan.json / pareto.json.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose each head's rule under a density budget from a profile; write the lowest-cost plan."""
    from moa_compress.plan import PLAN_FILE, provenance
    from moa_compress.profile import load_profile
    from moa_compress.search import PARETO_FILE, save_search, search_plan, search_summary

    check_fraction(budget, "--budget")
    if kv_budget is not None:
        check_fraction(kv_budget, "--kv-budget")
    extra = parse_lengths(extend_lengths, "--extend-lengths") if extend_lengths else []
    for name in (PLAN_FILE, PARETO_FILE):
        if (out / name).exists() and not force:
            fail(f"{out / name} exists; pass --force to overwrite")
    profile = load_profile(profile_dir)
    result = search_plan(
        profile,
        budget,
        extend_lengths=extra,
        per_head=per_head,
        min_span=min_span,
        kv_budget=kv_budget,
        cost=cost,
        progress=not as_json,
        provenance=provenance(command_line(), profile_path=str(profile_dir)),
    )
    path = save_search(result, out, index=0, force=force)
    summary = search_summary(result, chosen=0)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    profiled = summary["search"]["profiled_lengths"]
    typer.echo(f"Pareto set at budget {budget} ({len(summary['points'])} plans; * = written to {path}):")
    header = ["#"] + [f"d@{n}" for n in summary["lengths"]] + [f"cost@{n}" for n in profiled]
    typer.echo("  ".join(f"{h:>10}" for h in header + ["mean cost", "rule kinds"]))
    for point in summary["points"]:
        cells = [f"{'*' if point['chosen'] else ''}{point['index']}"]
        cells += [f"{point['density'][str(n)]:.4f}" for n in summary["lengths"]]
        cells += [f"{point['predicted_cost'][str(n)]:.4f}" for n in profiled]
        cells += [f"{point['mean_cost']:.4f}", str(len(point["rules"]))]
        typer.echo("  ".join(f"{c:>10}" for c in cells))
    typer.echo(f"wrote {path} and {path.parent / PARETO_FILE}")


# --- compress


@app.command("compress")
@user_errors
def compress_command(
    model: ModelArg = None,
    budget: Annotated[
        float, typer.Option(help="Density budget in (0, 1], held at every target length.")
    ] = ...,
    out: Annotated[
        Path, typer.Option(help="Output folder: plan.json, report.md, results.json, compress.json.")
    ] = ...,
    preset: Annotated[
        str,
        typer.Option(
            help="full (2048,4096,8192; 6,2,2 samples, answers and prose mixed) | fast (1024,2048; minutes on a CPU)"
        ),
    ] = "full",
    lengths: Annotated[str | None, typer.Option(help="Profiled lengths (default: the preset's).")] = None,
    samples: Annotated[
        str | None, typer.Option(help="Calibration samples per length: one count, or one per length.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Calibration text: .txt/.jsonl/.parquet file or folder, or hub dataset."),
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="Text field of structured --data.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="answers (the dense model's own answers) | plain (text windows) | mixed (both, alternating)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration set.")] = None,
    extend_lengths: Annotated[
        str | None, typer.Option(help="Longer lengths the budget must also hold at (rules extrapolated).")
    ] = None,
    per_head: PerHeadOpt = False,
    rules: Annotated[
        str,
        typer.Option(
            help="Rule kinds the search may choose, comma-separated: static (sink + band), gate (learned "
            "block gate, trained in a gates stage), dense. static,dense or gate,dense for one kind alone."
        ),
    ] = "static,gate,dense",
    gate_steps: Annotated[
        int | None, typer.Option(help="AdamW steps of the gates stage (default: the preset's).")
    ] = None,
    validation_samples: Annotated[
        int | None,
        typer.Option(
            help="Held-out samples per profiled length scoring the candidate plans (default: the preset's)."
        ),
    ] = None,
    gate_locals: Annotated[
        str | None,
        typer.Option(
            help="Local windows (blocks ending at the diagonal, kept whatever the gate says) offered with "
            "each gate target, comma-separated (default 1,2,4,8; 1 alone: the gate picks all but sink "
            "and diagonal)."
        ),
    ] = None,
    gate_tails: Annotated[
        str | None,
        typer.Option(
            help="Dense tails (last query-block rows that keep every block: the end of a prompt and every "
            "decoding step) offered with each gate target, comma-separated rows (default 0: none)."
        ),
    ] = None,
    gate_folds: Annotated[
        int,
        typer.Option(
            help="Cost gate rules by cross-fitting: this many more gate sets, each trained without one fold "
            "of the calibration samples, select each sample's blocks (at most one fold per sample; each set "
            "trains as long as the final gates on fewer samples). 1: the final gates, on the samples they "
            "were trained on."
        ),
    ] = 2,
    gate_weight_decay: Annotated[
        float | None,
        typer.Option(
            help="AdamW weight decay of the gates stage (default 3.0: the gates then fit their few "
            "calibration samples less closely and new text better)."
        ),
    ] = None,
    gate_extra_samples: Annotated[
        str | None,
        typer.Option(
            help="More samples per length (one count, or one per length) that only train the gates: their "
            "targets need one dense forward each and no answer, and gates fit their few calibration samples "
            "far better than new text. Answer-style prompts of the recipe (in mixed mode alternating with "
            'prose windows no other stage uses). Default 0 (BENCHMARKS.md, "More text for the gates").'
        ),
    ] = None,
    min_span: MinSpanOpt = None,
    kv_budget: KvBudgetOpt = None,
    cost: CostOpt = None,
    ranking: Annotated[
        str,
        typer.Option(
            help="How the plan's gate heads rank a prompt's key blocks: gate (the trained gates) or sampled:R "
            "(the true attention of R sampled queries per block, about R/64 of dense attention's cost): the "
            "search costs gate rules under it and the plan carries it. Decoding steps rank by the gates."
        ),
    ] = "gate",
    ranking_layers: RankingLayersOpt = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Reuse a `moa-compress profile` output instead of profiling (needs --rules static,dense)."
        ),
    ] = None,
    work: Annotated[Path | None, typer.Option(help="Work folder for resuming (default: OUT/work).")] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Text for the closing eval. Default: the shipped Wikipedia articles.")
    ] = None,
    block_size: Annotated[int | None, typer.Option(help="Block size in tokens (default 64).")] = None,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    force: Annotated[
        bool, typer.Option(help="Overwrite outputs and redo stages made with other settings.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Calibrate, profile, search, validate and export a plan under a density budget (resumable).

    Under `torchrun --nproc-per-node N moa-compress compress ...` the profile is shared among the ranks.
    """
    from moa_compress import distributed
    from moa_compress.pipeline import compress, preset_settings, summary_table
    from moa_compress.profile import load_profile

    counts = _counts(samples, "--samples")
    reused = load_profile(profile) if profile is not None else None
    from moa_compress.models import DTYPES, resolve_dtype

    group = distributed.init()  # a group of one unless launched by torchrun
    if dtype == "auto" and reused is not None and reused.provenance.get("dtype") in DTYPES:
        dtype = reused.provenance["dtype"]  # the dtype the reused profile was measured in
    dtype = resolve_dtype(dtype, distributed.device())
    settings = preset_settings(
        preset,
        budget,
        profile=reused,
        lengths=parse_lengths(lengths) if lengths else None,
        samples=counts,
        data=data,
        text_field=text_field,
        mode=mode,
        seed=seed,
        extend_lengths=parse_lengths(extend_lengths, "--extend-lengths") if extend_lengths else None,
        per_head=per_head,
        rules=tuple(kind.strip() for kind in rules.split(",") if kind.strip()),
        gate_steps=gate_steps,
        validation_samples=validation_samples,
        gate_locals=tuple(parse_lengths(gate_locals, "--gate-locals")) if gate_locals else None,
        gate_tails=tuple(parse_lengths(gate_tails, "--gate-tails", least=0)) if gate_tails else None,
        gate_folds=gate_folds,
        gate_weight_decay=gate_weight_decay,
        gate_extra_samples=_counts(gate_extra_samples, "--gate-extra-samples", least=0),
        min_span=min_span,
        kv_budget=kv_budget,
        cost=cost,
        ranking=ranking,
        ranking_layers=parse_ranking_layers(ranking_layers),
        eval_data=eval_data,
        block_size=block_size,
        dtype=dtype,
    )
    settings.check(reused)  # before the model loads: a bad option fails at once
    net, tokenizer = load(model, dtype, device_map, max_memory)
    result = compress(
        net,
        tokenizer,
        settings,
        out,
        work_dir=work,
        force=force,
        progress=progress and group.is_main,
        profile=reused,
        command=command_line(),
    )
    if result is None:  # a rank other than 0: its share of the profile is done
        return
    typer.echo(f"wrote {result.path}, {result.report} and {out / 'compress.json'}\n")
    typer.echo(summary_table(result.summary))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
