"""launch/: every config parses and validates, every launcher prints the right command (DRY_RUN=1).

The fast tests run no training; the slow ones build a DeepSpeed engine with each JSON and run a
real 2-rank GRPO step through `launch/torchrun_grpo.sh`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.runtime import distributed as dist
from posttrain.runtime.dsconfig import (
    KNOWN_KEYS,
    apply_user_config,
    load_user_config,
    merge_deepspeed_config,
)
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
DS_JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
ACCEL_YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def _stage(path: Path) -> int:
    return int(json.loads(path.read_text())["zero_optimization"]["stage"])


def _base(stage: int, dtype: str = "float32", micro: int = 4) -> dict:
    return dist.deepspeed_config(
        zero_stage=stage, micro_batch=micro, max_grad_norm=1.0, dtype=dtype
    )


def _no_auto(tree: object) -> bool:
    if isinstance(tree, dict):
        return all(_no_auto(v) for v in tree.values())
    return tree != "auto"


# ------------------------------------------------------------------------------ files parse
def test_launch_dir_has_every_launcher():
    names = {p.relative_to(LAUNCH).as_posix() for p in LAUNCH.rglob("*") if p.is_file()}
    for want in (
        "torchrun_grpo.sh",
        "accelerate_grpo.sh",
        "slurm_grpo.sbatch",
        "common.sh",
        "accelerate/multi_gpu.yaml",
        "accelerate/deepspeed_zero3.yaml",
        "deepspeed/zero2.json",
        "deepspeed/zero3.json",
        "deepspeed/zero3_offload.json",
    ):
        assert want in names, want


def test_every_json_and_yaml_parses():
    files = [*LAUNCH.rglob("*.json"), *LAUNCH.rglob("*.yaml"), *LAUNCH.rglob("*.yml")]
    assert len(files) >= 5
    for path in files:
        data = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        )
        assert isinstance(data, dict) and data, path


@pytest.mark.parametrize("path", ACCEL_YAMLS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.num_processes >= 1 and cfg.num_machines == 1
    assert cfg.mixed_precision == "no"  # precision is model.dtype, not accelerate's
    if cfg.distributed_type.value == "DEEPSPEED":
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file() and _stage(ds_file) == 3
    else:
        assert cfg.distributed_type.value == "MULTI_GPU"


# ---------------------------------------------------------------------- DeepSpeed JSON merge
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_merges_cleanly(path, dtype):
    user = load_user_config(path)
    assert set(user) <= KNOWN_KEYS
    stage = _stage(path)
    base = _base(stage, dtype)
    merged = merge_deepspeed_config(base, user, str(path))
    assert _no_auto(merged)
    assert merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["gradient_accumulation_steps"] == 1
    assert merged["managed_gradient_accumulation"] is False
    assert merged["gradient_clipping"] == 1.0
    assert "train_batch_size" not in merged and "optimizer" not in merged
    assert merged["zero_optimization"]["stage"] == stage
    assert merged.get("bf16", {}).get("enabled", False) is (dtype == "bfloat16")
    assert merged.get("fp16", {}).get("enabled", False) is False
    # Everything the JSON adds arrives: e.g. its ZeRO tuning keys.
    for key, value in user["zero_optimization"].items():
        assert merged["zero_optimization"][key] == value
    # The generated config is untouched.
    assert base == _base(stage, dtype)


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_passes_config_validation(path):
    cfg = load_config(
        ROOT / "recipes" / "quickstart.yaml",
        [f"train.deepspeed_config={path}", f"train.zero_stage={_stage(path)}"],
    )
    assert cfg.train.deepspeed_config == str(path)
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage.*train\.zero_stage"):
        load_config(None, [f"train.deepspeed_config={path}", "train.zero_stage=0"])


def _write(tmp_path: Path, data: object, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("user", "pattern"),
    [
        (
            {"zero_optimisation": {"stage": 2}},
            r"unknown DeepSpeed key 'zero_optimisation'.*"
            r"did you mean 'zero_optimization'",
        ),
        (
            {"train_micro_batch_size_per_gpu": 16},
            r"'train_micro_batch_size_per_gpu'=16 conflicts"
            r".*train\.micro_batch_size_per_device",
        ),
        ({"gradient_accumulation_steps": 8}, r"'gradient_accumulation_steps'=8 conflicts"),
        ({"train_batch_size": 64}, r"'train_batch_size' must be \"auto\""),
        ({"optimizer": {"type": "AdamW"}}, r"'optimizer' must be \"auto\" or absent.*optim\."),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler'"),
        ({"bf16": {"enabled": True}}, r"'bf16\.enabled'=true conflicts.*model\.dtype"),
        ({"gradient_clipping": 0.5}, r"'gradient_clipping'=0.5 conflicts.*optim\.max_grad_norm"),
        ({"managed_gradient_accumulation": True}, r"'managed_gradient_accumulation'"),
    ],
)
def test_conflicting_or_unknown_keys_raise(tmp_path, user, pattern):
    path = _write(tmp_path, user)
    with pytest.raises(ConfigError, match=pattern):
        apply_user_config(_base(0), path)
    with pytest.raises(ConfigError, match=pattern):  # caught when the config is loaded
        load_config(None, [f"train.deepspeed_config={path}", "train.micro_batch_size_per_device=4"])


def test_equal_values_and_auto_are_accepted(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 0, "reduce_bucket_size": "auto"},
        "steps_per_print": 5,
    }
    merged = apply_user_config(_base(0), _write(tmp_path, user))
    assert merged["steps_per_print"] == 5
    assert merged["zero_optimization"] == {"stage": 0}  # "auto" -> DeepSpeed's default
    assert apply_user_config(_base(0), None) == _base(0)


def test_bad_files_raise(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.deepspeed_config.*does not exist"):
        load_config(None, [f"train.deepspeed_config={tmp_path / 'missing.json'}"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_config(bad)
    with pytest.raises(ConfigError, match="top level must be an object"):
        load_user_config(_write(tmp_path, [1, 2]))


# -------------------------------------------------------------------------- launch scripts
@pytest.mark.parametrize("path", [*SCRIPTS, LAUNCH / "common.sh"], ids=lambda p: p.name)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    skip = ("DS_CONFIG", "MASTER_ADDR", "GPUS_PER_NODE", "PORT", "NPROC")
    full_env = {k: v for k, v in os.environ.items() if k not in skip and not k.startswith("SLURM_")}
    full_env.update({"DRY_RUN": "1", "PYTHON": sys.executable, **env})
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def _tail(cmd: list[str]) -> list[str]:
    """The `-m posttrain.cli train ...` part of a launcher command."""
    i = cmd.index("posttrain.cli")
    assert cmd[i - 1] == "-m"
    return cmd[i:]


def test_torchrun_dry_run():
    cmd = _dry_run("torchrun_grpo.sh", "train.steps=3", "a b=c d", NPROC="2", PORT="29555")
    assert cmd[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29555",
    ]
    assert cmd[5] == "--shutdown-timeout=90"  # > train.preempt_grace_s (60)
    assert _tail(cmd) == [
        "posttrain.cli",
        "train",
        "recipes/quickstart.yaml",
        "rollout.engine=hf",
        "train.steps=3",
        "a b=c d",  # overrides are passed through quoted, one argument each
    ]


def test_torchrun_dry_run_with_deepspeed_json():
    cmd = _dry_run(
        "torchrun_grpo.sh", DS_CONFIG="launch/deepspeed/zero3_offload.json", RECIPE="r.yaml"
    )
    assert _tail(cmd)[2:] == [
        "r.yaml",
        "rollout.engine=hf",
        "train.zero_stage=3",
        "train.deepspeed_config=launch/deepspeed/zero3_offload.json",
    ]


def test_missing_deepspeed_json_fails_before_launching():
    env = {**os.environ, "DRY_RUN": "1", "DS_CONFIG": "launch/deepspeed/nope.json"}
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_grpo.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "nope.json" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("path", ACCEL_YAMLS, ids=lambda p: p.name)
def test_accelerate_dry_run(path):
    rel = path.relative_to(ROOT).as_posix()
    cmd = _dry_run("accelerate_grpo.sh", "train.steps=2", CONFIG=rel, NPROC="2")
    assert cmd[:2] == ["accelerate", "launch"]
    assert cmd[cmd.index("--config_file") + 1] == rel
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    tail = _tail(cmd)
    assert tail[:4] == ["posttrain.cli", "train", "recipes/quickstart.yaml", "rollout.engine=hf"]
    assert tail[-1] == "train.steps=2"
    ds_file = (
        yaml.safe_load(path.read_text()).get("deepspeed_config", {}).get("deepspeed_config_file")
    )
    if ds_file:  # the YAML's DeepSpeed JSON reaches posttrain, with its ZeRO stage
        assert f"train.deepspeed_config={ds_file}" in tail
        assert f"train.zero_stage={_stage(ROOT / ds_file)}" in tail
    else:
        assert not any(a.startswith("train.deepspeed_config") for a in tail)


def test_slurm_dry_run(tmp_path):
    cmd = _dry_run(
        "slurm_grpo.sbatch",
        "train.output_dir=/shared/run",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_ADDR="node-a",
        GPUS_PER_NODE="4",
        PORT="29600",
    )
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    i = cmd.index("torch.distributed.run")
    assert cmd[i - 2 : i] == [sys.executable, "-m"]
    launcher = cmd[i + 1 : cmd.index("posttrain.cli") - 1]
    assert launcher == [
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_id=4242",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node-a:29600",
        "--shutdown-timeout=90",  # > train.preempt_grace_s: SIGTERM leaves time to checkpoint
    ]
    assert _tail(cmd)[-1] == "train.output_dir=/shared/run"


def test_slurm_master_addr_from_nodelist(tmp_path):
    """Without MASTER_ADDR the first host of the allocation (scontrol) is the rendezvous."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    scontrol.write_text(
        '#!/usr/bin/env bash\n[[ "$3" == "gpu[01-02]" ]] && printf "gpu01\\ngpu02\\n"\n'
    )
    scontrol.chmod(0o755)
    cmd = _dry_run(
        "slurm_grpo.sbatch",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_SUBMIT_DIR=str(ROOT),
        PATH=f"{fake}:{os.environ['PATH']}",
    )
    assert "--rdzv_endpoint=gpu01:29500" in cmd


def _sbatch_header(text: str) -> dict[str, str]:
    """The `#SBATCH --key=value` directives as a dict; sbatch reads them only before the first
    command line, so a directive after it (silently ignored by Slurm) is an error here."""
    header: dict[str, str] = {}
    in_header = True
    for line in text.splitlines()[1:]:  # after the shebang
        if line.strip() and not line.startswith("#"):
            in_header = False
        if not line.startswith("#SBATCH"):
            continue
        assert in_header, f"{line!r} comes after the first command: sbatch ignores it"
        m = re.fullmatch(r"#SBATCH\s+--([a-z-]+)(?:=(\S+))?\s*", line)
        assert m, f"unparsable directive: {line!r}"
        assert m[1] not in header, f"--{m[1]} given twice"
        header[m[1]] = m[2] or ""
    return header


def test_sbatch_header_requests_one_task_per_node():
    header = _sbatch_header((LAUNCH / "slurm_grpo.sbatch").read_text())
    assert header["ntasks-per-node"] == "1"  # one torchrun agent per node starts the ranks
    nodes, gpus = int(header["nodes"]), int(header["gpus-per-node"])
    assert nodes >= 1 and gpus >= 1
    assert int(header["cpus-per-task"]) >= gpus  # the one task feeds every GPU of its node
    assert re.fullmatch(r"\d+:\d\d:\d\d", header["time"])
    assert "ntasks" not in header and "gpus" not in header  # totals would fight the per-node ones
    # What Slurm exports for that allocation reaches srun and torchrun unchanged: one task per
    # node, `nodes` torchrun agents, `gpus-per-node` ranks each (nodes x gpus ranks in all).
    cmd = _dry_run(
        "slurm_grpo.sbatch",
        SLURM_NNODES=header["nodes"],
        SLURM_GPUS_ON_NODE=header["gpus-per-node"],
        SLURM_JOB_ID="7",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_ADDR="node-a",
    )
    srun = cmd[: cmd.index(sys.executable)]
    assert srun[0] == "srun"
    assert f"--nodes={nodes}" in srun
    assert f"--ntasks-per-node={header['ntasks-per-node']}" in srun
    launcher = cmd[cmd.index("torch.distributed.run") + 1 : cmd.index("posttrain.cli") - 1]
    assert f"--nnodes={nodes}" in launcher and f"--nproc_per_node={gpus}" in launcher


