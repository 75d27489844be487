"""Gradient influence profile: how much the loss depends on each head's (query block, key block).

For one layer and query head let ``A`` be the attention probabilities and ``G = dL/dA`` the gradient of
the calibration loss. Removing entry ``(i, j)`` and renormalising row ``i`` changes ``A_i`` by
``-A_ij`` at ``j`` and by ``A_in * A_ij / (1 - A_ij)`` elsewhere, so to first order the loss changes by
``-E_ij`` with::

    E_ij = A_ij * (G_ij - sum_n G_in * A_in) / (1 - A_ij)

The profile stores, per length ``N``, ``[layers, query_heads, nQ, nK]``: the sum of ``|E_ij|`` over the
causal entries of each ``block_size x block_size`` block, averaged over calibration samples. A model's
sliding-window layers (:attr:`~moa_compress.plan.ModelIdentity.windows`), which plans leave as they are,
run their window (gradients flow through them) and record nothing: their maps stay zero.

Bounded memory: ``E`` is never materialised for more than a slab of query rows of one layer. The model
runs with an attention function (registered through transformers' ``AttentionInterface``) whose forward
is plain causal SDPA saving only ``q, k, v``; its backward recomputes ``A`` slab by slab in float32, forms
``G = dO @ V^T``, pools ``|E|`` into blocks at once, and returns the exact ``q, k, v`` gradients so the
backward pass continues into earlier layers. Peak memory is the model's activations plus one slab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moa_compress import distributed
from moa_compress.attn_interface import use_attention
from moa_compress.data import CalibrationSample, model_digest, progress_steps
from moa_compress.errors import UserInputError
from moa_compress.plan import ModelIdentity, atomic_write_bytes, identity_of, num_blocks

SCHEMA_VERSION = 1
PROFILE_FILE = "profile.json"
TENSOR_FILE = "profile.safetensors"
FORMAT = "moa-compress-profile"
ATTENTION_NAME = "moa_compress_profile"
# Bytes of float32 scratch per slab of query rows in the backward (each of ~3 live [H, rows, N] maps).
DEFAULT_SLAB_BYTES = 256 * 2**20
# The pooled maps of one sample, in the order the backward, the recorder and the work files use.
_SAMPLE_MAPS = ("influence", "mass", "net")


class ProfileError(UserInputError):
    """A profile or profiling work folder that cannot be used."""


@dataclass(frozen=True)
class Profile:
    """Per-length block influence of every query head.

    ``influence[N]``: float32 ``[layers, query_heads, nQ, nK]`` with ``nQ = nK = ceil(N / block_size)``;
    the mean over ``samples[N]`` calibration samples of the sum of ``|E_ij|`` over each block's causal
    entries (0 for blocks above the diagonal). ``mass[N]``: same shape, the mean of the sum of the
    attention probabilities over each block (a query block's row sums its rows' total mass, one per
    row); the search uses it for the renormalisation a whole dropped set causes. ``net[N]``: same
    shape, the mean over samples of ``|sum E_ij|`` over each block, the first-order loss change of
    dropping the block as a whole (signed effects inside a block cancel; see
    :func:`moa_compress.search.rule_costs`). ``mass`` and ``net`` are empty in profiles written before
    they were recorded. ``provenance`` records tool, command, data and seed.
    """

    model: ModelIdentity
    block_size: int
    influence: dict[int, torch.Tensor]
    samples: dict[int, int]
    provenance: dict[str, Any] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    net: dict[int, torch.Tensor] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ProfileError(f"block_size must be positive, got {self.block_size}")
        if set(self.influence) != set(self.samples):
            raise ProfileError(
                f"influence lengths {sorted(self.influence)} != sample-count lengths {sorted(self.samples)}"
            )
        for n, tensor in self.influence.items():
            nb = num_blocks(n, self.block_size)
            expected = (self.model.num_layers, self.model.num_heads, nb, nb)
            if tuple(tensor.shape) != expected:
                raise ProfileError(f"influence at {n} has shape {tuple(tensor.shape)}, expected {expected}")
            if tensor.dtype != torch.float32:
                raise ProfileError(f"influence at {n} has dtype {tensor.dtype}, expected float32")
            if self.samples[n] <= 0:
                raise ProfileError(f"influence at {n} averages {self.samples[n]} samples")
        for name, maps in (("attention mass", self.mass), ("net influence", self.net)):
            if maps and (
                set(maps) != set(self.influence)
                or any(maps[n].shape != self.influence[n].shape for n in maps)
            ):
                raise ProfileError(f"{name} maps do not match the influence maps' lengths and shapes")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sorted(self.influence))


# ----------------------------------------------------------------------------------------------
# The bounded-memory attention backward


def influence_backward(
    query: torch.Tensor,  # [B, Hq, S, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, D]
    grad_out: torch.Tensor,  # [B, Hq, S, D]  dL/d(attention output)
    scale: float,
    block_size: int,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> tuple[torch.Tensor, ...]:
    """Causal attention backward that also pools the influence ``E`` and the attention mass into blocks.

    Returns ``(dq, dk, dv, pooled, mass, net)`` with the gradients in the inputs' dtypes and three
    float32 ``[Hq, nB, nB]`` maps, each summed over the batch: ``pooled`` the sum of ``|E|`` over each
    block, ``mass`` the sum of the attention probabilities ``A`` over each block and ``net`` the
    absolute value of the block's signed sum ``|sum E|`` (one batch element at a time). Arithmetic is float32 (float64 for float64 inputs); ``A`` is
    recomputed in slabs of whole query blocks sized so that one ``[B, Hq, rows, S]`` map fits in
    ``slab_bytes``.
    """
    b, hq, s, d = query.shape
    group = hq // key.shape[1]
    nb = num_blocks(s, block_size)
    work = torch.promote_types(query.dtype, torch.float32)
    q = query.to(work) * scale  # scaled once: scores = q @ k^T
    k = key.to(work).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    v = value.to(work).repeat_interleave(group, dim=1)
    do = grad_out.to(work)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    pooled = torch.zeros(hq, nb, nb, dtype=torch.float32, device=query.device)
    mass = torch.zeros(hq, nb, nb, dtype=torch.float32, device=query.device)
    net = torch.zeros(hq, nb, nb, dtype=torch.float32, device=query.device)
    rows_per_slab = max(1, slab_bytes // (q.element_size() * b * hq * s * block_size)) * block_size
    positions = torch.arange(s, device=query.device)
    for r0 in range(0, s, rows_per_slab):
        r1 = min(s, r0 + rows_per_slab)  # causal: rows < r1 see keys < r1
        # exp(scores - row max), with the causal mask applied where it bites: keys r0..r1 of this slab
        expd = torch.matmul(q[:, :, r0:r1], k[:, :, :r1].transpose(-1, -2))  # [B, H, R, K]
        expd[..., r0:].masked_fill_(positions[None, r0:r1] > positions[r0:r1, None], float("-inf"))
        row_max, top = expd.max(dim=-1, keepdim=True)
        expd.sub_(row_max).exp_()
        grad_probs = torch.matmul(do[:, :, r0:r1], v[:, :, :r1].transpose(-1, -2))  # G = dL/dA
        # Sums over the row without its largest entry (exactly 1 after the shift), taken apart so that
        # 1 - A and the others' mean stay accurate when that entry holds almost all the mass.
        expd.scatter_(-1, top, 0.0)
        rest_sum = expd.sum(-1, keepdim=True)
        rest_dot = torch.matmul(grad_probs.unsqueeze(-2), expd.unsqueeze(-1)).squeeze(-1)  # sum G e
        expd.scatter_(-1, top, 1.0)
        top_grad = grad_probs.gather(-1, top)
        total = rest_sum + 1.0
        probs = expd.div_(total)  # A
        row_dot = (rest_dot + top_grad) / total  # sum_n G_in A_in
        grad_scores = grad_probs.sub_(row_dot).mul_(probs)  # A (G - rowdot) = dL/dscores
        # E_ij = A_ij (G_ij - rowdot) / (1 - A_ij), fine wherever A_ij <= 1/2 (every entry but the row's
        # largest); there E = A (G - mean of G over the other entries, weighted by A).
        influence = torch.sub(1.0, probs).reciprocal_().mul_(grad_scores)
        top_mean = torch.where(rest_sum > 0, rest_dot / rest_sum.clamp_min(1e-30), top_grad)
        influence.scatter_(-1, top, probs.gather(-1, top) * (top_grad - top_mean))
        slab = (
            slice(None),
            slice(r0 // block_size, num_blocks(r1, block_size)),
            slice(0, num_blocks(r1, block_size)),
        )
        # A slab holds whole query blocks, so each block's signed sum is complete here.
        net[slab] += _pool(influence, block_size, per_item=True).abs_().sum(0).float()
        pooled[slab] += _pool(influence.abs_(), block_size).float()
        mass[slab] += _pool(probs, block_size).float()
        del influence
        dq[:, :, r0:r1] = torch.matmul(grad_scores, k[:, :, :r1])
        dk[:, :, :r1] += torch.matmul(grad_scores.transpose(-1, -2), q[:, :, r0:r1])
        dv[:, :, :r1] += torch.matmul(probs.transpose(-1, -2), do[:, :, r0:r1])
        del probs, grad_scores, grad_probs, expd
    dq.mul_(scale)  # q was pre-scaled, so dk needs no factor
    dk = dk.view(b, -1, group, s, d).sum(2)
    dv = dv.view(b, -1, group, s, d).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), pooled, mass, net


def _pool(values: torch.Tensor, block_size: int, per_item: bool = False) -> torch.Tensor:
    """Sum ``[B, H, R, K]`` over ``block_size`` squares and over the batch -> ``[H, ceil(R/bs), ceil(K/bs)]``
    (``per_item``: not over the batch -> ``[B, H, ...]``)."""
    b, h, r, k = values.shape
    pad_r, pad_k = -r % block_size, -k % block_size
    if pad_r or pad_k:
        values = F.pad(values, (0, pad_k, 0, pad_r))
    nr, nk = (r + pad_r) // block_size, (k + pad_k) // block_size
    pooled = values.view(b, h, nr, block_size, nk, block_size).sum(dim=(3, 5))
    return pooled if per_item else pooled.sum(0)


class _Recorder:
    """Receives one pooled influence, mass and net influence ``[Hq, nB, nB]`` per layer during a backward."""

    def __init__(self, num_layers: int, num_heads: int, block_size: int, slab_bytes: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.block_size, self.slab_bytes = block_size, slab_bytes
        self.pooled: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None
        self.net: torch.Tensor | None = None
        self.seen: list[int] = []

    def start(self, n: int) -> None:
        nb = num_blocks(n, self.block_size)
        self.pooled = torch.zeros(self.num_layers, self.num_heads, nb, nb, dtype=torch.float32)
        self.mass = torch.zeros_like(self.pooled)
        self.net = torch.zeros_like(self.pooled)
        self.seen = []

    def add(self, layer: int, pooled: torch.Tensor, mass: torch.Tensor, net: torch.Tensor) -> None:
        self.pooled[layer] += pooled.cpu()
        self.mass[layer] += mass.cpu()
        self.net[layer] += net.cpu()
        self.seen.append(layer)

    def maps(self) -> tuple[torch.Tensor, ...]:
        """The last sample's pooled maps, in :data:`_SAMPLE_MAPS` order."""
        return self.pooled, self.mass, self.net


