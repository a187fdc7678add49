"""The layout's promises: imports flow schemas <- training <- services, deployed processes never
import the laptop tools, and a client or `rankloop --help` loads no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_imports_flow_one_way():
    for path in files("schemas"):
        assert not {m for m in imports(path) if m.split(".")[0] in ("training", "services")}, path
    for path in files("training"):
        assert not {m for m in imports(path) if m.split(".")[0] == "services"}, path


def test_only_the_cli_and_local_tools_import_services_local():
    for path in files("services"):
        rel = path.relative_to(ROOT / "services").parts[0]
        if rel in ("local", "cli"):
            continue
        assert not {m for m in imports(path) if m.startswith("services.local")}, path


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout


def test_the_sdk_and_the_cli_root_load_no_model_code():
    heavy = "{'torch', 'faiss', 'sentence_transformers', 'mlflow'}"
    assert run(f"import sys, services.sdk; print(sorted({heavy} & set(sys.modules)))").strip() == "[]"
    assert run(f"import sys, services.cli; print(sorted({heavy} & set(sys.modules)))").strip() == "[]"


def test_admin_commands_storage_and_the_serve_supervisor_load_no_model_code():
    """promote/rollback/models answer in seconds; a `serve --workers N` supervisor stays small."""
    modules = "services.registry, services.cli.models, services.storage.memory, services.storage.redis, services.local.workers"
    assert run(f"import sys, {modules}; print(sorted({{'torch', 'sentence_transformers'}} & set(sys.modules)))").strip() == "[]"
