"""Multi-turn GRPO on calculator episodes beyond one synchronous process: two ranks (torchrun,
gloo, DeepSpeed, a vLLM-CPU replica per rank) train exactly like one, a resumed run like a
straight one, async prefetch (`rollout.max_staleness`) plays whole episodes with one older
weight version, and episodes run through a rollout server (2 ranks) and with a LoRA adapter.

The tiny model gets a short SFT warm-up on the environment's transcripts first (once per module):
it then writes tool calls (mostly malformed), which the environment answers, so some episodes
play a second turn after an observation while the others have ended.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config, warmup_config
from posttrain.errors import RolloutError
from posttrain.rollout.async_source import AsyncRolloutSource
from posttrain.rollout.sharded import EpisodeShards
from posttrain.trainer import Trainer
from tests.servers import rollout_server
from tests.tiny_runs import read_jsonl, torchrun

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed"
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "calculator_tiny.yaml"
EPISODES = (
    "warmup.steps=0",
    "train.steps=2",
    "rollout.prompts_per_step=3",  # odd: two ranks play blocks of 2 and 1 tasks
    "rollout.samples_per_prompt=4",
    "train.micro_batch_size_per_device=3",
    "rollout.kv_cache_gib=0.25",
    "data.train_size=64",
    "data.eval_size=8",
    "eval.num_problems=0",
    "train.eval_every=0",
    # no episode of the tiny model solves its task (every reward is 0): the entropy term gives
    # the update its gradient
    "loss.entropy_coef=0.01",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.progress=false",
)
# per-step metrics that must not depend on the rank count, resume or prefetch (not timings)
SAME = ("loss", "grad_norm", "reward/mean", "entropy", "tokens/generated", "samples/masked")
STEP_ONE_SAME = ("loss", "grad_norm", "reward/mean", "entropy", "tokens/generated")


def _cfg(out: Path, model: Path, *extra: str):
    return load_config(
        RECIPE, [f"model.path={model}", f"train.output_dir={out}", *EPISODES, *extra]
    )


@pytest.fixture(scope="module")
def calc_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after 40 SFT steps on calculator transcripts (as `warmup.steps` runs)."""
    out = tmp_path_factory.mktemp("calculator-warmup")
    cfg = _cfg(out, tiny_model_dir, "warmup.steps=40", "warmup.lr=1e-2", "warmup.batch_size=16")
    Trainer(warmup_config(cfg, str(tiny_model_dir), str(out))).train()
    return out / "checkpoints" / "final"


def _agent(row: dict) -> dict[str, float]:
    """The step's episode counts: turns, end reasons, tool-call outcomes, token shares."""
    skip = ("agent/env_seconds", "agent/tool_seconds", "agent/rank_episodes")
    return {k: v for k, v in row.items() if k.startswith("agent/") and k not in skip}


def _assert_same_steps(want: list[dict], got: list[dict]) -> None:
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens/generated"] == a["tokens/generated"]  # the same episodes
        assert _agent(b) == pytest.approx(_agent(a), abs=1e-9)


