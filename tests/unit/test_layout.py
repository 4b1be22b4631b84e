"""The architecture, checked: no import cycles, layers import downward only, every option named
once (config choices equal the registries), every registered algorithm meets the protocol."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("posttrain", "rewards")

# Layers, lowest first. A module belongs to the longest prefix listed; it may import modules of
# its own layer or below, never above. Within a layer the cycle test keeps the order acyclic.
LAYERS: list[tuple[str, ...]] = [
    ("posttrain.errors",),
    # pure math and the built-in synthetic tasks: no config, no I/O
    (
        "posttrain.losses",
        "posttrain.off_policy",
        "posttrain.advantages",
        "posttrain.turn_credit",
        "posttrain.guidance",
        "posttrain.data.arithmetic",
        "posttrain.data.shapes",
    ),
    ("posttrain.runtime",),  # plain arguments in, no Config type
    ("posttrain.config",),
    ("posttrain.data",),
    ("posttrain.models",),
    ("rewards",),
    ("posttrain.envs",),  # multi-turn environments and their tools
    # rollout engines and held-out scoring on an engine
    (
        "posttrain.rollout.engine",
        "posttrain.rollout.hf",
        "posttrain.rollout.vllm_local",
        "posttrain.rollout.vllm_server",
        "posttrain.rollout.nccl_push",
        "posttrain.rollout.memory",
        "posttrain.rollout.sharded",
        "posttrain.rollout.server_ranks",
        "posttrain.rollout.tool_calls",
        "posttrain.rollout.episodes",
        "posttrain.rollout",
        "posttrain.eval.evaluate",
        "posttrain.eval.statistics",
    ),
    (
        "posttrain.rollout.guide",
        "posttrain.rollout.source",
        "posttrain.rollout.episode_source",
        "posttrain.rollout.async_source",
        "posttrain.rollout.factory",
    ),
    ("posttrain.algorithms",),
    ("posttrain.eval.report", "posttrain.eval.command", "posttrain.eval", "posttrain.trainer"),
    ("posttrain.cli",),
    ("posttrain",),  # the package's lazy API (Trainer, load_config)
]


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (module level and inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from pkg import sub` imports the submodule; `from mod import name`, the module
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    mods = project_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_walk_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from posttrain.rollout import factory\n")
    mods = {"posttrain.rollout": Path("x/__init__.py"), "posttrain.rollout.factory": f, "m": f}
    assert imports_of("m", f, mods) == {"posttrain.rollout.factory"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_downward_only():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in import_graph().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_config_choices_are_the_registries():
    from posttrain import advantages, losses
    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import CHOICES
    from posttrain.models import DTYPES
    from posttrain.models.tiny import TINY_SIZES
    from posttrain.rollout import ENGINE_KINDS

    assert CHOICES["advantage.estimator"] is advantages.ESTIMATORS
    assert CHOICES["loss.aggregation"] is losses.AGGREGATION_MODES
    assert CHOICES["loss.ratio_level"] is losses.RATIO_LEVELS
    assert CHOICES["kl.estimator"] is losses.KL_ESTIMATORS
    assert CHOICES["dpo.loss"] is losses.PREFERENCE_KINDS
    # registries above the config layer: the config names them, this proves they agree
    assert set(CHOICES["train.algorithm"]) == set(ALGORITHMS)
    assert set(CHOICES["rollout.engine"]) == set(ENGINE_KINDS)
    assert set(CHOICES["model.tiny_size"]) == set(TINY_SIZES)
    assert set(CHOICES["model.dtype"]) <= set(DTYPES)


def test_config_lora_ranks_are_what_the_vllm_engine_uses():
    from posttrain.config.checks import VLLM_LORA_RANKS
    from posttrain.rollout import vllm_local

    assert vllm_local.VLLM_LORA_RANKS is VLLM_LORA_RANKS
    assert [vllm_local.vllm_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [
        1,
        8,
        8,
        16,
        320,
        512,
    ]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp"])
def test_every_sequence_estimator_runs(estimator):
    import torch

    from posttrain.advantages import SEQUENCE_ESTIMATORS, sequence_advantages

    assert estimator in SEQUENCE_ESTIMATORS
    r = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    out = sequence_advantages(r, torch.ones_like(r, dtype=torch.bool), estimator, lengths=r + 1)
    assert out.shape == r.shape and torch.isfinite(out).all()


def test_every_registered_algorithm_meets_the_protocol():
    from posttrain.algorithms import ALGORITHMS
    from posttrain.algorithms.base import Algorithm

    members = [n for n in dir(Algorithm) if not n.startswith("_")] + list(Algorithm.__annotations__)
    assert set(members) >= {"rolls_out", "evaluates", "make_batch", "loss", "after_step"}
    for name, spec in ALGORITHMS.items():
        cls = inspect.signature(spec.build).return_annotation
        cls = getattr(inspect.getmodule(spec.build), cls) if isinstance(cls, str) else cls
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, f"{name}: {cls.__name__} lacks {missing}"
        assert isinstance(cls.rolls_out, bool) and isinstance(cls.evaluates, bool)
        params = list(inspect.signature(cls.loss).parameters)
        assert params == ["self", "outputs", "mb", "batch"], f"{name}: loss{params}"
