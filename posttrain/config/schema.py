"""The config schema: one frozen dataclass per YAML section, every key typed with a default."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import advantages, losses, off_policy, turn_credit


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

    `path: tiny` builds the built-in tiny Qwen2 model offline into `<output_dir>/tiny-model`
    (`tiny_size`: `tiny`, `tiny_untied` with an output head of its own, or `bench`),
    `path: tiny-vlm` the tiny LLaVA into `<output_dir>/tiny-vlm`. `freeze_vision`: a
    vision-language model's vision tower does not train (requires_grad False).
    """

    path: str = "tiny"
    tiny_size: str = "tiny"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    ref_path: str | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze_vision: bool = True


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
    # arithmetic preference pairs: "plausible" wrong answers (off by 1/2/10, sign/operator
    # mistakes), "uniform" ones (any other value in the answers' range) or "mixed" (alternating)
    wrong_answers: str = "plausible"
    train_size: int | None = 4000
    eval_source: str | None = None
    eval_size: int = 200
    system_prompt: str | None = None
    # a dataset in its own column names: {role: column}, e.g. {prompt: question, answer: answer}
    # renames columns on load; prompt_template ("{question}\nPut the final answer in \\boxed{}.")
    # formats the prompt from the row's columns (after the rename)
    columns: dict = field(default_factory=dict)
    prompt_template: str | None = None
    max_prompt_tokens: int = 128
    # images in prompts (data/images.py): the column of paths (relative to the data file),
    # bytes, {bytes, path} dicts or PIL images; per-row image count and per-image pixel limits
    image_column: str = "images"
    max_images_per_prompt: int = 4
    max_image_pixels: int = 16_777_216
    seed: int = 0
    stages: tuple[StageConfig, ...] = ()


@dataclass(frozen=True)
class RolloutConfig:
    """Generation settings and the sampling-side options of docs/algorithms.md."""

    engine: str = "vllm"
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_gib: float = 1.0
    # vLLM KV-cache block (tokens; None: vLLM's default, 128 on CPU). Its prefix cache reuses
    # whole blocks only, so multi-turn episodes re-prefill less of each turn with 32
    kv_block_size: int | None = None
    # CUDA, colocated vLLM: share of the GPU vLLM may hold, or "auto" (weights + one step's KV
    # cache, rollout/memory.py); sleep_level 1/2 frees it while the trainer runs (0 = never)
    gpu_memory_utilization: float | str = "auto"
    sleep_level: int = 0
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
    # engine=server weight push: "file" (safetensors file + reload; the servers must read
    # server_weights_dir) or "nccl" (CUDA only: vLLM's NCCL weight transfer from rank 0; the
    # servers run with --weight-transfer-config '{"backend": "nccl"}'). NCCL rendezvous: the
    # trainer rank 0's address as the servers reach it ("" = the local address that routes to
    # the first server) and the port of server 0 (server i: port + i; 0 = free ports)
    server_weight_transfer: str = "file"
    server_nccl_address: str = ""
    server_nccl_port: int = 0
    # 0: synchronous. k >= 1: the engine generates up to k batches ahead of the trainer (weights
    # pushed once every k steps); rollouts sampled with weight version v are trained at trainer
    # version <= v + k (docs/launch.md)
    max_staleness: int = 0


@dataclass(frozen=True)
class AdvantageConfig:
    """Advantage estimator (`grpo`, `dr_grpo`, `batch_std`, `rloo`, `reinforce_pp`, `opo`;
    `gae` with `train.algorithm: ppo` only).

    Multi-turn episodes (`env.name`, GRPO family): `credit` picks what each sampled turn is
    credited with: `episode` (the episode's advantage on every turn), `return_to_go` (the turn's
    discounted return, `turn_discount` per turn, against the episode-level baseline) or
    `progress` (the final reward spread over the turns by the environment's reported progress,
    then return-to-go). `entropy_modulation_level`: `token` (EMPG weight from each token's
    entropy) or `turn` (from its turn's mean token entropy).
    """

    estimator: str = "grpo"
    eps: float = 1e-6
    entropy_modulation: float | None = None
    credit: str = "episode"
    turn_discount: float = 1.0
    entropy_modulation_level: str = "token"


