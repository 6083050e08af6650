"""The package's shape, as ARCHITECTURE.md states it: module and function sizes, and which module may import
which. A change that breaks a rule fails here and names the module, so the rule and the document stay true."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "atq"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 300
SIZE_EXEMPT = {"kernels/triton.py"}  # Triton kernels: inlined PTX and tile loops read better whole

# A module imports only from modules of a lower rank (ARCHITECTURE.md's layers, bottom first); the files of a
# subpackage (kernels/, export/) count as one unit. Imports under ``if TYPE_CHECKING`` are for annotations only.
RANKS = {
    "checks": 0, "packing": 0, "files": 0, "distributed": 0, "onload": 0, "orthogonal": 0,
    "bundled": 1, "gguf_tokenizer": 1,
    "config": 1,
    "ternary": 1,
    "quantizers": 2, "kernels": 2,
    "gptq": 3, "layers": 3,
    "surgery": 4, "capture": 4, "embedding": 4,
    "rotation": 5, "sensitivity": 5, "tuning": 5, "compilation": 5, "stats": 5, "data": 5,
    "io": 6, "calibration": 6, "evaluate": 6, "distill": 6,
    "hf": 7, "checkpoint": 7,
    "models": 8,
    "ptq": 9, "qat": 9, "export": 9,
    "measure": 10, "flags": 10, "generate": 10, "training": 10,
    "cli": 11, "__init__": 11,
}


def _modules() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def _unit(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    """The ATQ units ``path`` imports at run time (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    depth = len(path.relative_to(SOURCE).parts) - 1  # 0 for src/atq/x.py, 1 for src/atq/kernels/x.py
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in skipped:
            if node.level == 0 and (node.module or "").split(".")[0] == "atq":
                names = [(node.module or "").split(".")[1:2] or [a.name for a in node.names]]
            elif node.level - depth == 1:  # relative to the package root
                names = [[node.module.split(".")[0]]] if node.module else [[a.name] for a in node.names]
            else:  # inside the same subpackage
                continue
            units.update(name[0] for name in names)
    return {u for u in units if u in RANKS}


def test_every_module_has_a_rank():
    assert {_unit(p) for p in _modules()} <= set(RANKS), "add new modules to RANKS and to ARCHITECTURE.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SOURCE)))
def test_imports_point_down(path):
    unit = _unit(path)
    upward = {u for u in _imports(path) if u != unit and RANKS[u] >= RANKS[unit]}
    assert not upward, f"{path.relative_to(SOURCE)} (rank {RANKS[unit]}) imports {sorted(upward)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SOURCE)))
def test_sizes(path):
    if str(path.relative_to(SOURCE)) in SIZE_EXEMPT:
        return
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
