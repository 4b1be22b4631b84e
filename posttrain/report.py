"""End-of-run summary: eval.json (with decoding settings), a PNG of curves, a printed table."""

from __future__ import annotations

import json
from typing import Any

from posttrain.eval import eval_settings
from posttrain.logging import plot_curves

CURVES = ["reward/mean", "eval/greedy_acc", "loss", "kl", "entropy", "response_length/mean"]


def finish(trainer: Any, evaluated: bool) -> None:
    """Write eval.json and curves.png under the output dir and print where they are."""
    out = trainer.out
    cfg = trainer.cfg
    lines = [f"[posttrain] {cfg.train.algorithm}: {trainer.step} steps in {out}"]
    if evaluated:
        result = {
            "before": trainer.eval_before,
            "after": trainer.eval_after,
            "settings": eval_settings(cfg, getattr(trainer, "tokenizer", None)),
        }
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        for key in sorted(set(trainer.eval_before) | set(trainer.eval_after)):
            before = trainer.eval_before.get(key, float("nan"))
            after = trainer.eval_after.get(key, float("nan"))
            lines.append(f"  {key:<22} before {before:7.3f}   after {after:7.3f}")
        lines.append(f"  eval results + settings: {out / 'eval.json'}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        png = plot_curves(metrics, out / "curves.png", CURVES, title=f"{cfg.train.algorithm} run")
        lines.append(f"  curves: {png}")
    if trainer.final_checkpoint is not None:
        lines.append(f"  checkpoint: {trainer.final_checkpoint}")
    print("\n".join(lines), flush=True)
