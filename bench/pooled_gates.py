"""`moa-compress eval` with a plan's gate heads sharing their layer's gate blocks per input.

A gate rule gives every query-block row of its head the same number of key blocks (the head's density
at the length), so a head's density is fixed whatever the input. `bench/oracle_head.py` showed that
moving blocks between a head's rows buys nothing, and that the attention-mass oracle's lead comes from
moving density between heads. This runs `eval` with the plan's gate selection replaced, at prefill,
by a pooled one: in each layer and input, the gate heads keep their sink and local blocks, and the rest
of their blocks — as many as the per-row selection would take, summed over the layer's gate heads — go
to the (head, row, block) entries of highest gate probability (each row's softmax of its gate scores).
The layer computes the same number of blocks; each gate head's share follows the input. Static and dense
heads are untouched. Meant for the text tasks (`ppl`, `fidelity`: prefill only)::

    python bench/pooled_gates.py --plan P --tasks ppl,fidelity --lengths 2048,4096,8192 --limit 6 --out DIR
"""

from __future__ import annotations

import sys

import torch

from moa_compress import gate_runtime
from moa_compress.gates import gate_selections, layer_gate_heads

_per_row = gate_runtime.gate_selections_for


def pooled_selection(scores, blocks, gate_of_head, local, per_row):
    """``per_row [B, H, nQ, nK]`` (the plan's selection from ``scores``) with the gate heads' blocks
    beyond sink and local window re-dealt over the layer by gate probability; same count per input."""
    gated = (blocks > 0).to(scores.device)
    # Sink and local window as the per-row selection keeps them: the window is at most blocks - 1.
    kept = torch.minimum(local + 1, blocks.clamp(min=2))
    forced = gate_selections(
        scores, torch.where(blocks > 0, kept, torch.zeros_like(blocks)), gate_of_head, local
    )
    probs = scores.float().softmax(-1)[:, gate_of_head.to(scores.device)]  # [B, H, nQ, nK]; 0 where masked
    pooled = forced.clone()
    for b in range(scores.shape[0]):
        candidate = gated[:, None, None] & ~forced[b] & (probs[b] > 0)
        spare = int(per_row[b][gated].sum()) - int(forced[b][gated].sum())
        spare = min(spare, int(candidate.sum()))
        if spare > 0:
            ranked = probs[b].masked_fill(~candidate, float("-inf")).flatten()
            chosen = pooled[b].flatten()
            chosen[ranked.topk(spare).indices] = True
            pooled[b] = chosen.view_as(pooled[b])
    return pooled


def pooled_selections_for(plan, layer, gate, q_pre, k_codes, kv_len):
    """``gate_runtime.gate_selections_for`` with the gate heads' blocks pooled over the layer."""
    per_row = _per_row(plan, layer, gate, q_pre, k_codes, kv_len)
    blocks, gate_of_head, local, tail = layer_gate_heads(plan, layer, kv_len)
    if int((blocks > 0).sum()) < 2 or bool((tail > 0).any()):  # dense tails: not re-dealt here
        return per_row
    scores = gate_runtime.gate_scores_for(gate, q_pre, k_codes, kv_len, plan.block_size)
    return pooled_selection(scores, blocks, gate_of_head, local, per_row)


def main() -> None:
    gate_runtime.gate_selections_for = pooled_selections_for
    from moa_compress.cli import app

    sys.argv = ["moa-compress", "eval", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
