"""Start-up validation: every reward problem in one clear error before training."""

from __future__ import annotations

import functools
import socket
from types import SimpleNamespace

import pytest
from judge_server import JudgeServer

import rewards
from posttrain.errors import ConfigError
from rewards import judge as judge_mod
from rewards import registry
from rewards import verifier as verifier_mod
from rewards.registry import RewardConfigError, RewardSpec
from rewards.startup import validate_rewards

MODEL = "test-judge"
RUBRIC = [{"criterion": "Names 'Paris'", "kind": "essential"}]


@pytest.fixture(autouse=True)
def _fresh_clients():
    judge_mod.reset_clients()
    yield
    judge_mod.reset_clients()


@pytest.fixture(scope="module")
def server():
    with JudgeServer(model=MODEL) as srv:
        yield srv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge(url: str, **kw) -> dict:
    return {"base_url": url, "model": MODEL, **kw}


def test_valid_specs_pass_and_are_normalised(server):
    cfg_entry = SimpleNamespace(name="format_number", weight=0.1, kwargs={})
    specs = validate_rewards(
        [
            "math_answer",
            cfg_entry,
            {"name": "length_in_range", "kwargs": {"max_chars": 4}},
            RewardSpec("judge_verifier", 0.5, _judge(server.url, timeout_s=5)),
            RewardSpec("rubric", kwargs=_judge(server.url, aggregation="implicit")),
        ],
        {"answer": ["1", "2"], "rubric": [RUBRIC, None]},
    )
    assert [s.name for s in specs] == [
        "math_answer",
        "format_number",
        "length_in_range",
        "judge_verifier",
        "rubric",
    ]
    assert specs[1] == RewardSpec("format_number", 0.1)
    assert server.requests == 0  # reachability is a GET /v1/models, no judgement


def test_unknown_name_names_closest():
    with pytest.raises(RewardConfigError, match=r"unknown reward 'math_answr'; did you mean"):
        validate_rewards(["math_answr"], {"answer": []})


def test_one_error_lists_every_problem(server):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError) as e:
        validate_rewards(
            [
                "math_answr",
                "regex_match",
                RewardSpec("length_in_range", kwargs={"max_char": 3}),
                RewardSpec("exact_answer", weight=float("nan")),
                RewardSpec("format_number", timeout_s=0),
                RewardSpec("judge_verifier", kwargs=_judge(url)),
                RewardSpec("rubric", kwargs=_judge(server.url, timeout=3, aggregation="sum")),
                "format_number",
            ],
            {"answer": [1], "rubirc": [None]},
        )
    text = str(e.value)
    assert "\n" not in text and text.startswith("10 reward problems: (1) ")
    for expected in [
        "unknown reward 'math_answr'; did you mean 'math_answer'",
        "reward 'regex_match' needs 'pattern' as a dataset column or a kwarg",
        "reward 'length_in_range' has no option 'max_char'; did you mean 'max_chars'?",
        "reward 'exact_answer': weight=nan must be a finite number",
        "reward 'format_number': timeout_s=0 must be a number > 0 or None",
        f"reward 'judge_verifier': judge server '{url}' is unreachable",
        "reward 'rubric': unknown judge option 'timeout'; did you mean 'timeout_s'?",
        "reward 'rubric': aggregation='sum' is not valid; valid: explicit, implicit",
        "reward 'rubric' needs 'rubric' as a dataset column or a kwarg; did you mean 'rubirc'?",
        "reward 'format_number' appears twice",
    ]:
        assert expected in text, expected


def test_missing_column_and_collision():
    with pytest.raises(RewardConfigError, match=r"^reward 'math_answer' needs 'answer'"):
        validate_rewards(["math_answer"], ["question"])
    with pytest.raises(RewardConfigError, match="collide"):
        validate_rewards([RewardSpec("json_schema", kwargs={"schema": {}})], {"schema": [None]})


