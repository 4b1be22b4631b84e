"""Multi-turn GRPO step benchmark on the offline `bench` model, against a single-turn step.

Shape (the issue's): 8 tasks x 8 episodes x 4 assistant turns of 32 sampled tokens (128 sampled
tokens per episode), against the single-turn step of `grpo_step.py`: 8 prompts x 8 samples x 128
sampled tokens. Both sample exactly the same number of tokens, so the step-time ratio is the
overhead of turns.

Controlled comparison:
- Environment: `FixedTurnsEnv` (defined here): no tools, the arithmetic prompt as the first user
  message, then the same short user observation after every turn, for exactly `--turns` turns.
  (The built-in environments end an episode of a randomly initialised model after one turn.)
- Lengths: the random bench model rarely samples its end-of-turn token, and a turn that hits the
  per-turn limit ends its episode. So every request of both steps gets `min_tokens = max - 1` and a
  large logit bias on the end-of-turn token (through a proxy of the engine's `vllm.LLM`; the rest
  of `VLLMEngine` runs unchanged): every turn is exactly 32 tokens ending with `<|im_end|>`, every
  single-turn completion exactly 128. (The biased token's logprob is ~0 in vLLM but not in the
  trainer: it only moves the TIS metrics, not the time.)
- Same process, same engine, same policy: one `Trainer` (multi-turn config) and a second,
  single-turn `RolloutSource` on its engine; the steps alternate single/multi in ABBA order after
  one warm-up step each, and every pair sees the same prompts (each source's own prompt stream).
  The ratio is taken per pair, so machine-load drift cancels.

Phases (seconds; the trainer's `time/train_s`, `time/sync_s`, `time/logprob_s`, `time/step_s`, the
episode source's `time/generate_s`, `time/env_s` and `agent/tool_seconds`, and wall times measured
here by wrapping the engine's `generate` and posttrain.rollout.episodes' per-turn helpers):
  generate      the engine's `generate` calls (4 per multi-turn step, 1 per single-turn step)
  env answers   `_answer_all`: tool-call parsing + `env.step` of every episode, in threads (wall)
  tools         tool time inside the environments (`agent/tool_seconds`)
  templates     chat-template rendering: prompts (`_start`) and observation ids per turn
  reward        scoring the final answers with the `rewards` registry
  rollout other the rest of `collect_groups` (turn bookkeeping, decoding, metrics)
  batch other   the rest of `make_batch` (advantages, tensors, micro-batches)
  logprob, train, sync, other (the rest of the step), step
Also per step: sampled and observation tokens, engine calls, the token ids sent to the engine
(`context_tokens`), how many of them vLLM's prefix cache served and how many it prefilled, and
the trained tokens. Ratios (paired, min / median / max): multi/single step time per sampled token
(the issue's target: <= 1.3), generate, train, and a "token floor": the ratio if the multi-turn
step cost only its extra tokens at the single-turn step's per-token rates: the observations
trained on (they are in every sequence) and generated free (the floor) or at the decode rate
(prefill on this CPU costs about half a decoded token, so the truth lies between).

Usage:
    .venv/bin/python benchmarks/episode_step.py [--steps 4] [--turns 4] [--turn-tokens 32]
        [--vllm-block-size N] [--role-tokens] [--threads default]
        [--out benchmarks/results/episode_step.json]

`--steps N`: N steps of each kind, the first of each a warm-up (4 -> 3 measured pairs). Unlike
grpo_step.py everything runs in this process (one vLLM engine). Timings on a shared CPU are
noisy: each step row records the load average; prefer the paired ratios to absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the sibling benchmark (this script's directory is on sys.path when it runs)
from grpo_step import (
    PROMPTS,
    SAMPLES,
    _shape_of,
    apply_threads,
    count_params,
    machine_info,
    matmul_gflops,
    say,
    stats,
    step_overrides,
)
from role_tokens import add_role_tokens, tokens_per_observation

from posttrain.envs.base import StepResult, Turn

TASKS, EPISODES = PROMPTS, SAMPLES  # grpo_step's shape (its step_overrides)
TURNS, TURN_TOKENS = 4, 32
OBSERVATION = "ok"  # the environment's reply after every turn
EOS_BIAS = 50.0  # logit bias on the end-of-turn token once `min_tokens` are sampled
TARGET_RATIO = 1.3  # multi-turn step time per sampled token / single-turn's (the issue's)
MICRO_BATCH = 16  # grpo_step's fastest micro-batch size on this CPU
# ~50% of random completions end with a character in '!'..'O': non-zero advantages in both modes
REWARDS = r"rewards=[{name: regex_match, kwargs: {pattern: '[!-O]\s*$'}}]"
MODES = ("single", "multi")
NOISE_MARGIN = 0.95  # a ratio under this share of its token floor is flagged as load noise


class FixedTurnsEnv:
    """A benchmark environment: the task's prompt, then `observation` after every turn.

    It never ends an episode itself, so each one runs exactly `env.max_turns` turns (when every
    turn ends with the end-of-turn token). No tools; the final answer is scored by `rewards`.

    Args:
        observation: the user message sent after each assistant turn.
    """

    def __init__(self, observation: str = OBSERVATION) -> None:
        self.observation = observation
        self.tools: list[Any] = []

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The task's prompt as the first user message."""
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, turn: Turn) -> StepResult:
        """The same short user observation, whatever the turn said."""
        return StepResult(messages=[{"role": "user", "content": self.observation}])

    def final_reward(self) -> float | None:
        """None: the final answer is scored by the configured `rewards`."""
        return None


