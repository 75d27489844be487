"""Fast CPU backend: computes only the selected blocks.

Prefill runs through the compiled kernel of ``native.py`` where :func:`native.usable` says so. This
module is the rest, with PyTorch's fused CPU flash-attention op: decoding steps and chunks shorter
than two blocks, float64, autograd, 16-bit inputs the kernel does not pack, negative or non-finite
scales, machines where the kernel cannot be built, and ``MOA_COMPRESS_NATIVE=0``.

How it works. Every (batch, query head, query block) — a *unit* — sees a set of key blocks. Each
maximal run of consecutive key blocks is a contiguous slice of K/V, so it needs no gather: a
strided view is enough. A run splits into *pieces*: keys every row of the block may see (no mask),
the square causal tail on the diagonal (the op's ``is_causal``, which is top-left aligned and so
right for a square), and, for layouts whose diagonal does not line up with the key blocks, a
piece with an explicit additive mask. Each piece is one call of
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the output and the
log-sum-exp; a unit's pieces are merged with the log-sum-exp.

Units whose pieces have the same shape and lie at the same place relative to their query block
(a static plan's band) or at the same absolute keys (its sink blocks) are batched into one call:
the op's batch dimension walks over consecutive query blocks through a strided view whose key
stride is one block (band) or zero (sink), so K/V are never copied. Query heads that share a
layout are batched in the op's head dimension, which handles GQA itself (query head ``h`` reads
KV head ``h // group``), so K/V are never repeated either. Consecutive query blocks that see
their whole causal prefix (dense heads, the first blocks of a band) run as one causal tile.

Irregular layouts (random or data-dependent selections), where this schedule would need many
small calls, take a gather path instead: query blocks with the same number of selected blocks
gather those blocks into one buffer and run in one masked call.

The schedule depends only on the layout; it is cached per layout, so a static plan's layout, built
once per length, pays for it once.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import native
from .layout import BlockLayout, derived
from .reference import block_sparse_attention_reference
from .slots import SlotVisibility

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

# A schedule needing more op calls than this fraction of its units goes down the gather path.
_MAX_CALLS_PER_UNIT = 0.25
# Gathered K/V per gather call, in elements: bounds the path's kept buffers (16 MiB each in float32).
# At 8K, d = 0.25, a gated layer took the same time with 1 << 22, 1 << 23 and 1 << 24.
_GATHER_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Piece:
    """One slice of keys, the same for every query block of a :class:`Task`.

    For the task's ``n``-th query block the keys are ``[start + n * step, ... + length)``.
    ``mask``: ``"none"`` (every row sees every key), ``"causal"`` (square, row ``r`` sees keys
    ``<= r``) or ``"explicit"`` (row ``r`` sees key ``c`` iff ``c <= r + delta``).
    """

    start: int
    step: int
    length: int
    mask: str
    delta: int = 0


@dataclass(frozen=True)
class Task:
    """Query rows ``[row0 + n * block, ... + rows)`` for ``n < count``, heads ``heads``, batch
    ``layout_batch`` of the layout, against the same :class:`Piece` list."""

    layout_batch: int
    heads: tuple[int, ...]
    row0: int
    count: int
    rows: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Schedule:
    tasks: tuple[Task, ...]  # empty when ``gather`` is chosen
    gather: bool
    # Every query row belongs to some task, so the output needs no zero fill first.
    covers_all_rows: bool = False


def block_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    layout: BlockLayout,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Block-sparse causal attention on CPU; same contract as the reference backend.

    Prefill goes to the compiled kernel (``native.py``) where :func:`native.usable` allows; the rest
    takes the fused-op schedule below."""
    if native.usable(q, k, v, layout, scale):
        return native.block_sparse_attention_native(q, k, v, layout, scale)
    if v.shape[-1] != q.shape[-1] or q.device.type != "cpu":
        # The fused op wants one head size for Q/K/V and CPU tensors.
        return block_sparse_attention_reference(q, k, v, layout, scale)
    if layout.q_len == 1 and bool((layout.kv_num_blocks == layout.num_kv_blocks).all()):
        # A decoding step that sees every key (a plan's trimmed KV cache): plain attention, no
        # schedule to build for a layout that changes with every token.
        return _flash(q, k, v, scale=scale)[0]
    return run_schedule(q, k, v, layout, schedule_for(layout, k.shape[1]), scale)


