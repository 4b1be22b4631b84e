"""Token-budget micro-batches: padded-token fraction and train-phase time, before and after.

One real GRPO step's batch (vLLM rollouts on the model's task, through the real `Trainer`) is
made once per shape; then its train phase (forward, loss, backward over every micro-batch; no
optimizer step, gradients zeroed after each pass) runs with
  - fixed: `train.micro_batch_size_per_device` rows per micro-batch (before), and
  - budget: `train.max_tokens_per_micro_batch` = micro-batch size x the step's longest row (the
    fixed micro-batch's worst case, so the budget never needs more memory than fixed),
side by side on the same tensors, alternating, min over repeats. Both split the same rows with
the trainer's own `split_micro_batches`; the gradient is the same (tests/integration/
test_token_budget.py), only padding and micro-batch count differ.

Shapes: `bench` (the offline bench model, ~23.6M, Qwen2-shaped, 8 prompts x 8 samples x <= 128
new tokens, arithmetic; random weights) and `smollm2` (SmolLM2-135M-Instruct from
`make smollm2`, its recipe `smollm2_grpo_math`: 8 x 8 x <= 32 new tokens). Each shape runs in its
own subprocess (vLLM and torch.distributed are process-global).

Usage:
    .venv/bin/python benchmarks/token_budget.py [--shapes bench,smollm2] [--micro 16]
        [--repeats 3] [--out benchmarks/results/token_budget.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
COMMON = ("log.wandb=disabled", "log.progress=false", "eval.num_problems=0", "train.steps=1")


def shape_overrides(shape: str, model: Path, out: Path, micro: int) -> tuple[str | None, list]:
    """(recipe, overrides) that make one GRPO step of `shape` with all rows in one micro-batch."""
    base = [f"model.path={model}", f"train.output_dir={out}", *COMMON]
    if shape == "smollm2":
        recipe = str(ROOT / "recipes" / "smollm2_grpo_math.yaml")
        return recipe, [*base, "train.micro_batch_size_per_device=64"]
    bench = [
        "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=128",
        "rollout.temperature=1.0",
        "train.micro_batch_size_per_device=64",
        "rewards=[{name: length_in_range, kwargs: {max_chars: 40}}]",
    ]
    return None, [*base, *bench]


def train_pass(trainer: Any, micro: list[dict], batch: Any) -> float:
    """Seconds of forward + loss + backward over `micro` (gradients zeroed afterwards)."""
    from posttrain.algorithms.base import model_inputs

    t0 = time.perf_counter()
    for mb in micro:
        outputs = trainer.engine(**model_inputs(mb))
        loss, _ = trainer.algorithm.loss(outputs, mb, batch)
        trainer.engine.backward(loss, scale_wrt_gas=False)
    elapsed = time.perf_counter() - t0
    trainer.engine.module.zero_grad(set_to_none=True)
    return elapsed


def run_shape(shape: str, micro_rows: int, repeats: int) -> dict[str, Any]:
    """One shape, in this process: the batch, both splits, their padding and times."""
    from posttrain.algorithms.base import pad_counts, split_micro_batches
    from posttrain.config import load_config
    from posttrain.models import make_tiny
    from posttrain.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="token-budget-") as tmp:
        work = Path(tmp)
        if shape == "smollm2":
            if not (SMOLLM2 / "config.json").is_file():
                raise SystemExit(f"{SMOLLM2} is missing: run `make smollm2` first")
            model = SMOLLM2
        else:
            model = make_tiny(work / "bench-model", size="bench", seed=0)
        recipe, overrides = shape_overrides(shape, model, work / "run", micro_rows)
        trainer = Trainer(load_config(recipe, overrides))
        batch = trainer.algorithm.make_batch(0, trainer.engine)
        [t] = batch.micro_batches  # all rows, trimmed to the longest
        lengths = t["attention_mask"].sum(dim=1)
        budget = micro_rows * int(lengths.max())
        splits = {
            "fixed": split_micro_batches(t, micro_rows, None),
            "budget": split_micro_batches(t, micro_rows, budget),
        }
        times: dict[str, list[float]] = {k: [] for k in splits}
        train_pass(trainer, splits["fixed"], batch)  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for name, micro in splits.items():
                times[name].append(train_pass(trainer, micro, batch))
    result: dict[str, Any] = {
        "shape": shape,
        "params": sum(p.numel() for p in trainer.engine.module.parameters()),
        "rows": int(lengths.numel()),
        "row_tokens": {
            "min": int(lengths.min()),
            "mean": float(lengths.float().mean()),
            "max": int(lengths.max()),
        },
        "micro_batch_rows": micro_rows,
        "max_tokens_per_micro_batch": budget,
    }
    for name, micro in splits.items():
        padded, slots = pad_counts(micro)
        result[name] = {
            "micro_batches": len(micro),
            "slots": slots,
            "pad_fraction": padded / slots,
            "train_s_min": min(times[name]),
            "train_s": times[name],
        }
    result["time_ratio"] = result["budget"]["train_s_min"] / result["fixed"]["train_s_min"]
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The printed table: one row per shape and split."""
    cols = ("shape", "split", "micro", "slots", "padded", "train s", "ratio")
    head = "{:8} {:7} {:>5} {:>7} {:>7} {:>8} {:>6}".format(*cols)
    lines = [head, "-" * len(head)]
    for r in results:
        for name in ("fixed", "budget"):
            s = r[name]
            ratio = f"{r['time_ratio']:.2f}" if name == "budget" else "1.00"
            lines.append(
                f"{r['shape']:8} {name:7} {s['micro_batches']:>5} {int(s['slots']):>7} "
                f"{s['pad_fraction']:>7.1%} {s['train_s_min']:>8.2f} {ratio:>6}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="bench,smollm2")
    ap.add_argument("--micro", type=int, default=16, help="rows per fixed micro-batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/token_budget.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one shape -> stdout
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.one:
        from posttrain.runtime.logging import route_third_party

        route_third_party(tempfile.mkdtemp(prefix="token-budget-logs-"))
        print("RESULT " + json.dumps(run_shape(args.one, args.micro, args.repeats)), flush=True)
        return 0
    results = []
    for shape in args.shapes.split(","):
        print(f"[bench] {shape} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", shape, "--micro", str(args.micro)]
        cmd += ["--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT ") :]))
    print(f"\nGRPO train phase, fixed {args.micro}-row micro-batches vs a token budget (CPU, fp32)")
    print(table(results))
    report = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "loadavg_1m": os.getloadavg()[0],
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
