"""Run untrusted Python in a contained subprocess (Linux only).

``run_python(code, stdin)`` executes ``code`` as ``main.py`` and returns a ``RunResult``. Hostile
code (fork/memory bombs, infinite loops that ignore signals, gigabytes of output, writes outside
its directory, reading the trainer's environment, network, signalling the parent) is contained
and reported through ``RunResult.reason``; nothing it does can hurt the calling process.

Process tree (no ``preexec_fn``: the parent may be multi-threaded, so all privileged setup runs
in a freshly exec'd, single-threaded launcher interpreter started as ``python -I -S -B``)::

    caller --Popen(start_new_session, empty env)--> outer launcher  (root, caller's namespaces)
      unshare(NEWNET|NEWPID|NEWNS|NEWIPC), fork --> init           (pid 1 of the new pid ns, root)
        fresh tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock; new /proc; fork --> user process
          setrlimit, setgroups([]), setresgid/setresuid(sandbox uid), NO_NEW_PRIVS, runs main.py

Isolation layers, each with its fallback (``RunResult.isolation`` lists those that worked):

- ``uid``: when the caller is root the user process runs as a dedicated unprivileged uid
  (``SANDBOX_UID_BASE + slot``; one slot per concurrent run, allocated with ``flock`` across
  processes). That makes ``RLIMIT_NPROC`` enforceable (it is ignored for root) and is what
  contains fork bombs; it also denies signalling any other process and writing anything not
  world-writable. Without root: no uid change and no ``RLIMIT_NPROC`` (it would count every
  process of the calling user) -- only the wall-clock kill bounds a fork bomb.
- ``pid``: a new pid namespace whose init is the launcher. When init exits the kernel kills
  every process left in it, so daemonised or ``setsid`` grandchildren cannot survive. Fallback:
  init is a child subreaper and kills leftovers by uid / parentage.
- ``net``: a new network namespace with no interfaces up (connecting to 127.0.0.1 fails with
  ENETUNREACH). A ``sys.addaudithook`` that refuses every socket is installed in all modes as
  defence in depth (it also covers AF_UNIX path sockets, which a netns does not); it is the only
  network barrier when the netns is unavailable, and ctypes can bypass it (best effort).
- ``mount``: a private mount namespace with fresh size-limited tmpfs over the world-writable
  directories, so writes outside the working directory vanish with the run and cannot fill the
  disk; the working directory itself lives in that tmpfs. Fallback: the working directory is the
  staging directory on disk (chowned to the sandbox uid) and ``/tmp`` writes are visible.
- ``ipc``: private SysV IPC / POSIX message queues.

The program runs under an interpreter the sandbox uid can read: the caller's own when its
binary and stdlib are world-readable, else ``/usr/local/bin/python3`` or ``/usr/bin/python3``
(``$POSTTRAIN_SANDBOX_PYTHON`` overrides). Slot locks live in ``/run/posttrain-sandbox-<euid>``.
World-readable files (the repo, ``/etc``) stay readable: the sandbox protects the host's
integrity, processes and secrets held in memory/env, not public files.

Always: empty environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = the working dir); isolated
interpreter (``-I -S -B``: no site-packages, no ``PYTHON*`` variables, no user site); rlimits
``CPU`` (soft = cpu_seconds -> SIGXCPU, hard = +1 s -> SIGKILL), ``AS``, ``FSIZE``, ``NOFILE``,
``CORE=0``; a wall-clock timer in init; stdout/stderr read with a byte cap (the run is killed
as soon as the cap is exceeded); a staging directory removed afterwards. No cgroups are used
(they belong to the machine's own supervisor here), so a fork bomb's memory is bounded by
``max_processes * memory_mb`` of address space rather than one total.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from rewards.sandbox_launcher import LAUNCHER

__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_SLOTS",
    "RunResult",
    "isolation_report",
    "run_python",
    "sandbox_processes",
]

SANDBOX_UID_BASE = 1_900_000_000  # far above any real account; uid == gid == base + slot
SANDBOX_UID_SLOTS = 256
_ENV_PYTHON = "POSTTRAIN_SANDBOX_PYTHON"  # override the interpreter used inside the sandbox
_ENV_NAMESPACES = "POSTTRAIN_SANDBOX_NAMESPACES"  # "0": skip namespaces (exercise the fallback)
_BACKSTOP_S = 3.0  # extra wall time before the caller SIGKILLs the launcher itself
_READ_CHUNK = 65536


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run.

    Attributes:
        returncode: The program's exit code, ``-signal`` when a signal killed it, ``None`` when
            the sandbox itself failed before or around the run.
        stdout: Decoded stdout (UTF-8, invalid bytes replaced), at most ``output_bytes`` bytes.
        stderr: Decoded stderr, at most ``output_bytes`` bytes.
        timed_out: True when a time limit ended the run (wall clock or CPU).
        reason: ``None`` for a clean exit 0, else one of ``timeout``, ``cpu_limit``,
            ``memory_limit``, ``output_limit``, ``runtime_error:<ExceptionName>``,
            ``exit_code:<n>``, ``signal:<NAME>``, ``sandbox_error:<detail>``.
        seconds: Wall-clock seconds of the whole run, including sandbox setup.
        isolation: The isolation layers that were active (subset of uid, net, pid, mount, ipc).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str | None
    seconds: float
    isolation: tuple[str, ...] = field(default=())


def _readable_by_others(path: Path, *, executable: bool) -> bool:
    """Whether an unrelated uid can reach ``path`` (every parent o+x, the file itself o+r)."""
    try:
        for parent in path.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        mode = path.stat().st_mode
    except OSError:
        return False
    need = stat.S_IROTH | (stat.S_IXOTH if executable else 0)
    return mode & need == need


@lru_cache(maxsize=1)
def _interpreter() -> str:
    """The Python used inside the sandbox; it must be usable by the unprivileged sandbox uid."""
    override = os.environ.get(_ENV_PYTHON)
    if override:
        return override
    current = Path(os.path.realpath(sys.executable))
    if os.geteuid() != 0:
        return str(current)
    stdlib = Path(os.path.realpath(os.__file__)).parent
    if _readable_by_others(current, executable=True) and _readable_by_others(
        stdlib / "os.py", executable=False
    ):
        return str(current)
    for cand in ("/usr/local/bin/python3", "/usr/bin/python3"):
        real = Path(os.path.realpath(cand))
        if real.is_file() and _readable_by_others(real, executable=True):
            return str(real)
    raise RuntimeError(
        f"no Python interpreter readable by the sandbox uid ({current} is not); "
        f"set {_ENV_PYTHON} to one (e.g. /usr/bin/python3)"
    )


def _lock_dir() -> Path:
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    d = base / f"posttrain-sandbox-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"sandbox lock dir {d} must be a 0700 directory owned by us")
    return d


@contextlib.contextmanager
def _uid_slot():
    """Yield a sandbox uid no other run (in any process) uses meanwhile; ``None`` if not root."""
    if os.geteuid() != 0:
        yield None
        return
    d = _lock_dir()
    order = list(range(SANDBOX_UID_SLOTS))
    random.shuffle(order)
    for _attempt in range(200):
        for slot in order:
            fd = os.open(d / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield SANDBOX_UID_BASE + slot
            finally:
                os.close(fd)
            return
        time.sleep(0.05)
    raise RuntimeError(f"all {SANDBOX_UID_SLOTS} sandbox uid slots are busy")


def sandbox_processes() -> list[int]:
    """Pids of live processes whose real uid is a sandbox uid (should be empty between runs)."""
    lo, hi = SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SLOTS
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
            text = Path(f"/proc/{p}/status").read_text()
            uid = int(next(ln for ln in text.splitlines() if ln.startswith("Uid:")).split()[1])
            if lo <= uid < hi:
                pids.append(int(p))
    return pids


def _pump(proc: subprocess.Popen, cap: int, deadline: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr (each capped at ``cap`` bytes) until EOF; enforce the backstop.

    Returns:
        (stdout, stderr, over_cap, backstop_killed).
    """
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    over = killed = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                if killed:
                    break  # something outside our tree holds the pipe; stop waiting for it
                _kill_group(proc)
                killed, deadline = True, now + 1.0
            for key, _ in sel.select(min(deadline - now, 0.5)):
                try:
                    chunk = os.read(key.fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk[: max(0, cap - len(buf))]
                if len(buf) >= cap and not over:
                    over = True
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)  # launcher -> init kills the program
            if proc.poll() is not None:
                deadline = min(deadline, time.monotonic() + 1.0)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), over, killed


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (init and the program follow via PDEATHSIG)."""
    if proc.returncode is None:  # never signal a reaped (reusable) pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, _READ_CHUNK):
            data += chunk
    convert = {
        "isolation": lambda v: tuple(x for x in v.split(",") if x),
        "status": int,
        "maxrss_kb": int,
        "strays": int,
        "cpu": float,
        "killed": lambda v: None if v == "None" else v,
        "error": str,
    }
    status: dict = {}
    for line in data.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key in convert and key not in status:  # first report wins (the first error is the cause)
            status[key] = convert[key](value)
    return status


def _exception_name(stderr: str) -> str | None:
    """The exception type named by a Python traceback's last line, e.g. ``ZeroDivisionError``."""
    if "Traceback (most recent call last):" not in stderr:
        return None
    last = next((ln for ln in reversed(stderr.splitlines()) if ln[:1].strip()), "")
    m = re.match(r"([A-Za-z_][\w.]*)(?::|$)", last)
    return m.group(1).rsplit(".", 1)[-1] if m else None