def _max_weight_diff(a: Path, b: Path) -> float:
    wa = load_file(str(a / "model.safetensors"))
    wb = load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _cli(launcher: list[str], out: Path, model: Path, *extra: str) -> list[dict]:
    """`posttrain train` of the calculator recipe; the rows of its metrics.jsonl."""
    cmd = [*launcher, "-m", "posttrain.cli", "train", str(RECIPE), f"model.path={model}"]
    cmd += [f"train.output_dir={out}", *EPISODES, *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.slow
@needs_vllm
def test_two_vllm_ranks_play_and_train_episodes_like_one(calc_model, tmp_path):
    """Rank 0 plays the 8 episodes of 2 tasks, rank 1 the 4 of the third, each turn seeded as
    one engine seeds it; held-out greedy episodes (3 tasks) are split the same way."""
    extra = ("rollout.engine=vllm", "eval.num_problems=3")
    one = _cli([sys.executable], tmp_path / "one", calc_model, *extra)
    two = _cli(torchrun(2), tmp_path / "two", calc_model, *extra, "train.zero_stage=2")
    steps_one = [r for r in one if "loss" in r]
    steps_two = [r for r in two if "loss" in r]
    assert [r["step"] for r in steps_two] == [1, 2]
    assert max(r["agent/turns_max"] for r in steps_one) >= 2  # later turns of some episodes
    assert all(abs(r["loss"]) > 1e-4 and r["grad_norm"] > 1e-4 for r in steps_one)
    _assert_same_steps(steps_one, steps_two)
    for a, b in zip(steps_one, steps_two, strict=True):
        assert "agent/rank_episodes" not in a and b["agent/rank_episodes"] == 2 * 4
        assert b["ranks"] == 2.0
        # each replica sampled every turn with the weights the trainer synced into it
        assert a["tis/mismatch_abs_mean"] < 1e-4 and b["tis/mismatch_abs_mean"] < 1e-4
    evals_one = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in one]
    evals_two = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in two]
    assert [e for e in evals_one if e] and evals_two == evals_one  # before and after training
    final_one, final_two = (tmp_path / d / "checkpoints" / "final" for d in ("one", "two"))
    assert _max_weight_diff(final_one, final_two) < 1e-5
    assert _max_weight_diff(final_one, calc_model) > 1e-4  # training moved the weights


@pytest.fixture(scope="module")
def straight(calc_model, tmp_path_factory) -> tuple[list[dict], Path]:
    """A straight 3-step run on the `hf` engine: (its per-step metrics, its output dir)."""
    out = tmp_path_factory.mktemp("straight")
    history = Trainer(_cfg(out, calc_model, "rollout.engine=hf", "train.steps=3")).train()
    return history, out


@pytest.mark.slow
def test_resumed_run_matches_a_straight_run(calc_model, straight, tmp_path):
    history, straight_out = straight
    assert max(m["agent/turns_max"] for m in history) >= 2
    # The same run, stopped after a checkpoint at step 2...
    cfg = _cfg(tmp_path, calc_model, "rollout.engine=hf", "train.steps=3")
    stopped = Trainer(cfg)
    stopped.train_step()
    stopped.train_step()
    stopped.save()
    del stopped
    # ...and resumed by a new Trainer: step 3 and the final weights are the straight run's.
    resumed = Trainer(
        _cfg(tmp_path, calc_model, "rollout.engine=hf", "train.steps=3", "train.resume=auto")
    ).train()
    assert len(resumed) == 1
    (want,), (got,) = history[2:], resumed
    for key in SAME:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert _agent(got) == pytest.approx(_agent(want), abs=1e-9)
    final = tmp_path / "checkpoints" / "final"
    assert _max_weight_diff(final, straight_out / "checkpoints" / "final") < 1e-6


