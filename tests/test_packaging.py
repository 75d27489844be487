"""The checkout's layout must not get in the way of the packages it runs with."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose working directory is the repository root, so that
    the root is the first entry of ``sys.path`` (as for ``python -m pytest`` or ``python -c``)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_top_level_kernels_folder_shadows_nothing_from_the_repository_root():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` from ``transformers.activations``; our
    ``kernels/`` folder (shipped as ``moa_compress.kernels``) must not be found in its place."""
    code = (
        "import importlib.util, json\n"
        "import transformers.activations, moa_compress.runtime, moa_compress.kernels.layout\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': spec and spec.origin,\n"
        "                  'locations': list(spec.submodule_search_locations or []) if spec else []}))\n"
    )
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
    found = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    ours = str(ROOT / "kernels")
    # A regular package here would have its __init__.py as origin; a namespace portion has none and
    # loses to any installed regular package of the same name.
    assert found["origin"] is None or not found["origin"].startswith(ours + "/"), found
    installed = importlib.util.find_spec("kernels")
    if installed is not None and installed.origin is not None:  # Hugging Face's kernels is installed
        assert found["origin"] == installed.origin, found


def test_moa_compress_kernels_is_the_top_level_folder():
    from moa_compress.kernels import layout

    assert Path(layout.__file__).resolve() == ROOT / "kernels" / "layout.py"


def test_every_file_of_a_shipped_plan_is_package_data_and_every_shipped_plan_loads():
    import fnmatch
    import json
    import re

    from moa_compress.plan import gate_tensor_name, load_plan, shipped_plans

    data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = json.loads(re.search(r'^"moa_compress.profiles" = (\[.*\])$', data, re.MULTILINE).group(1))
    folders = [p for p in (ROOT / "profiles").iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        for path in folder.iterdir():
            name = f"{folder.name}/{path.name}"
            assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), f"{name} is not package data"
    found = shipped_plans()
    assert {f.name for f in folders} <= set(found)
    for name in found:
        plan = load_plan(name)  # a gate plan's tensors come from its plan.safetensors
        assert plan.model.name == "SmolLM2-135M-Instruct"
        for layer in plan.gate_layers:
            assert {gate_tensor_name(layer, w) for w in ("q_proj", "k_proj")} <= set(plan.tensors)
