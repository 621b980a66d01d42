"""The layering of DESIGN.md, checked on every import statement (function-level ones too): kernels
import nothing of lensjax, the base (models, checkpoints) imports no algorithm, and the two papers'
packages never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = {  # folder -> module prefixes it must not import
    "kernels": ("lensjax.",),
    "lensjax/models": ("lensjax.selection", "lensjax.svf", "lensjax.cli"),
    "lensjax/checkpoints": ("lensjax.selection", "lensjax.svf", "lensjax.cli"),
    "lensjax/selection": ("lensjax.svf",),
    "lensjax/svf": ("lensjax.selection",),
}
ALLOWED = {"kernels": ("lensjax.kernels",)}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, node.lineno


@pytest.mark.parametrize("folder", sorted(RULES))
def test_no_forbidden_imports(folder):
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for mod, line in _imports(f):
            name = mod + "."
            if any(name.startswith(p) for p in RULES[folder]) and not any(
                    name.startswith(a + ".") for a in ALLOWED.get(folder, ())):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_cross_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from lensjax.selection.lm import token_logprobs\n")
    assert [m for m, _ in _imports(f)] == ["lensjax.selection.lm"]
