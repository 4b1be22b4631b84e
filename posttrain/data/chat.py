"""Chat templating: prompts (text or message lists) -> token ids, and SFT (ids, loss mask) pairs.

Prompts are rendered with the tokenizer's own chat template (``add_generation_prompt=True``), then
tokenized without extra special tokens, so the ids end exactly where the assistant's reply starts.
A completion is tokenized on its own and appended, which is how a rollout engine sees it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.errors import ConfigError

Prompt = str | Sequence[dict[str, Any]]


def to_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Turn a prompt into chat messages.

    Args:
        prompt: user text, or a list of ``{"role": ..., "content": ...}`` messages.
        system_prompt: prepended as a ``system`` message unless the messages already start with one
            (a row's own system message wins).

    Returns:
        The message list (a new list; the input is not modified).
    """
    if isinstance(prompt, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or "content" not in m:
                raise ConfigError(
                    f"prompt message {i} is {m!r}; expected a dict with 'role' and 'content'"
                )
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_prompt(tokenizer: Any, prompt: Prompt, system_prompt: str | None = None) -> str:
    """The templated prompt text, ending with the assistant generation header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; "
            "use a chat/instruct tokenizer or one written by `posttrain make-tiny`"
        )
    return tokenizer.apply_chat_template(
        to_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
) -> list[list[int]]:
    """Apply the chat template to each prompt and tokenize it.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        prompts: N prompts, each user text or a list of chat messages.
        system_prompt: optional system message for every prompt.
        max_prompt_tokens: longest allowed templated prompt; ``None`` means no limit. Prompts are
            never truncated.

    Returns:
        N lists of token ids.

    Raises:
        ConfigError: a prompt is longer than ``max_prompt_tokens`` (names the row index and length).
    """
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        ids = _ids(tokenizer, render_prompt(tokenizer, prompt, system_prompt))
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            start = prompt if isinstance(prompt, str) else " ".join(str(m) for m in prompt)
            raise ConfigError(
                f"prompt row {i} is {len(ids)} tokens after the chat template, more than "
                f"data.max_prompt_tokens={max_prompt_tokens} (it starts {start[:40]!r}); raise "
                "data.max_prompt_tokens, or shorten or drop the row"
            )
        out.append(ids)
    return out


def encode_sft(
    tokenizer: Any,
    prompt: Prompt,
    completion: str,
    system_prompt: str | None = None,
    eos: str | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize a (prompt, completion) pair for supervised fine-tuning.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        prompt: user text or a list of chat messages.
        completion: the assistant's reply text.
        system_prompt: optional system message.
        eos: token string that ends the reply; defaults to ``tokenizer.eos_token``
            (``<|im_end|>`` for Qwen-style templates).

    Returns:
        ``(input_ids [L], labels_mask [L])``: prompt ids + completion ids + eos id, and a 0/1 mask
        that is 1 exactly on the completion tokens and the final eos.
    """
    eos = eos if eos is not None else tokenizer.eos_token
    if not eos:
        raise ConfigError("tokenizer has no eos_token; pass eos= (e.g. '<|im_end|>')")
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if eos_id is None or tokenizer.convert_ids_to_tokens(eos_id) != eos:
        raise ConfigError(f"eos={eos!r} is not a single token of the tokenizer")
    prompt_ids = _ids(tokenizer, render_prompt(tokenizer, prompt, system_prompt))
    completion_ids = [*_ids(tokenizer, completion), eos_id]
    input_ids = prompt_ids + completion_ids
    labels_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    return input_ids, labels_mask
