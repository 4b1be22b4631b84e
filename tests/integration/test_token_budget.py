"""Token-budget micro-batches through the real Trainer (DeepSpeed on CPU): one GRPO step and one
PPO step of 16 sequences trained as one micro-batch of 16 rows and with
`train.max_tokens_per_micro_batch` give the same loss, gradient norm and weights; a budget
below every row's length trains rows one by one, with no padding at all."""

from __future__ import annotations

import pytest

from posttrain.trainer import Trainer
from tests.integration.test_microbatch_invariance import STEP
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

ALGORITHMS = {
    "grpo": (),
    "ppo": ("train.algorithm=ppo", "advantage.estimator=gae", "kl.coef=0"),
}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, eos_model):
    """(algorithm, extra overrides) -> (the step's metrics, the weights after it); cached."""
    done: dict[tuple[str, tuple[str, ...]], tuple[dict, dict]] = {}

    def run(algorithm: str, *extra: str) -> tuple[dict, dict]:
        if (algorithm, extra) not in done:
            out = tmp_path_factory.mktemp(algorithm)
            cfg = tiny_cfg(out, eos_model, *STEP, *ALGORITHMS[algorithm], *extra)
            trainer = Trainer(cfg)
            [metrics] = trainer.train()
            state = trainer.engine.module.state_dict()
            done[algorithm, extra] = metrics, {k: v.detach().clone() for k, v in state.items()}
        return done[algorithm, extra]

    return run


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_token_budget_step_equals_fixed_micro_batches(one_step, algorithm):
    fixed_m, fixed_w = one_step(algorithm, "train.micro_batch_size_per_device=16")
    width = round(fixed_m["train/micro_batches"])
    assert width == 1  # one micro-batch of all 16 rows
    # a budget of ~3 rows of the step's shape: several micro-batches of different sizes
    budget_m, budget_w = one_step(
        algorithm, "train.micro_batch_size_per_device=16", "train.max_tokens_per_micro_batch=96"
    )
    assert 2 < budget_m["train/micro_batches"] < 16
    assert budget_m["response_length/mean"] == fixed_m["response_length/mean"]  # same rollouts
    assert fixed_m["response_length/mean"] < fixed_m["response_length/max"]  # lengths differ
    assert fixed_m["grad_norm"] > 1e-3
    assert budget_m["loss"] == pytest.approx(fixed_m["loss"], abs=1e-6)
    assert budget_m["grad_norm"] == pytest.approx(fixed_m["grad_norm"], rel=1e-5)
    worst = max(float((budget_w[k] - fixed_w[k]).abs().max()) for k in fixed_w)
    assert worst < 1e-6, f"max |w(budget) - w(fixed)| = {worst:.2e}"
    # the budget packs rows of similar length: less padding than one micro-batch of 16
    assert 0 < budget_m["train/pad_fraction"] < fixed_m["train/pad_fraction"]


def test_budget_below_every_row_trains_rows_alone_without_padding(one_step):
    fixed_m, fixed_w = one_step("grpo", "train.micro_batch_size_per_device=16")
    alone_m, alone_w = one_step("grpo", "train.max_tokens_per_micro_batch=1")
    assert alone_m["train/micro_batches"] == 16  # every row longer than the budget: alone
    assert alone_m["train/pad_fraction"] == 0.0  # each row trimmed to itself
    assert alone_m["grad_norm"] == pytest.approx(fixed_m["grad_norm"], rel=1e-5)
    worst = max(float((alone_w[k] - fixed_w[k]).abs().max()) for k in fixed_w)
    assert worst < 1e-6


# ------------------------------------------------------------------------------ two ranks
RANK_LENGTHS = ([10, 10, 10, 10], [10, 30, 30, 10])  # budget 40: 1 vs 3 micro-batches


def _split_on_rank(rank: int, world: int, root: str) -> None:
    """One gloo rank: split its own rows with a budget of 40 tokens; record what it got."""
    import json
    import os
    from pathlib import Path

    import torch

    from posttrain.algorithms.base import PADDING_KEY, split_micro_batches

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world
    )
    lengths = RANK_LENGTHS[rank]
    att = torch.tensor([[1] * n + [0] * (30 - n) for n in lengths])
    mask = att[:, 1:].float()
    t = {"input_ids": att * 7, "attention_mask": att, "mask": mask, "adv": mask * 0.5}
    micro = split_micro_batches(t, 4, 40)
    out = [
        {
            "rows": mb["input_ids"].shape[0],
            "width": mb["input_ids"].shape[1],
            "mask_sum": float(mb["mask"].sum()),
            "adv_sum": float(mb["adv"].sum()),
            "padding": PADDING_KEY in mb,
        }
        for mb in micro
    ]
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_two_ranks_run_the_same_number_of_micro_batches(tmp_path):
    """Rank 0 needs one micro-batch, rank 1 three: rank 0 is padded with two zero-weight ones
    (DeepSpeed reduces gradients at every backward, so both ranks must run three)."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_split_on_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert [(m["rows"], m["width"]) for m in r1] == [(1, 30), (1, 30), (2, 10)]
    assert [(m["rows"], m["width"]) for m in r0] == [(4, 10), (1, 2), (1, 2)]
    assert r0[0]["mask_sum"] == 4 * 9 and r0[0]["adv_sum"] == 4 * 9 * 0.5
    assert all(m["mask_sum"] == 0 and m["adv_sum"] == 0 for m in r0[1:])  # zero weight
    assert [m["padding"] for m in r0] == [False, True, True]
    assert not any(m["padding"] for m in r1)
    assert sum(m["mask_sum"] for m in r1) == 29 + 29 + 9 + 9


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_with_a_budget_match_one_rank_fixed(tmp_path, eos_model, zero_stage):
    """3 GRPO steps: 2 ranks (torchrun, gloo, ZeRO) with a budget of 54 tokens train like 1
    rank with fixed micro-batches of 4. The ranks' rows (25-30 tokens) pack into different
    counts of micro-batches on some steps (e.g. 7 vs 5), so the shorter rank runs padding
    micro-batches; a missing backward there would hang or change the gradient."""
    import sys

    from tests.integration.test_distributed import _run
    from tests.tiny_runs import torchrun

    one = _run([sys.executable, "-m", "posttrain.cli"], tmp_path / "one", eos_model, [])
    budget = [f"train.zero_stage={zero_stage}", "train.max_tokens_per_micro_batch=54"]
    two = _run([*torchrun(), "-m", "posttrain.cli"], tmp_path / "two", eos_model, budget)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert sum(r["train/padding_micro_batches"] for r in two) > 0  # the case under test
    assert all(r["train/padding_micro_batches"] == 0 for r in one)
    for a, b in zip(one, two, strict=True):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