class _InfluenceAttention(torch.autograd.Function):
    """Causal SDPA forward; backward = :func:`influence_backward` (gradients plus pooled influence)."""

    @staticmethod
    def forward(ctx, query, key, value, scale, recorder, layer):
        ctx.save_for_backward(query, key, value)
        ctx.scale, ctx.recorder, ctx.layer = scale, recorder, layer
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
        )

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        recorder: _Recorder = ctx.recorder
        dq, dk, dv, *maps = influence_backward(
            query, key, value, grad_out, ctx.scale, recorder.block_size, recorder.slab_bytes
        )
        recorder.add(ctx.layer, *maps)
        return dq, dk, dv, None, None, None


_ACTIVE: _Recorder | None = None


def _profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The AttentionInterface function used while profiling: q/k/v ``[B, H, S, D]`` -> ``[B, S, H, D]``."""
    if _ACTIVE is None:
        raise RuntimeError("the profiling attention ran outside profile_model")
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("profiling needs a full causal prefill (no KV cache)")
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and not bool(attention_mask[..., -1, :].all())
    ):
        raise RuntimeError("profiling does not support padded inputs")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _InfluenceAttention.apply(query, key, value, scale, _ACTIVE, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _profiling(model, recorder: _Recorder) -> Iterator[None]:
    """Switch ``model`` to the profiling attention and freeze its parameters; undo on exit."""
    global _ACTIVE
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    _ACTIVE = recorder
    try:
        with use_attention(model, ATTENTION_NAME, _profile_attention, model_windows=True):
            yield
    finally:
        _ACTIVE = None
        for p, flag in grads:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# Loss on the scored tokens


def _scored_positions(sample: CalibrationSample) -> torch.Tensor:
    return torch.nonzero(sample.loss_mask, as_tuple=False).flatten()


def _sample_loss(model, sample: CalibrationSample, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL over ``sample.loss_mask`` (logits only at the positions that predict them)."""
    device = model.device
    ids = sample.input_ids.to(device)
    targets_at = _scored_positions(sample).to(device)
    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": targets_at - 1}
    if inputs_embeds is None:
        kwargs["input_ids"] = ids[None]
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    logits = model(**kwargs).logits[0].float()  # [T, V]
    return F.cross_entropy(logits, ids[targets_at])


