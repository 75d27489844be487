"""Synthetic long-context retrieval tasks, generated for any tokenizer and length: seeded and offline.

Every generator returns prompts of *exactly* the requested number of tokens, so a batch of one task
at one length needs no padding. Pieces (the chat template's head and tail, haystack units, needles)
are tokenized separately and concatenated, and the haystack is filled to the token: whole units, and
the tail end of one more unit opening the haystack.

Tasks (``ruler`` in ``--tasks`` names all of them; written in the spirit of RULER, our own wording):

* ``needle_number`` / ``needle_word`` / ``needle_uuid`` — one sentence "The secret code of the <key>
  is <value>." at a depth of natural prose; the value is a 7-digit number, a word or a UUID.
* ``needle_multikey`` — the same with three more needles of other keys (distractors); one key asked.
* ``needle_multivalue`` — four needles of one key with different values; all four asked (any order).
* ``needle_multiquery`` — four needles of four keys; all four asked, answers in the asked order.
* ``variable_tracking`` — two chains ``VAR A = 12345``, ``VAR B = VAR A`` ... in repeated filler;
  asked for every variable that holds one chain's value (any order).
* ``common_words`` — a comma-separated list in which five words are far more frequent than the rest;
  asked for those five (any order).

``passkey`` (a 5-digit key in repeated filler, scored teacher-forced by :mod:`moa_compress.evaluate`)
lives here too: :func:`passkey_samples`.

Replies are scored by :func:`is_exact_match`: the reply up to its first line or sentence end, split
into items at commas, semicolons, "and" and whitespace, surrounding punctuation and case ignored.
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from moa_compress.errors import UserInputError

RULER_TASKS = (
    "needle_number",
    "needle_word",
    "needle_uuid",
    "needle_multikey",
    "needle_multivalue",
    "needle_multiquery",
    "variable_tracking",
    "common_words",
)
PROSE_TASKS = tuple(t for t in RULER_TASKS if t.startswith("needle_"))  # haystack: natural text
NEEDLES_PER_MULTI_TASK = 4
COMMON_WORD_COUNT = 5
CHAIN_LENGTH = 4  # names per variable-tracking chain: one assignment and three copies

# Depths of the passkey grid: the needle right after the instruction (0) ... right before the question (1).
PASSKEY_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"

NEEDLE_INTRO = (
    "A long text follows. Hidden in it are sentences that give secret values; read carefully, you will "
    "be asked about them."
)
NEEDLE = " The secret {kind} of the {key} is {value}."
VALUE_KINDS = {"number": "code", "word": "word", "uuid": "id"}
TRACKING_INTRO = (
    "Memorize the variable assignments hidden in the text below. Each line VAR X = Y gives X the value of Y."
)
COMMON_INTRO = (
    "Below is a long list of words separated by commas. Some words occur much more often than others."
)

# Key adjectives and nouns (keys are "adjective noun"; word values and the common-words list are nouns).
ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "copper", "crimson", "curious",
    "distant", "eager", "empty", "faint", "fierce", "gentle", "golden", "hidden", "hollow", "humble",
    "icy", "ivory", "jolly", "lively", "lonely", "lucky", "misty", "noble", "quiet", "rapid", "restless",
    "rusty", "silent", "silver", "sleepy", "steady", "swift", "tiny", "wild", "wooden",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "barrel", "basket", "beacon", "beetle", "bell",
    "bottle", "bridge", "bucket", "button", "cabin", "camel", "candle", "canyon", "castle", "cellar",
    "chimney", "clock", "cloud", "comet", "compass", "cottage", "crown", "daisy", "desert", "dolphin",
    "dragon", "drum", "eagle", "engine", "falcon", "feather", "fiddle", "forest", "fountain", "garden",
    "giraffe", "glacier", "goblet", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle",
    "ladder", "lantern", "lemon", "lighthouse", "lizard", "magnet", "maple", "meadow", "mirror", "monkey",
    "mountain", "needle", "orchard", "otter", "owl", "paddle", "palace", "parrot", "pebble", "pencil",
    "pepper", "piano", "pillow", "pirate", "planet", "pocket", "pumpkin", "puzzle", "rabbit", "raven",
    "ribbon", "rocket", "saddle", "sailor", "scarf", "shovel", "spider", "spoon", "squirrel", "statue",
    "teapot", "temple", "thunder", "tiger", "tower", "trumpet", "tunnel", "turtle", "umbrella", "valley",
    "violin", "wagon", "walrus", "whistle", "window", "wizard", "wolf", "zebra",
)  # fmt: skip


class TaskError(UserInputError):
    """A task that cannot be generated: unknown name, a length too short for its prompt, no text."""


@dataclass(frozen=True)
class TaskSample:
    """One generation prompt of exactly ``len(input_ids)`` tokens.

    ``input_ids`` ends with the assistant's answer prefix (e.g. "The secret code of the amber owl
    is"); a correct greedy reply lists ``answers`` (in this order when ``ordered``).
    ``reference_ids`` are the tokens of the canonical reply (``" " + ", ".join(answers)``) as they
    follow the prompt: their log-likelihood is reported beside exact match. ``ignored`` are reply
    words that carry no answer (``var`` in ``VAR X``).
    """

    task: str
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    ordered: bool
    reference_ids: tuple[int, ...]
    ignored: tuple[str, ...] = ()


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


# ----------------------------------------------------------------------------------------------
# Scoring


def answer_items(reply: str, ignored: Sequence[str] = ()) -> list[str]:
    """The items a reply lists: its text up to the first line break or sentence end (a period
    followed by a space or the end), split at commas, semicolons, "and" and whitespace; surrounding
    punctuation stripped, lower-cased, ``ignored`` words dropped."""
    text = reply.strip().split("\n", 1)[0]
    text = re.split(r"\.(?:\s|$)", text, maxsplit=1)[0]
    items = []
    for piece in re.split(r"[,;\s]+", text):
        item = piece.strip(".:!?\"'()[]{}*`").lower()
        if item and item != "and" and item not in ignored:
            items.append(item)
    return items


def is_exact_match(reply: str, sample: TaskSample) -> bool:
    """True when ``reply`` lists exactly the sample's answers (in order when the task asks for it)."""
    got = answer_items(reply, sample.ignored)
    want = [a.lower() for a in sample.answers]
    return got == want if sample.ordered else sorted(got) == sorted(want)


