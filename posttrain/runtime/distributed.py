"""Process-group and DeepSpeed-engine setup, kept in one place.

DeepSpeed is driven directly (not through accelerate): on CPU, accelerate 1.15's DeepSpeed
integration misreports the number of processes. One process still gets a real (gloo) group so
the same code path runs in tests, single-process runs and `torchrun` jobs.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_AUTO_PORT_MARK = "POSTTRAIN_AUTO_MASTER_PORT"


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def on_gpu() -> bool:
    """True when CUDA is available (the GPU build of everything is used)."""
    return torch.cuda.is_available()


def setup_environment() -> None:
    """Fill in the env vars DeepSpeed needs for a single process launched without torchrun."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # A port we picked ourselves is still held by this process's group; a child process that
    # inherits it (a CLI run started from a notebook or a test) must pick its own.
    mark = os.environ.get(_AUTO_PORT_MARK, "")
    parent_picked = mark.endswith(f":{os.environ.get('MASTER_PORT')}") and not mark.startswith(
        f"{os.getpid()}:"
    )
    if "MASTER_PORT" not in os.environ or (parent_picked and not _launched_by_torchrun()):
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ[_AUTO_PORT_MARK] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"


DEFAULT_TIMEOUT_S = 1800.0


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Make `timeout_s` the limit of every process group made from now on.

    `torch.distributed.new_group` (DeepSpeed's clones of the world group, which carry its
    gradient all-reduce) takes torch's module default, not the world group's timeout.
    """
    from torch.distributed import distributed_c10d

    limit = timedelta(seconds=float(timeout_s))
    distributed_c10d.default_pg_timeout = limit
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = limit
    return limit


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed once (gloo on CPU, nccl on GPU).

    Args:
        timeout_s: how long a collective waits for the other ranks before it raises
            (`train.dist_timeout_s`); applies to every group, DeepSpeed's included. A group
            that already exists keeps its limit.
    """
    setup_environment()
    if torch.distributed.is_initialized():
        return
    import deepspeed

    limit = set_collective_timeout(timeout_s)
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu() else "gloo", verbose=False, timeout=limit
    )
    if on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def shutdown() -> None:
    """Destroy torch.distributed's process groups once a run has finished on this rank.

    Call it only after a run that ended well: a rank that failed may leave another one inside a
    collective, where tearing down can hang. Without it, gloo's worker threads can still hold
    work items (with tensors) when the interpreter shuts down, and freeing them then aborts the
    process now and then ("terminate called without an active exception", exit -6) although
    the run itself succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of training processes."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank computes on."""
    if on_gpu():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    """Sum a Python float over all ranks."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    """The largest of a Python float over all ranks."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def all_reduce_max_list(values: list[float]) -> list[float]:
    """Element-wise maxima of a list of floats over all ranks, in one collective.

    The tensor lives on this rank's device (`device()`), so it works with NCCL as with gloo;
    the values come back as floats (the list itself when alone).
    """
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` when alone."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for all ranks (no-op when alone)."""
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch: int,
    max_grad_norm: float,
    dtype: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config the trainer uses.

    Gradient accumulation is unmanaged: the trainer calls `backward` once per micro-batch and
    `step` once per optimizer step, so the number of micro-batches may vary between steps.
    Offload (`train.offload_optimizer`, ZeRO >= 1; `train.offload_params`, ZeRO-3) puts the
    optimizer state / parameters in CPU memory; posttrain's `torch.optim.AdamW` then steps on
    the CPU (`zero_force_ds_cpu_optimizer: false`; DeepSpeed refuses a client optimizer with
    offload otherwise). This runs on CPU-only machines too (no DeepSpeedCPUAdam build needed).
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer or offload_params:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if offload_params:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def _drop_stale_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached process groups that were destroyed since they were made.

    An in-process vLLM engine destroys the groups it knows of when it is torn down; DeepSpeed
    caches a clone of the world group at module level, and a later `deepspeed.initialize` in
    the same process (a second Trainer, e.g. SFT warm-up then GRPO, or tests) would use it.
    """
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d

    live = distributed_c10d._world.pg_map
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        group = getattr(groups, name, None)
        if group is not None and not isinstance(group, dict) and group not in live:
            setattr(groups, name, None)


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ds_config: dict[str, Any],
) -> Any:
    """Wrap model and optimizer in a DeepSpeed engine."""
    import deepspeed

    _drop_stale_deepspeed_groups()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine
