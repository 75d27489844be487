"""Text for calibration and evaluation, through Hugging Face ``datasets``.

``load_texts`` is the one entry point for user-supplied text: a local ``.txt`` / ``.jsonl`` /
``.json`` / ``.parquet`` / ``.csv`` file, a folder of such files, or a hub dataset name where the hub
is reachable. Calibration sets built from it (and the built-in synthetic set) live further down.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moa_compress.errors import UserInputError
from moa_compress.plan import text_config
from moa_compress.tasks import encode

# file suffix -> the datasets builder that reads it
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


class DataError(UserInputError):
    """Calibration or evaluation text that cannot be used."""


# English Wikipedia articles carried in the package (CC BY-SA 3.0; texts/README.md), split by article
# so that what tunes a plan never scores it: the last TUNING_ARTICLES in name order are the "tune"
# split (the prose half of mixed calibration and of compress's validation), the rest the "eval" split
# (the default text of eval and of compress's closing eval).
SHIPPED_TEXTS = Path(__file__).resolve().parent / "texts" / "wikipedia"
TUNING_ARTICLES = 4
SPLITS = ("eval", "tune")


def shipped_texts(split: str, folder: str | Path | None = None) -> list[str]:
    """The ``split`` (``"eval"`` or ``"tune"``) of the shipped articles in ``folder`` (default
    :data:`SHIPPED_TEXTS`), in name order. Raises :class:`DataError` when the folder is missing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(SHIPPED_TEXTS if folder is None else folder)
    if not folder.is_dir():
        raise DataError(
            f"the shipped Wikipedia articles ({folder}) are missing from this install; pass --data with a "
            "text file, folder or dataset"
        )
    texts = load_texts(folder)  # one text per file, in name order
    if len(texts) <= TUNING_ARTICLES:
        raise DataError(f"{folder} holds {len(texts)} articles; its splits need more than {TUNING_ARTICLES}")
    return texts[-TUNING_ARTICLES:] if split == "tune" else texts[:-TUNING_ARTICLES]


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_builder: dict[str, list[str]] = {}
    for f in files:
        builder = _BUILDERS.get(f.suffix.lower()) or _BUILDERS.get("".join(f.suffixes[-2:]).lower())
        if builder:
            by_builder.setdefault(builder, []).append(str(f))
    if not by_builder:
        raise DataError(f"--data {path}: no .txt/.jsonl/.json/.parquet/.csv files found")
    if len(by_builder) > 1:
        raise DataError(f"--data {path}: mixes file types ({', '.join(sorted(by_builder))}); use one kind")
    ((builder, names),) = by_builder.items()
    return builder, names


def load_texts(spec: str | Path, text_field: str = "text", split: str = "train") -> list[str]:
    """Return the non-empty texts of a local file/folder or a hub dataset.

    Plain-text files become one text per file (not per line), so long documents stay whole.
    Structured files and hub datasets are read through ``datasets`` and ``text_field`` is taken.
    """
    import datasets

    path = Path(spec).expanduser()
    datasets.disable_progress_bars()
    try:
        if path.exists():
            builder, files = _local_files(path)
            if builder == "text":
                ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
            else:
                ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(str(spec), split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the first line only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--data {spec}: cannot load ({first})") from exc
    if text_field not in ds.column_names:
        raise DataError(
            f"--data {spec}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); set --text-field"
        )
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"--data {spec}: no non-empty text in field {text_field!r}")
    return texts


def token_windows(
    texts: Sequence[str | list[int]], tokenizer, length: int, limit: int | None = None
) -> list[list[int]]:
    """Non-overlapping windows of exactly ``length`` tokens, cut from each text in order. A text may
    be given as its token ids already (a caller cutting several lengths tokenizes once); ``tokenizer``
    may then be None."""
    windows: list[list[int]] = []
    for text in texts:
        ids = text if isinstance(text, list) else encode(tokenizer, text)
        for start in range(0, len(ids) - length + 1, length):
            windows.append(ids[start : start + length])
            if limit is not None and len(windows) >= limit:
                return windows
    return windows


# ----------------------------------------------------------------------------------------------
# Calibration samples


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration sequence of exactly the length it was built for.

    ``input_ids``: int64 ``[S]``. ``loss_mask``: bool ``[S]``, True where token ``t`` is scored (predicted
    from position ``t - 1``): the dense model's answer tokens, or the last part of a plain-text window.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor


def model_digest(model) -> str:
    """16 hex digits identifying a model's weights (names, shapes, dtypes and value statistics).

    Cheap (one pass of sums) and enough to tell a cache made with other weights from ours. Weights
    spread over devices are read where they are; weights offloaded by a device map (on the ``meta``
    device here) count by name, shape and dtype only.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.is_meta:
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:offloaded".encode())
                continue
            flat = tensor.detach().reshape(-1)
            stats = flat.double().sum().item(), flat.double().square().sum().item()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{stats[0]:.9e}:{stats[1]:.9e}".encode())
            h.update(flat[:: max(1, flat.numel() // 256)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Calibration sets

MODES = ("answers", "plain", "mixed")
DEFAULT_ANSWER_TOKENS = 32
PLAIN_SCORED_FRACTION = 8  # plain mode scores the last 1/8 of each window
_CONTEXT_MARK = "\ue000CONTEXT\ue000"  # private-use characters: cannot occur in a template

_FIRST = (
    "Alma",
    "Boris",
    "Chen",
    "Dalia",
    "Emeka",
    "Freya",
    "Gustavo",
    "Hana",
    "Ivan",
    "Jonas",
    "Kaveh",
    "Lena",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sanjay",
    "Tilde",
    "Umar",
    "Vera",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zofia",
    "Arjun",
    "Beatriz",
    "Colm",
    "Dina",
)
_LAST = (
    "Abbott",
    "Brandt",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fujita",
    "Gallo",
    "Horvat",
    "Ibsen",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
    "Quinn",
    "Rossi",
    "Sato",
    "Tanaka",
    "Ueda",
    "Varga",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zeller",
)
_CITIES = (
    "Aldport",
    "Brackenridge",
    "Corvale",
    "Dunmere",
    "Eastwick",
    "Fallowmere",
    "Glenhaven",
    "Harrowgate",
    "Ironbridge",
    "Juniper Bay",
    "Kestrel Point",
    "Lowmoor",
    "Millbrook",
    "Northfield",
    "Oakhurst",
    "Pinecrest",
    "Queensferry",
    "Redwater",
    "Saltmarsh",
    "Thornbury",
)
_ITEMS = (
    "copper wire",
    "olive oil",
    "wool blankets",
    "glass jars",
    "bicycle tyres",
    "school atlases",
    "tea chests",
    "solar lamps",
    "rope coils",
    "winter boots",
    "spice tins",
    "paper lanterns",
    "ceramic tiles",
    "fishing nets",
    "apple crates",
    "violin strings",
    "water filters",
    "garden tools",
)
_JOBS = (
    "carpenter",
    "nurse",
    "harbour pilot",
    "librarian",
    "baker",
    "surveyor",
    "translator",
    "beekeeper",
    "archivist",
    "mechanic",
    "chemist",
    "tailor",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_COLOURS = ("red", "green", "blue", "yellow", "grey", "white", "black", "orange")


def _synthetic_record(rng) -> tuple[str, str]:
    """One sentence with checkable facts, and a question whose answer is in it."""
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    city, city2 = rng.sample(_CITIES, 2)
    item, num = rng.choice(_ITEMS), rng.randint(3, 990)
    kind = rng.randrange(6)
    if kind == 0:
        job, day = rng.choice(_JOBS), rng.choice(_DAYS)
        return (
            f"{name}, a {job} from {city}, shipped {num} crates of {item} to {city2} on {day}.",
            f"How many crates of {item} did {name} ship to {city2}?",
        )
    if kind == 1:
        month = rng.choice(_MONTHS)
        return (
            (
                f"In {month} the {city} office logged {num} complaints about {item}; {name} answered most "
                "of them by hand."
            ),
            f"How many complaints about {item} did the {city} office log?",
        )
    if kind == 2:
        price, colour = rng.randint(2, 400), rng.choice(_COLOURS)
        return (
            f"At the {colour} market in {city}, {name} paid {price} dollars for {num} {item}.",
            f"How much did {name} pay at the {colour} market in {city}?",
        )
    if kind == 3:
        other = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        return (
            (
                f"The meeting between {name} and {other} in {city} lasted {num} minutes and ended with a "
                f"deal on {item}."
            ),
            f"Who met {name} in {city}, and how long did the meeting last?",
        )
    if kind == 4:
        day, km = rng.choice(_DAYS), rng.randint(2, 40)
        return (
            (
                f"Every {day}, {name} walks {km} kilometres along the river in {city} before opening the "
                f"{item} shop."
            ),
            f"How far does {name} walk on {day}s?",
        )
    colour, month, report = rng.choice(_COLOURS), rng.choice(_MONTHS), rng.randint(100, 9999)
    return (
        (
            f"Report {report}: the {colour} warehouse in {city} holds {num} {item}, counted by {name} in "
            f"{month}."
        ),
        f"What does report {report} say the {colour} warehouse in {city} holds?",
    )


def _synthetic_sections(rng):
    """An endless stream of ``(text, question)`` pieces: section headings, then 3-8 records each."""
    number = 0
    while True:
        number += 1
        title = (
            f"The {rng.choice(_CITIES)} {rng.choice(('ledger', 'letters', 'inventory', 'diary', 'minutes'))}"
        )
        yield f"\n\nSection {number}: {title}\n", None, title
        for _ in range(rng.randint(3, 8)):
            sentence, question = _synthetic_record(rng)
            yield " " + sentence, question, title


def _passkey(rng) -> tuple[str, str]:
    key = rng.randint(10000, 99999)
    return (
        f" The secret passkey is {key}. Remember it: {key}.",
        "What is the secret passkey mentioned in the text above? Reply with the number only.",
    )


def _prompt_parts(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context for one user turn (chat template if the model has one)."""
    if getattr(tokenizer, "chat_template", None):
        content = f"{_CONTEXT_MARK}\n\n{instruction}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(_CONTEXT_MARK)
        return encode(tokenizer, before), encode(tokenizer, after)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(prefix), encode(tokenizer, f"\n\n{instruction}\nAnswer:")