def can_still_match(reply: str, sample: TaskSample) -> bool:
    """False once no continuation of ``reply`` can make it an exact match: a finished item is not an
    answer (or one too many), or the unfinished last item starts no answer that is left. Greedy
    decoding of a reply stops there; its score is already decided."""
    items = answer_items(reply, sample.ignored)
    finished_last = bool(re.search(r"[,;\s]$", reply))
    done, partial = (items, "") if finished_last or not items else (items[:-1], items[-1])
    want = [a.lower() for a in sample.answers]
    if sample.ordered:
        if done != want[: len(done)]:
            return False
        left = want[len(done) : len(done) + 1]  # the next answer only
    else:
        remaining = Counter(want)
        remaining.subtract(done)
        if min(remaining.values(), default=0) < 0 or len(done) > len(want):
            return False
        left = [a for a, k in remaining.items() if k > 0]
    return not partial or any(w.startswith(partial) for w in [*left, "and", *sample.ignored])


# ----------------------------------------------------------------------------------------------
# Prompt pieces


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_HAYSTACK = "@@HAYSTACK@@"


def prompt_parts(tokenizer: Any, intro: str, question: str, answer_prefix: str) -> tuple[str, str, bool]:
    """Text before and after the haystack, through the chat template when the tokenizer has one
    (``User: ... Assistant:`` otherwise); the tail ends with ``answer_prefix``. The last item says
    whether the chat template was used."""
    content = intro + _HAYSTACK + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        templated = True
    else:
        text = f"User: {content}\nAssistant: "
        templated = False
    head, tail = text.split(_HAYSTACK)
    return head, tail + answer_prefix, templated


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def continuation_ids(tokenizer: Any, prefix: str, continuation: str) -> list[int]:
    """The tokens of ``continuation`` as they follow ``prefix`` when the two are tokenized together."""
    head = encode(tokenizer, prefix)
    full = encode(tokenizer, prefix + continuation)
    if full[: len(head)] == head:
        return full[len(head) :]
    return encode(tokenizer, continuation)