class ForcedLengthLLM:
    """A proxy of a `vllm.LLM` whose `generate` samples exactly `max_tokens` tokens per request,
    the last one the end-of-turn token (`min_tokens = max_tokens - 1` plus a logit bias on it).

    Args:
        llm: the engine's `vllm.LLM` (every other attribute is passed through).
        eos_id: the end-of-turn token id.
    """

    def __init__(self, llm: Any, eos_id: int) -> None:
        self._llm = llm
        self._eos_id = eos_id
        self.cached_tokens = 0  # prompt tokens vLLM's prefix cache served (all calls so far)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompts: list[Any], params: Any, **kwargs: Any) -> Any:
        """`LLM.generate` with every SamplingParams forced to its full length."""
        many = params if isinstance(params, list) else [params] * len(prompts)
        forced = []
        for p in many:
            q = p.clone()
            q.min_tokens = max(q.max_tokens - 1, 0)
            q.logit_bias = {self._eos_id: EOS_BIAS}
            forced.append(q)
        outputs = self._llm.generate(prompts, forced, **kwargs)
        self.cached_tokens += sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outputs)
        return outputs


class PhaseClock:
    """Wall seconds (and call counts) of wrapped callables, accumulated until `reset`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.per_call: dict[str, list[float]] = {}
        self.context_tokens = 0  # token ids sent to the engine (prompt + earlier turns)

    def reset(self) -> None:
        """Zero every accumulator (call before each step)."""
        self.seconds.clear()
        self.per_call.clear()
        self.context_tokens = 0

    def wrap(self, obj: Any, attr: str, key: str) -> None:
        """Replace `obj.attr` (a function or bound method) by a timed version."""
        fn: Callable[..., Any] = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                self.seconds[key] = self.seconds.get(key, 0.0) + seconds
                self.per_call.setdefault(key, []).append(seconds)

        setattr(obj, attr, timed)

    def get(self, key: str) -> float:
        """Seconds accumulated under `key` (0 when never called)."""
        return self.seconds.get(key, 0.0)


# ------------------------------------------------------------------ configs and sources
def mode_overrides(
    model_dir: str, out_dir: str, steps: int, mode: str, turns: int, tokens: int
) -> list[str]:
    """grpo_step's overrides, with this benchmark's reward and (multi) the environment."""
    out = step_overrides(model_dir, out_dir, MICRO_BATCH, 2 * steps)
    out.append(REWARDS)
    if mode == "single":
        return [*out, f"rollout.max_new_tokens={turns * tokens}"]
    return [
        *out,
        f"rollout.max_new_tokens={tokens}",
        f"env.name={__name__}:FixedTurnsEnv",
        f"env.max_turns={turns}",
        "env.max_episode_tokens=1024",  # never binding: the turn count ends every episode
    ]


def _with_block_size(block_size: int | None) -> None:
    """Build the run's vLLM engine with this KV-cache block size (None: vLLM's default; 128 on
    CPU). vLLM's prefix cache reuses whole blocks only."""
    if block_size is None:
        return
    from posttrain.rollout import factory

    make_engine = factory.make_engine

    def with_block(kind: str, model_path: str, **kw: Any) -> Any:
        return make_engine(kind, model_path, **kw, block_size=block_size)

    factory.make_engine = with_block