def _classify(
    status: dict, stderr: str, over: bool, backstop: bool, cpu_limit: float
) -> tuple[int | None, str | None]:
    """(returncode, reason) from the launcher's report."""
    if "error" in status:
        return None, f"sandbox_error:{status['error']}"
    if "status" not in status:
        last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, "timeout" if backstop else f"sandbox_error:launcher died: {last}"
    st = status["status"]
    rc = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
    if over:
        return rc, "output_limit"
    if status.get("killed") == "timeout" or backstop:
        return rc, "timeout"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and status["cpu"] >= cpu_limit - 0.05):
            return rc, "cpu_limit"
        return rc, f"signal:{signal.Signals(sig).name}"
    if rc != 0:
        name = _exception_name(stderr)
        if name == "MemoryError" or "Cannot allocate memory" in stderr[-2000:]:
            return rc, "memory_limit"
        return rc, f"runtime_error:{name}" if name else f"exit_code:{rc}"
    return rc, None


def run_python(
    code: str,
    stdin: str = "",
    *,
    cpu_seconds: float = 2,
    wall_seconds: float = 5,
    memory_mb: int = 256,
    output_bytes: int = 64_000,
    max_processes: int = 16,
    disk_mb: int = 32,
    files: dict[str, str | bytes] | None = None,
) -> RunResult:
    """Run ``code`` as ``main.py`` in the sandbox described in the module docstring.

    Args:
        code: Python source of the program.
        stdin: Text fed to the program's standard input.
        cpu_seconds: CPU-time limit of the program process (SIGXCPU, SIGKILL one second later).
        wall_seconds: Wall-clock limit; the whole process tree is killed at this point.
        memory_mb: Address-space limit per process (``RLIMIT_AS``).
        output_bytes: Cap on each of stdout and stderr; exceeding it kills the run.
        max_processes: ``RLIMIT_NPROC`` for the sandbox uid (threads count; root callers only).
        disk_mb: Size of each private tmpfs (and ``RLIMIT_FSIZE``, the largest file).
        files: Extra files (name -> content) placed next to ``main.py`` in the working dir.

    Returns:
        RunResult; hostile or failing programs are reported in ``reason``, never raised.
    """
    for name in files or {}:
        if os.path.basename(name) != name or name in ("", ".", "..", "main.py"):
            raise ValueError(f"sandbox file names must be plain names other than main.py: {name!r}")
    cfg = {
        "uid": None,
        "namespaces": int(os.geteuid() == 0 and os.environ.get(_ENV_NAMESPACES, "1") != "0"),
        "cpu": max(1, int(cpu_seconds + 0.999)),
        "mem": int(memory_mb) << 20,
        "nproc": int(max_processes),
        "fsize": int(disk_mb) << 20,
        "nofile": 64,
        "wall": float(wall_seconds),
        "disk_kb": int(disk_mb) << 10,
        "inodes": 4096,
    }
    start = time.monotonic()
    try:
        status, out, err, over, backstop = _execute(
            {**(files or {}), "main.py": code}, stdin, cfg, output_bytes
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = f"sandbox_error:{type(e).__name__}: {e}"
        return RunResult(None, "", "", False, reason, time.monotonic() - start)
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    rc, reason = _classify(status, stderr, over, backstop, float(cfg["cpu"]))
    return RunResult(
        returncode=rc,
        stdout=stdout,
        stderr=stderr,
        timed_out=reason in ("timeout", "cpu_limit"),
        reason=reason,
        seconds=time.monotonic() - start,
        isolation=status.get("isolation", ()),
    )


def _execute(
    files: dict[str, str | bytes], stdin: str, cfg: dict, output_bytes: int
) -> tuple[dict, bytes, bytes, bool, bool]:
    """Stage files, start the launcher, pump its output; returns (status, out, err, over, kill)."""
    staging = tempfile.mkdtemp(prefix="ptsbx-")
    status_r, status_w = os.pipe()
    try:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            Path(staging, name).write_bytes(data)
        with _uid_slot() as uid, tempfile.TemporaryFile() as tmp:
            tmp.write(stdin.encode())
            tmp.flush()
            cfg = {**cfg, "status_fd": status_w, "uid": uid, "gid": uid}
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            args = [f"{k}={v}" for k, v in cfg.items()]
            argv = [_interpreter(), "-I", "-S", "-B", "-c", LAUNCHER, *args]
            # stdin: a fresh read-only open of the unlinked file, so the program cannot write it
            with (
                open(f"/proc/self/fd/{tmp.fileno()}", "rb") as stdin_file,
                subprocess.Popen(
                    argv,
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=staging,
                    env=env,
                    start_new_session=True,
                    pass_fds=(status_w,),
                ) as proc,
            ):
                os.close(status_w)
                status_w = -1
                deadline = time.monotonic() + cfg["wall"] + _BACKSTOP_S
                out, err, over, backstop = _pump(proc, output_bytes, deadline)
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    proc.wait()
            return _read_status(status_r), out, err, over, backstop
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)


@lru_cache(maxsize=1)
def isolation_report() -> dict[str, object]:
    """Probe once which isolation layers work here (runs one trivial program).

    Returns:
        ``{"isolation": [...], "interpreter": path, "uid_switch": bool, "reason": str|None}``.
    """
    res = run_python("print('ok')")
    return {
        "isolation": list(res.isolation),
        "interpreter": _interpreter(),
        "uid_switch": "uid" in res.isolation,
        "reason": res.reason,
    }
