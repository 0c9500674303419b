"""The package's layers: lower ones never import higher ones, siblings never import each other,
no module imports another's private names, and no import cycle exists between modules.

Every import counts: module level, inside functions, under TYPE_CHECKING. Layers, bottom to top
(a module may import its own layer's package and anything lower; the rows marked "siblings" are
packages of one rank that do not import each other):

    rank  packages / modules
    0     dtypes, config, metadata, process_exit, allocator, files
    1     quant            block formats, QuantLinear
    2     kernels          memory-lean autograd functions
    3     adapters         LoRA, QA-LoRA, siblings
    4     models | data    siblings: loading, GGUF I/O | rows, templates, collation
                           (data imports rank 0 only: text to token ids needs no model code)
    5     generation       decoding, over models and data (where present)
    6     train | merge | export | eval | plan     siblings
    7     pipeline         train, then merge
    8     demo, inspect
    9     api
    10    cli
    11    __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "qlorakit"
RANK = {
    "dtypes": 0, "config": 0, "metadata": 0, "process_exit": 0, "allocator": 0, "files": 0,
    "quant": 1, "kernels": 2, "adapters": 3, "models": 4, "data": 4, "generation": 5,
    "train": 6, "merge": 6, "export": 6, "eval": 6, "plan": 6, "pipeline": 7, "demo": 8, "inspect": 8,
    "api": 9, "cli": 10, "__main__": 11,
}
SIBLING_RANKS = {4, 6}
BOTTOM_ONLY = {"data"}  # packages that import nothing above rank 0


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every qlorakit import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write `from qlorakit... import`")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlorakit"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("qlorakit")]
    return found


def _resolve(module: str, name: str | None = None) -> str:
    """The qlorakit module an import refers to (`from qlorakit.models import gguf_io` -> the submodule)."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def _shown(module: str) -> str:
    path = MODULES[module]
    return str(path.relative_to(SRC.parent)) if path.is_relative_to(SRC.parent) else str(path)


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _edges():
    """(importer, line, imported module, imported names) for every import between two modules."""
    for importer, path in MODULES.items():
        for line, module, names in _imports(path):
            for target in {_resolve(module, n) for n in names} or {_resolve(module)}:
                if target != importer and target != "qlorakit":
                    yield importer, line, target, names


def test_every_module_has_a_layer():
    unplaced = sorted({_top(m) for m in MODULES if m != "qlorakit"} - set(RANK))
    assert not unplaced, f"give these a rank in tests/test_layering.py: {unplaced}"


def test_no_layer_imports_a_higher_one_and_siblings_stay_apart():
    wrong = []
    for importer, line, target, _ in _edges():
        a, b = _top(importer), _top(target)
        if a == b or not a or not b:
            continue
        if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and RANK[a] in SIBLING_RANKS):
            wrong.append(f"{_shown(importer)}:{line}: {importer} imports {target}")
        elif a in BOTTOM_ONLY and RANK[b] > 0:
            wrong.append(f"{_shown(importer)}:{line}: {importer} imports {target} ({a} imports rank 0 only)")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _private_attributes(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `alias._name` read where `alias` is a qlorakit module this file
    imported (`import qlorakit.x as alias`, `from qlorakit import x`)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("qlorakit")})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlorakit"):
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES})
    return [(node.lineno, aliases[node.value.id], node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
            and node.attr.startswith("_") and not node.attr.endswith("__")]


def test_no_private_name_crosses_modules():
    wrong = [f"{_shown(importer)}:{line}: imports {n} from {target}"
             for importer, line, target, names in _edges() for n in names if n.startswith("_")]
    wrong += [f"{_shown(importer)}:{line}: reads {module}.{name}"
              for importer, path in MODULES.items() for line, module, name in _private_attributes(path)]
    assert not wrong, "private names used outside their module:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, _, target, _ in _edges():
        graph[importer].add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _fake_module(tmp_path: Path, monkeypatch, dotted: str, source: str) -> Path:
    """A module `dotted` (qlorakit.<package>.<name>) with `source`, added to the modules checked."""
    fake = tmp_path.joinpath(*dotted.split(".")).with_suffix(".py")
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setitem(MODULES, dotted, fake)
    return fake


@pytest.mark.parametrize("dotted, source, check, expected", [
    ("qlorakit.quant.bad", "def f():\n    from qlorakit.train.loop import train\n", "layers",
     r"qlorakit\.quant\.bad imports qlorakit\.train\.loop"),
    ("qlorakit.data.bad", "from qlorakit.quant.base import QuantFormat\n", "layers",
     r"qlorakit\.data\.bad imports qlorakit\.quant\.base \(data imports rank 0 only\)"),
    ("qlorakit.merge.bad", "from qlorakit.models import gguf_io\n\ndef f(p):\n    return gguf_io._metadata_cache_dir(p)\n",
     "private", r"bad\.py:4: reads qlorakit\.models\.gguf_io\._metadata_cache_dir"),
])
def test_the_checks_see_a_violation(tmp_path, monkeypatch, dotted, source, check, expected):
    """The checker itself: a function-local import of a higher layer, data importing above rank 0,
    and a private attribute read through an imported module are each reported."""
    fake = _fake_module(tmp_path, monkeypatch, dotted, source)
    if dotted == "qlorakit.quant.bad":
        assert _imports(fake) == [(2, "qlorakit.train.loop", ["train"])]
    test = {"layers": test_no_layer_imports_a_higher_one_and_siblings_stay_apart,
            "private": test_no_private_name_crosses_modules}[check]
    with pytest.raises(AssertionError, match=expected):
        test()
