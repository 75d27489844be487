"""The ``@triton.jit`` code behind the ``triton`` backend. Private: imported only when that backend runs.

Conventions shared by all kernels here:

* Softmax runs in base 2: scores are multiplied by ``scale * log2(e)`` so ``exp2`` can be used.
* The running maximum starts at ``-inf``; a row that has seen no visible key keeps ``-inf`` and its
  exponent base is replaced by 0, so ``exp2(-inf - 0) = 0`` and nothing becomes NaN. Such rows end with a
  zero sum and are written as zeros.
* Batch/head offsets are computed in int64: at 128K tokens one batch of K already holds 2^29 elements.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend_kv_blocks(
    acc,  # [BLOCK_M, HEAD_DIM] float32, unnormalised output
    row_sum,  # [BLOCK_M] float32
    row_max,  # [BLOCK_M] float32, base-2 scaled
    q,  # [BLOCK_M, HEAD_DIM] input dtype
    k_base,
    v_base,
    block_list,  # pointer to this row's kv_indices
    first,
    last,  # entries [first, last) of block_list are visited
    rows_abs,  # [BLOCK_M] absolute position of each query row (bottom-right aligned)
    kv_len,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK: tl.constexpr,  # the layout's block size
    BLOCK_N: tl.constexpr,  # keys per tile; divides BLOCK
    HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # False: every key of every block is visible to every row
    DOT_FP32: tl.constexpr,  # widen operands to float32 before tl.dot (the CPU interpreter needs it)
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if DOT_FP32:
        q = q.to(tl.float32)
    for i in range(first, last):
        kv_block = tl.load(block_list + i)
        for tile in tl.static_range(BLOCK // BLOCK_N):
            cols = kv_block * BLOCK + tile * BLOCK_N + offs_n
            if CAUSAL_MASK:
                # The ragged last key block only ever appears here (see the split in the caller).
                in_range = cols[:, None] < kv_len
                k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=in_range, other=0.0)
                v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=in_range, other=0.0)
            else:
                k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
                v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
            if DOT_FP32:
                k = k.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            if CAUSAL_MASK:
                scores = tl.where(cols[None, :] <= rows_abs[:, None], scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, 1))
                base = tl.where(new_max == float("-inf"), 0.0, new_max)
            else:
                new_max = tl.maximum(row_max, tl.max(scores, 1))
                base = new_max
            correction = tl.math.exp2(row_max - base)
            p = tl.math.exp2(scores - base[:, None])
            row_sum = row_sum * correction + tl.sum(p, 1)
            acc = acc * correction[:, None]
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def block_sparse_prefill_kernel(
    Q,  # [B, Hq, Sq, D]
    K,  # [B, Hkv, Sk, D]
    V,  # [B, Hkv, Sk, D]
    Out,  # [B, Hq, Sq, D]
    KvNumBlocks,  # [B or 1, Hq, nQ] int32
    KvIndices,  # [B or 1, Hq, nQ, maxK] int32, last dim contiguous
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_nb,
    stride_nh,
    stride_ib,
    stride_ih,
    stride_im,
    num_heads,
    group,
    q_len,
    kv_len,
    qk_scale,
    BLOCK: tl.constexpr,  # the layout's block size
    BLOCK_M: tl.constexpr,  # query rows per program; divides BLOCK
    BLOCK_N: tl.constexpr,  # keys per tile; divides BLOCK
    HEAD_DIM: tl.constexpr,
    SCAN: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (query tile, batch * query head): FlashAttention-2 over the row's key blocks."""
    # Later query tiles see more keys under causality: launch them first so short ones fill the tail.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = batch_head % num_heads
    kv_head = (h // group).to(tl.int64)
    offset = kv_len - q_len

    first_row = q_tile * BLOCK_M
    q_block = first_row // BLOCK
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_abs = offs_m + offset
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    num_blocks = tl.load(KvNumBlocks + b * stride_nb + h * stride_nh + q_block)
    block_list = KvIndices + b * stride_ib + h * stride_ih + q_block * stride_im

    # Indices are ascending, so the row splits into a prefix of blocks that every query row sees whole,
    # then the few blocks crossing the causal diagonal (masked), then blocks no row can see (skipped).
    first_abs = first_row + offset
    last_abs = tl.minimum(first_row + BLOCK_M, q_len) - 1 + offset
    full_end = (first_abs + 1) // BLOCK  # key blocks below this are fully visible
    seen_end = last_abs // BLOCK + 1  # key blocks from here on are invisible
    num_full = 0
    num_seen = 0
    for start in range(0, num_blocks, SCAN):
        offs = start + tl.arange(0, SCAN)
        blocks = tl.load(block_list + offs, mask=offs < num_blocks, other=seen_end)
        num_full += tl.sum((blocks < full_end).to(tl.int32))
        num_seen += tl.sum((blocks < seen_end).to(tl.int32))

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, row_sum, row_max = _attend_kv_blocks(
        acc, row_sum, row_max, q, k_base, v_base, block_list, 0, num_full, rows_abs, kv_len, qk_scale,
        stride_kn, stride_vn, BLOCK, BLOCK_N, HEAD_DIM, False, DOT_FP32, PRECISION,
    )  # fmt: skip
    acc, row_sum, row_max = _attend_kv_blocks(
        acc, row_sum, row_max, q, k_base, v_base, block_list, num_full, num_seen, rows_abs, kv_len, qk_scale,
        stride_kn, stride_vn, BLOCK, BLOCK_N, HEAD_DIM, True, DOT_FP32, PRECISION,
    )  # fmt: skip

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # rows that saw nothing stay zero
    o_ptrs = Out + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)


