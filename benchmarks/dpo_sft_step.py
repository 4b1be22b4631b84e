"""DPO and SFT step benchmark on the offline `bench` model (Qwen2-shaped, ~23.6M params, fp32, CPU).

Shape (the issue's): 32 preference pairs per DPO step, ~30 tokens per side (arithmetic prompts
through the chat template), one forward over the 64 concatenated chosen + rejected rows. SFT runs
the same 64 sequences' worth of rows per step (`sft_batch_size=64`).

Every step goes through the real `Trainer` (DeepSpeed engine, ZeRO-0, fp32). Modes:
  dpo_cached   reference log-probs precomputed once (`dpo.ref_cache: auto`; time reported apart)
  dpo_ref_fly  reference model run in every step's make_batch (`dpo.ref_cache: null`)
  sft          completion-only cross-entropy, no packing
For each: step time (min / median over steps after a warm-up step), non-pad tokens/s, a phase
breakdown of one extra step (make_batch / forward / loss / backward / optimizer), and the top ops
of a torch.profiler pass. The FLOP floor is 6 * params * padded_tokens (+ 2 * params * padded
tokens for the on-the-fly reference forward) at this machine's best fp32 matmul GFLOP/s.

Usage:
    .venv/bin/python benchmarks/dpo_sft_step.py [--steps 5] [--out benchmarks/results/dpo_sft.json]

Timings on a shared CPU are noisy: the load average is recorded with every result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAIRS = 32
TARGET_DPO_STEP_S = 2.7
MODES = ("dpo_cached", "dpo_ref_fly", "sft")


def stats(values: list[float]) -> dict[str, Any]:
    """min / median / max of repeated measurements."""
    vals = [float(v) for v in values]
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def matmul_gflops(size: int = 1024, iters: int = 10, trials: int = 5) -> float:
    """Best fp32 matmul GFLOP/s of this machine (size x size)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        best = max(best, 2 * size**3 * iters / (time.perf_counter() - t0) / 1e9)
    return best


def overrides(mode: str, model: Path, out: Path, micro: int, steps: int) -> list[str]:
    """Config overrides of one mode."""
    common = [
        f"model.path={model}",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        "data.train_size=2000",
        "data.eval_size=16",
        "eval.num_problems=0",
        "optim.lr=1e-5",
        "log.wandb=disabled",
        "log.progress=false",
    ]
    if mode == "sft":
        return [
            *common,
            "train.algorithm=sft",
            f"train.sft_batch_size={2 * PAIRS}",
            f"train.micro_batch_size_per_device={2 * micro}",
        ]
    ref = "dpo.ref_cache=auto" if mode == "dpo_cached" else "dpo.ref_cache=null"
    return [
        *common,
        "train.algorithm=dpo",
        f"dpo.pairs_per_step={PAIRS}",
        f"train.micro_batch_size_per_device={micro}",
        "dpo.max_length=64",
        ref,
    ]


def phase_step(trainer: Any) -> dict[str, float]:
    """One step of the trainer's loop, timed by phase (mirrors Trainer.train_step)."""
    from posttrain.algorithms.base import model_inputs

    t: dict[str, float] = {"make_batch": 0.0, "forward": 0.0, "loss": 0.0, "backward": 0.0}
    t0 = time.perf_counter()
    batch = trainer.algorithm.make_batch(trainer.step, trainer.engine)
    t["make_batch"] = time.perf_counter() - t0
    for mb in batch.micro_batches:
        a = time.perf_counter()
        outputs = trainer.engine(**model_inputs(mb))
        b = time.perf_counter()
        loss, _ = trainer.algorithm.loss(outputs, mb, batch)
        c = time.perf_counter()
        trainer.engine.backward(loss, scale_wrt_gas=False)
        d = time.perf_counter()
        t["forward"] += b - a
        t["loss"] += c - b
        t["backward"] += d - c
    a = time.perf_counter()
    trainer.engine.step()
    t["optimizer"] = time.perf_counter() - a
    t["total"] = time.perf_counter() - t0
    trainer.step += 1
    return t


