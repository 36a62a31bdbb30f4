import ast
import importlib
import subprocess
import sys
from pathlib import Path

import dali_patches


def test_all_is_sorted_and_importable() -> None:
    assert list(dali_patches.__all__) == sorted(dali_patches.__all__)
    for name in dali_patches.__all__:
        assert hasattr(dali_patches, name), name


def _modules() -> list[str]:
    """Every module of the package, dotted below it (``engine.cache``); a subpackage's
    ``__init__.py`` (its face) under the package's name."""
    package = Path(dali_patches.__file__).parent
    names = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if path.name == "__main__.py" or parts == ("__init__",):
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


def test_every_module_lists_its_public_names_sorted() -> None:
    for name in _modules():
        if name in ("tf", "torch", "jax") and importlib.util.find_spec(name.replace("tf", "tensorflow")) is None:
            continue
        module = importlib.import_module(f"dali_patches.{name}")
        names = getattr(module, "__all__", None)
        assert names is not None, f"{name} has no __all__"
        assert list(names) == sorted(names), name
        for attr in names:
            assert hasattr(module, attr), f"{name}.{attr}"


def test_core_imports_without_torch_cupy_or_tensorflow() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'cupy', 'tensorflow', 'jax'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dali_patches, dali_patches.cli, dali_patches.cli.commands, dali_patches.review.figures\n"
        "from dali_patches.engine.backend import resolve_backend\n"
        "assert resolve_backend('auto').device.value == 'cpu'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# The data flow, upstream first: a module imports only modules before it (ARCHITECTURE.md draws it).
FLOW = ["flavour", "options", "state", "ranks", "config",
        "sources.base", "sources.headers", "sources.columns", "sources.workers", "sources.listing", "sources.pairing",
        "sources.feeding", "sources.files", "sources.s3", "sources.tar", "sources",
        "catalog.index", "catalog.lookup", "catalog.screen", "catalog.catalog", "catalog",
        "engine.backend", "engine.decoders", "engine.decode", "engine.feeder", "engine.gather", "engine.measure", "engine.plan",
        "engine.cache", "engine.anchors", "engine.draw", "engine.content", "engine.verify", "engine.outputs", "engine.rounds", "engine.pace",
        "engine.views", "engine.maker", "engine.producer",
        "engine.provenance", "engine",
        "export.augment", "export.pipeline", "export.epochs", "export.transfer", "export",
        "sampler", "torch", "tf", "jax",
        "review.runs", "review", "review.figures",
        "cli.synth", "cli.errors", "cli.defaults", "cli.bench", "cli.commands", "cli.main", "cli"]


def _path(name: str) -> Path:
    package = Path(dali_patches.__file__).parent / name.replace(".", "/")
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def _imports(name: str) -> list[str]:
    """The modules of the package that module ``name`` imports, relative imports resolved (``from
    .pkg import module`` counts as that module, ``from .pkg import name`` as the package's face)."""
    path = _path(name)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # imports for the type checker only: not at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                dotted = ".".join([*base, alias.name])
                found.append(dotted if dotted in FLOW else ".".join(base))
    return [f for f in found if f]


def test_imports_follow_the_flow() -> None:
    """A module (a package's ``__init__.py`` too) imports only modules earlier in the data flow."""
    assert set(_modules()) == set(FLOW)
    for name in FLOW:
        for dep in _imports(name):
            assert dep in FLOW, f"{name} imports {dep}, which is no module of the flow"
            assert FLOW.index(dep) < FLOW.index(name), f"{name} imports {dep}, which comes later in the flow"
