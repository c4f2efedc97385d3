"""The import floors of the packages (design review 1.2), checked so that an arrow the wrong way fails here.

    facepq_core  (errors, digest, codes, codecs, routing, atomic, ...: numpy and the standard library only)
        ^
    opqn_model, indexer, query_node  (the components)
        ^
    facepq  (the app shell: CLI, demo, launcher, bench entry)

`bench/` and `tests/` are not installed, so no product module may import them. The query node serves
codes without the model: neither its server nor the `facepq node` command path loads torch.

Statically every import statement is read with `ast`, including the ones inside functions (a lazy
import still loads the module when the function runs) and `importlib.import_module("literal")`.
At run time a fresh interpreter imports the modules and reports what ended up in `sys.modules`, and a
real `facepq node` process is checked for torch's libraries among its mapped files.
"""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FOUNDATION = "facepq_core"
COMPONENTS = ("opqn_model", "indexer", "query_node")
SHELL = "facepq"  # not facepq_core, not facepq_proto: top-level names are compared whole
HEAVY = ("torch", "grpc", "ray", "pyarrow")
# What the foundation may import besides the standard library.
FOUNDATION_ALLOWED = {FOUNDATION, "numpy", "__future__"}
# What the query node imports to serve: its server, the process around it and the search path.
NODE_SERVING_MODULES = ("query_node.cli", "query_node.node_server", "query_node.registry", "query_node.security",
                        "query_node.index_view", "query_node.live_index", "query_node.shard_search",
                        "query_node.scan", "query_node.fastscan")


def python_files(package: str) -> list[pathlib.Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    return files


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(packages, forbidden) -> list[str]:
    """'file:line imports module' for every import under `packages` whose top-level name `forbidden` accepts."""
    bad = []
    for package in packages:
        for path in python_files(package):
            for line, module in imports(path):
                if forbidden(module.split(".")[0]):
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


def loaded_by(code: str) -> set[str]:
    """Top-level names in sys.modules after a fresh interpreter (the repository first on its path) ran `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def loaded_after_importing(modules) -> set[str]:
    return loaded_by("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules))


def test_no_foundation_or_component_module_imports_the_app_shell():
    bad = violations((FOUNDATION, *COMPONENTS), lambda top: top == SHELL)
    assert not bad, "the app shell `facepq` is the top floor; these modules below it import it:\n" + "\n".join(bad)


def test_the_foundation_imports_only_itself_numpy_and_the_standard_library():
    bad = violations((FOUNDATION,), lambda top: top not in FOUNDATION_ALLOWED and top not in sys.stdlib_module_names)
    assert not bad, f"{FOUNDATION} is the ground floor (numpy + stdlib only):\n" + "\n".join(bad)


def test_importing_every_foundation_module_loads_no_component_shell_or_heavy_library():
    modules = [module_name(p) for p in python_files(FOUNDATION)]
    # the codec registry imports its codec modules on first lookup: do that too
    loaded = loaded_by("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
                       + "from facepq_core.codecs import list_codecs\nassert list_codecs()\n")
    assert FOUNDATION in loaded  # the probe really imported it
    unwanted = loaded & {*COMPONENTS, SHELL, *HEAVY}
    assert not unwanted, f"importing {FOUNDATION} loaded {sorted(unwanted)}"


def test_no_product_module_imports_the_benchmarks_or_the_tests():
    bad = violations((FOUNDATION, *COMPONENTS), lambda top: top in ("bench", "tests"))
    assert not bad, "bench/ and tests/ are not installed; product modules import them:\n" + "\n".join(bad)


def test_the_query_node_server_and_its_search_path_load_no_torch():
    loaded = loaded_after_importing(NODE_SERVING_MODULES)
    assert {"query_node", "grpc", "numpy"} <= loaded  # the probe really imported the server
    assert "torch" not in loaded and "opqn_model" not in loaded, sorted(loaded)


def test_the_facepq_command_line_up_to_the_node_command_loads_no_torch():
    """`facepq node --help` builds the whole command line: every component registers its subcommands, and
    must load torch only inside the command that needs it. (`-X importtime` would not do here: it does not
    see `importlib.import_module`, which is how facepq.cli loads the components' command lines.)"""
    loaded = loaded_by("from facepq.cli import main\n"
                       "try:\n    main(['node', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n")
    assert {*COMPONENTS, SHELL} <= loaded  # the probe really built every component's command line
    assert "torch" not in loaded, "building the command line (e.g. for `facepq node`) imported torch"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process's mapped files are read from /proc")
def test_a_serving_node_process_has_no_torch_library_mapped(tmp_path):
    from tests.support.index import build_index
    from tests.support.processes import node

    build_index(tmp_path / "idx", rows=100, shard_count=1)
    proc = node(tmp_path / "idx", [0])
    try:
        maps = pathlib.Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.kill()
    mapped = {line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6}
    assert any("grpc" in path for path in mapped)  # the measurement sees the server's own libraries
    torch = sorted(path for path in mapped if "/torch/" in path or "libtorch" in path)
    assert not torch, torch[:10]
