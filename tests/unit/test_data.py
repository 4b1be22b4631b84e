"""posttrain.data: arithmetic task, row loading, chat encoding."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.data import arithmetic
from posttrain.data.arithmetic import make_split, sft_completion, wrong_answer
from posttrain.data.chat import encode_prompts, encode_sft
from posttrain.data.loading import load_rows
from posttrain.errors import ConfigError


def naive_eval(expression: str) -> int:
    """Evaluate 'a+b' / 'a-b' by scanning characters (independent of arithmetic.parse)."""
    a, b, op, seen_op = 0, 0, None, False
    for ch in expression:
        if ch in "+-" and not seen_op:
            op, seen_op = ch, True
        elif not seen_op:
            a = a * 10 + (ord(ch) - ord("0"))
        else:
            b = b * 10 + (ord(ch) - ord("0"))
    assert op is not None
    return a + b if op == "+" else a - b


# ---------------------------------------------------------------- arithmetic


def test_make_split_is_deterministic_and_prefix_stable():
    assert make_split("train", 50, seed=3) == make_split("train", 50, seed=3)
    assert make_split("train", 50, seed=3) != make_split("train", 50, seed=4)
    assert make_split("train", 200, seed=3)[:50] == make_split("train", 50, seed=3)
    big = make_split("train", 30, seed=1, max_operand=100_000)  # rejection-sampling path
    assert big == make_split("train", 30, seed=1, max_operand=100_000)
    assert make_split("train", 60, seed=1, max_operand=100_000)[:30] == big


def test_answers_are_correct_and_rows_are_short():
    rows = make_split("train", 500, seed=0) + make_split("test", 500, seed=0)
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        assert row["answer"] == str(naive_eval(row["prompt"]))
        assert sft_completion(row) == row["answer"]
        assert len(row["prompt"]) <= 5  # "99+99"
    assert any(int(r["answer"]) < 0 for r in rows), "subtraction should give negative results"
    assert {r["prompt"][1:].strip("0123456789")[:1] for r in rows} == {"+", "-"}


def test_operand_range_and_ops():
    rows = make_split("train", 80, seed=0, max_operand=9, ops=("+",))
    for row in rows:
        a, b = row["prompt"].split("+")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
    rows = make_split("test", 20, seed=0, max_operand=999, ops=("-",))
    assert all("-" in r["prompt"][1:] and "+" not in r["prompt"] for r in rows)
    assert max(int(p) for r in rows for p in r["prompt"].split("-")) > 99


def test_train_and_test_are_disjoint_and_cover_the_space():
    m = 20
    space = {f"{a}{op}{b}" for op in "+-" for a in range(m + 1) for b in range(m + 1)}
    tests = set()
    n_test = 0
    while True:  # find the test capacity by asking for one more than possible
        try:
            tests = {r["prompt"] for r in make_split("test", n_test + 1, seed=0, max_operand=m)}
            n_test += 1
        except ConfigError:
            break
    trains = {r["prompt"] for r in make_split("train", len(space) - n_test, seed=5, max_operand=m)}
    assert len(tests) == n_test > 0
    assert not tests & trains
    assert tests | trains == space
    # other seeds and ranges never move an expression across splits
    for seed in range(3):
        train = {r["prompt"] for r in make_split("train", 5000, seed=seed)}
        test = {r["prompt"] for r in make_split("test", 1000, seed=seed)}
        assert len(train) == 5000 and len(test) == 1000  # no duplicates
        assert not train & test
        assert not train & tests


def test_make_split_errors():
    with pytest.raises(ConfigError, match="split='val'"):
        make_split("val", 10, seed=0)
    with pytest.raises(ConfigError, match="n=100000 exceeds"):
        make_split("test", 100_000, seed=0)
    with pytest.raises(ConfigError, match="ops="):
        make_split("train", 10, seed=0, ops=("*",))


def test_wrong_answer_is_plausible_and_deterministic():
    rows = make_split("train", 300, seed=0)
    for row in rows:
        wrong = wrong_answer(row, random.Random(7))
        assert wrong != row["answer"]
        assert wrong == str(int(wrong))
        assert abs(int(wrong) - int(row["answer"])) <= 400
        assert wrong == wrong_answer(row, random.Random(7))
    rng = random.Random(0)
    assert len({wrong_answer(rows[0], rng) for _ in range(50)}) > 1
    assert wrong_answer({"prompt": "0+0", "answer": "0"}, random.Random(0)) != "0"


def test_parse_rejects_non_expressions():
    assert arithmetic.solve("37-45") == -8
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        arithmetic.parse("1*2")


# ---------------------------------------------------------------- loading

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4", "tests": ["a", "b"]},
    {"prompt": "Capital of France?", "answer": "Paris", "tests": []},
    {"prompt": "3*3", "answer": "9", "tests": ["c"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(params=["jsonl", "json", "parquet"])
def data_file(request, tmp_path):
    path = tmp_path / f"rows.{request.param}"
    if request.param == "jsonl":
        write_jsonl(path, ROWS)
    elif request.param == "json":
        path.write_text(json.dumps(ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def test_load_local_file_keeps_all_columns(data_file):
    rows = load_rows(str(data_file))
    assert rows == ROWS


def test_load_with_n_is_a_seeded_shuffle(data_file):
    a = load_rows(str(data_file), n=2, seed=1)
    assert a == load_rows(str(data_file), n=2, seed=1)
    assert len(a) == 2 and all(r in ROWS for r in a)
    assert a[0] != a[1]
    orders = {tuple(r["answer"] for r in load_rows(str(data_file), n=3, seed=s)) for s in range(10)}
    assert len(orders) > 1
    with pytest.raises(ConfigError, match="n=4 exceeds the 3 rows"):
        load_rows(str(data_file), n=4)


def test_missing_prompt_column_lists_columns(data_file):
    with pytest.raises(ConfigError) as info:
        load_rows(str(data_file), prompt_column="question")
    msg = str(info.value)
    assert "'question'" in msg
    for col in ("prompt", "answer", "tests"):
        assert col in msg


def test_other_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "hi", "id": 1}])
    assert load_rows(str(path), prompt_column="question") == [{"question": "hi", "id": 1}]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"nope\.jsonl"):
        load_rows(str(path))


def test_empty_prompts_are_reported_by_row_index(tmp_path):
    rows = [{"prompt": "ok"}, {"prompt": ""}, {"prompt": "fine"}, {"prompt": None}, {"other": 1}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=r"3 row\(s\).*row index 1, 3, 4"):
        load_rows(str(path))


def test_message_list_prompts_load(tmp_path):
    msgs = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2+2"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": msgs, "answer": "4"}])
    assert load_rows(str(path)) == [{"prompt": msgs, "answer": "4"}]


def test_load_arithmetic():
    assert load_rows("arithmetic", split="test", n=20, seed=2) == make_split("test", 20, seed=2)
    rows = load_rows("arithmetic", n=5, task_kwargs={"max_operand": 9})
    assert rows == make_split("train", 5, seed=0, max_operand=9)
    with pytest.raises(ConfigError, match="n is required"):
        load_rows("arithmetic")
    with pytest.raises(ConfigError, match="'question'"):
        load_rows("arithmetic", n=3, prompt_column="question")


# ---------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from posttrain.models import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(str(path))


def test_encode_prompts_decodes_to_templated_text(tokenizer):
    ids = encode_prompts(tokenizer, ["12+7", "hello world\nline two"])
    assert tokenizer.decode(ids[0]) == "<|im_start|>user\n12+7<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids[1]) == (
        "<|im_start|>user\nhello world\nline two<|im_end|>\n<|im_start|>assistant\n"
    )
    special = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0][0] == special[0]
    assert ids[0].count(special[1]) == 1  # one token each, not spelled out in characters


def test_encode_prompts_system_and_messages(tokenizer):
    with_system = encode_prompts(tokenizer, ["2+2"], system_prompt="Answer.")[0]
    assert tokenizer.decode(with_system) == (
        "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\n2+2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "2+2"}]
    assert encode_prompts(tokenizer, [msgs])[0] == with_system
    # a row's own system message wins over system_prompt
    assert encode_prompts(tokenizer, [msgs], system_prompt="Other.")[0] == with_system
    plain = [{"role": "user", "content": "2+2"}]
    assert encode_prompts(tokenizer, [plain], system_prompt="Answer.")[0] == with_system


def test_encode_prompts_too_long_names_row_and_length(tokenizer):
    ids = encode_prompts(tokenizer, ["1+1", "12345+67890"])
    limit = len(ids[1]) - 1
    assert encode_prompts(tokenizer, ["12345+67890"], max_prompt_tokens=len(ids[1])) == [ids[1]]
    with pytest.raises(ConfigError, match=rf"row 1 is {len(ids[1])} tokens.*={limit}"):
        encode_prompts(tokenizer, ["1+1", "12345+67890"], max_prompt_tokens=limit)


def test_encode_sft_masks_exactly_completion_and_eos(tokenizer):
    prompt_ids = encode_prompts(tokenizer, ["37+45"], system_prompt="s")[0]
    input_ids, mask = encode_sft(tokenizer, "37+45", "82", "s")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(input_ids) == len(mask) == len(prompt_ids) + 3
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert mask == [0] * len(prompt_ids) + [1, 1, 1]
    completion = [t for t, m in zip(input_ids, mask, strict=True) if m]
    assert completion[-1] == eos_id
    assert tokenizer.decode(completion) == "82<|im_end|>"
    # negative answers and message prompts work too
    ids, mask = encode_sft(tokenizer, [{"role": "user", "content": "1-5"}], "-4")
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "-4<|im_end|>"
    with pytest.raises(ConfigError, match="eos="):
        encode_sft(tokenizer, "1+1", "2", eos="<|nope|>")
