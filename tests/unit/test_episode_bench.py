"""benchmarks/role_tokens.py (`episode_step.py --role-tokens`): one token per role header,
counted by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.models import make_tiny
from tests.bench_import import import_benchmarks


@pytest.fixture(scope="module")
def role_tokens():
    episode_step, mod = import_benchmarks("episode_step", "role_tokens")
    assert episode_step.OBSERVATION == "ok"  # the observation the hand counts below are for
    return mod


def test_role_tokens_shrink_the_observation_framing(role_tokens, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model_dir = str(make_tiny(tmp_path / "m", size="tiny", seed=0))
    # "\n" + <|im_start|> + "user\n" + "ok" + <|im_end|> + "\n" + <|im_start|> + "assistant\n":
    # letter by letter 1 + 1 + 5 + 2 + 1 + 1 + 1 + 10 tokens, with role tokens 1 + 1 + 1 + 2 + 1
    # + 1 + 1 + 1
    assert role_tokens.tokens_per_observation(model_dir, "ok") == 22
    before = len(AutoTokenizer.from_pretrained(model_dir))
    role_tokens.add_role_tokens(model_dir)
    assert role_tokens.tokens_per_observation(model_dir, "ok") == 9
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == before + len(role_tokens.ROLE_TOKENS)
    assert AutoConfig.from_pretrained(model_dir).vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert pieces[:2] == ["<|im_start|>", "user\n"]
