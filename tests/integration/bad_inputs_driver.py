"""Run many `posttrain` command lines in one interpreter, each in a forked child (the bad-input
corpus, tests/integration/test_bad_inputs.py).

    python tests/integration/bad_inputs_driver.py JOBS.json RESULTS.json

JOBS.json is a list of `{"name", "argv", "cwd", "stdout", "stderr"}`: for each job a child forked
from this process runs `posttrain.cli.main(argv)` in `cwd` with its file descriptors 1 and 2 on the
files `stdout` and `stderr`, and ends with the exit status `python -m posttrain.cli` would have
(an uncaught exception prints its traceback and exits 1). RESULTS.json maps each name to its exit
status and the seconds it took. The parent does what `main` does before its first third-party
import, then imports the heavy modules once, so each child starts where a fresh process would be
after its imports and pays only for its own case.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

CHILD_TIMEOUT_S = 300.0


def _prepare() -> None:
    """What `posttrain.cli.main` sets up for `train`, then the imports a run makes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from posttrain.runtime.logging import route_third_party

    route_third_party(None)
    import datasets  # noqa: F401  (data loading)
    import transformers  # noqa: F401

    import posttrain.cli
    import posttrain.trainer  # noqa: F401  (torch, DeepSpeed, the algorithms)


def _exit_status(argv: list[str]) -> int:
    """`sys.exit(main(argv))` as the interpreter would end it."""
    from posttrain.cli import main

    try:
        return int(main(argv))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def _child(job: dict) -> None:
    os.chdir(job["cwd"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    status = 1
    try:
        status = _exit_status(job["argv"])
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


def _wait(pid: int) -> int:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def run_jobs(jobs: list[dict]) -> dict[str, dict]:
    """`{"status", "seconds"}` of each job, by name (see the module docstring)."""
    _prepare()
    results = {}
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job)
        status = _wait(pid)
        results[job["name"]] = {"status": status, "seconds": time.monotonic() - start}
    return results


if __name__ == "__main__":
    jobs_file, results_file = sys.argv[1:3]
    results = run_jobs(json.loads(Path(jobs_file).read_text()))
    Path(results_file).write_text(json.dumps(results))
