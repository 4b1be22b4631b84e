"""benchmarks/episode_step.py's `--role-tokens`: one token per role header, counted by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from posttrain.models import make_tiny

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def episode_step():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling grpo_step
    try:
        import episode_step as mod
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_role_tokens_shrink_the_observation_framing(episode_step, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model_dir = str(make_tiny(tmp_path / "m", size="tiny", seed=0))
    # "\n" + <|im_start|> + "user\n" + "ok" + <|im_end|> + "\n" + <|im_start|> + "assistant\n":
    # letter by letter 1 + 1 + 5 + 2 + 1 + 1 + 1 + 10 tokens, with role tokens 1 + 1 + 1 + 2 + 1
    # + 1 + 1 + 1
    assert episode_step.OBSERVATION == "ok"
    assert episode_step._framing_of(model_dir) == 22
    before = len(AutoTokenizer.from_pretrained(model_dir))
    assert episode_step.add_role_tokens(model_dir) == 9
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == before + len(episode_step.ROLE_TOKENS)
    assert AutoConfig.from_pretrained(model_dir).vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert pieces[:2] == ["<|im_start|>", "user\n"]
