"""The offline tiny vision-language model: a randomly initialised LLaVA-architecture model (a tiny
CLIP vision tower, a two-layer projector and a tiny Llama text model) plus a `LlavaProcessor`, so
the vision-language path runs in tests and recipes without downloads.

The processor pairs `CLIPImageProcessorPil` (PIL only: no torchvision is needed) with the tiny
byte-level character tokenizer of `posttrain.models.tiny` plus an ``<image>`` special token. The
processor expands each ``<image>`` to `image_tokens(...)` copies, the number of patch features the
vision tower hands the language model (the CLS feature is dropped: strategy ``default``).

The chat template renders a message's content given as a plain string or as a list of parts
(``{"type": "image"}``, ``{"type": "text", "text": ...}``) Qwen-style:
``<|im_start|>user\\n<image>Which quadrant?<|im_end|>\\n``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.tiny import EOS_TOKEN, IM_START, PAD_TOKEN, TINY_SIZES, build_tokenizer

IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SIZE = 32
DEFAULT_PATCH_SIZE = 8
# CLIP's image normalisation constants (the processor's defaults, written explicitly)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_SIZE: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}

VLM_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' }}"
    "{%- for t in tools %}{{- t['function']['name'] + '(' }}"
    "{{- t['function']['parameters']['properties'] | list | join(', ') }}{{- ')' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def image_tokens(image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    """Number of language-model positions one image takes: (image_size / patch_size) ** 2."""
    return (image_size // patch_size) ** 2


def build_vlm_tokenizer() -> Any:
    """The tiny character tokenizer plus the ``<image>`` special token and the VLM chat template."""
    from tokenizers import AddedToken

    tok = build_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": [IM_START, AddedToken(IMAGE_TOKEN, special=True)]}
    )
    tok.chat_template = VLM_CHAT_TEMPLATE
    return tok


def build_vlm_processor(
    image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE
) -> Any:
    """A `LlavaProcessor` (PIL image processor + tiny tokenizer) for `image_size`-pixel images.

    Images of any size are resized (shortest edge) and centre-cropped to image_size x image_size.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_vlm_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=VLM_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS position, dropped by strategy "default"
    )


def _llava_config(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    text = {k: v for k, v in TINY_SIZES["tiny"].items()}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        use_cache=True,
        **text,
    )
    vision_config = CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, **VISION_SIZE
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens(image_size, patch_size),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_tiny_vlm(
    path: str | Path,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> Path:
    """Write a randomly initialised tiny `LlavaForConditionalGeneration` and its processor.

    Text model: the tiny Qwen2's shape as Llama (hidden 128, 4 layers, head_dim 32). Vision tower:
    CLIP, hidden 64, 2 layers, `image_size` pixels in `patch_size` patches.

    Args:
        path: directory to create (or overwrite); holds config.json, model.safetensors,
            generation_config.json, the tokenizer files, processor_config.json and
            chat_template.jinja.
        seed: torch seed for the weight initialisation (same seed -> identical weights).
        image_size: side of the (square) image the vision tower sees, in pixels.
        patch_size: side of one patch; image_size must be a multiple of it.

    Returns:
        The output directory as a Path.
    """
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise ConfigError(
            f"tiny VLM image_size={image_size}, patch_size={patch_size}: image_size must be a "
            "positive multiple of patch_size"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_vlm_processor(image_size, patch_size)
    tokenizer = processor.tokenizer
    config = _llava_config(tokenizer, image_size, patch_size)
    cpu_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(cpu_rng)
    eos_id, pad_id = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
