"""Semantic config checks a type system cannot express (`validate`), kept apart from the types.

Each check raises `ConfigError` naming the field (and, for a bad combination, both fields) and what
would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from posttrain.config.guide_checks import validate_guide
from posttrain.config.schema import CHOICES, Config
from posttrain.config.train_checks import validate_train
from posttrain.errors import ConfigError, did_you_mean
from posttrain.errors import require as _check


def _has_reward(cfg: Config) -> bool:
    """A configured reward, or an environment (its `final_reward()` scores the episodes; the
    `rewards` are then only needed where it returns None, checked when that happens)."""
    return len(cfg.rewards) >= 1 or cfg.env.name is not None


def validate(cfg: Config) -> None:
    """Semantic checks a type system cannot express; raises ConfigError naming the field."""
    for dotted, options in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in options, f"{dotted}: {value!r} is not one of {', '.join(options)}")
    r, t = cfg.rollout, cfg.train
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    if t.algorithm == "grpo":
        _check(r.samples_per_prompt >= 2, "rollout.samples_per_prompt must be >= 2 for GRPO")
        n = r.prompts_per_step * r.samples_per_prompt
        _check(
            n % t.micro_batch_size_per_device == 0,
            f"train.micro_batch_size_per_device={t.micro_batch_size_per_device} must divide "
            f"prompts_per_step * samples_per_prompt = {n}",
        )
        _check(_has_reward(cfg), "rewards: GRPO needs at least one reward")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    _check(
        r.kv_block_size is None or (r.kv_block_size >= 16 and r.kv_block_size % 16 == 0),
        f"rollout.kv_block_size={r.kv_block_size}: use a multiple of 16 (e.g. 32), or null",
    )
    _check(
        r.engine != "server" or bool(r.server_url.strip()),
        "rollout.engine=server needs rollout.server_url (e.g. http://127.0.0.1:8000; start one "
        "with `posttrain rollout-server MODEL`)",
    )
    _check(r.server_timeout_s > 0, "rollout.server_timeout_s must be > 0")
    _check(0 <= r.server_nccl_port < 65536, "rollout.server_nccl_port must be in [0, 65535]")
    if r.server_weight_transfer == "nccl":
        import torch

        _check(
            torch.cuda.is_available(),
            "rollout.server_weight_transfer=nccl needs CUDA on the trainer (NCCL); none is "
            "available here: use rollout.server_weight_transfer=file",
        )
    _check(r.max_staleness >= 0, "rollout.max_staleness must be >= 0 (0 = synchronous)")
    _validate_rollout_memory(cfg)
    _check(r.temperature > 0, "rollout.temperature must be > 0 (use eval for greedy decoding)")
    _check(0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]")
    validate_train(cfg)
    _check(cfg.loss.clip_low >= 0 and cfg.loss.clip_high >= 0, "loss.clip_low/clip_high >= 0")
    _check(cfg.loss.clip_low < 1, "loss.clip_low must be < 1")
    if cfg.loss.dual_clip_c is not None:
        _check(cfg.loss.dual_clip_c > 1, "loss.dual_clip_c must be > 1 (e.g. 3) or null")
    if cfg.loss.tis_cap is not None:
        _check(cfg.loss.tis_cap >= 1, "loss.tis_cap must be >= 1 or null (off)")
    _validate_rollout_correction(cfg)
    _check(cfg.kl.coef >= 0, "kl.coef must be >= 0")
    _check(cfg.optim.lr > 0, "optim.lr must be > 0")
    if r.overlong_penalty:
        _check(
            0 < r.overlong_buffer < r.max_new_tokens,
            "rollout.overlong_buffer must be in (0, max_new_tokens) when overlong_penalty is on",
        )
    for i, rw in enumerate(cfg.rewards):
        _check(rw.weight == rw.weight, f"rewards[{i}].weight must be a number")
    _check(cfg.eval.k >= 1, "eval.k must be >= 1")
    _check(cfg.eval.pass_k_max >= 0, "eval.pass_k_max must be >= 0 (0: no pass@k curve)")
    _check(cfg.eval.run_pass_k_max >= 0, "eval.run_pass_k_max must be >= 0 (0: no pass@k curve)")
    _check(0 < cfg.eval.top_p <= 1, "eval.top_p must be in (0, 1]")
    _validate_stages_resampling(cfg)
    _validate_data_format(cfg)
    _validate_sft_dpo_rm(cfg)
    _validate_ppo(cfg)
    _validate_research_methods(cfg)
    _validate_env(cfg)
    _validate_turn_credit(cfg)
    validate_guide(cfg)
    _validate_lora_deepspeed(cfg)
    _validate_paths(cfg)


def _check_model_dir(path: str | None, what: str) -> None:
    """A local model directory (a path that exists, or starts with /, . or ~) holds config.json;
    anything else is left to the loader as a hub name."""
    if path is None or (what == "model.path" and path == "tiny"):
        return
    p = Path(path).expanduser()
    if not p.exists() and not path.startswith(("/", ".", "~")):
        return
    _check(
        p.exists(),
        f"{what}: directory {path} does not exist (use a local model directory, a hub name"
        + (", or 'tiny' for the built-in model)" if what == "model.path" else ")"),
    )
    _check(p.is_dir(), f"{what}: {path} is a file; expected a model directory (with config.json)")
    _check(
        (p / "config.json").is_file(),
        f"{what}: {path} has no config.json; expected a directory written by save_pretrained "
        "(or `posttrain make-tiny`)",
    )
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise ConfigError(f"{what}: {p / 'config.json'} is not valid JSON ({err})") from None


def _validate_paths(cfg: Config) -> None:
    """Files and directories a run reads or writes: model dirs, the output dir, `train.resume`."""
    _check_model_dir(cfg.model.path, "model.path")
    _check_model_dir(cfg.model.ref_path, "model.ref_path")
    out, resume = Path(cfg.train.output_dir), cfg.train.resume
    _check(
        out.is_dir() or not out.exists(),
        f"train.output_dir: {out} is a file; name a directory (a new one, or an earlier run's)",
    )
    if resume not in (None, "auto"):
        from posttrain.runtime.checkpoint import STATE_FILE

        _check(
            (Path(resume) / STATE_FILE).is_file(),
            f"train.resume: {resume} is not a checkpoint (no {STATE_FILE}); use auto (the "
            "newest in train.output_dir), null, or a directory such as "
            "<output_dir>/checkpoints/step-000010",
        )


def _validate_rollout_correction(cfg: Config) -> None:
    """`loss.rollout_correction` (its name is checked against CHOICES), its threshold and cap."""
    lc = cfg.loss
    _check(
        lc.rollout_correction_threshold > 1,
        f"loss.rollout_correction_threshold={lc.rollout_correction_threshold} must be > 1 (C of "
        "token_mis/seq_mis, k of icepop/geo_mask: e.g. 2.0)",
    )
    _check(
        lc.tis_cap is not None or lc.rollout_correction not in ("icepop_tis", "geo_mask_tis"),
        f"loss.rollout_correction={lc.rollout_correction} multiplies its mask by the TIS weight: "
        f"set loss.tis_cap (>= 1), or use {lc.rollout_correction[:-4]} for the mask alone",
    )


def _validate_rollout_memory(cfg: Config) -> None:
    """gpu_memory_utilization ("auto" or a share) and sleep_level (0, 1, 2)."""
    r = cfg.rollout
    util = r.gpu_memory_utilization
    _check(
        util == "auto" or (isinstance(util, float) and 0 < util <= 1),
        f"rollout.gpu_memory_utilization={util!r}: use 'auto' or a number in (0, 1]",
    )
    _check(r.sleep_level in (0, 1, 2), f"rollout.sleep_level={r.sleep_level}: use 0, 1 or 2")
    if r.sleep_level:
        _check(
            r.max_staleness == 0,
            "rollout.sleep_level > 0 needs rollout.max_staleness=0 (async generation overlaps "
            "training, so vLLM's memory cannot be handed to the trainer)",
        )
        _check(
            r.sleep_level == 1 or cfg.model.lora.sync != "adapter",
            "rollout.sleep_level=2 drops the base weights, which model.lora.sync=adapter keeps "
            "using; use sleep_level=1",
        )


def _check_task_keys(task: dict, where: str, source: str = "arithmetic") -> None:
    """Every key of a built-in task's `task` mapping is one of its options (shapes: and valid)."""
    import inspect

    from posttrain.data.arithmetic import make_split
    from posttrain.data.shapes import resolve_task

    if source == "shapes":
        resolve_task(task, where)
        return

    params = inspect.signature(make_split).parameters
    names = [p for p in params if p not in ("split", "n", "seed")]
    for key in task:
        if key not in names:
            raise ConfigError(f"unknown config key '{where}.{key}'{did_you_mean(str(key), names)}")


