"""benchmarks/calculator_copy.py: the one-pass, offset-mapped reading of the copied digits equals
a straight loop that predicts each copied character from its own prefix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.envs.calculator import calculate, expression_transcripts, make_product_rows
from posttrain.models import make_tiny
from tests.bench_import import import_benchmarks


@pytest.fixture(scope="module")
def bench():
    return import_benchmarks("calculator_copy")[0]


def test_span_starts_finds_both_copies(bench) -> None:
    text = (
        'What is 273 * 951?<tool_call>\n{"name": "calculate", "arguments": {"expression": '
        '"273 * 951"}}\n</tool_call>259623 ... 259623'
    )
    starts = bench.span_starts(text, "273 * 951", "259623")
    assert text[starts["call"] : starts["call"] + 9] == "273 * 951"
    assert text[starts["call"] - 1] == '"'  # the call's copy, not the question's
    assert starts["answer"] == len(text) - 6


def test_one_pass_equals_prefix_loop(bench, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import get_json_schema

    model_dir = make_tiny(tmp_path / "m", size="tiny_untied", seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tools = [get_json_schema(calculate)]
    conv = expression_transcripts(make_product_rows(1, seed=0, split="test"))[0]
    got = bench.transcript_stats(model, tok, conv, tools)

    text = tok.apply_chat_template(conv, tools=tools, tokenize=False)
    expression = json.loads(conv[1]["content"].split("\n")[1])["arguments"]["expression"]
    answer = conv[-1]["content"]
    call_at = text.index('"expression": "') + len('"expression": "')
    for name, lo, span in (
        ("call", call_at, expression),
        ("answer", len(text) - text[::-1].index(answer[::-1]) - len(answer), answer),
    ):
        digits, total = [], 0.0
        for k, ch in enumerate(span):  # the character tokenizer: one token per character
            prefix = tok(text[: lo + k], add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                logp = torch.log_softmax(model(prefix["input_ids"]).logits[0, -1].float(), -1)
            total += logp[tok(ch, add_special_tokens=False)["input_ids"][0]].item()
            if ch.isdigit():
                digits.append((k, ch, tok.decode([int(logp.argmax())])))
        assert got[name]["digits"] == digits
        assert len(digits) == sum(c.isdigit() for c in span)
        assert math.isclose(got[name]["logp"], total, rel_tol=1e-5, abs_tol=1e-5)