def test_bad_rubric_file_and_bad_row(tmp_path, server):
    bad = tmp_path / "r.yaml"
    bad.write_text("- criterion: x\n  kind: essentail\n")
    spec = RewardSpec("rubric", kwargs=_judge(server.url, rubric=str(bad)))
    with pytest.raises(RewardConfigError, match=r"r\.yaml.*kind='essentail' is not valid"):
        validate_rewards([spec], {})
    missing = RewardSpec("rubric", kwargs=_judge(server.url, rubric=str(tmp_path / "no.yaml")))
    with pytest.raises(RewardConfigError, match="does not exist"):
        validate_rewards([missing], {})
    rows = [RUBRIC, RUBRIC, [{"criterion": "x", "kind": "pitfall"}]]
    with pytest.raises(RewardConfigError, match=r"rubric of dataset row 2: .*only pitfall"):
        validate_rewards([RewardSpec("rubric", kwargs=_judge(server.url))], {"rubric": rows})
    with pytest.raises(RewardConfigError, match="empty"):
        validate_rewards([RewardSpec("rubric", kwargs=_judge(server.url))], {"rubric": [None]})


def test_judge_unreachable_wrong_model_and_opt_out(server):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RewardConfigError, match=rf"'judge_verifier': judge server '{url}'"):
        validate_rewards([RewardSpec("judge_verifier", kwargs=_judge(url))], ["answer"])
    wrong = {"base_url": server.url, "model": "other"}
    with pytest.raises(RewardConfigError, match=r"does not serve model 'other'"):
        validate_rewards([RewardSpec("judge_verifier", kwargs=wrong)], ["answer"])
    # opted out: no network
    validate_rewards(
        [RewardSpec("judge_verifier", kwargs=_judge(url))], ["answer"], check_judges=False
    )
    validate_rewards([RewardSpec("judge_verifier", kwargs=_judge(url, check=False))], ["answer"])


def test_judge_url_as_column_and_bad_option_value(server):
    with pytest.raises(RewardConfigError, match="'base_url' must be one value given as a kwarg"):
        validate_rewards(
            [RewardSpec("judge_verifier", kwargs={"model": MODEL})],
            {"answer": [1], "base_url": [server.url]},
        )
    with pytest.raises(RewardConfigError, match="max_concurrency must be >= 1"):
        validate_rewards(
            [RewardSpec("judge_verifier", kwargs=_judge(server.url, max_concurrency=0))],
            ["answer"],
        )


def test_partial_of_a_judge_reward_is_checked(server):
    bound = functools.partial(verifier_mod.judge_verifier, base_url=server.url, model=MODEL)
    rewards.register("t_verifier2", bound, required=("answer",))
    try:
        validate_rewards(["t_verifier2"], ["answer"])
        with pytest.raises(RewardConfigError, match="unknown judge option 'retries'"):
            validate_rewards([RewardSpec("t_verifier2", kwargs={"retries": 1})], ["answer"])
    finally:
        registry.unregister("t_verifier2")


def test_user_reward_with_var_kwargs_is_not_second_guessed():
    rewards.register("t_opts", lambda prompts, completions, **options: [0.0] * len(completions))
    try:
        validate_rewards([RewardSpec("t_opts", kwargs={"anything": 1})], [])
    finally:
        registry.unregister("t_opts")


def test_check_rewards_in_the_trainer_uses_it(tmp_path):
    from posttrain.config import load_config
    from posttrain.rollout.factory import check_rewards

    cfg = load_config(
        None,
        [
            f"train.output_dir={tmp_path}",
            "rewards=[{name: length_in_range, kwargs: {max_char: 4}}]",
        ],
    )
    rows = [{"prompt": "1+1", "answer": "2"}]
    with pytest.raises(ConfigError, match=r"^rewards: reward 'length_in_range' has no option"):
        check_rewards(cfg, rows)
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "rewards=[{name: math_answer}]"])
    check_rewards(cfg, rows)
    with pytest.raises(ConfigError, match="needs 'answer'"):
        check_rewards(cfg, [{"prompt": "1+1", "solution": "2"}])
