"""The offline tiny model: a randomly initialised Qwen2ForCausalLM plus a byte-level character
tokenizer with a Qwen-style chat template, so tests, the quickstart and benchmarks run without
downloads.

Tokenizer note: transformers 5 rebuilds the tokenizer of a `qwen2` model as a byte-level BPE from
the saved vocab/merges, whatever `tokenizer_class` says. A plain character vocab would then drop
spaces and newlines silently, so the vocab stores GPT-2 byte-level symbols (`Ġ` for a space, `Ċ` for
a newline) in a BPE model with no merges, a ByteLevel pre-tokenizer and a ByteLevel decoder. Only
printable ASCII, newline and tab are in the vocab; other characters are dropped on encode.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)

CHAT_TEMPLATE = (
    # tools (multi-turn environments): one compact line, "Tools: add(a, b), multiply(a, b)"
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' }}"
    "{%- for t in tools %}{{- t['function']['name'] + '(' }}"
    "{{- t['function']['parameters']['properties'] | list | join(', ') }}{{- ')' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_SIZES: dict[str, dict[str, int | bool]] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
        "max_position_embeddings": 512,
    },
    "bench": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1408,
        "max_position_embeddings": 2048,
    },
}
# "tiny" with separate input and output embeddings: with tied ones a digit-copy task can merge two
# digits' shared vector early (while the model only learns digit frequencies) and never split it.
TINY_SIZES["tiny_untied"] = {**TINY_SIZES["tiny"], "tie_word_embeddings": False}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _char_vocab() -> dict[str, int]:
    """Byte-level symbols of printable ASCII + newline + tab, then the special tokens."""
    mapping = _bytes_to_unicode()
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 95 printable + \t + \n
    vocab = {mapping[ord(c)]: i for i, c in enumerate(chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return vocab


def build_tokenizer() -> Any:
    """Build the tiny byte-level character tokenizer (a `PreTrainedTokenizerFast`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _char_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_SIZES["bench"]["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to `out_dir`.

    Args:
        out_dir: directory to create (or overwrite); holds config.json, model.safetensors,
            generation_config.json, tokenizer.json and tokenizer_config.json afterwards.
        size: "tiny" (hidden 128, 4 layers, ~0.8M params), "tiny_untied" (the same with an
            output head of its own instead of the tied embedding) or "bench" (hidden 512, 8
            layers, ~23.6M).
        seed: torch seed for the weight initialisation (same seed -> identical weights).

    Returns:
        The output directory as a Path.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if size not in TINY_SIZES:
        raise ConfigError(f"model.tiny_size={size!r}: valid sizes are {sorted(TINY_SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    shape = {"tie_word_embeddings": True, **TINY_SIZES[size]}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        **shape,
    )
    cpu_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(cpu_rng)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