def fill(units: Iterator[list[int]], budget: int) -> list[list[int]]:
    """Units totalling exactly ``budget`` tokens: as many whole units as fit, opened by the tail end of
    the next unit (so the haystack ends on a whole unit, just before the question)."""
    taken: list[list[int]] = []
    used = 0
    for unit in units:
        if used + len(unit) > budget:
            rest = budget - used
            return ([unit[len(unit) - rest :]] if rest else []) + taken
        taken.append(unit)
        used += len(unit)
    raise TaskError("the haystack source ran dry")  # units are endless cycles: unreachable by design


def _too_short(task: str, length: int, missing: int) -> TaskError:
    return TaskError(f"--lengths {length} is too short for {task} (needs at least {length + missing} tokens)")


class Prose:
    """Natural text cut into sentences, each tokenized once (with a leading space): haystack units."""

    def __init__(self, texts: Sequence[str], tokenizer: Any):
        sentences = [
            s.strip()
            for text in texts
            for line in text.splitlines()
            for s in re.split(r"(?<=[.!?])\s+", line)
            if s.strip()
        ]
        if not sentences:
            raise TaskError("the natural text for the needle tasks is empty (--data)")
        encoded = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        self.units = [list(ids) for ids in encoded]  # each non-empty: a sentence has a visible character

    def stream(self, rng: random.Random) -> Iterator[list[int]]:
        """Sentences from a random one onwards, wrapping around the text."""
        start = rng.randrange(len(self.units))
        while True:
            yield from self.units[start:]
            start = 0


def _repeat(unit: list[int]) -> Iterator[list[int]]:
    while True:
        yield unit


def build_prompt(
    task: str,
    length: int,
    head: list[int],
    tail: list[int],
    units: Iterator[list[int]],
    needles: Sequence[tuple[float, list[int]]],
) -> list[int]:
    """``head + haystack + tail`` of exactly ``length`` tokens; each needle ``(depth, ids)`` goes
    between haystack units, ``depth`` of the way through them (needles at one place keep their order)."""
    budget = length - len(head) - len(tail) - sum(len(ids) for _, ids in needles)
    if budget < 1:
        raise _too_short(task, length, 1 - budget)
    pieces = fill(units, budget)
    slots: dict[int, list[list[int]]] = {}
    for depth, ids in needles:
        slots.setdefault(round(depth * len(pieces)), []).append(ids)
    out = list(head)
    for i, piece in enumerate(pieces):
        for ids in slots.get(i, ()):
            out += ids
        out += piece
    for ids in slots.get(len(pieces), ()):
        out += ids
    return out + list(tail)


# ----------------------------------------------------------------------------------------------
# Generators


