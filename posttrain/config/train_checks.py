"""Checks of the training loop's keys (`train`, `warmup`): each raises one `ConfigError` line
naming the field and what would be valid. Called by `checks.validate`."""

from __future__ import annotations

from posttrain.config.schema import Config
from posttrain.errors import require as _check


def validate_train(cfg: Config) -> None:
    """The loop's own keys (steps, batch shape, ZeRO stage and offload, timeouts, checkpoints,
    early stop) and the SFT warm-up's."""
    w = cfg.warmup
    _check(
        w.train_size is None or w.train_size >= 1,
        f"warmup.train_size={w.train_size} must be >= 1 (rows), or null (all of data.train_size)",
    )
    _check(
        w.stop_loss is None or w.stop_loss > 0,
        f"warmup.stop_loss={w.stop_loss} must be > 0 (a loss), or null (run all warmup.steps)",
    )
    t = cfg.train
    _check(t.steps >= 0, "train.steps must be >= 0")
    _check(t.micro_batch_size_per_device >= 1, "train.micro_batch_size_per_device must be >= 1")
    _check(t.updates_per_batch >= 1, "train.updates_per_batch must be >= 1")
    _check(
        t.logprob_chunk_tokens >= 0,
        f"train.logprob_chunk_tokens={t.logprob_chunk_tokens} must be >= 0 (0 = full logits)",
    )
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
    _check(t.dist_timeout_s > 0, "train.dist_timeout_s must be > 0 (seconds)")
    _check(t.save_every >= 0, "train.save_every must be >= 0 (steps; 0 = only the final)")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 = keep all)")
    _check(t.phase_timeout_s >= 0, "train.phase_timeout_s must be >= 0 (seconds; 0 = no limit)")
    _check(
        t.preempt_grace_s >= 0,
        f"train.preempt_grace_s={t.preempt_grace_s} must be >= 0 "
        "(seconds; 0 = no SIGTERM handling)",
    )
    _check(
        t.max_bad_steps >= 0,
        f"train.max_bad_steps={t.max_bad_steps} must be >= 0 "
        "(NaN/inf steps skipped in a row; 0 = stop at the first)",
    )
    _check(
        t.stop_loss is None or (t.stop_loss > 0 and t.algorithm == "sft"),
        f"train.stop_loss={t.stop_loss} must be > 0 and is for train.algorithm=sft only "
        "(the warm-up's is warmup.stop_loss), or null",
    )
    _check(
        not t.offload_optimizer or t.zero_stage >= 1,
        f"train.offload_optimizer needs train.zero_stage 1, 2 or 3 (got {t.zero_stage})",
    )
    _check(
        not t.offload_params or t.zero_stage == 3,
        f"train.offload_params needs train.zero_stage=3 (got {t.zero_stage})",
    )
    _validate_token_budget(cfg)


# algorithms whose micro-batches are independent rows (posttrain/algorithms/base.py
# split_micro_batches); DPO/online DPO/REBEL/reward_model keep pairs or groups together
TOKEN_BUDGET_ALGORITHMS = ("grpo", "ppo", "sft")


def _validate_token_budget(cfg: Config) -> None:
    """`train.max_tokens_per_micro_batch`: >= 1, on an algorithm that packs by tokens."""
    budget, algo = cfg.train.max_tokens_per_micro_batch, cfg.train.algorithm
    if budget is None:
        return
    _check(
        budget >= 1,
        f"train.max_tokens_per_micro_batch={budget} must be >= 1 (tokens), or null",
    )
    _check(
        algo in TOKEN_BUDGET_ALGORITHMS,
        f"train.max_tokens_per_micro_batch is supported for train.algorithm "
        f"{', '.join(TOKEN_BUDGET_ALGORITHMS)}, not {algo}: set it to null "
        "(micro-batches of train.micro_batch_size_per_device)",
    )
    sft_runs = algo == "sft" or cfg.warmup.steps > 0  # the SFT warm-up inherits `train`
    _check(
        not (sft_runs and cfg.sft.packing),
        "train.max_tokens_per_micro_batch does not apply to SFT with sft.packing=true (rows "
        "are packed to sft.max_length tokens): set one of them off",
    )