@pytest.mark.slow
def test_async_prefetch_plays_whole_episodes_with_one_older_version(calc_model, straight, tmp_path):
    """`rollout.max_staleness=1`: step n+1's episodes are played while step n trains, every turn
    with the weights of step n-1 (pushes wait for queued episodes)."""
    history, _ = straight
    cfg = _cfg(
        tmp_path, calc_model, "rollout.engine=hf", "train.steps=3", "rollout.max_staleness=1"
    )
    trainer = Trainer(cfg)
    source = trainer.algorithm.source
    assert isinstance(source, AsyncRolloutSource)
    lagged = [trainer.train_step()]
    # queued: step 2's batch (sampled before the push, version 0) and step 3's (version 1)
    assert [(job.step, job.version) for job in source.queue] == [(1, 0), (2, 1)]
    turns = 0
    for job in source.queue:
        groups, _ = job.future.result()
        for sample in (s for g in groups for s in g):
            versions = sample.rollout.turn_versions
            assert versions and set(versions) == {job.version}  # every turn: the job's version
            assert sample.rollout.weight_version == job.version
            turns = max(turns, len(versions))
    assert turns >= 2
    saved = torch.load(trainer.save() / "rank_state0.pt", weights_only=False)  # episodes pickle
    assert [job["step"] for job in next(iter(saved.values()))["jobs"]] == [1, 2]
    lagged += [trainer.train_step(), trainer.train_step()]
    assert [m["rollout/staleness/max"] for m in lagged] == [0.0, 1.0, 1.0]
    assert [m["weight_version"] for m in lagged] == [1.0, 2.0, 3.0]
    for key in STEP_ONE_SAME:  # step 1 is played synchronously, as in the straight run
        assert lagged[0][key] == history[0][key], key
    assert _agent(lagged[0]) == _agent(history[0])
    assert lagged[0]["tis/mismatch_abs_mean"] < 1e-4
    for m in lagged[1:]:  # sampled with the weights before the last step's update
        assert m["tis/mismatch_abs_mean"] > 1e-4


@pytest.mark.slow
@needs_vllm
def test_lora_adapter_synced_into_vllm_plays_episodes(calc_model, tmp_path):
    """`model.lora.sync=adapter`: vLLM samples every turn with base weights + the pushed adapter."""
    lora = ("model.lora.r=8", "model.lora.alpha=16", "model.lora.sync=adapter", "optim.lr=1e-2")
    trainer = Trainer(_cfg(tmp_path, calc_model, "rollout.engine=vllm", *lora))
    module = trainer.engine.module
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    history = trainer.train()
    assert [m["weight_version"] for m in history] == [1.0, 2.0]
    assert max(m["agent/turns_max"] for m in history) >= 2
    for m in history:  # the sampler's log-probs (every turn) are the trainer's
        assert m["tis/mismatch_abs_mean"] < 1e-4
    engine = trainer.algorithm.source.engine
    assert engine.lora_request is not None and engine.weight_version == 2
    end = module.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any(".lora_B." in k for k in changed)  # step 2 sampled with a non-zero adapter
    assert all(".lora_A." in k or ".lora_B." in k for k in changed)


@pytest.fixture(scope="module")
def server(calc_model, tmp_path_factory):
    """URL of a vLLM-CPU rollout server on the warmed-up model (room for whole episodes)."""
    root = tmp_path_factory.mktemp("episode-server")
    # the helper's 256 tokens cannot hold an episode's later turns; the last flag wins
    with rollout_server(calc_model, root, extra=["--max-model-len", "512"]) as (url, _):
        yield url


