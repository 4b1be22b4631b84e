"""Micro-batch invariance through the real Trainer: one GRPO step of 16 sequences on one rank,
as 1 micro-batch of 16 and as 16 micro-batches of 1, gives the same loss, gradient norm and
weights for every `loss.aggregation` mode (the README's "1 x 16 == 16 x 1")."""

from __future__ import annotations

import itertools

import pytest

from posttrain.losses import AGGREGATION_MODES
from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

STEP = (
    "rollout.engine=hf",
    "train.steps=1",
    "train.save_every=0",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",  # 16 sequences on the one rank
    "rollout.max_new_tokens=6",
    "eval.num_problems=0",
    # answers of 1-3 characters after the warm-up: about half get the reward
    "rewards=[{name: length_in_range, kwargs: {max_chars: 2}}]",
    # Adam's first step is lr * g / (|g| + eps): with eps = 1 it is ~ lr * g, so the weights
    # compare gradients, not the signs of near-zero gradient entries.
    "optim.eps=1.0",
    "optim.lr=0.1",
    "optim.warmup_steps=0",
)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, eos_model):
    """(aggregation, micro-batch size) -> (the step's metrics, the weights after it); cached."""
    done: dict[tuple[str, int], tuple[dict, dict]] = {}

    def run(aggregation: str, micro: int) -> tuple[dict, dict]:
        if (aggregation, micro) not in done:
            out = tmp_path_factory.mktemp(f"{aggregation}-mb{micro}")
            cfg = tiny_cfg(
                out,
                eos_model,
                *STEP,
                f"loss.aggregation={aggregation}",
                f"train.micro_batch_size_per_device={micro}",
            )
            trainer = Trainer(cfg)
            [metrics] = trainer.train()
            state = trainer.engine.module.state_dict()
            done[aggregation, micro] = metrics, {k: v.detach().clone() for k, v in state.items()}
        return done[aggregation, micro]

    return run


@pytest.mark.parametrize("aggregation", AGGREGATION_MODES)
def test_one_micro_batch_of_16_equals_16_of_1(one_step, eos_model, aggregation):
    from safetensors.torch import load_file

    m16, w16 = one_step(aggregation, 16)
    m1, w1 = one_step(aggregation, 1)
    # the same seed gave the same rollouts and rewards, so the same step was trained twice
    for key in ("reward/mean", "response_length/mean", "response_length/max"):
        assert m1[key] == m16[key], key
    assert m16["response_length/mean"] < m16["response_length/max"]  # lengths differ
    assert 0 < m16["reward/mean"] < 1  # advantages are not all zero
    assert m16["grad_norm"] > 1e-3  # a real gradient to compare
    assert m1["loss"] == pytest.approx(m16["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m16["grad_norm"], rel=1e-5)
    initial = load_file(str(eos_model / "model.safetensors"))
    assert set(w1) == set(w16) >= set(initial)
    worst = max(float((w1[k] - w16[k]).abs().max()) for k in w16)
    moved = max(float((w16[k] - initial[k]).abs().max()) for k in initial)
    assert worst < 1e-6, f"max |w(1 x 16) - w(16 x 1)| = {worst:.2e}"
    assert moved > 1e-4  # the step really changed the weights


def test_the_aggregation_modes_give_different_steps(one_step):
    """The invariance above is not one mode three times: on this batch each mode's gradient is
    its own (token_mean weighs long completions more, seq_mean_token_mean all equally, ...)."""
    norms = {mode: one_step(mode, 16)[0]["grad_norm"] for mode in AGGREGATION_MODES}
    assert set(norms) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}
    values = sorted(norms.values())
    assert all(b - a > 1e-3 * b for a, b in itertools.pairwise(values)), norms
