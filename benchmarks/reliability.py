"""Random kills in every phase: SIGKILL `posttrain train`, resume it, compare to a straight run.

Each trial starts `posttrain train <recipe> key=value...` on the tiny model (a few steps,
`train.save_every=1`, periodic eval on) in its own process group, SIGKILLs the group inside a
chosen phase, then reruns the same command with `train.resume=auto` until it exits 0. The run
must then equal an uninterrupted run of the same config (computed once per config, cached for
the harness run), bitwise on CPU:
  - metrics: every per-step row of `metrics.jsonl` (the last row logged for each step and kind,
    train or eval; a killed process may have logged steps its checkpoint does not hold), every
    field except timings (`time/*`, `throughput/*`, `*seconds`);
  - final weights: `checkpoints/final/model.safetensors`, tensor by tensor;
  - the data ids of every step (`data_ids.jsonl`), where the run writes them;
  - every checkpoint a resume loaded (the `[posttrain] resumed from <path> (step N)` line): it
    was the newest complete one (never a `.tmp`), and its weights and `trainer_state.json` equal
    the straight run's checkpoint of that step (so it was never half-written).

Kill moments come from the opt-in phase trace (`posttrain/runtime/phase_trace.py`):
`POSTTRAIN_PHASE_TRACE` makes the process log each phase's begin and end, and
`POSTTRAIN_PHASE_HOLD=<phase>@<n>` stops it (SIGSTOP) on the n-th entry to the phase. The harness
picks the least-hit phase of the trial's config and a random entry n (2..the straight run's
count, so that most kills leave a checkpoint to resume from); then either kills at once
("entry") or continues the process and kills it a random 0..1 x the phase's straight-run
duration later ("inside"). A phase never hit yet is always killed
at entry, so over N >= 20 trials every phase is hit. The phases a kill hit are read back from the
trace (begun, not ended, in the killed process), so the table reports what was hit, not what was
aimed at. Target `resume`: a first kill at a random optimizer step, then a second kill while the
resumed process loads that checkpoint.

Phases: model load, generate, reward, logprob, backward, optimizer step, weight sync, checkpoint
write, eval, async prefetch (GRPO with `rollout.max_staleness=1`), resume.
Configs: grpo (KL to a reference: the logprob phase), grpo_async (max_staleness=1), ppo, dpo,
sft, episodes (recipes/calculator_tiny.yaml, multi-turn), all on the `hf` rollout engine.

Outcomes: "resumed exactly"; "differed, same data ids" (every step drew the straight run's rows,
but metrics or weights differ); "differed"; "failed" (never exited 0).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability.py --trials 24 --seed 0 \
        [--algos grpo,ppo,dpo,sft,episodes] [--json benchmarks/results/reliability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.runtime.phase_trace import HOLD_ENV, PHASES, TRACE_ENV

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "reliability.json"
# the phases every trial set must hit (a resume is aimed at separately)
REQUIRED_PHASES = tuple(p for p in PHASES if p != "resume")
RESUMED = re.compile(r"^\[posttrain\] resumed from (\S+) \(step (\d+)\)$", re.M)
TIMING = re.compile(r"^(time|throughput)/|seconds$")
COMMON = ("log.wandb=disabled", "log.progress=false", "train.save_every=1", "warmup.steps=0")
# each config's overrides, split on spaces (the run's model.path and train.output_dir are added)
EPISODE_STEPS = 3  # multi-turn steps take longer
SMALL = "train.steps=4 train.eval_every=2 data.train_size=64 data.eval_size=8 eval.num_problems=4"
GRPO = (
    *f"{SMALL} train.micro_batch_size_per_device=8 rollout.engine=hf rollout.prompts_per_step=4 "
    "rollout.samples_per_prompt=4 rollout.max_new_tokens=6 data.max_prompt_tokens=32 "
    "eval.seeds=[0] optim.lr=1e-3 kl.coef=0.01".split(),  # KL to a reference: the logprob phase
    "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
)


@dataclass(frozen=True)
class RunConfig:
    """One training config the trials kill and resume.

    Attributes:
        name: the config's name in the table.
        algo: its `--algos` group (grpo, ppo, dpo, sft, episodes).
        recipe: a recipe under the repository root, or "" for a bare `train.algorithm: grpo`.
        overrides: key=value overrides (model.path and train.output_dir are added per run).
    """

    name: str
    algo: str
    recipe: str
    overrides: tuple[str, ...]


CONFIGS = (
    RunConfig("grpo", "grpo", "", GRPO),
    RunConfig("grpo_async", "grpo", "", (*GRPO, "rollout.max_staleness=1")),
    RunConfig(
        "ppo",
        "ppo",
        "recipes/ppo_tiny.yaml",
        tuple(
            f"{SMALL} train.micro_batch_size_per_device=8 rollout.engine=hf "
            "rollout.prompts_per_step=8 ppo.critic_warmup_steps=1 eval.seeds=[0] eval.k=2".split()
        ),
    ),
    RunConfig(
        "dpo",
        "dpo",
        "recipes/dpo_tiny.yaml",
        tuple(f"{SMALL} train.micro_batch_size_per_device=2 dpo.pairs_per_step=4".split()),
    ),
    RunConfig(
        "sft",
        "sft",
        "recipes/sft_tiny.yaml",
        tuple(
            f"{SMALL} train.sft_batch_size=8 train.micro_batch_size_per_device=4 "
            "sft.packing=false optim.warmup_steps=0".split()
        ),
    ),
    RunConfig(  # multi-turn tool calls; nothing solved by the tiny model: entropy gives a gradient
        "episodes",
        "episodes",
        "recipes/calculator_tiny.yaml",
        tuple(
            f"train.steps={EPISODE_STEPS} train.eval_every=2 train.micro_batch_size_per_device=4 "
            "rollout.engine=hf rollout.prompts_per_step=2 rollout.samples_per_prompt=2 "
            "rollout.max_new_tokens=12 env.max_turns=2 env.max_episode_tokens=160 "
            "data.train_size=32 data.eval_size=4 eval.num_problems=2 eval.k=1 "
            "loss.entropy_coef=0.01 optim.lr=1e-3".split()
        ),
    ),
)


# ------------------------------------------------------------------------------ trace
def parse_trace(path: Path) -> list[tuple[float, int, int, str, str]]:
    """(monotonic time, pid, thread id, "begin"|"end", phase) per line of a phase trace."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split(" ", 4)
        if len(parts) == 5:
            rows.append((float(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4]))
    return rows


