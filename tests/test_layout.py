"""The package tree is the architecture: the rules between the layers, read from the imports."""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "train_loop"
ENTRY_POINTS = (
    "train_loop.cli",
    "train_loop.training_flags",
    "train_loop.apps",
    "train_loop.launch",
    "train_loop.bench",
    "train_loop.compare",
    "train_loop.startup",
    "train_loop.__main__",
)
# A module (by the start of its dotted name) may not import any module starting with these.
RULES = {
    "train_loop.configs": (
        "train_loop.configs.",
        "train_loop.data",
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    # The values each setting may hold and the checks of a Config, which `configs` calls (it names
    # `Config` for type checkers only).
    "train_loop.settings": (
        "train_loop.settings.",
        "train_loop.data",
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    "train_loop.errors": ("train_loop.",),
    # A user's periodic actions as declared, plain Python: `import train_loop` imports it.
    "train_loop.user_actions": (
        "train_loop.configs",
        "train_loop.settings",
        "train_loop.user_actions.",
        "train_loop.data",
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    # Leaves that every layer may use: writing files safely, and ending with the parent process.
    "train_loop.files": (
        "train_loop.configs",
        "train_loop.files.",
        "train_loop.data",
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    "train_loop.orphans": ("train_loop.",),
    # Calling a user's code (a model or input function): the data and model layers both do.
    "train_loop.user_code": (
        "train_loop.configs",
        "train_loop.user_code.",
        "train_loop.data",
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    "train_loop.data": (
        "train_loop.model",
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    "train_loop.model": (
        "train_loop.checks",
        "train_loop.outputs",
        "train_loop.training",
        "train_loop.study",
        *ENTRY_POINTS,
    ),
    # What a run proves before it trains: the model layer's math, run on the run's own state.
    "train_loop.checks": ("train_loop.outputs", "train_loop.training", "train_loop.study", *ENTRY_POINTS),
    "train_loop.outputs": ("train_loop.checks", "train_loop.training", "train_loop.study", *ENTRY_POINTS),
    "train_loop.training": ("train_loop.study", *ENTRY_POINTS),
    "train_loop.study": ("train_loop.model.steps", "train_loop.model.loop_calls"),
}
# The data layer reads with NumPy, so that bad data is refused before TensorFlow starts; TensorFlow
# only where the pipelines are built (and Keras, deferred, for its download of MNIST).
TENSORFLOW_IN_DATA = {"train_loop.data.inputs", "train_loop.data.streams", "train_loop.data.tfrecords"}


def modules() -> dict[str, set[str]]:
    """Every module of the package, by dotted name, with the modules it imports (deferred ones too)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = set(imported(ast.parse(path.read_text()), name))
    return found


def imported(tree: ast.AST, module: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from train_loop.model import steps` imports train_loop.model.steps.
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_each_layer_imports_only_what_its_rules_allow():
    broken = [
        f"{module} imports {name}"
        for module, names in sorted(modules().items())
        for layer, forbidden in RULES.items()
        if module == layer or module.startswith(f"{layer}.")
        for name in sorted(names)
        if name.startswith(forbidden)
    ]
    assert broken == []


def test_the_data_layer_imports_tensorflow_only_in_its_pipelines():
    data = {module: names for module, names in modules().items() if module.startswith("train_loop.data")}
    assert {
        module for module, names in data.items() if any(name.split(".")[0] == "tensorflow" for name in names)
    } <= TENSORFLOW_IN_DATA


def test_the_rules_name_real_modules_and_every_module_belongs_to_a_layer_or_the_top():
    found = modules()
    for prefix in [*RULES, *ENTRY_POINTS, *TENSORFLOW_IN_DATA]:
        assert any(module == prefix or module.startswith(f"{prefix}.") for module in found), prefix
    top = {module for module in found if module.count(".") == 1}
    assert top - {*RULES, *ENTRY_POINTS} == set()


@pytest.mark.parametrize("layer", ["data", "model", "checks", "outputs", "training", "study"])
def test_each_layers_docstring_states_its_rules(layer):
    docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert docstring and "Rules:" in docstring


def test_the_wheel_ships_every_package_of_the_tree():
    """setuptools is given the packages by name (pyproject.toml): a new one left out of the list
    would be missing from the wheel while every test of the checkout still passes."""
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(init.parent.relative_to(PACKAGE.parent).parts) for init in PACKAGE.rglob("__init__.py")}
    assert tree <= listed, sorted(tree - listed)
