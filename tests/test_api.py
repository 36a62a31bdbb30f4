import subprocess
import sys

import dali_patches


def test_all_is_sorted_and_importable() -> None:
    assert list(dali_patches.__all__) == sorted(dali_patches.__all__)
    for name in dali_patches.__all__:
        assert hasattr(dali_patches, name), name


def test_core_imports_without_torch_cupy_or_tensorflow() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'cupy', 'tensorflow'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dali_patches, dali_patches.cli\n"
        "from dali_patches.backend import resolve_backend\n"
        "assert resolve_backend('auto').device.value == 'cpu'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