def answer_loss(model, samples: Sequence[CalibrationSample]) -> float:
    """Mean NLL over all loss-mask tokens of ``samples`` (token-weighted), under the model's current
    attention implementation, without gradients."""
    if not samples:
        raise ProfileError("answer_loss needs at least one sample")
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            _check_sample(sample, len(sample.input_ids))
            scored = int(sample.loss_mask.sum())
            total += float(_sample_loss(model, sample)) * scored
            count += scored
    return total / count


def _check_sample(sample: CalibrationSample, n: int) -> None:
    if sample.input_ids.ndim != 1 or len(sample.input_ids) != n:
        raise ProfileError(f"a sample for length {n} has shape {tuple(sample.input_ids.shape)}")
    if sample.loss_mask.shape != sample.input_ids.shape:
        raise ProfileError("a sample's loss_mask does not match its input_ids")
    if bool(sample.loss_mask[0]) or not bool(sample.loss_mask.any()):
        raise ProfileError("a sample's loss_mask must score at least one token and never token 0")


# ----------------------------------------------------------------------------------------------
# Profiling


def profile_sample(
    model,
    sample: CalibrationSample,
    *,
    block_size: int = 64,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    kind: str = "influence",
) -> torch.Tensor:
    """One sample's pooled ``[layers, query_heads, nB, nB]`` float32 map: ``kind`` ``"influence"``
    (sum of ``|E|``), ``"net"`` (``|sum E|``) or ``"mass"`` per block (see :class:`Profile`)."""
    if kind not in _SAMPLE_MAPS:
        raise ValueError(f"kind must be one of {_SAMPLE_MAPS}, got {kind!r}")
    identity = identity_of(model)
    recorder = _Recorder(identity.num_layers, identity.num_heads, block_size, slab_bytes)
    with _profiling(model, recorder):
        _profile_one(model, sample, recorder)
    return dict(zip(_SAMPLE_MAPS, recorder.maps(), strict=True))[kind]


