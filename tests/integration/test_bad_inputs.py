"""The bad-input corpus (tests/bad_inputs/, README there): every case is a user mistake that must
end `posttrain train` with exit status 2, one line on stderr naming the field, file or row and what
is valid (the case's `expected.txt` is a fragment of it), no traceback, nothing on stdout, and
nothing left on disk: no output directory (or the one that was there, unchanged) and nothing in
the working directory.

The cases run through `posttrain.cli.main` in children forked from one driver process
(bad_inputs_driver.py: real file descriptors, exit status and process state, one import); the
cases in REAL_PROCESS also run as `python -m posttrain.cli` to show the two agree. Launcher cases
(`launch:` in case.yaml) run the launch/ script with DRY_RUN=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "bad_inputs"
DRIVER = Path(__file__).with_name("bad_inputs_driver.py")
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
# one case of each layer, also run as a fresh `python -m posttrain.cli` process
REAL_PROCESS = (
    "yaml_syntax_error",
    "unknown_nested_key",
    "jsonl_bad_line",
    "model_missing_shard",
    "reward_unknown_name",
    "deepspeed_json_syntax",
)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


@dataclass
class Prepared:
    """One case laid out under a tmp directory: the command line and what must stay unchanged."""

    name: str
    expected: str
    argv: list[str] = field(default_factory=list)
    launch: dict | None = None
    work: Path = Path()
    cwd: Path = Path()
    out: Path = Path()
    out_before: str | None = None


def _spec(name: str) -> dict:
    path = CORPUS / name / "case.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _fill(text: str, names: dict[str, Path]) -> str:
    for key, value in names.items():
        text = text.replace(key, str(value))
    return text


def _shard(model: Path, n: int) -> None:
    """Split model.safetensors into n shards with an index (as save_pretrained writes them)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, model / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _materialise_model(spec: dict, tiny: Path, model: Path) -> None:
    """$MODEL: a copy of the tiny model changed as the case's `model:` spec says."""
    shutil.copytree(tiny, model)
    if spec.get("shards"):
        _shard(model, int(spec["shards"]))
    changes = spec.get("tokenizer_config") or {}  # keys set (null: JSON null)
    if changes:
        path = model / "tokenizer_config.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data, indent=2))
    for name, text in (spec.get("write") or {}).items():
        (model / name).write_text(text)
    for name in spec.get("delete") or ():
        (model / name).unlink()


def _snapshot(path: Path) -> str | None:
    """A comparable picture of what is at `path` (None: nothing)."""
    if not path.exists():
        return None
    if path.is_file():
        return "file:" + path.read_text()
    return "dir:" + ",".join(sorted(str(p.relative_to(path)) for p in path.rglob("*")))


def prepare(name: str, tmp: Path, tiny: Path) -> Prepared:
    """Lay out case `name` under `tmp/name`: recipe with $CASE/$TINY/$MODEL/$OUT filled in."""
    case_dir, spec = CORPUS / name, _spec(name)
    work = tmp / name
    cwd, out, model = work / "cwd", work / "out", work / "model"
    cwd.mkdir(parents=True)
    names = {"$CASE": case_dir, "$TINY": tiny, "$MODEL": model, "$OUT": out}
    p = Prepared(name, (case_dir / "expected.txt").read_text().strip(), work=work, cwd=cwd, out=out)
    if "launch" in spec:
        env = {k: _fill(str(v), names) for k, v in (spec["launch"].get("env") or {}).items()}
        p.launch = {"script": spec["launch"]["script"], "env": env}
        p.argv = [_fill(str(a), names) for a in spec.get("args") or ()]
        return p
    if "model" in spec:
        _materialise_model(spec["model"], tiny, model)
    if "recipe" in spec:
        recipe = Path(_fill(str(spec["recipe"]), names))
    else:
        recipe = work / "recipe.yaml"
        recipe.write_text(_fill((case_dir / "recipe.yaml").read_text(), names))
    if spec.get("output") == "file":
        out.write_text("a file where the run directory would go\n")
    elif spec.get("output") == "dir":
        out.mkdir()
        (out / "notes.txt").write_text("kept\n")
    p.out_before = _snapshot(out)
    args = [_fill(str(a), names) for a in spec.get("args") or ()]
    p.argv = ["train", str(recipe), f"train.output_dir={out}", *args]
    return p


def check(p: Prepared, status: int, stdout: str, stderr: str) -> None:
    """The product rule for a bad input (module docstring)."""
    shown = f"exit {status}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    assert "Traceback" not in stdout + stderr, shown
    assert status == 2, shown
    assert stdout == "", shown
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"not one line on stderr\n{shown}"
    prefix = "posttrain: error: " if p.launch is None else ""
    assert lines[0].startswith(prefix), shown
    assert p.expected in lines[0], f"expected {p.expected!r} in the message\n{shown}"
    if p.launch is None:
        assert _snapshot(p.out) == p.out_before, f"the output dir changed: {_snapshot(p.out)}"
        assert not list(p.cwd.iterdir()), f"left in the working directory: {list(p.cwd.iterdir())}"


def _run_launch(p: Prepared) -> tuple[int, str, str]:
    env = {**ENV, "DRY_RUN": "1", "PYTHON": sys.executable, **p.launch["env"]}
    cmd = ["bash", str(ROOT / "launch" / p.launch["script"]), *p.argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def driven(request, tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Prepared, int, str, str]]:
    """The selected non-launcher cases run once through the driver: name -> (case, status, out,
    err)."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input"
    ]
    cases = [prepare(name, tmp, tiny_model_dir) for name in selected]
    cases = [p for p in cases if p.launch is None]
    jobs = [
        {
            "name": p.name,
            "argv": p.argv,
            "cwd": str(p.cwd),
            "stdout": str(p.work / "stdout.txt"),
            "stderr": str(p.work / "stderr.txt"),
        }
        for p in cases
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, str(DRIVER), str(tmp / "jobs.json"), str(tmp / "results.json")]
    proc = subprocess.run(cmd, cwd=tmp, env=ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    statuses = json.loads((tmp / "results.json").read_text())
    return {
        p.name: (
            p,
            statuses[p.name]["status"],
            (p.work / "stdout.txt").read_text(),
            (p.work / "stderr.txt").read_text(),
        )
        for p in cases
    }


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, driven, tmp_path, tiny_model_dir):
    if name in driven:
        check(*driven[name])
        return
    p = prepare(name, tmp_path, tiny_model_dir)
    check(p, *_run_launch(p))


@pytest.mark.parametrize("name", REAL_PROCESS)
def test_bad_input_real_process(name, tmp_path, tiny_model_dir):
    p = prepare(name, tmp_path, tiny_model_dir)
    cmd = [sys.executable, "-m", "posttrain.cli", *p.argv]
    proc = subprocess.run(cmd, cwd=p.cwd, env=ENV, capture_output=True, text=True, timeout=600)
    check(p, proc.returncode, proc.stdout, proc.stderr)


def test_corpus_shape():
    assert len(CASES) >= 40
    for name in CASES:
        case = CORPUS / name
        assert (case / "expected.txt").read_text().strip(), name
        spec = _spec(name)
        assert (case / "recipe.yaml").is_file() or "launch" in spec or "recipe" in spec, name
    assert set(REAL_PROCESS) <= set(CASES)
