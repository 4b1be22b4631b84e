"""``code_tests``: reward = fraction of unit tests a completion's Python program passes.

Each sample's ``tests`` entry is one of:

- a list of ``{"input": str, "output": str}`` cases (also accepted as a JSON string of such a
  list): the program runs once per case with ``input`` on stdin and passes when it exits 0 and
  its stdout equals ``output`` after normalisation (whole text stripped, each line
  right-stripped, ``\\r\\n`` == ``\\n``);
- a string of Python test code run after the program in the same namespace (like appending it
  to the file; ``__name__ == "__main__"``, empty stdin). Every top-level ``assert`` is one test;
  other top-level statements (imports, helpers) are setup run in order. A string with no
  top-level ``assert`` (e.g. ``def check(candidate): assert ...`` + ``check(f)``) is one test.

All runs go through ``rewards.sandbox.run_python`` (see there for the isolation), at most
``os.cpu_count()`` at a time across all callers in this process. Assert-style results travel on
stdout as lines tagged with a per-run random nonce that the program never sees in its own
namespace, so ``sys.exit(0)``/``os._exit(0)`` before the tests or printing fake results scores 0
(a program that digs through interpreter frames could still find it: best effort).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rewards.sandbox import RunResult, run_python

__all__ = ["CodeResult", "code_tests", "code_tests_detailed", "extract_code"]

_SANDBOX_KW = ("cpu_seconds", "wall_seconds", "memory_mb", "output_bytes", "max_processes")
_VALID = (
    'valid: a non-empty list of {"input": str, "output": str} (or its JSON string), '
    "or a string of Python assert statements"
)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}
_GATE = threading.BoundedSemaphore(os.cpu_count() or 1)  # concurrent sandboxes per process

# The assert-style harness (main.py). The payload file is deleted before the program runs and
# the nonce only lives in this function's locals.
_HARNESS = r"""
def _pt_harness():
    import json, os, sys
    with open("payload.json") as f:
        p = json.load(f)
    os.unlink("payload.json")
    nonce, out, write = p["nonce"], os.dup(1), os.write

    def emit(i, ok, why):
        write(out, ("\n%s %d %d %s\n" % (nonce, i, ok, why)).encode())

    def error_name(e):
        return "assertion_failed" if isinstance(e, AssertionError) else (
            "runtime_error:" + type(e).__name__)

    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        prog = compile(p["code"], "solution.py", "exec")
    except (SyntaxError, ValueError):
        emit(-1, 0, "syntax_error")
        return
    try:
        exec(prog, g)
    except SystemExit:
        emit(-1, 0, "exited_before_tests")
        return
    except BaseException as e:
        emit(-1, 0, error_name(e))
        return
    k = 0
    for kind, src in p["steps"]:
        try:
            exec(compile(src, "tests.py", "exec"), g)
        except SystemExit:
            emit(-1, 0, "exited_during_tests")
            return
        except BaseException as e:
            if kind != "test":
                emit(-1, 0, "test_setup_failed:" + type(e).__name__)
                return
            emit(k, 0, error_name(e))
        else:
            if kind == "test":
                emit(k, 1, "ok")
        k += kind == "test"
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass

_pt_harness()
"""


@dataclass
class CodeResult:
    """Per-sample outcome of ``code_tests_detailed``.

    Attributes:
        reward: passed / total, or ``None`` when the sandbox itself failed (cannot judge).
        passed: Number of tests passed.
        total: Number of tests.
        reason: ``None`` when every test passed, else the first failing test's reason
            (``wrong_answer``, ``assertion_failed``, ``timeout``, ``cpu_limit``, ``memory_limit``,
            ``output_limit``, ``runtime_error:<Name>``, ``syntax_error``, ``no_code``, ...).
        test_reasons: [total] reason per test (``None`` = passed).
        seconds: Summed sandbox wall time of this sample's runs.
    """

    reward: float | None
    passed: int
    total: int
    reason: str | None
    test_reasons: list[str | None] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Spec:
    """A validated ``tests`` entry: stdin/stdout cases or assert-style steps."""

    cases: tuple[tuple[str, str], ...] = ()
    steps: tuple[tuple[str, str], ...] = ()

    @property
    def total(self) -> int:
        return len(self.cases) if self.cases else sum(k == "test" for k, _ in self.steps)


def extract_code(completion: str) -> str:
    """The last ```python (or py/python3) fenced block, else the last untagged fence, else all.

    An unterminated fence (a completion cut at max tokens) counts up to the end of the text.
    """
    blocks = _FENCE.findall(completion)
    tagged = [body for tag, body in blocks if tag.lower() in _PY_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    if tagged:
        return tagged[-1]
    if untagged:
        return untagged[-1]
    return completion


def _bad(i: int, what: str) -> ValueError:
    return ValueError(f"code_tests: tests[{i}] {what}; {_VALID}")


def _parse_cases(i: int, value: list | tuple) -> _Spec:
    if not value:
        raise _bad(i, "is an empty list")
    cases = []
    for j, case in enumerate(value):
        ok = isinstance(case, dict) and {"input", "output"} <= case.keys()
        if not ok or not all(isinstance(case[k], str) for k in ("input", "output")):
            raise _bad(i, f"case {j} is {type(case).__name__} {str(case)[:80]!r}")
        cases.append((case["input"], case["output"]))
    return _Spec(cases=tuple(cases))


def _parse_asserts(i: int, text: str) -> _Spec:
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise _bad(i, f"is not valid Python ({e.msg}, line {e.lineno})") from e
    if not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        raise _bad(i, "is a string without any assert statement")
    if not any(isinstance(n, ast.Assert) for n in tree.body):
        return _Spec(steps=(("test", text),))
    steps = [("test" if isinstance(n, ast.Assert) else "setup", ast.unparse(n)) for n in tree.body]
    return _Spec(steps=tuple(steps))


def _parse_tests(i: int, value: Any) -> _Spec:
    """Validate one sample's ``tests`` entry; raises ValueError naming the sample."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()  # numpy arrays from parquet/datasets
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                decoded = json.loads(stripped)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list):
                return _parse_cases(i, decoded)
        if not stripped:
            raise _bad(i, "is an empty string")
        return _parse_asserts(i, value)
    if isinstance(value, list | tuple):
        return _parse_cases(i, value)
    raise _bad(i, f"has type {type(value).__name__}")


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _gated(fn: Callable[..., RunResult], *args: Any, **kw: Any) -> RunResult:
    with _GATE:
        return fn(*args, **kw)


def _judge_case(res: RunResult, expected: str) -> str | None:
    if res.reason is not None:
        return res.reason
    return None if _normalise(res.stdout) == _normalise(expected) else "wrong_answer"


def _judge_asserts(res: RunResult, nonce: str, total: int) -> list[str | None]:
    """Per-test reasons from the nonce-tagged lines; missing results inherit the run's reason."""
    got: dict[int, str | None] = {}
    early: str | None = None
    for line in res.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) != 4 or parts[0] != nonce:
            continue
        if not parts[1].lstrip("-").isdigit():
            continue
        idx, ok, why = int(parts[1]), parts[2] == "1", parts[3]
        if idx < 0:
            early = why
        elif 0 <= idx < total and idx not in got:
            got[idx] = None if ok else why
    fallback = early or res.reason or "no_result"
    if res.reason is not None and res.reason.startswith("sandbox_error"):
        fallback = res.reason
    return [got.get(k, fallback) for k in range(total)]


def code_tests_detailed(
    prompts: list[str],
    completions: list[str],
    tests: list[Any],
    *,
    max_workers: int | None = None,
    **kw: Any,
) -> list[CodeResult]:
    """Run every sample's tests in the sandbox; see the module docstring for the formats.

    Args:
        prompts: [N] prompts (unused; part of the reward signature).
        completions: [N] completions; the code is ``extract_code(completion)``.
        tests: [N] test specs.
        max_workers: Thread-pool size (default ``os.cpu_count()``).
        **kw: ``cpu_seconds``, ``wall_seconds``, ``memory_mb``, ``output_bytes``,
            ``max_processes`` are passed to ``run_python``; other columns are ignored.

    Returns:
        [N] CodeResult.

    Raises:
        ValueError: a ``tests`` entry is invalid (message names the sample index) or the lists
            do not align.
    """
    if len(tests) != len(completions) or len(prompts) != len(completions):
        raise ValueError(
            f"code_tests: {len(prompts)} prompts, {len(completions)} completions and "
            f"{len(tests)} tests; they must align (one tests entry per completion)"
        )
    specs = [_parse_tests(i, t) for i, t in enumerate(tests)]
    limits = {k: kw[k] for k in _SANDBOX_KW if k in kw}
    codes = [extract_code(c) for c in completions]
    results: list[CodeResult | None] = [None] * len(codes)
    jobs: list[tuple[int, Any, str | None, Any]] = []  # (sample, future, nonce, expected)
    workers = max(1, min(max_workers or os.cpu_count() or 1, 64))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-tests") as pool:
        for i, (code, spec) in enumerate(zip(codes, specs, strict=True)):
            if not code.strip():
                results[i] = CodeResult(0.0, 0, spec.total, "no_code", ["no_code"] * spec.total)
            elif spec.cases:
                for stdin, expected in spec.cases:
                    fut = pool.submit(_gated, run_python, code, stdin, **limits)
                    jobs.append((i, fut, None, expected))
            else:
                nonce = secrets.token_hex(16)
                payload = json.dumps({"nonce": nonce, "code": code, "steps": spec.steps})
                files = {"payload.json": payload}
                fut = pool.submit(_gated, run_python, _HARNESS, "", files=files, **limits)
                jobs.append((i, fut, nonce, None))
        per_sample: dict[int, list[tuple[RunResult, list[str | None]]]] = {}
        for i, fut, nonce, expected in jobs:
            res = fut.result()
            if nonce is None:
                reasons = [_judge_case(res, expected)]
            else:
                reasons = _judge_asserts(res, nonce, specs[i].total)
            per_sample.setdefault(i, []).append((res, reasons))
    for i, runs in per_sample.items():
        reasons = [r for _, rs in runs for r in rs]
        seconds = sum(res.seconds for res, _ in runs)
        first = next((r for r in reasons if r is not None), None)
        passed = sum(r is None for r in reasons)
        broken = any(r is not None and r.startswith("sandbox_error") for r in reasons)
        reward = None if broken else passed / len(reasons)
        results[i] = CodeResult(reward, passed, len(reasons), first, reasons, seconds)
    return [r for r in results if r is not None]


def code_tests(
    prompts: list[str], completions: list[str], tests: list[Any], **kw: Any
) -> list[float | None]:
    """Fraction of each sample's tests that its program passes (``None``: sandbox failure).

    Args:
        prompts: [N] prompts.
        completions: [N] completions containing a Python program.
        tests: [N] stdin/stdout case lists or assert strings (see module docstring).
        **kw: Sandbox limits (see ``code_tests_detailed``); unrelated columns are ignored.

    Returns:
        [N] rewards in [0, 1] or ``None``.
    """
    return [r.reward for r in code_tests_detailed(prompts, completions, tests, **kw)]
