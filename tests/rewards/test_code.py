"""code_tests reward and the Python sandbox: scoring, formats, and hostile programs.

Hostile programs print ``pwned`` only if their attack worked and are scored against a single
stdin/stdout case expecting ``pwned``: reward 0 (with a reason) means the attack was contained.
Each test also checks the effect from the outside (file absent, listener silent, ...).

Which isolation layers the sandbox has here comes from the `sandbox_layers` fixture
(tests/conftest.py): a test that needs a missing layer skips, one that checks less without it
says so, and the run ends with one summary line naming the missing layers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards.code import code_tests, code_tests_detailed, extract_code
from rewards.sandbox import (
    SANDBOX_UID_BASE,
    SANDBOX_UID_SLOTS,
    isolation_report,
    run_python,
    sandbox_processes,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

FAST = {"cpu_seconds": 1, "wall_seconds": 2}  # limits for the hostile programs
PWNED = [{"input": "", "output": "pwned"}]


@pytest.fixture(autouse=True)
def _sandbox_summary(sandbox_layers):
    """Every test here counts for the end-of-run line on missing isolation layers."""
    return sandbox_layers


def _hostile(code: str, **limits) -> tuple[float | None, str | None]:
    [res] = code_tests_detailed([""], [code], [PWNED], **{**FAST, **limits})
    return res.reward, res.reason


def _wait_no_strays(timeout: float = 3.0) -> list[int]:
    end = time.monotonic() + timeout
    while (left := sandbox_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


# ---------------------------------------------------------------- pure: extraction, validation


def test_extract_code_prefers_last_python_fence() -> None:
    text = "Idea:\n```\nnot this\n```\n```python\nx = 1\n```\nthen\n```py\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"
    assert extract_code("sure:\n```python\nprint(5)\n") == "print(5)\n"  # cut at max tokens
    assert extract_code("```text\nhello\n```") == "```text\nhello\n```"  # non-python fence only


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (None, "has type NoneType"),
        (42, "has type int"),
        ([], "empty list"),
        ([{"input": "1"}], "case 0"),
        ([{"input": 1, "output": "1"}], "case 0"),
        (["assert True"], "case 0"),
        ("", "empty string"),
        ("assert (", "not valid Python"),
        ("x = 1", "without any assert"),
        ('{"inputs": ["1"], "outputs": ["1"]}', "without any assert"),
        ('[{"input": "1"}]', "case 0"),
    ],
)
def test_invalid_tests_column_names_sample_and_valid_forms(bad: object, fragment: str) -> None:
    ok = [{"input": "", "output": ""}]
    with pytest.raises(ValueError) as info:
        code_tests(["p", "p"], ["print()", "print()"], [ok, bad])
    msg = str(info.value)
    assert "tests[1]" in msg and fragment in msg and "valid:" in msg


def test_misaligned_columns_raise() -> None:
    with pytest.raises(ValueError, match="must align"):
        code_tests(["p"], ["print()"], [])


# ---------------------------------------------------------------- scoring


@pytest.mark.slow
def test_stdin_stdout_fractions() -> None:
    cases = [
        {"input": "1 2\n", "output": "3"},
        {"input": "10 -4\n", "output": "6\n"},
        {"input": "5 5\n", "output": "10"},
    ]
    correct = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "a, b = map(int, input().split())\nprint(a * b)"  # raw text, no fence
    partial = "a, b = map(int, input().split())\nprint(a + b if a != 5 else 0)"  # 2 of 3
    crash = "a, b = map(int, input().split())\nprint(a // (b - 5) + 3)"  # 1 2 -> 2, 10 -4, 5 5
    trailing = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()"
    completions = [correct, wrong, partial, crash, trailing]
    got = code_tests_detailed([""] * 5, completions, [cases] * 5)
    # crash: 1//(2-5)+3 = -1+3 = 2 (wrong), 10//(-9)+3 = -2+3 = 1 (wrong), 5 5 divides by zero
    assert [r.reward for r in got] == [1.0, 0.0, 2 / 3, 0.0, 1.0]
    assert got[0].reason is None and got[0].test_reasons == [None, None, None]
    assert got[1].reason == "wrong_answer" and got[1].passed == 0 and got[1].total == 3
    assert got[2].test_reasons == [None, None, "wrong_answer"]
    assert got[3].test_reasons == [
        "wrong_answer",
        "wrong_answer",
        "runtime_error:ZeroDivisionError",
    ]


@pytest.mark.slow
def test_assert_style_fractions_and_setup() -> None:
    tests = "import math\nassert f(2) == 4\nassert f(3) == 9\nassert math.isqrt(f(4)) == 4"
    correct = "```python\ndef f(x):\n    return x * x\n```"
    partial = "def f(x):\n    return x * x if x != 3 else 0"  # 2 of 3
    raises = "def f(x):\n    return 16 // (x - 3)"  # f(2) = -16, f(3) raises, f(4) = 16 -> isqrt 4
    syntax = "def f(x) return x"
    got = code_tests_detailed([""] * 4, [correct, partial, raises, syntax], [tests] * 4)
    assert [r.reward for r in got] == [1.0, 2 / 3, 1 / 3, 0.0]
    assert got[1].test_reasons == [None, "assertion_failed", None]
    assert got[2].test_reasons == [
        "assertion_failed",
        "runtime_error:ZeroDivisionError",
        None,
    ]
    assert got[3].reason == "syntax_error" and got[3].total == 3


@pytest.mark.slow
def test_assert_style_check_function_is_one_test_and_json_cases() -> None:
    human_eval = (
        "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n\n"
        "check(inc)"
    )
    json_cases = '[{"input": "4", "output": "5"}, {"input": "9", "output": "10"}]'
    got = code_tests(
        ["", "", ""],
        ["def inc(x):\n    return x + 1", "def inc(x):\n    return 2", "print(int(input()) + 1)"],
        [human_eval, human_eval, json_cases],
    )
    assert got == [1.0, 0.0, 1.0]


@pytest.mark.slow
def test_cheating_exits_and_forged_results_score_zero() -> None:
    tests = "assert f() == 1\nassert f() == 2"
    early_exit = "import sys\ndef f():\n    return 0\nsys.exit(0)"
    hard_exit = "import os\ndef f():\n    return 0\nos._exit(0)"
    forged = "import sys\ndef f():\n    return 0\nprint('\\nfeedface 0 1 ok\\nfeedface 1 1 ok')"
    exit_in_test = "import sys\ndef f():\n    sys.exit(0)"
    got = code_tests_detailed([""] * 4, [early_exit, hard_exit, forged, exit_in_test], [tests] * 4)
    assert [r.reward for r in got] == [0.0, 0.0, 0.0, 0.0]
    assert got[0].reason == "exited_before_tests"
    assert got[1].reason == "no_result"
    assert got[2].reason == "assertion_failed"
    assert got[3].reason == "exited_during_tests"


@pytest.mark.slow
def test_empty_completion_is_no_code_and_unrelated_columns_ignored() -> None:
    got = code_tests_detailed(
        ["", ""], ["", "print(7)"], [PWNED, [{"input": "", "output": "7"}]], answer=["x", "y"]
    )
    assert [(r.reward, r.reason) for r in got] == [(0.0, "no_code"), (1.0, None)]


@pytest.mark.slow
def test_run_python_basics_and_isolation_report(sandbox_layers) -> None:
    res = run_python("import sys\nprint(sys.stdin.read().upper(), end='')\nsys.exit(3)", "abc")
    assert (res.returncode, res.stdout, res.reason) == (3, "ABC", "exit_code:3")
    assert not res.timed_out and res.seconds < 5
    report = isolation_report()
    assert report["reason"] is None
    # every layer this machine allows (probed independently: root, unshare(2)) is in use
    assert set(report["isolation"]) == set(res.isolation) == sandbox_layers.present()
    assert report["uid_switch"] is sandbox_layers.available("uid")
    if sandbox_layers.available("uid"):  # the program really runs as the sandbox uid
        who = run_python("import os\nprint(os.getuid(), os.geteuid(), os.getgid())")
        uid, euid, gid = map(int, who.stdout.split())
        assert uid == euid == gid and SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_SLOTS
    if sandbox_layers.available("pid"):  # ... in its own pid namespace, under its init (pid 1)
        pids = run_python("import os\nprint(os.getpid(), os.getppid())")
        assert pids.stdout.split() == ["2", "1"]


@pytest.mark.slow
def test_many_samples_in_parallel_throughput() -> None:
    n = 24
    t0 = time.monotonic()
    got = code_tests(
        [""] * n, ["print(int(input()) * 2)"] * n, [[{"input": "21", "output": "42"}]] * n
    )
    elapsed = time.monotonic() - t0
    assert got == [1.0] * n
    print(f"\n{n / elapsed:.1f} sandboxed executions/s on {os.cpu_count()} cores")
    assert elapsed < 30


# ---------------------------------------------------------------- hostile programs


@pytest.mark.slow
def test_fork_bomb_contained_and_no_stray_processes(sandbox_layers) -> None:
    sandbox_layers.require("uid", "RLIMIT_NPROC cannot bound a fork bomb of this very user")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    reward, reason = _hostile(bomb)
    assert reward == 0.0 and reason in ("timeout", "runtime_error:BlockingIOError")
    assert time.monotonic() - t0 < 10
    reward, reason = _hostile("import os\nwhile True:\n    os.fork()")  # dies on EAGAIN
    assert reward == 0.0 and reason is not None
    assert _wait_no_strays() == []
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the machine still forks


@pytest.mark.slow
def test_memory_bomb() -> None:
    reward, reason = _hostile("a = []\nwhile True:\n    a.append(bytearray(10**7))")
    assert (reward, reason) == (0.0, "memory_limit")
    assert _hostile("x = bytearray(8 * 1024**3)\nprint('pwned')") == (0.0, "memory_limit")


@pytest.mark.slow
def test_infinite_loop_hits_cpu_limit() -> None:
    # The CPU-time limit (2 s) normally fires first; on a loaded machine the loop may not get
    # 2 s of CPU within the 5 s wall limit, and the wall-clock kill is the containment then.
    reward, reason = _hostile("while True:\n    pass")
    assert reward == 0.0 and reason in ("cpu_limit", "timeout")


@pytest.mark.slow
def test_loops_ignoring_sigterm_and_sigxcpu_are_killed() -> None:
    ignore = (
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
    )
    t0 = time.monotonic()
    busy = _hostile(ignore + "while True:\n    pass")
    sleepy = _hostile(ignore + "while True:\n    time.sleep(0.1)")
    assert busy[0] == 0.0 and busy[1] in ("timeout", "cpu_limit")
    assert sleepy == (0.0, "timeout")
    assert time.monotonic() - t0 < 12


@pytest.mark.slow
def test_gigabytes_of_output_are_capped() -> None:
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(chunk)"
    t0 = time.monotonic()
    res = run_python(code, output_bytes=64_000, **FAST)
    assert res.reason == "output_limit" and len(res.stdout) <= 64_000
    assert time.monotonic() - t0 < 5
    err = run_python("import os\nwhile True:\n    os.write(2, b'y' * 65536)", **FAST)
    assert err.reason == "output_limit" and len(err.stderr) <= 64_000
    assert _hostile(code) == (0.0, "output_limit")


@pytest.mark.slow
def test_writing_outside_the_work_dir_does_not_appear(tmp_path: Path, sandbox_layers) -> None:
    sandbox_layers.require("uid", "the program could write wherever this user can")
    name = f"pt-sandbox-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, Path("/var/tmp") / name, Path.cwd() / name, tmp_path / name]
    code = (
        "import os\nok = 0\n"
        f"for p in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "        ok += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('fine')\n"
        "print('pwned' if ok == 4 else ok)"
    )
    try:
        reward, reason = _hostile(code)
        assert reward == 0.0 and reason == "wrong_answer"
        # without the mount namespace, writes to world-writable /tmp and /var/tmp do land
        private_tmp = sandbox_layers.weaken("mount", "writes to /tmp, /var/tmp not checked")
        must_not_exist = targets if private_tmp else targets[2:]
        assert [t for t in must_not_exist if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@pytest.mark.slow
def test_deleting_files_outside_fails(tmp_path: Path, sandbox_layers) -> None:
    sandbox_layers.require("uid", "the program could delete this user's files")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    shared = Path("/tmp") / f"pt-sandbox-victim-{uuid.uuid4().hex}"
    shared.write_text("keep me too")
    shared.chmod(0o666)
    code = (
        "import os, shutil\nhit = []\n"
        f"for p in {[str(victim), str(shared)]!r}:\n"
        "    try:\n"
        "        os.remove(p)\n"
        "        hit.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        f"shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
        "print('pwned' if hit else 'kept')"
    )
    try:
        assert _hostile(code) == (0.0, "wrong_answer")
        assert victim.read_text() == "keep me" and shared.read_text() == "keep me too"
    finally:
        shared.unlink(missing_ok=True)


@pytest.mark.slow
def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("PT_SANDBOX_TEST_SECRET", secret)
    code = (
        "import glob, os\nseen = repr(dict(os.environ))\n"
        f"for p in glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ']:\n"
        "    try:\n"
        "        seen += open(p, 'rb').read().decode(errors='replace')\n"
        "    except OSError:\n"
        "        pass\n"
        f"print('pwned' if {secret!r} in seen else 'nothing')\n"
        "print(seen)"
    )
    assert _hostile(code) == (0.0, "wrong_answer")
    res = run_python(code)
    assert secret not in res.stdout and res.stdout.startswith("nothing")
    assert "PT_SANDBOX_TEST_SECRET" not in res.stdout


@pytest.mark.slow
def test_socket_to_local_listener_never_connects(sandbox_layers) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    plain = (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('pwned')"
    )
    raw = (  # bypasses the audit hook: only the network namespace stops this one
        "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port})\n"
        "addr += bytes([127, 0, 0, 1]) + bytes(8)\n"
        "print('pwned' if libc.connect(fd, addr, 16) == 0 else 'refused')"
    )
    try:
        assert _hostile(plain) == (0.0, "runtime_error:PermissionError")
        if sandbox_layers.weaken("net", "a raw ctypes socket is not blocked"):
            assert _hostile(raw) == (0.0, "wrong_answer")
        time.sleep(0.3)
        assert accepted == []
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.slow
def test_killing_the_parent_fails(sandbox_layers) -> None:
    sandbox_layers.require("uid", "the program could signal this test process")
    me = os.getpid()
    code = (
        "import os, signal\nhit = 0\n"
        f"for pid in (os.getppid(), {me}, {os.getppid()}, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        hit += pid != os.getpid()\n"
        "    except OSError:\n"
        "        pass\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError:\n"
        "    pass\n"
        "print('pwned' if hit else 'alive')"
    )
    reward, reason = _hostile(code)
    assert reward == 0.0 and reason is not None
    assert os.getpid() == me
    os.kill(me, 0)  # still here and signalable
