import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import dali_patches


def test_all_is_sorted_and_importable() -> None:
    assert list(dali_patches.__all__) == sorted(dali_patches.__all__)
    for name in dali_patches.__all__:
        assert hasattr(dali_patches, name), name


def test_every_module_lists_its_public_names_sorted() -> None:
    for info in pkgutil.iter_modules(dali_patches.__path__):
        if info.name in ("tf", "torch") and importlib.util.find_spec(info.name.replace("tf", "tensorflow")) is None:
            continue
        module = importlib.import_module(f"dali_patches.{info.name}")
        names = getattr(module, "__all__", None)
        assert names is not None, f"{info.name} has no __all__"
        assert list(names) == sorted(names), info.name
        for name in names:
            assert hasattr(module, name), f"{info.name}.{name}"


def test_core_imports_without_torch_cupy_or_tensorflow() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'cupy', 'tensorflow'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dali_patches, dali_patches.cli, dali_patches.commands, dali_patches.figures\n"
        "from dali_patches.backend import resolve_backend\n"
        "assert resolve_backend('auto').device.value == 'cpu'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


FLOW = ["options", "config", "backend", "sources", "storage", "headers", "columns", "index", "catalog", "decode", "verify", "feeder", "gather", "cache", "anchors", "draw",
        "augment", "outputs", "rounds", "pace", "producer", "provenance", "pipeline", "sampler", "torch", "tf", "review", "figures",
        "synth", "commands", "cli"]


def test_imports_follow_the_flow() -> None:
    """A module imports only from modules earlier in the data flow (the README's "How it works")."""
    package = Path(dali_patches.__file__).parent
    assert {p.stem for p in package.glob("*.py")} - {"__init__"} == set(FLOW)
    for name in FLOW:
        text = (package / f"{name}.py").read_text()
        for dep in re.findall(r"^\s*from \.(\w+) import", text, re.MULTILINE):
            assert FLOW.index(dep) < FLOW.index(name), f"{name} imports {dep}, which comes later in the flow"
