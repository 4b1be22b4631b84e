"""Typed configuration: frozen dataclasses loaded from YAML plus dotted CLI overrides.

Every key has a type and a default. An unknown key is an error that names the closest valid key;
a wrong type or an impossible value is one line naming the field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters through peft (`r: 0` = off, full fine-tuning).

    Only the adapter weights train (scale = alpha / r); checkpoints get merged weights
    (W + scale * B @ A) under the base model's parameter names. `sync` picks what the rollout
    engine gets after each optimizer step: `merged` (full merged weights, any engine) or
    `adapter` (only lora_A/lora_B, served by vLLM as a LoRA adapter on the unchanged base model;
    needs rollout.engine=vllm).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    sync: str = "merged"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train.

    `path: tiny` builds the built-in tiny Qwen2 model offline into `<output_dir>/tiny-model`.
    """

    path: str = "tiny"
    tiny_size: str = "tiny"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    ref_path: str | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage (SRPO two-stage training): its training prompts and step count.

    `train_size: null` takes `data.train_size`. Stages run in order; stage i trains for `steps`
    optimizer steps, and the last stage continues past its steps until `train.steps`.
    """

    source: str = "arithmetic"
    task: dict = field(default_factory=dict)
    steps: int = 1
    train_size: int | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from. `source: arithmetic` is the built-in synthetic task.

    `stages` (a list of StageConfig) switches the training prompts by step count; `source`/`task`
    still define the held-out set (and the SFT warm-up data).
    """

    source: str = "arithmetic"
    task: dict = field(default_factory=dict)
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    preference_negatives: int = 1
    train_size: int | None = 4000
    eval_source: str | None = None
    eval_size: int = 200
    system_prompt: str | None = None
    max_prompt_tokens: int = 128
    seed: int = 0
    stages: tuple[StageConfig, ...] = ()


@dataclass(frozen=True)
class RolloutConfig:
    """Generation settings and the sampling-side options of ALGORITHMS.md."""

    engine: str = "vllm"
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.5
    filter_zero_variance_groups: bool = False
    max_generation_rounds: int = 4
    mask_truncated: bool = False
    overlong_penalty: bool = False
    overlong_buffer: int = 4
    history_resampling: bool = False  # SRPO: all-correct prompts leave the pool after each epoch
    # engine=server: comma-separated vLLM server URLs (`posttrain rollout-server`), the limit of
    # every HTTP call, and a directory the servers can read ("" = <output_dir>/rollout-weights)
    server_url: str = ""
    server_timeout_s: float = 120.0
    server_weights_dir: str = ""
    # 0: synchronous. k >= 1: step n+1 is generated while step n trains; rollouts sampled with
    # weight version v are trained at trainer version <= v + k (docs/launch.md)
    max_staleness: int = 0


@dataclass(frozen=True)
class AdvantageConfig:
    """Advantage estimator (`grpo`, `dr_grpo`, `batch_std`, `rloo`, `reinforce_pp`, `opo`;
    `gae` with `train.algorithm: ppo` only)."""

    estimator: str = "grpo"
    eps: float = 1e-6
    entropy_modulation: float | None = None


@dataclass(frozen=True)
class LossConfig:
    """Policy-loss options."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = None
    ratio_level: str = "token"
    tis_cap: float | None = 2.0
    aggregation: str = "token_mean"
    entropy_coef: float = 0.0


@dataclass(frozen=True)
class KLConfig:
    """KL to the reference model, in the loss (`coef`) with estimator k1/k2/k3.

    PPO only: `in_reward: true` folds `coef * kl_t` into the token rewards instead of the loss;
    `target` (KL per sample, summed over its tokens) turns on the adaptive controller
    beta <- beta (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon), n = samples per step.
    """

    coef: float = 0.0
    estimator: str = "k3"
    in_reward: bool = False
    target: float | None = None
    horizon: int = 10000


@dataclass(frozen=True)
class RewardConfig:
    """One reward function from `rewards/`, by registry name, with a weight."""

    name: str = "exact_answer"
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW plus warmup and a decay schedule (`cosine`, `linear`, `constant`)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The loop: algorithm, steps, batch shape, DeepSpeed stage, checkpointing."""

    algorithm: str = "grpo"
    steps: int = 100
    micro_batch_size_per_device: int = 8
    updates_per_batch: int = 1
    zero_stage: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0
    eval_every: int = 0
    resume: str | None = None
    sft_batch_size: int = 32
    deepspeed_config: str | None = None  # JSON merged over the generated config (launch/deepspeed/)
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state + AdamW step in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory between uses


@dataclass(frozen=True)
class SFTConfig:
    """SFT options: packing several samples into rows of `max_length` tokens (each sample
    attends only to itself, positions restart per sample; `micro_batch_size_per_device` then
    counts packed rows) and grouping samples of similar length into micro-batches."""

    packing: bool = False
    max_length: int = 512
    group_by_length: bool = False


