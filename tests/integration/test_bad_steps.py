"""Non-finite steps on the tiny model with real DeepSpeed (ZeRO 0-3 on CPU): a NaN/inf loss or
gradient skips its optimizer update and changes nothing; too many in a row stop the run with the
checkpoint from before the first of them.

Faults are injected where they arise in practice, and the real loss and DeepSpeed run around
them: the loss of step 2's second micro-batch times NaN (NaN loss and gradients) or plus inf
(inf loss, finite gradients: only the loss check can see it), and an inf advantage in a
micro-batch (GRPO's own loss turns it into non-finite values). A reward of inf never gets that far:
the reward boundary masks it like NaN (`rewards/boundary.py`), which is checked too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewards
from posttrain.config import Config
from posttrain.runtime.checkpoint import STATE_FILE, full_state_dict
from posttrain.trainer import Trainer, lr_multiplier
from rewards import registry
from rewards.boundary import per_sample
from tests.tiny_runs import TINY_RUN, read_jsonl, tiny_cfg

pytestmark = pytest.mark.slow

HF = ("rollout.engine=hf", "train.steps=3", "train.save_every=1", "train.keep_checkpoints=0")
POISON_STEP = 2  # 1-based: the step whose update must be skipped


def _poison_loss(trainer: Trainer, kind: str, steps: tuple[int, ...] = (POISON_STEP,)) -> None:
    """Make the loss of the second micro-batch of `steps` non-finite (`nan`: NaN loss and
    gradients; `inf`: an inf loss with the gradients of the real one)."""
    real = trainer.algorithm.loss
    seen: dict[int, int] = {}

    def loss(outputs, mb, batch):
        value, shares = real(outputs, mb, batch)
        step = trainer.step + 1
        seen[step] = seen.get(step, 0) + 1
        if step in steps and seen[step] == 2:
            value = value * math.nan if kind == "nan" else value + math.inf
        return value, shares

    trainer.algorithm.loss = loss


def _poison_advantage(trainer: Trainer) -> None:
    """An inf advantage on one sample of step 2's first micro-batch (a poisoned batch row)."""
    real = trainer.algorithm.make_batch

    def make_batch(step, model):
        batch = real(step, model)
        if step + 1 == POISON_STEP:
            mb = batch.micro_batches[0]
            mb["adv"][0] = torch.where(mb["mask"][0] > 0, math.inf, 0.0)
        return batch

    trainer.algorithm.make_batch = make_batch


def _engine_state(trainer: Trainer) -> dict:
    """Weights (gathered), the torch optimizer's state and the LR scheduler's, copied."""
    opt = trainer.engine.basic_optimizer
    moments = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for s in opt.state.values()
    ]
    return {
        "weights": {k: v.clone() for k, v in full_state_dict(trainer.engine).items()},
        "optimizer": moments,
        "scheduler": dict(trainer.engine.lr_scheduler.state_dict()),
        "lr": [g["lr"] for g in opt.param_groups],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert len(a["optimizer"]) == len(b["optimizer"]) > 0
    for sa, sb in zip(a["optimizer"], b["optimizer"], strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k
    assert a["scheduler"] == b["scheduler"] and a["lr"] == b["lr"]


def _record_states(trainer: Trainer) -> list[dict]:
    """The engine state after every step of `trainer.train()`."""
    states: list[dict] = []
    real = trainer.train_step

    def train_step():
        metrics = real()
        states.append(_engine_state(trainer))
        return metrics

    trainer.train_step = train_step
    return states


def _expected_lr(cfg: Config, optimizer_steps: int) -> float:
    o = cfg.optim
    return o.lr * lr_multiplier(
        optimizer_steps,
        warmup=o.warmup_steps,
        total=cfg.train.steps * cfg.train.updates_per_batch,
        schedule=o.schedule,
        min_ratio=o.min_lr_ratio,
    )


@pytest.mark.parametrize(
    ("zero", "kind"),
    [(0, "nan"), (1, "nan"), (2, "nan"), (3, "nan"), (2, "inf"), (3, "inf"), (0, "adv")],
)
def test_nonfinite_update_is_skipped_and_changes_nothing(tmp_path, tiny_model_dir, zero, kind):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, tiny_model_dir, *HF, f"train.zero_stage={zero}")
    trainer = Trainer(cfg)
    if kind == "adv":
        _poison_advantage(trainer)
    else:
        _poison_loss(trainer, kind)
    states = _record_states(trainer)
    trainer.train()

    # the skipped step changed no weight, no AdamW moment or step count, no learning rate
    _assert_same(states[0], states[1])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 1.0, 1.0]
    # the schedule did not advance: the step after the skip trains at the 2nd update's rate
    assert [r["lr"] for r in rows] == pytest.approx(
        [_expected_lr(cfg, 1), _expected_lr(cfg, 1), _expected_lr(cfg, 2)], rel=1e-12
    )
    # logged with the rows the step drew: prompts 4..7 of epoch 0's order (4 prompts a step)
    (bad,) = read_jsonl(out / "bad_steps.jsonl")
    assert bad["step"] == POISON_STEP and bad["data_before"] == [[0, 4]]
    assert bad["data_after"] == [[0, 8]] and bad["rows"] == "data rows: epoch 0 positions 4..7"
    if kind == "nan":  # NaN times the loss: NaN gradients too (NaN is written as null)
        assert bad["loss_nonfinite"] and bad["grad_nonfinite"] and rows[1]["loss"] is None
    elif kind == "inf":  # only the loss is non-finite: the gradients are the real ones
        assert bad["loss_nonfinite"] and not bad["grad_nonfinite"]
    else:  # the inf advantage makes GRPO's gradient non-finite
        assert bad["grad_nonfinite"]
    # the next step trains normally, exactly as a fresh process continuing the skipped step's
    # checkpoint (no gradient of the bad step is left in DeepSpeed's buffers)
    final = load_file(str(out / "checkpoints" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], states[1]["weights"][k]) for k in final)
    again = tmp_path / "again"
    resumed = Trainer(
        tiny_cfg(
            again,
            tiny_model_dir,
            *HF,
            f"train.zero_stage={zero}",
            f"train.resume={out / 'checkpoints' / 'step-000002'}",
        )
    )
    resumed.train()
    want = load_file(str(again / "checkpoints" / "final" / "model.safetensors"))
    for k in final:
        assert torch.equal(final[k], want[k]), k


STATE = {"step": 0}


@per_sample
def inf_at_step_2(prompt: str, completion: str, **_: object) -> float:
    return math.inf if STATE["step"] == POISON_STEP else len(completion) / 10


@pytest.fixture
def inf_reward():
    rewards.register("t_inf", inf_at_step_2)
    yield
    registry.unregister("t_inf")


def test_inf_reward_is_masked_not_a_bad_step(tmp_path, tiny_model_dir, inf_reward):
    """A reward of inf on every sample of step 2 is masked at the reward boundary (reason
    `nan`): that step trains on no sample, but it is not a non-finite step."""
    state = STATE
    out = tmp_path / "run"
    extra = ("rewards=[{name: t_inf}]", "rollout.filter_zero_variance_groups=false")
    trainer = Trainer(tiny_cfg(out, tiny_model_dir, *HF, *extra))
    real = trainer.algorithm.make_batch

    def make_batch(step, model):
        state["step"] = step + 1
        return real(step, model)

    trainer.algorithm.make_batch = make_batch
    trainer.train()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0, 0.0]
    assert rows[1]["reward/t_inf/errors/nan"] == 16  # 4 prompts x 4 samples
    assert rows[1]["samples/masked"] == 16 and rows[2]["samples/masked"] == 0
    assert not (out / "bad_steps.jsonl").exists()


# ------------------------------------------------------------------ stop after too many


