"""Environments (posttrain/envs): the registry, ToolEnv's outcomes, the built-in environments
played by scripted "models", their task generators, and SFT transcripts replayed through them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from transformers.utils import get_json_schema

from posttrain.envs import (
    CALL_OUTCOMES,
    ENVIRONMENTS,
    Environment,
    StepResult,
    ToolCall,
    Turn,
    calculator,
    code_feedback,
    environment_class,
    environment_factory,
    guess_number,
    make_environment,
)
from posttrain.envs.calculator import CalculatorEnv, CalculatorExpressionEnv, add, multiply
from posttrain.envs.code_feedback import CodeFeedbackEnv
from posttrain.envs.guess_number import GuessNumberEnv
from posttrain.envs.tools import ToolEnv, python_tool, run_python, tool_call_text
from posttrain.errors import ConfigError
from tests.env_play import calls as _calls
from tests.env_play import replay as _replay

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


class EchoEnv:
    """A user's own environment, loaded by import path: echoes one turn, reward = its length."""

    def __init__(self, scale: float = 1.0) -> None:
        self.tools: list[Any] = []
        self.scale, self.text = scale, ""

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn: Turn) -> StepResult:
        self.text = turn.text
        return StepResult(messages=[{"role": "user", "content": turn.text}], done=True)

    def final_reward(self) -> float:
        return self.scale * len(self.text)


class NotAnEnv:
    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return []


# ------------------------------------------------------------------------------------ registry


def test_registry_builds_each_registered_environment() -> None:
    assert set(ENVIRONMENTS) == {
        "calculator",
        "calculator_expression",
        "guess_number",
        "code_feedback",
    }
    classes = {"calculator": CalculatorEnv, "guess_number": GuessNumberEnv}
    classes["code_feedback"] = CodeFeedbackEnv
    classes["calculator_expression"] = CalculatorExpressionEnv
    for name, cls in classes.items():
        assert environment_class(name) is cls
        env = make_environment(name, {})
        assert isinstance(env, cls) and isinstance(env, Environment)


