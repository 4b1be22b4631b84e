"""The one training loop: algorithm-blind, on a DeepSpeed engine.

    batch = algorithm.make_batch(step)           # rollouts, rewards, advantages... or SFT rows
    for update in batch.updates:
        for micro_batch in batch.micro_batches:
            loss_share = algorithm.loss(engine(micro_batch), micro_batch, batch)
            engine.backward(loss_share * world_size)   # DeepSpeed averages over ranks
        engine.step()                            # clip, AdamW, schedule
    algorithm.after_step()                       # e.g. push weights into vLLM

A NaN/inf loss or gradient skips its update (runtime/numerics.py); SIGTERM ends the run with a
checkpoint and exit status 0 (runtime/preemption.py).

Loss shares are divided by the batch's global (whole-step, all-rank) denominators, so micro-batch
1 x 8 and 8 x 1 and 2 ranks x 4 give the same gradient. What the loop knows of an algorithm is its
registry entry (`algorithms.AlgorithmSpec`) and the `Algorithm` protocol (algorithms/base.py).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.algorithms import algorithm_spec, build_algorithm
from posttrain.algorithms.base import (
    PADDING_KEY,
    StepBatch,
    add_shares,
    model_inputs,
    pad_counts,
    reduce_shares,
)
from posttrain.config import Config, to_dict, warmup_config
from posttrain.errors import ConfigError, NumericalError, PreemptedError, RolloutError
from posttrain.eval.evaluate import eval_settings
from posttrain.eval.pass_curve import run_curves
from posttrain.eval.report import RunResult, finish
from posttrain.models import load_tokenizer, make_tiny
from posttrain.models.tiny_vlm import build_tiny_vlm
from posttrain.models.vlm import check_vlm_config, is_vlm
from posttrain.rollout.vllm_local import close_live_engines
from posttrain.runtime import checkpoint, dsconfig, phase_trace, rundir
from posttrain.runtime import distributed as dist
from posttrain.runtime.data_log import DataLog, drawn_rows
from posttrain.runtime.logging import RunLogger, progress
from posttrain.runtime.numerics import (
    BadStep,
    BadSteps,
    GradientCheck,
    data_position,
    describe_rows,
    update_suppressed,
)
from posttrain.runtime.preemption import Preemption
from posttrain.runtime.schedule import loss_below, lr_multiplier
from posttrain.runtime.watchdog import Watchdog


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(cfg: Config) -> str:
    """`tiny` (`tiny-vlm`) -> build the tiny (vision-language) model into the output dir (rank
    0), else the configured path."""
    if cfg.model.path not in ("tiny", "tiny-vlm"):
        return cfg.model.path
    vision = cfg.model.path == "tiny-vlm"
    out = Path(cfg.train.output_dir) / ("tiny-vlm" if vision else "tiny-model")
    if dist.is_main() and not (out / "config.json").is_file():
        if vision:
            build_tiny_vlm(out, seed=cfg.train.seed)
        else:
            make_tiny(out, size=cfg.model.tiny_size, seed=cfg.train.seed)
    dist.barrier()
    return str(out)


class Trainer:
    """Runs one algorithm for `train.steps` optimizer-step batches.

    Args:
        config: the whole run's Config.
    """

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.out = Path(config.train.output_dir)
        # a user mistake (ConfigError) before the first step puts it back as it is now
        self._before = rundir.snapshot(self.out)
        self.step = self._start_step = 0
        gc.collect()  # finalise engines of earlier Trainers now, not midway through this init
        close_live_engines()  # and those still referenced (a variable about to be reassigned)
        # quiet console: third-party logs -> <output_dir>/third_party.log (runtime/logging.py)
        from posttrain.runtime.logging import quiet_console

        with quiet_console(config.train.output_dir, verbose=config.log.verbose):
            dist.init_distributed(config.train.dist_timeout_s)
        set_seed(config.train.seed)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            start_path = resolve_model_path(config)
            if is_vlm(start_path):  # a VLM's unsupported options: before any warm-up
                check_vlm_config(config, rolls_out=config.train.algorithm != "sft")
            self.model_path = self._warmup(start_path)
            with phase_trace.span("model load"):  # POSTTRAIN_PHASE_TRACE (opt-in)
                self.tokenizer = load_tokenizer(self.model_path)
                self.engine = self._build_engine()
                self.algorithm = build_algorithm(
                    config, self.model_path, self.tokenizer, self.engine
                )
        except ConfigError:
            self._undo()
            raise
        self.logger: RunLogger | None = None
        self.history: list[dict[str, float]] = []
        self.eval_before: dict[str, float] = {}
        self.eval_after: dict[str, float] = {}
        # [S][P] correct counts of the pass@k curve's samples (eval.run_pass_k_max per problem)
        self.pass_before: list[list[int]] | None = None
        self.pass_after: list[list[int]] | None = None
        self.final_checkpoint: Path | None = None
        t = config.train
        # SIGTERM: a checkpoint and exit status 0 within train.preempt_grace_s
        self.preemption = Preemption(t.preempt_grace_s)
        self.preempted: Path | None = None  # the checkpoint a preemption ended the run with
        self.continue_hint: str | None = None  # how to continue it (default: train.resume=)
        # a NaN/inf loss or gradient skips its update; too many in a row stop the run
        self._fp16 = config.model.dtype == "float16"  # overflows: the loss scaler's business
        self.grad_check: GradientCheck | None = None  # made by the first update
        self.bad_steps = BadSteps(t.max_bad_steps, self.out)
        self.data_log = DataLog(self.out, dist.is_main())  # data_ids.jsonl: rows per step
        self._numerics_stop = False
        # the state noted as a step begins (`_start`), which an abandoned step and a stop on bad
        # steps save; not with async prefetch, whose state_dict waits for the queued generations
        self._notes_start = not (self.algorithm.rolls_out and config.rollout.max_staleness > 0)
        self._start: checkpoint.Snapshot | None = None
        self._saved: tuple[int, Path] | None = None  # (step, path) of the last periodic save
        # names the loop's phases; ends a rank stuck in one (train.phase_timeout_s)
        self.watchdog = Watchdog(
            config.train.phase_timeout_s,
            checkpoints=self.out / "checkpoints",
            rank=dist.rank(),
            world_size=dist.world_size(),
        )

    def _undo(self) -> None:
        """A user mistake leaves the output dir as it was (removed if this run made it)."""
        if dist.is_main():
            rundir.restore(self.out, self._before)

    def _warmup(self, model_path: str) -> str:
        """Run the optional SFT warm-up (once; reused on resume); return the model to train."""
        cfg, w = self.cfg, self.cfg.warmup
        if w.steps <= 0 or cfg.train.algorithm == "sft":
            return model_path
        out = self.out / "sft-warmup"
        final = out / "checkpoints" / "final"
        if not (final / checkpoint.STATE_FILE).is_file():
            warm = Trainer(warmup_config(cfg, model_path, str(out)))
            warm.continue_hint = "the same command continues the warm-up from it"
            warm.train()
            if warm.preempted is not None:  # SIGTERM during the warm-up: end here, exit 0
                raise PreemptedError(f"SFT warm-up preempted; checkpoint {warm.preempted}")
        return str(final)

    def _build_engine(self) -> Any:
        cfg = self.cfg
        spec = algorithm_spec(cfg.train.algorithm)
        # a causal LM, or what the algorithm trains instead (RM: scalar head; PPO: ActorCritic)
        model = spec.load_model(
            self.model_path,
            dtype=cfg.model.dtype,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            lora=cfg.model.lora,
            cfg=cfg,
        )
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            spec.param_groups(model, o.lr),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )

        def factor(step: int) -> float:
            return lr_multiplier(
                step,
                warmup=o.warmup_steps,
                total=cfg.train.steps * cfg.train.updates_per_batch,
                schedule=o.schedule,
                min_ratio=o.min_lr_ratio,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        ds_cfg = dist.deepspeed_config(
            zero_stage=cfg.train.zero_stage,
            micro_batch=cfg.train.micro_batch_size_per_device,
            max_grad_norm=o.max_grad_norm,
            dtype=cfg.model.dtype,
            offload_optimizer=cfg.train.offload_optimizer,
            offload_params=cfg.train.offload_params,
        )
        ds_cfg = dsconfig.apply_user_config(ds_cfg, cfg.train.deepspeed_config)
        return dist.build_engine(model, optimizer, scheduler, ds_cfg)

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Trainer state saved in every checkpoint."""
        return {
            "step": self.step,
            "algorithm": self.algorithm.state_dict(),
            "skipped_steps": self.bad_steps.total,
        }

    def save(self, name: str | None = None, start: checkpoint.Snapshot | None = None) -> Path:
        """Write an atomic checkpoint under `<output_dir>/checkpoints/`.

        Args:
            name: the directory name (default `step-<step>`).
            start: save this noted state and RNG instead of the current ones: the checkpoint
                of the boundary it was noted at (the engine must not have changed since).
        """
        state, rng = (self.state(), None) if start is None else (start.state, start.rng)
        ckpt = self.out / "checkpoints" / (name or f"step-{int(state['step']):06d}")
        with self.watchdog.phase("checkpoint save"):
            return checkpoint.save(ckpt, self.engine, self.tokenizer, state, rng)

    def resume(self, path: str | Path) -> None:
        """Restore a checkpoint (`auto` = the newest one in this run's output dir)."""
        if str(path) == "auto":
            found = checkpoint.latest(self.out / "checkpoints")
            if found is None:
                return
            path = found
        state = checkpoint.load(Path(path), self.engine)
        self.step = int(state["step"])
        if dist.is_main():  # which checkpoint a resume loaded (benchmarks/reliability.py reads it)
            print(f"[posttrain] resumed from {path} (step {self.step})", flush=True)
        self.bad_steps.total = int(state.get("skipped_steps", 0))
        self.algorithm.load_state_dict(state["algorithm"])
        self.algorithm.after_step(self.engine, self.step)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, float] | None:
        """One batch: make it, run its updates, sync; returns the step's metrics (None when a
        preemption abandoned the step: nothing of it was applied)."""
        with self.watchdog.phase("step"):  # the time between the named phases
            return self._train_step()

    def _train_step(self) -> dict[str, float] | None:
        t0 = time.perf_counter()
        self._start = checkpoint.snapshot(self.state()) if self._notes_start else None
        with self.watchdog.phase("generate" if self.algorithm.rolls_out else "batch"):
            batch = self.algorithm.make_batch(self.step, self.engine)
        t_batch = time.perf_counter()
        done = self._updates(batch)
        if done is None:
            return None
        self.data_log.write(self.step + 1, drawn_rows(self.algorithm))  # before its checkpoint
        t_train = time.perf_counter()
        metrics = reduce_shares(done.totals, batch.updates)
        metrics.update(batch.metrics)
        metrics.update(self._note_numerics(done))
        try:
            with self.watchdog.phase("weight sync"):
                metrics.update(self.algorithm.after_step(self.engine, self.step + 1))
        except RolloutError:
            self.step += 1  # the optimizer step happened; only the push to the engine failed
            raise
        t_end = time.perf_counter()
        if done.grad_norms:
            metrics["grad_norm"] = sum(done.grad_norms) / len(done.grad_norms)
        metrics["lr"] = float(self.engine.get_lr()[0])
        metrics["time/train_s"] = t_train - t_batch
        metrics.update(micro_batch_metrics(batch))
        metrics["time/step_s"] = t_end - t0
        if metrics.get("time/generate_s") and "tokens/generated" in metrics:
            metrics["throughput/generate_tokens_per_s"] = (
                metrics["tokens/generated"] / metrics["time/generate_s"]
            )
        metrics["throughput/step_tokens_per_s"] = batch_tokens(batch) / max(t_end - t0, 1e-9)
        self.step += 1
        return metrics

    def _updates(self, batch: StepBatch) -> _Updates | None:
        """Run the batch's optimizer updates. None: a preemption abandoned the step, at a safe
        point before its first update (the engine still holds the last completed step)."""
        world = dist.world_size()
        done = _Updates()
        if self.grad_check is None:  # hooks on the trained parameters, until train() ends
            self.grad_check = GradientCheck(self.engine.module, grads=not self._fp16)
        for update in range(batch.updates):
            may_abandon = update == 0 and self._start is not None  # alike on every rank
            with self.watchdog.phase("train"):
                self.grad_check.start()
                for mb in batch.micro_batches:
                    if may_abandon and self.preemption.abandon_requested():
                        return None
                    outputs = self.engine(**model_inputs(mb))
                    loss, shares = self.algorithm.loss(outputs, mb, batch)
                    with phase_trace.span("backward"):
                        self.engine.backward(loss * world, scale_wrt_gas=False)
                    value = float(loss.detach())
                    self.grad_check.see_loss(value)
                    add_shares(done.totals, {"loss": value, **shares})
                if may_abandon and self.preemption.abandon_requested():
                    return None
                local_norm = self._local_grad_norm()
                with phase_trace.span("optimizer step"):
                    self._optimizer_step(done)
            norm = self.engine.get_global_grad_norm()
            norm = local_norm if norm is None else norm
            if norm is not None:
                done.grad_norms.append(float(norm))
        return done

    def _optimizer_step(self, done: _Updates) -> None:
        """`engine.step()`; with its update suppressed (no weight, optimizer or LR change) when
        any rank saw a NaN/inf loss or gradient in this update or an earlier one of the step."""
        if not done.skipped:
            done.loss_bad, done.grad_bad = self.grad_check.agreed()
        if done.skipped or done.loss_bad or done.grad_bad:
            with update_suppressed(self.engine):
                self.engine.step()
            done.skipped += 1
        else:
            self.engine.step()
            if self.engine.was_step_applied():
                done.applied += 1
            elif not self._fp16:  # DeepSpeed found the gradient norm non-finite and skipped it
                done.skipped += 1

    def _note_numerics(self, done: _Updates) -> dict[str, float]:
        """Count a bad step (a line on stderr, a row in bad_steps.jsonl) or end a streak of
        them; the step's `train/skipped` (0/1) and `train/skipped_steps` (the run's total)."""
        if not done.skipped:
            self.bad_steps.good()
        else:
            before = data_position(self._start.state["algorithm"]) if self._start else []
            after = data_position(self.algorithm.state_dict())
            record = BadStep(
                self.step + 1, done.loss_bad, done.grad_bad, describe_rows(before, after)
            )
            record.data_before, record.data_after = before, after
            self._numerics_stop = self.bad_steps.bad(record, self._start, done.applied)
        return {
            "train/skipped": float(done.skipped > 0),
            "train/skipped_steps": float(self.bad_steps.total),
        }

    def _local_grad_norm(self) -> float | None:
        """Gradient norm before clipping, where DeepSpeed does not report it (ZeRO-0, 1 rank)."""
        if self.cfg.train.zero_stage != 0 or dist.world_size() != 1:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def train(self) -> list[dict[str, float]]:
        """Run until `train.steps` (or a preemption); evaluate before and after; returns the
        per-step metrics.

        Raises:
            RolloutError: the rollout engine failed (a resumable checkpoint was saved).
            NumericalError: more than `train.max_bad_steps` non-finite steps in a row (the
                checkpoint from before the first was saved).
        """
        with self.watchdog:  # a phase running past train.phase_timeout_s ends the process
            try:
                return self._train()
            except ConfigError:
                if self.step == self._start_step:  # found before this process trained a step
                    self._undo()
                raise

    def _train(self) -> list[dict[str, float]]:
        cfg = self.cfg
        with self.preemption:  # SIGTERM: a checkpoint and a clean end (runtime/preemption.py)
            if cfg.train.resume:
                with self.watchdog.phase("resume"):
                    self.resume(cfg.train.resume)
            self._start_step = self.step
            self.data_log.start(self.step)  # cuts lines of steps after it at the 1st write
            self.logger = RunLogger(
                self.out,
                wandb_mode=cfg.log.wandb,
                project=cfg.log.project,
                run_name=cfg.log.run_name,
                config=to_dict(cfg),
            )
            run_eval = cfg.eval.num_problems > 0 and self.algorithm.evaluates
            if run_eval and self.step == 0:
                with self.watchdog.phase("eval"):
                    self.eval_before = self.algorithm.evaluate(0)
                self.logger.log(0, self.eval_before)
                self.pass_before = self._pass_counts()
            bar = progress(cfg.train.steps, desc=cfg.train.algorithm) if cfg.log.progress else None
            if bar is not None:
                bar.update(self.step)
            try:
                if not self._loop(bar):
                    return self.history  # preempted: checkpoint saved, line printed
                if bar is not None:
                    bar.close()
                    bar = None
                if run_eval:
                    with self.watchdog.phase("eval"):
                        self.eval_after = self._final_eval()
                    self.pass_after = self._pass_counts()
                if self.step > 0:
                    self.final_checkpoint = self.save("final")
            finally:
                if self.grad_check is not None:  # its gradient hooks go with the run
                    self.grad_check.remove()
                    self.grad_check = None
                if bar is not None:
                    bar.close()
                self.logger.close()
        if dist.is_main():
            finish(self.result(run_eval))
        return self.history

    def _loop(self, bar: Any) -> bool:
        """Train up to `train.steps`; False when a preemption ended the run (checkpoint saved)."""
        while True:
            if self.preemption.stop_requested():  # at every boundary, the last one included
                self._preempted(abandoned=False)
                return False
            if self.step >= self.cfg.train.steps:
                return True
            try:
                metrics = self.train_step()
            except RolloutError as err:
                raise self._interrupted(err) from err
            if metrics is None:
                self._preempted(abandoned=True)
                return False
            self._after_metrics(metrics)
            if self._numerics_stop:
                raise self._stop_on_bad_steps()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)
            if loss_below(self.history, self.cfg.train.stop_loss):  # SFT: learned enough
                if dist.is_main():
                    line = f"10-step mean loss < {self.cfg.train.stop_loss} at step {self.step}"
                    print(f"[posttrain] {line}: done", flush=True)
                return True

    def _preempted(self, abandoned: bool) -> None:
        """Save the checkpoint of the last completed step on every rank; print the line."""
        if abandoned:  # the engine is unchanged since the abandoned step began
            path = self.save(f"preempted-step-{self.step:06d}", start=self._start)
        elif self._saved is not None and self._saved[0] == self.step:
            path = self._saved[1]  # this very step's periodic checkpoint
        else:
            path = self.save(f"preempted-step-{self.step:06d}")
        self.preempted = path
        if dist.is_main():
            print(
                self.preemption.message(self.step, path, abandoned, self.continue_hint), flush=True
            )

    def _stop_on_bad_steps(self) -> NumericalError:
        """Save the checkpoint from before the streak of bad steps (or, where no state was
        noted at its start, of now); the error that ends the run."""
        streak, start = self.bad_steps.streak, self.bad_steps.before_streak
        name = f"before-bad-step-{streak[0].step:06d}" if start else f"bad-step-{self.step:06d}"
        path = self.save(name, start=start)
        return NumericalError(self.bad_steps.stop_message(path, pre_state=start is not None))

    def result(self, evaluated: bool) -> RunResult:
        """What the run reports at its end (eval.json, the printed table, the PNG)."""
        return RunResult(
            algorithm=self.cfg.train.algorithm,
            steps=self.step,
            output_dir=self.out,
            eval_before=self.eval_before,
            eval_after=self.eval_after,
            eval_settings=eval_settings(self.cfg, self.tokenizer) if evaluated else None,
            final_checkpoint=self.final_checkpoint,
            pass_curves=self._pass_curves(),
        )

    def _pass_curves(self) -> dict[str, dict[str, Any]]:
        counts = {"before": self.pass_before, "after": self.pass_after}
        return run_curves(self.cfg, counts)

    def _pass_counts(self) -> list[list[int]] | None:
        """The pass@k curve's counts ([S][P] correct among `eval.run_pass_k_max` samples per
        held-out problem) with the current weights; None when off or the algorithm has none."""
        n = self.cfg.eval.run_pass_k_max
        counts = getattr(self.algorithm, "pass_counts", None)  # the sampling algorithms
        if n < 1 or counts is None:
            return None
        with self.watchdog.phase("pass@k curve"):
            return counts(n)

    def _interrupted(self, err: RolloutError) -> RolloutError:
        """Save a resumable checkpoint after a rollout failure; the error to end the run with."""
        path = self.save(f"interrupted-step-{self.step:06d}")
        return RolloutError(
            f"{err}\nstopped after step {self.step}; resumable checkpoint: {path} "
            f"(continue with train.resume={path})"
        )

    def _final_eval(self) -> dict[str, float]:
        """Evaluate the final weights (reusing the last step's eval if it ran at this step)."""
        last = self.history[-1] if self.history else {}
        reused = {k: v for k, v in last.items() if k.startswith("eval/")}
        if reused:
            return reused
        result = self.algorithm.evaluate(self.step)
        assert self.logger is not None
        t = self.cfg.train  # resumed at the last step: its row in metrics.jsonl has this eval
        logged = t.resume == "auto" and self.step == self._start_step > 0 < t.eval_every
        if not (logged and self.step % t.eval_every == 0):
            self.logger.log(self.step, result)
        return result

    def _after_metrics(self, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
            with self.watchdog.phase("eval"):
                metrics.update(self.algorithm.evaluate(self.step))
        self.history.append(metrics)
        assert self.logger is not None
        self.logger.log(self.step, metrics)
        if cfg.train.save_every and self.step % cfg.train.save_every == 0:
            self._saved = (self.step, self.save())
            checkpoint.prune(self.out / "checkpoints", cfg.train.keep_checkpoints)


@dataclass
class _Updates:
    """What a step's optimizer updates did (`Trainer._updates`)."""

    totals: dict[str, float] = field(default_factory=dict)  # summed metric shares
    grad_norms: list[float] = field(default_factory=list)
    applied: int = 0  # updates that changed the weights
    skipped: int = 0  # updates skipped (non-finite)
    loss_bad: bool = False  # the last check found a NaN/inf loss on some rank
    grad_bad: bool = False  # ... or gradient


def batch_tokens(batch: StepBatch) -> float:
    """Non-pad tokens in a batch (all ranks), for tokens/s."""
    local = sum(float(mb["attention_mask"].sum()) for mb in batch.micro_batches)
    return dist.all_reduce_sum(local)


def micro_batch_metrics(batch: StepBatch) -> dict[str, float]:
    """`train/pad_fraction`: padded slots / all slots (rows x width) of the step's micro-batches
    over all ranks (packed micro-batches hold none and are not counted),
    `train/micro_batches`: this rank's micro-batches per update (every rank runs as many), and
    `train/padding_micro_batches`: the zero-weight ones among them, summed over ranks."""
    padded, slots = pad_counts(batch.micro_batches)
    padded, slots = dist.all_reduce_sum(padded), dist.all_reduce_sum(slots)
    padding = sum(PADDING_KEY in mb for mb in batch.micro_batches)
    metrics = {
        "train/micro_batches": float(len(batch.micro_batches)),
        "train/padding_micro_batches": dist.all_reduce_sum(float(padding)),
    }
    if slots > 0:
        metrics["train/pad_fraction"] = padded / slots
    return metrics


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "reward/total/mean", "accuracy", "time/step_s")
    return {k.split("/")[-2] if "/" in k else k: f"{metrics[k]:.3g}" for k in keys if k in metrics}
