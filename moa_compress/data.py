"""Text for calibration and evaluation, through Hugging Face ``datasets``.

``load_texts`` is the one entry point for user-supplied text: a local ``.txt`` / ``.jsonl`` /
``.json`` / ``.parquet`` / ``.csv`` file, a folder of such files, or a hub dataset name where the hub
is reachable. Calibration sets built from it (and the built-in synthetic set) live further down.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moa_compress.errors import UserInputError

# file suffix -> the datasets builder that reads it
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


class DataError(UserInputError):
    """Calibration or evaluation text that cannot be used."""


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_builder: dict[str, list[str]] = {}
    for f in files:
        builder = _BUILDERS.get(f.suffix.lower()) or _BUILDERS.get("".join(f.suffixes[-2:]).lower())
        if builder:
            by_builder.setdefault(builder, []).append(str(f))
    if not by_builder:
        raise DataError(f"--data {path}: no .txt/.jsonl/.json/.parquet/.csv files found")
    if len(by_builder) > 1:
        raise DataError(f"--data {path}: mixes file types ({', '.join(sorted(by_builder))}); use one kind")
    ((builder, names),) = by_builder.items()
    return builder, names


def load_texts(spec: str | Path, text_field: str = "text", split: str = "train") -> list[str]:
    """Return the non-empty texts of a local file/folder or a hub dataset.

    Plain-text files become one text per file (not per line), so long documents stay whole.
    Structured files and hub datasets are read through ``datasets`` and ``text_field`` is taken.
    """
    import datasets

    path = Path(spec).expanduser()
    datasets.disable_progress_bars()
    try:
        if path.exists():
            builder, files = _local_files(path)
            if builder == "text":
                ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
            else:
                ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(str(spec), split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the first line only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--data {spec}: cannot load ({first})") from exc
    if text_field not in ds.column_names:
        raise DataError(
            f"--data {spec}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); set --text-field"
        )
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"--data {spec}: no non-empty text in field {text_field!r}")
    return texts


def token_windows(texts: Sequence[str], tokenizer, length: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly ``length`` tokens, cut from each text in order."""
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - length + 1, length):
            windows.append(ids[start : start + length])
            if limit is not None and len(windows) >= limit:
                return windows
    return windows


# ----------------------------------------------------------------------------------------------
# Calibration samples


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration sequence of exactly the length it was built for.

    ``input_ids``: int64 ``[S]``. ``loss_mask``: bool ``[S]``, True where token ``t`` is scored (predicted
    from position ``t - 1``): the dense model's answer tokens, or the last part of a plain-text window.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor


def model_digest(model) -> str:
    """16 hex digits identifying a model's weights (names, shapes, dtypes and value statistics).

    Cheap (one pass of sums) and enough to tell a cache made with other weights from ours.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            stats = flat.double().sum().item(), flat.double().square().sum().item()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{stats[0]:.9e}:{stats[1]:.9e}".encode())
            h.update(flat[:: max(1, flat.numel() // 256)].double().numpy().tobytes())
    return h.hexdigest()[:16]