_STOP_DRIVER = """
import math, sys
from posttrain import cli
from posttrain.trainer import Trainer

real_init = Trainer.__init__

def init(self, cfg):  # NaN losses at steps 3 and 4 (every micro-batch)
    real_init(self, cfg)
    loss = self.algorithm.loss

    def poisoned(outputs, mb, batch):
        value, shares = loss(outputs, mb, batch)
        return (value * math.nan if self.step + 1 in (3, 4) else value), shares

    self.algorithm.loss = poisoned

Trainer.__init__ = init
sys.exit(cli.main(sys.argv[1:]))
"""


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  algorithm: grpo\n")
    return path


def test_bad_steps_in_a_row_stop_the_run_with_the_pre_bad_checkpoint(tmp_path, tiny_model_dir):
    """max_bad_steps=1: step 3 is skipped, step 4 (the second in a row) stops the run through
    the command line: exit status 1, one line naming step 3, no traceback, and a checkpoint
    equal to the one of step 2 (weights, data position, step, RNG)."""
    out = tmp_path / "run"
    args = ["train", str(_recipe(tmp_path)), f"model.path={tiny_model_dir}"]
    args += [f"train.output_dir={out}", *TINY_RUN, *HF, "train.steps=6", "train.max_bad_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_DRIVER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    ckpts = out / "checkpoints"
    saved = ckpts / "before-bad-step-000003"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain: training stopped: 2 bad steps in a row (steps 3-4; ")
    assert "the first at step 3: non-finite loss and gradient, data rows: epoch 0 " in last
    assert f"checkpoint from before step 3: {saved} (continue with train.resume={saved};" in last
    assert sum("optimizer update skipped" in x for x in proc.stderr.splitlines()) == 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    # the checkpoint is step 2's: trainer state (step, data position), weights and RNG
    pre = ckpts / "step-000002"
    state = json.loads((saved / STATE_FILE).read_text())
    assert state == json.loads((pre / STATE_FILE).read_text()) and state["step"] == 2
    a, b = load_file(str(saved / "model.safetensors")), load_file(str(pre / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = torch.load(saved / "rng_rank0.pt", weights_only=False)
    rb = torch.load(pre / "rng_rank0.pt", weights_only=False)
    assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]


_RANK1_DRIVER = """
import math, os, sys
from posttrain import cli
from posttrain.trainer import Trainer

real_init = Trainer.__init__

def init(self, cfg):  # rank 1 alone: an inf loss (finite gradients) in step 2
    real_init(self, cfg)
    loss = self.algorithm.loss

    def poisoned(outputs, mb, batch):
        value, shares = loss(outputs, mb, batch)
        if os.environ["RANK"] == "1" and self.step + 1 == 2:
            value = value + math.inf
        return value, shares

    self.algorithm.loss = poisoned

Trainer.__init__ = init
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_ranks_skip_together(tmp_path, tiny_model_dir):
    """Under torchrun (ZeRO-2) only rank 1 sees the bad loss, and its gradients are finite:
    the ranks agree, so rank 0 skips the update too (no weight of step 1 changes)."""
    from tests.tiny_runs import torchrun

    driver = tmp_path / "driver.py"
    driver.write_text(_RANK1_DRIVER)
    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "sft_tiny.yaml"
    args = ["train", str(recipe), f"model.path={tiny_model_dir}", f"train.output_dir={out}"]
    args += ["train.steps=3", "train.save_every=1", "train.keep_checkpoints=0"]
    args += ["train.zero_stage=2", "train.sft_batch_size=8", "train.micro_batch_size_per_device=4"]
    args += ["sft.packing=false", "data.train_size=64", "data.eval_size=8"]
    args += ["optim.warmup_steps=0", "log.wandb=disabled", "log.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        [*torchrun(2), str(driver), *args],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 0.0]
    ckpts = out / "checkpoints"
    one, two = (load_file(str(ckpts / f"step-00000{i}" / "model.safetensors")) for i in (1, 2))
    three = load_file(str(ckpts / "final" / "model.safetensors"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    (bad,) = read_jsonl(out / "bad_steps.jsonl")
    assert bad["step"] == 2 and bad["loss_nonfinite"] and not bad["grad_nonfinite"]
