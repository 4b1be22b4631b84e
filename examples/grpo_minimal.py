"""GRPO in one file: the whole algorithm as a plain PyTorch loop (no Trainer, no DeepSpeed).

    python examples/grpo_minimal.py --steps 5 --engine hf optim.lr=1e-3 \
        "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]"

Every step: take P prompts of the built-in arithmetic task, sample G completions of each with the
rollout engine, score them with the rewards library, turn each group's rewards into advantages,
take one AdamW step on the clipped surrogate loss, and push the new weights into the engine.

It reads the Config of `posttrain train` (the arguments after the flags are key=value overrides)
and, for the options it implements (`check_supported`), gives the per-step losses and weights of
`posttrain.trainer.Trainer` on one process, ZeRO-0 (tests/integration/test_grpo_minimal.py). The
Trainer adds multi-GPU and ZeRO-3, LoRA, KL to a reference, dynamic sampling, eval, checkpoints.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from posttrain import losses
from posttrain.advantages import sequence_advantages
from posttrain.algorithms.base import trim_micro_batch
from posttrain.algorithms.online import by_length, sequences_to_tensors
from posttrain.config import Config, load_config
from posttrain.data.chat import encode_prompts
from posttrain.data.pool import PromptPool
from posttrain.data.splits import load_train_eval_rows
from posttrain.data.tensors import chunk_indices
from posttrain.models import load_policy, load_tokenizer, make_tiny
from posttrain.rollout.factory import make_rollout_engine
from posttrain.rollout.source import Sample, step_sampling
from posttrain.runtime.weight_sync import push_weights
from posttrain.trainer import lr_multiplier
from rewards import RewardSpec, score


def check_supported(cfg: Config) -> None:
    """Refuse the options this file leaves out (the Trainer implements them)."""
    r = cfg.rollout
    left_out = {
        "model.dtype (float32 only)": cfg.model.dtype != "float32",
        "model.lora": cfg.model.lora.r > 0,
        "rollout.engine (vllm or hf)": r.engine not in ("vllm", "hf"),
        "train.updates_per_batch > 1": cfg.train.updates_per_batch != 1,
        "kl.coef": cfg.kl.coef != 0,
        "loss.entropy_coef": cfg.loss.entropy_coef != 0,
        "advantage.entropy_modulation": cfg.advantage.entropy_modulation is not None,
        "rollout.filter_zero_variance_groups": r.filter_zero_variance_groups,
        "rollout.overlong_penalty / mask_truncated": r.overlong_penalty or r.mask_truncated,
        "rollout.max_staleness": r.max_staleness > 0,
        "data.stages / rollout.history_resampling": bool(cfg.data.stages) or r.history_resampling,
        "warmup.steps": cfg.warmup.steps > 0,
        "loss.rollout_correction (tis only)": cfg.loss.rollout_correction != "tis",
    }
    if any(left_out.values()):
        names = [k for k, on in left_out.items() if on]
        raise ValueError(f"grpo_minimal.py leaves out {names}; use `posttrain train` for them")


def grpo_loss(cfg: Config, logits: torch.Tensor, mb: dict, denominator: float) -> torch.Tensor:
    """One micro-batch's share of the step's clipped surrogate loss.

    The library's version, with KL and entropy terms, is algorithms/grpo.clipped_policy_loss.
    """
    lc = cfg.loss
    logp = losses.token_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], cfg.rollout.temperature)
    # One update per batch: the data's "old" policy is the current one, so ratio = 1 and its
    # gradient is grad log p (the policy gradient); the clip acts only with several updates.
    logp_old = logp.detach()
    loss_tok, _ = losses.policy_loss(
        logp,
        logp_old,
        mb["adv"],
        mb["mask"],
        clip_low=lc.clip_low,
        clip_high=lc.clip_high,
        dual_clip_c=lc.dual_clip_c,
        ratio_level=lc.ratio_level,
    )
    if lc.tis_cap is not None:  # truncated importance sampling: trainer vs sampler log-probs
        weights, _ = losses.tis_weights(logp_old, mb["logp_roll"], mb["mask"], lc.tis_cap)
        loss_tok = loss_tok * weights
    return losses.aggregate(
        loss_tok, mb["mask"], lc.aggregation, denominator, cfg.rollout.max_new_tokens
    )


def run(overrides: Sequence[str] = (), steps: int | None = None) -> list[float]:
    """Train GRPO for `steps` (default `train.steps`) steps; returns the per-step losses."""
    cfg = load_config(None, [*overrides, *([f"train.steps={steps}"] if steps is not None else [])])
    check_supported(cfg)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_path = cfg.model.path
    if model_path == "tiny":  # the built-in random tiny Qwen2 (as the Trainer makes it)
        out = Path(cfg.train.output_dir) / "tiny-model"
        model_path = str(make_tiny(out, size=cfg.model.tiny_size, seed=cfg.train.seed))

    # The policy, its optimizer and learning-rate schedule (what the Trainer gives DeepSpeed).
    tokenizer = load_tokenizer(model_path)
    policy = load_policy(model_path, dtype=cfg.model.dtype).to(device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        policy.parameters(), o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    kw = {"warmup": o.warmup_steps, "schedule": o.schedule, "min_ratio": o.min_lr_ratio}
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total=cfg.train.steps, **kw)
    )
    # vLLM in this process (new weights are handed over as tensors), or transformers generate()
    engine = make_rollout_engine(cfg, model_path, tokenizer)

    # Prompts (in the Trainer's order: a seeded shuffle per epoch) and rewards.
    col, P, G = cfg.data.prompt_column, cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    rows, _ = load_train_eval_rows(cfg)
    pool = PromptPool(rows, cfg.data.seed)
    specs = [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in cfg.rewards]

    history = []
    for step in range(cfg.train.steps):
        # 1. Generate G completions per prompt (prompt-major: prompt i's are [i*G, (i+1)*G)).
        batch = pool.take(P)
        prompts = [row[col] for row in batch]
        ids = encode_prompts(tokenizer, prompts, cfg.data.system_prompt, cfg.data.max_prompt_tokens)
        rollouts = engine.generate(ids, step_sampling(cfg, step))  # seeded by (seed, step)

        # 2. Score every completion; None = no reward could judge it: left out of the loss.
        per_sample = [batch[i // G] for i in range(P * G)]
        columns = {k: [row[k] for row in per_sample] for k in rows[0] if k != col}
        prompts, texts = [row[col] for row in per_sample], [r.text for r in rollouts]
        result = score(specs, prompts, texts, columns, timeout_s=cfg.reward_timeout_s)
        samples = [Sample(r, x, x is not None) for r, x in zip(rollouts, result.total, strict=True)]

        # 3. Group-relative advantages: (R - mean of the group) / (std of the group + eps).
        rewards = torch.tensor([s.reward or 0.0 for s in samples]).float().view(P, G)
        valid = torch.tensor([s.valid for s in samples]).view(P, G)
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts]).view(P, G)
        a = cfg.advantage
        adv = sequence_advantages(rewards, valid, a.estimator, eps=a.eps, lengths=lengths.float())
        adv = adv.reshape(-1)

        # 4. Tensors: prompt + completion ids; per next-token target a completion mask, the
        # sequence's advantage and the sampler's log-prob. Longest first: less padding per
        # micro-batch. The denominator is the whole step's: micro-batching changes no gradient.
        order = by_length(samples, list(range(P * G)))
        t = sequences_to_tensors([samples[i] for i in order], adv[order], tokenizer.pad_token_id)
        denominator = max(losses.aggregation_denominator(t["mask"], cfg.loss.aggregation), 1.0)

        # 5. Loss and gradient, one micro-batch at a time; clip; AdamW step; schedule.
        step_loss = 0.0
        for idx in chunk_indices(P * G, cfg.train.micro_batch_size_per_device):
            mb = trim_micro_batch({k: v[idx].to(device) for k, v in t.items()})  # cut padding
            logits = policy(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss = grpo_loss(cfg, logits, mb, denominator)
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

        # 6. The engine samples the next step with the new weights.
        push_weights(policy, engine, step + 1)
        history.append(step_loss)
        mean_reward = float(rewards[valid].mean()) if valid.any() else float("nan")
        print(f"step {step + 1}: loss {step_loss:+.6f}  reward/mean {mean_reward:.3f}")
    return history


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Command line: `--steps`, `--model`, `--engine`, then any config overrides."""
    parser = argparse.ArgumentParser(description="GRPO as one plain PyTorch loop.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="tiny", help="model directory, hub name or 'tiny'")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--output-dir", default="runs/grpo-minimal")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    flags = [f"model.path={args.model}", f"rollout.engine={args.engine}"]
    return run([*flags, f"train.output_dir={args.output_dir}", *args.overrides], args.steps)


if __name__ == "__main__":
    main()