@triton.jit
def block_sparse_decode_split_kernel(
    Q,  # [B, Hq, D]
    K,  # [B, Hkv, S, D]
    V,  # [B, Hkv, S, D]
    KvLens,  # [B, Hkv] int32
    KvNumBlocks,  # [B or 1, Hq] int32
    KvIndices,  # [B or 1, Hq, maxK] int32, last dim contiguous
    OutPart,  # [B * Hq, num_splits, D] float32, normalised per split
    LsePart,  # [B * Hq, num_splits] float32, base-2 log-sum-exp per split (-inf when empty)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_lb,
    stride_lh,
    stride_nb,
    stride_nh,
    stride_ib,
    stride_ih,
    num_heads,
    group,
    qk_scale,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per (batch * query head, split): one query token over a contiguous share of the
    blocks its own list names (query heads of one KV head may read different blocks)."""
    batch_head = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = batch_head % num_heads
    kv_head = (h // group).to(tl.int64)

    kv_len = tl.load(KvLens + b * stride_lb + kv_head * stride_lh)
    num_blocks = tl.load(KvNumBlocks + b * stride_nb + h * stride_nh)
    block_list = KvIndices + b * stride_ib + h * stride_ih
    per_split = tl.cdiv(num_blocks, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_d).to(tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    running_max = tl.full([1], float("-inf"), dtype=tl.float32)
    for i in range(first, last):
        kv_block = tl.load(block_list + i)
        cols = kv_block * BLOCK + offs_n
        valid = cols < kv_len
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        # One query row: a tensor-core tile would be mostly padding, so multiply and reduce instead.
        scores = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale  # [BLOCK]
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 0))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.math.exp2(running_max - base)
        p = tl.math.exp2(scores[None, :] - base[:, None])  # [1, BLOCK]
        total = total * correction + tl.sum(p, 1)
        acc = acc * correction + tl.sum(tl.trans(p) * v.to(tl.float32), 0)
        running_max = new_max

    lse = tl.where(total > 0.0, running_max + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(OutPart + (batch_head * num_splits + split).to(tl.int64) * HEAD_DIM + offs_d, out)
    tl.store(LsePart + batch_head * num_splits + split + tl.arange(0, 1), lse)


@triton.jit
def decode_group_split_kernel(
    Q,  # [B, Hq, D]
    K,  # [B, Hkv, S, D]
    V,  # [B, Hkv, S, D]
    KvLens,  # [B, Hkv] int32
    KvNumBlocks,  # [B or 1, Hkv] int32 (read only with HAS_BLOCK_LIST)
    KvIndices,  # [B or 1, Hkv, maxK] int32, last dim contiguous
    OutPart,  # [B * Hq, num_splits, D] float32, normalised per split
    LsePart,  # [B * Hq, num_splits] float32, base-2 log-sum-exp per split (-inf when empty)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_lb,
    stride_lh,
    stride_nb,
    stride_nh,
    stride_ib,
    stride_ih,
    num_kv_heads,
    qk_scale,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_ROWS: tl.constexpr,  # GROUP padded to a tensor-core tile height (>= 16)
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_BLOCK_LIST: tl.constexpr,  # False: the whole cache [0, kv_len)
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (batch * KV head, split) for query heads that read the same blocks (the whole
    cache, or one block list per KV head): the group goes together, so each K/V block is read once for
    it (GQA), and scores come from tensor cores."""
    batch_kv_head = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = (batch_kv_head // num_kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % num_kv_heads).to(tl.int64)

    kv_len = tl.load(KvLens + b * stride_lb + kv_head * stride_lh)
    if HAS_BLOCK_LIST:
        num_blocks = tl.load(KvNumBlocks + b * stride_nb + kv_head * stride_nh)
    else:
        num_blocks = tl.cdiv(kv_len, BLOCK)
    block_list = KvIndices + b * stride_ib + kv_head * stride_ih
    per_split = tl.cdiv(num_blocks, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    rows = tl.arange(0, GROUP_ROWS)
    heads = kv_head * GROUP + rows  # query heads of this KV head; rows >= GROUP are padding
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=rows[:, None] < GROUP,
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    row_max = tl.full([GROUP_ROWS], float("-inf"), dtype=tl.float32)
    for i in range(first, last):
        if HAS_BLOCK_LIST:
            kv_block = tl.load(block_list + i)
        else:
            kv_block = i
        cols = kv_block * BLOCK + offs_n
        valid = cols < kv_len
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_ROWS, BLOCK]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # a listed block may lie past kv_len
        correction = tl.math.exp2(row_max - base)
        p = tl.math.exp2(scores - base[:, None])
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PRECISION)
        row_max = new_max

    has_keys = row_sum > 0.0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, row_max + tl.math.log2(safe_sum), float("-inf"))
    out = acc / safe_sum[:, None]
    slots = ((b * num_kv_heads + kv_head) * GROUP + rows) * num_splits + split  # [GROUP_ROWS] int64
    tl.store(OutPart + slots[:, None] * HEAD_DIM + offs_d[None, :], out, mask=rows[:, None] < GROUP)
    tl.store(LsePart + slots, lse, mask=rows < GROUP)