def open_phases(rows: list[tuple[float, int, int, str, str]], pid: int) -> list[str]:
    """The phases process `pid` had begun and not ended at the end of the trace (sorted)."""
    depth: dict[tuple[int, str], int] = {}
    for _t, p, tid, kind, phase in rows:
        if p == pid:
            depth[(tid, phase)] = depth.get((tid, phase), 0) + (1 if kind == "begin" else -1)
    return sorted({phase for (_tid, phase), d in depth.items() if d > 0})


def phase_stats(rows: list[tuple[float, int, int, str, str]]) -> dict[str, dict[str, float]]:
    """Per phase: entries and the median duration (s) in a trace of whole runs."""
    started: dict[tuple[int, int, str], list[float]] = {}
    durations: dict[str, list[float]] = {}
    for t, pid, tid, kind, phase in rows:
        key = (pid, tid, phase)
        if kind == "begin":
            started.setdefault(key, []).append(t)
        elif started.get(key):
            durations.setdefault(phase, []).append(t - started[key].pop())
    return {p: {"entries": len(d), "median_s": statistics.median(d)} for p, d in durations.items()}


# ------------------------------------------------------------------------------ runs
@dataclass
class Attempt:
    """One `posttrain train` process of a trial."""

    hold: str | None  # the POSTTRAIN_PHASE_HOLD it ran with
    mode: str  # "entry" | "inside" | "none" (not killed on purpose)
    delay_s: float = 0.0
    killed: bool = False
    hit: list[str] = field(default_factory=list)  # phases open when it was killed
    returncode: int | None = None
    loaded: str | None = None  # the checkpoint its resume loaded
    loaded_step: int | None = None
    expected: str | None = None  # the newest complete checkpoint when it started
    seconds: float = 0.0


