"""Learned block gates: pooling, targets against brute force, gate shapes with GQA, training, files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moa_compress.data import CalibrationSample
from moa_compress.gates import (
    AttnGate,
    GateError,
    GateSettings,
    block_targets,
    distillation_loss,
    load_gates,
    pool_keys,
    pool_queries,
    sample_targets,
    save_gates,
    train_gates,
)
from tests.factories import tiny_model

MODEL = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 128, "max_pos": 1024}


def test_pooling_over_ragged_blocks_by_brute_force():
    x = torch.randn(2, 3, 70, 8, dtype=torch.float64)  # 70 tokens: blocks of 32, 32 and 6
    q, k = pool_queries(x, 32), pool_keys(x, 32)
    assert q.shape == (2, 3, 3, 8) and k.shape == (2, 3, 3, 24)
    for i, (a, b) in enumerate(((0, 32), (32, 64), (64, 70))):
        part = x[:, :, a:b]
        torch.testing.assert_close(q[:, :, i], part.mean(2))
        torch.testing.assert_close(k[:, :, i], torch.cat([part.mean(2), part.amax(2), part.amin(2)], -1))


@pytest.mark.parametrize("s", [16384, 16384 - 5])  # whole blocks, a ragged last one
def test_pooling_a_long_bfloat16_input_equals_pooling_it_in_float32(s):
    """bfloat16 queries/keys (a model's projections) pool in float32 without a float32 copy of the
    whole input (summed a few heads at a time): the float32 pooling of the same values."""
    x = torch.randn(1, 3, s, 64).to(torch.bfloat16)  # 4 MiB of float32 per head: one head per piece
    q, k = pool_queries(x, 64), pool_keys(x, 64)
    assert q.dtype == k.dtype == torch.float32
    torch.testing.assert_close(q, pool_queries(x.float(), 64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, pool_keys(x.float(), 64), rtol=1e-6, atol=1e-6)
    assert pool_keys(x[:0], 64).shape == (0, 3, -(-s // 64), 192)  # an empty batch


@pytest.mark.parametrize("per_query_head", [False, True])
def test_targets_equal_brute_force_block_max_of_softmax(per_query_head):
    torch.manual_seed(0)
    b, hq, hkv, s, d, bs = 1, 6, 2, 75, 8, 16
    q, k = torch.randn(b, hq, s, d, dtype=torch.float64), torch.randn(b, hkv, s, d, dtype=torch.float64)
    scale = d**-0.5
    # tiny slabs: several slabs, the last one ragged
    got = block_targets(q, k, scale, bs, per_query_head, slab_bytes=1)
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    nb = -(-s // bs)
    expected = torch.zeros(b, hq, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(i + 1):
            expected[:, :, i, j] = probs[:, :, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].amax((-1, -2))
    if not per_query_head:
        expected = expected.view(b, hkv, 3, nb, nb).amax(2)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(got, expected)
    assert torch.all(got.triu(1) == 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1], dtype=torch.float64))


@pytest.mark.parametrize("per_query_head", [False, True])
def test_gate_scores_shape_and_block_causal_mask_with_gqa(per_query_head):
    gate = AttnGate(
        num_heads=6, num_kv_heads=2, head_dim=8, gate_dim=4, block_size=16, per_query_head=per_query_head
    )
    q_blocks, k_blocks = torch.randn(3, 6, 5, 8), torch.randn(3, 2, 5, 24)
    scores = gate(q_blocks, k_blocks)
    assert scores.shape == (3, 6 if per_query_head else 2, 5, 5)
    above = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.isinf(scores[..., above]).all() and torch.isfinite(scores[..., ~above]).all()
    # decode-style: the last query block against all key blocks, bottom-right aligned
    last = gate(q_blocks[:, :, -1:], k_blocks)
    torch.testing.assert_close(last, scores[:, :, -1:])
    with pytest.raises(GateError, match="KV groups"):
        AttnGate(num_heads=5, num_kv_heads=2, head_dim=8)


def test_distillation_loss_is_zero_for_a_matching_gate_and_positive_otherwise():
    target = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    scores = torch.tensor([[0.0, float("-inf")], [0.25, 0.75]]).log()
    scores[0] = torch.tensor([0.0, float("-inf")])
    assert float(distillation_loss(scores, target)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(torch.tensor([[0.0, float("-inf")], [0.0, 0.0]]), target)) > 0.05


def test_training_loss_batched_by_length_equals_the_mean_over_items():
    """The training loop stacks the samples of a length and calls each gate once per length; its loss is
    the plain mean over samples and layers, computed sample by sample (float64, three lengths, GQA)."""
    from moa_compress.gates import _loss_of_all, _stacked

    model = tiny_model("llama", **MODEL)
    items = [
        sample_targets(model, s.input_ids, block_size=32)
        for s in samples(100, 2) + samples(160, 3, seed=1) + samples(64, 1, seed=2)
    ]
    items = [{k: v.double() for k, v in item.items()} for item in items]
    torch.manual_seed(0)
    gates = [AttnGate(4, 2, 16, gate_dim=8, block_size=32).double() for _ in range(2)]
    by_item = sum(
        distillation_loss(gate(item[f"q.{i}"][None], item[f"k.{i}"][None]), item[f"target.{i}"][None])
        for item in items
        for i, gate in enumerate(gates)
    ) / (len(items) * len(gates))
    stacked = _stacked(items)
    assert sorted(n for n, _ in stacked) == [1, 2, 3] and float(by_item.detach()) > 0
    torch.testing.assert_close(_loss_of_all(gates, items), by_item, rtol=1e-12, atol=0)
    torch.testing.assert_close(_loss_of_all(gates, stacked), by_item, rtol=1e-12, atol=0)


def samples(n: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        CalibrationSample(
            torch.randint(0, MODEL["vocab"], (n,), generator=g), torch.ones(n, dtype=torch.bool)
        )
        for _ in range(count)
    ]


def test_sample_targets_match_the_model_and_training_lowers_the_loss(tmp_path):
    model = tiny_model("llama", **MODEL)
    ids = samples(100, 1)[0].input_ids
    found = sample_targets(model, ids, block_size=32)
    assert found["q.0"].shape == (4, 4, 16) and found["k.1"].shape == (2, 4, 48)
    assert found["target.0"].shape == (2, 4, 4)
    # the model's pre-RoPE queries, pooled: q_proj of the normed embeddings, by hand for layer 0
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids[None]))
        q = layer.self_attn.q_proj(x).view(1, 100, 4, 16).transpose(1, 2)
    torch.testing.assert_close(found["q.0"], pool_queries(q, 32)[0])

    settings = GateSettings(block_size=32, gate_dim=8, steps=60, lr=1e-2)
    trained = train_gates(model, {100: samples(100, 2), 160: samples(160, 1, seed=1)}, settings,
                          work_dir=tmp_path / "work", progress=False, heldout={100: samples(100, 1, seed=2)})  # fmt: skip
    assert len(trained.losses) == 60 and len(trained.gates) == 2
    assert trained.losses[-1] < 0.7 * trained.initial_loss
    # a random tiny model's attention is nearly uniform: held-out numbers are measured, not judged, here
    assert set(trained.heldout) == {"initial", "final"} and all(v >= 0 for v in trained.heldout.values())
    assert len(list((tmp_path / "work" / "train").rglob("sample-*.safetensors"))) == 3

    path = save_gates(trained, tmp_path / "gates")
    body = json.loads(path.read_text())
    assert body["tensors"]["layers.1.k_proj"] == {"shape": [2, 48, 8], "dtype": "float32"}
    loaded = load_gates(tmp_path / "gates", model)
    for a, b in zip(loaded, trained.gates, strict=True):
        torch.testing.assert_close(a.q_proj, b.q_proj)
        torch.testing.assert_close(a.k_proj, b.k_proj)
    with pytest.raises(FileExistsError):
        save_gates(trained, tmp_path / "gates")


def test_sliding_window_layers_get_no_targets_and_the_others_train(tmp_path):
    """A Gemma-style model (window layers 0 and 2 of 40 tokens, full layers 1 and 3): targets and gate
    inputs come from the full layers only, the dense forward is the model's own (windows included), and
    the loss is the mean over the layers that have targets."""
    from moa_compress.gates import _loss_of_all

    model = tiny_model("gemma3", **{**MODEL, "layers": 4})
    ids = samples(100, 1)[0].input_ids
    found = sample_targets(model, ids, block_size=32)
    assert sorted(found) == ["k.1", "k.3", "q.1", "q.3", "target.1", "target.3"]
    assert found["target.3"].shape == (2, 4, 4)
    # Layer 3's queries come from the model's own forward: its window layers attend within their window.
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[3]
        attention = model.model.layers[3].self_attn
        q = attention.q_proj(model.model.layers[3].input_layernorm(hidden))
        q = q.view(1, ids.numel(), -1, attention.head_dim).transpose(1, 2).float()
    torch.testing.assert_close(found["q.3"], pool_queries(q, 32)[0], rtol=1e-5, atol=1e-6)
    settings = GateSettings(block_size=32, gate_dim=8, steps=40, lr=1e-2)
    trained = train_gates(model, {100: samples(100, 2)}, settings, progress=False)
    assert len(trained.gates) == 4 and trained.losses[-1] < 0.8 * trained.initial_loss
    items = [sample_targets(model, s.input_ids, block_size=32) for s in samples(100, 2)]
    by_layer = (
        sum(
            distillation_loss(
                trained.gates[i](item[f"q.{i}"][None], item[f"k.{i}"][None]), item[f"target.{i}"][None]
            )
            for item in items
            for i in (1, 3)
        )
        / 4
    )
    torch.testing.assert_close(_loss_of_all(trained.gates, items), by_layer, rtol=1e-6, atol=0)


def test_cross_fitting_gates_are_the_gates_trained_without_each_fold(tmp_path):
    """folds=2: samples dealt to folds in length order; fold f's gates equal gates trained on the other
    samples alone; they are saved beside the main gates and read back; each sample is costed by the
    gates of its own fold (trained without it)."""
    from moa_compress.gates import load_gates_with_folds, sample_folds

    assert sample_folds({100: 3, 160: 2, 64: 1}, 2) == {64: [0], 100: [1, 0, 1], 160: [0, 1]}
    model = tiny_model("llama", **MODEL)
    settings = GateSettings(block_size=32, gate_dim=8, steps=15, lr=1e-2)
    data = {100: samples(100, 3), 160: samples(160, 2, seed=1)}
    trained = train_gates(model, data, settings, progress=False, folds=2)
    assert trained.fold_of == {100: [0, 1, 0], 160: [1, 0]} and len(trained.fold_gates) == 2
    without = {
        0: {100: [data[100][1]], 160: [data[160][0]]},
        1: {100: [data[100][0], data[100][2]], 160: [data[160][1]]},
    }
    for f, subset in without.items():
        expected = train_gates(model, subset, settings, progress=False)
        for got, want in zip(trained.fold_gates[f], expected.gates, strict=True):
            assert torch.equal(got.q_proj, want.q_proj) and torch.equal(got.k_proj, want.k_proj)
        assert trained.fold_losses[f]["train"] == expected.losses[-1]
        assert trained.fold_losses[f]["held_out"] > 0
    full = train_gates(model, data, settings, progress=False)  # the main gates: folds change nothing
    assert all(torch.equal(a.q_proj, b.q_proj) for a, b in zip(full.gates, trained.gates, strict=True))
    by_sample = trained.sample_gates()
    assert by_sample[100][1] == trained.fold_gates[1] and by_sample[160][0] == trained.fold_gates[1]
    assert full.sample_gates() is None and full.fold_of == {}

    save_gates(trained, tmp_path)
    main, fold_gates, fold_of = load_gates_with_folds(tmp_path, model)
    assert fold_of == trained.fold_of and len(main) == 2 and len(load_gates(tmp_path, model)) == 2
    for got_set, want_set in zip(fold_gates, trained.fold_gates, strict=True):
        for got, want in zip(got_set, want_set, strict=True):
            assert torch.equal(got.q_proj, want.q_proj) and torch.equal(got.k_proj, want.k_proj)
    assert json.loads((tmp_path / "gates.json").read_text())["folds"]["count"] == 2
    save_gates(full, tmp_path / "plain")
    assert load_gates_with_folds(tmp_path / "plain")[1:] == ([], {})

    # A fold record that does not deal every recorded sample into every fold once is damage.
    good = json.loads((tmp_path / "gates.json").read_text())
    damages = [
        (2, {"100": [0, 2, 0], "160": [1, 0]}),  # a fold that does not exist
        (2, {}),  # no samples
        (2, {"100": [0, 1, 0], "160": [1]}),  # a sample missing
        (2, {"100": [0, 0, 0], "160": [0, 0]}),  # fold 1 costs nothing
        (1, {"100": [0, 0, 0], "160": [0, 0]}),  # one fold is no cross-fitting
    ]
    for count, of in damages:
        body = {**good, "folds": {**good["folds"], "count": count, "of": of}}
        (tmp_path / "gates.json").write_text(json.dumps(body))
        with pytest.raises(GateError, match="do not deal its samples"):
            load_gates_with_folds(tmp_path)
    with pytest.raises(GateError, match="--gate-folds 3 needs at least 3 calibration samples"):
        train_gates(model, {100: samples(100, 2)}, settings, progress=False, folds=3)
    with pytest.raises(GateError, match="--gate-folds must be positive"):
        train_gates(model, {100: samples(100, 2)}, settings, progress=False, folds=0)
    for decay in (-0.1, float("nan"), 1 / settings.lr, True):  # AdamW diverges at lr * decay >= 1
        with pytest.raises(GateError, match="--weight-decay must be a number >= 0"):
            train_gates(model, {100: samples(100, 2)}, replace(settings, weight_decay=decay), progress=False)


def test_extra_samples_train_every_gate_set_and_are_never_dealt_to_a_fold(tmp_path):
    """Extra samples train the final gates and every fold's set; the folds deal the calibration samples
    alone, and gates.json records the extra counts; their targets are cached and read back."""
    model = tiny_model("llama", **MODEL)
    settings = GateSettings(block_size=32, gate_dim=8, steps=10, lr=1e-2)
    data = {100: samples(100, 2), 160: samples(160, 1, seed=1)}
    extra = {100: samples(100, 1, seed=5), 160: samples(160, 2, seed=6)}
    trained = train_gates(
        model, data, settings, progress=False, folds=2, extra=extra, work_dir=tmp_path / "w"
    )
    assert trained.fold_of == {100: [0, 1], 160: [0]} and trained.extra == {100: 1, 160: 2}
    merged = train_gates(model, {n: data[n] + extra[n] for n in data}, settings, progress=False)
    assert all(torch.equal(a.k_proj, b.k_proj) for a, b in zip(trained.gates, merged.gates, strict=True))
    fold_inside = {0: {100: [data[100][1]]}, 1: {100: [data[100][0]], 160: data[160]}}
    for f, inside in fold_inside.items():
        want = train_gates(model, inside, settings, progress=False, extra=extra)
        for got, exp in zip(trained.fold_gates[f], want.gates, strict=True):
            assert torch.equal(got.q_proj, exp.q_proj) and torch.equal(got.k_proj, exp.k_proj)
    assert len(list((tmp_path / "w" / "extra").rglob("sample-*.safetensors"))) == 3
    again = train_gates(model, data, settings, progress=False, folds=2, extra=extra, work_dir=tmp_path / "w")
    assert all(torch.equal(a.k_proj, b.k_proj) for a, b in zip(trained.gates, again.gates, strict=True))
    # A cached extra target of other tokens is not reused for sample 0.
    other = {100: samples(100, 1, seed=7), 160: extra[160]}
    changed = train_gates(model, data, settings, progress=False, extra=other, work_dir=tmp_path / "w")
    fresh = train_gates(model, data, settings, progress=False, extra=other)
    assert all(torch.equal(a.k_proj, b.k_proj) for a, b in zip(changed.gates, fresh.gates, strict=True))
    body = json.loads(save_gates(trained, tmp_path / "g").read_text())
    assert body["extra_samples"] == {"100": 1, "160": 2} and body["samples"] == {"100": 2, "160": 1}
    assert "extra_samples" not in json.loads(save_gates(merged, tmp_path / "m").read_text())


def test_damaged_gate_files_are_one_line_errors(tmp_path):
    model = tiny_model("llama", **MODEL)
    trained = train_gates(model, {64: samples(64, 1)}, GateSettings(block_size=32, gate_dim=8, steps=2),
                          progress=False)  # fmt: skip
    save_gates(trained, tmp_path)
    tensors = tmp_path / "gates.safetensors"
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])
    with pytest.raises(GateError, match="missing or damaged"):
        load_gates(tmp_path)
    tensors.unlink()
    with pytest.raises(GateError, match="missing or damaged"):
        load_gates(tmp_path)
    from safetensors.torch import save

    tensors.write_bytes(save({"layers.0.q_proj": torch.zeros(3, 3)}))
    with pytest.raises(GateError, match="not of shape"):
        load_gates(tmp_path)
    other = tiny_model("llama", **{**MODEL, "heads": 2, "kv_heads": 1})
    tensors.write_bytes(good)
    with pytest.raises(GateError, match="another model"):
        load_gates(tmp_path, other)
    body = json.loads((tmp_path / "gates.json").read_text())
    del body["settings"]
    (tmp_path / "gates.json").write_text(json.dumps(body))
    with pytest.raises(GateError, match="malformed gates file"):
        load_gates(tmp_path)
    with pytest.raises(GateError, match="--gate-dim must be even"):
        GateSettings(gate_dim=3).check()


def test_train_gates_command_writes_gates_and_a_report(tmp_path):
    from typer.testing import CliRunner

    from moa_compress.cli import app
    from tests.factories import tiny_bpe_tokenizer

    folder = tmp_path / "model"
    tokenizer = tiny_bpe_tokenizer()
    tiny_model("llama", **{**MODEL, "vocab": len(tokenizer)}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The fox number {i} jumps over the lazy dog." for i in range(200)))
    out = tmp_path / "gates"
    args = ["train-gates", str(folder), "--out", str(out), "--data", str(text), "--lengths", "128,256",
            "--samples", "1", "--block-size", "32", "--gate-dim", "8", "--steps", "20", "--dtype", "float32",
            "--weight-decay", "0.5", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "KL per query-block row" in result.output and "held out" in result.output
    assert (out / "gates.json").is_file() and (out / "gates.safetensors").is_file()
    assert json.loads((out / "gates.json").read_text())["settings"]["weight_decay"] == 0.5
    assert "Distillation loss" in (out / "report.md").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    bad = CliRunner().invoke(app, [*args, "--force", "--gate-dim", "7"])
    assert bad.exit_code == 2 and "--gate-dim must be even" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, [*args, "--force", "--weight-decay", "inf"])
    assert bad.exit_code == 2 and "--weight-decay must be a number >= 0" in bad.output


@pytest.mark.parametrize("n", [64, 200, 1000, 1029])
def test_selection_keeps_sink_and_diagonal_never_empties_a_row_and_meets_its_density(n):
    from moa_compress.gates import blocks_for_density, select_blocks, selection_density
    from moa_compress.plan import causal_block_pairs, num_blocks

    bs = 64
    nb = num_blocks(n, bs)
    pairs = causal_block_pairs(n, bs)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    for k in range(1, nb + 2):
        scores = torch.randn(2, 3, nb, nb).masked_fill(~causal, float("-inf"))
        mask = select_blocks(scores, k)
        assert not (mask & ~causal).any()
        assert mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., 0].all()
        assert (mask.sum(-1) == torch.clamp(torch.arange(nb) + 1, max=max(k, 2))).all()
        # the best-scoring free blocks are the ones kept
        free = causal & ~torch.eye(nb, dtype=torch.bool)
        free[:, 0] = False
        weakest_kept = scores.masked_fill(~(mask & free), float("inf")).amin(-1)
        best_dropped = scores.masked_fill(~(free & ~mask), float("-inf")).amax(-1)
        assert (best_dropped <= weakest_kept).all()
        counted = (pairs * mask[0, 0]).sum() / pairs.sum()
        assert float(counted) == pytest.approx(
            selection_density(max(k, 2) if nb > 1 else 1, n, bs), abs=1e-12
        )
    for density in (0.1, 0.25, 0.5, 1.0):
        k = blocks_for_density(density, n, bs)
        assert selection_density(k, n, bs) <= density + 1e-12 or k == min(2, nb)
        if k < nb:
            assert selection_density(k + 1, n, bs) > density
