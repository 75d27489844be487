"""moa-compress: per-head sparse attention plans (MoA-style elastic rules), searched and run fast.

Pipeline: data -> profile -> search -> plan -> runtime -> kernels. The main functions are reachable
from the package itself, imported on first use so that ``import moa_compress`` stays light::

    import moa_compress as mc

    model, tokenizer = mc.load_model()                          # the embedded SmolLM2-135M-Instruct
    plan = mc.load_plan("smollm2-135m-instruct-b0.25", model)   # a shipped plan, checked against the model
    with mc.apply_plan(model, plan):                            # transformers' AttentionInterface
        logits = model(tokenizer("Hello", return_tensors="pt").input_ids).logits
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "load_model": "moa_compress.models",
    "load_plan": "moa_compress.plan",
    "save_plan": "moa_compress.plan",
    "uniform_plan": "moa_compress.plan",
    "Plan": "moa_compress.plan",
    "apply_plan": "moa_compress.runtime",
    "PlanKVCache": "moa_compress.runtime",
    "PrefillRanking": "moa_compress.gate_runtime",
    "compress": "moa_compress.pipeline",
    "CompressSettings": "moa_compress.settings",
    "evaluate_plan": "moa_compress.evaluate",
    "block_sparse_attention": "moa_compress.attention",
}

__all__ = [  # noqa: RUF022 - in _LAZY's order
    "__version__",
    "load_model",
    "load_plan",
    "save_plan",
    "uniform_plan",
    "Plan",
    "apply_plan",
    "PlanKVCache",
    "PrefillRanking",
    "compress",
    "CompressSettings",
    "evaluate_plan",
    "block_sparse_attention",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moa_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