@dataclass(frozen=True)
class DPOConfig:
    """DPO family (`dpo.loss`: sigmoid, robust, ipo, hinge, simpo, length_normalized) + RPO NLL.

    `pairs_per_step` preference pairs per optimizer step (all ranks); `micro_batch_size_per_device`
    counts pairs (each micro-batch runs 2x that many rows: chosen rows then rejected rows).
    `ref_cache`: a file path, `auto` (`<output_dir>/ref_logps.pt`) or null (reference on the fly).
    `bad_rows`: `drop` (counted in the metrics) or `error`.
    """

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    nll_coef: float = 0.0
    pairs_per_step: int = 32
    max_length: int = 256
    ref_cache: str | None = None
    bad_rows: str = "drop"


@dataclass(frozen=True)
class RewardModelConfig:
    """Bradley-Terry reward model on preference pairs (scalar head, last non-pad token)."""

    pairs_per_step: int = 32
    max_length: int = 256
    margin_column: str | None = None
    bad_rows: str = "drop"


@dataclass(frozen=True)
class PPOConfig:
    """PPO with a critic (`train.algorithm: ppo`, `advantage.estimator: gae`).

    `value_head`: `separate` (a scalar-head copy of the model, or `critic_path`) or `shared` (a
    linear head on the policy's last hidden state). `value_clip`: eps_v (null = unclipped).
    `critic_warmup_steps`: the first N steps train only the value loss. `critic_lr_multiplier`
    scales the critic's learning rate (its own optimizer param group).
    """

    value_head: str = "separate"
    critic_path: str | None = None
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    critic_warmup_steps: int = 0
    whiten_advantages: bool = True
    critic_lr_multiplier: float = 1.0


@dataclass(frozen=True)
class RebelConfig:
    """REBEL (`train.algorithm: rebel`): regress (1/eta) x the pair's log-ratio difference onto
    its reward difference. A smaller `eta` keeps the new policy closer to the step's old one."""

    eta: float = 1.0