def top_ops(trainer: Any, n: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over one train_step: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events[:n]
    ]


def run_mode(mode: str, model: Path, work: Path, steps: int, micro: int) -> dict[str, Any]:
    """Time `steps` trainer steps of one mode (after 1 warm-up step), then a phase step."""
    from posttrain.config import load_config
    from posttrain.trainer import Trainer

    out = work / mode
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, overrides(mode, model, out, micro, steps + 3)))
    init_s = time.perf_counter() - t0
    batch = trainer.algorithm.make_batch(0, trainer.engine)
    rows = [mb["attention_mask"] for mb in batch.micro_batches]
    real_tokens = float(sum(r.sum() for r in rows))
    padded_tokens = float(sum(r.numel() for r in rows))
    trainer.train_step()  # warm-up
    step_s, train_s = [], []
    for _ in range(steps):
        m = trainer.train_step()
        step_s.append(m["time/step_s"])
        train_s.append(m["time/train_s"])
    phases = phase_step(trainer)
    ops = top_ops(trainer)
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    flops = 6 * params * padded_tokens + (
        2 * params * padded_tokens if mode == "dpo_ref_fly" else 0
    )
    return {
        "mode": mode,
        "init_s": init_s,
        "step_s": stats(step_s),
        "train_s": stats(train_s),
        "real_tokens_per_step": real_tokens,
        "padded_tokens_per_step": padded_tokens,
        "tokens_per_s": real_tokens / statistics.median(step_s),
        "params": params,
        "step_flops": flops,
        "phases_s": phases,
        "top_ops": ops,
        "loadavg_1m": os.getloadavg()[0],
    }


def table(results: list[dict[str, Any]], gflops: float) -> str:
    """The printed table."""
    lines = [
        f"{'mode':<12} {'step min':>9} {'median':>8} {'tokens':>7} {'tok/s':>7} {'floor':>6}"
        f"  {'batch':>6} {'fwd':>6} {'bwd':>6} {'optim':>6}",
    ]
    for r in results:
        p = r["phases_s"]
        floor = r["step_flops"] / (gflops * 1e9)
        lines.append(
            f"{r['mode']:<12} {r['step_s']['min']:>8.3f}s {r['step_s']['median']:>7.3f}s "
            f"{r['real_tokens_per_step']:>7.0f} {r['tokens_per_s']:>7.0f} {floor:>5.2f}s"
            f"  {p['make_batch']:>5.2f}s {p['forward']:>5.2f}s {p['backward']:>5.2f}s "
            f"{p['optimizer']:>5.2f}s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--micro", type=int, default=PAIRS, help="pairs per micro-batch")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="benchmarks/results/dpo_sft.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from posttrain.models import make_tiny

    gflops = matmul_gflops()
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-sft-bench-") as tmp:
        work = Path(tmp)
        model = make_tiny(work / "bench-model", size="bench", seed=0)
        for mode in args.modes.split(","):
            print(f"[bench] {mode} ...", flush=True)
            results.append(run_mode(mode, model, work, args.steps, args.micro))
    print(
        f"\nDPO / SFT step, bench model, fp32, {PAIRS} pairs/step, threads "
        f"{torch.get_num_threads()}, matmul {gflops:.0f} GFLOP/s, load {os.getloadavg()[0]:.1f}"
    )
    print(table(results, gflops))
    dpo = next((r for r in results if r["mode"] == "dpo_cached"), None)
    if dpo is not None:
        print(
            f"target: DPO step <= {TARGET_DPO_STEP_S} s; measured median "
            f"{dpo['step_s']['median']:.2f} s (min {dpo['step_s']['min']:.2f} s)"
        )
    report = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "matmul_gflops_best": gflops,
        },
        "pairs_per_step": PAIRS,
        "target_dpo_step_s": TARGET_DPO_STEP_S,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