@dataclass(frozen=True)
class LossConfig:
    """Policy-loss options.

    `rollout_correction` weights or masks the tokens by how far the rollout engine's log-probs
    are from the trainer's (`tis`, `none`, `token_mis`, `seq_mis`, `icepop`, `icepop_tis`,
    `geo_mask`, `geo_mask_tis`; docs/algorithms.md §4). `rollout_correction_threshold` is C of
    the masked-IS methods and k of the IcePop / geometric-mean masks; `tis_cap` is the cap of the
    TIS factor of `tis`, `icepop_tis` and `geo_mask_tis` (null: `tis` is off).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = None
    ratio_level: str = "token"
    tis_cap: float | None = 2.0
    rollout_correction: str = "tis"
    rollout_correction_threshold: float = 2.0
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
    # token budget per micro-batch (rows packed until their padded length would exceed it;
    # None: fixed micro_batch_size_per_device rows). Loss denominators stay global
    max_tokens_per_micro_batch: int | None = None
    # token log-probs / entropy computed from the last hidden state in chunks of this many
    # tokens, recomputed in backward, so no [tokens, vocab] tensor outlives its chunk (0: off)
    # (256: peak 0.22x of full logits at SmolLM2 shape, same time; benchmarks/logprob_memory.py)
    logprob_chunk_tokens: int = 256
    updates_per_batch: int = 1
    zero_stage: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    # periodic checkpoints (what a run resumes from after a crash; 0 = only the final one), of
    # which the newest keep_checkpoints stay (0 = all); final / interrupted-* are never pruned
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    resume: str | None = None
    sft_batch_size: int = 32
    deepspeed_config: str | None = None  # JSON merged over the generated config (launch/deepspeed/)
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state + AdamW step in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory between uses
    # a collective (gloo/nccl, DeepSpeed's groups too) that waits longer raises on that rank
    dist_timeout_s: float = 1800.0
    # a loop phase (generate, train, weight sync, checkpoint save, eval) running longer ends
    # the process with a message naming it and the newest checkpoint (0 = no limit)
    phase_timeout_s: float = 7200.0
    # SIGTERM (Slurm, Kubernetes) -> checkpoint of the last completed step, exit status 0; a
    # step still running at half this is abandoned (0 = no handler: SIGTERM ends the process)
    preempt_grace_s: float = 60.0
    # a NaN/inf loss or gradient skips its optimizer update; this many such steps in a row
    # are tolerated, one more stops the run with the checkpoint from before them (0 = the first)
    max_bad_steps: int = 3
    # SFT only: end the run early once the mean loss of its last 10 steps is below this (the
    # warm-up's `warmup.stop_loss`); null = run all `steps`
    stop_loss: float | None = None


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
    """The DPO family (`dpo.loss`: sigmoid, cdpo, robust, ipo, hinge, simpo, length_normalized).

    `label_smoothing` eps in [0, 0.5) (0 = off; see `losses.preference_loss`): `cdpo` is the
    label-smoothed sigmoid loss -(1 - eps) log sig(h) - eps log sig(-h); `robust` (Chowdhury et
    al. 2024) treats eps as a label-flip rate, ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps) with
    l(h) = -log sig(h); `simpo` and `length_normalized` apply the cdpo smoothing to their own
    margin. With eps = 0 all four are the plain sigmoid loss. `sigmoid` with eps > 0 is a config
    error (say `cdpo`), and `ipo` / `hinge` do not take it. `nll_coef`: the RPO NLL weight.

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
    # the warm-up's share of the task: the first `train_size` training rows (None: all of
    # data.train_size). Less than the RL run trains on leaves it something to learn
    train_size: int | None = None
    # end the warm-up early once its mean loss over the last 10 steps is below this (null: all
    # `steps`). A skill learned in one jump whose step varies by seed (copying operands) is then
    # stopped just past the jump: learned on some tasks, not all, which leaves RL headroom
    stop_loss: float | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy accuracy and avg@k over several seeds.

    The pass@k curve (k = 1, 2, 4, ... up to K, mean and 95% interval over `seeds`) draws K more
    samples per problem and seed: K = `pass_k_max` in `posttrain eval`, `run_pass_k_max` in a
    training run's before/after report (smaller, so that the two extra evaluations stay cheap);
    0 draws no curve. The periodic `train.eval_every` evaluation never draws it.
    """

    num_problems: int = 200
    k: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    reward: str = "exact_answer"
    pass_k_max: int = 64
    run_pass_k_max: int = 16


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go: metrics.jsonl always; wandb `online|offline|disabled`."""

    wandb: str = "offline"
    project: str = "posttrain"
    run_name: str | None = None
    progress: bool = True
    # third-party logs (vLLM, DeepSpeed, transformers, Triton) go to <output_dir>/third_party.log;
    # true also shows them on the console
    verbose: bool = False