def _keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct "adjective noun" keys."""
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], count)
    return [f"{a} {n}" for a, n in pairs]


def _value(rng: random.Random, kind: str, exclude: set[str]) -> str:
    while True:
        if kind == "number":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "word":
            value = rng.choice(NOUNS)
        else:
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in exclude:
            return value


def _sample(
    task: str,
    tokenizer: Any,
    length: int,
    intro: str,
    question: str,
    answer_prefix: str,
    units: Iterator[list[int]],
    needles: Sequence[tuple[float, str]],
    answers: Sequence[str],
    ordered: bool,
    ignored: tuple[str, ...] = (),
) -> TaskSample:
    head, tail, _ = prompt_parts(tokenizer, intro, question, answer_prefix)
    ids = build_prompt(
        task,
        length,
        encode(tokenizer, head),
        encode(tokenizer, tail),
        units,
        [(d, encode(tokenizer, text)) for d, text in needles],
    )
    reference = continuation_ids(tokenizer, answer_prefix, " " + ", ".join(answers))
    return TaskSample(task, tuple(ids), tuple(answers), ordered, tuple(reference), ignored)


def _needle_sample(task: str, tokenizer: Any, length: int, rng: random.Random, prose: Prose) -> TaskSample:
    kind = {"needle_word": "word", "needle_uuid": "uuid"}.get(task, "number")
    noun = VALUE_KINDS[kind]
    count = 1 if task in ("needle_number", "needle_word", "needle_uuid") else NEEDLES_PER_MULTI_TASK
    keys = _keys(rng, 1 if task == "needle_multivalue" else count)
    values: list[str] = []
    for _ in range(count):
        values.append(_value(rng, kind, set(values) | {w for k in keys for w in k.split()}))
    depths = [rng.random() for _ in range(count)]
    if task == "needle_multivalue":
        needles = [
            (d, f" A secret {noun} of the {keys[0]} is {v}.") for d, v in zip(depths, values, strict=True)
        ]
        question = f" List every secret {noun} of the {keys[0]}."
        prefix, answers, ordered = f"The secret {noun}s of the {keys[0]} are:", values, False
    else:
        needles = [
            (d, NEEDLE.format(kind=noun, key=k, value=v))
            for d, k, v in zip(depths, keys, values, strict=True)
        ]
        if task == "needle_multiquery":
            asked = ", the ".join(keys[:-1]) + f" and the {keys[-1]}"
            question = f" What are the secret {noun}s of the {asked}? Answer in that order."
            prefix, answers, ordered = f"In that order, the secret {noun}s are:", values, True
        else:  # one key asked: the first needle's (the others, in multikey, are distractors)
            question = f" What is the secret {noun} of the {keys[0]}?"
            prefix, answers, ordered = f"The secret {noun} of the {keys[0]} is", values[:1], True
    return _sample(
        task,
        tokenizer,
        length,
        NEEDLE_INTRO,
        question,
        prefix,
        prose.stream(rng),
        needles,
        answers,
        ordered,
    )


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken and name != "VAR":
            taken.add(name)
            return name


def _tracking_sample(tokenizer: Any, length: int, rng: random.Random) -> TaskSample:
    """Two chains of assignments in filler; the first chain's names are the answer, the second a
    distractor with another value. A chain's lines appear in order, at increasing depths."""
    taken: set[str] = set()
    values = rng.sample(range(10_000, 100_000), 2)
    needles = []
    chains = []
    for value in values:
        names = [_variable_name(rng, taken) for _ in range(CHAIN_LENGTH)]
        lines = [f" VAR {names[0]} = {value}."] + [
            f" VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)
        ]
        needles += zip(sorted(rng.random() for _ in lines), lines, strict=True)
        chains.append(names)
    needles.sort(key=lambda pair: pair[0])
    question = f" Which variables are assigned the value {values[0]}, directly or through other variables?"
    prefix = f"The variables assigned the value {values[0]} are:"
    return _sample(
        "variable_tracking",
        tokenizer,
        length,
        TRACKING_INTRO,
        question,
        prefix,
        _repeat(encode(tokenizer, PASSKEY_FILLER)),
        needles,
        chains[0],
        False,
        ("var",),
    )


