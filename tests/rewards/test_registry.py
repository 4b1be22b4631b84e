"""Registry and the reward boundary (fault isolation, timeouts, weighted totals, metrics)."""

import asyncio
import importlib.util
import logging
import math
import threading
import time

import pytest

import rewards
from rewards import registry
from rewards.boundary import RewardResult, reward_metrics, score
from rewards.registry import RewardConfigError, RewardSpec

OURS = [
    "exact_answer",
    "format_number",
    "ifeval",
    "json_schema",
    "json_valid",
    "length_in_range",
    "math_answer",
    "regex_match",
    "think_answer_format",
]
OTHERS = ["code_tests", "judge_verifier", "rubric"]

RELEASE = threading.Event()  # lets hung sync rewards finish once a test is done


@pytest.fixture(autouse=True)
def _user_rewards():
    """Register the misbehaving rewards for one test and remove them afterwards."""
    RELEASE.clear()

    def good(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    def ones(prompts, completions, **_):
        return [1.0] * len(completions)

    def raises(prompts, completions, **_):
        raise RuntimeError("boom")

    def hangs(prompts, completions, **_):
        RELEASE.wait(10)
        return [1.0] * len(completions)

    def nan(prompts, completions, **_):
        return [math.nan, 1.0, math.inf]

    def wrong_length(prompts, completions, **_):
        return [1.0]

    def wrong_type(prompts, completions, **_):
        return "1,1,1"

    def wrong_entry_type(prompts, completions, **_):
        return [True, "1", 2]

    def abstains(prompts, completions, **_):
        return [None, 0.5, None]

    async def async_good(prompts, completions, **_):
        await asyncio.sleep(0.01)
        return [2.0] * len(completions)

    async def async_hangs(prompts, completions, **_):
        await asyncio.sleep(10)
        return [2.0] * len(completions)

    names = {
        "t_good": good,
        "t_ones": ones,
        "t_raises": raises,
        "t_hangs": hangs,
        "t_nan": nan,
        "t_wrong_length": wrong_length,
        "t_wrong_type": wrong_type,
        "t_wrong_entry_type": wrong_entry_type,
        "t_abstains": abstains,
        "t_async_good": async_good,
        "t_async_hangs": async_hangs,
    }
    for name, fn in names.items():
        rewards.register(name, fn)
    yield
    RELEASE.set()
    for name in names:
        registry.unregister(name)


PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a", "bb", "ccc"]


# --- registry ------------------------------------------------------------------------------


def test_available_lists_builtins_and_other_engineers_rewards():
    names = rewards.available()
    assert set(OURS + OTHERS) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", OURS)
def test_get_reward_imports_our_rewards(name):
    assert callable(rewards.get_reward(name))


def test_unknown_reward_names_closest_valid():
    with pytest.raises(
        RewardConfigError, match=r"unknown reward 'math_answr'; did you mean 'math_answer'"
    ):
        rewards.get_reward("math_answr")
    with pytest.raises(ValueError, match=r"valid rewards: .*format_number"):
        rewards.get_reward("zzz")


@pytest.mark.parametrize("name", OTHERS)
def test_missing_optional_module_fails_only_on_use(name):
    module = registry._BUILTIN[name].split(":")[0]
    if importlib.util.find_spec(module) is not None:
        assert callable(rewards.get_reward(name))
    else:
        with pytest.raises(ImportError, match=f"reward '{name}' lives in {module}"):
            rewards.get_reward(name)


def test_register_infers_required_columns_and_refuses_shadowing():
    def needs(prompts, completions, answer, tests, weight=1.0, **_):
        return [1.0] * len(completions)

    rewards.register("t_needs", needs)
    try:
        assert rewards.required_columns("t_needs") == ("answer", "tests")
        assert rewards.get_reward("t_needs") is needs
        with pytest.raises(RewardConfigError, match="already registered"):
            rewards.register("math_answer", needs)
        with pytest.raises(RewardConfigError, match="must be callable"):
            rewards.register("t_bad", 3)
    finally:
        registry.unregister("t_needs")


def test_required_columns_of_builtins():
    assert rewards.required_columns("math_answer") == ("answer",)
    assert rewards.required_columns("ifeval") == ("instructions",)
    assert rewards.required_columns("code_tests") == ("tests",)
    assert rewards.required_columns("judge_verifier") == ("answer", "base_url", "model")
    assert rewards.required_columns("format_number") == ()


def test_check_columns_names_reward_and_column():
    with pytest.raises(
        RewardConfigError, match=r"reward 'math_answer' needs 'answer' as a dataset column"
    ):
        rewards.check_columns([RewardSpec("format_number"), RewardSpec("math_answer")], {"q": []})
    with pytest.raises(
        RewardConfigError, match="'regex_match' needs 'pattern' as a dataset column"
    ):
        rewards.check_columns(["regex_match"], {})
    rewards.check_columns([RewardSpec("regex_match", kwargs={"pattern": "x"})], {"answer": []})
    with pytest.raises(RewardConfigError, match="collide"):
        rewards.check_columns([RewardSpec("json_schema", kwargs={"schema": {}})], {"schema": []})


# --- boundary --------------------------------------------------------------------------------


def test_every_failure_becomes_none_with_counted_reason(caplog):
    specs = [
        "t_good",
        "t_raises",
        "t_hangs",
        "t_nan",
        "t_wrong_length",
        "t_wrong_type",
        "t_wrong_entry_type",
        "t_abstains",
        "t_async_good",
        "t_async_hangs",
    ]
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="posttrain.rewards"):
        result = score(specs, PROMPTS, COMPLETIONS, {}, timeout_s=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0  # the two hangs ran concurrently, each cut at ~0.5 s

    none3 = [None, None, None]
    assert result.per_reward == {
        "t_good": [1.0, 2.0, 3.0],
        "t_raises": none3,
        "t_hangs": none3,
        "t_nan": [None, 1.0, None],
        "t_wrong_length": none3,
        "t_wrong_type": none3,
        "t_wrong_entry_type": [None, None, 2.0],
        "t_abstains": [None, 0.5, None],
        "t_async_good": [2.0, 2.0, 2.0],
        "t_async_hangs": none3,
    }
    assert result.errors == {
        "reward/t_raises/errors/exception": 3,
        "reward/t_hangs/errors/timeout": 3,
        "reward/t_nan/errors/nan": 2,
        "reward/t_wrong_length/errors/wrong_length": 3,
        "reward/t_wrong_type/errors/wrong_type": 3,
        "reward/t_wrong_entry_type/errors/wrong_type": 2,
        "reward/t_abstains/errors/none": 2,
        "reward/t_async_hangs/errors/timeout": 3,
    }
    assert result.total == none3
    assert result.reasons[1] == (
        "t_raises:exception; t_hangs:timeout; t_wrong_length:wrong_length; "
        "t_wrong_type:wrong_type; t_wrong_entry_type:wrong_type; t_async_hangs:timeout"
    )
    messages = [r.getMessage() for r in caplog.records if r.name == "posttrain.rewards"]
    assert any(
        "'t_raises': exception on sample(s) [0, 1, 2]" in m and "boom" in m for m in messages
    )
    assert any("'t_nan': nan on sample(s) [0, 2]" in m for m in messages)
    assert any("'t_hangs': timeout" in m for m in messages)


def test_each_failure_alone_leaves_the_other_reward_scoring():
    cases = {
        "t_raises": ([None] * 3, {"exception": 3}),
        "t_hangs": ([None] * 3, {"timeout": 3}),
        "t_nan": ([None, 1.0, None], {"nan": 2}),
        "t_wrong_length": ([None] * 3, {"wrong_length": 3}),
        "t_wrong_type": ([None] * 3, {"wrong_type": 3}),
        "t_async_hangs": ([None] * 3, {"timeout": 3}),
    }
    for bad, (expected, counts) in cases.items():
        result = score(["t_good", bad], PROMPTS, COMPLETIONS, {}, timeout_s=0.5)
        assert result.per_reward["t_good"] == [1.0, 2.0, 3.0], bad
        assert result.per_reward[bad] == expected, bad
        assert result.errors == {f"reward/{bad}/errors/{r}": c for r, c in counts.items()}, bad
        assert result.total == [None if e is None else 1.0 + i + e for i, e in enumerate(expected)]


def test_weighted_total_by_hand():
    specs = [
        RewardSpec("t_good", weight=0.5),
        RewardSpec("t_async_good", weight=2.0),
        RewardSpec("t_ones", weight=-1.0),
    ]
    result = score(specs, PROMPTS, COMPLETIONS, {})
    # 0.5 * len + 2.0 * 2.0 - 1.0 * 1.0
    assert result.total == [0.5 + 4.0 - 1.0, 1.0 + 4.0 - 1.0, 1.5 + 4.0 - 1.0]
    assert result.errors == {}
    assert result.reasons == [None, None, None]
    assert set(result.seconds) == {"t_good", "t_async_good", "t_ones"}


def test_total_none_only_where_a_component_is_none():
    result = score([RewardSpec("t_good", weight=2.0), "t_abstains"], PROMPTS, COMPLETIONS, {})
    assert result.total == [None, 4.0 + 0.5, None]
    assert result.reasons == ["t_abstains:none", None, "t_abstains:none"]


def test_spec_timeout_overrides_default():
    start = time.monotonic()
    result = score([RewardSpec("t_hangs", timeout_s=0.2)], PROMPTS, COMPLETIONS, {}, timeout_s=30)
    assert time.monotonic() - start < 1.5
    assert result.errors == {"reward/t_hangs/errors/timeout": 3}


def test_builtin_rewards_through_the_boundary_with_columns():
    specs = [
        RewardSpec("math_answer"),
        RewardSpec("format_number", weight=0.1),
        RewardSpec("regex_match", kwargs={"pattern": r"^\d+$"}),
    ]
    columns = {"answer": ["1", "2", "3"], "unused": [0, 0, 0]}
    result = score(specs, PROMPTS, ["1", "x", r"\boxed{3}"], columns)
    assert result.per_reward == {
        "math_answer": [1.0, 0.0, 1.0],
        "format_number": [1.0, 0.0, 0.0],
        "regex_match": [1.0, 0.0, 0.0],
    }
    assert result.total == pytest.approx([2.1, 0.0, 1.0])


def test_columns_filtered_for_rewards_without_var_kwargs():
    seen = {}

    def strict(prompts, completions, answer):
        seen["answer"] = answer
        return [1.0] * len(completions)

    rewards.register("t_strict", strict)
    try:
        result = score(
            ["t_strict"], PROMPTS, COMPLETIONS, {"answer": [1, 2, 3], "other": [0, 0, 0]}
        )
    finally:
        registry.unregister("t_strict")
    assert result.errors == {}
    assert seen["answer"] == [1, 2, 3]


def test_numpy_like_return_is_accepted():
    np = pytest.importorskip("numpy")
    rewards.register(
        "t_numpy", lambda prompts, completions, **_: np.array([0.5] * len(completions))
    )
    try:
        assert score(["t_numpy"], PROMPTS, COMPLETIONS, {}).per_reward["t_numpy"] == [0.5] * 3
    finally:
        registry.unregister("t_numpy")


def test_caller_errors_raise():
    with pytest.raises(ValueError, match="2 prompts but 3 completions"):
        score(["t_good"], PROMPTS[:2], COMPLETIONS, {})
    with pytest.raises(ValueError, match="column 'answer' has 1 values"):
        score(["t_good"], PROMPTS, COMPLETIONS, {"answer": ["x"]})
    with pytest.raises(ValueError, match="appears twice"):
        score(["t_good", RewardSpec("t_good")], PROMPTS, COMPLETIONS, {})
    with pytest.raises(RewardConfigError, match="needs 'answer' as a dataset column"):
        score(["math_answer"], PROMPTS, COMPLETIONS, {})
    with pytest.raises(RewardConfigError, match="unknown reward"):
        score(["nope"], PROMPTS, COMPLETIONS, {})


def test_empty_batch():
    result = score(["t_good"], [], [], {})
    assert result.total == [] and result.errors == {}


def test_reward_metrics_by_hand():
    result = RewardResult(
        total=[1.0, None, 3.0],
        per_reward={"a": [1.0, None, 2.0], "b": [None, None, None]},
        errors={"reward/a/errors/exception": 1},
        reasons=[None, "a:exception", None],
        seconds={"a": 0.25},
    )
    assert reward_metrics(result) == {
        "reward/a/mean": 1.5,
        "reward/total/mean": 2.0,
        "reward/masked_count": 1.0,
        "reward/a/seconds": 0.25,
        "reward/a/errors/exception": 1.0,
    }


def test_contract_names_are_exported():
    for name in ["math_answer", "exact_answer", "format_number", "score", "RewardSpec"]:
        assert hasattr(rewards, name)
    for name in ["get_reward", "register", "available"]:
        assert hasattr(rewards, name)
    assert rewards.score is score  # CONTRACTS.md: rewards.score (rewards/boundary.py)
