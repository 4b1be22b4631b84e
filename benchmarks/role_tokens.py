"""`episode_step.py --role-tokens`: the bench tokenizer with one token per chat role header.

The bench model's character tokenizer spells every role header letter by letter, so an episode's
observation costs 22 tokens of framing where a real BPE tokenizer spends about 10 (Qwen2:
"<|im_start|>user\\n" is 3 tokens, the character tokenizer spends 7 on it).
"""

from __future__ import annotations

from typing import Any

ROLE_TOKENS = ("user\n", "assistant\n", "system\n", "tool\n")


def add_role_tokens(model_dir: str) -> None:
    """Give a `make_tiny` model's tokenizer one token per role header (`ROLE_TOKENS`), in place.

    The new tokens get new embedding rows (random like the rest of the bench model); the model
    and tokenizer are saved back to `model_dir`.

    Args:
        model_dir: a `make_tiny` directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(list(ROLE_TOKENS))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def tokens_per_observation(model_dir: str, observation: str) -> int:
    """Tokens one user observation adds to an episode (its framing plus its content): from the
    end-of-turn token of an assistant turn to the next assistant turn's first sampled token.

    Args:
        model_dir: a model directory with a chat-template tokenizer.
        observation: the observation's text.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    base: list[dict[str, Any]] = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    turn = tok.apply_chat_template(base, tokenize=False)
    turn = turn[: turn.rindex(tok.eos_token) + len(tok.eos_token)]
    full = tok.apply_chat_template(
        [*base, {"role": "user", "content": observation}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return count(full) - count(turn)
