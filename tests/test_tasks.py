"""moa_compress.tasks: every prompt is exactly its length, seeded, and solvable from its own text."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from moa_compress import tasks
from moa_compress.tasks import (
    RULER_TASKS,
    Prose,
    TaskError,
    TaskSample,
    answer_items,
    can_still_match,
    is_exact_match,
    task_samples,
)
from tests.factories import tiny_bpe_tokenizer

PROSE = (
    "Rivers carry water from hills to the sea. Along the way they cut valleys and feed farms. "
    "Some rivers flood each spring, and towns build walls to hold them back! Others dry up in summer. "
    "Why do people settle near them? Water, fish and easy travel made river banks good places to live."
)
LENGTHS = (900, 1337)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def prose(tokenizer):
    return Prose([PROSE, PROSE.upper()], tokenizer)


def solve(sample: TaskSample, tokenizer) -> list[str]:
    """Answer a prompt from its decoded text alone, the way a careful reader would."""
    text = tokenizer.decode(sample.input_ids)
    if sample.task in ("needle_number", "needle_word", "needle_uuid", "needle_multikey"):
        kind, key = re.search(r"What is the secret (\w+) of the ([a-z ]+)\?", text).groups()
        return re.findall(rf"The secret {kind} of the {key} is (\S+)\.", text)
    if sample.task == "needle_multivalue":
        kind, key = re.search(r"List every secret (\w+) of the ([a-z ]+)\.", text).groups()
        return re.findall(rf"A secret {kind} of the {key} is (\S+)\.", text)
    if sample.task == "needle_multiquery":
        kind, asked = re.search(r"What are the secret (\w+)s of the ([a-z, ]+)\? Answer", text).groups()
        keys = re.split(r", the | and the ", asked)
        return [re.search(rf"The secret {kind} of the {key} is (\S+)\.", text).group(1) for key in keys]
    if sample.task == "variable_tracking":
        value = re.search(r"assigned the value (\d+), directly", text).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]+) = ((?:VAR )?\w+)\.", text))

        def resolve(name: str) -> str:
            source = assigned[name]
            return resolve(source[4:]) if source.startswith("VAR ") else source

        return [name for name in assigned if resolve(name) == value]
    if sample.task == "common_words":
        listing = text.split("others.", 1)[1].split("What are the", 1)[0]
        counts = Counter(w for w in re.findall(r"([a-z]+),", listing))
        ranked = counts.most_common()
        assert (
            ranked[tasks.COMMON_WORD_COUNT - 1][1] > ranked[tasks.COMMON_WORD_COUNT][1]
        )  # no tie at the cut
        return [w for w, _ in ranked[: tasks.COMMON_WORD_COUNT]]
    raise AssertionError(sample.task)


@pytest.mark.parametrize("task", RULER_TASKS)
def test_every_task_is_solvable_from_its_own_prompt(task, tokenizer, prose):
    for length in LENGTHS:
        samples = task_samples(task, tokenizer, length, 3, seed=1, prose=prose)
        for sample in samples:
            assert len(sample.input_ids) == length
            found = solve(sample, tokenizer)
            if sample.ordered:
                assert found == list(sample.answers)
            else:
                assert sorted(found) == sorted(sample.answers)
            # The prompt ends with the answer prefix; the reference reply follows it and scores exact.
            reference = tokenizer.decode(sample.reference_ids)
            assert reference == " " + ", ".join(sample.answers)
            assert is_exact_match(reference, sample)
            assert tokenizer.decode(sample.input_ids).endswith(("is", "are:"))
        assert len({s.input_ids for s in samples}) == 3  # the samples differ


def test_needles_use_the_natural_text_and_distractors_differ(tokenizer, prose):
    sample = task_samples("needle_multikey", tokenizer, 900, 1, prose=prose)[0]
    text = tokenizer.decode(sample.input_ids)
    assert "Rivers carry water" in text or "RIVERS CARRY WATER" in text
    needles = re.findall(r"The secret code of the ([a-z ]+) is (\d{7})\.", text)
    assert len(needles) == tasks.NEEDLES_PER_MULTI_TASK
    assert len({k for k, _ in needles}) == len({v for _, v in needles}) == len(needles)


def test_seeds_reproduce(tokenizer, prose):
    for task in RULER_TASKS:
        a = task_samples(task, tokenizer, 900, 2, seed=0, prose=prose)
        assert a == task_samples(task, tokenizer, 900, 2, seed=0, prose=prose)
        assert a != task_samples(task, tokenizer, 900, 2, seed=1, prose=prose)


def test_plain_prompt_without_a_chat_template(prose):
    plain = tiny_bpe_tokenizer()
    plain.chat_template = None
    sample = task_samples("needle_word", plain, 700, 1, prose=prose)[0]
    text = plain.decode(sample.input_ids)
    assert text.startswith("User: A long text follows.") and "\nAssistant: The secret word of the" in text
    assert solve(sample, plain) == list(sample.answers)


def test_unreachable_lengths_and_unknown_tasks_are_one_line_errors(tokenizer, prose):
    with pytest.raises(TaskError, match=r"--lengths 100 is too short for needle_number \(needs at least \d+"):
        task_samples("needle_number", tokenizer, 100, 1, prose=prose)
    with pytest.raises(TaskError, match="too short for common_words"):
        task_samples("common_words", tokenizer, 150, 1)
    with pytest.raises(TaskError, match="unknown task 'needle_nope'"):
        task_samples("needle_nope", tokenizer, 900, 1)
    with pytest.raises(TaskError, match="needs natural text"):
        task_samples("needle_uuid", tokenizer, 900, 1)
    with pytest.raises(TaskError, match="natural text .* is empty"):
        Prose(["", "  \n "], tokenizer)


@pytest.mark.parametrize(
    ("reply", "items"),
    [
        (" 1234567.", ["1234567"]),
        ("  1234567  ", ["1234567"]),
        ("\n 1234567", ["1234567"]),  # leading whitespace, line breaks too, is skipped
        (" 1234567. It was hidden in the text.", ["1234567"]),
        (" 1234567\nmore", ["1234567"]),
        (' "Lantern"!', ["lantern"]),
        (" 3f2a9c1e-1b2c-4d5e-8f90-123456789abc.", ["3f2a9c1e-1b2c-4d5e-8f90-123456789abc"]),
        (" 11, 22; 33 and 44.", ["11", "22", "33", "44"]),
        (": VAR ABCDE, VAR FGHIJ and VAR KLMNO.", ["var", "abcde", "var", "fghij", "var", "klmno"]),
        (" 3.5 apples", ["3.5", "apples"]),
    ],
)
def test_answer_items_ignore_whitespace_case_and_punctuation(reply, items):
    assert answer_items(reply) == items


def test_exact_match_order_extras_and_ignored_words():
    ordered = TaskSample("needle_multiquery", (1,), ("11", "22"), True, (1,))
    assert is_exact_match(" 11, 22.", ordered)
    assert not is_exact_match(" 22, 11.", ordered)
    assert not is_exact_match(" 11, 22, 33.", ordered)
    assert not is_exact_match(" 11", ordered)
    unordered = TaskSample("variable_tracking", (1,), ("ABCDE", "FGHIJ"), False, (1,), ("var",))
    assert is_exact_match(" VAR FGHIJ and VAR ABCDE.", unordered)
    assert is_exact_match(" fghij, abcde", unordered)
    assert not is_exact_match(" ABCDE, ABCDE", unordered)
    single = TaskSample("needle_word", (1,), ("otter",), True, (1,))
    assert is_exact_match(" Otter.", single) and not is_exact_match(" otter, which", single)


def test_a_reply_is_given_up_only_when_no_continuation_can_match():
    ordered = TaskSample("needle_multiquery", (1,), ("1234", "5678"), True, (1,))
    for alive in ("", " ", " 12", " 1234", " 1234,", " 1234, 56", " 1234 an", " 1234 and 5678"):
        assert can_still_match(alive, ordered), alive
    for dead in (" 5", " 1234, 1", " The", " 1234, 5678, 9", " 12345"):
        assert not can_still_match(dead, ordered), dead
    unordered = TaskSample("variable_tracking", (1,), ("ABCDE", "FGHIJ"), False, (1,), ("var",))
    for alive in (" VA", " VAR FG", " VAR FGHIJ, VAR AB", " fghij and"):
        assert can_still_match(alive, unordered), alive
    for dead in (" VAR FGHIJ, VAR FGHIJ", " VAR X", " ABCDE FGHIJ ABCDE"):
        assert not can_still_match(dead, unordered), dead
    # Giving up never changes a score: every prefix of an exact match is alive.
    reply = " VAR FGHIJ, and VAR ABCDE."
    assert is_exact_match(reply, unordered)
    assert all(can_still_match(reply[:i], unordered) for i in range(len(reply)))