def _validate_stages_resampling(cfg: Config) -> None:
    """Checks of `data.stages` and `rollout.history_resampling`."""
    if cfg.data.task and cfg.data.source in ("arithmetic", "shapes"):
        _check_task_keys(cfg.data.task, "data.task", cfg.data.source)
    stages = cfg.data.stages
    for i, st in enumerate(stages):
        _check(st.steps >= 1, f"data.stages[{i}].steps must be >= 1, got {st.steps}")
        if st.train_size is not None:
            _check(st.train_size >= 1, f"data.stages[{i}].train_size must be >= 1 or null")
        if st.task:
            _check(
                st.source in ("arithmetic", "shapes"),
                f"data.stages[{i}].task is only valid for source 'arithmetic' or 'shapes', not "
                f"{st.source!r}",
            )
            _check_task_keys(st.task, f"data.stages[{i}].task", st.source)
    total = sum(st.steps for st in stages)
    _check(
        total <= cfg.train.steps,
        f"data.stages: the stage steps sum to {total}, more than train.steps="
        f"{cfg.train.steps}; lower them or raise train.steps (the last stage runs to the end)",
    )
    if cfg.rollout.history_resampling:
        names = [r.name for r in cfg.rewards]
        _check(
            cfg.eval.reward in names,
            f"rollout.history_resampling judges correctness with eval.reward="
            f"{cfg.eval.reward!r}, which is not one of the rewards ({', '.join(names)})",
        )


