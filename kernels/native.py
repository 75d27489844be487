"""The compiled CPU backend: ``csrc/block_sparse_cpu.cpp``, built on first use on the machine it runs on.

The fused CPU flash-attention op that ``cpu.py`` drives can only be given a block-sparse layout as many
small calls whose partial results are merged; in bfloat16 on CPUs with AMX it runs those small tiles
far below its dense rate (BENCHMARKS.md, "Why bfloat16 prefill misses"). The C++ kernel walks each
query block's selected key blocks in one pass with an online softmax, causality from positions and
the KV group's query heads folded into its rows, on ATen's batch-reduce GEMM micro-kernels.

Building. The source is compiled once per (source, torch version, compiler flags, CPU) with the
system C++ compiler (``$CXX``, else ``c++``) against the installed torch's headers, with
``-march=native`` (so the library is tied to the CPU flags it was built on: they are part of its
name), into ``$MOA_COMPRESS_CACHE/native`` (default ``$XDG_CACHE_HOME/moa-compress/native``, else
``~/.cache/moa-compress/native``), written to a temporary name and renamed, so an interrupted build
leaves nothing half-written. It takes about 11 s on two cores. Only a cache folder this user owns
is used (it is made unwritable to others), since the library found there is loaded as code. Where it
cannot be built (no compiler, no headers), where a fresh build does not load (a ``.failed`` note next
to it then stops later processes from building again), or with ``MOA_COMPRESS_NATIVE=0``,
:func:`available` is False, the reason is in :func:`problem`, and callers use the PyTorch backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .layout import BlockLayout

SOURCE = Path(__file__).resolve().parent / "csrc" / "block_sparse_cpu.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
# Tuned for the CPU it is built on (the library's name carries the CPU's flags).
_X86_FLAGS = ("-march=native", "-mprefer-vector-width=512")
_BUILD_TIMEOUT_S = 900

_lock = threading.Lock()
_state: dict[str, object] = {}
_PACKS: dict[tuple[torch.dtype, int, int], bool] = {}
_FAKES_REGISTERED = False


def cache_dir() -> Path:
    """``native`` in the project's cache (:func:`moa_compress.models.cache_dir`)."""
    from moa_compress.models import cache_dir as project_cache

    return project_cache() / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def compiler() -> list[str]:
    """The compiler command: ``$CXX`` split as a shell would (``ccache g++``), else ``c++``."""
    return shlex.split(os.environ.get("CXX") or "c++")


def _flags() -> tuple[str, ...]:
    return _FLAGS + (_X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ("-mcpu=native",))


