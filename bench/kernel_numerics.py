"""How far a plan's bfloat16 forward is from its float32 forward, through the compiled CPU kernel and
through the fused-op path, on the same tokens::

    python bench/kernel_numerics.py [--plan smollm2-135m-instruct-b0.25] [--length 2048] [--seed 0]

Prints the mean per-token KL(float32 ‖ bfloat16) of the next-token distributions for both paths, and
between the two bfloat16 runs. The float32 forward runs the same plan through the fused-op path, so
the reference does not depend on the kernel. Random token ids: what is measured is rounding, not
language modelling. Needs a CPU where the kernel runs bfloat16 (AMX); elsewhere it says so and stops.
"""

from __future__ import annotations

import argparse

import torch

import moa_compress as mc
from moa_compress.kernels import native


def log_probs(model, plan, ids: torch.Tensor) -> torch.Tensor:
    with mc.apply_plan(model, plan), torch.no_grad():
        return model(input_ids=ids).logits.float().log_softmax(-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:  # mean over tokens of KL(p ‖ q), log-probabilities
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="smollm2-135m-instruct-b0.25")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, _ = mc.load_model()
    model = model.float()
    plan = mc.load_plan(args.plan, model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    if not native.packs(torch.bfloat16, head_dim, plan.block_size):
        raise SystemExit(f"the compiled kernel does not run bfloat16 here ({native.problem() or 'no AMX'})")
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.length),
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip

    def fused(m) -> torch.Tensor:  # the torch backend with the kernel switched off
        saved = dict(native._state)
        native._state["ok"] = False
        try:
            return log_probs(m, plan, ids)
        finally:
            native._state.clear()
            native._state.update(saved)

    reference = fused(model)
    model = model.to(torch.bfloat16)
    kernel = log_probs(model, plan, ids)
    fused_op = fused(model)
    print(f"plan {args.plan}, {args.length} tokens: KL(float32 ‖ bfloat16) kernel {kl(reference, kernel):.5f}, "
          f"fused op {kl(reference, fused_op):.5f}; KL(kernel ‖ fused op) {kl(kernel, fused_op):.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