@triton.jit
def merge_splits_kernel(
    OutPart,  # [B * Hq, num_splits, D] float32
    LsePart,  # [B * Hq, num_splits] float32
    Out,  # [B, Hq, D] contiguous
    num_splits,
    SPLITS: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
):
    """Combine the splits of one (batch, head) by their log-sum-exp; all splits empty -> zeros."""
    batch_head = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    used = offs_s < num_splits
    lse = tl.load(LsePart + batch_head * num_splits + offs_s, mask=used, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [SPLITS], 0 for empty splits
    part_ptrs = (
        OutPart + (batch_head * num_splits + offs_s[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :]
    )
    parts = tl.load(part_ptrs, mask=used[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + batch_head.to(tl.int64) * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty))


@triton.jit
def slot_decode_split_kernel(
    Q,  # [B, Hq, D]
    K,  # [B, Hkv, C, D]
    V,  # [B, Hkv, C, D]
    SlotPositions,  # [B, C] int64, -1 for empty slots (read unless FROM_MASK)
    Positions,  # [B] int64: the query's position (read unless FROM_MASK)
    SinkTokens,  # [Hq] int64, contiguous
    Alpha,  # [Hq] float64, contiguous (inf: every causal slot)
    Beta,  # [Hq] float64, contiguous
    Blocks,  # [B, Hq, nK] uint8 (read only with HAS_BLOCKS)
    Mask,  # [B, Hq, C] uint8 (read only with FROM_MASK)
    OutPart,  # [B * Hq, num_splits, D] float32, normalised per split; with SINGLE_SPLIT the output [B, Hq, D]
    LsePart,  # [B * Hq, num_splits] float32, base-2 log-sum-exp per split (-inf when empty)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_sb,
    stride_pb,
    stride_bb,
    stride_bh,
    stride_mb,
    stride_mh,
    stride_mc,
    capacity,
    num_kv_heads,
    num_key_blocks,
    rule_block,  # the plan's block size
    qk_scale,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_ROWS: tl.constexpr,  # GROUP padded to a tensor-core tile height (>= 16)
    TILE: tl.constexpr,  # slots per step
    HEAD_DIM: tl.constexpr,
    FROM_MASK: tl.constexpr,  # visibility from Mask instead of the rules
    HAS_BLOCKS: tl.constexpr,  # gate heads: also restrict to the selected key blocks
    SINGLE_SPLIT: tl.constexpr,  # one split: write the normalised output to OutPart as is, no merge
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (batch * KV head, split) over a contiguous share of the cache's slots: the
    group's query heads go together (each K/V tile is read once for the group; scores from tensor
    cores), and each head decides per slot what it sees, from its rule and the slot-position table
    (see moa_compress.kernels.slots). Tiles no head of the group sees are skipped without reading K/V."""
    batch_kv_head = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = (batch_kv_head // num_kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % num_kv_heads).to(tl.int64)

    num_tiles = tl.cdiv(capacity, TILE)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    rows = tl.arange(0, GROUP_ROWS)
    in_group = rows < GROUP
    heads = kv_head * GROUP + rows  # query heads of this KV head; rows >= GROUP are padding
    offs_n = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=in_group[:, None], other=0.0
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    if not FROM_MASK:
        # The rule's band at the row's length, once per head. float64 and the same operations as
        # SlotVisibility.mask (the launch disables FMA contraction), so both pick the same blocks.
        position = tl.load(Positions + b * stride_pb)
        n = (position + 1).to(tl.float64)
        alpha = tl.load(Alpha + heads, mask=in_group, other=0.0)
        beta = tl.load(Beta + heads, mask=in_group, other=0.0)
        sink = tl.load(SinkTokens + heads, mask=in_group, other=0)
        epsilon = tl.full([GROUP_ROWS], 1e-9, tl.float64)
        band = tl.maximum(tl.math.ceil((alpha + beta * n) / rule_block - epsilon), 1.0)
        # A band reaching past block 0 sees every causal slot: clamping keeps it finite (alpha = inf).
        query_block = position // rule_block
        band = tl.minimum(band, (query_block + 1).to(tl.float64))
        first_band_token = (query_block - band.to(tl.int64) + 1) * rule_block  # [GROUP_ROWS] int64

    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    row_max = tl.full([GROUP_ROWS], float("-inf"), dtype=tl.float32)
    for tile in range(first, last):
        cols = tile * TILE + offs_n
        in_cache = cols < capacity
        if FROM_MASK:
            visible = (
                tl.load(
                    Mask + b * stride_mb + heads[:, None] * stride_mh + cols[None, :] * stride_mc,
                    mask=in_group[:, None] & in_cache[None, :],
                    other=0,
                )
                != 0
            )
        else:
            held = tl.load(SlotPositions + b * stride_sb + cols, mask=in_cache, other=-1)  # [TILE] int64
            causal = (held >= 0) & (held <= position)
            visible = causal[None, :] & (
                (held[None, :] < sink[:, None]) | (held[None, :] >= first_band_token[:, None])
            )
            if HAS_BLOCKS:
                key_block = tl.minimum(tl.maximum(held, 0) // rule_block, num_key_blocks - 1)
                chosen = tl.load(
                    Blocks + b * stride_bb + heads[:, None] * stride_bh + key_block[None, :],
                    mask=visible,
                    other=0,
                )
                visible = visible & (chosen != 0)
            visible = visible & in_group[:, None]
        if tl.max(visible.to(tl.int32)) > 0:
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=in_cache[:, None], other=0.0
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=in_cache[:, None], other=0.0
            )
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_ROWS, TILE]
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # a head may see nothing here
            correction = tl.math.exp2(row_max - base)
            p = tl.math.exp2(scores - base[:, None])
            row_sum = row_sum * correction + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PRECISION)
            row_max = new_max

    has_keys = row_sum > 0.0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]  # heads that saw nothing stay zero
    slots = (b * num_kv_heads + kv_head) * GROUP + rows  # [GROUP_ROWS] int64: batch * Hq + head
    if SINGLE_SPLIT:
        o_ptrs = OutPart + slots[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(OutPart.dtype.element_ty), mask=in_group[:, None])
    else:
        lse = tl.where(has_keys, row_max + tl.math.log2(safe_sum), float("-inf"))
        slots = slots * num_splits + split
        tl.store(OutPart + slots[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_group[:, None])
        tl.store(LsePart + slots, lse, mask=in_group)
