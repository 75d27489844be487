import pytest
from transformers import AutoTokenizer

from moa_compress.models import align_special_tokens
from tests.factories import tiny_config, tiny_tokenizer


def test_align_special_tokens_repairs_swapped_eos_and_missing_pad(tmp_path):
    # What transformers 5.17 builds from SmolLM2's GGUF: eos is the bos token, no pad token.
    tok = tiny_tokenizer(["hello"])
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    tok.eos_token = "<|im_start|>"
    assert tok.eos_token_id == start and tok.pad_token_id is None
    config = tiny_config(vocab=len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = start, end, end

    align_special_tokens(tok, config)

    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (start, end, end)
    # The repair must survive the save into the cache folder.
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_align_special_tokens_leaves_unnamed_or_listed_ids_alone():
    tok = tiny_tokenizer(["hello"])
    before = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config = tiny_config(vocab=len(tok))
    # No pad id, several stop ids, and an id outside the vocabulary: nothing to set.
    config.pad_token_id, config.eos_token_id, config.bos_token_id = None, [1, 2], len(tok) + 5

    align_special_tokens(tok, config)

    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == before


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(tmp_path):
    from moa_compress.models import ModelLoadError, cpu_has_native_bf16, resolve_dtype

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_native_bf16(amx) and cpu_has_native_bf16(arm)
    assert not cpu_has_native_bf16(avx2) and not cpu_has_native_bf16(tmp_path / "missing")
    here = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert resolve_dtype("auto", "cpu") == here
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit choice is kept
    with pytest.raises(ModelLoadError, match="auto, bfloat16"):
        resolve_dtype("fp8")


def test_compress_settings_take_auto_as_the_models_dtype():
    from moa_compress.settings import CompressError, CompressSettings

    CompressSettings(budget=0.5, dtype="auto").check()
    with pytest.raises(CompressError, match="auto"):
        CompressSettings(budget=0.5, dtype="fp8").check()


def model_folder(tmp_path, tokenizer=True, config=None):
    """A tiny llama saved as a model folder: weights and config, a tokenizer unless told not to, and
    ``config`` (text) written over config.json when given."""
    from tests.factories import tiny_model

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer(["hello"]).save_pretrained(folder)
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no tokenizer", "has no tokenizer"),
        ("broken config", "not a valid JSON"),
        ("config without model_type", "model_type"),
        ("empty folder", "no config.json"),
    ],
)
def test_load_model_names_the_folder_and_what_is_wrong(tmp_path, kind, message):
    from moa_compress.models import ModelLoadError, load_model

    if kind == "empty folder":
        folder = tmp_path / "model"
        folder.mkdir()
    else:
        config = {"broken config": "{not json", "config without model_type": "{}"}.get(kind)
        folder = model_folder(tmp_path, tokenizer=kind != "no tokenizer", config=config)
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_model(str(folder), dtype="float32")
    assert str(folder) in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "tokenizer", "config", "message"),
    [
        (["generate", "{model}", "--prompt", "hi"], False, None, "has no tokenizer"),
        (["generate", "{model}", "--prompt", "hi"], True, "{}", "model_type"),
        (["plan", "uniform", "{model}", "--density", "0.5", "--out", "{out}"], True, "{x", "valid JSON"),
        (["plan", "validate", "{plan}", "{model}"], True, "{}", "model_type"),
    ],
)
def test_commands_that_load_a_model_fail_on_one_line(tmp_path, command, tokenizer, config, message):
    from typer.testing import CliRunner

    from moa_compress.cli import app

    folder = model_folder(tmp_path, tokenizer=tokenizer)
    plan = tmp_path / "plan"
    runner = CliRunner()
    made = runner.invoke(app, ["plan", "uniform", str(folder), "--density", "0.5", "--out", str(plan)])
    assert made.exit_code == 0, made.output
    if config is not None:
        (folder / "config.json").write_text(config)
    args = [a.format(model=folder, plan=plan, out=tmp_path / "out") for a in command]

    result = runner.invoke(app, args)

    assert result.exit_code == 2, result.output
    assert message in result.output and str(folder) in result.output
    assert len(result.output.strip().splitlines()) == 1
