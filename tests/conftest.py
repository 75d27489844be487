import os
import tempfile

import pytest

# Tests never touch the user's cache or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The compiled CPU kernel is built into a test cache of its own, kept between test runs.
_USER = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
os.environ.setdefault(
    "MOA_COMPRESS_CACHE", os.path.join(tempfile.gettempdir(), f"moa-compress-test-cache-{_USER}")
)


def pytest_sessionstart(session):
    # Build the compiled CPU kernel before any test runs, so that no test's captured output holds the
    # build's one-line notice (and a failed build is reported by tests/test_native.py).
    from moa_compress.kernels import native

    native.available()


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# --- triton: without CUDA, Triton kernels run through its CPU interpreter, which must be switched on
# before anything imports triton.
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