def _common_words_sample(tokenizer: Any, length: int, rng: random.Random) -> TaskSample:
    """A list where each of five common words fills ~4% of the slots (at least 3) and ~100 rare words
    share the rest round-robin, so a rare word is at most ~1/5 as frequent as a common one."""
    words = list(NOUNS)
    rng.shuffle(words)
    common, rare = words[:COMMON_WORD_COUNT], words[COMMON_WORD_COUNT:]
    question = f" What are the {COMMON_WORD_COUNT} most frequent words in the list?"
    prefix = f"The {COMMON_WORD_COUNT} most frequent words are:"
    head, tail, _ = prompt_parts(tokenizer, COMMON_INTRO, question, prefix)
    head_ids, tail_ids = encode(tokenizer, head + " "), encode(tokenizer, tail)
    item_ids = {w: encode(tokenizer, f" {w},") for w in words}
    budget = length - len(head_ids) - len(tail_ids)
    mean_item = sum(map(len, item_ids.values())) / len(item_ids)
    slots = int(budget / mean_item)
    per_common = max(3, round(0.04 * slots))
    if slots <= COMMON_WORD_COUNT * per_common:
        raise _too_short(
            "common_words", length, round((COMMON_WORD_COUNT * per_common + 1) * mean_item) - budget
        )
    # The list: the common words' copies, then rare words round-robin until the budget is reached.
    items = [w for w in common for _ in range(per_common)]
    used = sum(len(item_ids[w]) for w in items)
    for i in range(len(rare) * slots):
        word = rare[i % len(rare)]
        if used + len(item_ids[word]) > budget:
            break
        items.append(word)
        used += len(item_ids[word])
    rng.shuffle(items)
    # What is left of the budget (less than one item) is filler before the list's first item.
    pad = encode(tokenizer, PASSKEY_FILLER)
    rest = budget - used
    padding = (pad * (rest // len(pad) + 1))[-rest:] if rest else []
    ids = head_ids + padding + [t for w in items for t in item_ids[w]] + tail_ids
    reference = continuation_ids(tokenizer, prefix, " " + ", ".join(common))
    return TaskSample("common_words", tuple(ids), tuple(common), False, tuple(reference))


def task_samples(
    task: str, tokenizer: Any, length: int, count: int, seed: int = 0, prose: Prose | None = None
) -> list[TaskSample]:
    """``count`` seeded prompts of ``task`` of exactly ``length`` tokens. ``prose`` (natural text) is
    the haystack of the ``needle_*`` tasks."""
    if task not in RULER_TASKS:
        raise TaskError(f"unknown task {task!r}; tasks are {', '.join(RULER_TASKS)}")
    rng = random.Random(f"{task}/{seed}/{length}")
    if task in PROSE_TASKS:
        if prose is None:
            raise TaskError(f"{task} needs natural text for its haystack (--data)")
        return [_needle_sample(task, tokenizer, length, rng, prose) for _ in range(count)]
    if task == "variable_tracking":
        return [_tracking_sample(tokenizer, length, rng) for _ in range(count)]
    return [_common_words_sample(tokenizer, length, rng) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# Passkey


def passkey_depths(count: int) -> list[float]:
    """``count`` depths spread evenly over :data:`PASSKEY_DEPTHS` (cycling when count > 6)."""
    m = len(PASSKEY_DEPTHS)
    if count >= m:
        return [PASSKEY_DEPTHS[j % m] for j in range(count)]
    if count == 1:
        return [PASSKEY_DEPTHS[m // 2]]
    return [PASSKEY_DEPTHS[round(j * (m - 1) / (count - 1))] for j in range(count)]


def passkey_samples(tokenizer: Any, length: int, count: int, seed: int = 0) -> list[PasskeySample]:
    """``count`` seeded passkey prompts of exactly ``length`` tokens, depths from :func:`passkey_depths`."""
    head, tail = (
        encode(tokenizer, part)
        for part in prompt_parts(tokenizer, PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX)[:2]
    )
    filler = encode(tokenizer, PASSKEY_FILLER)
    rng = random.Random(f"passkey/{seed}/{length}")
    samples = []
    for depth in passkey_depths(count):
        key = str(rng.randint(10000, 99999))
        needle = encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
        answer = continuation_ids(tokenizer, PASSKEY_ANSWER_PREFIX, f" {key}")
        n_filler = length - len(head) - len(needle) - len(tail) - len(answer)
        if n_filler < len(filler):
            raise _too_short("the passkey prompt", length, len(filler) - n_filler)
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