def run_schedule(q, k, v, layout: BlockLayout, schedule: Schedule, scale: float) -> torch.Tensor:
    """Execute ``schedule`` (from :func:`build_schedule` for ``layout``) on CPU tensors."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # Zero-filling an 8K output is a memory pass that barely scales with threads: skip it when
    # the tasks write every row (rows that see no key are written as zeros by the merge).
    out = torch.empty_like(q) if schedule.covers_all_rows else torch.zeros_like(q)
    if schedule.gather:
        _run_gather(q, k, v, layout, scale, out)
    else:
        for task in schedule.tasks:
            _run_task(q, k, v, layout, task, scale, out)
    return out


# ----------------------------------------------------------------------------------------------
# Schedule


def schedule_for(layout: BlockLayout, num_kv_heads: int) -> Schedule:
    """The schedule of ``layout``, built once per layout (see :func:`layout.derived`)."""
    return derived(layout, f"cpu-schedule-{num_kv_heads}", lambda: build_schedule(layout, num_kv_heads))


def build_schedule(layout: BlockLayout, num_kv_heads: int, allow_gather: bool = True) -> Schedule:
    """Plan the op calls for ``layout``; with ``allow_gather`` an irregular layout gets the gather
    path instead (``allow_gather=False`` forces the strided schedule, for tests). Never for fewer
    query rows than a block (a decoding row with the default cache): the gather path would compute a
    whole block of padded query rows per real one."""
    bs, sq, sk = layout.block_size, layout.q_len, layout.kv_len
    allow_gather = allow_gather and sq >= bs
    offset = sk - sq
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    selected = layout.to_block_mask().cpu()  # [LB, H, nQ, nK]
    # Drop blocks no row of the query block may see (after the causal diagonal).
    last_pos = torch.clamp(torch.arange(nq) * bs + bs - 1, max=sq - 1) + offset  # [nQ]
    selected &= (torch.arange(nk) * bs)[None, :] <= last_pos[:, None]
    units = int(selected.any(-1).sum())
    if units == 0:
        return Schedule((), gather=False)
    # Runs of consecutive selected blocks: [first, last] per run.
    padded = torch.nn.functional.pad(selected, (1, 1))
    first = padded[..., 1:-1] & ~padded[..., :-2]
    # A static rule's unit is at most two runs (sink, band); units of more (gate heads' selections)
    # rarely repeat from one query block to the next, so each costs calls of its own: when they alone
    # exceed the call budget, skip planning the strided schedule (a Python loop over every run).
    irregular = int((first.sum(-1) > 2).sum())
    if allow_gather and irregular > max(16, units * _MAX_CALLS_PER_UNIT):
        return Schedule((), gather=True)
    starts = first.nonzero().tolist()
    ends = (padded[..., 1:-1] & ~padded[..., 2:]).nonzero()[:, 3].tolist()
    if allow_gather and len(starts) > 4 * units:
        return Schedule((), gather=True)  # too fragmented to be worth planning

    runs: dict[tuple[int, int, int], list[tuple[int, int]]] = defaultdict(list)
    for (lb, h, i, first), last in zip(starts, ends, strict=True):
        runs[(lb, h, i)].append((first * bs, min((last + 1) * bs, sk)))

    prefix: dict[tuple[int, int], list[int]] = defaultdict(list)  # (lb, h) -> query blocks
    regular: dict[tuple, list[int]] = defaultdict(list)  # (unit shape, lb, i) -> heads
    for (lb, h, i), unit_runs in runs.items():
        rows = min(bs, sq - i * bs)
        p0 = i * bs + offset  # position of the block's first query row
        p1 = p0 + rows - 1
        unit_runs = [(a, min(e, p1 + 1)) for a, e in unit_runs]
        if len(unit_runs) == 1 and unit_runs[0] == (0, p1 + 1):
            prefix[(lb, h)].append(i)
        else:
            shape = tuple(piece for a, e in unit_runs for piece in _split_run(a, e, p0, p1))
            regular[(rows, shape, lb, i)].append(h)

    tasks: list[Task] = []
    for (lb, h), blocks in prefix.items():
        for i0, count in _consecutive(sorted(blocks)):
            tasks.append(_prefix_task(lb, (h,), i0, count, bs, sq, offset))
    by_heads: dict[tuple, list[int]] = defaultdict(list)
    for (rows, shape, lb, i), heads in regular.items():
        by_heads[(rows, shape, lb, tuple(sorted(heads)))].append(i)
    for (rows, shape, lb, heads), blocks in by_heads.items():
        for i0, count in _consecutive(sorted(blocks)):
            p0 = i0 * bs + offset
            pieces = tuple(
                Piece(p0 + rel if kind == "rel" else rel, bs if kind == "rel" else 0, length, mask, delta)
                for kind, rel, length, mask, delta in shape
            )
            tasks.append(Task(lb, heads, i0 * bs, count, rows, pieces))
    tasks = _merge_heads(tasks)
    calls = sum(len(t.pieces) * len(head_ranges(t.heads, layout.num_heads // num_kv_heads)) for t in tasks)
    if allow_gather and calls > max(16, units * _MAX_CALLS_PER_UNIT):
        return Schedule((), gather=True)
    return Schedule(
        tuple(tasks), gather=False, covers_all_rows=units == selected.shape[0] * layout.num_heads * nq
    )


def _split_run(a: int, e: int, p0: int, p1: int) -> list[tuple[str, int, int, str, int]]:
    """Pieces of keys ``[a, e)`` for query positions ``p0..p1``, as
    ``(anchor kind, start relative to anchor, length, mask, delta)``."""

    def anchored(start: int) -> tuple[str, int]:
        # Keys from 0 (sinks) stay put across query blocks; anything else moves with them.
        return ("abs", 0) if start == 0 else ("rel", start - p0)

    # Keys before p0 are visible to every row; a single row (decoding) sees its own position too,
    # and then the run is one piece.
    shared = min(e, p0 + 1 if p0 == p1 else p0)
    pieces = []
    if a < shared:
        pieces.append((*anchored(a), shared - a, "none", 0))
    tail = max(a, shared)
    if tail < e:
        if tail == p0 and e == p1 + 1:
            pieces.append((*anchored(tail), e - tail, "causal", 0))
        else:
            kind, rel = anchored(tail)
            # An absolute anchor with a mask depends on p0: the delta keeps such units apart.
            pieces.append((kind, rel, e - tail, "explicit", p0 - tail))
    return pieces


def _prefix_task(lb: int, heads: tuple[int, ...], i0: int, count: int, bs: int, sq: int, offset: int) -> Task:
    """Query blocks ``i0 .. i0+count-1`` that see their whole causal prefix: one causal tile."""
    row0, row1 = i0 * bs, min((i0 + count) * bs, sq)
    pieces = []
    if row0 + offset > 0:
        pieces.append(Piece(0, 0, row0 + offset, "none"))
    pieces.append(Piece(row0 + offset, 0, row1 - row0, "causal"))
    return Task(lb, heads, row0, 1, row1 - row0, tuple(pieces))


def _consecutive(values: list[int]) -> list[tuple[int, int]]:
    """Sorted ints as ``(first, count)`` runs of consecutive values."""
    out: list[tuple[int, int]] = []
    for x in values:
        if out and out[-1][0] + out[-1][1] == x:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((x, 1))
    return out


def _merge_heads(tasks: list[Task]) -> list[Task]:
    """Tasks identical but for their heads become one task over the union of the heads."""
    merged: dict[tuple, set[int]] = defaultdict(set)
    for t in tasks:
        merged[(t.layout_batch, t.row0, t.count, t.rows, t.pieces)].update(t.heads)
    return [
        Task(lb, tuple(sorted(h)), row0, count, rows, pieces)
        for (lb, row0, count, rows, pieces), h in merged.items()
    ]


def head_ranges(heads: tuple[int, ...], group: int) -> list[tuple[int, int]]:
    """Split sorted query heads into ``[h0, h1)`` ranges one op call can take: runs of whole GQA
    groups (the op maps each query head to its KV head) or single heads."""
    present = set(heads)
    ranges: list[tuple[int, int, bool]] = []  # (h0, h1, made of whole groups)
    for g in sorted({h // group for h in heads}):
        members = [h for h in range(g * group, (g + 1) * group) if h in present]
        if len(members) < group:
            ranges.extend((h, h + 1, False) for h in members)
        elif ranges and ranges[-1][2] and ranges[-1][1] == g * group:
            ranges[-1] = (ranges[-1][0], (g + 1) * group, True)
        else:
            ranges.append((g * group, (g + 1) * group, True))
    return [(h0, h1) for h0, h1, _ in ranges]


# ----------------------------------------------------------------------------------------------
# Strided execution


def _strided(
    x: torch.Tensor,
    batch: int | None,
    h0: int,
    h1: int,
    start: int,
    step: int,
    count: int,
    length: int,
    group: int = 1,
) -> torch.Tensor:
    """View ``[count, heads // group, group, length, D]`` of a contiguous ``[B, H, S, D]`` tensor:
    rows ``start + n * step ...`` of heads ``h0:h1`` of ``batch`` (``None``: all batches and heads)."""
    b, h, s, d = x.shape
    heads = b * h if batch is None else h1 - h0
    base = 0 if batch is None else (batch * h + h0) * s * d
    return x.as_strided(
        (count, heads // group, group, length, d),
        (step * d, group * s * d, s * d, d, 1),
        x.storage_offset() + base + start * d,
    )


# Fold a GQA group's query heads into the rows of one call when query tiles are this short or
# shorter: the op's tiles grow with the query length, and short ones run far below its peak.
_FOLD_ROWS = 256

_MASKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _explicit_mask(rows: int, length: int, delta: int, group: int, dtype: torch.dtype):
    """Additive mask ``[group * rows, length]`` (row ``r`` of each group sees key ``c`` iff
    ``c <= r + delta``) and the boolean ``[group * rows]`` rows that see no key, kept per shape."""
    key = (rows, length, delta, group, dtype)
    return _kept(_MASKS, key, lambda: _made_explicit_mask(*key))


def _kept(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` when missing; the cache is emptied past 256 entries. The
    value is returned as made or found, never read back (another thread may empty the cache)."""
    held = cache.get(key)
    if held is None:
        if len(cache) > 256:
            cache.clear()
        held = cache[key] = make()
    return held


def _made_explicit_mask(rows: int, length: int, delta: int, group: int, dtype: torch.dtype):
    """:func:`_explicit_mask` made anew, outside inference mode: a cached mask first made under
    ``torch.inference_mode()`` must still serve calls outside it (autograd included)."""
    with torch.inference_mode(False):
        allowed = torch.arange(length)[None, :] <= torch.arange(rows)[:, None] + delta
        mask = torch.zeros(rows, length, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        return mask.repeat(group, 1), (torch.arange(rows) + delta < 0).repeat(group)


_PREFIX_MASKS: dict[tuple, torch.Tensor] = {}


def _prefix_causal_mask(bs: int, count: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[group * bs, count * bs]``: every row sees the first ``count - 1`` blocks, and the
    last block (the diagonal) causally — :func:`_explicit_mask` with ``delta = (count - 1) * bs``. One
    mask per ``(bs, group, dtype)`` is kept, as wide as the widest asked for; narrower ones are its
    rightmost columns (a view), so the cache does not grow with every block count a layout has."""
    key = (bs, group, dtype)
    widest = _PREFIX_MASKS.get(key)
    if widest is None or widest.shape[1] < count * bs:
        widest = _PREFIX_MASKS[key] = _made_explicit_mask(bs, count * bs, (count - 1) * bs, group, dtype)[0]
    return widest[:, widest.shape[1] - count * bs :]


def _run_task(q, k, v, layout: BlockLayout, task: Task, scale: float, out: torch.Tensor) -> None:
    bsz, hq = q.shape[:2]
    group = hq // k.shape[1]
    bs, count, rows = layout.block_size, task.count, task.rows
    if layout.kv_num_blocks.shape[0] > 1:
        batches = [task.layout_batch]
    else:  # one layout for the whole batch: fold the batch into the heads when all heads run
        batches = [None] if len(task.heads) == hq else range(bsz)
    for batch in batches:
        for h0, h1 in head_ranges(task.heads, group):
            fold = group if (h1 - h0) % group == 0 and group > 1 and rows <= _FOLD_ROWS else 1
            pieces = _join_diagonal(task.pieces) if fold > 1 else task.pieces
            tile = _tile_blocks(pieces, count, rows, bs, q.dtype)
            tiled = count // tile * tile if tile > 1 else 0
            where = (batch, h0, h1, group, fold, scale)
            if tiled:  # ``tile`` query blocks per op batch entry, each piece widened to cover them all
                calls = [_tile_call(p, tile, bs, fold, q.dtype) for p in pieces]
                _run_calls(q, k, v, out, where, task.row0, tiled // tile, tile * bs, tile * bs, calls, 0)
            if count > tiled:  # one query block per entry (all of them, or those left over)
                calls = [_block_call(p, rows, fold, q.dtype) for p in pieces]
                row0 = task.row0 + tiled * bs
                _run_calls(q, k, v, out, where, row0, count - tiled, rows, bs, calls, tiled * bs)


def _run_calls(q, k, v, out, where, row0: int, count: int, rows: int, step: int, calls, shift: int) -> None:
    """One op call per entry of ``calls`` (:func:`_block_call` / :func:`_tile_call`) over ``count`` query
    tiles of ``rows`` rows, tile ``n`` from row ``row0 + n * step``, of heads ``h0:h1`` of ``batch``;
    their partial outputs merged into ``out``. Keys that move with the queries start ``shift`` later
    than their piece says (the piece's first query block is ``shift`` rows before ``row0``)."""
    batch, h0, h1, group, fold, scale = where
    # [count, kv heads, fold * rows, D]: a copy when folding, a view otherwise.
    q_tile = _strided(q, batch, h0, h1, row0, step, count, rows, fold)
    q_tile = q_tile.reshape(count, q_tile.shape[1], fold * rows, q.shape[-1])
    partial = []
    for start, key_step, length, causal, mask, empty in calls:
        moved = start + shift if key_step else start
        args = (batch, h0 // group, -(-h1 // group), moved, key_step, count, length)
        k_view, v_view = (_strided(x, *args)[:, :, 0] for x in (k, v))
        o, lse = _flash(q_tile, k_view, v_view, attn_mask=mask, is_causal=causal, scale=scale)
        if empty is not None:  # the op reports lse 0 for rows that see no key
            lse = lse.masked_fill(empty, float("-inf"))
        partial.append((o, lse))
    merge_partials(partial, _strided(out, batch, h0, h1, row0, step, count, rows, fold))


def _block_call(piece: Piece, rows: int, fold: int, dtype: torch.dtype):
    """``(start, key step, length, is_causal, mask, empty rows or None)`` of one piece, one query block
    per op batch entry."""
    if piece.mask == "explicit" or (piece.mask == "causal" and fold > 1):
        # A folded tile stacks `fold` copies of the causal pattern: an explicit mask.
        delta = piece.delta if piece.mask == "explicit" else 0
        mask, empty = _explicit_mask(rows, piece.length, delta, fold, dtype)
        return piece.start, piece.step, piece.length, False, mask, empty if delta < 0 else None
    return piece.start, piece.step, piece.length, piece.mask == "causal", None, None


# Low-precision tiles of this many query blocks per op batch entry, by the longest moving piece (in
# blocks): the fused op's bfloat16 path runs far below its peak on 64-row tiles, so a tile of several
# consecutive query blocks against the union of their keys (the extra keys masked) can be faster
# despite the masked work. Measured at 8K, 2 threads, on a 2-core AMX machine (uniform plans, GQA 9/3,
# the whole call, medians of 9 interleaved runs): 14-block bands (d = 0.25) 70 -> 53 ms with 4 blocks
# per tile (58 with 2, 67 with 8), 30-block bands (d = 0.5) 126 -> 109 ms; 5-block bands (d = 0.1)
# 30.3 -> 30.5 ms with 2 and 33 ms with 4, so short bands keep one block. float32 only lost (d = 0.25
# 116 -> 120 ms, d = 0.5 217 -> 244 ms with 4): it keeps one block per entry.
_TILE_BLOCKS = ((10, 4),)  # (from this many blocks, tile blocks), longest first
_TILE_DTYPES = (torch.bfloat16, torch.float16)
_TILE_MASKS: dict[tuple, torch.Tensor] = {}


def _tile_blocks(pieces: tuple[Piece, ...], count: int, rows: int, bs: int, dtype: torch.dtype) -> int:
    """Query blocks per op batch entry for a task of ``count`` whole blocks (1: one each)."""
    if dtype not in _TILE_DTYPES or rows != bs or count < 2:
        return 1
    moving = [p for p in pieces if p.step]
    if not moving or any(p.step != bs or (p.mask == "explicit" and p.delta < 0) for p in moving):
        return 1
    if any(p.mask != "none" for p in pieces if not p.step):
        return 1
    longest = max(p.length for p in moving) // bs
    tile = next((t for least, t in _TILE_BLOCKS if longest >= least), 1)
    return min(tile, count)


def _tile_call(piece: Piece, tile: int, bs: int, fold: int, dtype: torch.dtype):
    """:func:`_block_call` for ``tile`` consecutive query blocks per entry: a fixed piece (sinks) as it
    is; a moving piece widened by ``tile - 1`` blocks, block ``j`` of the tile seeing the piece's own
    keys only (shifted ``j`` blocks), through a mask."""
    if not piece.step:
        return piece.start, 0, piece.length, False, None, None
    length = piece.length + (tile - 1) * bs
    return piece.start, tile * bs, length, False, _tile_mask(tile, bs, piece, fold, dtype), None


def _tile_mask(tile: int, bs: int, piece: Piece, fold: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[fold * tile * bs, piece.length + (tile - 1) * bs]``: row ``r`` (block ``j = r //
    bs``, row ``i = r % bs`` in it) sees key ``c`` iff ``0 <= c - j * bs < piece.length`` and the
    piece's own mask lets row ``i`` see key ``c - j * bs``. Kept per shape (made outside inference
    mode, as :func:`_explicit_mask`)."""
    key = (tile, bs, piece.length, piece.mask, piece.delta, fold, dtype)
    return _kept(_TILE_MASKS, key, lambda: _made_tile_mask(tile, bs, piece, fold, dtype))


def _made_tile_mask(tile: int, bs: int, piece: Piece, fold: int, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        length = piece.length + (tile - 1) * bs
        r = torch.arange(tile * bs)[:, None]
        own = torch.arange(length)[None, :] - (r // bs) * bs  # the key's index in the row's own piece
        allowed = (own >= 0) & (own < piece.length)
        if piece.mask != "none":  # causal: row i sees keys <= i; explicit: <= i + delta
            allowed &= own <= r % bs + (piece.delta if piece.mask == "explicit" else 0)
        mask = torch.zeros(tile * bs, length, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        return mask.repeat(fold, 1)


# Unmasked keys a folded tile's diagonal joins into one masked call: up to this many (a call's fixed
# cost is about that of ~100 keys, the mask's cost grows with every key it covers; at 8K, d = 0.1
# (5-block bands) the join saved ~10%, at d = 0.25 (30 blocks) it cost ~1%).
_JOIN_MAX_KEYS = 1024


def _join_diagonal(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """A folded tile's causal square needs an explicit mask anyway: when it follows at most
    ``_JOIN_MAX_KEYS`` unmasked keys of its run directly, the two become one masked piece (row ``r``
    sees key ``c`` iff ``c <= r +`` the unmasked length) — one op call and one partial fewer."""
    out: list[Piece] = []
    for p in pieces:
        prev = out[-1] if out else None
        if (
            prev is not None
            and p.mask == "causal"
            and prev.mask == "none"
            and prev.length <= _JOIN_MAX_KEYS
            and prev.step == p.step
            and prev.start + prev.length == p.start
        ):
            out[-1] = Piece(prev.start, prev.step, prev.length + p.length, "explicit", prev.length)
        else:
            out.append(p)
    return tuple(out)


def merge_partials(partial: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor) -> None:
    """Write into ``out`` attention over the union of disjoint key sets, from each set's output and
    log-sum-exp. ``partial``: ``(o [..., S, D], lse [..., S])``; ``lse = -inf`` marks a row that saw
    no key of that set (a row that saw none at all gets zeros)."""
    if len(partial) == 1:
        out.copy_(partial[0][0].reshape(out.shape))
        return
    acc = torch.promote_types(partial[0][0].dtype, torch.float32)
    lse = torch.stack([p[1] for p in partial]).to(acc)  # [P, ..., S]
    # softmax over the partials by hand: torch.logsumexp over a leading dimension of 2-3 is a slow
    # strided reduction on CPU (~15 ms for an 8K, 9-head row set), elementwise ops are not.
    weights = lse.sub_(lse.amax(0)).exp_()
    weights.div_(weights.sum(0)).nan_to_num_(0.0)
    weights = weights.unsqueeze(-1)
    merged = partial[0][0]
    if merged.dtype == acc:
        # Accumulate into the first partial (the op's own output, ours to overwrite): no new
        # output-sized buffers, each a memory pass plus page faults on first touch.
        merged.mul_(weights[0])
        for (o, _), w in zip(partial[1:], weights[1:], strict=True):
            merged.addcmul_(o, w)
    else:
        # Low precision: sum in float32. A mixed-dtype op on CPU would first copy its bfloat16 input
        # to a new float32 tensor (an allocation and a pass per partial); casting into reused
        # buffers instead keeps every op single-dtype and allocation-free.
        merged = _workspace(0, merged.shape, acc).copy_(merged).mul_(weights[0])
        cast = _workspace(1, merged.shape, acc)
        for (o, _), w in zip(partial[1:], weights[1:], strict=True):
            merged.addcmul_(cast.copy_(o), w)
    out.copy_(merged.view(out.shape))


_WORKSPACE = threading.local()


def _workspace(slot: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of ``shape`` kept per thread, ``slot`` and dtype, grown as needed, held between calls:
    slots 0-1 the merge's float32 sums of low-precision partials (~19 MiB at 8K, 9 heads), slots 2-3
    the gather path's K/V (at most ``_GATHER_ELEMENTS`` each). A fresh output of tens of MB is mapped
    anew by the allocator at every call and its page faults cost more than the work written into it.
    Made outside inference mode, so a buffer first made under ``torch.inference_mode()`` can still be
    written by later calls outside it."""
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = shape.numel()
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


# ----------------------------------------------------------------------------------------------
# Gather execution (irregular layouts)


def _run_gather(q, k, v, layout: BlockLayout, scale: float, out: torch.Tensor) -> None:
    """Irregular layouts. Units (batch, query head, query block) whose rows are whole and whose last
    selected block is their own diagonal take the grouped path (:func:`_gather_grouped`); the others
    (a ragged last block, an unaligned diagonal) the masked one (:func:`_gather_masked`)."""
    bsz, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    bs = layout.block_size
    offset = sk - sq
    counts = layout.kv_num_blocks.long().cpu()  # [LB, H, nQ]
    indices = layout.kv_indices.long().cpu()  # [LB, H, nQ, maxK]
    nq = counts.shape[-1]
    valid = torch.arange(indices.shape[-1]) < counts[..., None]
    last = indices.gather(-1, (counts - 1).clamp(min=0)[..., None])[..., 0]  # [LB, H, nQ]
    grouped = torch.zeros_like(counts, dtype=torch.bool)
    if offset % bs == 0:
        rows_whole = (torch.arange(nq) + 1) * bs <= sq
        keys_whole = (torch.arange(nq) + offset // bs + 1) * bs <= sk
        grouped = (counts > 0) & (last == torch.arange(nq) + offset // bs) & rows_whole & keys_whole
    flat = (x.view(-1, d) for x in (k, v, q, out))
    k_rows, v_rows, q_rows, out_rows = flat
    for batch in range(bsz):
        lb = batch if counts.shape[0] > 1 else 0
        c, idx, fast = counts[lb], indices[lb].masked_fill(~valid[lb], -1), grouped[lb]
        # A KV group's query heads share one gather when their rows are identical.
        by_group = idx.view(hkv, group, nq, -1)
        shared = fast.view(hkv, group, nq).all(1) & (by_group == by_group[:, :1]).all(-1).all(1)  # [Hkv, nQ]
        done = shared.repeat_interleave(group, dim=0)  # [H, nQ]
        if bool(shared.any()):
            _gather_grouped(q_rows, k_rows, v_rows, out_rows, batch, shared, c.view(hkv, group, nq)[:, 0],
                            by_group[:, 0], group, hq, hkv, sq, sk, bs, d, scale, offset)  # fmt: skip
        alone = fast & ~done
        if bool(alone.any()):  # per query head: a group of one
            _gather_grouped(q_rows, k_rows, v_rows, out_rows, batch, alone, c, idx, 1, hq, hkv, sq, sk, bs, d,
                            scale, offset, kv_of=lambda h: h // group)  # fmt: skip
        rest = (c > 0) & ~fast
        if bool(rest.any()):
            _gather_masked(q, q_rows, k_rows, v_rows, out_rows, batch, rest, c, indices[lb], group, hq, hkv,
                           sq, sk, bs, d, scale, offset)  # fmt: skip


def _gather_grouped(q_rows, k_rows, v_rows, out_rows, batch, units, counts, indices, group, hq, hkv, sq, sk,
                    bs, d, scale, offset, kv_of=None) -> None:  # fmt: skip
    """Units ``units [U_heads, nQ]`` (rows: KV heads, or query heads with ``kv_of``), each seeing its
    ``counts`` blocks of ``indices``, the last its diagonal: units with the same count in one op call
    per chunk, the ``group`` query heads of a unit folded into the rows of its query tile (GQA: K/V
    gathered once per unit), its earlier blocks and then its diagonal gathered into one key range, the
    diagonal's causal part in the mask (:func:`_prefix_causal_mask`): no partials to merge."""
    kv_of = kv_of or (lambda h: h)
    # Whole blocks are rows of bs * d numbers when every head's length is a multiple of the block:
    # gathered by block (one row copy each) instead of by token.
    q_blocks = q_rows.view(-1, bs * d) if sq % bs == 0 else None
    k_blocks, v_blocks = (x.view(-1, bs * d) for x in (k_rows, v_rows)) if sk % bs == 0 else (None, None)
    out_blocks = out_rows.view(-1, bs * d) if q_blocks is not None else None
    # Gathered into buffers kept between calls (see _workspace); autograd cannot go through them.
    kept = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q_rows, k_rows, v_rows)))
    for count in counts[units].unique().tolist():
        heads, blocks = (units & (counts == count)).nonzero(as_tuple=True)
        chunk = max(1, _GATHER_ELEMENTS // (count * bs * d * max(1, group // 2)))
        for c0 in range(0, heads.numel(), chunk):
            h, i = heads[c0 : c0 + chunk], blocks[c0 : c0 + chunk]
            u = h.numel()
            q_heads = batch * hq + h[:, None] * group + torch.arange(group)  # [U, G]
            if q_blocks is not None:
                q_at = (q_heads * (sq // bs) + i[:, None]).flatten()  # [U*G] blocks
                qt = q_blocks.index_select(0, q_at).view(u, group, bs, d)
            else:
                rows = i[:, None] * bs + torch.arange(bs)  # [U, bs]
                q_at = (q_heads[:, :, None] * sq + rows[:, None, :]).flatten()  # [U*G*bs]
                qt = q_rows.index_select(0, q_at).view(u, group, bs, d)
            kv_head = (batch * hkv + kv_of(h))[:, None]  # [U, 1]
            diag = i[:, None] + offset // bs  # [U, 1]: the unit's diagonal block
            earlier = indices[h, i, : count - 1]  # [U, count - 1]
            if k_blocks is not None:
                at = (kv_head * (sk // bs) + torch.cat([earlier, diag], 1)).flatten()  # the diagonal last
                sources = (k_blocks, v_blocks)
            else:
                slots = (torch.cat([earlier, diag], 1)[:, :, None] * bs + torch.arange(bs)).flatten(1)
                at = (kv_head * sk + slots).flatten()
                sources = (k_rows, v_rows)
            keys_all, values_all = (
                (
                    torch.index_select(
                        x, 0, at, out=_workspace(2 + j, torch.Size((at.numel(), x.shape[1])), x.dtype)
                    )
                    if kept
                    else x.index_select(0, at)
                ).view(u, 1, count * bs, d)
                for j, x in enumerate(sources)
            )
            # One call: the group's query heads folded into the rows of one tile, every earlier block
            # seen whole and the diagonal (last) causally, through one mask — no partials to merge.
            mask = _prefix_causal_mask(bs, count, group, qt.dtype)
            merged = _flash(qt.view(u, 1, group * bs, d), keys_all, values_all, attn_mask=mask, scale=scale)[
                0
            ]
            if out_blocks is not None:
                out_blocks.index_copy_(0, q_at, merged.view(-1, bs * d))
            else:
                out_rows.index_copy_(0, q_at, merged.view(-1, d))


def _gather_masked(q, q_rows, k_rows, v_rows, out_rows, batch, units, counts, indices, group, hq, hkv, sq, sk,
                   bs, d, scale, offset) -> None:  # fmt: skip
    """Units ``units [H, nQ]`` one query head at a time with an explicit mask (any alignment)."""
    for count in counts[units].unique().tolist():
        heads, blocks = (units & (counts == count)).nonzero(as_tuple=True)
        chunk = max(1, _GATHER_ELEMENTS // (count * bs * d))
        for c0 in range(0, heads.numel(), chunk):
            h, i = heads[c0 : c0 + chunk], blocks[c0 : c0 + chunk]
            keys = (indices[h, i, :count, None] * bs + torch.arange(bs)).flatten(1)  # [U, L]
            rows = i[:, None] * bs + torch.arange(bs)  # [U, bs]
            allowed = (keys[:, None, :] <= rows[:, :, None] + offset) & (keys < sk)[:, None, :]
            mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
            kv_at = ((batch * hkv + h // group)[:, None] * sk + keys.clamp(max=sk - 1)).flatten()
            q_at = ((batch * hq + h)[:, None] * sq + rows.clamp(max=sq - 1)).flatten()
            shape = (h.numel(), 1, -1, d)
            o, _ = _flash(
                q_rows[q_at].view(shape),
                k_rows[kv_at].view(shape),
                v_rows[kv_at].view(shape),
                attn_mask=mask[:, None],
                scale=scale,
            )[:2]
            keep = (rows < sq).flatten()
            out_rows[q_at[keep]] = o.reshape(-1, d)[keep]


# ----------------------------------------------------------------------------------------------
# Decode: one new token per sequence against a planned cache

# A gate step gathers its selected blocks only while they are at most this fraction of the slots.
GATHER_MAX_FRACTION = 0.5


def _gather_blocks(
    k: torch.Tensor,  # [B, Hkv, C, D]: a full buffer, slot t = position t
    v: torch.Tensor,  # [B, Hkv, C, D]
    chosen: torch.Tensor,  # [B, Hkv, nK] bool: blocks any query head of the KV group reads
    count: int,  # the most blocks any group chose (>= 1)
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys/values ``[B, Hkv, L, D]`` of ``count`` blocks per KV group, the chosen ones first (a
    group choosing fewer pads with unchosen ones, which none of its heads sees), by one
    ``index_select`` each; with the slots ``[B, Hkv, L]`` they hold (clamped into the buffer) and which
    of those slots lie inside it (a last block may be partial)."""
    b, hkv, capacity, d = k.shape
    picked = chosen.to(torch.float32).topk(count, dim=-1, sorted=False).indices  # [B, Hkv, count]
    slots = (picked[..., None] * block_size + torch.arange(block_size, device=k.device)).flatten(2)
    inside = slots < capacity
    slots = slots.clamp(max=capacity - 1)
    heads = torch.arange(b * hkv, device=k.device).view(b, hkv, 1) * capacity
    at = (heads + slots).flatten()
    length = slots.shape[-1]
    keys = k.reshape(-1, d).index_select(0, at).view(b, hkv, length, d)
    values = v.reshape(-1, d).index_select(0, at).view(b, hkv, length, d)
    return keys, values, slots, inside


def decode_attention_selected_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]: a full buffer, slot t = position t
    v: torch.Tensor,  # [B, Hkv, C, D]
    visibility: SlotVisibility,  # with blocks and slot_is_position
    scale: float,
    max_fraction: float | None = None,  # default GATHER_MAX_FRACTION
) -> torch.Tensor:  # [B, Hq, D]
    """:func:`decode_attention_torch` for a full buffer whose heads chose key blocks (gate heads): the
    blocks any query head of a KV group selected are gathered once for the group (``index_select``
    of whole blocks), and one fused SDPA call attends over them with the visibility mask restricted
    to the gathered slots, so a head reading a quarter of the blocks computes a quarter of the scores.
    When the gathered slots would exceed ``max_fraction`` of the slots the gather saves little and
    the step runs :func:`decode_attention_torch` over every slot. Equal to the specification: a slot
    outside the gathered blocks lies in a block no head of its group selected, so no head sees it."""
    b, hq, d = q.shape
    hkv, capacity = k.shape[1], k.shape[2]
    group, bs = hq // hkv, visibility.block_size
    chosen = visibility.blocks.reshape(b, hkv, group, -1).any(2)[..., : -(-capacity // bs)]  # [B, Hkv, nK]
    count = int(chosen.sum(-1).max()) if chosen.numel() else 0
    limit = GATHER_MAX_FRACTION if max_fraction is None else max_fraction
    if count == 0 or count * bs > limit * capacity:
        return decode_attention_torch(q, k, v, visibility.mask(), scale)
    keys, values, slots, inside = _gather_blocks(k, v, chosen, count, bs)
    length = slots.shape[-1]
    per_head = slots[:, :, None].expand(b, hkv, group, length).reshape(b, hq, length)
    seen = visibility.mask(per_head).view(b, hkv, group, length) & inside[:, :, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, hkv, group, d), keys, values, attn_mask=seen, scale=scale
    )
    return out.masked_fill_(~seen.any(-1, keepdim=True), 0.0).view(b, hq, d)


def decode_attention_selected_unpadded(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]: a full buffer of whole blocks, slot t = position t, filled up to ``position``
    v: torch.Tensor,  # [B, Hkv, C, D]
    blocks: torch.Tensor,  # [B, Hq, nK] bool: key blocks each head reads, nK = position // bs + 1
    position: int,  # the query's position, the same in every row
    block_size: int,
    scale: float,
    max_fraction: float | None = None,  # default GATHER_MAX_FRACTION
    every_head_reads: bool = False,  # the caller knows no head's blocks are all False
) -> torch.Tensor:  # [B, Hq, D]
    """:func:`decode_attention_selected_torch` for an unpadded decode step whose heads see every causal
    slot of the blocks they read (gate and dense heads: no sink or band of their own), the step's
    position known on the host: a head sees slot ``t`` iff ``blocks[b, h, t // bs]`` and ``t <=
    position``. So the mask is the blocks widened to their slots, without the rule arithmetic of
    :meth:`~moa_compress.kernels.slots.SlotVisibility.mask`, and the slots after the query are cut off
    instead of masked (the query's block is read last). The blocks any head of a KV group reads are
    copied once for the group, whole blocks at a time (when they are at most ``max_fraction`` of the
    filled slots; else every filled slot is read under the mask); one fused SDPA call. A head that reads
    no block gets zeros, unless ``every_head_reads`` says there is none (then it would get NaN)."""
    b, hq, d = q.shape
    hkv, capacity, bs, nk = k.shape[1], k.shape[2], block_size, blocks.shape[-1]
    if capacity % bs or nk * bs > capacity or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(
            f"need contiguous buffers of whole {bs}-slot blocks up to the query's, got {tuple(k.shape)}"
        )
    group, last = hq // hkv, nk - 1
    grouped = blocks.view(b, hkv, group, nk)
    earlier = grouped[..., :last].any(2)  # [B, Hkv, nK - 1]: blocks before the query's some head reads
    count = int(earlier.sum(-1).max()) if last else 0
    limit = GATHER_MAX_FRACTION if max_fraction is None else max_fraction
    if (count + 1) * bs > limit * nk * bs:  # read every block (the query's last, as stored)
        seen, keys, values = grouped, k, v
    else:  # the chosen earlier blocks (groups choosing fewer pad with unread ones), then the query's
        picked = earlier.to(torch.float32).topk(count, dim=-1, sorted=False).indices  # [B, Hkv, count]
        picked = torch.cat([picked, picked.new_full((b, hkv, 1), last)], dim=-1)
        whole = capacity // bs
        rows = (torch.arange(b * hkv, device=k.device).view(b, hkv, 1) * whole + picked).flatten()
        keys, values = (t.view(-1, bs * d).index_select(0, rows).view(b, hkv, -1, d) for t in (k, v))
        seen = grouped.gather(-1, picked[:, :, None].expand(b, hkv, group, count + 1))
    # The additive mask per block (log: 1 -> 0, 0 -> -inf), widened to slots, cut after the query.
    width = (seen.shape[-1] - 1) * bs + position % bs + 1
    blockwise = seen.to(q.dtype).log_()[..., None].expand(*seen.shape, bs)
    mask = blockwise.reshape(b, hkv, group, -1)[..., :width]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, hkv, group, d), keys[:, :, :width], values[:, :, :width], attn_mask=mask, scale=scale
    )
    if not every_head_reads:
        out.masked_fill_(~blocks.any(-1).view(b, hkv, group, 1), 0.0)
    return out.view(b, hq, d)


def decode_attention_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, C, D]
    v: torch.Tensor,  # [B, Hkv, C, D]
    visible: torch.Tensor,  # [B, Hq, C] bool
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """:func:`reference.decode_attention_reference` as one fused SDPA call: a GQA group's query
    heads become the rows of one query tile, so K/V are read once per group and never repeated.
    A head that sees no slot gets zeros, as on the other backends (SDPA alone would give NaN)."""
    b, hq, d = q.shape
    hkv, capacity = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, hkv, group, d),  # [B, Hkv, G, D]: the group's heads as query rows
        k,
        v,
        attn_mask=visible.view(b, hkv, group, capacity),
        scale=scale,
    ).view(b, hq, d)
    return out.masked_fill_(~visible.any(-1, keepdim=True), 0.0)
