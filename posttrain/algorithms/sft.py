"""Supervised fine-tuning: cross-entropy on completion tokens only (token_mean, global count).

Used on its own (`train.algorithm: sft`) and as the quickstart's warm-up before GRPO.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain.algorithms.base import StepBatch, split_micro_batches
from posttrain.config import Config
from posttrain.data import shapes
from posttrain.data.arithmetic import sft_completion
from posttrain.data.chat import encode_sft
from posttrain.data.packing import (
    encode_messages,
    is_conversation,
    length_order,
    pack_bins,
    packed_rows,
)
from posttrain.data.splits import load_train_eval_rows
from posttrain.data.stream import RowStream
from posttrain.data.tensors import pad_right, shard_for_rank
from posttrain.envs.runs import transcript_rows
from posttrain.errors import ConfigError
from posttrain.models import vlm
from posttrain.models.lean_logprobs import install_lean_forward, output_token_stats
from posttrain.rollout.guide import hint_warmup_rows
from posttrain.runtime import distributed as dist
from posttrain.runtime.data_log import Drawn


def completion_of(row: dict[str, Any], cfg: Config, index: int) -> str:
    """The target completion of a row: its completion column, or the arithmetic answer."""
    col = cfg.data.completion_column
    if col in row and row[col] is not None:
        return str(row[col])
    if cfg.data.source == "arithmetic":
        return sft_completion(row)
    if cfg.data.source == "shapes":  # the answer itself (`data/shapes.py`)
        return shapes.sft_completion(row)
    raise ConfigError(
        f"SFT row {index}: no '{col}' value (data.completion_column) and no conversation in "
        f"data.prompt_column; set data.completion_column to the reply's column (the row has "
        f"{', '.join(sorted(row))})"
    )


def check_rows(rows: list[dict[str, Any]], cfg: Config) -> None:
    """Every row has a target (a completion, or a conversation): fail at start-up, not at the
    step that first draws a bad row."""
    for i, row in enumerate(rows):
        target = row.get(cfg.data.completion_column)
        if target is None and not is_conversation(row.get(cfg.data.prompt_column)):
            completion_of(row, cfg, i)


def encode_row(tokenizer: Any, row: dict[str, Any], cfg: Config, index: int) -> tuple:
    """(input_ids, mask) of one SFT row: a prompt + completion, or a whole conversation.

    A row whose prompt column holds chat messages with assistant turns and that has no
    completion trains on every assistant turn (`data.prompt_column: messages` for such datasets).
    A vision-language model's row gives (input_ids, mask, image inputs) (`models/vlm.py`).
    """
    prompt = row[cfg.data.prompt_column]
    if vlm.processor_of(tokenizer) is not None:
        return vlm.encode_image_sft(tokenizer, row, completion_of(row, cfg, index), cfg)
    if row.get(cfg.data.completion_column) is None and is_conversation(prompt):
        return encode_messages(tokenizer, prompt, cfg.data.system_prompt, row.get("tools"))
    return encode_sft(tokenizer, prompt, completion_of(row, cfg, index), cfg.data.system_prompt)


class SFT:
    """Completion-only cross-entropy.

    Args:
        cfg: run config (`train.sft_batch_size` rows per optimizer step).
        tokenizer: chat-template tokenizer.
        rows: training rows with a prompt column and a completion column.
    """

    rolls_out = False
    evaluates = False  # no held-out metric of its own (a warm-up's RL run evaluates)

    def __init__(self, cfg: Config, tokenizer: Any, rows: list[dict]) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stream = RowStream(rows, seed=cfg.data.seed)
        self.pad_id = int(tokenizer.pad_token_id)

    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Tokenise this step's rows (this rank's shard) into micro-batches."""
        cfg = self.cfg
        rows = self.stream.take(cfg.train.sft_batch_size)
        mine = shard_for_rank(len(rows), dist.rank(), dist.world_size())
        ids, masks, images = [], [], []
        for i in mine:
            row = rows[i]
            x, m, *mm = encode_row(self.tokenizer, row, cfg, i)  # mm: a VLM's image inputs
            ids.append(list(x))
            masks.append(list(m)[1:])
            images.append(mm[0] if mm else None)
        if cfg.sft.group_by_length:
            order = length_order([len(x) for x in ids])
            ids, masks = [ids[j] for j in order], [masks[j] for j in order]
            images = [images[j] for j in order]
        if cfg.sft.packing:
            return self._packed_batch(ids, masks)
        input_ids = pad_right(ids, self.pad_id, torch.long)
        attention = pad_right([[1] * len(x) for x in ids], 0, torch.long)
        mask = pad_right(masks, 0, torch.float)[:, : input_ids.shape[1] - 1]
        tokens = max(dist.all_reduce_sum(float(mask.sum())), 1.0)
        t = {"input_ids": input_ids, "attention_mask": attention, "mask": mask}
        t.update(vlm.image_tensors(images))
        size = cfg.train.micro_batch_size_per_device
        micro = split_micro_batches(t, size, cfg.train.max_tokens_per_micro_batch)
        return StepBatch(micro, {"tokens/trained": tokens}, denominator=tokens, token_total=tokens)

    def _packed_batch(self, ids: list[list[int]], masks: list[list[float]]) -> StepBatch:
        """Pack this rank's samples into rows of `sft.max_length` tokens (see data/packing.py).

        Every rank gets the same number of micro-batches (ZeRO needs matching backward calls);
        a rank with too few rows gets an empty one-token micro-batch (mask 0).
        """
        cfg = self.cfg
        bins = pack_bins([len(x) for x in ids], cfg.sft.max_length)
        tokens = max(dist.all_reduce_sum(float(sum(map(sum, masks)))), 1.0)
        n_micro = _max_over_ranks(math.ceil(len(bins) / cfg.train.micro_batch_size_per_device))
        per = math.ceil(len(bins) / n_micro)
        micro = []
        for k in range(n_micro):
            chunk = bins[k * per : (k + 1) * per]
            if chunk:
                micro.append(packed_rows(ids, masks, chunk, self.pad_id))
            else:
                micro.append(packed_rows([[self.pad_id]], [[]], [[0]], self.pad_id))
        metrics = {"tokens/trained": tokens, "sft/packed_rows": float(len(bins))}
        return StepBatch(micro, metrics, denominator=tokens, token_total=tokens)

    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict]:
        """Share of the token-mean negative log-likelihood (over the step's trained tokens)."""
        logp, _ = output_token_stats(outputs, mb["input_ids"], 1.0)  # lean or full logits
        nll = -(logp * mb["mask"].to(logp.device)).sum() / batch.denominator
        return nll, {}

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Nothing to sync."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        """No held-out metric (`evaluates` is False)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Data position."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the data position."""
        self.stream.load_state_dict(state["stream"])

    def drawn_rows(self) -> Drawn:
        """The rows the last batch drew (`posttrain/runtime/data_log.py`)."""
        return Drawn.of(self.stream.take_drawn())


def _max_over_ranks(n: int) -> int:
    """The largest `n` over all ranks."""
    if not torch.distributed.is_initialized() or dist.world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def build_sft(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> SFT:
    """SFT on the run's training rows (an environment's: its synthetic transcripts)."""
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    if cfg.env.name is not None:
        return SFT(cfg, tokenizer, transcript_rows(cfg))
    train, _ = load_train_eval_rows(cfg)
    check_rows(train, cfg)
    return SFT(cfg, tokenizer, hint_warmup_rows(train, cfg))