@pytest.mark.slow
@needs_vllm
def test_two_ranks_play_episodes_through_a_server_with_prefetch(server, calc_model, tmp_path):
    """torchrun, 2 ranks, one vLLM server, `rollout.max_staleness=1`: each rank plays its tasks'
    episodes on the server in the prefetch thread; rank 0 pushes the weights."""
    rows = _cli(
        torchrun(2),
        tmp_path,
        calc_model,
        "rollout.engine=server",
        f"rollout.server_url={server}",
        "rollout.server_timeout_s=60",
        "rollout.max_staleness=1",
        "train.steps=3",
        "train.zero_stage=2",
    )
    assert [r["weight_version"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["rollout/staleness/max"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["agent/rank_episodes"] == 2 * 4 and r["ranks"] == 2.0 for r in rows)
    assert max(r["agent/turns_max"] for r in rows) >= 2
    assert rows[0]["tis/mismatch_abs_mean"] < 1e-4  # the server held the starting weights
    for r in rows[1:]:  # one version behind the trainer
        assert r["tis/mismatch_abs_mean"] > 1e-4
    assert sorted(p.name for p in (tmp_path / "rollout-weights").iterdir()) == ["v3"]


@pytest.mark.slow
@needs_vllm
def test_two_colocated_vllm_ranks_play_episodes_with_prefetch(calc_model, tmp_path):
    """torchrun, 2 ranks, each with its own in-process vLLM replica, `rollout.max_staleness=1`:
    step n+1's episodes are played in the prefetch thread while step n trains, with the weights
    of one version before (every turn), each rank its own tasks."""
    rows = _cli(
        torchrun(2),
        tmp_path,
        calc_model,
        "rollout.engine=vllm",
        "rollout.max_staleness=1",
        "train.steps=3",
        "train.zero_stage=2",
    )
    steps = [r for r in rows if "loss" in r]
    assert [r["weight_version"] for r in steps] == [1.0, 2.0, 3.0]
    assert [r["rollout/staleness/max"] for r in steps] == [0.0, 1.0, 1.0]
    assert all(r["agent/rank_episodes"] == 2 * 4 and r["ranks"] == 2.0 for r in steps)
    assert max(r["agent/turns_max"] for r in steps) >= 2
    assert steps[0]["tis/mismatch_abs_mean"] < 1e-4  # played with the starting weights
    for r in steps[1:]:  # one version behind the trainer
        assert r["tis/mismatch_abs_mean"] > 1e-4
    final = tmp_path / "checkpoints" / "final"
    assert _max_weight_diff(final, calc_model) > 1e-4  # training moved the weights


# ------------------------------------------------------------------ the per-turn protocol
def _thread_ranks(world: int, play) -> list:
    """Run `play(rank, shards)` on `world` threads whose `EpisodeShards` gather through shared
    slots (a stand-in for the gloo group); each rank's result or raised exception."""
    barrier = threading.Barrier(world, timeout=20)
    slots: list = [None] * world
    results: list = [None] * world

    def gather_for(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    def work(rank: int) -> None:
        calls: list[int] = []

        def block(prompts, sampling, first_index):
            calls.append(first_index)
            return [first_index + i for i in range(len(prompts))]

        shards = EpisodeShards(block, rank, world, gather_for(rank))
        try:
            results[rank] = (play(rank, shards), calls)
        except Exception as err:
            results[rank] = err

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in a gather"
    return results


def _turns(counts: list[int], fail_at: int | None = None, err: Exception | None = None):
    """A stand-in for `run_episodes`: one generate call per turn over `counts[turn]` episodes."""

    def run(engine):
        seen = []
        for turn, n in enumerate(counts):
            seen.append(engine.generate([[0]] * n, None))
            if turn == fail_at:
                raise err
        return seen

    return run


def test_each_turn_seeds_a_rank_after_the_ranks_before_it():
    counts = {0: [4, 2, 1], 1: [4, 3], 2: [0]}  # rank 2 has no task; ranks end at other turns

    def play(rank, shards):
        return shards.play(_turns([n for n in counts[rank] if n]))

    results = _thread_ranks(3, play)
    (seen0, calls0), (seen1, calls1), (seen2, calls2) = results
    assert calls0 == [0, 0, 0] and calls1 == [4, 2] and calls2 == []
    # the indices one engine would give each turn's running episodes of all ranks
    assert seen0 == [[0, 1, 2, 3], [0, 1], [0]] and seen1 == [[4, 5, 6, 7], [2, 3, 4]]
    assert seen2 == []


@pytest.mark.parametrize(
    ("err", "others"),
    [(ValueError("boom"), RuntimeError), (RolloutError("server down"), RolloutError)],
)
def test_a_rank_that_fails_mid_episode_stops_every_rank(err, others):
    def play(rank, shards):
        run = _turns([2, 2, 2]) if rank == 0 else _turns([2, 1, 1], fail_at=1, err=err)
        return shards.play(run)

    first, failed = _thread_ranks(2, play)
    assert failed is err  # the failing rank raises its own error
    assert type(first) is others and "rank 1:" in str(first) and str(err) in str(first)