def build(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """The Trainer (multi-turn config), both sources on its engine, the clock wrapped in."""
    from posttrain.config import load_config
    from posttrain.data.splits import load_train_eval_rows
    from posttrain.rollout import episodes
    from posttrain.rollout.source import RolloutSource
    from posttrain.trainer import Trainer

    shape = (args.model_dir, out_dir, args.steps)
    multi_cfg = load_config(None, mode_overrides(*shape, "multi", args.turns, args.turn_tokens))
    single_cfg = load_config(None, mode_overrides(*shape, "single", args.turns, args.turn_tokens))
    _with_block_size(args.vllm_block_size)
    t0 = time.perf_counter()
    trainer = Trainer(multi_cfg)
    init_s = time.perf_counter() - t0
    multi = trainer.algorithm.source
    engine = multi.engine
    llm = engine.llm = ForcedLengthLLM(engine.llm, trainer.tokenizer.eos_token_id)
    train, held = load_train_eval_rows(single_cfg)
    single = RolloutSource(single_cfg, trainer.tokenizer, engine, train, held, [])
    clock = PhaseClock()
    generate = engine.generate

    def counted(prompt_ids: list[list[int]], sampling: Any) -> Any:
        clock.context_tokens += sum(len(p) for p in prompt_ids) * sampling.n
        return generate(prompt_ids, sampling)

    engine.generate = counted
    clock.wrap(engine, "generate", "generate")
    for fn, key in (("observation_ids", "templates"), ("_start", "templates")):
        clock.wrap(episodes, fn, key)
    clock.wrap(episodes, "_answer_all", "env_answers")
    clock.wrap(multi, "_rewards", "reward")
    for source in (single, multi):
        clock.wrap(source, "collect_groups", "collect")
    clock.wrap(trainer.algorithm, "make_batch", "make_batch")
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        vllm_cache = {"prefix_caching": cache.enable_prefix_caching, "block_size": cache.block_size}
    except AttributeError:  # another vLLM layout
        vllm_cache = {}
    return {
        "trainer": trainer,
        "sources": {"single": single, "multi": multi},
        "clock": clock,
        "llm": llm,
        "init_s": init_s,
        "vllm_cache": vllm_cache,
    }


# ------------------------------------------------------------------ one step
def measure_step(run: dict[str, Any], mode: str) -> dict[str, Any]:
    """One Trainer step with the `mode` source; its phases and token counts."""
    trainer, clock = run["trainer"], run["clock"]
    trainer.algorithm.source = run["sources"][mode]
    shapes: list[dict[str, Any]] = []
    make_batch = trainer.algorithm.make_batch

    def recording(step: int, model: Any) -> Any:
        batch = make_batch(step, model)
        shapes.append(_shape_of(batch))
        return batch

    trainer.algorithm.make_batch = recording
    clock.reset()
    cached_before = run["llm"].cached_tokens
    try:
        m = trainer.train_step()
    finally:
        trainer.algorithm.make_batch = make_batch
    c = clock.get
    tools = m.get("agent/tool_seconds", 0.0)
    reward = c("reward") if mode == "multi" else m.get("time/reward_s", 0.0)
    logprob = m.get("time/logprob_s", 0.0)
    row = {
        "mode": mode,
        "generate": c("generate"),
        "env_answers": c("env_answers"),
        "tools": tools,
        "templates": c("templates"),
        "reward": reward,
        "rollout_other": c("collect") - c("generate") - c("env_answers") - c("templates") - reward,
        "batch_other": c("make_batch") - c("collect") - logprob,
        "logprob": logprob,
        "train": m["time/train_s"],
        "sync": m.get("time/sync_s", 0.0),
    }
    row["other"] = m["time/step_s"] - c("make_batch") - row["train"] - row["sync"]
    row["step"] = m["time/step_s"]
    row.update(token_counts(m, clock, shapes[-1]))
    row["cached_tokens"] = run["llm"].cached_tokens - cached_before
    row["prefilled_tokens"] = row["context_tokens"] - row["cached_tokens"]
    row["generate_per_call"] = clock.per_call.get("generate", [])
    row["source_generate_s"] = m.get("time/generate_s", 0.0)
    row["source_env_s"] = m.get("time/env_s", 0.0)
    row["env_seconds_sum"] = m.get("agent/env_seconds", 0.0)
    row["turns_mean"] = m.get("agent/turns_mean", 1.0)
    row["ends"] = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("agent/end/")}
    row["loadavg_1m"] = os.getloadavg()[0]
    return row


