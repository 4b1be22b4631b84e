"""The offline tiny VLM (`posttrain make-tiny --vlm`): loading round trip, the processor's image
token count against the model's image features, forward logits, generate, chat template."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from posttrain.errors import ConfigError
from posttrain.models.tiny import EOS_TOKEN, IM_START, PAD_TOKEN
from posttrain.models.tiny_vlm import IMAGE_TOKEN, build_tiny_vlm, image_tokens

TEXTS = ["Hello, world!", "  two  spaces\nnew line\ttab ", "[3, 4, 17, 30] <z> ~`'\"\\|"]


@pytest.fixture(scope="module")
def loaded(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_vlm_dir)


def _images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0)]
    return [Image.new("RGB", (32 + 8 * i, 32), colours[i % 3]) for i in range(n)]


def _prompt(processor, n_images: int, text: str) -> str:
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    msgs = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_load_round_trip(tiny_vlm_dir, loaded, tmp_path):
    model, processor = loaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    text = model.config.text_config
    assert text.hidden_size // text.num_attention_heads >= 32
    config = json.loads((tiny_vlm_dir / "config.json").read_text())
    assert config["model_type"] == "llava"
    # same seed -> the same weights as the saved ones; another seed -> different ones
    again = build_tiny_vlm(tmp_path / "again", seed=0)
    other = build_tiny_vlm(tmp_path / "other", seed=1)
    from transformers import AutoModelForImageTextToText

    saved = model.state_dict()
    same = AutoModelForImageTextToText.from_pretrained(again).state_dict()
    diff = AutoModelForImageTextToText.from_pretrained(other).state_dict()
    assert saved.keys() == same.keys()
    assert all(torch.equal(saved[k], same[k]) for k in saved)
    assert sum(not torch.equal(saved[k], diff[k]) for k in saved) > len(saved) // 2


def test_tokenizer_round_trip_and_specials(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text
    special = [tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, EOS_TOKEN, IMAGE_TOKEN)]
    assert len(set(special)) == 4
    assert tok(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [special[3]]
    assert special[3] == model.config.image_token_index
    assert len(tok) == model.config.text_config.vocab_size == 97 + 4
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_chat_template_parts_and_strings(loaded):
    _, processor = loaded
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}]
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "1 + 1?"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    for msgs in (plain, parts):
        got = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert got == expected
        assert (
            processor.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=False
            )
            == expected
        )
    two = _prompt(processor, 2, "Same?")
    assert two == "<|im_start|>user\n<image><image>Same?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_token_count_matches_model(loaded, n_images):
    model, processor = loaded
    enc = processor(
        images=_images(n_images),
        text=[_prompt(processor, n_images, "How many?")],
        return_tensors="pt",
    )
    assert enc["pixel_values"].shape == (n_images, 3, 32, 32)  # every image resized/cropped
    n_tokens = int((enc["input_ids"] == model.config.image_token_index).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=enc["pixel_values"])
    feats = features.pooler_output if hasattr(features, "pooler_output") else features
    per_image = [f.reshape(-1, f.shape[-1]).shape[0] for f in feats]
    assert per_image == [image_tokens(32, 8)] * n_images == [16] * n_images
    assert n_tokens == sum(per_image) == model.config.image_seq_length * n_images


def test_forward_logits_shape_and_image_dependence(loaded):
    model, processor = loaded
    texts = [_prompt(processor, 1, "Which quadrant?"), _prompt(processor, 1, "Count")]
    processor.tokenizer.padding_side = "left"
    enc = processor(images=_images(2)[:1] * 2, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    batch, length = enc["input_ids"].shape
    assert batch == 2 and length == len(processor.tokenizer(texts[0])["input_ids"]) + 15
    assert logits.shape == (2, length, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    blue = processor(images=_images(2)[1:], text=[texts[0]], return_tensors="pt")["pixel_values"]
    other = dict(enc, pixel_values=blue.expand_as(enc["pixel_values"]))
    with torch.no_grad():
        changed = model(**other).logits
    assert not torch.allclose(logits[:, -1], changed[:, -1])  # the image reaches the text


def test_generate_runs(loaded):
    model, processor = loaded
    enc = processor(images=_images(1), text=[_prompt(processor, 1, "Hi")], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=6, do_sample=True)
    prompt_len = enc["input_ids"].shape[1]
    assert torch.equal(out[0, :prompt_len], enc["input_ids"][0])
    assert 1 <= out.shape[1] - prompt_len <= 6
    greedy = model.generate(**enc, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        first = model(**enc).logits[0, -1].argmax()
    assert greedy[0, prompt_len] == first


def test_cli_make_tiny_vlm(tmp_path):
    from posttrain.cli import main

    assert main(["make-tiny", "--vlm", str(tmp_path / "vlm"), "--seed", "3"]) == 0
    names = {p.name for p in (tmp_path / "vlm").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names


@pytest.mark.parametrize(("image_size", "patch_size"), [(30, 8), (4, 8), (32, 0)])
def test_bad_sizes(tmp_path, image_size, patch_size):
    with pytest.raises(ConfigError, match="image_size"):
        build_tiny_vlm(tmp_path / "x", image_size=image_size, patch_size=patch_size)


@pytest.mark.parametrize("kind", ["quadrant", "count", "box"])
def test_shapes_rows_through_the_processor(loaded, kind):
    from posttrain.data.images import image_messages
    from posttrain.data.loading import load_rows

    model, processor = loaded
    opts = {"column": "images", "max_images": 1, "max_pixels": 32 * 32}
    rows = load_rows("shapes", n=3, task_kwargs={"kind": kind}, image_options=opts)
    for row in rows:
        msgs = image_messages(row["prompt"], len(row["images"]))
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert (
            text == f"<|im_start|>user\n<image>{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        )
        enc = processor(images=row["images"], text=[text], return_tensors="pt")
        n_text = len(
            processor.tokenizer(text)["input_ids"]
        )  # <image> is one token before expansion
        assert enc["input_ids"].shape[1] == n_text - 1 + 16
        assert int((enc["input_ids"] == model.config.image_token_index).sum()) == 16
        with torch.no_grad():
            assert model(**enc).logits.shape[1] == n_text + 15
