"""Atomic checkpoints and exact resume.

A checkpoint directory holds a `save_pretrained` model and tokenizer (usable by transformers and
vLLM as they are), the DeepSpeed engine state (model, optimizer, scheduler; ZeRO partitions
per rank) and `trainer_state.json` + `rng.pt` (step, weight version, data position, RNG).
With LoRA (`model.lora.r > 0`) the top-level model holds the merged weights and `adapter/` the
peft adapter (`PeftModel.from_pretrained(base, "<ckpt>/adapter")`).
It is written to `<name>.tmp`, fsynced, then renamed: a crash never leaves a half checkpoint
under the final name (anything ending in `.tmp` is ignored by `latest`).
A trainer-state entry named `RANK_STATE` (at any depth) is no JSON: each rank's value is written to
its own `rank_state{r}.pt` (e.g. the batches an async run prefetched) and put back by `load`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.runtime import distributed as dist
from posttrain.runtime import lora, storage

STATE_FILE = "trainer_state.json"
RANK_STATE = "rank_state"  # a trainer-state key whose value each rank saves in rank_state{r}.pt


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """What a checkpoint holds besides the engine, noted at a step boundary.

    The trainer notes one when a step begins; a step that ends without an optimizer update
    (abandoned on SIGTERM, or skipped as non-finite) can then be saved as the checkpoint of the
    boundary before it, since the engine (weights, optimizer, LR schedule) has not changed.

    Attributes:
        state: a deep copy of the trainer state (`trainer_state.json`).
        rng: this rank's `rng_state()`.
    """

    state: dict[str, Any]
    rng: dict[str, Any]


def snapshot(trainer_state: dict[str, Any]) -> Snapshot:
    """`trainer_state` (copied) and this rank's RNG, as they are now."""
    return Snapshot(copy.deepcopy(trainer_state), rng_state())


def full_state_dict(
    engine: Any, merge_lora: bool = True, export: bool = True
) -> dict[str, torch.Tensor]:
    """The model's full (un-sharded) state dict on CPU; gathers ZeRO-3 partitions.

    For a peft (LoRA) model, `merge_lora=True` returns the merged weights under the base model's
    names (`posttrain.runtime.lora.merge_lora_state_dict`; the model is not modified); False
    returns the peft model's own state dict (base weights + adapter tensors).
    A module that trains more than it exports (PPO's `ActorCritic`: policy + critic) defines
    `export_state_dict(full)`; with `export=True` only that part (the policy, under its own
    names) is returned, for weight sync and `save_pretrained`.
    """
    module = engine.module if hasattr(engine, "module") else engine
    if export and hasattr(module, "export_state_dict"):
        return module.export_state_dict(full_state_dict(engine, merge_lora, export=False))
    if merge_lora and lora.is_peft(module):
        return lora.merged_state_dict(module, full_state_dict(engine, merge_lora=False))
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        out = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().cpu().clone()
        persistent = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().cpu().clone()
        return out
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save(
    ckpt_dir: Path,
    engine: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically (all ranks call this).

    The ranks agree on the outcome of each phase (prepare, write, rename) with one collective
    where a barrier was, so a rank that cannot write (disk full) never leaves the others waiting:
    every rank raises the same way.

    Args:
        ckpt_dir: final directory name, e.g. `runs/x/checkpoints/step-00010`.
        engine: the DeepSpeed engine.
        tokenizer: saved next to the model.
        trainer_state: JSON-serialisable step/version/data position/algorithm state.
        rng: this rank's RNG state to save (a `Snapshot`'s); None = the RNG as it is now.

    Returns:
        The final checkpoint path.

    Raises:
        StorageError: some rank could not write its part (e.g. no space left on device); the
            `.tmp` directory is removed, nothing appears under `ckpt_dir` and every checkpoint
            saved before is untouched. (A rank whose failure is no OS error, e.g. a bug, raises
            that error itself.)
    """
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    _agree(_attempt(_prepare, tmp) if dist.is_main() else None, ckpt_dir, tmp)
    failed = None
    try:
        engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
    except Exception as err:  # a write failed: reported at the agreement below
        failed = err
        # DeepSpeed's writes (torch.save) come after all its collectives but its closing
        # barrier, which the other ranks now wait in
        dist.barrier()
    weights = full_state_dict(engine, merge_lora=False)  # a collective under ZeRO-3
    if failed is None:
        failed = _attempt(_write_files, tmp, engine, tokenizer, trainer_state, rng, weights)
    _agree(failed, ckpt_dir, tmp)
    _agree(_attempt(_commit, tmp, ckpt_dir) if dist.is_main() else None, ckpt_dir, tmp)
    return ckpt_dir


def _prepare(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "engine").mkdir(parents=True)


def _write_files(
    tmp: Path,
    engine: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    rng: dict[str, Any] | None,
    weights: dict[str, torch.Tensor],
) -> None:
    """Everything but the engine state: the model (rank 0), this rank's RNG and rank state."""
    trainer_state, per_rank = split_rank_state(trainer_state)
    module = engine.module
    if lora.is_peft(module) and dist.is_main():  # adapter in adapter/, merged model at the top
        lora.save_adapter(module, tmp / lora.ADAPTER_DIR, weights)
        weights = lora.merged_state_dict(module, weights)
    if dist.is_main():
        module = lora.base_model(module)
        if hasattr(module, "export_module"):  # PPO's ActorCritic saves only its policy
            module = module.export_module()
        module.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        # a VLM's tokenizer carries its processor (models/vlm.py): save all of it
        getattr(tokenizer, "posttrain_processor", tokenizer).save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    torch.save(rng_state() if rng is None else rng, tmp / f"rng_rank{dist.rank()}.pt")
    if per_rank:
        torch.save(per_rank, tmp / f"{RANK_STATE}{dist.rank()}.pt")


