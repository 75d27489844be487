"""Shared input factories for tests: random attention inputs, random layouts, tiny models."""

from __future__ import annotations

import torch

from moa_compress.kernels.layout import BlockLayout, causal_mask


def random_qkv(b=1, hq=9, hkv=3, sq=100, sk=None, d=64, dtype=torch.float64, seed=0, device="cpu"):
    """Random q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (never zeros)."""
    sk = sq if sk is None else sk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def random_layout(b, h, q_len, kv_len, block_size=64, p=0.5, seed=0, empty_rows=True, diagonal=True):
    """Random causal block selection. With ``diagonal`` the diagonal block is always kept;
    with ``empty_rows`` some query blocks select nothing at all."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    blocks = torch.rand(b, h, nq, nk, generator=g) < p
    # Keep only blocks holding at least one causal pair.
    rows = torch.arange(nq) * block_size
    last_row = torch.clamp(rows + block_size - 1, max=q_len - 1) + (kv_len - q_len)
    causal_blocks = torch.arange(nk)[None, :] * block_size <= last_row[:, None]
    blocks &= causal_blocks
    if diagonal:
        diag_col = (last_row // block_size).clamp(max=nk - 1)
        blocks[..., torch.arange(nq), diag_col] = True
    if empty_rows and nq > 1:
        kill = torch.rand(b, h, nq, generator=g) < 0.15
        blocks &= ~kill[..., None]
    return BlockLayout.from_block_mask(blocks, block_size, q_len, kv_len)


def dense_masked_attention(q, k, v, mask, scale):
    """Independent float64 check: softmax over allowed keys, zero rows where none allowed."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def left_padded(seqs):
    """A left-padded batch of 1-D token sequences (pad id 0) and its attention mask."""
    width = max(len(s) for s in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, width - len(s) :] = s
    return batch, (batch != 0).long()


def tiny_config(family: str = "llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128, max_pos=1024):
    """A tiny decoder config of ``family`` (llama, qwen2, mistral; gemma3: layers alternate a
    sliding window of 40 tokens and full attention, from a window layer, as Gemma 3 interleaves them)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma3": Gemma3TextConfig}[
        family
    ]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    if family == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        # bos / eos as the llama configs have them (Gemma's eos 1 would end these tests' greedy runs early)
        extra = {"sliding_window": 40, "layer_types": types, "query_pre_attn_scalar": head_dim,
                 "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    return cls(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        **extra,
    )


def tiny_model(family: str = "llama", seed=0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), attn_implementation="sdpa")
    return model.to(dtype).eval()


__all__ = [
    "causal_mask",
    "dense_masked_attention",
    "random_layout",
    "random_qkv",
    "tiny_config",
    "tiny_model",
]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def tiny_tokenizer(words=(), chat_template=True):
    """A word-level fast tokenizer (digits split one per token) whose vocabulary is the words of
    ``words`` plus digits, punctuation and chat specials; unknown words map to ``<unk>``."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab_words = sorted(
        {w for text in words for w in re.findall(r"[A-Za-z]+", text)} | {"user", "assistant"}
    )
    pieces = specials + list("0123456789.,?:!'\"()-") + vocab_words
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[1:],
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (vocab < 512) with a ChatML-style chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Section 1: the ledger shipped 12 crates of copper wire to Aldport on Monday.",
    ]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


__all__ += ["tiny_bpe_tokenizer", "tiny_tokenizer"]


def random_profile(
    layers=2, heads=4, kv_heads=2, lengths=(512, 1024), block_size=32, seed=0, decay=1.0, provenance=None
):
    """A :class:`Profile` of random block influence: positive below the diagonal, zero above, with
    per-head taste for recent keys (``decay`` scales how fast influence falls with distance) and a
    heavy first (sink) column, so that heads differ the way real ones do."""
    from moa_compress.plan import ModelIdentity
    from moa_compress.profile import Profile

    g = torch.Generator().manual_seed(seed)
    identity = ModelIdentity("random", layers, heads, kv_heads, 16, f"{seed:016x}")
    influence = {}
    for n in lengths:
        nb = -(-n // block_size)
        distance = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).clamp(min=0).float()  # [nB, nB]
        reach = torch.rand(layers, heads, 1, 1, generator=g) * nb / decay + 0.5  # blocks of typical reach
        noise = torch.rand(layers, heads, nb, nb, generator=g)
        values = noise * torch.exp(-distance / reach)
        values[..., 0] += torch.rand(layers, heads, 1, generator=g) * 3
        influence[n] = (values * torch.ones(nb, nb).tril()).float().contiguous()
    return Profile(
        model=identity,
        block_size=block_size,
        influence=influence,
        samples={n: 1 for n in lengths},
        provenance=dict(provenance or {"data": "random", "mode": "plain", "seed": seed}),
    )


__all__ += ["random_profile"]