def test_user_class_by_import_path_and_fresh_instance_per_episode() -> None:
    make = environment_factory(f"{__name__}:EchoEnv", {"scale": 2.0})
    first, second = make(), make()
    assert first is not second and type(first).__name__ == "EchoEnv"
    assert first.reset({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    assert first.step(Turn(text="abc")).done and first.final_reward() == 6.0
    assert second.text == ""  # episode state is per instance


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'calculator'"):
        make_environment("calculater", {})
    with pytest.raises(ConfigError, match="cannot import module"):
        make_environment("no_such_pkg.mod:Env", {})
    with pytest.raises(ConfigError, match="has no class 'Missing'"):
        environment_factory(f"{__name__}:Missing")
    with pytest.raises(ConfigError, match="not an Environment"):
        make_environment(f"{__name__}:NotAnEnv")


def test_bad_kwargs_fail_when_the_factory_is_made() -> None:
    with pytest.raises(ConfigError, match="max_guess"):
        environment_factory("guess_number", {"max_guess": 3})
    with pytest.raises(ConfigError, match="max_guesses"):
        make_environment("guess_number", {"max_guesses": 0})


# ------------------------------------------------------------------------------------- ToolEnv


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise ValueError(f"bad x {x}")


def nap(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


def shout(n: int) -> str:
    """A long output.

    Args:
        n: How many characters.
    """
    return "x" * n


class ToyEnv(ToolEnv):
    tools = (add, multiply, boom, nap, shout)

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]


def test_calculator_schemas_are_get_json_schemas() -> None:
    env = CalculatorEnv()
    assert env.schemas() == [get_json_schema(add), get_json_schema(multiply)]
    assert [s["function"]["name"] for s in env.schemas()] == ["add", "multiply"]
    assert env.tools == [add, multiply]


def test_tool_env_answers_every_outcome_in_order() -> None:
    env = ToyEnv(tool_timeout_s=0.2, tool_output_chars=100)
    env.reset({})
    calls = (
        ToolCall("multiply", {"a": 347, "b": 862}),
        ToolCall("divide", {"a": 1, "b": 2}),
        ToolCall("add", {"a": "3", "b": 4}),
        ToolCall("add", {"a": 3}),
        ToolCall("boom", {"x": 7}),
        ToolCall("nap", {"seconds": 1.0}),
        ToolCall("shout", {"n": 1234}),
    )
    result = env.step(Turn(text="...", tool_calls=calls, parse_errors=("invalid_json: call 8",)))
    assert result.tool_outcomes == [
        "ok", "unknown_tool", "bad_arguments", "bad_arguments", "error", "timeout", "ok",
        "malformed",
    ]  # fmt: skip
    assert set(result.tool_outcomes) == set(CALL_OUTCOMES)
    names = [m.get("name") for m in result.messages]
    assert names == ["multiply", "divide", "add", "add", "boom", "nap", "shout", None]
    assert all(m["role"] == "tool" for m in result.messages)
    texts = [m["content"] for m in result.messages]
    assert texts[0] == "299114"
    assert texts[1].startswith("error: unknown tool 'divide'") and "add, boom" in texts[1]
    assert texts[2].startswith("error: bad arguments:") and "'a'" in texts[2]
    assert "integer" in texts[2] and "string" in texts[2]
    assert texts[3].startswith("error: bad arguments:") and "'b'" in texts[3]
    assert texts[4] == "error: ValueError: bad x 7"
    assert texts[5] == "error: timed out after 0.2 s"
    assert texts[6] == "x" * 100 + "...[truncated 1134 chars]"
    assert texts[7] == "error: malformed tool call: invalid_json: call 8"
    assert 0.2 <= result.tool_seconds < 1.0
    assert not result.done and result.reward is None


def test_tool_env_final_answer_ends_the_episode() -> None:
    env = ToyEnv()
    env.reset({})
    result = env.step(Turn(text="The answer is 5."))
    assert result == StepResult(done=True)
    assert env.final_text == "The answer is 5." and env.final_reward() is None
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(Turn(text="again"))


def test_tool_env_rejects_bad_limits_and_duplicate_names() -> None:
    with pytest.raises(ConfigError, match="must be positive"):
        ToyEnv(tool_timeout_s=0)
    with pytest.raises(ConfigError, match="share a name"):
        ToyEnv(tools=[add, add])


class CounterEnv(ToolEnv):
    """Per-episode state: a bound method as a tool."""

    def __init__(self, **kw: Any) -> None:
        self.count = 0
        super().__init__(tools=[self.bump], **kw)

    def bump(self, by: int) -> int:
        """Increase the counter.

        Args:
            by: The increment.
        """
        self.count += by
        return self.count

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return []


def test_bound_method_tools_keep_state_per_instance() -> None:
    a, b = CounterEnv(), CounterEnv()
    assert a.schemas()[0]["function"]["parameters"]["required"] == ["by"]
    call = ToolCall("bump", {"by": 2})
    a.step(Turn(text="", tool_calls=(call, call)))
    assert a.count == 4 and b.count == 0


# ----------------------------------------------------------------------------- python tool


@linux_only
def test_python_tool_runs_in_the_sandbox(sandbox_layers) -> None:
    assert get_json_schema(run_python)["function"]["parameters"]["required"] == ["code"]
    assert run_python("print(6 * 7)") == "exit code 0\nstdout:\n42"
    failed = run_python("print('a')\n1 / 0")
    assert failed.startswith("exit code 1 (runtime_error:ZeroDivisionError)\nstdout:\na\nstderr:")
    assert failed.rstrip().endswith("ZeroDivisionError: division by zero")
    assert python_tool(timeout_s=0.5)("while True: pass") == "timed out after 0.5 s"


@linux_only
def test_python_tool_inside_a_tool_env(sandbox_layers) -> None:
    class PyEnv(ToolEnv):
        tools = (python_tool(timeout_s=2),)

        def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
            return []

    env = PyEnv(tool_timeout_s=8)
    result = env.step(Turn(text="", tool_calls=(ToolCall("run_python", {"code": "print(2**10)"}),)))
    assert result.tool_outcomes == ["ok"]
    assert result.messages == [
        {"role": "tool", "name": "run_python", "content": "exit code 0\nstdout:\n1024"}
    ]


# ----------------------------------------------------------------- built-ins, scripted models


def test_calculator_played_to_success_and_failure() -> None:
    row = {"prompt": "What is 347 * 862?", "answer": str(347 * 862)}
    for final, reward in (("So it is 299,114.", 1.0), ("299115", 0.0), ("no idea", 0.0)):
        env = make_environment("calculator", {})
        assert env.reset(row) == [{"role": "user", "content": "What is 347 * 862?"}]
        result = env.step(_calls(tool_call_text("multiply", {"a": 347, "b": 862})))
        assert result.messages == [{"role": "tool", "name": "multiply", "content": "299114"}]
        assert not result.done and result.tool_outcomes == ["ok"]
        assert env.step(Turn(text=final, index=1)).done
        assert env.final_reward() == reward
    unfinished = make_environment("calculator", {})
    unfinished.reset(row)
    assert unfinished.final_reward() == 0.0


def _play_guesses(env: Any, guesses: list[str]) -> list[tuple[str, bool]]:
    return [(r.messages[0]["content"], r.done) for r in (env.step(Turn(text=g)) for g in guesses)]


def test_guess_number_played_to_success_and_failure() -> None:
    row = {"prompt": "Guess my number from 1 to 16.", "secret": 11, "high": 16}
    env = make_environment("guess_number", {"turn_cost": 0.1})
    env.reset(row)
    replies = _play_guesses(env, ["8", "I guess 12", "hmm", "10", "11"])
    assert replies == [
        ("higher", False), ("lower", False), ("reply with a number from 1 to 16", False),
        ("higher", False), ("correct", True),
    ]  # fmt: skip
    assert env.final_reward() == pytest.approx(1.0 - 0.1 * 4)
    env = make_environment("guess_number", {"max_guesses": 2})
    env.reset(row)
    assert _play_guesses(env, ["8", "9"]) == [("higher", False), ("higher", True)]
    assert env.final_reward() == 0.0


@linux_only
def test_code_feedback_played_to_success_and_failure(sandbox_layers) -> None:
    row = code_feedback.task_row("plus", 37)
    assert row["prompt"] == "Write a Python function plus(n) that returns n + 37."
    assert row["tests"] == ["assert plus(0) == 37", "assert plus(5) == 42", "assert plus(-3) == 34"]
    env = make_environment("code_feedback", {"max_attempts": 2})
    env.reset(row)
    first = env.step(Turn(text="```python\ndef plus(n):\n    return n + 38\n```"))
    assert first.messages == [{"role": "user", "content": (
        "0/3 tests passed\nfailed: plus(0) == 37\nfailed: plus(5) == 42\nfailed: plus(-3) == 34"
    )}]  # fmt: skip
    assert not first.done and first.progress == 0.0
    second = env.step(Turn(text="```python\ndef plus(n):\n    return abs(n) + 37\n```"))
    assert (
        second.done and second.messages[0]["content"] == "2/3 tests passed\nfailed: plus(-3) == 34"
    )
    assert env.final_reward() == pytest.approx(2 / 3)  # the last attempt's 2 of 3, out of attempts
    env = make_environment("code_feedback", {})
    env.reset(row)
    broken = env.step(Turn(text="def plus(n) return"))
    assert broken.messages[0]["content"].startswith("0/3 tests passed\nfailed: plus(0) == 37 (")
    assert "syntax_error" in broken.messages[0]["content"] and not broken.done
    done = env.step(Turn(text=code_feedback.solution("plus", 37)))
    assert done.done and done.messages == [{"role": "user", "content": "all 3 tests passed"}]
    assert env.final_reward() == 1.0


@linux_only
def test_code_feedback_partial_credit_of_a_wrong_constant(sandbox_layers) -> None:
    row = code_feedback.task_row("above", 40)
    assert row["tests"] == ["assert above(41)", "assert not above(40)", "assert not above(33)"]
    for wrong, passed in ((41, 2), (39, 2), (40, 3), (10, 1)):
        env = make_environment("code_feedback", {})
        env.reset(row)
        env.step(Turn(text=code_feedback.solution("above", wrong)))
        assert env.final_reward() == pytest.approx(passed / 3), wrong  # 10: only above(41)


@linux_only
def test_code_feedback_revision_transcripts(sandbox_layers) -> None:
    rows = code_feedback.make_rows(400, 0, "train")
    plain = code_feedback.sft_transcripts(rows)
    mixed = code_feedback.sft_transcripts(rows, revise_fraction=0.3)
    assert all(len(t) == 3 for t in plain)
    revised = [t for t in mixed if len(t) == 5]
    assert abs(len(revised) / len(rows) - 0.3) < 0.06  # a stable hash picks ~30%
    for t in revised:  # a neighbouring constant first, then the plain transcript's fix
        assert t[1]["content"] != t[3]["content"] and t[3:] == plain[mixed.index(t)][1:]
        assert t[2]["content"].split("\n")[0] in {"0/3 tests passed", "1/3 tests passed",
                                                   "2/3 tests passed"}  # fmt: skip
    by_family = {t[0]["content"].split("(")[0]: t for t in revised}  # one of each family
    assert len(by_family) == len(code_feedback.FAMILIES)
    for t in by_family.values():  # the environment answers the wrong attempt as written
        assert _replay("code_feedback", t, rows[mixed.index(t)]) == 1.0
    with pytest.raises(ConfigError, match="revise_fraction"):
        code_feedback.sft_transcripts(rows, revise_fraction=1.5)


# ------------------------------------------------------------------------- task generators

GENERATORS = {
    "calculator": calculator,
    "code_feedback": code_feedback,
    "guess_number": guess_number,
}
TASK_KEY = {"calculator": "prompt", "code_feedback": "prompt", "guess_number": "high"}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_deterministic_and_splits_disjoint(name: str) -> None:
    make_rows = GENERATORS[name].make_rows
    assert environment_class(name).make_rows is make_rows
    train, test = make_rows(60, 1, "train"), make_rows(60, 1, "test")
    assert len(train) == len(test) == 60 and train == make_rows(60, 1, "train")
    assert make_rows(60, 2, "train") != train
    other_seeds = [r for seed in range(5) for r in make_rows(60, seed, "train")]
    key = TASK_KEY[name]
    assert {r[key] for r in other_seeds}.isdisjoint({r[key] for r in test})
    assert make_rows(0, 1, "train") == []
    with pytest.raises(ConfigError, match="split"):
        make_rows(3, 0, "validation")


def test_calculator_rows_are_3_digit_questions() -> None:
    rows = calculator.make_rows(200, 0, "train")
    assert len({r["prompt"] for r in rows}) == 200
    for row in rows:
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999 and op in "+*"
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert {r["prompt"].split()[3] for r in rows} == {"+", "*"}


# -------------------------------------------------------------------- SFT transcripts replay


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_sft_transcripts_replay_to_full_reward(name: str, sandbox_layers) -> None:
    if name == "code_feedback" and sys.platform != "linux":
        pytest.skip("the sandbox is Linux-only")
    module = GENERATORS[name]
    rows = module.make_rows(30, 0, "train") + module.make_rows(20, 0, "test")
    transcripts = module.sft_transcripts(rows)
    assert len(transcripts) == len(rows)
    for row, transcript in zip(rows, transcripts, strict=True):
        assert _replay(name, transcript, row) == 1.0
        # short enough for the tiny model's 512-token (character) context, template included
        assert sum(len(m["content"]) + 20 for m in transcript) < 400


def test_calculator_transcript_uses_hermes_tool_calls() -> None:
    row = {"prompt": "What is 347 * 862?", "answer": "299114"}
    assert calculator.sft_transcripts([row]) == [[
        {"role": "user", "content": "What is 347 * 862?"},
        {"role": "assistant", "content": (
            '<tool_call>\n{"name": "multiply", "arguments": {"a": 347, "b": 862}}\n</tool_call>'
        )},
        {"role": "tool", "name": "multiply", "content": "299114"},
        {"role": "assistant", "content": "299114"},
    ]]  # fmt: skip


def test_calculator_direct_fraction_answers_that_share_without_the_tool(tmp_path) -> None:
    rows = calculator.make_rows(2000, 0, "train")
    transcripts = calculator.sft_transcripts(rows, direct_fraction=0.3)
    direct = [t for t in transcripts if len(t) == 2]
    assert abs(len(direct) / len(rows) - 0.3) < 0.04  # a stable hash picks ~30%
    for row, t in zip(rows, transcripts, strict=True):
        if len(t) == 2:  # the question, then the right number with no tool call
            assert t == [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["answer"]},
            ]
        else:
            assert t == calculator.sft_transcripts([row])[0]
    assert calculator.sft_transcripts(rows, direct_fraction=0.3) == transcripts
    assert all(len(t) == 2 for t in calculator.sft_transcripts(rows[:50], direct_fraction=1.0))
    with pytest.raises(ConfigError, match=r"direct_fraction=1\.5 is not valid"):
        calculator.sft_transcripts(rows, direct_fraction=1.5)
    # direct_ops: only sums may be answered directly; every product keeps its tool call
    sums = calculator.sft_transcripts(rows, direct_fraction=0.3, direct_ops="+")
    for row, t, mixed in zip(rows, sums, transcripts, strict=True):
        expect_direct = len(mixed) == 2 and "+" in row["prompt"]
        assert (len(t) == 2) == expect_direct
    with pytest.raises(ConfigError, match="direct_ops='-' is not valid"):
        calculator.sft_transcripts(rows, direct_ops="-")
    # from the config: env.transcript_kwargs, with the closest option named for a typo
    from posttrain.config import load_config
    from posttrain.envs.runs import transcript_rows

    base = [
        "env.name=calculator",
        "data.source=env",
        "data.train_size=40",
        f"train.output_dir={tmp_path}",
    ]
    cfg = load_config(None, [*base, "env.transcript_kwargs.direct_fraction=1.0"])
    assert all(len(r["prompt"]) == 2 for r in transcript_rows(cfg))
    cfg = load_config(None, [*base, "env.transcript_kwargs.direct_fractoin=1.0"])
    with pytest.raises(ConfigError, match=r"direct_fractoin.*did you mean 'direct_fraction'"):
        transcript_rows(cfg)


def test_guess_number_random_fraction_guesses_consistently_at_random() -> None:
    rows = guess_number.make_rows(400, 0, "train")
    binary = guess_number.sft_transcripts(rows)
    mixed = guess_number.sft_transcripts(rows, random_fraction=0.5)
    assert guess_number.sft_transcripts(rows, random_fraction=0.5) == mixed  # reproducible
    randomized = 0
    for row, b, m in zip(rows, binary, mixed, strict=True):
        lo, hi = 1, row["high"]
        guesses = [int(x["content"]) for x in m[1::2]]
        replies = [x["content"] for x in m[2::2]]
        for g, reply in zip(guesses, replies, strict=True):  # every guess is still possible
            assert lo <= g <= hi
            assert reply == (
                "correct" if g == row["secret"] else "higher" if g < row["secret"] else "lower"
            )
            lo, hi = (
                (g + 1, hi) if reply == "higher" else (lo, g - 1) if reply == "lower" else (g, g)
            )
        assert replies[-1] == "correct" and guesses[-1] == row["secret"]
        randomized += m != b
    # about half search at random (a few random searches happen to hit the midpoints)
    assert 0.35 < randomized / len(rows) < 0.55
    turns = [len(t) // 2 for t in mixed]
    assert sum(turns) / len(turns) > sum(len(t) // 2 for t in binary) / len(binary)
    with pytest.raises(ConfigError, match=r"random_fraction=-0\.1 is not valid"):
        guess_number.sft_transcripts(rows, random_fraction=-0.1)


def test_the_readme_tool_environment_runs() -> None:
    """The README's example environment, executed from the README itself."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("from posttrain.envs.tools import ToolEnv")
    code = readme[start : readme.index("```", start)]
    ns: dict = {}
    exec(code, ns)
    env = ns["CapitalsEnv"]()
    messages = env.reset({"prompt": "Which country is Lima in?", "answer": "Peru"})
    assert messages == [{"role": "user", "content": "Which country is Lima in?"}]
    call = ToolCall("lookup", {"city": "Lima"})
    result = env.step(Turn(text="<tool_call>...</tool_call>", tool_calls=(call,)))
    assert result.tool_outcomes == ["ok"] and result.messages[0]["content"] == "Peru"
    assert env.step(Turn(text="Peru", index=1)).done
    assert env.final_reward() == 1.0


def test_episode_solved_reads_the_environments_solved_else_a_full_reward() -> None:
    from posttrain.envs.base import episode_solved

    env = GuessNumberEnv(max_guesses=5, turn_cost=0.1)
    env.reset({"prompt": "Guess my number from 1 to 16.", "secret": 3, "high": 16})
    for guess in ("8", "3"):
        env.step(Turn(guess, (), ()))
    reward = env.final_reward()
    assert reward == pytest.approx(0.9) and episode_solved(env, reward) is True
    lost = GuessNumberEnv(max_guesses=1)
    lost.reset({"prompt": "Guess my number from 1 to 16.", "secret": 3, "high": 16})
    lost.step(Turn("8", (), ()))
    assert episode_solved(lost, lost.final_reward()) is False
    plain = object()  # no `solved`: a full reward is success
    assert episode_solved(plain, 1.0) is True and episode_solved(plain, 0.5) is False
    assert episode_solved(plain, None) is None  # masked


def test_the_readme_environment_plays_a_countdown() -> None:
    """The README's tool-less example environment, executed from the README itself."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("from posttrain.envs.base import StepResult\n\n\nclass CountdownEnv")
    ns: dict = {}
    exec(readme[start : readme.index("```", start)], ns)
    env = ns["CountdownEnv"]()
    assert isinstance(env, Environment)
    assert env.reset({"n": 3}) == [
        {"role": "user", "content": "Count down from 3, one number per turn."}
    ]
    results = [env.step(Turn(text, (), (), index=i)) for i, text in enumerate(["3", "2", "1"])]
    assert [r.done for r in results] == [False, False, True] and env.final_reward() == 1.0
    env.reset({"n": 3})
    wrong = env.step(Turn("2", (), ()))  # a wrong number ends the episode unsolved
    assert wrong.done and env.final_reward() == 0.0


def test_guess_number_splits_by_range_size_so_every_secret_position_is_in_both() -> None:
    train, test = guess_number.make_rows(3000, 0, "train"), guess_number.make_rows(600, 0, "test")
    train_highs, test_highs = {r["high"] for r in train}, {r["high"] for r in test}
    assert train_highs.isdisjoint(test_highs)
    assert train_highs | test_highs == set(range(guess_number.HIGHS[0], guess_number.HIGHS[1] + 1))
    for r in train + test:
        assert (
            1 <= r["secret"] <= r["high"]
            and r["prompt"] == f"Guess my number from 1 to {r['high']}."
        )
    # every secret a held-out task asks for is also a winning answer in training
    assert {r["secret"] for r in test} <= {r["secret"] for r in train}
    # uniform secrets: each secret of a range of size N is drawn about 1/N of the time
    by_high = [r for r in train if r["high"] == max(train_highs)]
    counts = [sum(r["secret"] == k for r in by_high) for k in range(1, max(train_highs) + 1)]
    assert min(counts) > 0 and max(counts) < 4 * len(by_high) / len(counts)
    with pytest.raises(ConfigError, match="highs"):
        guess_number.make_rows(3, 0, "train", highs=(10, 3))
