"""Shared settings for the short training runs that integration tests make on the tiny model."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from posttrain.config import Config, load_config

# 2 GRPO steps of 4 prompts x 4 samples, no warm-up, no eval, wandb off. Random weights never
# answer right, but completion lengths vary, so `length_in_range` gives real advantages.
TINY_RUN = (
    "train.steps=2",
    "train.micro_batch_size_per_device=8",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=6",
    "data.train_size=64",
    "data.eval_size=8",
    "data.max_prompt_tokens=32",
    "eval.num_problems=0",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.progress=false",
    "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
)


# recipes/quickstart.yaml cut to seconds (the recipe's vLLM engine): what the quickstart tests run
REDUCED_QUICKSTART = (
    "warmup.steps=20",
    "train.steps=2",
    "rollout.prompts_per_step=4",
    "train.micro_batch_size_per_device=32",
    "eval.num_problems=16",
    "eval.seeds=[0,1]",
)


# a shipped recipe's short run on the tiny model (with model.path and train.output_dir)
RECIPE_SHORT_RUN = (
    "warmup.steps=2",
    "train.steps=2",
    "train.eval_every=0",
    "data.train_size=64",
    "data.eval_size=4",
    "eval.num_problems=4",
    "eval.seeds=[0]",
    "log.wandb=disabled",
    "log.progress=false",
)

# recipes/sft_tiny.yaml at test size (prepend train.steps / train.save_every)
SFT_SMALL = (
    "train.sft_batch_size=8",
    "train.micro_batch_size_per_device=4",
    "sft.packing=false",
    "data.train_size=64",
    "data.eval_size=8",
    "optim.warmup_steps=0",
    "log.wandb=disabled",
    "log.progress=false",
)


def tiny_cfg(out: Path, model: Path, *extra: str) -> Config:
    """`TINY_RUN` on `model` writing to `out`; `extra` overrides win."""
    return load_config(None, [f"model.path={model}", f"train.output_dir={out}", *TINY_RUN, *extra])


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (e.g. a run's metrics.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(nproc: int = 2) -> list[str]:
    """A `torchrun` command prefix for `nproc` local processes on a free rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
    ]
