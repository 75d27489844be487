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
