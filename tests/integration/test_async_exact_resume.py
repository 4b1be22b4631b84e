"""An async-prefetch GRPO run (`rollout.max_staleness` k = 1, 2) resumed from a checkpoint equals
the straight run bitwise: the checkpoint holds the batches it had prefetched (each rank's
`rank_state{r}.pt`), so the resumed run trains them as they were sampled (tiny model, hf engine).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.tiny_runs import read_jsonl, tiny_cfg

pytestmark = pytest.mark.slow

TIMING = re.compile(r"^(time|throughput)/|seconds$")
STEPS = 5


def _run(out: Path, model: Path, k: int, *extra: str) -> list[dict]:
    from posttrain.trainer import Trainer

    cfg = tiny_cfg(
        out,
        model,
        f"train.steps={STEPS}",
        "train.save_every=1",
        "train.keep_checkpoints=0",
        "rollout.engine=hf",
        "rollout.samples_per_prompt=8",
        "data.train_size=12",  # 4 prompts a step: an epoch boundary inside the run
        f"rollout.max_staleness={k}",
        *extra,
    )
    Trainer(cfg).train()
    return [
        {key: v for key, v in row.items() if not TIMING.search(key)}
        for row in read_jsonl(out / "metrics.jsonl")
    ]


def _ids(out: Path, after: int) -> list[dict]:
    return [row for row in read_jsonl(out / "data_ids.jsonl") if row["step"] > after]


EVAL_3 = ("train.eval_every=3", "eval.num_problems=4", "eval.seeds=[0]")


# k=2 stopped at step 3: batches 3 and 4 queued, sampled 1 and 2 versions behind; with an eval at
# step 3 the straight run pushed there (forced), and the resume pushes the checkpoint's weights
# under the same version label
@pytest.mark.parametrize(("k", "stop", "extra"), [(1, 2, ()), (2, 3, ()), (2, 3, EVAL_3)])
def test_async_resume_equals_the_straight_run(tmp_path, tiny_model_dir, k, stop, extra):
    straight = _run(tmp_path / "straight", tiny_model_dir, k, *extra)
    ckpt = tmp_path / "straight" / "checkpoints" / f"step-{stop:06d}"
    assert (ckpt / "rank_state0.pt").is_file()  # the prefetched batches, this rank's
    resumed = _run(tmp_path / "resumed", tiny_model_dir, k, *extra, f"train.resume={ckpt}")
    assert [r for r in resumed if r["step"] > stop] == [r for r in straight if r["step"] > stop]
    # the straight run trained prefetched, stale batches after the checkpoint
    assert max(row.get("rollout/staleness/max", 0.0) for row in resumed) == k
    assert any(row.get("rollout/pushed") == 0.0 for row in straight) == (k > 1)
    assert any(key.startswith("eval/") for row in resumed for key in row) == bool(extra)
    assert _ids(tmp_path / "resumed", stop) == _ids(tmp_path / "straight", stop)
    final = [
        load_file(p / "checkpoints/final/model.safetensors")
        for p in (tmp_path / "straight", tmp_path / "resumed")
    ]
    assert final[0].keys() == final[1].keys()
    for name, tensor in final[0].items():
        assert tensor.equal(final[1][name]), name