def split_rank_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, ...], Any]]:
    """`state` without its `RANK_STATE` entries, and those entries by their key path."""
    kept: dict[str, Any] = {}
    found: dict[tuple[str, ...], Any] = {}
    for key, value in state.items():
        if key == RANK_STATE:
            found[(key,)] = value
        elif isinstance(value, dict):
            kept[key], inner = split_rank_state(value)
            found.update({(key, *path): v for path, v in inner.items()})
        else:
            kept[key] = value
    return kept, found


def _merge_rank_state(state: dict[str, Any], per_rank: dict[tuple[str, ...], Any]) -> None:
    """Put `split_rank_state`'s entries back into `state` (where their parent dict exists)."""
    for path, value in per_rank.items():
        node: Any = state
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = value


def _commit(tmp: Path, ckpt_dir: Path) -> None:
    """fsync `tmp`, then rename it to `ckpt_dir` (rank 0)."""
    _fsync_tree(tmp)
    # an older checkpoint of this name moves aside in one rename: a process killed here
    # (e.g. by the watchdog) never leaves a half-deleted directory under the final name
    old = ckpt_dir.with_name(ckpt_dir.name + ".old.tmp")
    moved = ckpt_dir.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    try:
        os.replace(tmp, ckpt_dir)
    except OSError:
        if moved:  # the older one back under its name
            os.replace(old, ckpt_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _attempt(fn: Any, *args: Any) -> Exception | None:
    """Run `fn(*args)`; the exception it raised, or None."""
    try:
        fn(*args)
    except Exception as err:  # every rank learns of it at the next agreement
        return err
    return None


def _agree(failed: Exception | None, ckpt_dir: Path, tmp: Path) -> None:
    """One collective in place of a barrier: every rank learns which ranks failed; then
    rank 0 removes `tmp` and every rank raises (`StorageError`, or the failure itself where it
    is no OS error and no full disk)."""
    code = storage.failure_code(failed, tmp)
    me, world = dist.rank(), dist.world_size()
    codes = dist.all_reduce_max_list([float(code) if r == me else 0.0 for r in range(world)])
    if not any(codes):
        return
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if code == storage.OTHER:
        raise failed  # type: ignore[misc]  # a bug, not the storage: its own traceback
    codes_i = [int(c) for c in codes]
    raise storage.save_error(ckpt_dir, codes_i, me, failed, latest(ckpt_dir.parent))


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints` (ignores `.tmp` leftovers)."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.iterdir() if p.is_dir() and (p / STATE_FILE).is_file()]
    done = [p for p in done if not p.name.endswith(".tmp")]
    return max(done, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"], default=None)


def prune(checkpoints: Path, keep: int, prefix: str = "step-") -> list[Path]:
    """Delete all but the newest `keep` complete periodic checkpoints (main rank only).

    Only complete `<prefix>*` directories count and are deleted; `final`, `interrupted-*` and
    `.tmp` leftovers are never touched. keep <= 0 keeps everything.

    Returns:
        The deleted directories, oldest first.
    """
    if keep <= 0 or not dist.is_main() or not checkpoints.is_dir():
        return []
    done = [
        p
        for p in checkpoints.iterdir()
        if p.is_dir()
        and p.name.startswith(prefix)
        and not p.name.endswith(".tmp")
        and (p / STATE_FILE).is_file()
    ]
    done.sort(key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])
    doomed = done[:-keep]
    for path in doomed:
        # rename first: a process killed mid-delete leaves a `.tmp` name, never a half checkpoint
        trash = path.with_name(path.name + ".old.tmp")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def load(ckpt_dir: Path, engine: Any) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) and RNG; return the trainer state (with this
    rank's `RANK_STATE` entries back in place)."""
    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a posttrain checkpoint (no {STATE_FILE})")
    engine.load_checkpoint(str(ckpt_dir / "engine"), tag="state")
    rng_file = ckpt_dir / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = json.loads(state_file.read_text())
    rank_file = ckpt_dir / f"{RANK_STATE}{dist.rank()}.pt"
    if rank_file.is_file():  # none: this rank saved none (or the run had fewer ranks)
        _merge_rank_state(state, torch.load(rank_file, weights_only=False))
    return state
