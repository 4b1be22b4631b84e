"""User DeepSpeed JSON (`train.deepspeed_config`) merged over the config posttrain generates.

posttrain drives DeepSpeed itself (`posttrain.runtime.distributed.deepspeed_config` builds the
config from the run's own keys). A JSON file such as `launch/deepspeed/zero3_offload.json` adds what
posttrain does not set (offload, bucket sizes, overlap, ...). Keys posttrain derives from its own
config must be absent, `"auto"`, or equal to posttrain's value; anything else is a ConfigError
naming the key and the posttrain setting to change instead:

    train_micro_batch_size_per_gpu    <- train.micro_batch_size_per_device
    gradient_accumulation_steps       <- 1 (the trainer accumulates over micro-batches itself)
    train_batch_size                  <- derived by DeepSpeed (must be "auto" or absent)
    managed_gradient_accumulation     <- false
    gradient_clipping                 <- optim.max_grad_norm
    zero_optimization.stage           <- train.zero_stage
    bf16.enabled / fp16.enabled       <- model.dtype
    optimizer / scheduler             <- never (posttrain builds AdamW + the LR schedule: optim.*)

`"auto"` anywhere else means "keep posttrain's value or DeepSpeed's default" (the key is dropped).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

AUTO = "auto"

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the sub-configs it builds).
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "managed_gradient_accumulation",
        "steps_per_print",
        "dump_state",
        "disable_python_gc",
        "disable_allgather",
        "communication_data_type",
        "seq_parallel_communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "gradient_allreduce_op",
        "sparse_gradients",
        "zero_optimization",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "activation_checkpointing",
        "comms_logger",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comet",
        "gradient_clipping",
        "fp16",
        "bf16",
        "bfloat16",
        "amp",
        "torch_autocast",
        "optimizer",
        "scheduler",
        "flops_profiler",
        "wall_clock_breakdown",
        "memory_breakdown",
        "autotuning",
        "use_data_before_expert_parallelism",
        "hybrid_engine",
        "pipeline",
        "data_efficiency",
        "curriculum_learning",
        "checkpoint",
        "data_types",
        "aio",
        "dataloader_drop_last",
        "log_level",
        "datastates_ckpt",
        "weight_quantization",
        "compile",
        "timers",
        "tensor_parallel",
        "expert_parallel",
        "sequence_parallel_size",
        "elasticity",
        "sparse_attention",
        "compression_training",
        "nebula",
        "eigenvalue",
        "progressive_layer_drop",
        "quantize_training",
    }
)

# Keys posttrain sets itself -> (the value posttrain uses when the key is absent from its config,
# the posttrain setting a user changes instead).
DERIVED: dict[str, tuple[Any, str]] = {
    "train_micro_batch_size_per_gpu": (None, "train.micro_batch_size_per_device"),
    "gradient_accumulation_steps": (
        1,
        "the batch shape (the trainer accumulates over all micro-batches of a step itself)",
    ),
    "managed_gradient_accumulation": (False, "nothing (posttrain needs it false)"),
    "gradient_clipping": (None, "optim.max_grad_norm"),
    "zero_optimization.stage": (0, "train.zero_stage"),
    "bf16.enabled": (False, "model.dtype"),
    "bfloat16.enabled": (False, "model.dtype"),
    "fp16.enabled": (False, "model.dtype"),
}
FORBIDDEN: dict[str, str] = {
    "train_batch_size": "DeepSpeed derives it from train.micro_batch_size_per_device x ranks",
    "optimizer": "posttrain builds AdamW from optim.* (lr, betas, eps, weight_decay)",
    "scheduler": "posttrain builds the LR schedule from optim.* (warmup_steps, schedule)",
}


def load_user_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; ConfigError naming the file if missing or not a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config: file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config {str(p)!r}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config {str(p)!r}: the top level must be an object")
    return data


def _lookup(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_conflicts(base: dict[str, Any], user: dict[str, Any], where: str = "") -> None:
    """Raise ConfigError for unknown top-level keys or settings that contradict `base`.

    Args:
        base: the config posttrain generated (`posttrain.runtime.distributed.deepspeed_config`).
        user: the user's JSON object.
        where: the file name, for messages.
    """
    src = f"train.deepspeed_config {where!r}: " if where else "train.deepspeed_config: "
    for key in user:
        if key not in KNOWN_KEYS:
            match = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            raise ConfigError(f"{src}unknown DeepSpeed key '{key}'{hint}")
    for key, why in FORBIDDEN.items():
        found, value = _lookup(user, key)
        if found and value != AUTO and value is not None:
            raise ConfigError(f"{src}'{key}' must be \"auto\" or absent: {why}")
    for key, (default, setting) in DERIVED.items():
        found, value = _lookup(user, key)
        if not found or value == AUTO:
            continue
        has, ours = _lookup(base, key)
        ours = ours if has else default
        if value != ours:
            raise ConfigError(
                f"{src}'{key}'={json.dumps(value)} conflicts with posttrain's {json.dumps(ours)}; "
                f'set {setting} instead (or use "auto" / remove the key)'
            )


def _merge(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in user.items():
        if value == AUTO:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = _merge({}, value)
        else:
            out[key] = value
    return out


def merge_deepspeed_config(
    base: dict[str, Any], user: dict[str, Any], where: str = ""
) -> dict[str, Any]:
    """Validate `user` against `base` (see module docstring), then deep-merge it over `base`.

    Nested objects merge key by key; `"auto"` values are dropped; neither input is modified.

    Returns:
        The merged DeepSpeed config dict.
    """
    check_conflicts(base, user, where)
    return _merge(base, user)


def apply_user_config(ds_config: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
    """`ds_config` unchanged when `path` is None, else merged with the JSON at `path`."""
    if path is None:
        return ds_config
    return merge_deepspeed_config(ds_config, load_user_config(path), str(path))


def check_user_config(cfg: Any) -> None:
    """Config-time check of `cfg.train.deepspeed_config` against the run's own settings."""
    from posttrain.runtime.distributed import deepspeed_config

    base = deepspeed_config(
        zero_stage=cfg.train.zero_stage,
        micro_batch=cfg.train.micro_batch_size_per_device,
        max_grad_norm=cfg.optim.max_grad_norm,
        dtype=cfg.model.dtype,
        offload_optimizer=cfg.train.offload_optimizer,
        offload_params=cfg.train.offload_params,
    )
    apply_user_config(base, cfg.train.deepspeed_config)
