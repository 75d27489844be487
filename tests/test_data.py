"""Calibration sets: exact lengths, answer-only loss masks, the dense model's own answers, caching, errors."""

from __future__ import annotations

import pytest
import torch

from moa_compress import data as data_module
from moa_compress.data import CalibrationSample, DataError, calibration_set, model_digest
from tests.factories import tiny_bpe_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=16, vocab=512, max_pos=1024)


PROSE = [
    " ".join(
        f"Paragraph {i}: the fox number {i * 7 + j} jumped over dog {j} near the river." for j in range(60)
    )
    + "\n"
    for i in range(6)
]


def test_answers_mode_synthetic(model, tokenizer, tmp_path):
    sets = calibration_set(
        model,
        tokenizer,
        lengths=[384, 256],
        samples_per_length={256: 3, 384: 1},
        cache_dir=tmp_path,
        progress=False,
        answer_tokens=6,
    )
    assert sorted(sets) == [256, 384] and len(sets[256]) == 3 and len(sets[384]) == 1
    for n, samples in sets.items():
        for s in samples:
            assert isinstance(s, CalibrationSample)
            assert s.input_ids.shape == (n,) and s.input_ids.dtype == torch.int64
            assert s.loss_mask.dtype == torch.bool and 1 <= int(s.loss_mask.sum()) <= 6
            scored = torch.nonzero(s.loss_mask).flatten()
            assert scored.tolist() == list(
                range(int(scored[0]), int(scored[-1]) + 1)
            )  # one contiguous answer
            prompt = s.input_ids[: int(scored[0])]
            text = tokenizer.decode(prompt)
            assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
            assert "Section" in text
            # the scored tokens are exactly the dense model's greedy answer to that prompt
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt[None],
                    attention_mask=torch.ones_like(prompt[None]),
                    max_new_tokens=6,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            assert out[0, len(prompt) :].tolist() == s.input_ids[s.loss_mask].tolist()
    assert len(list(tmp_path.glob("*.json"))) == 4


def test_answers_are_seeded_and_cached(model, tokenizer, tmp_path, monkeypatch):
    kwargs = {
        "lengths": [256],
        "samples_per_length": 2,
        "cache_dir": tmp_path,
        "progress": False,
        "answer_tokens": 4,
    }
    first = calibration_set(model, tokenizer, **kwargs)

    def no_generation(self, prompt):
        raise AssertionError("a cached answer was generated again")

    monkeypatch.setattr(data_module._AnswerCache, "_generate", no_generation)
    again = calibration_set(model, tokenizer, **kwargs)
    for a, b in zip(first[256], again[256], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    monkeypatch.undo()
    other = calibration_set(model, tokenizer, **{**kwargs, "samples_per_length": 1}, seed=1)
    assert not torch.equal(other[256][0].input_ids, first[256][0].input_ids)
    # another model (other weights) never reuses these answers
    assert model_digest(model) != model_digest(
        tiny_model("llama", seed=1, layers=1, heads=2, kv_heads=1, head_dim=16, vocab=512)
    )


def test_answers_mode_user_texts(model, tokenizer, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(PROSE):
        (folder / f"{i}.txt").write_text(text)
    sets = calibration_set(
        model,
        tokenizer,
        lengths=[320],
        samples_per_length=2,
        data=folder,
        cache_dir=tmp_path / "c",
        progress=False,
        answer_tokens=4,
    )
    for s in sets[320]:
        assert len(s.input_ids) == 320
        assert "fox number" in tokenizer.decode(s.input_ids)


def test_plain_mode(model, tokenizer):
    sets = calibration_set(
        model, tokenizer, lengths=[200], samples_per_length=3, data=PROSE, mode="plain", progress=False
    )
    windows = {tuple(w) for w in data_module.token_windows(PROSE, tokenizer, 200)}
    for s in sets[200]:
        assert tuple(s.input_ids.tolist()) in windows
        assert s.loss_mask.tolist() == [False] * 175 + [True] * 25
    synthetic = calibration_set(
        model, tokenizer, lengths=[128], samples_per_length=2, mode="plain", progress=False
    )
    assert all(len(s.input_ids) == 128 and int(s.loss_mask.sum()) == 16 for s in synthetic[128])
    assert "Section 1" in tokenizer.decode(synthetic[128][0].input_ids)


def test_mixed_mode_alternates_answers_and_held_out_prose(model, tokenizer, tmp_path):
    """Even samples are answers, odd ones prose windows; held-out prose never repeats a calibration window."""
    common = {"lengths": [256], "prose": PROSE, "mode": "mixed", "cache_dir": tmp_path, "progress": False}
    sets = calibration_set(model, tokenizer, samples_per_length=5, answer_tokens=4, **common)
    held = calibration_set(model, tokenizer, samples_per_length=5, answer_tokens=4, held_out=True, seed=9,
                           **common)  # fmt: skip
    windows = {tuple(w) for w in data_module.token_windows(PROSE, tokenizer, 256)}
    for samples in (sets[256], held[256]):
        assert len(samples) == 5
        for i, s in enumerate(samples):
            assert len(s.input_ids) == 256
            if i % 2:  # a prose window: its last eighth scored
                assert tuple(s.input_ids.tolist()) in windows
                assert s.loss_mask.tolist() == [False] * 224 + [True] * 32
            else:  # an answer to a synthetic prompt
                assert 1 <= int(s.loss_mask.sum()) <= 4
                assert "Section" in tokenizer.decode(s.input_ids)
    calibrated = {tuple(s.input_ids.tolist()) for s in sets[256][1::2]}
    held_prose = {tuple(s.input_ids.tolist()) for s in held[256][1::2]}
    assert len(calibrated) == len(held_prose) == 2 and not calibrated & held_prose
    # The prose windows do not depend on the seed (held-out samples are drawn with another one).
    again = calibration_set(model, tokenizer, samples_per_length=5, answer_tokens=4, seed=3, **common)
    assert [s.input_ids.tolist() for s in again[256][1::2]] == [s.input_ids.tolist() for s in sets[256][1::2]]
    with pytest.raises(DataError, match=r"mixed calibration needs \d+ prose windows of 256 tokens"):
        calibration_set(model, tokenizer, samples_per_length=400, **common)


def test_gate_extra_samples_avoid_the_prose_of_calibration_and_validation(model, tokenizer, tmp_path):
    """Samples that only train the gates: exactly N tokens, nothing scored; in mixed mode prompts
    alternate with prose windows neither calibration nor validation uses, and prompts fill once that
    prose runs out; sample i does not depend on the count; answers mode gives prompts only."""
    from moa_compress.data import gate_extra_set

    common = {"lengths": [256], "prose": PROSE, "mode": "mixed", "cache_dir": tmp_path, "progress": False}
    sets = calibration_set(model, tokenizer, samples_per_length=4, answer_tokens=4, **common)  # 2 prose
    held = calibration_set(model, tokenizer, samples_per_length=2, answer_tokens=4, held_out=True, seed=9,
                           **common)  # fmt: skip
    used = {tuple(s.input_ids.tolist()) for s in sets[256][1::2] + held[256][1::2]}
    windows = {tuple(w) for w in data_module.token_windows(PROSE, tokenizer, 256)}
    assert len(used) == 3 and used <= windows and len(windows) >= 8
    free = len(windows) - 3
    extra = gate_extra_set(tokenizer, lengths=[256], counts={256: 2 * free + 3}, prose=PROSE, mode="mixed",
                           reserved={256: (2, 1)})[256]  # fmt: skip
    assert len(extra) == 2 * free + 3
    assert all(len(s.input_ids) == 256 and not s.loss_mask.any() for s in extra)
    ids = [tuple(s.input_ids.tolist()) for s in extra]
    prose = [i for i, x in enumerate(ids) if x in windows]
    assert prose == list(range(1, 2 * free, 2))  # every unused window once, at the odd places
    assert len({ids[i] for i in prose}) == free and not {ids[i] for i in prose} & used
    prompts = [x for x in ids if x not in windows]
    assert len(set(prompts)) == len(prompts) == free + 3
    assert all("Section" in tokenizer.decode(list(x)) for x in prompts)
    fewer = gate_extra_set(tokenizer, lengths=[256], counts={256: 5}, prose=PROSE, mode="mixed",
                           reserved={256: (2, 1)})[256]  # fmt: skip
    assert [tuple(s.input_ids.tolist()) for s in fewer] == ids[:5]
    answers = gate_extra_set(tokenizer, lengths=[256, 320], counts={256: 3, 320: 0}, mode="answers")
    assert answers[320] == [] and all(tuple(s.input_ids.tolist()) not in windows for s in answers[256])
    from_text = gate_extra_set(tokenizer, lengths=[256], counts={256: 2}, data=PROSE, mode="plain")[256]
    assert all("the fox number" in tokenizer.decode(s.input_ids) for s in from_text)


def test_shipped_texts_split_by_article(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i:02d}.txt").write_text(f"article {i}\n")
    tune = data_module.shipped_texts("tune", folder)
    evaluation = data_module.shipped_texts("eval", folder)
    assert [t.split()[1] for t in evaluation] == ["0", "1"] and [t.split()[1] for t in tune] == [
        "2",
        "3",
        "4",
        "5",
    ]
    with pytest.raises(DataError, match="missing from this install"):
        data_module.shipped_texts("tune", tmp_path / "none")


def test_bad_requests(model, tokenizer, tmp_path):
    with pytest.raises(DataError, match="maximum positions"):
        calibration_set(model, tokenizer, lengths=[2048], samples_per_length=1, progress=False)
    with pytest.raises(DataError, match="--mode"):
        calibration_set(model, tokenizer, lengths=[128], samples_per_length=1, mode="chat", progress=False)
    with pytest.raises(DataError, match="at least 1"):
        calibration_set(model, tokenizer, lengths=[128], samples_per_length=0, progress=False)
    with pytest.raises(DataError, match="no non-empty text"):
        calibration_set(
            model, tokenizer, lengths=[128], samples_per_length=1, data=["", "  "], progress=False
        )
    with pytest.raises(
        DataError, match=r"need 5000 windows of 200 tokens, the data gives \d+ \(6 of 6 texts"
    ):
        calibration_set(
            model, tokenizer, lengths=[200], samples_per_length=5000, data=PROSE, mode="plain", progress=False
        )
    with pytest.raises(DataError, match="0 of 2 texts reach 900 tokens"):
        calibration_set(
            model,
            tokenizer,
            lengths=[900],
            samples_per_length=1,
            data=["short", "texts"],
            cache_dir=tmp_path,
            progress=False,
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError):
        calibration_set(model, tokenizer, lengths=[128], samples_per_length=1, data=empty, progress=False)
