"""Math answer extraction and equivalence: a hand-written table of equivalent / not-equivalent."""

import pytest

from rewards.math import exact_answer, extract_answer, extract_boxed, last_integer, math_answer

# (completion, gold answer, expected score)
EQUIVALENT = [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\frac12"),
    (r"\boxed{50\%}", "0.5"),
    (r"The answer is \boxed{\dfrac{3}{4}}.", "0.75"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("<answer>42</answer>", "42"),
    (r"<answer>\frac{2}{4}</answer>", "1/2"),
    ("so the result is 7", "7"),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}"),
    (r"\boxed{[1,2)}", "[1,2)"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]"),
    (r"\boxed{\sqrt{2}}", "2^{1/2}"),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}"),
    (r"\boxed{x+1}", "1+x"),
    (r"\boxed{3.0}", "3"),
    (r"\boxed{-\frac{1}{3}}", r"\frac{-1}{3}"),
    (r"\boxed{10^{3}}", "1000"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sin(\pi/3)"),
    (r"\boxed{\pi}", r"\pi"),
    (r"\boxed{\frac{1}{\sqrt{4}}}", "1/2"),
    (r"\boxed{2\pi}", r"2\pi"),
    ("We get $x = 5$", "5"),
    (r"so it is \(\frac{3}{2}\)", "1.5"),
    (r"\boxed{12\%}", "0.12"),
    (r"\boxed{x=2}", "2"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\$5}", "5"),
    (r"\boxed{5 \text{ cm}}", "5"),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}"),
    (r"\boxed{(1,2)}", "(1,2)"),
    (r"\boxed{\infty}", r"\infty"),
    (r"\boxed{\frac{x^2-1}{x-1}}", "x+1"),
    ("<answer>The answer is 5</answer>", "5"),
    (r"\boxed{-3}", "-3"),
    (r"\boxed{1.5}", r"\frac{3}{2}"),
    (r"\boxed{2x}", r"x \cdot 2"),
    ("<think>2+2</think><answer>4</answer>", "4"),
    (r"\boxed{\left(\frac{1}{2}\right)}", "0.5"),
]

NOT_EQUIVALENT = [
    (r"\boxed{2}", "3"),
    (r"\boxed{0.5}", "0.25"),
    (r"\boxed{\frac{1}{3}}", "0.3"),
    (r"\boxed{(1,2]}", "[1,2]"),
    (r"\boxed{[1,2]}", "(1,2)"),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}"),
    (r"\boxed{x+2}", "x+1"),
    (r"\boxed{-5}", "5"),
    ("no answer here", "5"),
    ("", "5"),
    ("#### 71", "72"),
    ("<answer>41</answer>", "42"),
    (r"\boxed{\sqrt{3}}", "3"),
    (r"first \boxed{2} then \boxed{1}", "2"),
    (r"\boxed{\pi}", "3"),
    (r"\boxed{1000}", "100"),
    ("so the result is 7", "8"),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{10\%}", "0.2"),
    (r"\boxed{x^2}", "2x"),
    (r"\boxed{1.49}", "1.5"),
    (r"\boxed{-\infty}", r"\infty"),
    (r"\boxed{3}", "-3"),
    ("I have 4 apples and 5 pears", "4"),
]


@pytest.mark.parametrize(("completion", "gold"), EQUIVALENT)
def test_equivalent(completion, gold):
    assert math_answer(["p"], [completion], [gold]) == [1.0]


@pytest.mark.parametrize(("completion", "gold"), NOT_EQUIVALENT)
def test_not_equivalent(completion, gold):
    assert math_answer(["p"], [completion], [gold]) == [0.0]


def test_table_size():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"x \boxed{\{a, \{b\}\}} y", r"\{a, \{b\}\}"),
        (r"\boxed{1} and \boxed{{2}}", "{2}"),
        (r"\boxed{unclosed", None),
        (r"\boxed 7", "7"),
        (r"\fbox{3}", "3"),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"<answer>\boxed{5}</answer>", "5"),
        ("<answer> 12 </answer>", "12"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("step\n#### 1,234\n", "1,234"),
        (r"so $\frac{1}{2}$ it is", r"\frac{1}{2}"),
        ("the values are 3 and -4.5", "-4.5"),
        ("about 1,000,000 people", "1,000,000"),
        ("ratio 3/4", "3/4"),
        ("nothing numeric", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gold_as_number_and_unjudgeable_gold():
    completions = [r"\boxed{7}", r"\boxed{7}", r"\boxed{7}", r"\boxed{7}"]
    answers = [7, "", None, r"\boxed{}"]
    assert math_answer(["p"] * 4, completions, answers) == [1.0, None, None, None]


def test_math_answer_off_main_thread():
    """math-verify's signal timeouts fail off the main thread; the reward must still work."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        out = pool.submit(
            math_answer, ["p", "p"], [r"\boxed{0.5}", "#### 3"], ["1/2", "4"]
        ).result()
    assert out == [1.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("12", "12", 1.0),
        ("  12\n", "12", 1.0),
        ("3 + 9 = 12", "12", 1.0),
        ("-5", "-5", 1.0),
        ("007", "7", 1.0),
        ("12", " 12 ", 1.0),
        ("12 then 13", "12", 0.0),
        ("12.5", "5", 0.0),
        ("twelve", "12", 0.0),
        ("", "0", 0.0),
        ("5", "-5", 0.0),
    ],
)
def test_exact_answer(completion, answer, expected):
    assert exact_answer(["p"], [completion], [answer]) == [expected]


def test_last_integer():
    assert last_integer("a 1 b -22 c") == "-22"
    assert last_integer("none") is None
