"""Reward throughput: math-verify, exact match, sandboxed code execution, the reward boundary.

Measures (each as min / median over repeats; a shared CPU is noisy):
  - ``math_answer`` rewards/s on a mix of cases (boxed integers, LaTeX fractions, decimals,
    percentages, intervals, sets, wrong answers, no answer, prose), called directly on the main
    thread (math-verify's own signal timeouts on) and through ``rewards.score`` (a worker thread,
    the boundary's timeout instead), as a GRPO step sees it;
  - ``exact_answer`` rewards/s (the arithmetic task's fast path), directly and through ``score``;
  - ``code_tests`` sandboxed executions/s on trivial programs (one stdin/stdout case each, and one
    assert-style harness run each), at most ``os.cpu_count()`` sandboxes at a time;
  - the boundary's own overhead: a no-op batch reward and a no-op ``@per_sample`` reward
    (one daemon thread per sample) through ``score``.

Usage:
    .venv/bin/python benchmarks/rewards_bench.py [--repeats 3] [--quick]
        [--out benchmarks/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any


def math_cases(k: int) -> list[tuple[str, str]]:
    """(completion, gold) pairs, a mix of what math_answer meets, right and wrong; k varies them."""
    return [
        (f"The answer is \\boxed{{{k}}}.", str(k)),
        (f"So x = \\boxed{{\\frac{{{k}}}{{{k + 1}}}}}", f"{k}/{k + 1}"),
        (f"Therefore the result is ${k}\\pi$.", f"{k}\\pi"),
        (f"<answer>{k}.50</answer>", f"{2 * k + 1}/2"),
        (f"#### {k},234", f"{k}234"),
        (f"It is {k}\\%.", f"{k / 100}"),  # math-verify: not equal (percent kept as is)
        (f"The interval is $[0, {k})$", f"[0,{k})"),
        (f"\\boxed{{\\{{1, 2, {k + 2}\\}}}}", f"\\{{{k + 2}, 2, 1\\}}"),
        (f"\\boxed{{\\sqrt{{{k}}}/2}}", f"\\frac{{\\sqrt{{{k}}}}}{{2}}"),
        (f"I think it's {k}.", str(k + 2)),  # wrong
        (f"\\boxed{{x^2 + {2 * k}x + {k * k}}}", f"(x+{k})^2"),
        ("I could not solve this problem.", str(k)),  # no answer
    ]


EXACT_CASES = [("Let me compute: 12 + 30 = 42", "42"), ("007", "7"), ("no number", "3")]
CODE_PROGRAM = "```python\nn = int(input())\nprint(n * 2)\n```"
CODE_ASSERT_PROGRAM = "```python\ndef double(n):\n    return n * 2\n```"


def stats(values: list[float]) -> dict[str, Any]:
    vals = sorted(float(v) for v in values)
    return {"min": vals[0], "median": statistics.median(vals), "max": vals[-1], "values": vals}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row(name: str, unit: str, n: int, seconds: list[float], note: str = "") -> dict[str, Any]:
    s = stats(seconds)
    return {
        "name": name,
        "unit": unit,
        "n_per_call": n,
        "seconds": s,
        "per_s_best": n / s["min"],
        "per_s_median": n / s["median"],
        "note": note,
    }


def _batch(cases: list[tuple[str, str]], n: int) -> tuple[list[str], list[str], list[str]]:
    picked = [cases[i % len(cases)] for i in range(n)]
    return ["q"] * n, [c for c, _ in picked], [g for _, g in picked]


def _math_batch(n: int) -> tuple[list[str], list[str], list[str]]:
    """n distinct math cases: case i % 12 of math_cases(3 + i // 12)."""
    width = len(math_cases(0))
    picked = [math_cases(3 + i // width)[i % width] for i in range(n)]
    return ["q"] * n, [c for c, _ in picked], [g for _, g in picked]


def bench_math(n: int, repeats: int) -> list[dict[str, Any]]:
    from rewards import score
    from rewards.math import exact_answer, math_answer

    p, c, a = _math_batch(n)
    scores = math_answer(p, c, a)
    correct = sum(s == 1.0 for s in scores)
    note = f"{n} distinct cases of 12 kinds; {correct}/{n} judged equivalent"
    out = [
        row(
            "math_answer (direct)", "rewards", n, timed(lambda: math_answer(p, c, a), repeats), note
        ),
        row(
            "math_answer (score)",
            "rewards",
            n,
            timed(lambda: score(["math_answer"], p, c, {"answer": a}, timeout_s=600), repeats),
            note,
        ),
    ]
    ne = n * 50
    p, c, a = _batch(EXACT_CASES, ne)
    out.append(
        row("exact_answer (direct)", "rewards", ne, timed(lambda: exact_answer(p, c, a), repeats))
    )
    out.append(
        row(
            "exact_answer (score)",
            "rewards",
            ne,
            timed(lambda: score(["exact_answer"], p, c, {"answer": a}, timeout_s=600), repeats),
        )
    )
    return out


def bench_code(n: int, repeats: int) -> list[dict[str, Any]]:
    from rewards.code import code_tests_detailed

    io_tests = [[{"input": str(i), "output": str(2 * i)}] for i in range(n)]
    assert_tests = [f"assert double({i}) == {2 * i}" for i in range(n)]
    completions = [CODE_PROGRAM] * n
    results = code_tests_detailed(["q"] * n, completions, io_tests)
    ok = sum(r.reward == 1.0 for r in results)
    gate = os.cpu_count() or 1
    io_note = f"stdin/stdout case, {ok}/{n} passed, <= {gate} sandboxes at once"
    io_seconds = timed(lambda: code_tests_detailed(["q"] * n, completions, io_tests), repeats)
    asserts = [CODE_ASSERT_PROGRAM] * n
    results = code_tests_detailed(["q"] * n, asserts, assert_tests)
    ok = sum(r.reward == 1.0 for r in results)
    as_note = f"assert harness, {ok}/{n} passed, <= {gate} sandboxes at once"
    as_seconds = timed(lambda: code_tests_detailed(["q"] * n, asserts, assert_tests), repeats)
    return [
        row("code_tests stdin/stdout", "executions", n, io_seconds, io_note),
        row("code_tests asserts", "executions", n, as_seconds, as_note),
    ]


def bench_boundary(n: int, repeats: int) -> list[dict[str, Any]]:
    import rewards
    from rewards import registry, score
    from rewards.boundary import PER_SAMPLE_CONCURRENCY, per_sample

    rewards.register("bench_noop", lambda prompts, completions, **_: [0.0] * len(completions))
    rewards.register("bench_noop_per_sample", per_sample(lambda prompt, completion, **_: 0.0))
    p, c = ["q"] * n, ["c"] * n
    try:
        batch = timed(lambda: score(["bench_noop"], p, c, {}), repeats)
        single = timed(lambda: score(["bench_noop_per_sample"], p, c, {}), repeats)
    finally:
        registry.unregister("bench_noop")
        registry.unregister("bench_noop_per_sample")
    return [
        row("no-op batch reward (score)", "rewards", n, batch, "one worker thread per call"),
        row(
            "no-op @per_sample reward (score)",
            "rewards",
            n,
            single,
            f"one thread per sample, waves of {PER_SAMPLE_CONCURRENCY}",
        ),
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'benchmark':36} {'unit':>10} {'n':>6} {'best/s':>10} {'median/s':>10}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:36} {r['unit']:>10} {r['n_per_call']:>6} {r['per_s_best']:>10.1f} "
            f"{r['per_s_median']:>10.1f}  {r['note']}"
        )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/rewards.json")
    args = ap.parse_args()
    n_math, n_code, n_boundary = (24, 4, 64) if args.quick else (240, 32, 512)

    rows = bench_math(n_math, args.repeats)
    rows += bench_code(n_code, args.repeats)
    rows += bench_boundary(n_boundary, args.repeats)
    print_table(rows)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "math_verify": _version("math-verify"),
        },
        "repeats": args.repeats,
        "quick": args.quick,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
