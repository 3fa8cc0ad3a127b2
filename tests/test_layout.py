"""The package's shape: imports point down the layers, files stay short, and every
curvature class in ``curvature/`` is registered."""

import ast
import inspect
from importlib import import_module
from pathlib import Path

import pytest

import headwater.curvature as curvature_package
from headwater.curvature import CURVATURES, REGISTRY, Curvature

SRC = Path(__file__).resolve().parents[1] / "src" / "headwater"

# A lower layer must not import these packages (docs/architecture.md).
HIGHER = ("headwater.methods", "headwater.api", "headwater.cli", "headwater.report")
LOWER = ("store", "gradients", "curvature", "distributed", "task.py", "data.py")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # local imports inside functions count too
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _files(part: str) -> list[Path]:
    path = SRC / part
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("part", LOWER)
def test_lower_layers_never_import_higher_ones(part):
    offences = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in _files(part)
        for line, name in _imported_modules(path)
        if any(name == high or name.startswith(high + ".") for high in HIGHER)
    ]
    assert not offences, "\n".join(offences)


def test_the_import_check_sees_a_local_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from headwater.methods import scoring\n")
    assert (2, "headwater.methods.scoring") in _imported_modules(path)


def test_no_source_file_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long


def test_every_curvature_class_is_registered_once_under_its_name():
    defined = set()
    for path in sorted((SRC / "curvature").glob("[!_]*.py")):
        module = import_module(f"headwater.curvature.{path.stem}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, Curvature)
                and cls.__module__ == module.__name__
                and "name" in vars(cls)  # shared bases (KroneckerCurvature) have none
            ):
                defined.add(cls)
    assert defined == set(CURVATURES.values())
    assert len(REGISTRY) == len(CURVATURES)
    for name, cls in CURVATURES.items():
        assert cls.name == name
        assert getattr(curvature_package, cls.__name__) is cls
        assert cls.__name__ in curvature_package.__all__
