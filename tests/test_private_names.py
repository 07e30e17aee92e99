"""No module imports another module's private (underscore) name: what a module shares is public."""

import ast
import sys
from pathlib import Path

import gemmakit

PACKAGE = Path(gemmakit.__file__).parent


def private_imports() -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gemmakit"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.add((str(path.relative_to(PACKAGE.parent)), node.module, alias.name))
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == set()


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    (tmp_path / "gemmakit").mkdir()
    (tmp_path / "gemmakit" / "a.py").write_text("from gemmakit.b import _hidden, shown\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "gemmakit")
    assert private_imports() == {("gemmakit/a.py", "gemmakit.b", "_hidden")}
