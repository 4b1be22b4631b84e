"""runtime/rundir.py: a run stopped by a user mistake leaves its output directory as it was."""

from __future__ import annotations

from posttrain.runtime import rundir


def test_a_directory_the_run_made_is_removed(tmp_path):
    out = tmp_path / "run"
    before = rundir.snapshot(out)
    assert before is None
    (out / "tiny-model").mkdir(parents=True)
    (out / "third_party.log").write_text("lines\n")
    rundir.restore(out, before)
    assert not out.exists()


def test_an_earlier_runs_directory_is_put_back(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "third_party.log").write_text("earlier\n")
    before = rundir.snapshot(out)
    with (out / "third_party.log").open("a") as f:
        f.write("this run's lines\n")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 0}\n')
    (out / "wandb").mkdir()
    (out / "curves.png").write_bytes(b"png")
    (out / "checkpoints" / "step-000002" / "kept.txt").write_text("inside: left alone\n")
    rundir.restore(out, before)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "metrics.jsonl",
        "third_party.log",
    ]
    assert (out / "third_party.log").read_text() == "earlier\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (out / "checkpoints" / "step-000002").is_dir()
