"""The package's imports run one way, read with `ast` (imports inside functions included):

    5 cli -> 4 commands -> 3 engine -> 2 evaluation -> 1 data / models / losses / reports
      -> 0 config / errors / io / metrics / checkpoint / runtime / kernels

A module may import from a lower layer, or from its own layer where that makes no cycle; a
kernel imports nothing from the package. The README's file table names each module's layer.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    "dali_erkt.errors": 0, "dali_erkt.config": 0, "dali_erkt.io": 0, "dali_erkt.metrics": 0,
    "dali_erkt.checkpoint": 0, "dali_erkt.run_state": 0, "dali_erkt.runtime": 0, "dali_erkt.kernels": 0,
    "dali_erkt.synthetic": 1, "dali_erkt.data": 1, "dali_erkt.models": 1, "dali_erkt.losses": 1,
    "dali_erkt.reports": 1,
    "dali_erkt.evaluation": 2,
    "dali_erkt.teacher_cache": 2, "dali_erkt.teachers": 2,
    "dali_erkt.engine": 3, "dali_erkt.run_dir": 3, "dali_erkt.tasks": 3,
    "dali_erkt.commands": 4,
    "dali_erkt.cli": 5,
}
FACADE = "dali_erkt"  # the package's __init__: lazy re-exports only, outside the layers


def modules() -> dict[str, Path]:
    """Module name -> file, with kernels/ mapped to dali_erkt.kernels (as setup.cfg ships it)."""
    found = {}
    for base, package in ((REPO / "dali_erkt", "dali_erkt"), (REPO / "kernels", "dali_erkt.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


MODULES = modules()


def layer_of(name: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules `name` imports, resolved (relative imports, `from pkg import module`)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import dali_erkt.data.loader` names the module itself
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    missing = [n for n in MODULES if n != FACADE and layer_of(n) is None]
    assert not missing, f"place these modules in LAYERS: {missing}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != FACADE))
def test_imports_point_down(name):
    up = [t for t in GRAPH[name] if t == FACADE or layer_of(t) > layer_of(name)]
    assert not up, f"{name} (layer {layer_of(name)}) imports {up} from above"


def test_kernels_import_nothing_from_the_package():
    for name, targets in GRAPH.items():
        if name.startswith("dali_erkt.kernels"):
            outside = [t for t in targets if not t.startswith("dali_erkt.kernels")]
            assert not outside, f"{name} imports {outside}"


def test_no_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_violations(tmp_path):
    """The rules above can fail: a planted upward import and a planted cycle are both found."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = dict(saved, **{"dali_erkt.config": saved["dali_erkt.config"] | {"dali_erkt.engine"}})
        with pytest.raises(AssertionError, match="imports .*engine.* from above"):
            test_imports_point_down("dali_erkt.config")
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_cycles()
    finally:
        GRAPH = saved


def test_readme_names_each_modules_layer():
    """Every row of the README's file table is `| layer | file | job |` and matches LAYERS."""
    rows = re.findall(r"^\| (\d) \| ([^|]+) \|", (REPO / "README.md").read_text(), flags=re.M)
    assert rows, "the README's file table is missing"
    listed = {}
    for layer, cell in rows:
        for f in re.findall(r"`([\w/.]+)`", cell):
            listed[f] = int(layer)
    for name, path in MODULES.items():
        if name == FACADE:
            continue
        rel = path.relative_to(REPO).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        key = rel if rel in listed else folder if folder in listed else None
        assert key is not None, f"README's file table does not list {rel}"
        assert listed[key] == layer_of(name), f"README puts {key} in layer {listed[key]}, not {layer_of(name)}"


def test_kernels_import_from_a_source_tree(tmp_path):
    """`dali_erkt.kernels` imports from a plain copy of the source tree, no install (site's .pth
    hooks, such as an editable install's finder, are left out with -S)."""
    import shutil
    import site
    import subprocess
    import sys
    for folder in ("dali_erkt", "kernels"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    paths = [str(tmp_path)] + site.getsitepackages()
    code = (f"import sys; sys.path[:0] = {paths!r}; import dali_erkt.kernels as k, dali_erkt.losses; "
            "print(k.__file__)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp_path / "kernels" / "__init__.py")
