"""Several processes, one job: the data-parallel stages under ``torchrun`` (torch.distributed).

Launched as ``torchrun --nproc-per-node N moa-compress profile|compress ...``, every process (rank)
loads the model; :func:`init` joins them into one process group (gloo on CPU, NCCL on CUDA, chosen by
``torch.cuda.is_available()``). Profiling is data-parallel over calibration samples
(:func:`moa_compress.profile.profile_model`): rank 0 builds the samples and sends them to the others,
each rank profiles its share, rank 0 gathers every sample's pooled maps, writes them to the work folder
(rank 0 alone writes) and sums them in sample order. Then every rank leaves the group together
(:func:`leave`); everything after profiling (gate training, search, validation, eval, writing the
plan and report) runs on rank 0 alone.

Launched without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) nothing here does anything:
:func:`current` is a group of one and every helper runs its function in place.

A rank that dies makes the others' next collective fail (gloo and NCCL notice a closed peer at once;
``MOA_COMPRESS_DIST_TIMEOUT`` seconds, default 1800, bound the wait otherwise); rank 0 then stops with
one line naming the stage, and a rerun of the same command resumes from the samples already written.

Messages between ranks are JSON text and plain tensors: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from moa_compress.errors import UserInputError

TIMEOUT_ENV = "MOA_COMPRESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Another rank stopped (or a collective timed out) while the job needed it. One line."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job: ``rank`` of ``world_size`` (a group of one without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def share(self, items: list[T]) -> list[T]:
        """This rank's items of ``items``: every ``world_size``-th, starting at ``rank`` (deterministic)."""
        return items[self.rank :: self.world_size]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserInputError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise UserInputError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return seconds


def init() -> Group:
    """Join the process group ``torchrun`` set up (idempotent); a group of one when not launched by it.

    On CUDA each rank uses the GPU of its ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if not launched_by_torchrun():
        return Group()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
        # torchrun stops the surviving ranks with SIGTERM when one fails, often before their next
        # collective notices the dead peer: turn it into the one-line error the CLI prints.
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return current()


def _stopped_by_launcher(signum, frame) -> None:
    raise RankFailedError(
        "torchrun stopped this rank because another rank failed; rerun the same command to resume"
    )


def current() -> Group:
    """The group this process belongs to now (a group of one before :func:`init` or without torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def leave(group: Group, stage: str) -> None:
    """Every rank, once its last collective is done: wait for the others, then close the group together.

    The work after profiling runs on rank 0 alone, so the group is closed here rather than at exit: no
    rank tears its connections down while a peer still holds them, and rank 0 searches without sockets
    and worker threads it no longer needs. (A CI run once saw a rank that had finished its share abort
    at exit, "terminate called without an active exception", and torchrun then stopped rank 0 mid-search.)
    A group of one returns at once.
    """
    import gc

    import torch.distributed as dist

    if not group.enabled:
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed(stage, exc) from None
    gc.collect()  # no finished collective's work object keeps the backend alive past destroy
    close()


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank's collectives move tensors: its GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(stage: str, exc: BaseException) -> RankFailedError:
    # The backend's own message names its C++ source file and socket state: nothing a user acts on.
    return RankFailedError(
        f"another rank stopped during {stage} ({type(exc).__name__} in a collective); "
        "rerun the same command to resume"
    )


def broadcast_json(group: Group, value: Any, stage: str) -> Any:
    """Rank 0's JSON-able ``value`` on every rank (others pass anything, e.g. None)."""
    import torch.distributed as dist

    if not group.enabled:
        return value
    where = device()
    try:
        data = json.dumps(value).encode() if group.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=where)
        dist.broadcast(size, src=0)
        buffer = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(where)
            if group.is_main
            else torch.empty(int(size), dtype=torch.uint8, device=where)
        )
        dist.broadcast(buffer, src=0)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed(stage, exc) from None
    return json.loads(bytes(buffer.cpu().tolist()).decode()) if not group.is_main else value


def broadcast_tensor(group: Group, tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """Rank 0's ``tensor`` into every rank's ``tensor`` (same shape and dtype everywhere)."""
    import torch.distributed as dist

    if not group.enabled:
        return tensor
    try:
        moved = tensor.to(device())
        dist.broadcast(moved, src=0)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed(stage, exc) from None
    return moved.to(tensor.device)


def gather_tensor(group: Group, tensor: torch.Tensor, stage: str) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
    import torch.distributed as dist

    if not group.enabled:
        return [tensor]
    try:
        moved = tensor.to(device())
        found = [torch.empty_like(moved) for _ in range(group.world_size)] if group.is_main else None
        dist.gather(moved, found, dst=0)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _failed(stage, exc) from None
    return [t.to(tensor.device) for t in found] if found is not None else None


def on_main(group: Group, stage: str, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only and tell every rank how it went.

    Returns ``fn()``'s value on rank 0 and None elsewhere. When ``fn`` raises a
    :class:`UserInputError` (bad input: one line), the other ranks raise the same message, so every
    rank stops with it instead of waiting in a collective for a rank that left.
    """
    if not group.enabled:
        return fn()
    outcome: dict[str, Any] = {"ok": True}
    value = None
    error: BaseException | None = None
    if group.is_main:
        try:
            value = fn()
        except UserInputError as exc:
            error, outcome = exc, {"ok": False, "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once the others are told
            error, outcome = exc, {"ok": False, "message": f"rank 0 failed during {stage}: {exc}"}
    outcome = broadcast_json(group, outcome, stage)
    if error is not None:
        raise error
    if not outcome["ok"]:
        raise UserInputError(outcome["message"].splitlines()[0])
    return value
