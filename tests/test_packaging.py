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
