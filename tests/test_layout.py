"""The layout the README describes: which package may import which, and who reads settings.

Run as a script to print the package import graph: ``python -m tests.test_layout``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "cli", "config", "models", "sandbox", "workers")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {i for i in imports(path) if i in modules and i != name}
        for name, path in modules.items()
    }


def package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in module_graph().items():
        source = module.split(".")[0]
        edges[source].update(t.split(".")[0] for t in targets if t.split(".")[0] != source)
    return {p: edges.get(p, set()) for p in PACKAGES}


def test_models_import_nothing_else_of_the_repository() -> None:
    assert package_graph()["models"] == set()


def test_config_imports_nothing_else_of_the_repository() -> None:
    assert package_graph()["config"] == set()


def test_workers_never_import_the_web_process() -> None:
    assert "api" not in package_graph()["workers"]


def test_the_web_process_imports_only_the_publishing_module_of_the_workers() -> None:
    graph = module_graph()
    from_web = {t for m, targets in graph.items() if m.startswith("api") for t in targets}
    assert {t for t in from_web if t.startswith("workers")} == {"workers.publish"}
    assert {t for t in graph["workers.publish"] if t.startswith("workers.")} == set()


def test_production_packages_never_import_the_sandbox_at_module_load() -> None:
    for module, path in _modules().items():
        if module.split(".")[0] in ("api", "workers", "models", "config"):
            assert not any(i.startswith("sandbox") for i in imports(path)), module


def test_no_import_cycle_between_the_service_packages() -> None:
    graph = package_graph()
    service = ("api", "config", "models", "workers")

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in graph[start]
            if nxt in service
        )

    assert [p for p in service if reaches(p, p)] == []


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = {
        module
        for module, path in _modules().items()
        if "os.environ" in path.read_text() or "getenv(" in path.read_text()
    }
    assert readers == {"config.settings"}


def test_importing_the_web_app_does_not_build_the_worker_app() -> None:
    probe = "import sys, api.app; print(sorted(m for m in sys.modules if m.startswith('workers')))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "['workers', 'workers.publish']", done.stderr


@pytest.mark.parametrize("package", PACKAGES)
def test_the_readme_layout_names_every_package(package: str) -> None:
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert f"`{package}/`" in layout


@pytest.mark.parametrize("package", PACKAGES)
def test_tests_mirror_the_packages(package: str) -> None:
    assert (ROOT / "tests" / package / "__init__.py").is_file()


if __name__ == "__main__":
    for source, targets in package_graph().items():
        print(f"{source:8} -> {', '.join(sorted(targets)) or '(nothing)'}")