# ------------------------------------------------------------------------------- real runs
_ENGINE_SCRIPT = """
import json, sys, tempfile
import torch
from posttrain.runtime import distributed as dist
from posttrain.runtime.dsconfig import apply_user_config
from posttrain.models import load_policy

dist.init_distributed()
for path in sys.argv[2:]:
    stage = json.load(open(path))["zero_optimization"]["stage"]
    base = dist.deepspeed_config(
        zero_stage=stage, micro_batch=2, max_grad_norm=1.0, dtype="float32"
    )
    model = load_policy(sys.argv[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = dist.build_engine(model, opt, sched, apply_user_config(base, path))
    ids = torch.randint(0, 90, (2, 8))
    before = float(engine(input_ids=ids, labels=ids).loss)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    after = float(engine(input_ids=ids, labels=ids).loss)
    row = {"path": path, "stage": engine.zero_optimization_stage(), "before": before}
    row.update(offload=bool(engine.zero_cpu_offload()), after=after)
    print(json.dumps(row))
"""


def _fresh_env() -> dict[str, str]:
    """This process's environment without the distributed variables a child must set itself."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}


@pytest.mark.slow
def test_deepspeed_jsons_build_a_working_engine(tiny_model_dir):
    env = _fresh_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, str(tiny_model_dir), *map(str, DS_JSONS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in DS_JSONS]
    for row in rows:
        assert row["stage"] == _stage(Path(row["path"]))
        assert row["offload"] == ("offload" in row["path"])
        assert row["after"] < row["before"]  # one AdamW step on the same batch lowers the loss


@pytest.mark.slow
def test_torchrun_script_trains_two_ranks(tmp_path, tiny_model_dir):
    port = free_port()
    env = _fresh_env()
    env.update({"DRY_RUN": "0", "NPROC": "2", "PORT": str(port), "PYTHON": sys.executable})
    env["DS_CONFIG"] = "launch/deepspeed/zero2.json"
    out = tmp_path / "run"
    overrides = [
        "warmup.steps=0",
        f"model.path={tiny_model_dir}",
        f"train.output_dir={out}",
        "train.steps=1",
        "train.micro_batch_size_per_device=4",
        "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=4",
        "data.train_size=16",
        "data.max_prompt_tokens=32",
        "eval.num_problems=0",
        "log.wandb=disabled",
        "log.progress=false",
    ]
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_grpo.sh"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["ranks"] == 2.0
    assert (out / "checkpoints" / "final" / "model.safetensors").is_file()