@dataclass(frozen=True)
class WarmupConfig:
    """Optional SFT warm-up run before the main algorithm (same trainer, `sft` algorithm)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 10


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy accuracy and avg@k over several seeds."""

    num_problems: int = 200
    k: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    reward: str = "exact_answer"


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go: metrics.jsonl always; wandb `online|offline|disabled`."""

    wandb: str = "offline"
    project: str = "posttrain"
    run_name: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    rewards: tuple[RewardConfig, ...] = (RewardConfig(),)
    reward_timeout_s: float = 30.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rebel: RebelConfig = field(default_factory=RebelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.tiny_size": ("tiny", "bench"),
    "rollout.engine": ("vllm", "hf", "server"),
    "advantage.estimator": ("grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp", "opo", "gae"),
    "loss.ratio_level": ("token", "sequence"),
    "loss.aggregation": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "kl.estimator": ("k1", "k2", "k3"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.algorithm": ("grpo", "sft", "dpo", "reward_model", "ppo", "rebel"),
    "dpo.loss": ("sigmoid", "robust", "ipo", "hinge", "simpo", "length_normalized"),
    "dpo.bad_rows": ("drop", "error"),
    "reward_model.bad_rows": ("drop", "error"),
    "ppo.value_head": ("separate", "shared"),
    "log.wandb": ("online", "offline", "disabled"),
}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `["a.b=1", "c=x"]` into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain (YAML-shaped) dict."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply `a.b=value` overrides and validate.

    Args:
        path: a YAML file, or None for all defaults.
        overrides: dotted `key=value` strings (values parsed as YAML).

    Raises:
        ConfigError: unknown key (naming the closest valid one), wrong type or impossible value.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def to_dict(cfg: Any) -> Any:
    """Plain-dict form of a config (for logging and checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def replace(cfg: Config, **sections: dict) -> Config:
    """Return a copy of `cfg` with some fields of some sections changed, validated."""
    data = to_dict(cfg)
    return config_from_dict(_merge(data, sections))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


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
        _check(len(cfg.rewards) >= 1, "rewards: GRPO needs at least one reward")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    _check(
        r.engine != "server" or bool(r.server_url.strip()),
        "rollout.engine=server needs rollout.server_url (e.g. http://127.0.0.1:8000; start one "
        "with `posttrain rollout-server MODEL`)",
    )
    _check(r.server_timeout_s > 0, "rollout.server_timeout_s must be > 0")
    _check(r.max_staleness >= 0, "rollout.max_staleness must be >= 0 (0 = synchronous)")
    _check(r.temperature > 0, "rollout.temperature must be > 0 (use eval for greedy decoding)")
    _check(0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]")
    _check(t.steps >= 0, "train.steps must be >= 0")
    _check(t.micro_batch_size_per_device >= 1, "train.micro_batch_size_per_device must be >= 1")
    _check(t.updates_per_batch >= 1, "train.updates_per_batch must be >= 1")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
    _check(
        not t.offload_optimizer or t.zero_stage >= 1,
        f"train.offload_optimizer needs train.zero_stage 1, 2 or 3 (got {t.zero_stage})",
    )
    _check(
        not t.offload_params or t.zero_stage == 3,
        f"train.offload_params needs train.zero_stage=3 (got {t.zero_stage})",
    )
    _check(cfg.loss.clip_low >= 0 and cfg.loss.clip_high >= 0, "loss.clip_low/clip_high >= 0")
    _check(cfg.loss.clip_low < 1, "loss.clip_low must be < 1")
    if cfg.loss.dual_clip_c is not None:
        _check(cfg.loss.dual_clip_c > 1, "loss.dual_clip_c must be > 1 (e.g. 3) or null")
    if cfg.loss.tis_cap is not None:
        _check(cfg.loss.tis_cap >= 1, "loss.tis_cap must be >= 1 or null (off)")
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
    _check(0 < cfg.eval.top_p <= 1, "eval.top_p must be in (0, 1]")
    _validate_stages_resampling(cfg)
    _validate_sft_dpo_rm(cfg)
    _validate_ppo(cfg)
    _validate_research_methods(cfg)
    _validate_lora_deepspeed(cfg)
    if cfg.model.path != "tiny" and Path(cfg.model.path).anchor == "/":
        _check(
            Path(cfg.model.path).is_dir(),
            f"model.path: directory {cfg.model.path} does not exist (use 'tiny' for the "
            "built-in model, a local directory or a hub name)",
        )


def _check_task_keys(task: dict, where: str) -> None:
    """Every key of an arithmetic `task` mapping is an option of `arithmetic.make_split`."""
    import inspect

    from posttrain.data.arithmetic import make_split

    params = inspect.signature(make_split).parameters
    names = [p for p in params if p not in ("split", "n", "seed")]
    for key in task:
        if key not in names:
            raise ConfigError(f"unknown config key '{where}.{key}'{_closest(str(key), names)}")


def _validate_stages_resampling(cfg: Config) -> None:
    """Checks of `data.stages` and `rollout.history_resampling`."""
    if cfg.data.task and cfg.data.source == "arithmetic":
        _check_task_keys(cfg.data.task, "data.task")
    stages = cfg.data.stages
    for i, st in enumerate(stages):
        _check(st.steps >= 1, f"data.stages[{i}].steps must be >= 1, got {st.steps}")
        if st.train_size is not None:
            _check(st.train_size >= 1, f"data.stages[{i}].train_size must be >= 1 or null")
        if st.task:
            _check(
                st.source == "arithmetic",
                f"data.stages[{i}].task is only valid for source 'arithmetic', not {st.source!r}",
            )
            _check_task_keys(st.task, f"data.stages[{i}].task")
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
    _check(len(cfg.rewards) >= 1, "rewards: PPO needs at least one reward")
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
            d.loss not in ("ipo", "hinge"),
            f"dpo.label_smoothing is not used by dpo.loss={d.loss}; set it to 0",
        )
    _check(d.nll_coef >= 0, "dpo.nll_coef must be >= 0 (RPO weight; 0 = off)")
    for name, sec in (("dpo", d), ("reward_model", rm)):
        _check(sec.pairs_per_step >= 1, f"{name}.pairs_per_step must be >= 1")
        _check(sec.max_length >= 2, f"{name}.max_length must be >= 2 tokens")


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
        _check(len(cfg.rewards) >= 1, "rewards: REBEL needs at least one reward")
        unused = {
            "loss.ratio_level=sequence": cfg.loss.ratio_level == "sequence",
            f"loss.dual_clip_c={cfg.loss.dual_clip_c}": cfg.loss.dual_clip_c is not None,
            f"loss.aggregation={cfg.loss.aggregation}": cfg.loss.aggregation != "token_mean",
            f"loss.entropy_coef={cfg.loss.entropy_coef}": cfg.loss.entropy_coef != 0,
            f"kl.coef={cfg.kl.coef}": cfg.kl.coef != 0,
            f"advantage.estimator={cfg.advantage.estimator}": cfg.advantage.estimator != "grpo",
            "advantage.entropy_modulation": cfg.advantage.entropy_modulation is not None,
        }
        for option, is_set in unused.items():
            _check(
                not is_set,
                f"train.algorithm=rebel cannot use {option}: REBEL regresses sequence "
                "log-ratio differences onto reward differences (no advantages, clipping, KL or "
                "entropy terms); remove the option or use train.algorithm=grpo",
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
        from posttrain.dsconfig import check_user_config

        check_user_config(cfg)


# vLLM serves LoRA on linear layers only (no LoRA embeddings / LM head for decoder LMs).
VLLM_LORA_UNSUPPORTED = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")
VLLM_MAX_LORA_RANK = 512


def _validate_lora_adapter_sync(cfg: Config) -> None:
    """`model.lora.sync=adapter`: LoRA on, a vLLM rollout engine, targets vLLM can serve."""
    lora = cfg.model.lora
    _check(
        lora.r > 0,
        f"model.lora.sync=adapter needs LoRA: model.lora.r must be > 0 (got {lora.r}); "
        "use model.lora.sync=merged for full fine-tuning",
    )
    _check(
        lora.r <= VLLM_MAX_LORA_RANK,
        f"model.lora.sync=adapter: vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANK}, "
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
