"""The shape of the house (README, "Design"): commands on top, imported by nothing; imports one way
and at the top of modules; no function over 80 lines; every benchmark module is a suite."""

import ast
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fitv2_jax"
# Optional heavy dependencies, imported where they are needed (their absence names the extra).
LAZY = ("torch", "diffusers", "matplotlib", "tensorflow_datasets", "skimage")
MAX_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()
COMMANDS = {m for m, p in MODULES.items() if p.parent == PACKAGE and p.name != "__init__.py"}
ABOVE_LIBRARY = ("fitv2_jax.cli", "fitv2_jax.recipes", "fitv2_jax.benchmarks")


def _imports(name: str) -> list[tuple[str, ast.AST, bool]]:
    """(imported module, node, inside a function) for every import in a module."""
    tree = ast.parse(MODULES[name].read_text())
    in_function = {id(m) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for m in ast.walk(f)}  # fmt: skip
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(t, node, id(node) in in_function) for t in targets]
    return out


def _internal_graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_nothing_imports_a_command_and_the_library_not_the_command_layer():
    graph = _internal_graph()
    for module, targets in graph.items():
        assert not targets & COMMANDS, f"{module} imports a command: {targets & COMMANDS}"
        if module in COMMANDS or module.startswith(ABOVE_LIBRARY):
            continue
        above = {t for t in targets if t.startswith(ABOVE_LIBRARY)}
        assert not above, f"library module {module} imports {above}"


def test_the_import_graph_has_no_cycle():
    graph, state = _internal_graph(), {}

    def visit(m, path):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, m, t]))
            if t not in state:
                visit(t, [*path, m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_imports_sit_at_the_top_except_optional_heavy_dependencies():
    inner = [f"{m}:{node.lineno} {t}" for m in MODULES for t, node, inside in _imports(m)
             if inside and t.split(".")[0] not in LAZY]  # fmt: skip
    assert not inner, inner


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_commands_are_absl_mains_and_nothing_uses_argparse():
    for name in COMMANDS:
        source = MODULES[name].read_text()
        assert "run(main)" in source and 'if __name__ == "__main__":' in source, name
    users = [m for m in MODULES for t, _, _ in _imports(m) if t == "argparse"]
    assert not users, users


def test_every_benchmark_module_is_a_suite():
    # underscore modules are a suite's helpers (the official-code child process), not suites
    suites = [m for m in MODULES if m.startswith("fitv2_jax.benchmarks.")
              and not m.split(".")[-1].startswith("_")]  # fmt: skip
    assert suites
    for name in suites:
        tree = ast.parse(MODULES[name].read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"define_flags", "main"} <= functions, name


def test_the_commands_listed_in_the_readme_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    for name in COMMANDS:
        assert f"`{name.split('.')[-1]}`" in readme, f"{name} is not in the README's table"
    assert os.path.isfile(PACKAGE.parent / "launch" / "test.sh")
