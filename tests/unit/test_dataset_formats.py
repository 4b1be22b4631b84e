"""Real dataset formats through the config path: `data.columns`, `data.prompt_template`, the
derived columns of data/formats.py, and the reward each format trains with.

Each format gets a small local file shaped like the real dataset's rows (written here); rows are
loaded with `load_config(overrides) -> load_train_eval_rows`, as the trainer loads them, and
scored with `rewards.score` on the columns the rollout source passes (every key but the prompt).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.data.formats import render_template, template_fields
from posttrain.data.loading import split_config
from posttrain.data.preference import normalize_pairs
from posttrain.data.splits import load_train_eval_rows
from posttrain.errors import ConfigError
from posttrain.rollout.factory import check_rewards
from rewards import RewardSpec, score

ROOT = Path(__file__).resolve().parents[2]
BOXED = "\nPut the final answer in \\boxed{}."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def cfg_for(source: Path, n: int, *extra: str, recipe: Path | None = None):
    return load_config(
        recipe,
        [
            f"data.source={source}",
            f"data.train_size={n}",
            f"data.eval_size={n}",
            "log.wandb=disabled",
            *extra,
        ],
    )


def rewards_of(cfg, rows: list[dict], completions: list[str]) -> list[float | None]:
    """The totals the rollout source computes: prompt column as prompts, the rest as columns."""
    check_rewards(cfg, rows)
    col = cfg.data.prompt_column
    specs = [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in cfg.rewards]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != col}
    return score(specs, [r[col] for r in rows], completions, columns, timeout_s=60).total


# ---------------------------------------------------------------------------------- GSM8K
GSM8K_NUMBERS = [72, 10, 5, 42, 624, 35, 48, 16, 1000, 7]


def gsm8k_rows() -> list[dict]:
    rows = []
    for i, n in enumerate(GSM8K_NUMBERS):
        half = n // 2
        rows.append(
            {
                "question": f"Natalia sold clips to {i + 2} friends in April, and then she sold "
                f"half as many in May. How many clips did she sell altogether? (case {i})",
                "answer": f"In May she sold {n} / 2 = <<{n}/2={half}>>{half} clips.\n"
                f"Altogether she sold {half} + {n - half} = <<{half}+{n - half}={n}>>{n} "
                f"clips.\n#### {n}",
            }
        )
    return rows


def test_gsm8k_template_and_hash_answer_reward(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    template = "{question}" + BOXED
    cfg = cfg_for(
        path, 10, f"data.prompt_template={json.dumps(template)}", "rewards=[{name: math_answer}]"
    )
    train, held = load_train_eval_rows(cfg)
    assert len(train) == len(held) == 10
    for row in train:
        assert row["prompt"] == row["question"] + BOXED
    gold = [int(row["answer"].rsplit("#### ", 1)[1]) for row in train]
    # the rationale's intermediate number (n/2) is in the gold text but is not the answer
    right = [f"Step by step... so \\boxed{{{g}}}" for g in gold]
    wrong = [f"Halving gives \\boxed{{{g // 2}}}" for g in gold]
    assert rewards_of(cfg, train, right) == [1.0] * 10
    assert rewards_of(cfg, train, wrong) == [0.0] * 10
    hashes = [f"reasoning\n#### {g}" for g in gold]
    assert rewards_of(cfg, train, hashes) == [1.0] * 10


# ----------------------------------------------------------------------------------- MATH
MATH_ROWS = [
    (
        "What is $\\frac{1}{4}+\\frac{1}{4}$?",
        "We add: $\\frac{2}{4}=\\boxed{\\frac{1}{2}}$.",
        "0.5",
        "1/3",
    ),
    (
        "Compute $\\sqrt{8}/2$.",
        "$\\sqrt{8}=2\\sqrt{2}$, so the answer is $\\boxed{\\sqrt{2}}$.",
        "\\sqrt{2}",
        "2",
    ),
    ("Solve $x+3=8$.", "Subtract 3: $x=\\boxed{5}$.", "5", "11"),
    ("What is $2^{10}$?", "$2^{10} = \\boxed{1024}$.", "1024", "1000"),
    (
        "Find $\\{x : x^2 = 4\\}$.",
        "Both signs work: $\\boxed{\\{-2, 2\\}}$.",
        "\\{2, -2\\}",
        "\\{2\\}",
    ),
    (
        "Simplify $\\frac{6}{8}$.",
        "Divide by 2: $\\boxed{\\frac{3}{4}}$.",
        "\\frac{3}{4}",
        "\\frac{4}{3}",
    ),
    (
        "What is $3 \\cdot 7$?",
        "It is $\\boxed{21}$, since $\\boxed{x}$ was a typo... no: $\\boxed{21}$.",
        "21",
        "7",
    ),
    ("Evaluate $\\pi$ to 2 places.", "$\\pi \\approx \\boxed{3.14}$.", "3.14", "3.41"),
]


def test_math_solution_boxed_is_the_gold(tmp_path):
    rows = [
        {"problem": p, "level": f"Level {i % 5 + 1}", "type": "Algebra", "solution": s}
        for i, (p, s, _, _) in enumerate(MATH_ROWS)
    ]
    path = write_parquet(tmp_path / "math.parquet", rows)
    template = "Problem ({level}): {problem}" + BOXED
    cfg = cfg_for(
        path,
        8,
        "data.columns={answer: solution}",
        f"data.prompt_template={json.dumps(template)}",
        "rewards=[{name: math_answer}]",
    )
    train, _ = load_train_eval_rows(cfg)
    by_problem = {p: (right, wrong) for p, _, right, wrong in MATH_ROWS}
    for row in train:
        assert row["prompt"] == f"Problem ({row['level']}): {row['problem']}" + BOXED
        assert row["answer"] == row["solution"]
    right = [f"... the answer is $\\boxed{{{by_problem[r['problem']][0]}}}$" for r in train]
    wrong = [f"... the answer is $\\boxed{{{by_problem[r['problem']][1]}}}$" for r in train]
    assert rewards_of(cfg, train, right) == [1.0] * 8
    assert rewards_of(cfg, train, wrong) == [0.0] * 8


# ------------------------------------------------------------------------- HumanEval / MBPP
HUMANEVAL_FNS = [
    ("add", "a, b", "return a + b", "return a - b", [((1, 2), 3), ((5, 7), 12)]),
    ("square", "x", "return x * x", "return x + x", [((3,), 9), ((4,), 16)]),
    ("neg", "x", "return -x", "return x", [((2,), -2), ((-5,), 5)]),
    ("first", "xs", "return xs[0]", "return xs[-1]", [(([1, 2, 3],), 1), (([9, 8],), 9)]),
    ("maxof", "xs", "return max(xs)", "return min(xs)", [(([1, 5, 2],), 5), (([-1, -3],), -1)]),
    ("length", "s", "return len(s)", "return len(s) + 1", [(("abc",), 3), (("",), 0)]),
    ("upper", "s", "return s.upper()", "return s.lower()", [(("ab",), "AB"), (("Q",), "Q")]),
    ("double", "xs", "return [2 * x for x in xs]", "return xs", [(([1, 2],), [2, 4])]),
]


def humaneval_rows() -> list[dict]:
    rows = []
    for i, (name, args, _, _, cases) in enumerate(HUMANEVAL_FNS):
        asserts = "".join(
            f"    assert candidate({', '.join(map(repr, a))}) == {out!r}\n" for a, out in cases
        )
        rows.append(
            {
                "task_id": f"HumanEval/{i}",
                "prompt": f'def {name}({args}):\n    """Return the {name} of {args}."""\n',
                "canonical_solution": "    " + HUMANEVAL_FNS[i][2] + "\n",
                "test": "METADATA = {'author': 'jt', 'dataset': 'test'}\n\n\n"
                f"def check(candidate):\n{asserts}",
                "entry_point": name,
            }
        )
    return rows


def fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}```\n"


def test_humaneval_rows_as_they_come(tmp_path):
    rows = humaneval_rows()
    path = write_jsonl(tmp_path / "humaneval.jsonl", rows)
    template = "Complete the function.\n```python\n{prompt}```"
    cfg = cfg_for(
        path, 8, f"data.prompt_template={json.dumps(template)}", "rewards=[{name: code_tests}]"
    )
    train, _ = load_train_eval_rows(cfg)
    src = {r["task_id"]: r for r in rows}
    for row in train:
        assert row["prompt"] == template.replace("{prompt}", src[row["task_id"]]["prompt"])
        assert row["tests"].endswith(f"check({row['entry_point']})\n")
    by_name = {f[0]: f for f in HUMANEVAL_FNS}
    right, wrong = [], []
    for row in train:
        name, args, good, bad, _ = by_name[row["entry_point"]]
        right.append(fenced(f"def {name}({args}):\n    {good}\n"))
        wrong.append(fenced(f"def {name}({args}):\n    {bad}\n"))
    assert rewards_of(cfg, train, right) == [1.0] * 8
    assert rewards_of(cfg, train, wrong) == [0.0] * 8
    # a program that defines the function under another name never passes check(entry_point)
    renamed = [fenced("def other(*a):\n    return 0\n")] * 8
    assert rewards_of(cfg, train, renamed) == [0.0] * 8


def test_humaneval_mapped_test_column_still_gets_the_check_call(tmp_path):
    path = write_jsonl(tmp_path / "he.jsonl", humaneval_rows())
    cfg = cfg_for(path, 8, "data.columns={tests: test}", "rewards=[{name: code_tests}]")
    train, _ = load_train_eval_rows(cfg)
    assert all(
        r["tests"] == r["test"].rstrip() + f"\n\n\ncheck({r['entry_point']})\n" for r in train
    )
    anything = [fenced(f"def {r['entry_point']}(*a):\n    return None\n") for r in train]
    assert rewards_of(cfg, train, anything) == [0.0] * 8


def test_mbpp_rows_as_they_come(tmp_path):
    rows = [
        {
            "task_id": 600 + i,
            "text": f"Write a function {name} of {args}.",
            "code": f"def {name}({args}):\n    {good}\n",
            "test_list": [
                f"assert {name}({', '.join(map(repr, a))}) == {out!r}" for a, out in cases
            ]
            + ["assert math.isfinite(1.0)"],
            "test_setup_code": "",
            "test_imports": ["import math"],
        }
        for i, (name, args, good, _, cases) in enumerate(HUMANEVAL_FNS)
    ]
    path = write_parquet(tmp_path / "mbpp.parquet", rows)
    template = "{text} Your code should pass these tests:\n{test_list}"
    cfg = cfg_for(
        path,
        8,
        "data.columns={prompt: text}",
        f"data.prompt_template={json.dumps(template)}",
        "rewards=[{name: code_tests}]",
    )
    train, _ = load_train_eval_rows(cfg)
    by_id = {r["task_id"]: r for r in rows}
    for row in train:
        assert (
            row["prompt"] == f"{row['text']} Your code should pass these tests:\n{row['test_list']}"
        )
        assert (
            row["tests"] == "\n".join(["import math", *by_id[row["task_id"]]["test_list"]]) + "\n"
        )
    by_name = {f[0]: f for f in HUMANEVAL_FNS}
    right = [fenced(r["code"]) for r in train]
    totals = rewards_of(cfg, train, right)
    assert totals == [1.0] * 8
    # the wrong body fails every case assert; the math.isfinite assert still passes
    wrong = []
    expected = []
    for row in train:
        name, args, _, bad, cases = by_name[row["code"].split("(")[0][4:]]
        wrong.append(fenced(f"def {name}({args}):\n    {bad}\n"))
        expected.append(1 / (len(cases) + 1))
    assert rewards_of(cfg, train, wrong) == pytest.approx(expected)


# --------------------------------------------------------------------------------- IFEval
IFEVAL = [
    (["punctuation:no_comma"], [{}], "no commas here at all", "one, two"),
    (
        ["change_case:english_lowercase", "keywords:existence"],
        [{}, {"keywords": ["apple", "pear"]}],
        "an apple and a pear",
        "An Orange",
    ),
    (
        ["length_constraints:number_words"],
        [{"relation": "at least", "num_words": 5}],
        "one two three four five six",
        "too short",
    ),
    (["change_case:english_capital"], [{}], "ALL CAPS ANSWER", "not caps"),
    (
        ["startend:end_checker"],
        [{"end_phrase": "Any other questions?"}],
        "Done. Any other questions?",
        "Done.",
    ),
    (["keywords:forbidden_words"], [{"forbidden_words": ["bad"]}], "all good", "this is bad"),
    (
        ["detectable_content:postscript", "punctuation:no_comma"],
        [{"postscript_marker": "P.S."}, {}],
        "Hello there\nP.S. bye",
        "Hello, there",
    ),
    (["detectable_format:title"], [{}], "<<My Title>> text", "No title"),
]


def test_ifeval_rows_as_they_come(tmp_path):
    rows = [
        {
            "key": 1000 + i,
            "prompt": f"Write something (task {i}).",
            "instruction_id_list": ids,
            "kwargs": kw,
        }
        for i, (ids, kw, _, _) in enumerate(IFEVAL)
    ]
    # parquet pads every kwargs dict with all keys as nulls, as google/IFEval's files do
    path = write_parquet(tmp_path / "ifeval.parquet", rows)
    cfg = cfg_for(path, 8, "rewards=[{name: ifeval}]")
    train, _ = load_train_eval_rows(cfg)
    assert set(train[0]["kwargs"][0]) >= {"keywords", "num_words", "end_phrase"}
    by_key = {1000 + i: item for i, item in enumerate(IFEVAL)}
    for row in train:
        ids = by_key[row["key"]][0]
        assert [ins["kind"] for ins in row["instructions"]] == ids
        assert row["prompt"] == f"Write something (task {row['key'] - 1000})."
    right = [by_key[r["key"]][2] for r in train]
    wrong = [by_key[r["key"]][3] for r in train]
    assert rewards_of(cfg, train, right) == [1.0] * 8
    assert rewards_of(cfg, train, wrong) == [0.0] * 8


# ------------------------------------------------------------------- chat preference rows
def hh_rows() -> list[dict]:
    rows = []
    for i in range(10):
        head = [{"role": "user", "content": f"How do I bake bread, step {i}?"}]
        if i % 2:  # multi-turn: the prompt is everything before the last assistant turn
            head += [
                {"role": "assistant", "content": "Do you have yeast?"},
                {"role": "user", "content": "Yes, dry yeast."},
            ]
        rows.append(
            {
                "chosen": [*head, {"role": "assistant", "content": f"Mix flour and yeast ({i})."}],
                "rejected": [*head, {"role": "assistant", "content": "I don't know."}],
            }
        )
    return rows


def test_hh_implicit_prompt_rows(tmp_path):
    rows = hh_rows()
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    cfg = cfg_for(path, 10, "train.algorithm=dpo")
    train, _ = load_train_eval_rows(cfg)
    pairs, bad = normalize_pairs(train)
    assert bad == [] and len(pairs) == 10
    for row, pair in zip(train, pairs, strict=True):
        assert list(pair.prompt) == row["chosen"][:-1] == row["rejected"][:-1]
        assert pair.chosen == row["chosen"][-1]["content"]
        assert pair.rejected == "I don't know."


def test_ultrafeedback_binarized_rows(tmp_path):
    rows = []
    for i in range(8):
        q = f"Name a prime number greater than {10 * i}."
        user = {"role": "user", "content": q}
        rows.append(
            {
                "prompt": q,
                "prompt_id": f"id{i}",
                "chosen": [
                    user,
                    {"role": "assistant", "content": f"{[11, 13, 23, 31, 41, 53, 61, 71][i]}"},
                ],
                "rejected": [user, {"role": "assistant", "content": f"{10 * i + 10}"}],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    path = write_parquet(tmp_path / "uf.parquet", rows)
    cfg = cfg_for(path, 8, "train.algorithm=dpo")
    train, _ = load_train_eval_rows(cfg)
    pairs, bad = normalize_pairs(train)
    assert bad == []
    for row, pair in zip(train, pairs, strict=True):
        assert pair.prompt == row["prompt"]
        assert (pair.chosen, pair.rejected) == (
            row["chosen"][1]["content"],
            row["rejected"][1]["content"],
        )


# ------------------------------------------------------------------------ templates, errors
def test_template_fields_and_literal_braces():
    t = "{question}\nPut the final answer in \\boxed{}. {{literal}} {a_1}"
    assert template_fields(t) == ["question", "a_1"]
    got = render_template(t, {"question": "Q?", "a_1": 3})
    assert got == "Q?\nPut the final answer in \\boxed{}. {literal} 3"


def test_split_config_of_hub_names(tmp_path):
    assert split_config("openai/gsm8k:main") == ("openai/gsm8k", "main")
    assert split_config("trl-lib/Capybara") == ("trl-lib/Capybara", None)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert split_config(str(odd)) == (str(odd), None)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_mapped_column_names_column_file_and_available(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    cfg = cfg_for(path, 10, "data.columns={prompt: questoin}")
    with pytest.raises(ConfigError) as err:
        load_train_eval_rows(cfg)
    msg = one_line(err)
    assert "'questoin'" in msg and str(path) in msg and "question, answer" in msg


def test_missing_template_placeholder_names_it_and_available(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    cfg = cfg_for(path, 10, "data.prompt_template='{questoin} ok'")
    with pytest.raises(ConfigError) as err:
        load_train_eval_rows(cfg)
    msg = one_line(err)
    assert "{questoin}" in msg and "did you mean 'question'" in msg and "question, answer" in msg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["data.columns={promt: question}"], "unknown role 'promt'; did you mean 'prompt'"),
        (["data.columns={answer: ''}"], "data.columns.answer"),
        (
            ["data.columns={prompt: question}", "data.prompt_column=question"],
            "data.prompt_column='question' both name",
        ),
        (["data.prompt_template=no placeholder"], "has no {column} placeholder"),
    ],
)
def test_static_checks(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in one_line(err)


# ---------------------------------------------------------------------------------- recipes
RECIPES = {
    "gsm8k_qwen_grpo": ("grpo", 2, 0),
    "gsm8k_qwen_grpo_lora": ("grpo", 2, 32),
    "math_qwen_grpo": ("grpo", 2, 0),
    "math_qwen_grpo_zero3": ("grpo", 3, 0),
    "hh_qwen_dpo": ("dpo", 2, 0),
    "chat_qwen_sft": ("sft", 2, 0),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_real_data_recipes_validate(name):
    algorithm, zero, lora_r = RECIPES[name]
    cfg = load_config(ROOT / "recipes" / f"{name}.yaml")
    assert cfg.model.path.startswith("Qwen/Qwen2.5-") and cfg.model.dtype == "bfloat16"
    assert cfg.train.algorithm == algorithm and cfg.train.zero_stage == zero
    assert cfg.model.lora.r == lora_r
    assert cfg.rollout.gpu_memory_utilization == "auto"
    if algorithm == "grpo":
        assert [r.name for r in cfg.rewards] == ["math_answer"] and cfg.eval.reward == "math_answer"


@pytest.mark.parametrize("name", ["gsm8k_qwen_grpo", "gsm8k_qwen_grpo_lora"])
def test_gsm8k_recipes_map_gsm8k_rows(tmp_path, name):
    """The recipe's own data settings on a local file of GSM8K-shaped rows."""
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    cfg = cfg_for(path, 10, "data.eval_source=null", recipe=ROOT / "recipes" / f"{name}.yaml")
    train, _ = load_train_eval_rows(cfg)
    assert all(r["prompt"] == render_template(cfg.data.prompt_template, r) for r in train)
    assert train[0]["prompt"].startswith(train[0]["question"] + "\n")
    gold = [r["answer"].rsplit("#### ", 1)[1] for r in train]
    assert rewards_of(cfg, train, [f"\\boxed{{{g}}}" for g in gold]) == [1.0] * 10


