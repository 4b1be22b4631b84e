"""IFEval-style checks: one passing and one failing text per check, plus the reward."""

import json

import pytest

from rewards.ifeval import CHECKS, IFEVAL_IDS, check_instruction, from_ifeval_row, ifeval

# (instruction, text, expected)
CASES = [
    ({"kind": "word_count", "num_words": 3}, "one two three", True),
    ({"kind": "word_count", "num_words": 3}, "one two", False),
    ({"kind": "word_count", "num_words": 3, "relation": "less than"}, "one two", True),
    ({"kind": "word_count", "num_words": 2, "relation": "exactly"}, "one, two!", True),
    ({"kind": "word_count", "num_words": 2, "relation": "at most"}, "a b c", False),
    ({"kind": "sentence_count", "num_sentences": 2}, "Hi there. How are you?", True),
    ({"kind": "sentence_count", "num_sentences": 3}, "Hi there. How are you?", False),
    ({"kind": "paragraph_count", "num_paragraphs": 2}, "First para.\n\nSecond para.", True),
    ({"kind": "paragraph_count", "num_paragraphs": 2}, "Only one\nparagraph.", False),
    ({"kind": "length_constraints:number_paragraphs", "num_paragraphs": 2}, "a\n***\nb", True),
    (
        {"kind": "length_constraints:number_paragraphs", "num_paragraphs": 2},
        "a\n***\n***\nb",
        False,
    ),
    (
        {
            "kind": "nth_paragraph_first_word",
            "num_paragraphs": 2,
            "nth_paragraph": 2,
            "first_word": "so",
        },
        "Intro here.\n\nSo, the end.",
        True,
    ),
    (
        {
            "kind": "nth_paragraph_first_word",
            "num_paragraphs": 2,
            "nth_paragraph": 2,
            "first_word": "so",
        },
        "Intro here.\n\nThus the end.",
        False,
    ),
    ({"kind": "keywords_present", "keywords": ["cat", "dog"]}, "A Cat and a dog.", True),
    ({"kind": "keywords_present", "keywords": ["cat", "dog"]}, "A category and a dog.", False),
    ({"kind": "keyword_frequency", "keyword": "yes", "frequency": 2}, "yes, YES, no", True),
    ({"kind": "keyword_frequency", "keyword": "yes", "frequency": 3}, "yes, YES, no", False),
    ({"kind": "forbidden_words", "forbidden_words": ["bad"]}, "A badge is fine.", True),
    ({"kind": "forbidden_words", "forbidden_words": ["bad"]}, "That is Bad.", False),
    ({"kind": "letter_frequency", "letter": "a", "let_frequency": 3}, "Aardvark", True),
    (
        {
            "kind": "letter_frequency",
            "letter": "z",
            "let_frequency": 1,
            "let_relation": "less than",
        },
        "Zebra",
        False,
    ),
    ({"kind": "no_comma"}, "No commas here.", True),
    ({"kind": "no_comma"}, "Yes, a comma.", False),
    ({"kind": "all_lowercase"}, "all lower 123.", True),
    ({"kind": "all_lowercase"}, "Not all lower.", False),
    ({"kind": "all_uppercase"}, "ALL UPPER 123!", True),
    ({"kind": "all_uppercase"}, "ALL UPPEr", False),
    ({"kind": "capital_word_frequency", "capital_frequency": 2}, "NASA and ESA agree", True),
    (
        {"kind": "capital_word_frequency", "capital_frequency": 2, "capital_relation": "less than"},
        "NASA and ESA agree",
        False,
    ),
    ({"kind": "bullet_count", "num_bullets": 2}, "Intro\n* one\n- two", True),
    ({"kind": "bullet_count", "num_bullets": 2}, "* one\n* two\n* three", False),
    ({"kind": "highlighted_sections", "num_highlights": 2}, "*one* and **two**", True),
    ({"kind": "highlighted_sections", "num_highlights": 2}, "*one* only", False),
    (
        {"kind": "section_count", "num_sections": 2, "section_spliter": "SECTION"},
        "SECTION 1\nintro\nSECTION 2\nbody",
        True,
    ),
    ({"kind": "section_count", "num_sections": 2}, "Section 1\nonly one", False),
    ({"kind": "title"}, "<<My Poem>>\nroses are red", True),
    ({"kind": "title"}, "<< >> no real title", False),
    (
        {"kind": "end_phrase", "end_phrase": "Any other questions?"},
        "Done. any other questions?",
        True,
    ),
    (
        {"kind": "end_phrase", "end_phrase": "Any other questions?"},
        "Any other questions? Bye",
        False,
    ),
    ({"kind": "start_phrase", "start_phrase": "Dear Sir"}, "  dear sir, hello", True),
    ({"kind": "start_phrase", "start_phrase": "Dear Sir"}, "Hello dear sir", False),
    ({"kind": "quotation"}, '"wrapped in quotes"', True),
    ({"kind": "quotation"}, '"only at the start', False),
    ({"kind": "json_format"}, '```json\n{"a": [1, 2]}\n```', True),
    ({"kind": "json_format"}, "{a: 1}", False),
    ({"kind": "placeholder_count", "num_placeholders": 2}, "Meet at [place] on [date].", True),
    ({"kind": "placeholder_count", "num_placeholders": 2}, "Meet at [place].", False),
    ({"kind": "postscript", "postscript_marker": "P.S."}, "Hello.\nP.S. see you", True),
    ({"kind": "postscript", "postscript_marker": "P.P.S"}, "Hello.\nP.S. see you", False),
    ({"kind": "constrained_response"}, "My answer is yes.", True),
    ({"kind": "constrained_response"}, "Yes.", False),
    ({"kind": "two_responses"}, "First answer.\n******\nSecond answer.", True),
    ({"kind": "two_responses"}, "Same.\n******\nSame.", False),
    (
        {"kind": "repeat_prompt", "prompt_to_repeat": "Tell me a joke."},
        "Tell me a joke. Why...",
        True,
    ),
    ({"kind": "repeat_prompt", "prompt_to_repeat": "Tell me a joke."}, "Why did the...", False),
    ({"kind": "punctuation:no_comma"}, "no commas", True),
    ({"kind": "detectable_format:title", "kwargs": {}}, "no title", False),
]