@dataclass(frozen=True)
class EnvConfig:
    """A multi-turn environment (`name: null` = single-turn prompts).

    `name` is a registered environment (posttrain/envs/__init__.py: calculator, guess_number,
    code_feedback) or a `package.module:Class` import path; `kwargs` go to its constructor (one
    instance per episode). With an environment, `data.source: env` takes its built-in task rows.
    Limits: assistant turns per episode, tokens after the prompt per episode (sampled and
    observations; `rollout.max_new_tokens` per turn), a tool's wall time and output characters
    (longer output is cut with a marker), an environment step's wall time (a step running longer
    masks its episode). `tool_parser`: the tool-call format of the model. `transcript_kwargs` go to
    the environment's `sft_transcripts(rows, **kwargs)` (the SFT warm-up's synthetic conversations,
    e.g. calculator's `direct_fraction`). `observation_render`: how observation ids are rendered:
    `full` re-renders the episode's own conversation (and refuses a template that rewrites earlier
    turns); `fixed_base` renders each observation after a fixed one-turn base conversation, the fix
    for templates that drop earlier `<think>` blocks (the ids then follow what the model saw,
    not the template's rendering of the whole history).
    """

    name: str | None = None
    kwargs: dict = field(default_factory=dict)
    max_turns: int = 4
    max_episode_tokens: int = 256
    tool_timeout_s: float = 10.0
    tool_output_chars: int = 2000
    step_timeout_s: float = 60.0
    tool_parser: str = "hermes"
    transcript_kwargs: dict = field(default_factory=dict)
    observation_render: str = "full"


@dataclass(frozen=True)
class GuideConfig:
    """Guide (adaptive guidance, Nath et al. 2025; docs/algorithms.md "Guide"), GRPO only.

    A sample succeeds when it is valid and its reward (after shaping) is >= `success_threshold`;
    a group whose samples all fail gets `replace` hinted samples (null: all of
    `rollout.samples_per_prompt`) in place of its failed ones. The hint is the row's
    `hint_column`, or `hint_fn` (a built-in hint function, e.g. arithmetic_tens) of the row;
    `hint_template` places it in the prompt ({prompt}, {hint}). Hinted samples are trained as
    completions of the unhinted prompt, with the hinted-context log-probs as `logp_old`.
    `guide/all_fail_groups` is logged with guide off too. `warmup_hinted`: the share of the SFT
    warm-up's rows (or an SFT run's) that also train with their hinted prompt (a copy is added),
    so that the model learns to read hints before RL relies on them (0: none).
    """

    enabled: bool = False
    hint_column: str = "hint"
    hint_fn: str | None = None
    hint_template: str = "{prompt}\nHint: {hint}"
    replace: int | None = None
    success_threshold: float = 1.0
    warmup_hinted: float = 0.0


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
    env: EnvConfig = field(default_factory=EnvConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)


# The valid values of every string option. Names the math defines come from its registries (the
# pure modules below config); the rest are named here once, and tests/unit/test_layout.py proves
# they equal the registries above the config layer (algorithms, engines, tiny sizes).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.wrong_answers": ("plausible", "uniform", "mixed"),
    "model.tiny_size": ("tiny", "tiny_untied", "bench"),
    "rollout.engine": ("vllm", "hf", "server"),
    "rollout.server_weight_transfer": ("file", "nccl"),
    "advantage.estimator": advantages.ESTIMATORS,
    "advantage.credit": turn_credit.CREDIT_MODES,
    "advantage.entropy_modulation_level": turn_credit.ENTROPY_MODULATION_LEVELS,
    "loss.ratio_level": losses.RATIO_LEVELS,
    "loss.aggregation": losses.AGGREGATION_MODES,
    "loss.rollout_correction": off_policy.ROLLOUT_CORRECTIONS,
    "kl.estimator": losses.KL_ESTIMATORS,
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.algorithm": ("grpo", "sft", "dpo", "reward_model", "ppo", "rebel", "online_dpo"),
    "dpo.loss": losses.PREFERENCE_KINDS,
    "dpo.bad_rows": ("drop", "error"),
    "reward_model.bad_rows": ("drop", "error"),
    "ppo.value_head": ("separate", "shared"),
    "log.wandb": ("online", "offline", "disabled"),
    "env.observation_render": ("full", "fixed_base"),
}