def max_positions(model) -> int | None:
    """The most positions ``model`` takes (its text config's ``max_position_embeddings``), if it says."""
    config = text_config(model)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _counts(lengths: Sequence[int], samples_per_length: int | Mapping[int, int]) -> dict[int, int]:
    if isinstance(samples_per_length, Mapping):
        missing = [n for n in lengths if n not in samples_per_length]
        if missing:
            raise DataError(f"no sample count given for length(s) {missing}")
        counts = {n: int(samples_per_length[n]) for n in lengths}
    else:
        counts = dict.fromkeys(lengths, int(samples_per_length))
    if any(k < 1 for k in counts.values()):
        raise DataError(f"--samples must be at least 1 per length, got {counts}")
    return counts


def _check_request(model, lengths: Sequence[int], mode: str) -> None:
    if mode not in MODES:
        raise DataError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not lengths or any(n <= 0 for n in lengths):
        raise DataError(f"--lengths must be positive, got {list(lengths)}")
    limit = max_positions(model)
    if limit is not None and max(lengths) > limit:
        raise DataError(f"length {max(lengths)} is over the model's maximum positions ({limit})")


def calibration_set(
    model,
    tokenizer,
    *,
    lengths: Sequence[int],
    samples_per_length: int | Mapping[int, int],
    data: str | Path | Sequence[str] | None = None,
    text_field: str = "text",
    mode: str = "answers",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    prose: Sequence[str] | None = None,
    held_out: bool = False,
) -> dict[int, list[CalibrationSample]]:
    """Calibration samples of exactly ``N`` tokens for every ``N`` in ``lengths``.

    ``samples_per_length``: one count for every length, or ``{N: count}`` (e.g. fewer at long lengths,
    where a sample costs more and its blocks average over more entries).

    ``mode="answers"`` (MoA's recipe): a long context, an instruction about it (recall a passkey hidden in
    it, answer a question about a fact in it, summarise a part of it) in the model's chat template, and the
    dense model's own greedy answer (at most ``answer_tokens``), which alone is scored. Answers are cached
    under ``cache_dir`` (default ``<moa-compress cache>/answers``) keyed by the model's weights and the
    prompt. If the answer stops early the sequence is filled up to ``N`` with the pad token, unscored and
    after the answer, so the prompt the answer was generated for is exactly the one profiled.

    ``mode="plain"``: ``N``-token windows of text, the last ``N / 8`` tokens scored.

    ``mode="mixed"``: both, alternating: samples ``0, 2, 4, ...`` of a length are answers, samples
    ``1, 3, ...`` plain windows of natural prose — ``prose`` when given, else ``data``'s texts, else the
    "tune" split of the shipped Wikipedia articles (:func:`shipped_texts`). Answers alone teach a plan
    what retrieval needs and nothing of what running text needs, where a local window with a sink is
    hard to beat; the mix charges a plan for both. Prose windows come from one fixed shuffle of all
    windows of a length: calibration takes them from its front, ``held_out=True`` (compress's
    validation) from its back, so the two never share a window while the text has enough of them.

    ``data=None`` uses a built-in synthetic long-context set (offline, seeded); otherwise anything
    :func:`load_texts` takes (or a list of strings) supplies the contexts. Same arguments, same samples.
    """
    import random

    lengths = sorted({int(n) for n in lengths})
    counts = _counts(lengths, samples_per_length)
    _check_request(model, lengths, mode)
    texts, docs = _calibration_texts(tokenizer, data, text_field)

    out: dict[int, list[CalibrationSample]] = {}
    plain_windows: dict[int, list[list[int]]] = {}
    if mode == "mixed":
        prose_docs = _prose_docs(tokenizer, prose, texts, docs)
        for n in lengths:
            plain_windows[n] = _split_windows(prose_docs, n, counts[n] // 2, held_out)
    if mode == "plain":
        for n in lengths:
            rng = random.Random(f"moa-calibration:{seed}:{n}:plain")
            windows = (
                _plain_windows(docs, n, counts[n], rng)
                if docs is not None
                else [_synthetic_ids(tokenizer, n, rng) for _ in range(counts[n])]
            )
            scored = max(1, n // PLAIN_SCORED_FRACTION)
            out[n] = [_sample(ids, len(ids) - scored) for ids in windows]
        return out

    answers = _AnswerCache(model, cache_dir, answer_tokens)
    documents = {n: _long_documents(docs, n) for n in lengths} if docs is not None else {}
    with progress_steps(progress, sum(counts.values()), "calibration samples") as step:
        for n in lengths:
            out[n] = []
            for i in range(counts[n]):
                if mode == "mixed" and i % 2:
                    ids = plain_windows[n][i // 2]
                    out[n].append(_sample(ids, n - max(1, n // PLAIN_SCORED_FRACTION)))
                    step(f"calibration prose at {n} tokens ({i + 1}/{counts[n]})")
                    continue
                rng = random.Random(f"moa-calibration:{seed}:{n}:{i}")
                prompt = _answer_prompt(tokenizer, documents.get(n), n - answer_tokens, rng)
                answer = answers.get(prompt)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else answer[-1]
                ids = prompt + answer + [pad] * (n - len(prompt) - len(answer))
                mask = torch.zeros(n, dtype=torch.bool)
                mask[len(prompt) : len(prompt) + len(answer)] = True
                out[n].append(CalibrationSample(torch.tensor(ids, dtype=torch.int64), mask))
                step(f"calibration answers at {n} tokens ({i + 1}/{counts[n]})")
    return out


def gate_extra_set(
    tokenizer,
    *,
    lengths: Sequence[int],
    counts: Mapping[int, int],
    data: str | Path | Sequence[str] | None = None,
    text_field: str = "text",
    mode: str = "answers",
    seed: int = 0,
    prose: Sequence[str] | None = None,
    reserved: Mapping[int, tuple[int, int]] | None = None,
) -> dict[int, list[CalibrationSample]]:
    """``counts[N]`` samples of exactly ``N`` tokens at each length that only *train* the gates: a
    gate's targets need one dense forward and no answer, so gates can learn from far more text than the
    profile scores (BENCHMARKS.md, "More text for the gates"). Never profiled, costed or validated.

    They follow the calibration recipe (:func:`calibration_set`) without its answers: ``answers`` and
    ``plain`` modes give answer-style prompts of ``N`` tokens (a context cut from ``data``'s long texts,
    or the built-in synthetic records, and an instruction; seeds of their own); ``mixed`` alternates
    such prompts with prose windows from the middle of the prose's fixed shuffle — after the first
    ``reserved[N][0]`` (calibration's) and before the last ``reserved[N][1]`` (validation's) — and
    fills with prompts once the middle runs out. Same arguments, same samples; sample ``i`` does not
    depend on the count asked for."""
    import random

    lengths = sorted({int(n) for n in lengths})
    texts, docs = _calibration_texts(tokenizer, data, text_field)
    documents = {n: _long_documents(docs, n) for n in lengths if counts.get(n)} if docs is not None else {}
    middle: dict[int, list[list[int]]] = {}
    if mode == "mixed":
        prose_docs = _prose_docs(tokenizer, prose, texts, docs)
        for n in lengths:
            windows = _prose_order(prose_docs, n)
            front, back = (reserved or {}).get(n, (0, 0))
            middle[n] = windows[front : max(front, len(windows) - back)]
    out: dict[int, list[CalibrationSample]] = {}
    for n in lengths:
        out[n] = []
        for i in range(counts.get(n, 0)):
            if mode == "mixed" and i % 2 and i // 2 < len(middle[n]):
                ids = middle[n][i // 2]
            else:
                rng = random.Random(f"moa-gate-extra:{seed}:{n}:{i}")
                ids = _answer_prompt(tokenizer, documents.get(n), n, rng)
            out[n].append(_sample(ids, n))  # nothing scored: gates train on the attention alone
    return out


def _calibration_texts(
    tokenizer, data: str | Path | Sequence[str] | None, text_field: str
) -> tuple[list[str] | None, list[list[int]] | None]:
    """``(texts, their token ids)`` of the calibration ``data`` (None: the synthetic set, no texts).
    Each text is tokenized once, whatever the number of lengths."""
    if data is None:
        return None, None
    if isinstance(data, (list, tuple)):
        texts = [t for t in data if isinstance(t, str) and t.strip()]
        if not texts:
            raise DataError("the calibration data has no non-empty text")
    else:
        texts = load_texts(data, text_field)
    return texts, [encode(tokenizer, t) for t in texts]


def _prose_docs(tokenizer, prose, texts, docs) -> list[list[int]]:
    """Token ids of mixed mode's prose: ``prose`` when given, else the calibration ``texts`` (already
    tokenized as ``docs``), else the shipped articles' "tune" split."""
    if prose is None and texts is not None:
        return docs
    return [encode(tokenizer, t) for t in (prose if prose is not None else shipped_texts("tune"))]


def _sample(ids: Sequence[int], first_scored: int) -> CalibrationSample:
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[first_scored:] = True
    return CalibrationSample(torch.tensor(list(ids), dtype=torch.int64), mask)


def _plain_windows(docs: list[list[int]], n: int, k: int, rng) -> list[list[int]]:
    windows = token_windows(docs, None, n)
    if len(windows) < k:
        long_enough = sum(1 for d in docs if len(d) >= n)
        raise DataError(
            f"need {k} windows of {n} tokens, the data gives {len(windows)} "
            f"({long_enough} of {len(docs)} texts are at least {n} tokens long)"
        )
    return rng.sample(windows, k)


def _split_windows(docs: list[list[int]], n: int, k: int, held_out: bool) -> list[list[int]]:
    """``k`` windows of ``n`` tokens from one fixed shuffle of all of ``docs``' windows (the same for
    every seed, so that held-out samples drawn with another seed still avoid the calibration ones): its
    first ``k`` (calibration) or its last ``k`` (``held_out``), disjoint while there are ``2k``."""

    if k == 0:
        return []
    windows = _prose_order(docs, n)
    if len(windows) < 2 * k:
        raise DataError(
            f"mixed calibration needs {2 * k} prose windows of {n} tokens ({k} to calibrate, {k} held out), "
            f"the prose gives {len(windows)}; use fewer --samples, shorter --lengths or longer text"
        )
    return windows[len(windows) - k :] if held_out else windows[:k]


def _prose_order(docs: list[list[int]], n: int) -> list[list[int]]:
    """All of ``docs``' windows of ``n`` tokens in one fixed shuffle, the same for every seed: the
    calibration takes its prose from the front, the validation from the back, the extra gate samples
    from between."""
    import random

    windows = token_windows(docs, None, n)
    random.Random(f"moa-calibration:{n}:prose-order").shuffle(windows)
    return windows


def _synthetic_ids(tokenizer, n: int, rng) -> list[int]:
    ids: list[int] = []
    for text, _, _ in _synthetic_sections(rng):
        ids += encode(tokenizer, text)
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError("unreachable: the synthetic stream is endless")


def _long_documents(docs: list[list[int]], n: int) -> list[list[int]]:
    """The tokenized texts with at least ``n`` tokens (answers mode cuts one context from one text)."""
    long_docs = [d for d in docs if len(d) >= n]
    if not long_docs:
        raise DataError(
            f"no text is long enough for {n}-token samples: 0 of {len(docs)} texts reach {n} tokens "
            f"(longest: {max(len(d) for d in docs)}); use shorter --lengths or longer texts"
        )
    return long_docs


def _answer_prompt(tokenizer, documents: list[list[int]] | None, prompt_len: int, rng) -> list[int]:
    """Prompt ids of exactly ``prompt_len`` tokens: template + context (+ hidden key) + instruction."""
    key_text, key_question = _passkey(rng)
    task = rng.choice(("passkey", "fact", "summary"))
    if documents is None:
        pieces = _synthetic_sections(rng)
        # gather enough pieces for the longest possible budget; pick the question among included ones
        stream = []
        total = 0
        while total < prompt_len:
            text, question, title = next(pieces)
            ids = encode(tokenizer, text)
            stream.append((ids, question, title))
            total += len(ids)
        instruction = key_question
        candidates = [(q, t) for _, q, t in stream[: max(1, len(stream) * 3 // 4)] if q]
        if task != "passkey" and candidates:
            question, title = rng.choice(candidates)
            instruction = (
                f"Answer from the records above: {question}"
                if task == "fact"
                else f'Summarise the section titled "{title}" in two sentences.'
            )
        pieces_ids = [ids for ids, _, _ in stream]
    else:
        instruction = {
            "passkey": key_question,
            "fact": "What is the text above about? Answer in one sentence.",
            "summary": "Summarise the last paragraph of the text above in two sentences.",
        }[task]
        ids = rng.choice(documents)
        start = rng.randrange(0, len(ids) - prompt_len + 1)
        pieces_ids = [ids[start : start + prompt_len]]
    prefix, suffix = _prompt_parts(tokenizer, instruction)
    key_ids = encode(tokenizer, key_text) if task == "passkey" else []
    budget = prompt_len - len(prefix) - len(suffix) - len(key_ids)
    if budget < 64:
        raise DataError(
            f"a {prompt_len}-token prompt leaves under 64 tokens of context after the chat template and "
            "instruction; use longer --lengths"
        )
    context = [t for ids in pieces_ids for t in ids][:budget]  # both sources hold >= prompt_len tokens
    if key_ids:
        at = rng.randrange(budget // 10, budget - budget // 10 + 1)
        context = context[:at] + key_ids + context[at:]
    return prefix + context + suffix


class _AnswerCache:
    """The dense model's greedy answers, on disk as JSON keyed by weights digest + prompt."""

    def __init__(self, model, cache_dir, max_new_tokens: int):
        from moa_compress.models import cache_dir as default_cache

        self.model, self.max_new_tokens = model, max_new_tokens
        self.root = Path(cache_dir) if cache_dir is not None else default_cache() / "answers"
        self.digest = model_digest(model)

    def get(self, prompt: list[int]) -> list[int]:
        import json

        from moa_compress.plan import atomic_write_bytes

        h = hashlib.sha256(f"{self.digest}:{self.max_new_tokens}:".encode())
        h.update(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes())
        path = self.root / f"{h.hexdigest()[:32]}.json"
        if path.exists():
            try:
                cached = json.loads(path.read_text())["answer_ids"]
                if isinstance(cached, list) and cached and all(isinstance(t, int) for t in cached):
                    return cached
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable entry: regenerate and overwrite it
        answer = self._generate(prompt)
        atomic_write_bytes(path, json.dumps({"answer_ids": answer, "prompt_tokens": len(prompt)}).encode())
        return answer

    def _generate(self, prompt: list[int]) -> list[int]:
        model = self.model
        ids = torch.tensor([prompt], dtype=torch.int64, device=model.device)
        config = model.generation_config
        eos = config.eos_token_id
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos,
            )
        return [int(t) for t in out[0, len(prompt) :]]


@contextlib.contextmanager
def progress_steps(enabled: bool, total: int, label: str) -> Iterator[Callable[[str], None]]:
    """``with progress_steps(on, total, label) as step: ... step(description)`` advances a rich bar by one
    step and relabels it; with ``enabled`` False, ``step`` does nothing."""
    if not enabled:
        yield lambda description: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda description: bar.update(task, advance=1, description=description)
