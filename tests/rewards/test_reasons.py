"""Reasons and metrics rewards report (RewardOutput); per-sample fault isolation (@per_sample)."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from judge_server import JudgeServer

import rewards
from rewards import judge as judge_mod
from rewards import registry
from rewards.boundary import (
    PER_SAMPLE_CONCURRENCY,
    RewardOutput,
    is_per_sample,
    per_sample,
    reward_metrics,
    score,
    slug,
)
from rewards.registry import RewardSpec

MODEL = "test-judge"
RUBRIC = [
    {"criterion": "Names the capital 'Paris'", "kind": "essential"},
    {"criterion": "Mentions the country 'France'", "kind": "important"},
    {"criterion": "Claims the capital is 'London'", "kind": "pitfall"},
]
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _clean():
    judge_mod.reset_clients()
    RELEASE.clear()
    names: list[str] = []
    yield names
    RELEASE.set()
    for name in names:
        registry.unregister(name)
    judge_mod.reset_clients()


def _register(names: list[str], name: str, fn) -> None:
    rewards.register(name, fn)
    names.append(name)


# --------------------------------------------------------------------------- RewardOutput


def test_reward_output_is_a_list_with_reasons():
    out = RewardOutput([1.0, None], ["x", "unparseable"], metrics={"a": 1.0})
    assert out == [1.0, None] and isinstance(out, list)
    assert out.reasons == ["x", "unparseable"] and out.details == ["", ""]
    assert RewardOutput([0.5]).reasons == [None]
    with pytest.raises(ValueError, match="2 scores but 1 reasons"):
        RewardOutput([1.0, None], ["x"])


def test_slug_makes_metric_safe_reasons():
    assert slug("HTTP 500: Server Error!") == "http_500_server_error"
    assert slug("unparseable") == "unparseable"
    assert slug("///") == "none"
    assert len(slug("a" * 100)) == 48


def test_reported_reasons_replace_none_and_metrics_are_prefixed(_clean):
    def judged(prompts, completions, **_):
        return RewardOutput(
            [1.0, None, None, math.nan, None],
            [None, "unparseable", "HTTP 503", "ignored: the score is nan", None],
            details=["", "said 8/10", "", "", ""],
            metrics={"invalid_frac": 0.6, "mean": 9.0, "errors/x": 1.0, "bad": math.nan},
        )

    _register(_clean, "t_judged", judged)
    result = score(["t_judged"], ["p"] * 5, list("abcde"), {})
    assert result.per_reward["t_judged"] == [1.0, None, None, None, None]
    assert result.errors == {
        "reward/t_judged/errors/unparseable": 1,
        "reward/t_judged/errors/http_503": 1,
        "reward/t_judged/errors/nan": 1,
        "reward/t_judged/errors/none": 1,
    }
    assert result.reasons == [
        None,
        "t_judged:unparseable",
        "t_judged:http_503",
        "t_judged:nan",
        "t_judged:none",
    ]
    # reserved ("mean", "errors/...") and non-finite metrics are dropped
    assert result.metrics == {"reward/t_judged/invalid_frac": 0.6}
    m = reward_metrics(result)
    assert m["reward/t_judged/invalid_frac"] == 0.6
    assert m["reward/t_judged/mean"] == 1.0
    assert m["reward/t_judged/errors/unparseable"] == 1.0


def test_judge_reasons_reach_the_boundary_counts():
    with JudgeServer(model=MODEL, mode="garbage") as srv:
        kw = {"base_url": srv.url, "model": MODEL, "backoff_s": 0.01}
        result = score(
            [
                RewardSpec("rubric", kwargs={**kw, "aggregation": "implicit"}),
                RewardSpec("judge_verifier", kwargs=kw),
            ],
            ["What is the capital of France?"] * 3,
            ["Paris", "London", "Paris, France"],
            {"rubric": [RUBRIC, None, RUBRIC], "answer": ["Paris", "Paris", ""]},
            timeout_s=10,
        )
    assert result.total == [None, None, None]
    assert result.errors == {
        "reward/rubric/errors/unparseable": 2,
        "reward/rubric/errors/no_rubric": 1,
        "reward/judge_verifier/errors/unparseable": 2,
        "reward/judge_verifier/errors/no_reference": 1,
    }
    assert result.metrics["reward/rubric/invalid_frac"] == 1.0
    assert result.metrics["reward/judge_verifier/invalid_frac"] == 1.0


def test_judge_http_errors_and_rubric_item_metrics():
    with JudgeServer(model=MODEL) as srv:
        kw = {"base_url": srv.url, "model": MODEL, "max_retries": 0}
        srv.fail_next(1, status=503)
        result = score(
            [RewardSpec("rubric", kwargs={**kw, "max_concurrency": 1})],
            ["q"] * 2,
            ["Paris", "Paris, France, not London"],
            {"rubric": [RUBRIC] * 2},
            timeout_s=10,
        )
    assert result.errors == {"reward/rubric/errors/http_503": 1}
    scores = result.per_reward["rubric"]
    assert scores.count(None) == 1
    # the sample the judge answered: essential + important satisfied (1.7/1.7), pitfall made (-0.9)
    ok = next(s for s in scores if s is not None)
    assert ok in (pytest.approx(1.0 / 1.7), pytest.approx(0.8 / 1.7))
    assert result.metrics["reward/rubric/invalid_frac"] == 0.5
    assert result.metrics["reward/rubric/essential/satisfied_rate"] == 1.0


# --------------------------------------------------------------------------- per-sample rewards


def _faulty(prompt, completion, **_):
    if completion == "raise":
        raise RuntimeError(f"boom on {completion}")
    if completion == "hang":
        RELEASE.wait(10)
        return 1.0
    if completion == "nan":
        return math.nan
    if completion == "abstain":
        return None
    return float(len(completion))


async def _async_faulty(prompt, completion, **_):
    if completion == "hang":
        await asyncio.sleep(10)
    return _faulty(prompt, completion)


COMPLETIONS = ["ok", "raise", "hang", "nan", "abstain", "okay"]
EXPECTED = [2.0, None, None, None, None, 4.0]
EXPECTED_ERRORS = {"exception": 1, "timeout": 1, "nan": 1, "none": 1}


@pytest.mark.parametrize("fn", [_faulty, _async_faulty], ids=["sync", "async"])
def test_per_sample_faults_void_only_that_sample(_clean, fn, caplog):
    name = f"t_ps_{fn.__name__}"
    _register(_clean, name, per_sample(fn))
    t0 = time.monotonic()
    result = score([name, "format_number"], ["p"] * 6, COMPLETIONS, {}, timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    assert result.per_reward[name] == EXPECTED
    assert result.errors == {f"reward/{name}/errors/{r}": c for r, c in EXPECTED_ERRORS.items()}
    assert result.per_reward["format_number"] == [0.0] * 6
    assert result.total == EXPECTED
    assert any("RuntimeError: boom on raise" in r.getMessage() for r in caplog.records)


def test_per_sample_gets_row_values_and_spec_kwargs(_clean):
    seen = []

    @per_sample
    def check(prompt, completion, answer, scale=1.0):
        seen.append((prompt, completion, answer, scale))
        return scale * float(completion == answer)

    assert is_per_sample(check)
    _register(_clean, "t_ps_row", check)
    assert rewards.required_columns("t_ps_row") == ("answer",)
    result = score(
        [RewardSpec("t_ps_row", kwargs={"scale": 2.0})],
        ["p0", "p1"],
        ["1", "3"],
        {"answer": ["1", "2"], "other": [0, 0]},
    )
    assert result.per_reward["t_ps_row"] == [2.0, 0.0]
    assert sorted(seen) == [("p0", "1", "1", 2.0), ("p1", "3", "2", 2.0)]


def test_per_sample_hangs_run_concurrently_in_waves(_clean):
    @per_sample
    def sleepy(prompt, completion):
        RELEASE.wait(10)
        return 1.0

    _register(_clean, "t_ps_sleepy", sleepy)
    n = PER_SAMPLE_CONCURRENCY + 1  # two waves
    t0 = time.monotonic()
    result = score(["t_ps_sleepy"], ["p"] * n, ["c"] * n, {}, timeout_s=0.2)
    elapsed = time.monotonic() - t0
    assert result.errors == {"reward/t_ps_sleepy/errors/timeout": n}
    assert 0.35 < elapsed < 1.5


def test_per_sample_wraps_without_changing_the_function(_clean):
    class Scorer:
        def __init__(self, bonus):
            self.bonus = bonus

        def __call__(self, prompt, completion, answer):
            return self.bonus + float(completion == answer)

    wrapped = per_sample(Scorer(0.5))
    assert not is_per_sample(_faulty) and is_per_sample(per_sample(_faulty))
    assert wrapped("p", "1", answer="1") == 1.5
    _register(_clean, "t_ps_obj", wrapped)
    assert rewards.required_columns("t_ps_obj") == ("answer",)
    result = score(["t_ps_obj"], ["p", "p"], ["1", "2"], {"answer": ["1", "1"]})
    assert result.per_reward["t_ps_obj"] == [1.5, 0.5]
