"""The sandbox's launcher program (`rewards/sandbox.py`): the privileged setup that runs in a
freshly exec'd, single-threaded interpreter before the untrusted code (see sandbox.py's module
docstring for the process tree and the isolation layers)."""

# Runs as `python -I -S -B -c LAUNCHER key=value ...` (values: numbers or None); see the module
# docstring. Only the user process returns from _main(); every other path ends in os._exit, so
# setup code can never fall through into running the untrusted program unsandboxed. Kept to
# cheap imports (no json/runpy/re): interpreter start-up is most of a trivial run's cost.
LAUNCHER = r"""
import ctypes, os, resource, signal, sys
C = {}
for a in sys.argv[1:]:
    k, v = a.split("=", 1)
    C[k] = None if v == "None" else float(v) if "." in v else int(v)
del sys.argv[1:]
S = C["status_fd"]
L = ctypes.CDLL(None, use_errno=True)
NS = (("net", 0x40000000), ("pid", 0x20000000), ("mount", 0x00020000), ("ipc", 0x08000000))
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18

def rep(**kv):  # one "key=value" line per item; values never contain newlines
    try:
        os.write(S, "".join("%s=%s\n" % (k, str(v).replace("\n", " ")) for k, v in kv.items())
                 .encode())
    except OSError:
        pass

def sysc(name, *args):
    if getattr(L, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s%r: %s" % (name, args[:2], os.strerror(e)))

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    sysc("mount", enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data))

def wait_then_reap(pid):
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # still a zombie: kill(pid) stays safe

def outer():
    L.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the caller
    iso = ["uid"] if C["uid"] is not None else []
    for name, flag in NS if C["namespaces"] else ():
        if L.unshare(flag) == 0:
            iso.append(name)
    rep(isolation=",".join(iso))
    pid = os.fork()
    if pid == 0:
        return init(iso)
    live = [True]
    def fwd(*_):
        if live[0]:
            os.kill(pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, fwd)
    wait_then_reap(pid)
    live[0] = False
    os.waitpid(pid, 0)
    os._exit(0)

def init(iso):
    L.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    L.prctl(1, signal.SIGKILL, 0, 0, 0)
    uid, gid = C["uid"], C["gid"]
    work = os.getcwd()
    if "mount" in iso:
        files = {}
        for n in os.listdir("."):
            with open(n, "rb") as f:
                files[n] = f.read()
        mount("none", "/", None, MS_REC | MS_PRIVATE)  # must succeed before any other mount
        opts = "size=%dk,nr_inodes=%d,mode=1777" % (C["disk_kb"], C["inodes"])
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
            if os.path.isdir(d) and not os.path.islink(d):
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
        if "pid" in iso:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        work = "/tmp/sandbox"
        os.mkdir(work, 0o700)
        for n, data in files.items():
            with open(os.path.join(work, n), "wb") as f:
                f.write(data)
    if uid is not None:
        for n in [""] + os.listdir(work):
            os.chown(os.path.join(work, n), uid, gid)
    user = os.fork()
    if user == 0:
        return work
    why = [None]
    def stop(reason):
        def handler(*_):
            if why[0] is None:
                why[0] = reason
                os.kill(user, signal.SIGKILL)
        return handler
    signal.signal(signal.SIGALRM, stop("timeout"))
    signal.signal(signal.SIGTERM, stop("terminated"))
    signal.setitimer(signal.ITIMER_REAL, C["wall"])
    wait_then_reap(user)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s in (signal.SIGALRM, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _, st, ru = os.wait4(user, 0)
    left = cleanup(uid)
    rep(status=st, cpu=ru.ru_utime + ru.ru_stime, maxrss_kb=ru.ru_maxrss, killed=why[0],
        strays=left)
    os._exit(0)

def cleanup(uid):
    # pid-namespace init: the kernel kills whatever is left when we exit. Otherwise kill
    # leftovers that run as the sandbox uid or were re-parented to us (we are a subreaper).
    if os.getpid() == 1:
        return 0
    me, killed = str(os.getpid()), 0
    for _ in range(200):
        victims = []
        for p in os.listdir("/proc"):
            try:
                with open("/proc/%s/status" % p) as f:
                    kv = dict(l.split(":", 1) for l in f if ":" in l)
            except (OSError, ValueError):
                continue
            if kv.get("PPid", "").strip() == me or (
                    uid is not None and kv.get("Uid", "").split()[:1] == [str(uid)]):
                victims.append(int(p))
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if not victims:
            return killed
        killed += len(victims)
    return killed

def user(work):
    os.chdir(work)
    R = resource
    lim = [(R.RLIMIT_CPU, C["cpu"], C["cpu"] + 1), (R.RLIMIT_AS, C["mem"], C["mem"]),
           (R.RLIMIT_FSIZE, C["fsize"], C["fsize"]), (R.RLIMIT_NOFILE, C["nofile"], C["nofile"]),
           (R.RLIMIT_CORE, 0, 0)]
    if C["uid"] is not None:
        lim.append((R.RLIMIT_NPROC, C["nproc"], C["nproc"]))
    for r, soft, hard in lim:
        R.setrlimit(r, (soft, hard))
    if C["uid"] is not None:
        os.setgroups([])
        os.setresgid(C["gid"], C["gid"], C["gid"])
        os.setresuid(C["uid"], C["uid"], C["uid"])
        if os.getuid() != C["uid"] or os.geteuid() != C["uid"]:
            raise OSError("uid switch did not stick")
    sysc("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot elevate
    L.prctl(1, signal.SIGKILL, 0, 0, 0)  # re-armed: a uid change clears PDEATHSIG
    os.environ["HOME"] = os.environ["TMPDIR"] = work
    os.close(S)

def _main():
    work = outer()
    user(work)

try:
    _main()
except BaseException as e:
    rep(error="%s: %s" % (type(e).__name__, e))
    os._exit(125)

def _no_sockets(event, args):
    if event.startswith("socket.") and event not in ("socket.gethostname", "socket.sethostname"):
        raise PermissionError("network access is disabled in the sandbox")

sys.addaudithook(_no_sockets)
del C, S, L, NS, rep, sysc, mount, wait_then_reap, outer, init, cleanup, user, _main
del ctypes, resource, signal
sys.argv[:] = ["main.py"]
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
_m = type(sys)("__main__")  # a fresh __main__ module, like running `python main.py`
_m.__file__ = "main.py"
sys.modules["__main__"] = _m
exec(_code, _m.__dict__)
"""