@pytest.mark.parametrize("name", ["math_qwen_grpo", "math_qwen_grpo_zero3"])
def test_math_recipes_map_math_rows(tmp_path, name):
    rows = [
        {"problem": p, "level": "Level 1", "type": "Algebra", "solution": s}
        for p, s, _, _ in MATH_ROWS
    ]
    path = write_parquet(tmp_path / "math.parquet", rows)
    cfg = cfg_for(path, 8, "data.eval_source=null", recipe=ROOT / "recipes" / f"{name}.yaml")
    train, _ = load_train_eval_rows(cfg)
    right = {p: r for p, _, r, _ in MATH_ROWS}
    assert all(r["prompt"].startswith(r["problem"] + "\n") for r in train)
    assert rewards_of(cfg, train, [f"\\boxed{{{right[r['problem']]}}}" for r in train]) == [1.0] * 8


def test_hh_recipe_maps_chat_preference_rows(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    cfg = cfg_for(path, 10, recipe=ROOT / "recipes" / "hh_qwen_dpo.yaml")
    train, _ = load_train_eval_rows(cfg)
    pairs, bad = normalize_pairs(train, prompt_column=cfg.data.prompt_column)
    assert bad == [] and [list(p.prompt) for p in pairs] == [r["chosen"][:-1] for r in train]


def test_chat_sft_recipe_maps_message_rows(tmp_path):
    rows = [
        {
            "source": "Airoboros",
            "messages": [
                {"role": "user", "content": f"Tell me fact {i}."},
                {"role": "assistant", "content": f"Fact {i}: water is wet."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Fire is hot."},
            ],
            "num_turns": 4,
        }
        for i in range(8)
    ]
    path = write_parquet(tmp_path / "capybara.parquet", rows)
    cfg = cfg_for(path, 8, recipe=ROOT / "recipes" / "chat_qwen_sft.yaml")
    train, _ = load_train_eval_rows(cfg)
    assert all(r[cfg.data.prompt_column] == r["messages"] for r in train)
    assert all(r.get(cfg.data.completion_column) is None for r in train)


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("In May she sold 24 clips.\nAltogether 48 + 24 = <<48+24=72>>72.\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        (
            "So $x = \\boxed{\\frac{1}{2}}$, not $\\boxed{2}$... wait: $\\boxed{\\frac{a}{b}}$.",
            "\\frac{a}{b}",
        ),
        ("$\\boxed{\\{-2, 2\\}}$", "\\{-2, 2\\}"),
        ("  82 ", "82"),
        ("\\frac{3}{4}", "\\frac{3}{4}"),
    ],
)
def test_reference_answer(gold, expected):
    from rewards.math import reference_answer

    assert reference_answer(gold) == expected


def test_arithmetic_pairs_after_a_prompt_template_use_the_raw_expression():
    from posttrain.data.arithmetic import make_split
    from posttrain.data.formats import apply_template
    from posttrain.data.preference import arithmetic_pairs

    rows = make_split("train", 8, seed=3)
    templated = apply_template(
        rows, "What is {prompt}? Give only the final number.", "prompt", "arithmetic"
    )
    assert all(t["raw_prompt"] == r["prompt"] for t, r in zip(templated, rows, strict=True))
    pairs = arithmetic_pairs(templated, seed=0, negatives=2, kind="plausible")
    assert len(pairs) == 16
    for p in pairs:
        a, _op, b = re.fullmatch(r"(\d+)([+-])(\d+)", p["raw_prompt"]).groups()
        a, b, gold = int(a), int(b), int(p["answer"])
        plausible = {gold + d for d in (-10, -2, -1, 1, 2, 10)} | {-gold, a - b, a + b, b - a}
        assert p["chosen"] == str(gold) and int(p["rejected"]) in plausible - {gold}
        assert p["prompt"] == f"What is {p['raw_prompt']}? Give only the final number."
