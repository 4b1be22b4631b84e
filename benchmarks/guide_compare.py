"""Guide against plain GRPO at equal steps, on several seeds (issue: adaptive guidance).

For each seed, `recipes/guide_tiny.yaml` runs twice from the SAME SFT warm-up (the Guide run
makes it; the plain run gets a copy, which a run reuses, so both arms start from identical
weights): once as shipped (`guide.enabled: true`) and once with `guide.enabled=false`. The
table gives, per seed and arm, held-out greedy accuracy and avg@k before/after (the run's own
final report, `eval.json`) and the fraction of all-fail groups over training
(`guide/all_fail_groups`, logged by both arms: the share of a step's groups whose samples all
failed before any hint), as the mean over all steps and over the last quarter. A PNG draws the
all-fail fraction per step (both arms, mean over seeds, 10-step moving average).

Usage:
    .venv/bin/python benchmarks/guide_compare.py [--seeds 0,1,2] [--steps 120]
        [--out benchmarks/results/guide_compare.json] [--work runs/guide_compare]
        [--warmup-from RUN_DIR] [key=value ...]

Extra key=value arguments are passed to both arms (e.g. train.eval_every=0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "guide_tiny.yaml"
ARMS = ("guide", "plain")
FIELDS = ("eval/greedy_acc", "eval/avg@4_mean")


def read_run(out: Path) -> dict[str, Any]:
    """A finished run's before/after eval, all-fail series and wall time (None if unknown)."""
    ev = json.loads((out / "eval.json").read_text())
    fails = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "guide/all_fail_groups" in row:
            fails.append(float(row["guide/all_fail_groups"]))
    wall = out / "compare_wall_s.json"
    wall_s = json.loads(wall.read_text()) if wall.is_file() else None
    return {"before": ev["before"], "after": ev["after"], "all_fail": fails, "wall_s": wall_s}


def run_arm(
    arm: str, seed: int, steps: int, work: Path, extra: list[str], warmup_from: Path | None
) -> dict[str, Any]:
    """One training run of `arm` for `seed`; returns `read_run` of it.

    The plain arm starts from the Guide arm's warm-up (a run reuses a finished warm-up in its
    output dir); with `warmup_from`, both arms start from that run dir's warm-up. A run whose
    output dir already holds an eval.json is read, not run again (delete it to rerun).
    """
    out = work / f"seed{seed}-{arm}"
    if (out / "eval.json").is_file():
        return read_run(out)
    source = warmup_from or (work / f"seed{seed}-guide" if arm == "plain" else None)
    if source is not None and source.resolve() == out.resolve():
        source = None  # this run makes the shared warm-up
    shutil.rmtree(out, ignore_errors=True)
    if source is not None:
        out.mkdir(parents=True)
        shutil.copytree(source / "sft-warmup", out / "sft-warmup")
        shutil.copytree(source / "tiny-model", out / "tiny-model")
    cmd = [
        str(ROOT / ".venv" / "bin" / "posttrain"),
        "train",
        str(RECIPE),
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.output_dir={out}",
        f"guide.enabled={'true' if arm == 'guide' else 'false'}",
        "log.wandb=disabled",
        "log.progress=false",
        *extra,
    ]
    start = time.perf_counter()
    with open(work / f"seed{seed}-{arm}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    (out / "compare_wall_s.json").write_text(json.dumps(time.perf_counter() - start))
    return read_run(out)


def summary(res: dict[str, Any]) -> dict[str, float]:
    """Before/after accuracies and the all-fail fraction (mean over steps and last quarter)."""
    fails = res["all_fail"]
    tail = fails[-max(1, len(fails) // 4) :]
    out = {f"before/{k}": res["before"][k] for k in FIELDS}
    out.update({f"after/{k}": res["after"][k] for k in FIELDS})
    out.update(all_fail_mean=sum(fails) / len(fails), all_fail_last_quarter=sum(tail) / len(tail))
    out["wall_s"] = res["wall_s"] if res["wall_s"] is not None else float("nan")
    return out


def moving_average(xs: list[float], w: int) -> list[float]:
    """Mean of the up-to-`w` values ending at each position."""
    return [
        sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1])
        for i in range(len(xs))
    ]


def draw(results: dict[str, dict[str, Any]], png: Path) -> None:
    """All-fail fraction per step, mean over seeds, for both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.runtime.logging import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in ARMS:
        series = [r[arm]["all_fail"] for r in results.values()]
        n = min(len(s) for s in series)
        mean = [sum(s[i] for s in series) / len(series) for i in range(n)]
        ax.plot(range(1, n + 1), moving_average(mean, 10), label=arm)
    ax.set_xlabel("step")
    ax.set_ylabel("all-fail groups (10-step mean)")
    ax.set_title(f"Guide vs plain GRPO, {len(results)} seeds")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guide_compare.json"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "guide_compare"))
    ap.add_argument(
        "--warmup-from",
        default=None,
        help="a run dir whose sft-warmup/ and tiny-model/ every run starts from (one warm-up "
        "shared by all seeds; default: each seed's Guide run makes its own)",
    )
    args, extra = ap.parse_known_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        warm = Path(args.warmup_from) if args.warmup_from else None
        results[str(seed)] = {a: run_arm(a, seed, args.steps, work, extra, warm) for a in ARMS}
        print(f"seed {seed} done", flush=True)
    head = f"{'seed':>4} {'arm':>6} {'greedy before':>13} {'after':>6} {'avg@4 before':>12} "
    print(head + f"{'after':>6} {'all-fail mean':>13} {'last 1/4':>8} {'wall s':>7}")
    table = {}
    for seed, arms in results.items():
        for arm in ARMS:
            s = table.setdefault(seed, {})[arm] = summary(arms[arm])
            print(
                f"{seed:>4} {arm:>6} {s['before/eval/greedy_acc']:13.3f} "
                f"{s['after/eval/greedy_acc']:6.3f} {s['before/eval/avg@4_mean']:12.3f} "
                f"{s['after/eval/avg@4_mean']:6.3f} {s['all_fail_mean']:13.3f} "
                f"{s['all_fail_last_quarter']:8.3f} {s['wall_s']:7.0f}"
            )
    png = Path(args.out).with_suffix(".png")
    draw(results, png)
    payload = {
        "recipe": "recipes/guide_tiny.yaml",
        "steps": args.steps,
        "extra": extra,
        "warmup_from": args.warmup_from,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "summary": table,
        "all_fail_per_step": {s: {a: r[a]["all_fail"] for a in ARMS} for s, r in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    sys.exit(main())
