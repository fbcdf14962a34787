"""The generic layers hold model families and methods only through their interfaces: no name
comparisons, no tables or lookups keyed by a family or a method outside their registries, no
isinstance on a family's classes, no imports of a family's package. (The import layers
themselves are import-linter's: `make lint`.)"""

import ast

import pytest

from ccalign.models import families
from ccalign.train import methods
from support import REPO

GENERIC = ("commands", "demo", "train", "sample", "data", "eval")
#: the registries, where names are the keys by design
REGISTRIES = ("train/methods.py", "demo/recipes.py", "demo/bundles.py")
FAMILY_CLASSES = ("LlamaGen", "VAR", "VarVQ", "VQModel", "LlamaGenConfig", "VARConfig")


def generic_modules():
    root = REPO / "src" / "ccalign"
    for package in GENERIC:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative not in REGISTRIES:
                yield relative, ast.parse(path.read_text())


def names_in(node: ast.AST) -> list[str]:
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [item.value for item in items if isinstance(item, ast.Constant)]


def branches(tree: ast.AST) -> list[str]:
    """Every place ``tree`` branches on, looks up or imports a family or a method by name."""
    words = set(families.names()) | set(methods.names())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += [f"compares with {w!r}" for w in names_in(side) if w in words]
        elif isinstance(node, ast.Subscript):
            found += [f"looks up {w!r}" for w in names_in(node.slice) if w in words]
        elif isinstance(node, ast.Dict):
            found += [f"a table keyed by {w!r}" for k in node.keys if k for w in names_in(k)
                      if w in words]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "isinstance":
            kinds = ast.unparse(node.args[1])
            found += [f"isinstance on {c}" for c in FAMILY_CLASSES if c in kinds.split(".")[-1]]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported = [node.module + "." + alias.name for alias in node.names]
            found += [f"imports {name}" for name in [node.module, *imported]
                      if name.startswith(("ccalign.models.llamagen", "ccalign.models.var"))]
    return found


@pytest.mark.parametrize(("module", "tree"), list(generic_modules()))
def test_no_branch_on_a_family_or_a_method(module, tree):
    assert not branches(tree), f"{module}: " + "; ".join(branches(tree))


def test_the_scan_catches_each_kind_of_branch():
    tree = ast.parse('if family.name == "var":\n    pass\nx = {"cca": 1}\ny = t["ddo"]\n'
                     "isinstance(m, var.VAR)\nfrom ccalign.models.llamagen import LlamaGen\n")
    assert sorted(branches(tree)) == sorted([
        "compares with 'var'", "a table keyed by 'cca'", "looks up 'ddo'", "isinstance on VAR",
        "imports ccalign.models.llamagen", "imports ccalign.models.llamagen.LlamaGen",
    ])