def _profile_one(model, sample: CalibrationSample, recorder: _Recorder) -> torch.Tensor:
    n = len(sample.input_ids)
    recorder.start(n)
    embed = model.get_input_embeddings()
    # Parameters are frozen; requiring grad on the embeddings is what carries the backward into
    # every layer's q/k/v.
    inputs_embeds = embed(sample.input_ids.to(model.device)[None]).detach().requires_grad_(True)
    loss = _sample_loss(model, sample, inputs_embeds)
    loss.backward()
    expected = list(identity_of(model).planned_layers)
    if sorted(recorder.seen) != expected:
        raise RuntimeError(
            f"profiling saw attention backward for layers {sorted(recorder.seen)}, expected {expected}; "
            "does this model call its attention through AttentionInterface?"
        )
    return recorder.pooled


def samples_digest(samples: Sequence[CalibrationSample]) -> str:
    """SHA-256 (16 hex) of the samples' token ids and loss masks."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.input_ids.to(torch.int64).numpy().tobytes())
        h.update(s.loss_mask.to(torch.bool).numpy().tobytes())
    return h.hexdigest()[:16]


def profile_model(
    model,
    samples: Mapping[int, Sequence[CalibrationSample]],
    *,
    block_size: int = 64,
    work_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    provenance: Mapping[str, Any] | None = None,
) -> Profile:
    """Profile ``model`` on calibration ``samples`` (``{N: [sample, ...]}``) -> :class:`Profile`.

    With ``work_dir`` each sample's pooled map is written there atomically as soon as it is done, and a
    rerun with the same model, samples and block size skips finished samples. A ``work_dir`` made with
    other arguments raises :class:`ProfileError` naming what changed, unless ``force`` (then it is
    cleared). ``slab_bytes`` bounds the float32 scratch of one layer's backward.
    """
    if block_size <= 0:
        raise ProfileError(f"block size must be positive, got {block_size}")
    if not samples or any(len(v) == 0 for v in samples.values()):
        raise ProfileError("profiling needs at least one calibration sample per length")
    for n, lst in samples.items():
        for s in lst:
            _check_sample(s, n)
    identity = identity_of(model)
    identity = dataclasses.replace(identity, name=_model_name(model))
    manifest = {
        "model_fingerprint": identity.fingerprint,
        "model_weights": model_digest(model),
        "block_size": block_size,
        "lengths": sorted(samples),
        "samples": {str(n): len(samples[n]) for n in sorted(samples)},
        "data": {str(n): samples_digest(samples[n]) for n in sorted(samples)},
    }
    work = Path(work_dir) if work_dir is not None else None
    group = distributed.current()
    if work is not None:  # rank 0 alone reads and writes the work folder
        distributed.on_main(group, "profiling", lambda: _prepare_work_dir(work, manifest, force))

    recorder = _Recorder(identity.num_layers, identity.num_heads, block_size, slab_bytes)
    means: dict[str, dict[int, torch.Tensor]] = {name: {} for name in _SAMPLE_MAPS}  # over samples
    total = sum(len(v) for v in samples.values())
    seconds: dict[int, list[float]] = {}  # wall time of each sample computed in this run
    show = progress and group.is_main
    with progress_steps(show, total, "profiling") as step, _profiling(model, recorder):
        for n in sorted(samples):
            shape = (
                len(_SAMPLE_MAPS),
                identity.num_layers,
                identity.num_heads,
                *(2 * [num_blocks(n, block_size)]),
            )

            def path_of(i: int, n: int = n) -> Path | None:
                return work / str(n) / f"sample-{i:04d}.safetensors" if work is not None else None

            # Finished samples, read by rank 0; every rank learns which are left. Rank 0 sums the maps in
            # sample order as they become available (so every rank holds the same profile and it equals
            # a one-process run's sum) and keeps only those still waiting for an earlier sample.
            found: dict[int, torch.Tensor] = {}  # sample index -> [3, layers, heads, nB, nB]
            sums, summed = torch.zeros(shape), 0
            if group.is_main and work is not None:
                for i in range(len(samples[n])):
                    maps = _load_sample_result(path_of(i), shape[1:])
                    if maps is not None:
                        found[i] = torch.stack(maps)
            done = set(distributed.broadcast_json(group, sorted(found), "profiling"))
            summed = _add_in_order(sums, found, summed)
            todo = [i for i in range(len(samples[n])) if i not in done]
            for i in done:
                step(f"profiling {n} tokens (sample {i + 1}/{len(samples[n])}, saved)")
            # Round r: rank k profiles todo[r * world + k]; rank 0 gathers the round's maps.
            for start in range(0, len(todo), group.world_size):
                index = start + group.rank
                maps = torch.zeros(shape)
                if index < len(todo):
                    began = time.perf_counter()
                    _profile_one(model, samples[n][todo[index]], recorder)
                    maps = torch.stack(recorder.maps())
                    seconds.setdefault(n, []).append(time.perf_counter() - began)
                gathered = distributed.gather_tensor(group, maps, f"profiling at {n} tokens")
                for k, sample_maps in enumerate(gathered or []):
                    if start + k >= len(todo):
                        break
                    i = todo[start + k]
                    found[i] = sample_maps
                    if work is not None:
                        _save_tensor(path_of(i), *sample_maps.unbind(0))
                    step(f"profiling {n} tokens (sample {i + 1}/{len(samples[n])})")
                summed = _add_in_order(sums, found, summed)
            if group.is_main and summed != len(samples[n]):
                raise RuntimeError(f"profiling at {n} tokens summed {summed} of {len(samples[n])} samples")
            sums = distributed.broadcast_tensor(group, sums, "profiling")
            for name, total_map in zip(_SAMPLE_MAPS, sums.unbind(0), strict=True):
                means[name][n] = total_map / len(samples[n])
    return Profile(
        model=identity,
        block_size=block_size,
        **means,
        samples={n: len(samples[n]) for n in sorted(samples)},
        provenance={
            **dict(provenance or {}),
            "data_digest": manifest["data"],
            "model_weights": manifest["model_weights"],
            "seconds_per_sample": {str(n): round(sum(t) / len(t), 2) for n, t in seconds.items()},
            "ranks": group.world_size,
        },
    )


def _add_in_order(sums: torch.Tensor, found: dict[int, torch.Tensor], summed: int) -> int:
    """Add ``found[summed]``, ``found[summed + 1]``, … to ``sums`` while they are there, dropping each;
    returns how many samples are now summed."""
    while summed in found:
        sums += found.pop(summed)
        summed += 1
    return summed


def broadcast_samples(
    samples: Mapping[int, Sequence[CalibrationSample]] | None, counts: Mapping[int, int]
) -> dict[int, list[CalibrationSample]]:
    """Rank 0's calibration ``samples`` (``{N: [sample] * counts[N]}``) on every rank of the current
    group; ``samples`` is None on the other ranks. A no-op in a single process."""
    group = distributed.current()
    if not group.enabled:
        return {n: list(v) for n, v in samples.items()}
    shared: dict[int, list[CalibrationSample]] = {}
    for n in sorted(counts):
        shared[n] = []
        for i in range(counts[n]):
            ids = samples[n][i].input_ids if group.is_main else torch.zeros(n, dtype=torch.int64)
            mask = samples[n][i].loss_mask if group.is_main else torch.zeros(n, dtype=torch.bool)
            ids = distributed.broadcast_tensor(group, ids.to(torch.int64), "sharing calibration samples")
            mask = distributed.broadcast_tensor(group, mask.to(torch.uint8), "sharing calibration samples")
            shared[n].append(CalibrationSample(input_ids=ids, loss_mask=mask.bool()))
    return shared


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


MANIFEST_FILE = "manifest.json"


def _prepare_work_dir(work: Path, manifest: dict[str, Any], force: bool) -> None:
    path = work / MANIFEST_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        changed = [key for key in manifest if old.get(key) != manifest[key]]
        if changed and not force:
            raise ProfileError(
                f"work folder {work} was made with other arguments ({', '.join(changed)} changed); "
                "pass --force to discard it, or use another --out"
            )
        if changed:
            for stale in work.glob("*/sample-*.safetensors"):
                stale.unlink()
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())


def _save_tensor(path: Path, *maps: torch.Tensor) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({name: t.contiguous() for name, t in zip(_SAMPLE_MAPS, maps, strict=True)}))


def _load_sample_result(path: Path, shape: Sequence[int]) -> tuple[torch.Tensor, ...] | None:
    """A finished sample's pooled influence, mass and net influence, or None if absent, unreadable or
    written before all three were recorded (then it is recomputed)."""
    if not path.exists():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        found = tuple(tensors[name] for name in _SAMPLE_MAPS)
    except (OSError, KeyError, SafetensorError):  # a torn or foreign file: recompute rather than fail
        return None
    ok = all(tuple(t.shape) == tuple(shape) and t.dtype == torch.float32 for t in found)
    return found if ok else None


# ----------------------------------------------------------------------------------------------
# Files


def save_profile(profile: Profile, out_dir: str | Path, force: bool = False) -> Path:
    """Write ``out_dir/profile.json`` and ``out_dir/profile.safetensors``; returns the JSON path.

    Refuses an existing ``profile.json`` unless ``force``.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    target = out / PROFILE_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite")
    tensors = {f"influence.{n}": profile.influence[n].contiguous() for n in profile.lengths}
    tensors.update({f"mass.{n}": profile.mass[n].contiguous() for n in profile.mass})
    tensors.update({f"net.{n}": profile.net[n].contiguous() for n in profile.net})
    atomic_write_bytes(out / TENSOR_FILE, save(tensors))
    meta = {
        "format": FORMAT,
        "schema_version": profile.schema_version,
        "model": profile.model.to_dict(),
        "block_size": profile.block_size,
        "lengths": list(profile.lengths),
        "samples": {str(n): profile.samples[n] for n in profile.lengths},
        "tensors": TENSOR_FILE,
        "provenance": profile.provenance,
    }
    atomic_write_bytes(target, (json.dumps(meta, indent=1, default=str) + "\n").encode())
    return target


