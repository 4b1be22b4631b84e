"""End-of-run summary: eval.json (with decoding settings), a PNG of curves, a printed table, and
the before/after pass@k curves (pass_at_k.png, the problems solved after but never before)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.eval import pass_curve
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
        pass_curves: "before"/"after" -> `pass_curve.curve_doc` of the held-out pass@k curve
            (`eval.run_pass_k_max` samples per problem and seed); empty when none was drawn.
    """

    algorithm: str
    steps: int
    output_dir: Path
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    eval_settings: dict[str, Any] | None = None
    final_checkpoint: Path | None = None
    pass_curves: dict[str, dict[str, Any]] = field(default_factory=dict)


def finish(result: RunResult) -> None:
    """Write eval.json, curves.png and (with pass@k curves) pass_at_k.png under the output dir
    and print the before/after numbers and where they are."""
    out = result.output_dir
    lines = [f"[posttrain] {result.algorithm}: {result.steps} steps in {out}"]
    if result.eval_settings is not None:
        doc = {
            "before": result.eval_before,
            "after": result.eval_after,
            "settings": result.eval_settings,
        }
        curve_lines = _pass_at_k(result, doc)
        (out / "eval.json").write_text(json.dumps(doc, indent=2))
        for key in sorted(set(result.eval_before) | set(result.eval_after)):
            before = result.eval_before.get(key, float("nan"))
            after = result.eval_after.get(key, float("nan"))
            lines.append(f"  {key:<22} before {before:7.3f}   after {after:7.3f}")
        lines += curve_lines
        lines.append(f"  eval results + settings: {out / 'eval.json'}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        png = plot_curves(metrics, out / "curves.png", CURVES, title=f"{result.algorithm} run")
        lines.append(f"  curves: {png}")
    if result.final_checkpoint is not None:
        lines.append(f"  checkpoint: {result.final_checkpoint}")
    print("\n".join(lines), flush=True)


def _pass_at_k(result: RunResult, doc: dict[str, Any]) -> list[str]:
    """Add the pass@k curves (and the solved-after/before counts) to `doc`, draw pass_at_k.png;
    returns the report's lines about them."""
    curves = result.pass_curves
    if not curves:
        return []
    solved = None
    if "before" in curves and "after" in curves:
        solved = pass_curve.compare(curves["before"], curves["after"])
    png = pass_curve.plot(
        curves,
        result.output_dir / pass_curve.PNG_NAME,
        title=f"{result.algorithm}: held-out set",
        solved=solved,
    )
    doc["pass_at_k"] = {**curves, **({"solved": solved} if solved else {}), "png": str(png)}
    return [*pass_curve.format_lines(curves, solved), f"  pass@k curves: {png}"]
