"""transformers `model.generate` rollout engine: the fallback and the reference for tests.

Logprobs are log_softmax of the scores the sampler used (logits / temperature, then top-p masking),
gathered at the sampled token, in float32: the same definition as the vLLM engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.vlm import ImageInputs, image_model_inputs, image_tensors, placeholder_ids
from posttrain.rollout.engine import Rollout, SamplingConfig, check_sampling


class HFEngine:
    """`RolloutEngine` over a transformers causal LM.

    Args:
        model: a causal LM or a vision-language model (e.g. from
            `posttrain.models.load_policy`); it may be the policy itself.
        tokenizer: its tokenizer (pad token required, falls back to EOS).
        batch_size: sequences per `generate` call (prompts are repeated n times, prompt-major).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.weight_version = 0
        self.images: list[ImageInputs | None] | None = None  # the current generate call's
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        # a VLM's image placeholders: a completion ends before one (finish_reason "length")
        self.cut_ids: set[int] = placeholder_ids(model.config)
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids)

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        images: list[ImageInputs | None] | None = None,
    ) -> list[Rollout]:
        """Sample `sampling.n` completions per prompt (see `RolloutEngine.generate`).

        With temperature == 0 decoding is greedy and logprobs are log_softmax(logits).
        With a seed the global torch RNG is forked, so the caller's RNG state is untouched.

        Args:
            prompt_ids: P prompts' token ids (an image prompt's hold its expanded image tokens).
            sampling: how to sample.
            images: per prompt its `ImageInputs` (vision-language models), or None; each batch
                gets its rows' image tensors concatenated (e.g. `pixel_values`).
        """
        check_sampling(sampling)
        if images is not None and len(images) != len(prompt_ids):
            raise ValueError(f"{len(images)} image inputs for {len(prompt_ids)} prompts")
        self.images = images
        flat = [(i, list(p)) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        was_training = self.model.training
        self.model.eval()
        rollouts: list[Rollout] = []
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(flat), self.batch_size):
                    rollouts.extend(
                        self._generate_batch(flat[start : start + self.batch_size], sampling)
                    )
        finally:
            self.model.train(was_training)
            self.images = None
        return rollouts

    @torch.no_grad()
    def _generate_batch(
        self, batch: list[tuple[int, list[int]]], sampling: SamplingConfig
    ) -> list[Rollout]:
        from transformers import GenerationConfig

        width = max(len(p) for _, p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, p) in enumerate(batch):  # left padding
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        greedy = sampling.temperature <= 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids | self.cut_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,
        )
        device = self.model.device
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            **self._image_kwargs(batch, device),
        )
        new = out.sequences[:, width:].cpu()  # [B, steps]
        scores = torch.stack(out.scores, dim=1).float()  # [B, steps, V] processed logits
        logp = torch.log_softmax(scores, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()
        return self._to_rollouts(batch, new, logp)

    def _image_kwargs(self, batch: list[tuple[int, list[int]]], device: Any) -> dict[str, Any]:
        """The batch rows' image tensors, concatenated row by row along dim 0 (on `device`)."""
        if self.images is None:
            return {}
        rows = [self.images[i] for i, _ in batch]
        return {k: v.to(device) for k, v in image_model_inputs(image_tensors(rows)).items()}

    def _completion_end(self, tokens: list[int]) -> tuple[int, str]:
        """(length, finish reason) of a sampled row: through the first EOS ("stop"), before the
        first image placeholder ("length": the completion was cut), else all of it ("length")."""
        for k, t in enumerate(tokens):
            if t in self.eos_ids:
                return k + 1, "stop"
            if t in self.cut_ids:
                return k, "length"
        return len(tokens), "length"

    def _to_rollouts(
        self, batch: list[tuple[int, list[int]]], new: torch.Tensor, logp: torch.Tensor
    ) -> list[Rollout]:
        """new, logp: [B, steps] sampled ids and their logprobs (rows are padded after EOS)."""
        completions, reasons, lps = [], [], []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            end, reason = self._completion_end(tokens)
            reasons.append(reason)
            completions.append(tokens[:end])
            lps.append(logp[row, :end].tolist())
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [
            Rollout(
                prompt_index=i,
                prompt_ids=p,
                completion_ids=c,
                logprobs=lp,
                text=t,
                finish_reason=r,
                weight_version=self.weight_version,
                images=None if self.images is None else self.images[i],
            )
            for (i, p), c, lp, t, r in zip(batch, completions, lps, texts, reasons, strict=True)
        ]

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Copy (name, tensor) pairs into the model's state dict in place; returns seconds taken."""
        start = time.perf_counter()
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise ConfigError(
                        f"load_weights: parameter {name!r} is not in the rollout model "
                        f"(it has e.g. {next(iter(state))!r})"
                    )
                state[name].copy_(tensor.detach())
        self.weight_version = version
        return time.perf_counter() - start