def token_counts(m: dict[str, float], clock: PhaseClock, shape: dict[str, Any]) -> dict[str, Any]:
    """Sampled / observation tokens of the step, engine calls and context, trained tokens."""
    completion = m.get("tokens/generated", 0.0)
    observation = round(completion * m.get("agent/observation_token_frac", 0.0))
    return {
        "sampled_tokens": round(completion) - observation,
        "observation_tokens": observation,
        "engine_calls": len(clock.per_call.get("generate", [])),
        "context_tokens": clock.context_tokens,
        "trained_tokens": shape["nonpad_tokens"],
        "padded_tokens": shape["padded_tokens"],
        "loss_tokens": shape["loss_tokens"],
    }


PHASES = (
    "generate",
    "env_answers",
    "tools",
    "templates",
    "reward",
    "rollout_other",
    "batch_other",
    "logprob",
    "train",
    "sync",
    "other",
    "step",
)
COUNTS = (
    "sampled_tokens",
    "observation_tokens",
    "engine_calls",
    "context_tokens",
    "cached_tokens",
    "prefilled_tokens",
    "trained_tokens",
    "padded_tokens",
)
# the episode source's own timings (time/generate_s = its wall time - agent/env_seconds, a sum
# over concurrent episodes) and the environments' summed seconds
EXTRA = ("source_generate_s", "source_env_s", "env_seconds_sum")


