"""Format rewards: bare integer, think/answer tags, length bounds, regex."""

import re

import pytest

from rewards.format import format_number, length_in_range, regex_match, think_answer_format


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("42", 1.0),
        ("  42\n", 1.0),
        ("-7", 1.0),
        ("0", 1.0),
        ("4 2", 0.0),
        ("42.0", 0.0),
        ("The answer is 42", 0.0),
        ("42.", 0.0),
        ("", 0.0),
        ("+42", 0.0),
        ("1,000", 0.0),
    ],
)
def test_format_number(completion, expected):
    assert format_number(["p"], [completion]) == [expected]


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("p", "<think>a</think><answer>b</answer>", 1.0),
        ("p", "  <think>\nreason\n</think>\n<answer> 4 </answer>\n", 1.0),
        ("p", "<think></think><answer>4</answer>", 1.0),
        ("p", "<think>a</think><answer> </answer>", 0.0),
        ("p", "<answer>4</answer>", 0.0),
        ("p", "<think>a</think>", 0.0),
        ("p", "<think>a</think><answer>4</answer> trailing", 0.0),
        ("p", "<think>a</think><think>b</think><answer>4</answer>", 0.0),
        ("p", "<think>a<answer>4</answer></think><answer>4</answer>", 0.0),
        ("p", "<answer>4</answer><think>a</think>", 0.0),
        ("p", "reasoning</think><answer>4</answer>", 0.0),
        ("Solve it.\n<think>", "reasoning</think><answer>4</answer>", 1.0),
        ("Solve it.\n<think>", "<think>r</think><answer>4</answer>", 1.0),
    ],
)
def test_think_answer_format(prompt, completion, expected):
    assert think_answer_format([prompt], [completion]) == [expected]


def test_length_in_range():
    completions = ["", "abc", "  abcde  ", "x" * 11]
    assert length_in_range(["p"] * 4, completions, min_chars=3, max_chars=10) == [
        0.0,
        1.0,
        1.0,
        0.0,
    ]
    assert length_in_range(["p"] * 4, completions, min_chars=1) == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_chars"):
        length_in_range(["p"], ["a"], min_chars=5, max_chars=2)


def test_regex_match_kwarg_column_and_flags():
    completions = ["Final: 12", "final: 12", "nothing"]
    assert regex_match(["p"] * 3, completions, pattern=r"Final: \d+") == [1.0, 0.0, 0.0]
    flags = re.IGNORECASE
    assert regex_match(["p"] * 3, completions, pattern=r"final: \d+", flags=flags) == [
        1.0,
        1.0,
        0.0,
    ]
    assert regex_match(["p"] * 2, [" 12 ", "a 12"], pattern=r"\d+", fullmatch=True) == [1.0, 0.0]
    per_sample = [r"\d", "^fin", "no.*ing"]
    assert regex_match(["p"] * 3, completions, pattern=per_sample) == [1.0, 1.0, 1.0]


def test_regex_match_invalid_pattern_names_it():
    with pytest.raises(ValueError, match=r"invalid pattern '\(unclosed'"):
        regex_match(["p"], ["x"], pattern="(unclosed")
