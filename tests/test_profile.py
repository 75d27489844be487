"""The influence profile: formula vs brute force, bounded path vs materialised maps, files, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from moa_compress.data import CalibrationSample
from moa_compress.profile import (
    Profile,
    ProfileError,
    answer_loss,
    influence_backward,
    load_profile,
    profile_model,
    profile_sample,
    save_profile,
)
from tests.factories import random_qkv, tiny_model

# ----------------------------------------------------------------------------------------------
# Test-only attention functions: materialised probabilities, and one entry dropped + renormalised.

_STATE: dict = {}


def _causal_probs(query, key):
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1)
    s = query.shape[2]
    scores = (query @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), -1)


def _materialised_attention(module, query, key, value, attention_mask, **kwargs):
    probs = _causal_probs(query, key)
    if probs.requires_grad:
        probs.retain_grad()
    _STATE["maps"][module.layer_idx] = probs
    out = probs @ value.repeat_interleave(query.shape[1] // key.shape[1], 1)
    return out.transpose(1, 2).contiguous(), None


def _dropping_attention(module, query, key, value, attention_mask, **kwargs):
    """Scale A[head, i, j] of one layer by (1 - t) and renormalise the row (t = 1: drop the entry); ``i``
    and ``j`` may be slices (a block: its rows renormalised)."""
    probs = _causal_probs(query, key)
    drop = _STATE.get("drop")
    if drop is not None and drop[0] == module.layer_idx:
        _, head, i, j, t = drop
        probs = probs.clone()
        probs[:, head, i, j] *= 1 - t
        probs[:, head, i] /= probs[:, head, i].sum(-1, keepdim=True)
    out = probs @ value.repeat_interleave(query.shape[1] // key.shape[1], 1)
    return out.transpose(1, 2).contiguous(), None


def _use(model, name, fn):
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    model.set_attn_implementation(name)


def _sample(n, vocab, seed, scored):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n - scored :] = True
    return CalibrationSample(ids, mask)


def _loss(model, sample, inputs_embeds=None):
    """Mean NLL on the scored tokens from full logits (independent of profile's logits_to_keep path)."""
    if inputs_embeds is None:
        logits = model(input_ids=sample.input_ids[None], use_cache=False).logits[0]
    else:
        logits = model(inputs_embeds=inputs_embeds, use_cache=False).logits[0]
    targets = sample.input_ids[1:][sample.loss_mask[1:]]
    return F.cross_entropy(logits[:-1][sample.loss_mask[1:]].double(), targets)


def _reference_pooled(model, sample, block_size, net=False):
    """Pooled |E| (``net``: |sum E|) from materialised maps: eager attention, retain_grad on A, loops
    over blocks."""
    _STATE["maps"] = {}
    _use(model, "test_materialised", _materialised_attention)
    embeds = model.get_input_embeddings()(sample.input_ids[None]).detach().requires_grad_(True)
    _loss(model, sample, embeds).backward()
    layers = []
    for layer in range(len(_STATE["maps"])):
        a = _STATE["maps"][layer][0].detach()
        g = _STATE["maps"][layer].grad[0]
        e = a * (g - (g * a).sum(-1, keepdim=True)) / (1 - a)
        e = torch.where(a < 1, e, torch.zeros_like(e))
        e = e if net else e.abs()
        n = e.shape[-1]
        nb = -(-n // block_size)
        pooled = torch.zeros(e.shape[0], nb, nb, dtype=torch.float64)
        for bi in range(nb):
            for bj in range(bi + 1):
                rows = slice(bi * block_size, (bi + 1) * block_size)
                cols = slice(bj * block_size, (bj + 1) * block_size)
                pooled[:, bi, bj] = e[:, rows, cols].sum((-1, -2)).abs()
        layers.append(pooled)
    return torch.stack(layers), embeds.grad


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slab_rows", [1, 3, 100])
def test_bounded_path_equals_materialised_maps(slab_rows):
    model = tiny_model("llama", dtype=torch.float64, layers=2, heads=4, kv_heads=2, head_dim=16)
    sample = _sample(75, 128, seed=1, scored=11)  # odd length: ragged last block
    bs = 16
    # slab_bytes chosen so the backward uses `slab_rows` query blocks per slab.
    slab = slab_rows * bs * 4 * 75 * 8
    bounded = profile_sample(model, sample, block_size=bs, slab_bytes=slab)
    reference, _ = _reference_pooled(model, sample, bs)
    assert bounded.shape == (2, 4, 5, 5)
    assert bounded.dtype == torch.float32
    assert reference.abs().sum() > 0
    torch.testing.assert_close(bounded.double(), reference, rtol=1e-5, atol=1e-9)
    # above the diagonal there is nothing
    assert torch.all(bounded.triu(1) == 0)
    net = profile_sample(model, sample, block_size=bs, slab_bytes=slab, kind="net")
    net_reference, _ = _reference_pooled(model, sample, bs, net=True)
    torch.testing.assert_close(net.double(), net_reference, rtol=1e-5, atol=1e-9)
    # signed effects cancel inside blocks: |sum E| <= sum |E|, strictly somewhere
    assert torch.all(net <= bounded * (1 + 1e-6)) and bool((net < 0.9 * bounded).any())


def test_backward_gradients_are_exact():
    """The profiling backward must hand earlier layers the same gradients as autograd through A."""
    q, k, v = random_qkv(b=2, hq=6, hkv=2, sq=37, d=8, seed=3)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    probs = _causal_probs(q, k)
    out = probs @ v.repeat_interleave(3, 1)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    dq, dk, dv, pooled, mass, net = influence_backward(
        q.detach(), k.detach(), v.detach(), d_out, 8**-0.5, 8, slab_bytes=1
    )
    for mine, ref in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    assert pooled.shape == (6, 5, 5)
    # mass: the attention probabilities summed over each block (and the batch); every row sums to 1
    from moa_compress.profile import _pool

    torch.testing.assert_close(mass.double(), _pool(probs.detach(), 8).double(), rtol=1e-5, atol=1e-5)
    # net: |sum E| per block, taken per batch element, then summed over the batch
    g = torch.einsum("bhid,bhjd->bhij", d_out, v.detach().repeat_interleave(3, 1))
    a = probs.detach()
    e = a * (g - (g * a).sum(-1, keepdim=True)) / (1 - a)
    e = torch.where(a < 1, e, torch.zeros_like(e))
    expected = _pool(e, 8, per_item=True).abs().sum(0)
    torch.testing.assert_close(net.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        mass.sum(-1).double(),
        torch.tensor([[16.0] * 4 + [10.0]] * 6, dtype=torch.float64),
        rtol=1e-6,
        atol=1e-5,
    )


def test_bounded_profile_input_gradient_matches_eager():
    model = tiny_model("qwen2", dtype=torch.float64, layers=2, heads=4, kv_heads=2, head_dim=16)
    sample = _sample(40, 128, seed=5, scored=7)
    _, ref_grad = _reference_pooled(model, sample, 8)
    from moa_compress.profile import _profiling, _Recorder

    recorder = _Recorder(2, 4, 8, 1 << 20)
    with _profiling(model, recorder):
        recorder.start(40)
        embeds = model.get_input_embeddings()(sample.input_ids[None]).detach().requires_grad_(True)
        _loss(model, sample, embeds).backward()
    torch.testing.assert_close(embeds.grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_influence_formula_against_brute_force():
    """block_size 1 gives |E_ij| itself; compare with the loss change of really editing A_ij."""
    model = tiny_model("llama", dtype=torch.float64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64)
    n = 24
    sample = _sample(n, 64, seed=7, scored=6)
    influence = profile_sample(model, sample, block_size=1).double()  # [L, H, n, n]
    _STATE["maps"] = {}
    _use(model, "test_materialised", _materialised_attention)
    with torch.no_grad():
        base = float(_loss(model, sample))
    probs = {layer: a[0].detach() for layer, a in _STATE["maps"].items()}
    _use(model, "test_drop", _dropping_attention)

    def loss_with(layer, head, i, j, t):
        _STATE["drop"] = (layer, head, i, j, t)
        try:
            with torch.no_grad():
                return float(_loss(model, sample))
        finally:
            _STATE["drop"] = None

    # the largest entries of each layer, in rows with several keys
    checked = 0
    for layer in range(2):
        for flat in influence[layer, :, 8:, :].flatten().topk(3).indices.tolist():
            head, i, j = flat // ((n - 8) * n), 8 + (flat // n) % (n - 8), flat % n
            e = influence[layer, head, i, j].item()
            a = probs[layer][head, i, j].item()
            # a small edit, central difference: scaling A_ij by (1 - t) and renormalising moves the row by
            # t (1 - A_ij) along the full drop's direction, so dL/dt = -E_ij (1 - A_ij). (RMSNorm computes in
            # float32 even in a float64 model, so t cannot be tiny.)
            t = 1e-2
            slope = (loss_with(layer, head, i, j, t) - loss_with(layer, head, i, j, -t)) / (2 * t)
            assert abs(slope) == pytest.approx(e * (1 - a), rel=2e-3)
            # really drop the entry: agrees to first order in A_ij
            dropped = loss_with(layer, head, i, j, 1.0) - base
            assert abs(dropped) == pytest.approx(e, rel=4 * a + 1e-3)
            checked += 1
    assert checked == 6


def test_net_influence_is_the_block_drop_slope():
    """|sum E| over a block against the loss's slope when the whole block is scaled down and its rows
    renormalised: dL/dt = -sum E_ij (1 - A_ij), so the two differ by at most max(A) * sum |E|."""
    model = tiny_model("llama", dtype=torch.float64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64)
    n, bs = 32, 4
    sample = _sample(n, 64, seed=11, scored=8)
    net = profile_sample(model, sample, block_size=bs, kind="net").double()
    entry = profile_sample(model, sample, block_size=bs).double()
    _STATE["maps"] = {}
    _use(model, "test_materialised", _materialised_attention)
    with torch.no_grad():
        _loss(model, sample)
    probs = {layer: a[0].detach() for layer, a in _STATE["maps"].items()}
    _use(model, "test_drop", _dropping_attention)

    def loss_with(edit):
        _STATE["drop"] = edit
        try:
            with torch.no_grad():
                return float(_loss(model, sample))
        finally:
            _STATE["drop"] = None

    nb = n // bs
    checked = 0
    for layer in range(2):
        # the largest blocks below the diagonal, in query blocks with several keys
        lower = net[layer].clone()
        lower[:, :2] = 0
        lower[:, torch.arange(nb), torch.arange(nb)] = 0
        for flat in lower.flatten().topk(3).indices.tolist():
            head, bi, bj = flat // (nb * nb), (flat // nb) % nb, flat % nb
            rows, cols = slice(bi * bs, (bi + 1) * bs), slice(bj * bs, (bj + 1) * bs)
            t = 1e-2
            slope = (loss_with((layer, head, rows, cols, t)) - loss_with((layer, head, rows, cols, -t))) / (
                2 * t
            )
            largest = probs[layer][head, rows, cols].max().item()
            bound = largest * entry[layer, head, bi, bj].item() + 2e-3 * net[layer, head, bi, bj].item()
            assert abs(abs(slope) - net[layer, head, bi, bj].item()) <= bound
            checked += 1
    assert checked == 6


def test_profile_model_resumes_and_detects_changed_arguments(tmp_path, monkeypatch):
    model = tiny_model("mistral", dtype=torch.float32, layers=2, heads=4, kv_heads=1, head_dim=16)
    samples = {48: [_sample(48, 128, s, 5) for s in range(2)], 80: [_sample(80, 128, 9, 8)]}
    work = tmp_path / "work"
    first = profile_model(model, samples, block_size=16, work_dir=work, progress=False)
    assert first.lengths == (48, 80)
    assert first.samples == {48: 2, 80: 1}
    assert sorted(p.name for p in work.glob("*/*.safetensors")) == [
        "sample-0000.safetensors",
        "sample-0000.safetensors",
        "sample-0001.safetensors",
    ]
    expected = (
        profile_sample(model, samples[48][0], block_size=16)
        + profile_sample(model, samples[48][1], block_size=16)
    ) / 2
    torch.testing.assert_close(first.influence[48], expected)

    import moa_compress.profile as profile_module

    def no_recompute(*args, **kwargs):
        raise AssertionError("a finished sample was recomputed")

    monkeypatch.setattr(profile_module, "_profile_one", no_recompute)
    again = profile_model(model, samples, block_size=16, work_dir=work, progress=False)
    for n in first.lengths:
        torch.testing.assert_close(again.influence[n], first.influence[n])
    monkeypatch.undo()

    with pytest.raises(ProfileError, match="block_size"):
        profile_model(model, samples, block_size=8, work_dir=work, progress=False)
    other = {48: [_sample(48, 128, 3, 5)], 80: samples[80]}
    with pytest.raises(ProfileError, match="data"):
        profile_model(model, other, block_size=16, work_dir=work, progress=False)
    forced = profile_model(model, other, block_size=16, work_dir=work, progress=False, force=True)
    torch.testing.assert_close(forced.influence[80], first.influence[80])
    assert len(list(work.glob("48/*.safetensors"))) == 1


def test_profiling_restores_the_model():
    model = tiny_model("llama", layers=1)
    before = model.config._attn_implementation
    model.lm_head.weight.requires_grad_(True)
    profile_sample(model, _sample(20, 128, 0, 3), block_size=8)
    assert model.config._attn_implementation == before
    assert model.lm_head.weight.requires_grad
    assert model.lm_head.weight.grad is None


def test_answer_loss_is_token_weighted_nll():
    model = tiny_model("llama", layers=1)
    samples = [_sample(30, 128, 0, 3), _sample(30, 128, 1, 9)]
    with torch.no_grad():
        losses = [float(_loss(model, s)) for s in samples]
    assert answer_loss(model, samples) == pytest.approx((3 * losses[0] + 9 * losses[1]) / 12, rel=1e-5)


def _profile(n=128, bs=64):
    from moa_compress.plan import ModelIdentity

    identity = ModelIdentity("tiny", 2, 4, 2, 16, "0123456789abcdef")
    nb = -(-n // bs)
    influence = {n: torch.rand(2, 4, nb, nb).tril()}
    return Profile(identity, bs, influence, {n: 3}, {"seed": 0})


def test_save_load_roundtrip(tmp_path):
    profile = _profile(130, 64)
    path = save_profile(profile, tmp_path / "p")
    assert path.name == "profile.json"
    loaded = load_profile(tmp_path / "p")
    assert loaded.model == profile.model and loaded.samples == {130: 3} and loaded.block_size == 64
    torch.testing.assert_close(loaded.influence[130], profile.influence[130])
    assert load_profile(path).lengths == (130,)
    assert loaded.mass == {}  # a profile without attention mass stays without
    with_mass = dataclasses.replace(profile, mass={130: torch.rand(2, 4, 3, 3).tril()})
    save_profile(with_mass, tmp_path / "m")
    torch.testing.assert_close(load_profile(tmp_path / "m").mass[130], with_mass.mass[130])
    with pytest.raises(ProfileError, match="mass"):
        dataclasses.replace(profile, mass={130: torch.rand(2, 4, 2, 2)})
    with pytest.raises(FileExistsError):
        save_profile(profile, tmp_path / "p")
    save_profile(profile, tmp_path / "p", force=True)


def test_load_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="no profile"):
        load_profile(tmp_path)
    save_profile(_profile(), tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    meta["lengths"] = [256]
    (tmp_path / "p" / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="malformed"):
        load_profile(tmp_path / "p")
    (tmp_path / "p" / "profile.json").write_text("{")
    with pytest.raises(ProfileError, match="invalid JSON"):
        load_profile(tmp_path / "p")


def test_profile_rejects_bad_shapes():
    from moa_compress.plan import ModelIdentity

    identity = ModelIdentity("tiny", 2, 4, 2, 16, "0")
    with pytest.raises(ProfileError, match="shape"):
        Profile(identity, 64, {128: torch.zeros(2, 4, 3, 3)}, {128: 1})
    good = {128: torch.zeros(2, 4, 2, 2)}
    for field in ("mass", "net"):
        with pytest.raises(ProfileError, match="maps do not match"):
            Profile(identity, 64, good, {128: 1}, **{field: {128: torch.zeros(2, 4, 3, 3)}})
        with pytest.raises(ProfileError, match="maps do not match"):
            Profile(identity, 64, good, {128: 1}, **{field: {256: torch.zeros(2, 4, 4, 4)}})
        Profile(identity, 64, good, {128: 1}, **{field: {128: torch.zeros(2, 4, 2, 2)}})
    with pytest.raises(ProfileError, match="at least one"):
        profile_model(tiny_model(layers=1), {64: []}, progress=False)


def test_profile_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moa_compress.cli import app
    from tests.factories import tiny_bpe_tokenizer

    monkeypatch.setenv("MOA_COMPRESS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=512, max_pos=512).save_pretrained(
        folder
    )
    tiny_bpe_tokenizer().save_pretrained(folder)
    out = tmp_path / "prof"
    args = [
        "profile",
        str(folder),
        "--out",
        str(out),
        "--lengths",
        "256,320",
        "--samples",
        "2,1",
        "--answer-tokens",
        "4",
        "--dtype",
        "float32",
        "--block-size",
        "64",
        "--no-progress",
    ]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    profile = load_profile(out)
    assert profile.lengths == (256, 320) and profile.samples == {256: 2, 320: 1}
    assert profile.influence[320].shape == (2, 4, 5, 5)
    assert profile.provenance["mode"] == "answers" and profile.provenance["seed"] == 0
    assert len(list((out / "work").glob("*/*.safetensors"))) == 3

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    for bad, message in (
        (["--lengths", "4096", "--samples", "1"], "maximum positions"),
        (["--samples", "1,2,3"], "one per length"),
        (["--mode", "chat"], "--mode"),
    ):
        result = runner.invoke(app, [*args, "--force", *bad])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


@pytest.mark.gpu
def test_bounded_path_on_cuda_matches_cpu():
    model = tiny_model("llama", dtype=torch.float32, layers=2, heads=4, kv_heads=2, head_dim=16)
    sample = _sample(200, 128, seed=2, scored=20)
    on_cpu = profile_sample(model, sample, block_size=64)
    on_gpu = profile_sample(model.to("cuda"), sample, block_size=64)
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-6)


def test_sliding_window_layers_run_their_window_and_record_nothing():
    """Gemma-style layers: the window layer (40 tokens, 77-token input) attends as the model's own
    attention does (the input gradient equals the stock model's) and its maps stay zero."""
    model = tiny_model("gemma3", dtype=torch.float64, layers=2, heads=4, kv_heads=2, head_dim=16)
    sample = _sample(77, 128, seed=5, scored=9)
    embeds = model.get_input_embeddings()(sample.input_ids[None]).detach().requires_grad_(True)
    _loss(model, sample, embeds).backward()  # the stock sdpa model, window included
    from moa_compress.profile import _profiling, _Recorder

    recorder = _Recorder(2, 4, 16, 1 << 20)
    with _profiling(model, recorder):
        recorder.start(77)
        mine = model.get_input_embeddings()(sample.input_ids[None]).detach().requires_grad_(True)
        _loss(model, sample, mine).backward()
    torch.testing.assert_close(mine.grad, embeds.grad, rtol=1e-9, atol=1e-12)
    assert recorder.seen == [1]
    maps = profile_sample(model, sample, block_size=16)
    assert (maps[0] == 0).all() and (maps[1] > 0).any()