# ------------------------------------------------------------------ the run
def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up step of each mode, then `steps - 1` single/multi pairs in ABBA order."""
    import torch

    with tempfile.TemporaryDirectory(prefix="episode-bench-run-") as out_dir:
        run = build(args, out_dir)
        n_threads = apply_threads(args.threads)
        say(f"Trainer init {run['init_s']:.1f}s; torch threads {n_threads}; {run['vllm_cache']}")
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        warmup: dict[str, dict[str, Any]] = {}
        for i in range(args.steps):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                row = measure_step(run, mode)
                if i:
                    rows[mode].append(row)
                else:
                    warmup[mode] = row
                say(
                    f"{mode} step {i}{' (warm-up)' if i == 0 else ''}: "
                    + " ".join(f"{p}={row[p]:.2f}s" for p in PHASES if row[p] or p == "step")
                    + f" sampled={row['sampled_tokens']} obs={row['observation_tokens']}"
                    f" calls={row['engine_calls']} prefilled={row['prefilled_tokens']}"
                    f" trained={row['trained_tokens']}"
                )
        out = summarize(rows if rows["multi"] else {m: [warmup[m]] for m in MODES})
        out.update(torch_threads=torch.get_num_threads(), vllm_cache=run["vllm_cache"])
        out["warmup"] = warmup
        del run
    return out


def per_token(row: dict[str, Any]) -> float:
    """Step seconds per sampled token."""
    return row["step"] / max(row["sampled_tokens"], 1)


def token_floor(si: dict[str, Any], mu: dict[str, Any], observation_cost: float) -> float:
    """The multi/single per-sampled-token ratio if the multi-turn step cost only its extra tokens
    at the single-turn step's per-token rates: training on its longer sequences, and generating
    each observation token at `observation_cost` times the cost of a sampled one (0: prefill
    free; 1: as dear as decoding); the rest unchanged."""
    tokens = mu["sampled_tokens"] + observation_cost * mu["observation_tokens"]
    generate = si["generate"] * tokens / max(si["sampled_tokens"], 1)
    train = si["train"] * mu["trained_tokens"] / max(si["trained_tokens"], 1)
    step = generate + train + si["step"] - si["generate"] - si["train"]
    return (step / max(mu["sampled_tokens"], 1)) / per_token(si)


def summarize(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-mode stats, paired multi - single differences and the per-sampled-token ratios."""
    keys = PHASES + COUNTS + EXTRA
    summary = {m: {k: stats([r[k] for r in rows[m]]) for k in keys} for m in MODES}
    calls = [r["generate_per_call"] for r in rows["multi"]]
    summary["multi"]["generate_per_call_median"] = [
        statistics.median(c[t] for c in calls) for t in range(min(map(len, calls)))
    ]
    pairs = list(zip(rows["single"], rows["multi"], strict=True))
    ratio = stats([per_token(mu) / per_token(si) for si, mu in pairs])
    floor = stats([token_floor(si, mu, 0.0) for si, mu in pairs])
    return {
        "steps": rows,
        "summary": summary,
        "multi_minus_single": {p: stats([mu[p] - si[p] for si, mu in pairs]) for p in PHASES},
        "ratio_per_sampled_token": ratio,
        "ratio_step_time": stats([mu["step"] / si["step"] for si, mu in pairs]),
        "ratio_generate": stats([mu["generate"] / si["generate"] for si, mu in pairs]),
        "ratio_train": stats([mu["train"] / si["train"] for si, mu in pairs]),
        "ratio_token_floor": floor,
        "ratio_token_floor_decode_cost": stats([token_floor(si, mu, 1.0) for si, mu in pairs]),
        "target_met": ratio["median"] <= TARGET_RATIO,
        # well under the floor: load slowed the single-turn steps more; rerun with more --steps
        "below_token_floor": ratio["median"] < NOISE_MARGIN * floor["median"],
    }


# ------------------------------------------------------------------ output
def _cell(st: dict[str, Any], digits: int = 2) -> str:
    return f"{st['min']:.{digits}f} / {st['median']:.{digits}f}" if st.get("n") else "-"


def _ratio(st: dict[str, Any]) -> str:
    return f"{st['min']:.3f} / {st['median']:.3f} / {st['max']:.3f}"


