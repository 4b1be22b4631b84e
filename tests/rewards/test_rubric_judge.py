"""Rubric rewards and the LLM judge against the deterministic local server in judge_server.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from judge_server import JudgeServer

from posttrain.errors import ConfigError
from rewards import judge as judge_mod
from rewards.judge import JudgeClient, JudgeParseError, JudgeUnreachableError, parse_json_object
from rewards.rubric import (
    DEFAULT_WEIGHTS,
    RubricItem,
    parse_rubric,
    rubric,
    rubric_detailed,
    rubric_metrics,
)
from rewards.verifier import judge_verifier, judge_verifier_detailed, verifier_request

MODEL = "test-judge"
FAST = {"backoff_s": 0.01, "timeout_s": 5.0}

RUBRIC = [
    {"criterion": "Names the capital 'Paris'", "kind": "essential"},
    {"criterion": "Mentions the country 'France'", "kind": "important"},
    {"criterion": "Mentions the river 'Seine'", "kind": "optional"},
    {"criterion": "Claims the capital is 'London'", "kind": "pitfall"},
]
COMPLETIONS = [
    "Paris is the capital of France.",  # essential + important
    "Paris, not London.",  # essential + pitfall
    "London.",  # pitfall only
    "Paris, France, on the Seine.",  # all positives
]
PROMPTS = ["What is the capital of France?"] * len(COMPLETIONS)


@pytest.fixture(autouse=True)
def _fresh_clients():
    judge_mod.reset_clients()
    yield
    judge_mod.reset_clients()


@pytest.fixture
def server():
    with JudgeServer(model=MODEL) as srv:
        yield srv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- rubric parsing


def test_parse_rubric_default_weights_and_files(tmp_path):
    r = parse_rubric(RUBRIC)
    assert [it.weight for it in r.items] == [1.0, 0.7, 0.3, 0.9]
    assert [it.weight for it in r.items] == [DEFAULT_WEIGHTS[it.kind] for it in r.items]
    assert r.positive_total == pytest.approx(2.0)
    assert r.items[0] == RubricItem("Names the capital 'Paris'", 1.0, "essential")

    yml = tmp_path / "r.yaml"
    yml.write_text("rubric:\n  - criterion: Says 'hi'\n    kind: essential\n    weight: 3\n")
    assert parse_rubric(str(yml)).items == (RubricItem("Says 'hi'", 3.0, "essential"),)
    js = tmp_path / "r.json"
    js.write_text(json.dumps(RUBRIC))
    assert parse_rubric(js) == r
    assert parse_rubric(json.dumps({"rubric": RUBRIC})) == r


@pytest.mark.parametrize(
    ("rub", "needles"),
    [
        (
            [{"criterion": "x", "kind": "vital"}],
            ["rubric[0].kind", "'vital'", "essential", "pitfall"],
        ),
        (
            [
                {"criterion": "x", "kind": "essential"},
                {"criterion": "y", "kind": "pitfall", "weight": -1},
            ],
            ["rubric[1].weight", "> 0", "positive"],
        ),
        ([{"criterion": "x", "kind": "essential", "weight": True}], ["rubric[0].weight"]),
        ([{"criterion": " ", "kind": "essential"}], ["rubric[0].criterion", "non-empty"]),
        ([{"kind": "essential"}], ["rubric[0].criterion"]),
        (
            [{"criterion": "x", "kind": "essential", "wieght": 2}],
            ["rubric[0]", "'wieght'", "weight"],
        ),
        ([], ["non-empty list"]),
        ([{"criterion": "x", "kind": "pitfall"}], ["only pitfall"]),
        (["just a string"], ["rubric[0] must be a mapping"]),
        ({"items": []}, ["single key 'rubric'"]),
        ("missing.yaml", ["rubric file 'missing.yaml' does not exist"]),
        ("free text", ["neither a .yaml/.yml/.json file path nor JSON"]),
    ],
)
def test_parse_rubric_errors(rub, needles):
    with pytest.raises(ConfigError) as e:
        parse_rubric(rub)
    for needle in needles:
        assert needle in str(e.value)


def test_parse_rubric_file_error_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- criterion: ok\n  kind: essential\n- criterion: y\n  kind: nope\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*rubric\[1\]\.kind='nope'"):
        parse_rubric(path)


def test_explicit_formula_by_hand():
    r = parse_rubric(RUBRIC)  # weights 1.0, 0.7, 0.3 positive (total 2.0); pitfall 0.9
    assert r.explicit_score([True, True, False, False]) == pytest.approx(1.7 / 2.0)
    assert r.explicit_score([True, False, False, True]) == pytest.approx((1.0 - 0.9) / 2.0)
    assert r.explicit_score([False, False, False, True]) == 0.0  # clipped from -0.45
    assert r.explicit_score([True, True, True, False]) == 1.0
    assert r.explicit_score([True, True, True, True]) == pytest.approx(1.1 / 2.0)


# ----------------------------------------------------------------------------- rubric rewards


def test_rubric_explicit_scores_and_breakdown(server):
    scores = rubric(PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL)
    assert scores == pytest.approx([0.85, 0.05, 0.0, 1.0])
    samples = rubric.last_breakdown
    assert [it.satisfied for it in samples[1].items] == [True, False, False, True]
    assert samples[1].items[3].kind == "pitfall" and samples[1].items[3].weight == 0.9
    assert samples[0].to_log()["items"][1]["criterion"] == "Mentions the country 'France'"
    m = rubric_metrics(samples)
    assert m["rubric/invalid_frac"] == 0.0
    assert m["rubric/score_mean"] == pytest.approx((0.85 + 0.05 + 0.0 + 1.0) / 4)
    assert m["rubric/essential/satisfied_rate"] == pytest.approx(3 / 4)
    assert m["rubric/optional/satisfied_rate"] == pytest.approx(1 / 4)
    assert m["rubric/pitfall/satisfied_rate"] == pytest.approx(2 / 4)
    system = server.bodies[0]["messages"][0]["content"]
    assert '"items"' in system and "pitfall" in system


def test_rubric_implicit_scores(server):
    scores = rubric(
        PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL, aggregation="implicit"
    )
    # server rule: satisfied positives / 3 positives, halved when a pitfall is made
    assert scores == pytest.approx([2 / 3, 1 / 3 * 0.5, 0.0, 1.0], abs=1e-4)
    assert all(it.satisfied is None for s in rubric.last_breakdown for it in s.items)
    assert '"items"' not in server.bodies[0]["messages"][0]["content"]


def test_rubric_per_sample_column_and_ignored_columns(server):
    other = [{"criterion": "Says 'London'", "kind": "essential", "weight": 2.0}]
    column = [RUBRIC, json.dumps(other), None, {"rubric": other}]
    samples = rubric_detailed(
        PROMPTS, COMPLETIONS, column, base_url=server.url, model=MODEL, answer=["a"] * 4
    )
    assert [s.score for s in samples] == pytest.approx([0.85, 1.0, None, 0.0])
    assert samples[2].reason == "no_rubric"
    with pytest.raises(ConfigError, match="unknown option 'timeout'"):
        rubric(PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL, timeout=3)
    with pytest.raises(ConfigError, match="aggregation='mean'"):
        rubric(PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL, aggregation="mean")
    with pytest.raises(ConfigError, match=r"rubric of sample 1: rubric\[0\]\.kind"):
        rubric(PROMPTS[:2], COMPLETIONS[:2], [RUBRIC, [{"criterion": "x", "kind": "?"}]],
               base_url=server.url, model=MODEL)  # fmt: skip


# ----------------------------------------------------------------------------- judge client


def test_cache_memory_disk_and_batch_dedup(server, tmp_path):
    cache = tmp_path / "cache" / "judge.jsonl"
    kw = {"base_url": server.url, "model": MODEL, "cache_path": str(cache)}
    first = rubric(PROMPTS, COMPLETIONS, RUBRIC, **kw)
    assert server.requests == 4
    assert rubric(PROMPTS, COMPLETIONS, RUBRIC, **kw) == first  # same shared client: memory cache
    assert server.requests == 4
    assert all(s.cached for s in rubric.last_breakdown)

    judge_mod.reset_clients()  # new client: warm from the jsonl file
    assert rubric(PROMPTS, COMPLETIONS, RUBRIC, **kw) == first
    assert server.requests == 4
    assert len(cache.read_text().splitlines()) == 4

    # another aggregation or judge model is another key; duplicates in one batch go out once
    rubric(PROMPTS, COMPLETIONS, RUBRIC, aggregation="implicit", **kw)
    assert server.requests == 8
    judge_verifier(["q"] * 3, ["same"] * 3, ["same"] * 3, base_url=server.url, model=MODEL)
    assert server.requests == 9


def test_retries_after_500_then_success(server):
    server.fail_next(2, status=500)
    res = judge_verifier_detailed(
        ["q"], ["42"], ["42"], base_url=server.url, model=MODEL, max_retries=3, **FAST
    )
    assert res[0].score == 1.0 and res[0].reason is None
    assert server.requests == 3


def test_retries_exhausted_and_no_retry_on_4xx(server):
    server.fail_next(10, status=503)
    res = judge_verifier_detailed(
        ["q"], ["42"], ["42"], base_url=server.url, model=MODEL, max_retries=2, **FAST
    )
    assert res[0].score is None and res[0].reason == "http_503"
    assert server.requests == 3
    server.fail_next(10, status=400)
    res = judge_verifier_detailed(
        ["q"], ["43"], ["43"], base_url=server.url, model=MODEL, max_retries=2, **FAST
    )
    assert res[0].reason == "http_400" and "injected failure" in res[0].detail
    assert server.requests == 4


def test_timeout_gives_none_with_reason():
    with JudgeServer(model=MODEL, delay_s=1.0) as srv:
        t0 = time.monotonic()
        res = judge_verifier_detailed(
            ["q"], ["42"], ["42"], base_url=srv.url, model=MODEL,
            timeout_s=0.2, max_retries=1, backoff_s=0.01,
        )  # fmt: skip
        assert time.monotonic() - t0 < 0.9
        assert res[0].score is None and res[0].reason == "timeout"
        assert srv.requests == 2


@pytest.mark.parametrize(
    ("mode", "reason", "details"),
    [
        ("garbage", "unparseable", ["8/10", "8/10", "8/10"]),
        ("invalid", "invalid_answer", ["boolean 'satisfied'", "outside [0, 1]", "outside [0, 1]"]),
    ],
)
def test_bad_answers_give_none_with_reason(server, mode, reason, details):
    server.mode = mode
    for aggregation, detail in zip(["explicit", "implicit"], details, strict=False):
        scores = rubric(
            PROMPTS[:1], COMPLETIONS[:1], RUBRIC, base_url=server.url, model=MODEL,
            aggregation=aggregation,
        )  # fmt: skip
        assert scores == [None]
        sample = rubric.last_breakdown[0]
        assert sample.reason == reason and detail in sample.detail
        assert rubric_metrics(rubric.last_breakdown) == {"rubric/invalid_frac": 1.0}
    assert server.requests == 2  # a bad answer is not retried
    assert judge_verifier(["q"], ["42"], ["42"], base_url=server.url, model=MODEL) == [None]
    assert judge_verifier.last_results[0].reason == reason
    assert details[2] in judge_verifier.last_results[0].detail


def test_fenced_answer_accepted_and_bad_ones_not_cached(server):
    server.mode = "garbage"
    assert rubric(PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL) == [None] * 4
    server.mode = "fenced"
    scores = rubric(PROMPTS, COMPLETIONS, RUBRIC, base_url=server.url, model=MODEL)
    assert scores == pytest.approx([0.85, 0.05, 0.0, 1.0])
    assert server.requests == 8


def test_concurrency_limit_respected():
    with JudgeServer(model=MODEL, delay_s=0.1) as srv:
        completions = [f"answer {i}" for i in range(12)]
        scores = judge_verifier(
            ["q"] * 12, completions, ["answer 3"] * 12, base_url=srv.url, model=MODEL,
            max_concurrency=3,
        )  # fmt: skip
        assert scores == [1.0 if i == 3 else 0.0 for i in range(12)]
        assert srv.requests == 12
        assert srv.max_in_flight == 3


def test_unreachable_url_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(JudgeUnreachableError, match=rf"{url}.*unreachable") as e:
        JudgeClient(url, MODEL, timeout_s=2).check_reachable()
    assert isinstance(e.value, ConfigError)
    with pytest.raises(JudgeUnreachableError, match=url):
        judge_verifier(["q"], ["a"], ["a"], base_url=url, model=MODEL)
    with pytest.raises(JudgeUnreachableError, match=url):
        rubric(["q"], ["a"], RUBRIC, base_url=url + "/v1", model=MODEL)


def test_check_reachable_wrong_model_and_bad_config(server):
    with pytest.raises(JudgeUnreachableError, match=r"does not serve model 'gpt-x'.*test-judge"):
        JudgeClient(server.url, "gpt-x").check_reachable()
    JudgeClient(server.url + "/v1/", MODEL).check_reachable()
    with pytest.raises(ConfigError, match="base_url='localhost:8000'"):
        JudgeClient("localhost:8000", MODEL)
    with pytest.raises(ConfigError, match="max_concurrency"):
        JudgeClient(server.url, MODEL, max_concurrency=0)


def test_judge_verifier_scores_and_api_key(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    scores = judge_verifier(
        ["2+2?", "Capital?", "Capital?", "x"],
        ["The answer is 4", "It is Lyon", "Paris", "anything"],
        [4, "Paris", "Paris", None],
        base_url=server.url,
        model=MODEL,
        api_key_env="MY_JUDGE_KEY",
        tests=[None] * 4,  # an extra dataset column is ignored
    )
    assert scores == [1.0, 0.0, 1.0, None]
    assert judge_verifier.last_results[3].reason == "no_reference"
    assert server.requests == 3
    assert server.auth == "Bearer sk-test"
    # Requests run concurrently, so find the "2+2?" one rather than trusting arrival order.
    (body,) = [b for b in server.bodies if "2+2?" in b["messages"][1]["content"]]
    assert body["model"] == MODEL and body["temperature"] == 0.0
    assert "<reference_answer>\n4\n</reference_answer>" in body["messages"][1]["content"]


def test_sync_api_inside_running_event_loop(server):
    async def main():
        return judge_verifier(["q"], ["7"], ["7"], base_url=server.url, model=MODEL)

    assert asyncio.run(main()) == [1.0]


def test_parse_json_object_strictness():
    assert parse_json_object('  {"score": 0.5} ') == {"score": 0.5}
    assert parse_json_object('<think>hmm {"x"}</think>\n```json\n{"score": 1}\n```') == {"score": 1}
    for bad in ['Score: {"score": 1}', "[1, 2]", '{"score": NaN}', "{'score': 1}", ""]:
        with pytest.raises(JudgeParseError):
            parse_json_object(bad)


def test_cache_key_covers_reference_and_model():
    a = verifier_request("q", "c", "ref1")
    b = verifier_request("q", "c", "ref2")
    assert judge_mod.cache_key(a.key_parts, "m") != judge_mod.cache_key(b.key_parts, "m")
    assert judge_mod.cache_key(a.key_parts, "m") != judge_mod.cache_key(a.key_parts, "m2")
    assert judge_mod.cache_key(a.key_parts, "m") == judge_mod.cache_key(dict(a.key_parts), "m")


def test_through_registry_score(server):
    from rewards import RewardSpec, get_reward, score

    assert get_reward("rubric") is rubric and get_reward("judge_verifier") is judge_verifier
    kw = {"base_url": server.url, "model": MODEL}
    res = score(
        [RewardSpec("rubric", kwargs=kw), RewardSpec("judge_verifier", weight=0.5, kwargs=kw)],
        PROMPTS,
        COMPLETIONS,
        {"rubric": [RUBRIC] * 4, "answer": ["Paris", "Paris", "Paris", "Seine"]},
        timeout_s=10,
    )
    assert res.per_reward["rubric"] == pytest.approx([0.85, 0.05, 0.0, 1.0])
    assert res.per_reward["judge_verifier"] == [1.0, 1.0, 0.0, 1.0]
    assert res.total == pytest.approx([1.35, 0.55, 0.0, 1.5])


def test_shared_rubric_typo_names_item(server):
    typo = [*RUBRIC[:3], {"criterio": "Says 'London'", "kind": "pitfall"}]
    with pytest.raises(ConfigError, match=r"rubric\[3\] has unknown keys \['criterio'\]"):
        rubric(PROMPTS, COMPLETIONS, typo, base_url=server.url, model=MODEL)