@pytest.mark.parametrize(("instruction", "text", "expected"), CASES)
def test_check(instruction, text, expected):
    assert check_instruction(text, instruction) is expected


def test_every_check_has_cases_and_at_least_15():
    covered = {IFEVAL_IDS.get(i["kind"], (i["kind"],))[0] for i, _, _ in CASES}
    assert len(CHECKS) >= 15
    assert covered == set(CHECKS)
    assert {v[0] for v in IFEVAL_IDS.values()} <= set(CHECKS)


def test_ifeval_fraction_satisfied():
    instructions = [
        [{"kind": "no_comma"}, {"kind": "all_lowercase"}],
        [{"kind": "no_comma"}, {"kind": "all_lowercase"}, {"kind": "word_count", "num_words": 9}],
        json.dumps([{"kind": "quotation"}]),
        [],
    ]
    completions = ["hello world", "Hello world", '"q"', "anything"]
    assert ifeval(["p"] * 4, completions, instructions) == [1.0, 1 / 3, 1.0, None]


def test_ifeval_unknown_kind_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"unknown instruction kind 'no_comas'; did you mean 'no_comma'"
    ):
        ifeval(["p"], ["x"], [[{"kind": "no_comas"}]])


def test_ifeval_bad_kwargs_are_a_clear_error():
    with pytest.raises(ValueError, match=r"kind 'word_count' got unknown kwargs \['words'\]"):
        ifeval(["p"], ["x"], [[{"kind": "word_count", "words": 3}]])
    with pytest.raises(ValueError, match="missing 1 required"):
        check_instruction("x", {"kind": "word_count"})
    with pytest.raises(ValueError, match="unknown relation 'about'"):
        check_instruction("x", {"kind": "word_count", "num_words": 1, "relation": "about"})


def test_from_ifeval_row_drops_null_kwargs():
    rows = from_ifeval_row(
        ["punctuation:no_comma", "length_constraints:number_words"],
        [{"num_words": None}, {"num_words": 2, "relation": "less than", "keywords": None}],
    )
    assert ifeval(["p"], ["one"], [rows]) == [1.0]
    assert ifeval(["p"], ["one, two"], [rows]) == [0.0]