def print_table(result: dict[str, Any]) -> None:
    """Phases (seconds min / median) of both modes, their paired difference, tokens, ratios."""
    r, s = result["run"], result["shape"]
    n = len(r["steps"]["multi"])
    print(
        f"\nGRPO step, {s['tasks']} tasks x {s['episodes']} samples: single-turn "
        f"{s['single_tokens']} tokens vs {s['turns']} turns x {s['turn_tokens']} tokens; "
        f"{n} pairs after a warm-up step each (torch threads {r['torch_threads']}, "
        f"vLLM {r['vllm_cache']}); {s['tokens_per_observation']} tokens per "
        f"observation ({'role tokens' if s['role_tokens'] else 'character tokenizer'})"
    )
    print(f"{'phase (s)':<18}{'single min/med':>16}{'multi min/med':>16}{'multi-single med':>18}")
    for p in PHASES:
        cells = [_cell(r["summary"][m][p]) for m in MODES]
        diff = r["multi_minus_single"][p]["median"]
        print(f"{p:<18}{cells[0]:>16}{cells[1]:>16}{diff:>+18.2f}")
    for k in EXTRA:
        cells = [_cell(r["summary"][m][k]) for m in MODES]
        print(f"{k:<18}{cells[0]:>16}{cells[1]:>16}")
    for k in COUNTS:
        cells = [f"{r['summary'][m][k]['median']:.0f}" for m in MODES]
        print(f"{k:<18}{cells[0]:>16}{cells[1]:>16}")
    per_call = ", ".join(f"{v:.2f}" for v in r["summary"]["multi"]["generate_per_call_median"])
    print(f"multi generate per turn (s, median): {per_call}")
    for m in MODES:
        ms = r["summary"][m]
        rate = ms["step"]["median"] / max(ms["sampled_tokens"]["median"], 1) * 1000
        print(f"{m} step s per 1k sampled tokens (median): {rate:.2f}")
    for name in ("generate", "train", "step_time"):
        print(f"multi/single {name}, paired (min / med / max): {_ratio(r['ratio_' + name])}")
    print(
        f"multi/single time per sampled token, paired (min / med / max): "
        f"{_ratio(r['ratio_per_sampled_token'])}; target <= {TARGET_RATIO}: "
        f"{'met' if r['target_met'] else 'NOT met'}"
    )
    print(
        "token floor of that ratio (observations trained at the single-turn rate), generating "
        f"them free: {_ratio(r['ratio_token_floor'])}; at the decode rate: "
        f"{_ratio(r['ratio_token_floor_decode_cost'])}"
    )
    if r["below_token_floor"]:
        print(
            "note: the ratio is well under its token floor, so machine load slowed the "
            "single-turn steps more than the multi-turn ones; rerun with more --steps"
        )


def parse_args() -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per mode; the first is a warm-up")
    ap.add_argument("--turns", type=int, default=TURNS, help="assistant turns per episode")
    ap.add_argument("--turn-tokens", type=int, default=TURN_TOKENS, help="tokens per turn")
    ap.add_argument("--threads", default="default", help="torch threads: 'default' or a count")
    ap.add_argument(
        "--vllm-block-size",
        type=int,
        default=None,
        help="vLLM KV-cache block size (default: vLLM's, 128 on CPU; its prefix cache reuses "
        "whole blocks, so smaller blocks re-prefill less of an episode each turn)",
    )
    ap.add_argument(
        "--role-tokens",
        action="store_true",
        help="one token per role header (user, assistant...), as BPE tokenizers of real models "
        "have, instead of the character tokenizer's letter-by-letter headers",
    )
    ap.add_argument("--out", default="benchmarks/results/episode_step.json")
    ap.add_argument(
        "--model-dir",
        default=None,
        help="reuse a make_tiny(size='bench') directory (--role-tokens changes it in place)",
    )
    args = ap.parse_args()
    if args.steps < 1 or args.turns < 1 or args.turn_tokens < 2:
        ap.error("--steps and --turns must be >= 1, --turn-tokens >= 2")
    return args


def main() -> None:
    """Build the bench model, run the paired steps in this process, print, write JSON."""
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from posttrain.models import make_tiny

    tmp = tempfile.TemporaryDirectory(prefix="episode-bench-")
    if args.model_dir is None:
        args.model_dir = str(make_tiny(Path(tmp.name) / "bench-model", size="bench", seed=0))
    if args.role_tokens:
        add_role_tokens(args.model_dir)
    observation_tokens = tokens_per_observation(args.model_dir, OBSERVATION)
    result: dict[str, Any] = {"machine": machine_info(), "target_ratio": TARGET_RATIO}
    result["shape"] = {
        "tasks": TASKS,
        "episodes": EPISODES,
        "turns": args.turns,
        "turn_tokens": args.turn_tokens,
        "single_tokens": args.turns * args.turn_tokens,
        "observation": OBSERVATION,
        "micro_batch": MICRO_BATCH,
        "vllm_block_size": args.vllm_block_size,
        "role_tokens": args.role_tokens,
        "tokens_per_observation": observation_tokens,
    }
    result["params"] = count_params(args.model_dir)
    result["matmul_gflops"] = matmul_gflops(iters=2, trials=4)
    say(
        f"bench model {result['params'] / 1e6:.2f}M params; "
        f"fp32 matmul best {result['matmul_gflops']['best']:.1f} GFLOP/s"
    )
    result["run"] = run_pairs(args)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
