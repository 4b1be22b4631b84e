"""Prompts -> rollout engine -> rewards -> scored groups, plus weight sync and evaluation.

Shared by every algorithm that samples (GRPO family, REBEL, PPO, online DPO). Every rank gets the
same full batch from the same seeds (the `hf` engine generates all of it on every rank; multi-rank
vLLM samples a block of prompts per rank and all-gathers, `posttrain/rollout/sharded.py`) and
trains on its own shard, so a 2-rank run sees exactly the data of a 1-rank run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from posttrain import advantages as adv_fn
from posttrain.config import Config
from posttrain.data.curriculum import PromptSchedule, load_stage_rows
from posttrain.data.tensors import pad_right
from posttrain.errors import ConfigError
from posttrain.eval.evaluate import evaluate, pass_counts
from posttrain.models.forward import policy_token_stats
from posttrain.models.vlm import image_tensors, prompt_inputs
from posttrain.rollout.engine import Rollout, SamplingConfig
from posttrain.rollout.guide import guide_groups, guide_metrics
from posttrain.runtime import distributed as dist
from posttrain.runtime import phase_trace
from posttrain.runtime.data_log import Drawn
from posttrain.runtime.weight_sync import push_adapter, push_weights
from rewards import RewardSpec, score
from rewards.boundary import reward_metrics
from rewards.registry import TOKEN_ENTROPY, required_columns


@dataclass
class Sample:
    """One scored completion.

    Attributes:
        rollout: what the engine produced.
        reward: total reward after shaping, None when no reward could judge it.
        valid: whether the sample counts in the loss (reward known, not masked as truncated).
        hint_prompt_ids: Guide: the hinted prompt the completion was sampled with (the rollout
            holds the unhinted prompt ids it is trained with, and the engine's hinted-context
            log-probs); None for a sample of the plain prompt.
    """

    rollout: Rollout
    reward: float | None
    valid: bool
    hint_prompt_ids: list[int] | None = None


def completion_entropy(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float, micro_size: int
) -> list[float | None]:
    """Each completion's mean token entropy under the current policy (RENT), without grad.

    Args:
        model: the trained policy at the start of the step (the `logp_old` policy).
        rollouts: N sampled completions.
        pad_id: padding token id.
        temperature: the sampler's temperature.
        micro_size: rows per forward pass.

    Returns:
        [N] mean_t H_{i,t} over the completion tokens (the distributions each completion token was
        sampled from); None for an empty completion.
    """
    ids = [r.prompt_ids + r.completion_ids for r in rollouts]
    t = {
        "input_ids": pad_right(ids, pad_id, torch.long),
        "attention_mask": pad_right([[1] * len(x) for x in ids], 0, torch.long),
        **image_tensors([r.images for r in rollouts]),
    }
    entropy = policy_token_stats(model, t, temperature, micro_size)["entropy_old"]  # [N, L-1]
    out: list[float | None] = []
    for i, r in enumerate(rollouts):
        start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
        out.append(float(entropy[i, start : start + n].mean()) if n else None)
    return out


# Guide's hinted generation of round r is seeded as round r + HINT_ROUND would be
HINT_ROUND = 64


def step_sampling(cfg: Config, step: int, round_: int = 0) -> SamplingConfig:
    """The sampling settings of step `step`'s generation round `round_` (dynamic sampling).

    The seed depends only on (train.seed, step, round), so a resumed run, another rank count or
    examples/grpo_minimal.py draws the same completions; prompt i's sample j gets seed + i*G + j.
    """
    r = cfg.rollout
    seed = (cfg.train.seed * 1_000_003 + step * 101 + round_) % (2**31)
    return SamplingConfig(
        n=r.samples_per_prompt,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
    )


class SampleSource(Protocol):
    """What an online algorithm draws its samples from: `RolloutSource`, or `AsyncRolloutSource`
    (async_source.py) which prefetches its batches; a multi-turn episode source is a third kind.
    """

    pad_id: int
    engine: Any

    def collect_groups(
        self, step: int, model: Any = None
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """Step `step`'s `prompts_per_step` scored groups of `samples_per_prompt` samples."""
        ...

    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        """Give the engine the trainer's weights (weight version `version`)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics with the engine's current weights."""
        ...

    def pass_counts(self, n: int) -> list[list[int]] | None:
        """[S][P] correct samples among n per held-out problem and seed (the pass@k curve)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Resumable position."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        ...

    def drawn_rows(self) -> Drawn:
        """The rows the batch of the last `collect_groups` drew (runtime/data_log.py)."""
        ...


class RolloutSource:
    """Owns the prompt stream, the rollout engine and the reward specs of a run.

    Args:
        cfg: run config.
        tokenizer: the policy tokenizer (chat template).
        engine: a RolloutEngine.
        train_rows, eval_rows: dataset rows with a prompt column and reward columns.
        stage_rows: the training rows of each `data.stages` entry (they replace `train_rows`);
            None loads them from the config.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        engine: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
        stage_rows: list[list[dict[str, Any]]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.engine = engine
        if stage_rows is None:
            stage_rows = load_stage_rows(cfg)
        self.stream = PromptSchedule(  # SRPO stages and history resampling
            stage_rows or [train_rows],
            [s.steps for s in cfg.data.stages],
            seed=cfg.data.seed,
            resample=cfg.rollout.history_resampling,
            min_size=cfg.rollout.prompts_per_step,
        )
        self.eval_rows = eval_rows
        self.specs = [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in cfg.rewards]
        self.pad_id = int(tokenizer.pad_token_id)
        self.weight_version = 0
        # RENT-style rewards read the policy's own token entropy as a column.
        self.needs_entropy = any(TOKEN_ENTROPY in required_columns(s.name) for s in self.specs)

    def _score_round(
        self, rows: list[dict[str, Any]], step: int, round_: int, model: Any = None
    ) -> tuple:
        cfg = self.cfg
        ids, image_kw = prompt_inputs(self.tokenizer, rows, cfg)  # a VLM's: images=[...]
        t0 = time.perf_counter()
        with phase_trace.span("generate"):
            rollouts = self.engine.generate(ids, step_sampling(self.cfg, step, round_), **image_kw)
        t1 = time.perf_counter()
        G = cfg.rollout.samples_per_prompt
        with phase_trace.span("reward"):
            result = self._score(rollouts, [rows[i // G] for i in range(len(rollouts))], model)
        t2 = time.perf_counter()
        return rollouts, result, t1 - t0, t2 - t1

    def _score(self, rollouts: list[Rollout], rep: list[dict[str, Any]], model: Any) -> Any:
        """Score each rollout against its row `rep[i]` (the row's unhinted prompt text)."""
        col = self.cfg.data.prompt_column
        columns = {k: [row[k] for row in rep] for k in rep[0] if k != col}
        if self.needs_entropy:
            columns[TOKEN_ENTROPY] = self._entropy_column(model, rollouts)
        return score(
            self.specs,
            [row[col] for row in rep],
            [r.text for r in rollouts],
            columns,
            timeout_s=self.cfg.reward_timeout_s,
        )

    def _guide(
        self,
        groups: list[list[Sample]],
        rows: list[dict[str, Any]],
        step: int,
        round_: int,
        model: Any,
        metrics: dict[str, float],
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """Guide's round over one scored round (`posttrain/rollout/guide.py`): hinted samples
        in place of failed ones in the all-fail groups, with the round's sampling settings."""
        k = self.cfg.guide.replace or self.cfg.rollout.samples_per_prompt
        sampling = dataclasses.replace(step_sampling(self.cfg, step, round_ + HINT_ROUND), n=k)
        timed = {"generate": 0.0, "reward": 0.0}

        def generate(ids: list[list[int]]) -> list[Rollout]:
            t0 = time.perf_counter()
            out = self.engine.generate(ids, sampling)
            timed["generate"] += time.perf_counter() - t0
            return out

        def score_rows(rollouts: list[Rollout], rep: list[dict[str, Any]]) -> list[Sample]:
            t0 = time.perf_counter()
            out = self._shape(rollouts, self._score(rollouts, rep, model).total)
            timed["reward"] += time.perf_counter() - t0
            return out

        out, stats = guide_groups(self.cfg, self.tokenizer, groups, rows, generate, score_rows)
        metrics["time/generate_s"] += timed["generate"]
        metrics["time/reward_s"] += timed["reward"]
        return out, stats

    def _entropy_column(self, model: Any, rollouts: list[Rollout]) -> list[float | None]:
        """The `token_entropy` column: each completion's mean token entropy under `model`."""
        if model is None:
            raise ConfigError(
                f"a reward needs the {TOKEN_ENTROPY!r} column (the policy's token entropy, e.g. "
                "neg_entropy), but this algorithm does not pass its model to collect_groups; "
                "use train.algorithm=grpo or rebel"
            )
        cfg = self.cfg
        return completion_entropy(
            model,
            rollouts,
            self.pad_id,
            cfg.rollout.temperature,
            cfg.train.micro_batch_size_per_device,
        )

    def collect_groups(
        self, step: int, model: Any = None
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """Generate and score until `prompts_per_step` groups are ready (dynamic sampling).

        Args:
            step: the optimizer-step batch index (seeds the sampling).
            model: the trained policy as it is now; needed only by rewards that read the
                policy's token entropy (`token_entropy` column, e.g. neg_entropy).
        """
        r = self.cfg.rollout
        G = r.samples_per_prompt
        kept: list[list[Sample]] = []
        dropped: list[list[Sample]] = []
        metrics: dict[str, float] = {"time/generate_s": 0.0, "time/reward_s": 0.0}
        all_samples: list[Sample] = []
        reward_stats: list[dict[str, float]] = []
        rounds = 0
        guide_totals: dict[str, float] = {}
        self.stream.set_step(step)
        while len(kept) < r.prompts_per_step and rounds < max(1, r.max_generation_rounds):
            need = r.prompts_per_step - len(kept)
            indices = self.stream.take_indices(need)
            rows = [self.stream.rows[i] for i in indices]
            rollouts, result, t_gen, t_rew = self._score_round(rows, step, rounds, model)
            rounds += 1
            metrics["time/generate_s"] += t_gen
            metrics["time/reward_s"] += t_rew
            stats = reward_metrics(result)
            correct = result.per_reward.get(self.cfg.eval.reward)
            self.stream.record(indices, correct)
            if correct is not None:
                judged = [v for v in correct if v is not None]
                stats["accuracy"] = sum(v >= 1.0 for v in judged) / max(len(judged), 1)
            reward_stats.append(stats)
            samples = self._shape(rollouts, result.total)
            all_samples.extend(samples)
            groups_now = [samples[g * G : (g + 1) * G] for g in range(need)]
            groups_now, guided = self._guide(groups_now, rows, step, rounds - 1, model, metrics)
            for key, value in guided.items():
                guide_totals[key] = guide_totals.get(key, 0.0) + value
            informative = _informative(groups_now) if r.filter_zero_variance_groups else None
            for g, group in enumerate(groups_now):
                if informative is not None and not informative[g]:
                    dropped.append(group)
                else:
                    kept.append(group)
            if not r.filter_zero_variance_groups:
                break
        groups = kept + dropped[: r.prompts_per_step - len(kept)]
        metrics.update(rollout_metrics(all_samples, reward_stats, self.cfg))
        metrics["sampling/rounds"] = float(rounds)
        metrics["sampling/dropped_groups"] = float(len(dropped))
        metrics["sampling/filled_uninformative_groups"] = float(max(0, len(groups) - len(kept)))
        metrics.update(guide_metrics(guide_totals, self.cfg.guide.enabled))
        metrics.update(self.stream.metrics())
        return groups, metrics

    def _shape(self, rollouts: list[Rollout], totals: list[float | None]) -> list[Sample]:
        """Apply overlong shaping/masking; a None reward makes the sample invalid."""
        r = self.cfg.rollout
        out = []
        lengths = torch.tensor([len(x.completion_ids) for x in rollouts], dtype=torch.float)
        penalty = (  # only when on: overlong_buffer is checked against max_new_tokens only then
            adv_fn.overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer)
            if r.overlong_penalty
            else None
        )
        for i, (ro, total) in enumerate(zip(rollouts, totals, strict=True)):
            reward = total
            if reward is not None and penalty is not None:
                reward = reward + float(penalty[i])
            truncated = ro.finish_reason == "length"
            valid = reward is not None and not (r.mask_truncated and truncated)
            out.append(Sample(ro, reward, valid))
        return out

    # ----------------------------------------------------------- weights
    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        """Stream the trainer's current weights into the rollout engine (every rank calls this).

        ZeRO-3 parameters are gathered a bounded bucket at a time (`posttrain.runtime.weight_sync`);
        with `model.lora.sync: adapter` only the LoRA matrices are gathered and sent.
        """
        if self.cfg.model.lora.sync == "adapter":
            metrics = push_adapter(model, self.engine, version)
        else:
            metrics = push_weights(model, self.engine, version)
        self.weight_version = version
        return {**metrics, "weight_version": float(version)}

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (greedy and avg@k) with the engine's current weights."""
        return evaluate(self.engine, self.tokenizer, self.eval_rows, self.cfg)

    def pass_counts(self, n: int) -> list[list[int]] | None:
        """[S][P] correct samples among n per held-out problem and seed, current weights."""
        return pass_counts(self.engine, self.tokenizer, self.eval_rows, self.cfg, n)

    def state_dict(self) -> dict[str, Any]:
        """Resumable position."""
        return {"stream": self.stream.state_dict(), "weight_version": self.weight_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore position and version."""
        self.stream.load_state_dict(state["stream"])
        self.weight_version = int(state["weight_version"])

    def drawn_rows(self) -> Drawn:
        """The prompts drawn since the last call: the last `collect_groups`' (all its rounds)."""
        pairs = [(i, d) for i, pool in enumerate(self.stream.pools) for d in pool.take_drawn()]
        stage = pairs[0][0] if pairs and self.stream.staged else None
        return Drawn.of([d for _, d in pairs], stage)


def _informative(groups: list[list[Sample]]) -> list[bool]:
    """Per group: >= 2 valid samples with differing rewards (DAPO's dynamic-sampling rule)."""
    rewards = torch.tensor([[s.reward if s.valid else 0.0 for s in g] for g in groups])
    valid = torch.tensor([[s.valid for s in g] for g in groups])
    return adv_fn.filter_zero_variance_groups(rewards.double(), valid).tolist()


def rollout_metrics(
    samples: list[Sample], reward_stats: list[dict[str, float]], cfg: Config
) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in samples if s.reward is not None])
    lengths = torch.tensor([len(s.rollout.completion_ids) for s in samples], dtype=torch.float)
    out = dict(reward_stats[-1]) if reward_stats else {}
    for stats in reward_stats[:-1]:  # error counts add up over dynamic-sampling rounds
        for key, value in stats.items():
            if "/errors/" in key or key == "reward/masked_count":
                out[key] = out.get(key, 0.0) + value
    out["reward/mean"] = float(rewards.mean()) if rewards.numel() else float("nan")
    out["reward/std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
    out["samples/masked"] = float(sum(not s.valid for s in samples))
    out["samples/reward_none"] = float(sum(s.reward is None for s in samples))
    out["samples/truncated"] = float(sum(s.rollout.finish_reason == "length" for s in samples))
    out["response_length/mean"] = float(lengths.mean()) if lengths.numel() else 0.0
    out["response_length/max"] = float(lengths.max()) if lengths.numel() else 0.0
    out["tokens/generated"] = float(lengths.sum())
    if dist.world_size() > 1:
        out["ranks"] = float(dist.world_size())
    return out
