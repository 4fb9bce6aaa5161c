"""The package's one-way arrows (docs/architecture.md), checked on the source and on a fresh import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "relprune"

# What each part may import of relprune (besides itself). Top-level modules are errors/defaults.
ALLOWED = {
    "core": {"errors", "defaults"},
    "train": {"errors", "defaults", "core"},
    "deploy": {"errors", "defaults", "core"},
    "llm": {"errors", "defaults", "core"},
    "experiments": {"errors", "defaults", "core", "train", "deploy", "llm", "__init__"},
    "cli": {"errors", "defaults", "core", "train", "deploy", "llm", "experiments", "__init__"},
}
# Third-party packages core may use: the method needs tensors and nothing else at import time;
# the statistics file format (safetensors) and the calibration progress bar (tqdm), both required
# dependencies, load inside the one function that uses each.
CORE_THIRD_PARTY = {"torch", "numpy"}
CORE_LAZY_THIRD_PARTY = {"safetensors", "tqdm"}


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(level, absolute-or-relative module) for every import statement in a file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:
                found += [(node.level, alias.name) for alias in node.names]
            else:
                found.append((node.level, node.module or ""))
    return found


def _target_part(path: Path, level: int, module: str) -> str | None:
    """The part of relprune an import reaches ("core", "errors", "__init__", ...), or None."""
    if level == 0:
        if module == "relprune":
            return "__init__"
        if not module.startswith("relprune."):
            return None
        return module.split(".")[1]
    here = path.relative_to(PACKAGE).parts[:-1]
    base = list(here[: len(here) - (level - 1)])
    parts = [*base, *module.split(".")]
    # `from .. import name`: a submodule when such a file or folder exists, else the package's own API.
    if not PACKAGE.joinpath(*parts).with_suffix(".py").exists() and not PACKAGE.joinpath(*parts).is_dir():
        parts = parts[:-1]
    return parts[0] if parts else "__init__"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_parts_import_only_downward(part):
    bad = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for level, module in _imports(path):
            target = _target_part(path, level, module)
            if target is not None and target != part and target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {'.' * level}{module}")
    assert not bad, "\n".join(bad)


def _module_of(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def test_no_module_imports_another_modules_private_names():
    """`from x import _name` across modules makes a private name an interface nobody maintains as one."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_of(path)
        package = here if path.name == "__init__.py" else here[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[: len(package) - (node.level - 1)] if node.level else ()
            source = (*base, *(node.module or "").split(".")) if node.module else base
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != here:
                    bad.append(f"{path.relative_to(PACKAGE)} imports {alias.name} from {'.'.join(source)}")
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other():
    graph: dict[str, set[str]] = {}
    names = {".".join(_module_of(p)) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_of(path)
        package = here if path.name == "__init__.py" else here[:-1]
        deps = graph.setdefault(".".join(here), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join((*base, *(node.module or "").split("."))) if node.module else ".".join(base)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in names else target)
    pairs = sorted({tuple(sorted((a, b))) for a, ds in graph.items() for b in ds
                    if b != a and a in graph.get(b, ()) and not a.endswith(b) and not b.endswith(a)})
    assert not pairs, pairs


def test_core_uses_only_torch_numpy_and_the_standard_library():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        top = {module for level, module in _imports(path, top_level_only=True) if level == 0}
        for level, module in _imports(path):
            root = module.split(".")[0]
            if level or root in stdlib or root in CORE_THIRD_PARTY:
                continue
            if module in top or root not in CORE_LAZY_THIRD_PARTY:
                bad.append(f"{path.name} imports {module}")
    assert not bad, "\n".join(bad)


def test_import_relprune_is_light():
    heavy = ("matplotlib", "sklearn", "transformers", "relprune.experiments", "relprune.llm")
    code = f"import relprune, sys; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve_lazily_to_their_modules():
    import relprune
    from relprune import collect_stats
    from relprune.core.collect import collect_stats as defined

    assert collect_stats is defined
    assert relprune.shrink.shrink is relprune.deploy.shrink.shrink
    assert relprune.regularizers.ContributionEntropy is relprune.train.regularizers.ContributionEntropy
    assert set(relprune.__all__) <= set(dir(relprune))
    for name in relprune.__all__:
        assert getattr(relprune, name) is not None
    # __all__ is built from the lazy table: every error, every lazily loaded name and submodule, nothing else;
    # the static imports editors read name the same objects.
    errors = {n for n in vars(relprune.errors) if n.endswith("Error")}
    assert set(relprune.__all__) == errors | set(relprune._LAZY) | set(relprune._SUBMODULES) | {"__version__"}
    tree = ast.parse(Path(relprune.__file__).read_text())
    checking = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    static = {a.asname or a.name for node in checking.body for a in node.names}
    assert static == set(relprune._LAZY) | set(relprune._SUBMODULES)


def test_old_module_paths_are_gone():
    with pytest.raises(ModuleNotFoundError):
        __import__("relprune.shrink")