def _compile_command(output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [*compiler(), *_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    command += [f"-I{p}" for p in include_paths()]
    command += [str(SOURCE), "-o", str(output)]
    command += [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu"]
    return command


def library_path() -> Path:
    """Where the built library for this source, torch, flags and CPU lives."""
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__.encode(),
        " ".join(_flags()).encode(),
        _cpu_flags().encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"block_sparse_cpu-{digest.hexdigest()[:16]}.so"


def _own_folder(folder: Path) -> None:
    """Create ``folder`` if needed and make sure only this user can put code in it: a library found
    there is loaded into the process, so a folder another user owns or may write to is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "getuid"):
        return
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"{folder} belongs to another user; set MOA_COMPRESS_CACHE to a folder of yours")
    if info.st_mode & 0o022:
        os.chmod(folder, info.st_mode & ~0o022)


def _build(target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        print("moa-compress: building the CPU attention kernel (once per source, torch version and CPU)",
              file=sys.stderr)  # fmt: skip
        done = subprocess.run(
            _compile_command(Path(tmp)), capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"compiler exited with {done.returncode}: {lines[0] if lines else ''}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; a compiler output's usual mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    if os.environ.get("MOA_COMPRESS_NATIVE", "1") == "0":
        raise RuntimeError("disabled by MOA_COMPRESS_NATIVE=0")
    if not SOURCE.is_file():
        raise RuntimeError(f"kernel source missing: {SOURCE}")
    target = library_path()
    _own_folder(target.parent)
    failed = target.with_suffix(".failed")
    if failed.is_file():
        raise RuntimeError(f"an earlier build here did not load ({failed.read_text().strip()}); delete {failed} "
                           "to try again")  # fmt: skip
    found = target.is_file()
    if not found:
        with _build_lock(target):  # two processes starting at once: one builds, the other waits
            found = target.is_file()
            if not found:
                _build(target)
    try:
        torch.ops.load_library(str(target))
    except OSError as err:
        if not found:
            # Just built and it does not load (a cache folder mounted noexec, say): building again
            # would not help, so later processes are told at once instead of building in turn.
            failed.write_text(f"{type(err).__name__}: {err}\n")
            raise
        # A library found in the cache that does not load (a disk that filled up under another
        # writer, a cache copied from elsewhere): build it again, once.
        _build(target)
        torch.ops.load_library(str(target))
    _register_fake()


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on ``target``'s lock file while building (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register_fake() -> None:
    """Shapes without data for tracing (``torch.compile``, FakeTensor): the output is ``q``'s shape."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    name = "moa_compress_cpu::block_sparse_attention"

    @torch.library.register_fake(name)
    def _(q, k, v, kv_num_blocks, kv_indices, block_size, scale):
        return q.new_empty(q.shape)

    torch.library.register_fake("moa_compress_cpu::packs")(lambda like, head_dim, block_size: False)
    _FAKES_REGISTERED = True


def available() -> bool:
    """Whether the compiled kernel can run here (builds and loads it on the first call)."""
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state["ok"] = True
            except Exception as err:  # noqa: BLE001 - any failure to build or load means "not here"
                _state["ok"] = False
                _state["problem"] = f"{type(err).__name__}: {err}"
        return bool(_state["ok"])


def problem() -> str | None:
    """Why :func:`available` is False (None while it is True or not yet asked)."""
    return _state.get("problem")  # type: ignore[return-value]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs: CPU tensors of one dtype in :data:`DTYPES`, one head size
    for Q/K/V, no autograd. (:func:`usable` adds when it is also the faster path.)"""
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and q.dtype == k.dtype == v.dtype
        and v.shape[-1] == q.shape[-1]
        and not q.requires_grad
        and not k.requires_grad
        and not v.requires_grad
    )


def packs(dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Whether the kernel runs ``dtype`` inputs of this head size and block size on packed operands:
    bfloat16 on AMX, float16 on AMX-FP16, head sizes a multiple of 16, even blocks (False where the
    kernel is unavailable)."""
    key = (dtype, head_dim, block_size)
    if key not in _PACKS:
        like = torch.empty(0, dtype=dtype, device="cpu")
        _PACKS[key] = available() and bool(torch.ops.moa_compress_cpu.packs(like, head_dim, block_size))
    return _PACKS[key]


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float) -> bool:
    """Whether the CPU backend should run these inputs through the kernel: it takes them
    (:func:`supports`), there are at least two query blocks (a decoding step or a short chunk would pay
    more for packing all of K/V than the kernel saves), the scale is finite and non-negative (its
    base-2 exponents assume it), the kernel is available, and the dtype is float32 or a 16-bit type it
    packs (:func:`packs`: elsewhere 16-bit GEMMs fall back to converting copies, slower than the
    fused op — float16 on the AMX-BF16 machine: 132 ms against 121 ms at 8K, d = 0.25). The cheap
    tests come first, so a decoding step never builds the kernel."""
    return (
        supports(q, k, v)
        and layout.q_len >= 2 * layout.block_size
        and math.isfinite(scale)
        and scale >= 0
        and available()
        and (q.dtype == torch.float32 or packs(q.dtype, q.shape[-1], layout.block_size))
    )


def block_sparse_attention_native(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    layout: BlockLayout,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Block-sparse causal attention through the compiled kernel; same contract as the reference."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    return torch.ops.moa_compress_cpu.block_sparse_attention(
        rows(q),
        rows(k),
        rows(v),
        layout.kv_num_blocks.to(torch.int32),
        rows(layout.kv_indices.to(torch.int32)),
        layout.block_size,
        float(scale),
    )
