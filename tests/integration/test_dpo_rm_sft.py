"""DPO, reward-model and SFT runs on the one trainer: recipes, ZeRO-2, two ranks, the RM reward."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.preference import arithmetic_pairs, pair_batch
from posttrain.data.splits import load_train_eval_rows
from posttrain.trainer import Trainer

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parents[2] / "recipes"

SHORT = [
    "train.steps=3",
    "data.train_size=64",
    "data.eval_size=16",
    "eval.num_problems=16",
    "log.wandb=disabled",
    "log.progress=false",
]


def _train(cfg):
    t = Trainer(cfg)
    return t, t.train()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_recipe_short_run_packed(tmp_path, tiny_model_dir):
    cfg = load_config(
        RECIPES / "sft_tiny.yaml",
        [f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path}", *SHORT],
    )
    assert cfg.sft.packing
    t, history = _train(cfg)
    assert len(history) == 3 and history[-1]["sft/packed_rows"] >= 1
    assert history[-1]["loss"] < history[0]["loss"]
    assert (t.final_checkpoint / "model.safetensors").is_file()


def test_sft_stop_loss_ends_at_the_first_window_below_it(tmp_path, tiny_model_dir):
    """A straight 14-step run gives the losses; the threshold picked from them must end a
    30-step run at the first step whose last-10 mean is below it, with the same losses."""
    base = [f"model.path={tiny_model_dir}", *SHORT, "sft.packing=false", "train.save_every=0"]
    base.append("optim.schedule=constant")  # the learning rate does not depend on train.steps
    straight = load_config(
        RECIPES / "sft_tiny.yaml", [*base, "train.steps=14", f"train.output_dir={tmp_path / 'a'}"]
    )
    losses = [row["loss"] for row in _train(straight)[1]]
    means = {k: sum(losses[k - 10 : k]) / 10 for k in range(10, 15)}  # after step k
    threshold = sorted(means.values())[1] + 1e-9  # reached at some step 10..14
    expected = min(k for k, m in means.items() if m < threshold)
    cfg = load_config(
        RECIPES / "sft_tiny.yaml",
        [*base, "train.steps=30", f"train.stop_loss={threshold}", f"train.output_dir={tmp_path}"],
    )
    t, history = _train(cfg)
    assert [row["loss"] for row in history] == losses[:expected]
    assert t.step == expected and t.final_checkpoint.name == "final"
    steps = [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [*range(1, expected + 1)]


def test_sft_on_a_conversation_file(tmp_path, tiny_model_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{a}+{a}"},
                {"role": "assistant", "content": str(2 * a)},
                {"role": "user", "content": "and again?"},
                {"role": "assistant", "content": f"{2 * a} again"},
            ]
        }
        for a in range(12)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        RECIPES / "sft_tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path / 'run'}",
            f"data.source={data}",
            "data.prompt_column=messages",
            "data.train_size=null",
            "data.eval_size=4",
            "train.sft_batch_size=8",
            "train.steps=2",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    _, history = _train(cfg)
    assert len(history) == 2 and history[0]["tokens/trained"] > 8 * 4


def test_dpo_recipe_short_run_with_warmup_and_cache(tmp_path, tiny_model_dir):
    extra = [f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path}", "warmup.steps=2"]
    cfg = load_config(RECIPES / "dpo_tiny.yaml", [*extra, *SHORT, "dpo.pairs_per_step=8"])
    assert cfg.dpo.ref_cache == "auto"
    t, history = _train(cfg)
    assert (tmp_path / "sft-warmup" / "checkpoints" / "final").is_dir()
    assert (tmp_path / "ref_logps.pt").is_file()
    for key in ("loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy"):
        assert key in history[0], key
    # policy == reference before the first update: loss log 2 (+ the RPO NLL), zero margin
    assert cfg.dpo.nll_coef == 1.0
    assert history[0]["loss"] == pytest.approx(0.693147 + history[0]["nll"], abs=1e-4)
    assert history[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert set(t.eval_after) >= {"eval/pref_accuracy", "eval/reward_accuracy", "eval/margin"}
    assert t.eval_before["eval/reward_accuracy"] == 0.0  # margins are all exactly 0 at start
    eval_json = json.loads((tmp_path / "eval.json").read_text())
    assert "eval/pref_accuracy" in eval_json["after"]


def test_rm_recipe_short_run_and_reward_model_reward(tmp_path, tiny_model_dir):
    from rewards import get_reward
    from rewards.reward_model import clear_cache

    cfg = load_config(
        RECIPES / "rm_tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path}",
            "warmup.steps=0",
            "reward_model.pairs_per_step=8",
            *SHORT,
        ],
    )
    t, history = _train(cfg)
    assert type(t.engine.module).__name__ == "Qwen2ForSequenceClassification"
    assert {"loss", "accuracy", "margin"} <= set(history[0])
    # the recipe trains on mixed wrong answers; each pure kind is scored on its own as well
    assert cfg.data.wrong_answers == "mixed"
    model = t.engine.module
    for kind in ("plausible", "uniform"):
        pairs = t.algorithm.other_held[kind]
        assert len(pairs) == cfg.eval.num_problems * cfg.data.preference_negatives
        mb = pair_batch(pairs, t.tokenizer.pad_token_id)
        with torch.no_grad():
            r = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, 0]
        m = len(pairs)
        expected = float((r[:m] > r[m:]).float().mean())
        assert t.eval_after[f"eval/{kind}/pair_accuracy"] == pytest.approx(expected, abs=1e-6)
        margin = float((r[:m] - r[m:]).mean())
        assert t.eval_after[f"eval/{kind}/margin"] == pytest.approx(margin, abs=1e-5)
    # eval/* of the main held-out set (mixed wrong answers) from the trained model's scores
    held = t.algorithm.held
    mb = pair_batch(held, t.tokenizer.pad_token_id)
    with torch.no_grad():
        r = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, 0]
    m = len(held)
    diff = (r[:m] - r[m:]).double()
    assert float(diff.abs().max()) > 1e-3  # scores differ (a constant head passes anything)
    after = t.eval_after
    assert after["eval/pair_accuracy"] == pytest.approx(float((diff > 0).double().mean()))
    assert after["eval/margin"] == pytest.approx(float(diff.mean()), abs=1e-5)
    loss = float(-torch.nn.functional.logsigmoid(diff).mean())
    assert after["eval/loss"] == pytest.approx(loss, abs=1e-5)

    # The `reward_model` reward on the held-out pairs' text, from the saved checkpoint, is the
    # trained model's score of the same (prompt, completion): chosen rows, then rejected rows.
    d = cfg.data
    _, held_rows = load_train_eval_rows(cfg)
    rows = arithmetic_pairs(
        held_rows[: cfg.eval.num_problems], d.seed, d.preference_negatives, d.wrong_answers
    )
    assert len(rows) == m
    final = t.final_checkpoint
    reward = get_reward("reward_model")
    clear_cache()
    prompts = [row["prompt"] for row in rows]
    chosen = reward(prompts, [row["chosen"] for row in rows], path=str(final), batch_size=32)
    rejected = reward(prompts, [row["rejected"] for row in rows], path=str(final), batch_size=32)
    assert chosen == pytest.approx(r[:m].tolist(), abs=1e-5)
    assert rejected == pytest.approx(r[m:].tolist(), abs=1e-5)
    # ... so the reward prefers the chosen answer exactly as often as the held-out accuracy says
    wins = sum(c > j for c, j in zip(chosen, rejected, strict=True)) / m
    assert wins == pytest.approx(after["eval/pair_accuracy"], abs=1.5 / m)

    prompts = ["12+07", "03+05", "20+11"]
    completions = ["19", "8", "31"]
    one = reward(prompts, completions, path=str(final), batch_size=1)
    many = reward(prompts, completions, path=str(final), batch_size=8, answer=["x"] * 3)
    assert many == pytest.approx(one, abs=1e-5)  # padding does not move the scalar
    # one sequence by hand: chat-templated prompt + completion + EOS, score at its last token
    tok = t.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text + completions[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        by_hand = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert one[0] == pytest.approx(by_hand, abs=1e-5)


# ----------------------------------------------------------------------------- distributed

DPO_COMMON = [
    "train.algorithm=dpo",
    "train.steps=2",
    "dpo.pairs_per_step=8",
    "train.micro_batch_size_per_device=2",
    "dpo.ref_cache=auto",
    "data.train_size=64",
    "eval.num_problems=0",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.progress=false",
]


def _run_cli(prefix: list[str], out: Path, model: Path, extra: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        *prefix,
        "-m",
        "posttrain.cli",
        "train",
        str(RECIPES / "dpo_tiny.yaml"),
        "warmup.steps=0",
        f"model.path={model}",
        f"train.output_dir={out}",
        *DPO_COMMON,
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_jsonl(out / "metrics.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dpo_zero2_one_process_equals_two_ranks(tmp_path, tiny_model_dir):
    one = _run_cli([sys.executable], tmp_path / "one", tiny_model_dir, ["train.zero_stage=2"])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    two = _run_cli(torchrun, tmp_path / "two", tiny_model_dir, ["train.zero_stage=2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert one[0]["loss"] == pytest.approx(0.693147 + one[0]["nll"], abs=1e-4)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "margin", "accuracy", "rewards/chosen", "logps/chosen", "nll"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
