"""The package's top level: the names a new user guesses, imported lazily."""

import subprocess
import sys

import pytest

import moa_compress as mc

PUBLIC = {
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


def test_import_is_light():
    """``import moa_compress`` loads neither torch nor transformers (the CLI's --help stays fast)."""
    code = "import sys, moa_compress; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_top_level_names_are_the_modules_own(name):
    import importlib

    assert getattr(mc, name) is getattr(importlib.import_module(PUBLIC[name]), name)
    assert name in mc.__all__ and name in dir(mc)


def test_compress_stays_the_function_after_its_module_is_imported():
    import moa_compress.pipeline  # noqa: F401 - a submodule import sets an attribute on the package

    assert callable(mc.compress) and mc.compress.__module__ == "moa_compress.pipeline"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mc.nope


def test_uniform_plan_takes_a_model(tmp_path):
    from tests.factories import tiny_model

    model = tiny_model(layers=2)
    plan = mc.uniform_plan(model, 0.5, [256], 32)
    assert plan.density(256) <= 0.5
    mc.save_plan(plan, tmp_path)
    assert mc.load_plan(tmp_path, model) == plan
