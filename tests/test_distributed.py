"""Profiling under torchrun (2 gloo ranks on the CPU) against one process; a dying rank; resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moa_compress.profile import load_profile
from tests.factories import tiny_bpe_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 512, "max_pos": 1024}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model("llama", **MODEL)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    text = folder / "text.txt"
    text.write_text(" ".join(f"The fox number {i} jumps over the lazy dog to the river." for i in range(300)))
    env = {
        **os.environ,
        "MOA_COMPRESS_CACHE": str(folder / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # as torchrun sets per rank: the same per-sample arithmetic everywhere
        "MOA_COMPRESS_DIST_TIMEOUT": "60",
        "PYTHONPATH": str(ROOT),
        "PYTHONFAULTHANDLER": "1",  # a rank that aborts prints where it was (in the failure message)
    }
    return folder, env


def compress_args(folder: Path, out: Path) -> list[str]:
    return [
        "compress", str(folder / "model"), "--budget", "0.5", "--out", str(out),
        "--lengths", "256,512", "--samples", "3,2", "--block-size", "32", "--dtype", "float32",
        "--eval-data", str(folder / "text.txt"), "--no-progress", "--force",
    ]  # fmt: skip


def torchrun(env, *args, ranks=2, timeout=600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "tests" / "dist_entry.py"),
        *map(str, args),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def one_process(env, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tests" / "dist_entry.py"), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def profiles_equal(a: Path, b: Path) -> None:
    first, second = load_profile(a), load_profile(b)
    assert first.lengths == second.lengths and first.samples == second.samples
    for n in first.lengths:
        for name in ("influence", "mass", "net"):
            torch.testing.assert_close(getattr(first, name)[n], getattr(second, name)[n], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_plan_and_a_dead_rank_resumes(setup):
    folder, env = setup
    single = one_process(env, *compress_args(folder, folder / "one"))
    assert single.returncode == 0, single.stderr[-2000:]

    # Rank 1 dies at its second sample: no hang, one line from rank 0, nothing finished.
    dead = torchrun(env, "--die-rank", "1", *compress_args(folder, folder / "two"), timeout=300)
    assert dead.returncode != 0
    # Rank 0 learns of it from torchrun's SIGTERM or from its next collective, whichever comes first.
    said = [line for line in dead.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].endswith("rerun the same command to resume"), said
    assert not (folder / "two" / "plan.json").exists()
    saved = sorted((folder / "two" / "work" / "profile-samples").glob("*/sample-*.safetensors"))
    assert 0 < len(saved) < 5  # the first round's samples were written by rank 0

    again = torchrun(env, *compress_args(folder, folder / "two"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "error" not in again.stderr.lower().split("warning")[0]
    profiles_equal(folder / "one" / "work" / "profile", folder / "two" / "work" / "profile")
    plans = [json.loads((folder / name / "plan.json").read_text()) for name in ("one", "two")]
    assert plans[0]["rules"] == plans[1]["rules"]
    profile = load_profile(folder / "two" / "work" / "profile")
    assert profile.provenance["ranks"] == 2

    # `moa-compress profile` shares its samples the same way (same recipe as compress's profile stage).
    alone = torchrun(
        env, "profile", folder / "model", "--out", folder / "prof", "--lengths", "256,512",
        "--samples", "3,2", "--block-size", "32", "--dtype", "float32", "--mode", "mixed", "--no-progress",
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    profiles_equal(folder / "one" / "work" / "profile", folder / "prof")


def test_a_model_split_by_a_device_map_profiles_to_the_unsplit_maps(tmp_path):
    """Layer 1 offloaded ("disk": its weights on the meta device until accelerate's hooks load them)
    stands in for a second device on this CPU-only machine; the profile must not notice."""
    from moa_compress.data import CalibrationSample, model_digest
    from moa_compress.models import load_model
    from moa_compress.profile import profile_sample

    folder = tmp_path / "model"
    tiny_model("llama", **MODEL).save_pretrained(folder)
    tiny_bpe_tokenizer().save_pretrained(folder)
    whole, _ = load_model(str(folder), dtype="float32")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    split, _ = load_model(str(folder), dtype="float32", device_map=device_map)
    assert split.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    assert len(model_digest(split)) == 16
    ids = torch.randint(0, MODEL["vocab"], (200,), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(200, dtype=torch.bool)
    mask[120:] = True
    sample = CalibrationSample(ids, mask)
    for kind in ("influence", "mass", "net"):
        expected = profile_sample(whole, sample, block_size=32, kind=kind)
        torch.testing.assert_close(profile_sample(split, sample, block_size=32, kind=kind), expected)


def test_max_memory_is_parsed_and_checked():
    from moa_compress.models import ModelLoadError, parse_max_memory

    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(ModelLoadError, match="--max-memory must look like"):
        parse_max_memory("70GiB")