def _validate_ppo(cfg: Config) -> None:
    """Checks of the `ppo` section, `advantage.estimator: gae` and the PPO-only `kl.*` keys."""
    algo, est, p, kl, r = cfg.train.algorithm, cfg.advantage.estimator, cfg.ppo, cfg.kl, cfg.rollout
    if algo != "ppo":
        _check(est != "gae", f"advantage.estimator=gae needs train.algorithm=ppo (got {algo!r})")
        changed = [f.name for f in dataclasses.fields(p) if getattr(p, f.name) != f.default]
        _check(
            not changed,
            f"ppo.{', ppo.'.join(changed)} set, but train.algorithm={algo!r}; the ppo section "
            "applies only to train.algorithm=ppo",
        )
        for key in ("in_reward", "target"):
            _check(
                getattr(kl, key) in (False, None),
                f"kl.{key} is PPO-only; it needs train.algorithm=ppo (got {algo!r})",
            )
        return
    _check(est == "gae", f"train.algorithm=ppo needs advantage.estimator=gae (got {est!r})")
    _check(r.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1 for PPO")
    n = r.prompts_per_step * r.samples_per_prompt
    mb = cfg.train.micro_batch_size_per_device
    _check(n % mb == 0, f"train.micro_batch_size_per_device={mb} must divide {n} samples/step")
    _check(_has_reward(cfg), "rewards: PPO needs at least one reward")
    _check(
        not r.filter_zero_variance_groups,
        "rollout.filter_zero_variance_groups is for group baselines; not with train.algorithm=ppo",
    )
    _check(cfg.model.lora.r == 0, "model.lora.r must be 0 with train.algorithm=ppo (full tuning)")
    _check(p.vf_coef > 0, "ppo.vf_coef must be > 0")
    _check(p.value_clip is None or p.value_clip > 0, "ppo.value_clip must be > 0 or null (off)")
    _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
    _check(p.critic_warmup_steps >= 0, "ppo.critic_warmup_steps must be >= 0")
    _check(p.critic_lr_multiplier > 0, "ppo.critic_lr_multiplier must be > 0")
    _check(
        p.critic_path is None or p.value_head == "separate",
        "ppo.critic_path needs ppo.value_head=separate (a shared head has no own weights)",
    )
    if kl.target is not None:
        _check(kl.in_reward, "kl.target (adaptive KL controller) needs kl.in_reward=true")
        _check(kl.target > 0 and kl.coef > 0, "kl.target and kl.coef must be > 0 (adaptive KL)")
    _check(kl.horizon >= 1, "kl.horizon must be >= 1")


# `data.columns` keys: the row keys the framework and the built-in rewards read (data/formats.py)
DATA_COLUMN_ROLES = (
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "answer",
    "tests",
    "entry_point",
    "test_imports",
    "instructions",
    "rubric",
    "schema",
    "pattern",
)
# a `data.prompt_template` placeholder: `{column}`; `{{`/`}}` are literal braces, other braces
# (`\boxed{}`) stay as written
TEMPLATE_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _validate_data_format(cfg: Config) -> None:
    """`data.columns` ({role: column}) and `data.prompt_template`."""
    d = cfg.data
    for role, column in d.columns.items():
        _check(
            role in DATA_COLUMN_ROLES,
            f"data.columns: unknown role {role!r}"
            f"{did_you_mean(str(role), list(DATA_COLUMN_ROLES))}",
        )
        _check(
            isinstance(column, str) and bool(column.strip()),
            f"data.columns.{role}: {column!r} is not a column name (use a non-empty string)",
        )
        own = getattr(d, f"{role}_column", role)
        _check(
            own == role,
            f"data.columns.{role} and data.{role}_column={own!r} both name the {role} column; "
            f"use one (data.columns.{role} writes the row key {role!r})",
        )
    if d.prompt_template is not None:
        fields = [m.group(1) for m in TEMPLATE_FIELD.finditer(d.prompt_template) if m.group(1)]
        _check(
            bool(fields),
            f"data.prompt_template={d.prompt_template!r} has no {{column}} placeholder (e.g. "
            "'{question}'); every prompt would be the same text",
        )


def _validate_sft_dpo_rm(cfg: Config) -> None:
    """Checks of the `sft`, `dpo` and `reward_model` sections."""
    s, d, rm = cfg.sft, cfg.dpo, cfg.reward_model
    _check(s.max_length >= 2, "sft.max_length must be >= 2 tokens")
    _check(
        1 <= cfg.data.preference_negatives <= 6,
        "data.preference_negatives (wrong answers per arithmetic prompt) must be in 1..6",
    )
    _check(d.beta > 0, "dpo.beta must be > 0 (e.g. 0.1)")
    _check(0 <= d.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)")
    if d.label_smoothing:
        _check(
            d.loss != "sigmoid",
            f"dpo.label_smoothing={d.label_smoothing} with dpo.loss=sigmoid: label-smoothed "
            "sigmoid DPO is dpo.loss=cdpo (or dpo.loss=robust for the unbiased loss under "
            "label flips); set dpo.loss=cdpo or dpo.label_smoothing=0",
        )
        _check(
            d.loss not in ("ipo", "hinge"),
            f"dpo.label_smoothing is not used by dpo.loss={d.loss}; set it to 0",
        )
    _check(d.nll_coef >= 0, "dpo.nll_coef must be >= 0 (RPO weight; 0 = off)")
    for name, sec in (("dpo", d), ("reward_model", rm)):
        _check(sec.pairs_per_step >= 1, f"{name}.pairs_per_step must be >= 1")
        _check(sec.max_length >= 2, f"{name}.max_length must be >= 2 tokens")


# the algorithms that sample from a rollout source, so can play episodes (PPO: GAE and the value
# loss over the sampled tokens only, `advantages.gae`)
EPISODE_ALGORITHMS = ("grpo", "rebel", "online_dpo", "ppo")


def _validate_env(cfg: Config) -> None:
    """`env.*`: limits, and an environment only with an algorithm that samples episodes."""
    e = cfg.env
    _check(e.max_turns >= 1, "env.max_turns must be >= 1")
    _check(e.max_episode_tokens >= 1, "env.max_episode_tokens must be >= 1")
    _check(e.tool_timeout_s > 0, "env.tool_timeout_s must be > 0 (seconds)")
    _check(e.tool_output_chars >= 16, "env.tool_output_chars must be >= 16")
    if e.name is None:
        _check(cfg.data.source != "env", "data.source=env needs env.name (an environment)")
        return
    _check(
        cfg.train.algorithm in (*EPISODE_ALGORITHMS, "sft"),
        f"env.name={e.name!r} needs train.algorithm in {EPISODE_ALGORITHMS} (or sft on its "
        f"transcripts), not {cfg.train.algorithm!r}",
    )


def _validate_turn_credit(cfg: Config) -> None:
    """`advantage.credit`, `turn_discount`, `entropy_modulation_level`: per-turn credit needs
    multi-turn episodes and a GRPO-family algorithm; the discount is in (0, 1]."""
    a, algo = cfg.advantage, cfg.train.algorithm
    gamma = a.turn_discount
    _check(
        isinstance(gamma, int | float) and 0 < gamma <= 1,
        f"advantage.turn_discount={gamma!r} must be in (0, 1] (1 = no discount)",
    )
    if a.credit == "episode":
        _check(
            gamma == 1,
            f"advantage.turn_discount={gamma} has no effect with advantage.credit=episode; set "
            "advantage.credit to return_to_go or progress, or remove the discount",
        )
    else:
        _check(
            cfg.env.name is not None,
            f"advantage.credit={a.credit} credits the turns of multi-turn episodes and needs "
            "env.name (an environment); use advantage.credit=episode for single-turn prompts",
        )
        _check(
            algo == "grpo",
            f"advantage.credit={a.credit} needs train.algorithm=grpo (the GRPO family), not "
            f"{algo!r}; use advantage.credit=episode",
        )
    if a.entropy_modulation_level == "turn":
        _check(
            bool(a.entropy_modulation),
            "advantage.entropy_modulation_level=turn needs advantage.entropy_modulation (k > 0)",
        )
        _check(
            algo == "grpo",
            f"advantage.entropy_modulation_level=turn needs train.algorithm=grpo, not {algo!r}; "
            "use advantage.entropy_modulation_level=token",
        )


def _validate_research_methods(cfg: Config) -> None:
    """REBEL, OPO and RENT combined with options they cannot use: errors naming both."""
    r, t = cfg.rollout, cfg.train
    if t.algorithm == "rebel":
        _check(cfg.rebel.eta > 0, f"rebel.eta must be > 0 (e.g. 1.0), got {cfg.rebel.eta}")
        _check(r.samples_per_prompt >= 2, "rollout.samples_per_prompt must be >= 2 for REBEL")
        _check(
            t.micro_batch_size_per_device % r.samples_per_prompt == 0,
            f"train.algorithm=rebel regresses pairs of a group inside one micro-batch: "
            f"train.micro_batch_size_per_device={t.micro_batch_size_per_device} must be a "
            f"multiple of rollout.samples_per_prompt={r.samples_per_prompt}",
        )
        _check(_has_reward(cfg), "rewards: REBEL needs at least one reward")
        unused = {
            "loss.ratio_level=sequence": cfg.loss.ratio_level == "sequence",
            f"loss.dual_clip_c={cfg.loss.dual_clip_c}": cfg.loss.dual_clip_c is not None,
            f"loss.aggregation={cfg.loss.aggregation}": cfg.loss.aggregation != "token_mean",
            f"loss.entropy_coef={cfg.loss.entropy_coef}": cfg.loss.entropy_coef != 0,
            f"kl.coef={cfg.kl.coef}": cfg.kl.coef != 0,
            f"advantage.estimator={cfg.advantage.estimator}": cfg.advantage.estimator != "grpo",
            "advantage.entropy_modulation": cfg.advantage.entropy_modulation is not None,
            f"loss.rollout_correction={cfg.loss.rollout_correction}": (
                cfg.loss.rollout_correction not in ("tis", "none")
            ),
        }
        for option, is_set in unused.items():
            _check(
                not is_set,
                f"train.algorithm=rebel cannot use {option}: REBEL regresses sequence "
                "log-ratio differences onto reward differences (no advantages, clipping, KL or "
                "entropy terms); remove the option or use train.algorithm=grpo",
            )
    if t.algorithm == "online_dpo":
        _check(r.samples_per_prompt >= 2, "rollout.samples_per_prompt must be >= 2 for online_dpo")
        _check(_has_reward(cfg), "rewards: online_dpo labels its pairs with at least one reward")
        unused = {
            f"kl.coef={cfg.kl.coef}": cfg.kl.coef != 0,
            f"advantage.estimator={cfg.advantage.estimator}": cfg.advantage.estimator != "grpo",
            f"loss.rollout_correction={cfg.loss.rollout_correction}": (
                cfg.loss.rollout_correction not in ("tis", "none")
            ),
        }
        for option, is_set in unused.items():
            _check(
                not is_set,
                f"train.algorithm=online_dpo cannot use {option}: it trains the DPO loss "
                "(dpo.loss, dpo.beta, dpo.nll_coef) on the best/worst sample of each prompt; "
                "remove the option",
            )
    if cfg.advantage.estimator == "opo":
        _check(
            t.updates_per_batch == 1,
            f"advantage.estimator=opo trains exactly on-policy (one optimizer step per rollout "
            f"batch): train.updates_per_batch must be 1, got {t.updates_per_batch}",
        )
    _check(
        cfg.eval.reward != "neg_entropy",
        "eval.reward=neg_entropy: evaluation cannot supply the policy's token entropy that "
        "neg_entropy needs (and it judges no answer); use an answer reward such as exact_answer",
    )


def _validate_lora_deepspeed(cfg: Config) -> None:
    """Checks of `model.lora` and of the `train.deepspeed_config` file (if any)."""
    lora = cfg.model.lora
    _check(lora.r >= 0, "model.lora.r must be >= 0 (0 = LoRA off)")
    if lora.r > 0:
        _check(lora.alpha > 0, "model.lora.alpha must be > 0")
        _check(0 <= lora.dropout < 1, "model.lora.dropout must be in [0, 1)")
        _check(len(lora.target_modules) >= 1, "model.lora.target_modules must name a module")
    _check(
        lora.sync in ("merged", "adapter"),
        f"model.lora.sync={lora.sync!r}: must be one of ('merged', 'adapter')",
    )
    if lora.sync == "adapter":
        _validate_lora_adapter_sync(cfg)
    if cfg.train.deepspeed_config is not None:
        from posttrain.runtime.dsconfig import check_user_config

        check_user_config(cfg)


# vLLM serves LoRA on linear layers only (no LoRA embeddings / LM head for decoder LMs).
VLLM_LORA_UNSUPPORTED = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")
# vLLM's allowed `max_lora_rank` values (vllm.config.lora.MaxLoRARanks); rollout/vllm_local.py
# picks the smallest that holds model.lora.r
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _validate_lora_adapter_sync(cfg: Config) -> None:
    """`model.lora.sync=adapter`: LoRA on, a vLLM rollout engine, targets vLLM can serve."""
    lora = cfg.model.lora
    _check(
        lora.r > 0,
        f"model.lora.sync=adapter needs LoRA: model.lora.r must be > 0 (got {lora.r}); "
        "use model.lora.sync=merged for full fine-tuning",
    )
    _check(
        lora.r <= VLLM_LORA_RANKS[-1],
        f"model.lora.sync=adapter: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, "
        f"model.lora.r={lora.r}",
    )
    _check(
        cfg.rollout.engine == "vllm",
        f"model.lora.sync=adapter needs rollout.engine=vllm (got {cfg.rollout.engine!r}); "
        "the hf engine takes merged weights: use model.lora.sync=merged",
    )
    bad = [m for m in lora.target_modules if m in VLLM_LORA_UNSUPPORTED]
    _check(
        not bad,
        f"model.lora.sync=adapter: vLLM cannot serve LoRA on {bad} (embeddings / LM head); "
        "target only linear layers in model.lora.target_modules, or use model.lora.sync=merged",
    )
