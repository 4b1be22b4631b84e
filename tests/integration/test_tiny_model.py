"""The offline tiny model: tokenizer round trips, chat template, loading, config errors.

The vLLM side (its tokenizer and model loading) is checked in test_rollout.py, which owns the one
vLLM engine of the integration tests.
"""

from __future__ import annotations

import string

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.models import load_policy, load_reference, load_tokenizer, make_tiny
from posttrain.models.tiny import EOS_TOKEN, IM_START, PAD_TOKEN, TINY_SIZES

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "  two leading spaces and two trailing  ",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues",
    "12 + 34 = 46; 7*8=56 (ok) [x] {y} <z> ~`'\"\\|/?!@#$%^&_-",
    "What is 3 + 4?\nAnswer: 7",
    "".join(c for c in string.printable if c not in "\r\x0b\x0c"),
]


def test_make_tiny_writes_hf_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_autotokenizer_round_trips_text(tiny_model_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character: nothing dropped or merged
    assert tok.decode(ids) == text


def test_special_tokens_and_vocab(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    config = load_policy(tiny_model_dir).config
    assert tok.eos_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    specials = [tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, EOS_TOKEN)]
    assert len(set(specials)) == 3
    assert len(tok) == config.vocab_size == 97 + 3  # printable ASCII + \n + \t, then specials
    assert config.eos_token_id == tok.eos_token_id
    assert config.pad_token_id == tok.pad_token_id
    assert tok(IM_START + "hi" + EOS_TOKEN)["input_ids"] == [
        specials[1],
        *tok("hi")["input_ids"],
        specials[2],
    ]
    assert tok.decode([specials[1], *tok("hi")["input_ids"]], skip_special_tokens=True) == "hi"


def test_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    user = [{"role": "user", "content": "1 + 1?"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\n1 + 1?<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    text = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok(text)["input_ids"]) == text


def test_policy_and_reference_load(tiny_model_dir):
    policy = load_policy(tiny_model_dir, dtype="float32", gradient_checkpointing=True)
    assert type(policy).__name__ == "Qwen2ForCausalLM"
    assert policy.training and policy.is_gradient_checkpointing
    assert policy.config.tie_word_embeddings
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())
    ref = load_reference(tiny_model_dir, dtype="bfloat16")
    assert not ref.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert policy(ids).logits.shape == (1, 4, policy.config.vocab_size)


def test_make_tiny_is_seeded(tmp_path, tiny_model_dir):
    before = torch.random.get_rng_state()
    same = load_policy(make_tiny(tmp_path / "a", seed=0)).state_dict()
    other = load_policy(make_tiny(tmp_path / "b", seed=1)).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    base = load_policy(tiny_model_dir).state_dict()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not torch.equal(
        base["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize(
    ("size", "expected"), [("tiny", 0.80e6), ("tiny_untied", 0.80e6 + 100 * 128), ("bench", 23.6e6)]
)
def test_size_presets(size, expected):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=100, **{"tie_word_embeddings": True, **TINY_SIZES[size]})
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM CPU attention needs it
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert abs(n - expected) / expected < 0.01


def test_config_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        load_policy(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty.*config\.json"):
        load_reference(empty)
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_tokenizer(empty)
    with pytest.raises(ConfigError, match=r"\./relative/model"):
        load_policy("./relative/model")
    with pytest.raises(ConfigError, match="tiny_size"):
        make_tiny(tmp_path / "x", size="huge")


def test_bad_dtype_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="dtype"):
        load_policy(tiny_model_dir, dtype="float64")
