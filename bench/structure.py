"""The figures of issue 25's design review, for a checkout: how the code is laid out.

    python bench/structure.py [ROOT]      # ROOT: a dlopt checkout [default: this one]

Prints: modules in the largest folder, the five largest functions (lines), the parameters of the
``compile`` verb's function, CompileConfig's top-level fields, and how many imports of dlopt's own
modules sit inside functions.  Reads the source with ``ast`` only (imports nothing of dlopt), so it
measures an old checkout as well as this one.  Asserts nothing.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

FOLDERS = ("optimizer", "passes", "targets", "calibration")


def sources(root: Path):
    for folder in FOLDERS:
        yield from sorted((root / folder).rglob("*.py"))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    folders = collections.Counter(str(p.parent.relative_to(root)) for p in sources(root))
    functions, config_fields, compile_params = [], None, None
    imports = inner = 0
    for path in sources(root):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
                decorated = any("command" in ast.unparse(d) for d in node.decorator_list)
                if node.name == "compile" and decorated:
                    compile_params = len(node.args.args) + len(node.args.kwonlyargs)
            if isinstance(node, ast.ClassDef) and node.name == "CompileConfig":
                config_fields = sum(isinstance(n, ast.AnnAssign) for n in node.body)
            own = ((isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dlopt") and not node.level)
                   or (isinstance(node, ast.Import) and any(a.name.startswith("dlopt") for a in node.names)))
            if own:
                imports += 1
                inner += id(node) not in top
    functions.sort(reverse=True)
    folder, count = folders.most_common(1)[0]
    print(f"checkout: {root}")
    print(f"largest folder: {folder}/ with {count} modules ({len(folders)} folders)")
    print("five largest functions: " + ", ".join(f"{name} {n}" for n, name in functions[:5]))
    print(f"`dlopt compile`'s function parameters: {compile_params}")
    print(f"CompileConfig top-level fields: {config_fields}")
    print(f"imports of dlopt modules: {imports}, inside functions {inner} ({inner / max(imports, 1):.0%})")


if __name__ == "__main__":
    main()
