import importlib
import pkgutil
import subprocess
import sys

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