def load_profile(path: str | Path) -> Profile:
    """Read a profile from its folder or its ``profile.json``; validates shapes against the metadata."""
    from safetensors.torch import load_file

    p = Path(path)
    json_path = p / PROFILE_FILE if p.is_dir() else p
    if not json_path.exists():
        raise ProfileError(f"no profile at {path} (expected a folder with {PROFILE_FILE})")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{json_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ProfileError(f"{json_path} is not a moa-compress profile")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ProfileError(
            f"{json_path}: schema version {meta.get('schema_version')}, this tool reads {SCHEMA_VERSION}"
        )
    tensor_path = json_path.parent / meta.get("tensors", TENSOR_FILE)
    if not tensor_path.exists():
        raise ProfileError(f"{json_path}: its tensors file {tensor_path.name} is missing")
    try:
        tensors = load_file(str(tensor_path))
        lengths = [int(n) for n in meta["lengths"]]
        influence = {n: tensors[f"influence.{n}"] for n in lengths}
        mass = {n: tensors[f"mass.{n}"] for n in lengths if f"mass.{n}" in tensors}
        net = {n: tensors[f"net.{n}"] for n in lengths if f"net.{n}" in tensors}
        return Profile(
            model=ModelIdentity.from_dict(meta["model"]),
            block_size=int(meta["block_size"]),
            influence=influence,
            mass=mass,
            net=net,
            samples={int(n): int(k) for n, k in meta["samples"].items()},
            provenance=dict(meta.get("provenance", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{json_path}: malformed profile ({type(exc).__name__}: {exc})") from None


__all__ = [
    "Profile",
    "ProfileError",
    "answer_loss",
    "influence_backward",
    "load_profile",
    "profile_model",
    "profile_sample",
    "samples_digest",
    "save_profile",
]
