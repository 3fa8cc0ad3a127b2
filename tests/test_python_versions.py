"""The package's source parses as Python 3.10 (pyproject's minimum) and imports nothing
added to the standard library later (typing.Self, enum.StrEnum, tomllib, ...)."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "headwater"
MINIMUM = (3, 10)
LATER = {  # standard-library names added after 3.10
    "typing": {
        "Self",
        "LiteralString",
        "Never",
        "assert_never",
        "assert_type",
        "reveal_type",
        "Required",
        "NotRequired",
        "TypeVarTuple",
        "Unpack",
        "dataclass_transform",
        "override",
        "TypeAliasType",
        "get_overloads",
        "clear_overloads",
    },
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "verify", "member", "nonmember", "global_enum"},
    "datetime": {"UTC"},
    "itertools": {"batched"},
    "asyncio": {"TaskGroup", "timeout", "Runner"},
}
LATER_MODULES = {"tomllib", "wsgiref.types"}
LATER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _sources():
    return sorted(SOURCE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SOURCE)))
def test_source_is_python_3_10(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=MINIMUM)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name in LATER.get(node.module, ())
            ]
            found += [node.module] if node.module in LATER_MODULES else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in LATER_MODULES]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found += (
                [f"{node.value.id}.{node.attr}"]
                if node.attr in LATER.get(node.value.id, ())
                else []
            )
        elif isinstance(node, ast.Name) and node.id in LATER_BUILTINS:
            found.append(node.id)
    assert not found, f"{path.name} uses names added after Python 3.10: {sorted(set(found))}"
