"""`EpisodeSource`: the rollout source of multi-turn environments (`env.name` in the config).

It is a `RolloutSource` (same prompt stream, rewards, weight sync and resumable state) whose
samples are whole episodes: G episodes per dataset row, each one `Sample` whose completion is
every token after the prompt (sampled turns with loss mask 1, observations with mask 0). So the
GRPO family, RLOO and the other online algorithms train on episodes unchanged: the group of an
episode is the G episodes of its task.

Episode reward = the environment's `final_reward()` (or, where it returns None, the configured
`rewards` on the final assistant turn) + the per-turn rewards it gave; None when the environment
raised (the episode is masked and counted).

Under torchrun with a vLLM replica per rank or vLLM servers (`EpisodeShards`,
posttrain/rollout/sharded.py) each rank plays and scores the G episodes of its own block of the
step's tasks, every turn seeded as one engine would seed it, and the scored groups are gathered:
every rank returns the whole step, the same as one rank would, and trains on its shard. With the
`hf` engine (no per-prompt seeds) every rank plays every episode, as it generates every
single-turn completion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from posttrain.config import Config
from posttrain.envs.base import Environment, episode_solved
from posttrain.errors import RolloutError
from posttrain.rollout.episodes import (
    Episode,
    EpisodeLimits,
    episode_metrics,
    episode_rollout,
    run_episodes,
)
from posttrain.rollout.sharded import EpisodeShards
from posttrain.rollout.source import RolloutSource, Sample, rollout_metrics, step_sampling
from posttrain.runtime import distributed as dist
from posttrain.runtime import phase_trace
from rewards import score

TRANSCRIPTS_PER_EVAL = 4


def episode_limits(cfg: Config) -> EpisodeLimits:
    """The `env.*` limits, with `rollout.max_new_tokens` tokens per turn."""
    e = cfg.env
    return EpisodeLimits(
        e.max_turns,
        e.max_episode_tokens,
        cfg.rollout.max_new_tokens,
        e.step_timeout_s,
        e.observation_render,
    )


class EpisodeSource(RolloutSource):
    """Prompts -> G episodes each -> scored groups, for the online algorithms.

    Args:
        cfg: run config (`env.*`, `rollout.*`, `rewards`).
        tokenizer: the policy tokenizer (chat template).
        engine: a RolloutEngine.
        train_rows, eval_rows: the environment's task rows.
        env_factory: makes one fresh environment per episode.
        shards: how the ranks split the episodes (None: this rank plays all of them).
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        engine: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
        env_factory: Callable[[], Environment],
        shards: EpisodeShards | None = None,
    ) -> None:
        super().__init__(cfg, tokenizer, engine, train_rows, eval_rows, stage_rows=[])
        self.env_factory = env_factory
        self.shards = shards
        self.limits = episode_limits(cfg)
        self.evals = 0
        self.clock = {"env_s": 0.0}

    def _block(self, n: int) -> tuple[int, int]:
        """[start, stop) of the n tasks this rank plays."""
        return (0, n) if self.shards is None else self.shards.bounds(n)

    def _play(self, rows: list[dict[str, Any]], sampling: Any) -> tuple[list[Episode], list]:
        """Play one episode per row; their rewards (None: masked).

        Sharded, `rows` must be this rank's block (`_block`), every rank calls this together,
        the results are then combined with `_gather`, and a failure of any rank's episodes or
        rewards raises on every rank.
        """

        self.clock = {"env_s": 0.0}  # this call's environment wall time (rank-local)

        def run(engine: Any) -> tuple[list[Episode], list]:
            eps = run_episodes(
                rows,
                self.env_factory,
                engine,
                self.tokenizer,
                sampling,
                self.limits,
                self.cfg.env.tool_parser,
                self.clock,
            )
            return eps, self._rewards(rows, eps)

        return run(self.engine) if self.shards is None else self.shards.play(run)

    def _gather(
        self, eps: list[Episode], rewards: list, samples: list[Sample], n: int
    ) -> tuple[list[Episode], list, list[Sample]]:
        """Every rank's episodes (without their environments), rewards and samples of its block
        of n tasks, in task order; each sample's `prompt_index` made the task's index."""
        if self.shards is None:
            return eps, rewards, samples
        light = [replace(ep, env=None) for ep in eps]  # environments stay where they ran
        all_eps: list[Episode] = []
        all_rewards: list = []
        all_samples: list[Sample] = []
        for start, (e, r, s) in self.shards.gather((light, rewards, samples), n):
            for sample in s:
                sample.rollout.prompt_index += start
            all_eps += e
            all_rewards += r
            all_samples += s
        return all_eps, all_rewards, all_samples

    def _rewards(self, rows: list[dict[str, Any]], eps: list[Episode]) -> list[float | None]:
        """Final reward (environment, else the `rewards` on the final turn) + turn rewards."""
        finals: list[float | None] = [None] * len(eps)
        need = []
        for i, ep in enumerate(eps):
            if ep.end not in ("env_error", "env_timeout"):
                finals[i] = ep.env.final_reward()
                if finals[i] is None:
                    need.append(i)
        if need and not self.specs:
            raise RolloutError(
                f"env {self.cfg.env.name!r}: final_reward() returned None (score the final turn "
                "with the configured rewards) but `rewards` is empty; configure a reward or "
                "return a number from final_reward()"
            )
        if need:
            col = self.cfg.data.prompt_column
            picked = [rows[i] for i in need]
            columns = {k: [row.get(k) for row in picked] for k in picked[0] if k != col}
            result = score(
                self.specs,
                [row.get(col) for row in picked],
                [eps[i].final_text for i in need],
                columns,
                timeout_s=self.cfg.reward_timeout_s,
            )
            for i, total in zip(need, result.total, strict=True):
                finals[i] = total
        out: list[float | None] = []
        for ep, final in zip(eps, finals, strict=True):
            bonus = sum(r for r in ep.turn_rewards if r is not None)
            out.append(None if final is None else final + bonus)
            ep.solved = episode_solved(ep.env, out[-1])
        return out

    def collect_groups(
        self, step: int, model: Any = None
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """Step `step`'s `prompts_per_step` tasks x `samples_per_prompt` episodes, scored."""
        r = self.cfg.rollout
        G = r.samples_per_prompt
        self.stream.set_step(step)
        indices = self.stream.take_indices(r.prompts_per_step)
        start, stop = self._block(len(indices))
        rows = [self.stream.rows[i] for i in indices[start:stop] for _ in range(G)]
        t0 = time.perf_counter()
        with phase_trace.span("generate"):  # POSTTRAIN_PHASE_TRACE (opt-in)
            eps, rewards = self._play(rows, step_sampling(self.cfg, step))
        elapsed = time.perf_counter() - t0
        samples = [
            Sample(episode_rollout(ep, i // G), rew, rew is not None)
            for i, (ep, rew) in enumerate(zip(eps, rewards, strict=True))
        ]
        played, env_s = len(eps), self.clock["env_s"]  # this rank's wall time
        eps, rewards, samples = self._gather(eps, rewards, samples, len(indices))
        success = [None if ep.solved is None else float(ep.solved) for ep in eps]
        self.stream.record(indices, success)
        judged = [v for v in success if v is not None]
        stats = {"accuracy": sum(judged) / max(len(judged), 1)}
        metrics = rollout_metrics(samples, [stats], self.cfg)
        metrics.update(episode_metrics(eps))
        metrics["time/generate_s"] = elapsed - env_s
        metrics["time/env_s"] = env_s
        if self.shards is not None:
            metrics["agent/rank_episodes"] = float(played)  # this rank's block (rank 0's logged)
        metrics.update(self.stream.metrics())
        return [samples[g * G : (g + 1) * G] for g in range(len(indices))], metrics

    def evaluate(self) -> dict[str, float]:
        """Greedy episodes on the held-out tasks: success, mean reward, turns, tool validity."""
        rows = self.eval_rows[: self.cfg.eval.num_problems]
        if not rows:
            return {}
        greedy = replace(step_sampling(self.cfg, 0), temperature=0.0, seed=None)
        start, stop = self._block(len(rows))
        eps, rewards = self._play(rows[start:stop], greedy)
        eps, rewards, _ = self._gather(eps, rewards, [], len(rows))
        judged = [v for v in rewards if v is not None]
        m = episode_metrics(eps)
        out = {
            "eval/greedy_acc": sum(bool(ep.solved) for ep in eps) / len(rows),
            "eval/greedy_reward_mean": sum(judged) / len(rows),
            "eval/turns_mean": m["agent/turns_mean"],
        }
        if "agent/tool_calls/valid_frac" in m:  # absent where no tool was called
            out["eval/tool_calls_valid_frac"] = m["agent/tool_calls/valid_frac"]
        self._write_transcripts(eps[:TRANSCRIPTS_PER_EVAL], rewards)
        if self.cfg.eval.k >= 1 and self.cfg.eval.seeds:
            out.update(self._sampled_eval(rows, self.cfg.eval.k))
        return out

    def pass_counts(self, n: int) -> list[list[int]] | None:
        """None: the pass@k curve scores single-turn answers, not multi-turn episodes."""
        return None

    def _sampled_eval(self, rows: list[dict[str, Any]], k: int) -> dict[str, float]:
        """k episodes per held-out task at `eval.temperature` (seed `eval.seeds[0]`): the policy's
        success as it samples (`eval/avg@k`) and the share of tasks solved at least once."""
        e = self.cfg.eval
        sampling = replace(
            step_sampling(self.cfg, 0), temperature=e.temperature, top_p=e.top_p, seed=e.seeds[0]
        )
        start, stop = self._block(len(rows))
        eps, rewards = self._play([row for row in rows[start:stop] for _ in range(k)], sampling)
        eps, rewards, _ = self._gather(eps, rewards, [], len(rows))
        solved = [bool(ep.solved) for ep in eps]
        tasks = [solved[i * k : (i + 1) * k] for i in range(len(rows))]
        return {
            f"eval/avg@{k}": sum(solved) / len(solved),
            f"eval/pass@{k}": sum(any(t) for t in tasks) / len(tasks),
            "eval/sampled_turns_mean": episode_metrics(eps)["agent/turns_mean"],
        }

    def _write_transcripts(self, eps: list[Episode], rewards: list[float | None]) -> None:
        """A few evaluated conversations under `<output_dir>/transcripts/` (rank 0)."""
        self.evals += 1
        if not dist.is_main():
            return
        out = Path(self.cfg.train.output_dir) / "transcripts"
        out.mkdir(parents=True, exist_ok=True)
        doc = [
            {"reward": rew, "end": ep.end, "messages": ep.messages}
            for ep, rew in zip(eps, rewards, strict=False)
        ]
        path = out / f"eval-{self.evals:03d}.json"
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))

    def state_dict(self) -> dict[str, Any]:
        """Resumable position, and how many evaluations wrote transcripts."""
        return {**super().state_dict(), "evals": self.evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore position, version and the transcript count."""
        super().load_state_dict(state)
        self.evals = int(state.get("evals", 0))
