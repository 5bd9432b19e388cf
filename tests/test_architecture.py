"""The layering the folders promise: the retrieval library (raid_fast's top-level modules, ops/,
ref/, _backends/ and the Triton kernels) imports nothing from the detection application (detect/,
data/, app/), not even lazily inside a function; ``triton`` is imported only by the kernels; and no
module imports the kernels as a bare top-level ``kernels`` package."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = ("raid_fast.detect", "raid_fast.data", "raid_fast.app")


def _modules():
    """(dotted name, path) of every module of the package, kernels/ installed as raid_fast.kernels."""
    for path in sorted((ROOT / "raid_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "raid_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}"), path


def _imports(path: Path, module: str) -> list[str]:
    """Every module an import statement anywhere in the file names (absolute, relative resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _library(module: str) -> bool:
    return _in(module, ("raid_fast",)) and not _in(module, APPLICATION)


def test_library_imports_nothing_from_the_application():
    offenders = [
        f"{module} imports {name}"
        for module, path in _modules()
        if _library(module)
        for name in _imports(path, module)
        if _in(name, APPLICATION)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_the_wings():
    modules = dict(_modules())
    assert sum(_library(m) for m in modules) >= 20
    assert sum(_in(m, APPLICATION) for m in modules) >= 15
    # the application does use the library (the check would pass vacuously otherwise)
    assert any(
        n.startswith("raid_fast.retrieval")
        for n in _imports(modules["raid_fast.detect.detector"], "raid_fast.detect.detector")
    )


def test_triton_only_in_kernels_and_no_bare_kernels_package():
    for module, path in _modules():
        names = _imports(path, module)
        if not _in(module, ("raid_fast.kernels",)):
            assert not any(n == "triton" or n.startswith("triton.") for n in names), f"{module} imports triton"
        assert not any(n == "kernels" or n.startswith("kernels.") for n in names), f"{module} imports a bare kernels"
