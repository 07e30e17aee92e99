"""No module or class in gemmakit defines the same function twice: the later one silently
replaces the first (ruff's F811 does not flag a method repeated in a class body)."""

import ast
import collections
from pathlib import Path

import gemmakit

PACKAGE = Path(gemmakit.__file__).parent


def redefinitions(root: Path) -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for scope in ast.walk(tree):
            if not isinstance(scope, (ast.Module, ast.ClassDef)):
                continue
            names = collections.Counter(
                n.name
                for n in scope.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.decorator_list
            )
            where = getattr(scope, "name", "<module>")
            found |= {(str(path.relative_to(root.parent)), where, name) for name, n in names.items() if n > 1}
    return found


def test_no_function_is_defined_twice_in_one_scope():
    assert redefinitions(PACKAGE) == set()


def test_the_check_sees_a_repeated_method(tmp_path):
    (tmp_path / "gemmakit").mkdir()
    (tmp_path / "gemmakit" / "a.py").write_text(
        "class C:\n    def f(self):\n        return 1\n\n    def f(self):\n        return 1\n"
    )
    assert redefinitions(tmp_path / "gemmakit") == {("gemmakit/a.py", "C", "f")}
