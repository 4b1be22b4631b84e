"""End-of-run summary: eval.json (with decoding settings), a PNG of curves, a printed table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.runtime.logging import plot_curves

CURVES = ["reward/mean", "eval/greedy_acc", "loss", "kl", "entropy", "response_length/mean"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports.

    Attributes:
        algorithm: `train.algorithm`.
        steps: optimizer-step batches done.
        output_dir: the run directory.
        eval_before, eval_after: held-out metrics before and after training.
        eval_settings: decoding settings of the evaluation; None when the run did not evaluate.
        final_checkpoint: the `final` checkpoint, None when no step ran.
    """

    algorithm: str
    steps: int
    output_dir: Path
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    eval_settings: dict[str, Any] | None = None
    final_checkpoint: Path | None = None


def finish(result: RunResult) -> None:
    """Write eval.json and curves.png under the output dir and print where they are."""
    out = result.output_dir
    lines = [f"[posttrain] {result.algorithm}: {result.steps} steps in {out}"]
    if result.eval_settings is not None:
        doc = {
            "before": result.eval_before,
            "after": result.eval_after,
            "settings": result.eval_settings,
        }
        (out / "eval.json").write_text(json.dumps(doc, indent=2))
        for key in sorted(set(result.eval_before) | set(result.eval_after)):
            before = result.eval_before.get(key, float("nan"))
            after = result.eval_after.get(key, float("nan"))
            lines.append(f"  {key:<22} before {before:7.3f}   after {after:7.3f}")
        lines.append(f"  eval results + settings: {out / 'eval.json'}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        png = plot_curves(metrics, out / "curves.png", CURVES, title=f"{result.algorithm} run")
        lines.append(f"  curves: {png}")
    if result.final_checkpoint is not None:
        lines.append(f"  checkpoint: {result.final_checkpoint}")
    print("\n".join(lines), flush=True)
