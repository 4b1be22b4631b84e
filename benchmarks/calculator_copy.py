"""Where a `calculator_expression` checkpoint copies wrong: teacher-forced held-out transcripts.

An episode copies twice: the question's expression into the `calculate` call, and the tool's
result into the answer. For each copy ("call", "answer") this reads, over the environment's
synthetic transcripts of held-out tasks, the greedy (argmax) accuracy of every copied digit, the
mean probability at temperature 1 of the whole copied span, the wrong digits by position in the
span, and the most common (right -> predicted) mix-ups. The product of both spans' probabilities
estimates sampled success; a warm-up whose errors sit at one position of one span shows it here.

    python benchmarks/calculator_copy.py RUN/sft-warmup/checkpoints/final [--n 200] [--out F.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path
from typing import Any

SPANS = ("call", "answer")


def span_starts(text: str, expression: str, answer: str) -> dict[str, int]:
    """Character offsets in a rendered transcript where the copied spans begin.

    Args:
        text: the transcript rendered by the chat template.
        expression: the call's expression ("273 * 951").
        answer: the final answer ("259623").

    Returns:
        {"call": offset of the expression inside the call, "answer": offset of the answer in
        the last assistant turn}.
    """
    call = text.index(json.dumps(expression), text.index("<tool_call>")) + 1
    return {"call": call, "answer": text.rindex(answer)}


def transcript_stats(model: Any, tok: Any, conv: list[dict[str, Any]], tools: list) -> dict:
    """Per-span digits (position, right, predicted) and the span's log-probability, one pass.

    Args:
        model: a causal LM.
        tok: its tokenizer (with offsets).
        conv: one synthetic transcript (user, assistant call, tool, assistant answer).
        tools: JSON schemas for `apply_chat_template(tools=...)`.

    Returns:
        {span: {"digits": [(position, right, predicted)], "logp": float}}.
    """
    import torch

    text = tok.apply_chat_template(conv, tools=tools, tokenize=False)
    expression = json.loads(conv[1]["content"].split("\n")[1])["arguments"]["expression"]
    spans = {"call": expression, "answer": conv[-1]["content"]}
    starts = span_starts(text, expression, spans["answer"])
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(enc["input_ids"]).logits[0].float(), dim=-1)
    ids = enc["input_ids"][0].tolist()
    out: dict[str, Any] = {}
    for name, span in spans.items():
        lo, hi = starts[name], starts[name] + len(span)
        digits, total = [], 0.0
        for i, (a, b) in enumerate(enc["offset_mapping"][0].tolist()):
            if i == 0 or not (lo <= a and b <= hi and b > a):
                continue
            total += logp[i - 1, ids[i]].item()
            piece = text[a:b]
            if piece.isdigit() and len(piece) == 1:
                digits.append((a - lo, piece, tok.decode([int(logp[i - 1].argmax())])))
        out[name] = {"digits": digits, "logp": total}
    return out


def copy_stats(model_dir: str, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """`transcript_stats` over `n` held-out tasks, summed up per span.

    Args:
        model_dir: a checkpoint trained on `calculator_expression`.
        n: held-out tasks.
        seed: the task generator's seed.

    Returns:
        {"call": {...}, "answer": {...}, "sampled_success_estimate": float}, each span with
        `digit_acc`, `span_prob`, `errors_by_position` {position: count} and `confusions`
        [[right, predicted, count]] (most common first).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import get_json_schema

    from posttrain.envs.calculator import calculate, expression_transcripts, make_product_rows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tools = [get_json_schema(calculate)]
    per = [
        transcript_stats(model, tok, conv, tools)
        for conv in expression_transcripts(make_product_rows(n, seed=seed, split="test"))
    ]
    result: dict[str, Any] = {}
    for name in SPANS:
        digits = [d for p in per for d in p[name]["digits"]]
        wrong = [(pos, r, g) for pos, r, g in digits if r != g]
        result[name] = {
            "digit_acc": 1.0 - len(wrong) / max(len(digits), 1),
            "span_prob": sum(math.exp(p[name]["logp"]) for p in per) / len(per),
            "errors_by_position": dict(sorted(collections.Counter(w[0] for w in wrong).items())),
            "confusions": [
                [r, g, c] for (r, g), c in collections.Counter(w[1:] for w in wrong).most_common()
            ],
        }
    both = [math.exp(p["call"]["logp"] + p["answer"]["logp"]) for p in per]
    result["sampled_success_estimate"] = sum(both) / len(both)
    return result


def main() -> None:
    """Print the table and write the JSON (`--out`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--n", type=int, default=200, help="held-out tasks")
    parser.add_argument("--out", default="benchmarks/results/calculator_copy.json")
    args = parser.parse_args()
    stats = copy_stats(args.model_dir, n=args.n)
    print(f"{'span':<8}{'digit acc':>10}{'span prob':>11}  wrong digits by position; mix-ups")
    for name in SPANS:
        s = stats[name]
        mixups = ", ".join(f"{r}->{g} x{c}" for r, g, c in s["confusions"][:6])
        print(
            f"{name:<8}{s['digit_acc']:>10.3f}{s['span_prob']:>11.3f}  "
            f"{s['errors_by_position']}; {mixups}"
        )
    print(f"estimated sampled success: {stats['sampled_success_estimate']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model_dir": args.model_dir, **stats}, indent=1))


if __name__ == "__main__":
    main()
