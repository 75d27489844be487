"""Every Python snippet in README.md runs as written, on the embedded model (slow: ~1-2 minutes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A model cache of the module's own (the user's is never touched), shared by the snippets."""
    cache = tmp_path_factory.mktemp("model-cache")
    return {**os.environ, "MOA_COMPRESS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_python(code: str, env: dict, folder: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in ``folder`` (so relative output paths land in a temp dir)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, env, tmp_path):
    code = SNIPPETS[index]
    result = run_python(code, env, tmp_path)
    assert result.returncode == 0, f"snippet {index}:\n{code}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_default_eval_text_gives_six_windows_of_8k_tokens(env, tmp_path):
    """The shipped evaluation text is enough for ``eval --lengths 8192 --limit 6`` on the embedded
    model's tokenizer."""
    code = (
        "from moa_compress.data import token_windows\n"
        "from moa_compress.evaluate import default_texts\n"
        "from moa_compress.models import load_model\n"
        "_, tokenizer = load_model()\n"
        "texts, _ = default_texts()\n"
        "print(len(texts), len(token_windows(texts, tokenizer, 8192)))\n"
    )
    result = run_python(code, env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    articles, windows = map(int, result.stdout.split()[-2:])
    # The eval split: the shipped articles but the four that tune (mixed calibration, validation).
    assert articles == 8 and windows >= 6, (articles, windows)
