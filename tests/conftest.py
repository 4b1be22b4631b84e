"""Shared fixtures: the tiny Qwen2 model directory, built once per test session (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `make_tiny(size="tiny", seed=0)` directory (config, weights, tokenizer, chat template)."""
    from posttrain.models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)