def command(cfg: RunConfig, work: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """The `posttrain train` command line of `cfg` writing to `out`."""
    recipe = ROOT / cfg.recipe if cfg.recipe else work / "grpo.yaml"
    if not cfg.recipe and not recipe.is_file():
        recipe.write_text("train:\n  algorithm: grpo\n")
    return [
        sys.executable,
        "-m",
        "posttrain.cli",
        "train",
        str(recipe),
        f"model.path={model}",
        f"train.output_dir={out}",
        *COMMON,
        *cfg.overrides,
        *extra,
    ]


def _env(trace: Path, hold: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", HOLD_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{TRACE_ENV: str(trace)})
    if hold:
        env[HOLD_ENV] = hold
    return env


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def run_attempt(
    cmd: list[str], log: Path, trace: Path, attempt: Attempt, timeout_s: float = 600
) -> Attempt:
    """Run `cmd`; with a hold, SIGKILL its process group inside the held phase (see module)."""
    start = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(trace, attempt.hold),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while attempt.hold and proc.poll() is None and not _stopped(proc.pid):
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"{cmd} never reached {attempt.hold}")
                time.sleep(0.005)
            if attempt.hold and proc.poll() is None:  # stopped at the held entry
                if attempt.mode == "inside":
                    os.killpg(proc.pid, signal.SIGCONT)
                    time.sleep(attempt.delay_s)
                os.killpg(proc.pid, signal.SIGKILL)
                attempt.killed = True
            attempt.returncode = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    attempt.seconds = time.monotonic() - start
    if attempt.killed:
        attempt.hit = open_phases(parse_trace(trace), proc.pid)
    found = RESUMED.findall(log.read_text(errors="replace"))
    if found:
        attempt.loaded, attempt.loaded_step = found[-1][0], int(found[-1][1])
    return attempt


# ------------------------------------------------------------------------------ checks
def metric_rows(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """(step, "train"|"eval") -> the last row logged for it, timings left out."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line a SIGKILL cut short: a later run logs it again
            continue
        kind = "train" if "loss" in row else "eval"
        rows[(int(row["step"]), kind)] = {k: v for k, v in row.items() if not TIMING.search(k)}
    return rows


def id_rows(path: Path) -> dict[int, dict[str, Any]]:
    """step -> the last `data_ids.jsonl` row logged for it."""
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[int(row["step"])] = row
    return rows


def diff_rows(want: dict, got: dict, limit: int = 8) -> list[str]:
    """What differs between two keyed row sets (at most `limit` lines)."""
    out = (
        [f"rows only in the straight run: {sorted(set(want) - set(got))}"]
        if want.keys() - got.keys()
        else []
    )
    if got.keys() - want.keys():
        out.append(f"rows only in the resumed run: {sorted(set(got) - set(want))}")
    for key in sorted(want.keys() & got.keys()):
        a, b = want[key], got[key]
        for name in sorted(a.keys() | b.keys()):
            x, y = a.get(name, "<absent>"), b.get(name, "<absent>")
            if x != y:
                out.append(f"{key} {name}: straight {x} resumed {y}")
    return out[:limit]


def same_weights(a: Path, b: Path) -> bool:
    """The two safetensors files hold the same tensors, bitwise."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def check_checkpoint(path: Path, ref_out: Path) -> list[str]:
    """Problems of checkpoint `path` (about to be resumed from): complete, and equal to the
    straight run's checkpoint of its step (weights bitwise, trainer_state.json)."""
    problems = []
    if path.name.endswith(".tmp"):
        problems.append(f"{path.name} is a .tmp directory")
    need = ("trainer_state.json", "model.safetensors", "engine/state", "rng_rank0.pt")
    problems += [f"{path.name} lacks {n}" for n in need if not (path / n).exists()]
    if problems:
        return problems
    state = json.loads((path / "trainer_state.json").read_text())
    ref = ref_out / "checkpoints" / f"step-{int(state['step']):06d}"
    if path.name == "final" or not ref.is_dir():
        ref = ref_out / "checkpoints" / path.name
    if not ref.is_dir():
        return [f"the straight run has no checkpoint like {path.name}"]
    if json.loads((ref / "trainer_state.json").read_text()) != state:
        problems.append(f"{path.name}: trainer_state.json differs from the straight run's")
    if not same_weights(ref / "model.safetensors", path / "model.safetensors"):
        problems.append(f"{path.name}: weights differ from the straight run's {ref.name}")
    return problems


def compare(ref_out: Path, out: Path) -> dict[str, Any]:
    """The finished run against the straight run: metrics, final weights, data ids."""
    metric_diff = diff_rows(
        metric_rows(ref_out / "metrics.jsonl"), metric_rows(out / "metrics.jsonl")
    )
    final, ref_final = out / "checkpoints" / "final", ref_out / "checkpoints" / "final"
    weights = (final / "model.safetensors").is_file() and same_weights(
        ref_final / "model.safetensors", final / "model.safetensors"
    )
    ids = None
    if (ref_out / "data_ids.jsonl").is_file():
        ids_diff = diff_rows(id_rows(ref_out / "data_ids.jsonl"), id_rows(out / "data_ids.jsonl"))
        ids = not ids_diff
        metric_diff += ids_diff
    return {
        "metrics_equal": not metric_diff,
        "weights_equal": weights,
        "ids_equal": ids,
        "diff": metric_diff,
    }


# ------------------------------------------------------------------------------ trials
@dataclass
class Reference:
    """A config's uninterrupted run: its output dir, seconds and phase statistics."""

    cfg: RunConfig
    out: Path
    seconds: float
    stats: dict[str, dict[str, float]]


def straight_run(cfg: RunConfig, work: Path, model: Path) -> Reference:
    """Run `cfg` once without a kill (all checkpoints kept), with the phase trace on."""
    out = work / f"straight-{cfg.name}"
    trace = work / f"straight-{cfg.name}.trace"
    cmd = command(cfg, work, model, out, "train.keep_checkpoints=0")
    attempt = run_attempt(cmd, work / f"straight-{cfg.name}.log", trace, Attempt(None, "none"))
    if attempt.returncode != 0:
        log = (work / f"straight-{cfg.name}.log").read_text()[-3000:]
        raise RuntimeError(f"straight run of {cfg.name} failed ({attempt.returncode}):\n{log}")
    return Reference(cfg, out, attempt.seconds, phase_stats(parse_trace(trace)))


def plan_trial(ref: Reference, target: str, rng: random.Random, first: bool) -> list[Attempt]:
    """The killed attempts of a trial aimed at `target` (the resumes that follow are added)."""
    if target == "resume":  # a checkpoint to resume from, then a kill while it loads
        n = rng.randint(2, max(2, int(ref.stats["optimizer step"]["entries"])))
        mode = "entry" if first or rng.random() < 0.5 else "inside"
        delay = rng.uniform(0, ref.stats.get("resume", {}).get("median_s", 0.5))
        return [Attempt(f"optimizer step@{n}", "entry"), Attempt("resume@1", mode, delay)]
    stats = ref.stats[target]
    n = rng.randint(min(2, int(stats["entries"])), int(stats["entries"]))  # >= 2: a checkpoint
    mode = "entry" if first or rng.random() < 0.5 else "inside"
    return [
        Attempt(
            f"{target}@{n}", mode, rng.uniform(0, stats["median_s"]) if mode == "inside" else 0.0
        )
    ]


def run_trial(
    index: int, ref: Reference, target: str, plan: list[Attempt], work: Path, model: Path
) -> dict[str, Any]:
    """Kill per `plan` (`plan_trial`), resume with `train.resume=auto` until the run exits 0,
    compare with the straight run."""
    out = work / f"trial-{index:03d}-{ref.cfg.name}"
    attempts: list[Attempt] = []
    problems: list[str] = []
    start = time.monotonic()
    for i in range(len(plan) + 3):
        attempt = plan[i] if i < len(plan) else Attempt(None, "none")
        expected = _latest(out / "checkpoints")
        if expected is not None and i > 0:
            attempt.expected = str(expected)
            problems += check_checkpoint(expected, ref.out)
        extra = ("train.resume=auto",) if i > 0 else ()
        cmd = command(ref.cfg, work, model, out, *extra)
        run_attempt(cmd, work / f"{out.name}.{i}.log", work / f"{out.name}.{i}.trace", attempt)
        attempts.append(attempt)
        if attempt.loaded != attempt.expected and not (attempt.killed and not attempt.loaded):
            problems.append(f"attempt {i} loaded {attempt.loaded}, expected {attempt.expected}")
        if not attempt.killed and attempt.returncode == 0:
            break
        if not attempt.killed:
            problems.append(f"attempt {i} exited {attempt.returncode}; see {out.name}.{i}.log")
            break
    done = attempts[-1].returncode == 0 and not attempts[-1].killed
    result = (
        compare(ref.out, out)
        if done
        else {"metrics_equal": False, "weights_equal": False, "ids_equal": None, "diff": []}
    )
    exact = (
        done
        and result["metrics_equal"]
        and result["weights_equal"]
        and result["ids_equal"] is not False
        and not problems
    )
    return {
        "trial": index,
        "config": ref.cfg.name,
        "target": target,
        "hit": sorted({p for a in attempts for p in a.hit}),
        "kills": sum(a.killed for a in attempts),
        "attempts": [asdict(a) for a in attempts],
        "completed": done,
        "checkpoint_problems": problems,
        **result,
        "outcome": outcome(done, exact, result["ids_equal"]),
        "seconds": round(time.monotonic() - start, 1),
    }


def outcome(done: bool, exact: bool, ids_equal: bool | None) -> str:
    """A trial's outcome: resumed exactly, differed with the same data ids, differed, failed."""
    if not done:
        return "failed"
    if exact:
        return "resumed exactly"
    return "differed, same data ids" if ids_equal else "differed"


def _latest(checkpoints: Path) -> Path | None:
    from posttrain.runtime.checkpoint import latest

    return latest(checkpoints)


def choose_target(ref: Reference, hits: dict[str, int], rng: random.Random) -> str:
    """The config's least-hit phase so far (ties at random); `resume` once the rest are hit."""
    phases = [p for p in REQUIRED_PHASES if p in ref.stats]
    if all(hits.get(p, 0) > 0 for p in phases):
        phases.append("resume")
    low = min(hits.get(p, 0) for p in phases)
    return rng.choice([p for p in phases if hits.get(p, 0) == low])


def run_harness(trials: int, seed: int, algos: list[str], work: Path) -> dict[str, Any]:
    """`trials` kill/resume trials over the configs of `algos`, in turn; the summary."""
    from posttrain.models import make_tiny

    unknown = set(algos) - {c.algo for c in CONFIGS}
    if unknown:
        raise SystemExit(f"--algos: unknown {sorted(unknown)}; valid: grpo,ppo,dpo,sft,episodes")
    start = time.monotonic()
    model = make_tiny(work / "tiny-model", size="tiny", seed=0)
    configs = [c for c in CONFIGS if c.algo in algos]
    refs = [straight_run(c, work, model) for c in configs]
    rng = random.Random(seed)
    hits: dict[str, int] = {}
    rows = []
    for i in range(trials):
        ref = refs[i % len(refs)]
        target = choose_target(ref, hits, rng)
        plan = plan_trial(ref, target, rng, hits.get(target, 0) == 0)
        row = run_trial(i, ref, target, plan, work, model)
        for phase in row["hit"]:
            hits[phase] = hits.get(phase, 0) + 1
        rows.append(row)
        print(_row(row), flush=True)
    outcomes: dict[str, int] = {}
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    return {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability.py "
        f"--trials {trials} --seed {seed} --algos {','.join(algos)}",
        "trials": len(rows),
        "kills": sum(r["kills"] for r in rows),
        "phases_hit": {p: hits.get(p, 0) for p in (*REQUIRED_PHASES, "resume")},
        "phases_missed": [
            p for p in REQUIRED_PHASES if not hits.get(p) and any(p in r.stats for r in refs)
        ],
        "outcomes": outcomes,
        "configs": {
            r.cfg.name: {
                "recipe": r.cfg.recipe or "train.algorithm: grpo",
                "overrides": list(r.cfg.overrides),
                "straight_run_s": round(r.seconds, 1),
                "phases": r.stats,
            }
            for r in refs
        },
        "rows": rows,
        "seconds": round(time.monotonic() - start, 1),
    }


def _row(row: dict[str, Any]) -> str:
    holds = " ".join(f"{a['hold']}({a['mode']})" for a in row["attempts"] if a["hold"])
    return (
        f"{row['trial']:>3} {row['config']:<11} {holds:<34} hit={','.join(row['hit']) or '-':<28} "
        f"runs={len(row['attempts'])} metrics={'=' if row['metrics_equal'] else 'DIFF'} "
        f"weights={'=' if row['weights_equal'] else 'DIFF'} {row['outcome']} {row['seconds']}s"
    )


def print_summary(summary: dict[str, Any]) -> None:
    """Phases hit and outcomes as a table."""
    print(f"\n{summary['trials']} trials, {summary['kills']} kills, {summary['seconds']} s")
    print(f"{'phase':<18} kills inside it")
    for phase, count in summary["phases_hit"].items():
        print(f"{phase:<18} {count}")
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in summary["outcomes"].items()))
    for row in summary["rows"]:
        for line in row["diff"] + row["checkpoint_problems"]:
            print(f"  trial {row['trial']} ({row['config']}): {line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algos", default="grpo,ppo,dpo,sft,episodes")
    ap.add_argument("--json", type=Path, default=RESULT)
    ap.add_argument(
        "--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    work = (args.keep or Path(tempfile.mkdtemp(prefix="reliability-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_harness(args.trials, args.seed, algos, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1).replace(str(work.resolve()), "<work>")  # no machine paths
    args.json.write_text(text + "\n")
    print(f"wrote {args.json}")
    exact = summary["outcomes"].get("resumed exactly", 0) == summary["trials"]
    return 0 if exact and not summary["phases_missed"] else 1


if __name__ == "__main__":
    sys.exit(main())
