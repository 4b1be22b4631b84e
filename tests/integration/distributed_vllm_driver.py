"""GRPO steps with colocated vLLM on every rank, checking each rank's replica after every sync.

Run alone (`python distributed_vllm_driver.py OUT_DIR overrides...`) or under torchrun; used by
`test_distributed_vllm.py`. After each step (whose last act is the weight sync) every rank samples
its own prompts on its own vLLM replica (not sharded) and compares the sampler's logprobs with the
trainer's recomputed ones; the last step also runs the held-out eval. Writes
`OUT_DIR/rank<r>.json`: one dict of metrics per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from posttrain.config import load_config
from posttrain.data.chat import encode_prompts
from posttrain.data.tensors import pad_right
from posttrain.models.forward import policy_token_stats
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_local import close_live_engines
from posttrain.runtime import distributed as dist
from posttrain.trainer import Trainer

KEYS = (
    "loss",
    "grad_norm",
    "reward/mean",
    "tokens/generated",
    "tis/mismatch_abs_mean",
    "time/generate_s",
    "time/sync_s",
    "time/sync_gather_s",
    "weight_version",
)


def replica_gap(trainer: Trainer, step: int) -> float:
    """Max |vLLM logprob - trainer logprob| over this rank's own samples (sampled tokens)."""
    cfg, rank = trainer.cfg, dist.rank()
    source = trainer.algorithm.source
    replica = getattr(source.engine, "engine", source.engine)  # this rank's own vLLM
    questions = [f"{10 * rank + k}+{step}" for k in range(2)]
    ids = encode_prompts(
        trainer.tokenizer, questions, cfg.data.system_prompt, cfg.data.max_prompt_tokens
    )
    sampling = SamplingConfig(
        n=2, temperature=cfg.rollout.temperature, max_new_tokens=6, seed=1000 * rank + step
    )
    rollouts = replica.generate(ids, sampling)
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    t = {
        "input_ids": pad_right(seqs, source.pad_id, torch.long),
        "attention_mask": pad_right([[1] * len(s) for s in seqs], 0, torch.long),
    }
    # ZeRO-3: this forward is collective; every rank runs it on the same number of rows.
    logp = policy_token_stats(trainer.engine, t, cfg.rollout.temperature, len(seqs))["logp_old"]
    gap = 0.0
    for i, r in enumerate(rollouts):
        start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
        diff = (logp[i, start : start + n] - torch.tensor(r.logprobs)).abs().max()
        gap = max(gap, float(diff))
    return gap


def main(out_dir: str, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides))
    rows = []
    for step in range(trainer.cfg.train.steps):
        metrics = trainer.train_step()
        row = {k: metrics[k] for k in KEYS if k in metrics}
        row["replica_max_abs_diff"] = replica_gap(trainer, step)
        row["world"] = dist.world_size()
        rows.append(row)
    # Held-out eval through the sharded engine (an odd number of problems: uneven blocks).
    rows[-1]["eval"] = trainer.algorithm.evaluate(trainer.step)
    path = Path(out_dir) / f"rank{dist.rank()}.json"
    path.write_text(json.dumps(rows, indent=1))
    close_live_engines()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
