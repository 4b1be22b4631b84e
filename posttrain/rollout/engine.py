"""The rollout seam: sampling settings, one sampled completion, and the engine Protocol.

A fake engine for tests only needs `weight_version`, `generate` and `load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from posttrain.errors import ConfigError, RolloutError
from posttrain.models.vlm import ImageInputs


class RolloutServerError(RolloutError):
    """A rollout server could not serve a request: names the URL and what happened."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample.

    Attributes:
        n: samples per prompt.
        temperature: logits are divided by this before softmax (the logprobs use the same value).
        top_p: nucleus mass; with top_p < 1 the returned logprobs are renormalised over the nucleus.
        max_new_tokens: completion length cap (the EOS token counts).
        seed: base seed; prompt i, sample j uses seed + i * n + j. None: engine-level randomness.
    """

    n: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None


@dataclass
class Rollout:
    """One sampled completion.

    Attributes:
        prompt_index: index of the prompt in the `generate` call.
        prompt_ids: the prompt's token ids.
        completion_ids: sampled token ids, including the EOS token when finish_reason == "stop".
        logprobs: the sampler's log-probability of each completion token (after temperature),
            len(logprobs) == len(completion_ids).
        text: decoded completion (special tokens skipped).
        finish_reason: "stop" (EOS sampled) or "length" (max_new_tokens reached).
        weight_version: the engine's weight version the sample was drawn with (an episode's
            oldest turn).
        completion_mask: per completion token, 1 if the engine sampled it and 0 if it is an
            observation appended by an environment; None when all were sampled.
        turn_versions: an episode's weight version per sampled turn (empty for one turn).
        turn_index: per completion token, the episode's assistant turn it belongs to (0 for the
            first; an observation token gets the turn it answers); None: one turn.
        turn_rewards: an episode's per-turn rewards (None where the environment gave none).
        turn_progress: an episode's reported progress after each turn (None where none).
        images: a vision-language prompt's images and image tensors (`models/vlm.py`; the
            prompt ids hold the expanded image tokens); None for a text prompt.
    """

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"
    weight_version: int
    # multi-turn episodes (rollout/episodes.py): 1 on sampled tokens, 0 on observation tokens
    # (None: every completion token was sampled), and the weight version of each sampled turn
    completion_mask: list[int] | None = None
    turn_versions: tuple[int, ...] = ()
    # per-turn credit assignment (posttrain/turn_credit.py): each token's turn, each turn's reward
    # and reported progress
    turn_index: list[int] | None = None
    turn_rewards: tuple[float | None, ...] = ()
    turn_progress: tuple[float | None, ...] = ()
    # vision-language prompts: shared by the prompt's samples, never modified
    images: ImageInputs | None = None


def check_sampling(sampling: SamplingConfig) -> None:
    """Raise ConfigError naming the field when a SamplingConfig cannot be sampled."""
    if sampling.n < 1:
        raise ConfigError(f"sampling.n={sampling.n}: must be >= 1")
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"sampling.max_new_tokens={sampling.max_new_tokens}: must be >= 1")
    if sampling.temperature < 0:
        raise ConfigError(f"sampling.temperature={sampling.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"sampling.top_p={sampling.top_p}: must be in (0, 1]")


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples completions and accepts new weights."""

    weight_version: int

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample `sampling.n` completions per prompt.

        An engine that serves vision-language models also takes `images=` (one
        `ImageInputs | None` per prompt, prompt ids with the expanded image tokens); callers pass
        it only for image prompts, and every rollout of prompt i carries `images[i]`.

        Returns:
            len(prompt_ids) * sampling.n rollouts in prompt-major order (all samples of prompt 0,
            then prompt 1, ...); logprobs are the sampler's own (after temperature), one per
            completion token; completion_ids include the EOS token when stopped.
        """
        ...

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Replace the engine's weights (HF parameter names) and set weight_version = version.

        Returns:
            Seconds taken.
        """
        ...
