"""Compile every Triton kernel variant the wrappers can launch, for a GPU that is not here.

Triton's CPU interpreter runs code that the real compiler may reject (layouts, dot shapes, shared
memory). This builds each variant to a cubin for ``--arch`` (90 = H100/H200) and checks it fits the
shared memory of that GPU. Needs no GPU: ptxas ships with triton. Run with TRITON_INTERPRET unset::

    python tests/triton_compile_check.py --arch 90 [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moa_compress.kernels import _triton_kernels as kernels
from moa_compress.kernels.triton_decode import decode_launch_options
from moa_compress.kernels.triton_prefill import launch_options
from moa_compress.kernels.triton_slot_decode import SLOT_TILE, slot_decode_launch_options

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# A few variants covering each kernel, dtype family and tile shape, for a check of ~15 s.
QUICK = (
    "prefill bf16 block 64 d 128",
    "prefill bf16 block 128 d 128",
    "prefill fp16 block 64 d 64",
    "prefill fp32 block 64 d 64",
    "decode bf16 d 128 query-head lists",
    "decode bf16 d 128 KV-head lists",
    "decode bf16 d 128 whole cache",
    "decode fp32 d 64 whole cache",
    "merge d 128",
    "slot decode bf16 d 128 rules",
    "slot decode bf16 d 128 rules gate-blocks one-split",
    "slot decode fp32 d 64 mask",
)
# Shared memory one block may use, by compute capability (bytes).
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_kernel(kernel, arch: int, pointers: dict, constexprs: dict, options: dict):
    """Build ``kernel`` with every non-pointer, non-constexpr argument as i32 (fp32 for the scale)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def variants():
    """(name, kernel, pointer types, constexprs, options) for each build the wrappers can request."""
    for dtype, block, head_dim in itertools.product(TRITON_TYPES, (64, 128), (64, 128)):
        options = launch_options(dtype, block, head_dim)
        constexprs = {"BLOCK": block, "HEAD_DIM": head_dim, "SCAN": 128}
        # Upper-case options are the kernel's constexpr arguments; the rest go to the compiler.
        constexprs.update({name: options.pop(name) for name in list(options) if name.isupper()})
        t = TRITON_TYPES[dtype]
        pointers = {"Q": t, "K": t, "V": t, "Out": t, "KvNumBlocks": "i32", "KvIndices": "i32"}
        yield (
            f"prefill {t} block {block} d {head_dim}",
            kernels.block_sparse_prefill_kernel,
            pointers,
            constexprs,
            options,
        )
    for dtype, head_dim in itertools.product(TRITON_TYPES, (64, 128)):
        t = TRITON_TYPES[dtype]
        pointers = {"Q": t, "K": t, "V": t, "KvLens": "i32", "KvNumBlocks": "i32", "KvIndices": "i32"}
        pointers.update(OutPart="fp32", LsePart="fp32")
        for has_list, what in ((False, "whole cache"), (True, "KV-head lists")):
            options = decode_launch_options(dtype, grouped=True)
            constexprs = {
                "GROUP": 4,
                "GROUP_ROWS": 16,
                "BLOCK": 64,
                "HEAD_DIM": head_dim,
                "HAS_BLOCK_LIST": has_list,
            }
            constexprs.update({name: options.pop(name) for name in list(options) if name.isupper()})
            yield (
                f"decode {t} d {head_dim} {what}",
                kernels.decode_group_split_kernel,
                pointers,
                constexprs,
                options,
            )
        constexprs = {"BLOCK": 64, "HEAD_DIM": head_dim}
        options = decode_launch_options(dtype, grouped=False)
        yield (
            f"decode {t} d {head_dim} query-head lists",
            kernels.block_sparse_decode_split_kernel,
            pointers,
            constexprs,
            options,
        )
    for dtype, head_dim in itertools.product(TRITON_TYPES, (64, 128)):
        t = TRITON_TYPES[dtype]
        pointers = {"Q": t, "K": t, "V": t, "SlotPositions": "i64", "Positions": "i64", "SinkTokens": "i64"}
        pointers.update(Alpha="fp64", Beta="fp64", Blocks="u8", Mask="u8", LsePart="fp32")
        for from_mask, has_blocks, single, what in (
            (False, False, False, "rules"),
            (False, True, True, "rules gate-blocks one-split"),
            (True, False, False, "mask"),
        ):
            options = slot_decode_launch_options(dtype)
            constexprs = {"GROUP": 4, "GROUP_ROWS": 16, "TILE": SLOT_TILE, "HEAD_DIM": head_dim}
            constexprs.update(FROM_MASK=from_mask, HAS_BLOCKS=has_blocks, SINGLE_SPLIT=single)
            constexprs.update({name: options.pop(name) for name in list(options) if name.isupper()})
            yield (
                f"slot decode {t} d {head_dim} {what}",
                kernels.slot_decode_split_kernel,
                {**pointers, "OutPart": t if single else "fp32"},
                constexprs,
                options,
            )
    for head_dim in (64, 128):
        pointers = {"OutPart": "fp32", "LsePart": "fp32", "Out": "bf16"}
        yield (
            f"merge d {head_dim}",
            kernels.merge_splits_kernel,
            pointers,
            {"SPLITS": 64, "HEAD_DIM": head_dim},
            {},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="only the variants named in QUICK")
    parser.add_argument("--match", default="", help="only variants whose name contains this")
    args = parser.parse_args()
    limit = SHARED_MEMORY.get(args.arch)
    failures = []
    for name, kernel, pointers, constexprs, options in variants():
        if (args.quick and name not in QUICK) or args.match not in name:
            continue
        start = time.perf_counter()
        compiled = compile_kernel(kernel, args.arch, pointers, constexprs, options)
        shared = compiled.metadata.shared
        fits = limit is None or shared <= limit
        print(
            f"{name:40s} shared {shared:7d} B  {time.perf_counter() - start:5.1f} s  {'ok' if fits else 'TOO BIG'}"
        )
        if not fits:
            failures.append(name)
    if failures:
        raise SystemExit(f"over the {limit} B of shared memory on sm_{args.arch}: {', '.join(failures)}")


if __name__ == "__main__":
    main()
