"""Log-prob memory/time benchmark: full [tokens, V] logits vs chunked (logprob_chunk_tokens).

What is measured: the train phase's log-prob part of one micro-batch, forward + backward, from
the last hidden state [rows, tokens, H] (requires grad) and an lm head nn.Linear(H, V) (weight
requires grad, its .grad buffer preallocated as in training after the first step):
  - old: logits = head(hidden) [rows, tokens, V]; `losses.token_logprobs` + no-grad
    `losses.token_entropy` (GRPO's metric), backward of sum(logp * g);
  - chunked: `lean_logprobs.chunked_token_stats(..., entropy="metric")`, the same backward.
Shapes: SmolLM2 (H 576, V 49,152) and Qwen2.5 (H 896, V 151,936).

Peak memory, honestly: each case runs in a fresh subprocess. On CPU it is the process's peak
resident set (ru_maxrss) during the measured call minus the peak before it (inputs, weight and
grad buffer already allocated); large tensors are mmap'd by the allocator and returned to the OS
when freed, so the delta is the transient memory of the log-prob part. On CUDA it is
torch.cuda.max_memory_allocated() minus the allocated bytes before the call. Time: min over
repeats in the same subprocess; old and chunked run alternately, side by side.

Usage:
    .venv/bin/python benchmarks/logprob_memory.py [--rows 8] [--tokens 256] [--chunk 1024]
        [--repeats 3] [--device cpu|cuda] [--out benchmarks/results/logprob_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPES = {"smollm2": (576, 49_152), "qwen151k": (896, 151_936)}
TARGETS = {"peak_ratio_max": 1 / 3, "time_ratio_max": 1.10}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_case(shape: str, path: str, rows: int, tokens: int, chunk: int, repeats: int, dev: str):
    """One (shape, path) case in this process: peak extra bytes of the first call, times."""
    import torch

    from posttrain import losses
    from posttrain.models.lean_logprobs import chunked_token_stats

    hidden_size, vocab = SHAPES[shape]
    torch.manual_seed(0)
    device = torch.device(dev)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device)
    head.weight.grad = torch.zeros_like(head.weight)
    hidden = torch.randn(rows, tokens, hidden_size, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (rows, tokens), device=device)
    g = torch.randn(rows, tokens, device=device)

    def step() -> None:
        if path == "old":
            logits = head(hidden)
            logp = losses.token_logprobs(logits, targets, 0.7)
            with torch.no_grad():
                ent = losses.token_entropy(logits.detach(), 0.7)
        else:
            h = hidden.reshape(rows * tokens, hidden_size)
            logp, ent = chunked_token_stats(
                h, head, targets.reshape(-1), 0.7, chunk, entropy="metric"
            )
            logp = logp.view(rows, tokens)
        (logp * g).sum().backward()
        float(ent.sum())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _maxrss_bytes()
    t0 = time.perf_counter()
    step()
    sync()
    times = [time.perf_counter() - t0]
    peak = (
        torch.cuda.max_memory_allocated() - before
        if device.type == "cuda"
        else _maxrss_bytes() - before
    )
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"peak_extra_bytes": int(peak), "times_s": times, "time_s": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="smollm2,qwen151k")
    ap.add_argument("--out", default="benchmarks/results/logprob_memory.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # shape:path (child)
    a = ap.parse_args()
    if a.case:
        shape, path = a.case.split(":")
        res = run_case(shape, path, a.rows, a.tokens, a.chunk, a.repeats, a.device)
        print("RESULT " + json.dumps(res))
        return
    results: dict[str, Any] = {}
    for shape in a.shapes.split(","):
        results[shape] = {}
        for path in ("old", "chunked"):
            cmd = [sys.executable, __file__, "--case", f"{shape}:{path}"]
            cmd += ["--rows", str(a.rows), "--tokens", str(a.tokens), "--chunk", str(a.chunk)]
            cmd += ["--repeats", str(a.repeats), "--device", a.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results[shape][path] = json.loads(line[len("RESULT ") :])
        old, new = results[shape]["old"], results[shape]["chunked"]
        results[shape]["peak_ratio"] = new["peak_extra_bytes"] / max(old["peak_extra_bytes"], 1)
        results[shape]["time_ratio"] = new["time_s"] / old["time_s"]
    print(f"rows={a.rows} tokens={a.tokens} chunk={a.chunk} device={a.device}")
    print(
        f"{'shape':10} {'old MiB':>9} {'chunk MiB':>9} {'ratio':>6} {'old s':>8} {'chunk s':>8} "
        f"{'ratio':>6}"
    )
    for shape, r in results.items():
        o, c = r["old"], r["chunked"]
        print(
            f"{shape:10} {o['peak_extra_bytes'] / 2**20:9.1f} {c['peak_extra_bytes'] / 2**20:9.1f}"
            f" {r['peak_ratio']:6.3f} {o['time_s']:8.3f} {c['time_s']:8.3f} {r['time_ratio']:6.3f}"
        )
    meta = {
        "rows": a.rows,
        "tokens": a.tokens,
        "chunk": a.chunk,
        "repeats": a.repeats,
        "device": a.device,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "targets": TARGETS,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
