"""SmolLM2-135M-Instruct, a real instruct model, offline: `posttrain import-gguf` gives the
checkpoint the GGUF describes, and 2 steps of each SmolLM2 recipe (GRPO with in-process vLLM,
SFT, DPO) train it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.trainer import Trainer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PARAMS = 134_515_008  # SmolLM2-135M with tied embeddings (benchmarks/gpu_check.py uses it)


def _gguf_logits(ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] of the GGUF file as transformers loads it itself (dequantized)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.gguf_import import resolve_gguf

    path = resolve_gguf("smollm2", ROOT)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        return gguf_model(ids).logits


def test_import_gives_the_gguf_model_as_a_plain_checkpoint(smollm2_dir):
    from posttrain.models import load_policy, load_tokenizer

    model = load_policy(str(smollm2_dir), dtype="float32")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49_152)
    assert not hasattr(cfg, "quantization_config") and cfg.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = load_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # the saved weights compute what transformers' own GGUF loading computes
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids).logits
    ref = _gguf_logits(ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_cli_bf16_import_is_the_rounded_float32_weights(smollm2_dir, tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "bf16"
    assert main(["import-gguf", "smollm2", str(out), "--dtype", "bfloat16"]) == 0
    assert "134.5M parameters, 30 layers, hidden 576, vocabulary 49152" in capsys.readouterr().out
    bf16 = load_file(out / "model.safetensors")
    fp32 = load_file(Path(smollm2_dir) / "model.safetensors")
    assert set(bf16) == set(fp32)
    for name, w in fp32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], w.to(torch.bfloat16)), name


SHORT = ("train.steps=2", "log.wandb=disabled", "log.progress=false", "eval.seeds=[0]")
RECIPES = {
    "smollm2_grpo_math": (
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
        "train.micro_batch_size_per_device=16",
        "eval.num_problems=4",
    ),
    "smollm2_sft": (
        "train.sft_batch_size=4",
        "train.micro_batch_size_per_device=4",
        "eval.num_problems=4",
    ),
    "smollm2_dpo": (
        "dpo.pairs_per_step=4",
        "train.micro_batch_size_per_device=4",
        "eval.num_problems=4",
    ),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_smollm2_recipe_two_steps(smollm2_dir, tmp_path, name):
    out = tmp_path / name
    cfg = load_config(
        ROOT / "recipes" / f"{name}.yaml",
        [f"model.path={smollm2_dir}", f"train.output_dir={out}", *SHORT, *RECIPES[name]],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    assert all(math.isfinite(m["loss"]) for m in history)
    final = load_file(out / "checkpoints" / "final" / "model.safetensors")
    start = load_file(Path(smollm2_dir) / "model.safetensors")
    moved = max((final[k] - start[k]).abs().max().item() for k in start)
    assert moved > 0, "two optimizer steps left every weight where it was"
    if name == "smollm2_grpo_math":
        # some group had both right and wrong answers, so there was a gradient to take
        assert max(m["advantage/abs_mean"] for m in history) > 0
        assert history[-1]["weight_version"] == 2.0  # vLLM holds the trained weights
        assert all(m["response_length/max"] <= 32 for m in history)
    if name != "smollm2_sft":  # SFT reports no held-out metric
        assert (out / "eval.json").is_file()
