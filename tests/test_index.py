"""The persistent header index: a second start re-stats instead of re-reading, changed files are read
again, a torn or foreign index is rebuilt, concurrent writers never corrupt it, ``trust_index``
skips the stat, and local ranks share the first scan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.catalog.catalog import Catalog, CatalogWarning
from dali_patches.catalog.index import IndexWarning, default_index_path
from dali_patches.cli.synth import synthetic_image
from dali_patches.sources import headers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(synthetic_image(40 + i, 50, rng)).save(data / ("sub" if i % 3 else ".") / f"im_{i:02d}.jpg")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return data


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file whose header is read (not merely stat-ed)."""
    seen: list[str] = []
    real = headers.read_local

    def counting(path: str):
        seen.append(path)
        return real(path)

    monkeypatch.setattr("dali_patches.sources.workers.read_local", counting)
    return seen


def _scan(folder: Path, index: Path, **kwargs: object) -> Catalog:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        return Catalog.scan(folder, min_size=(16, 16), index=index, **kwargs)


def test_second_start_reads_no_header_and_gives_the_same_catalog(folder: Path, tmp_path: Path, reads: list[str]) -> None:
    index = tmp_path / "idx.npz"
    first = _scan(folder, index)
    assert len(reads) == 31 and index.exists()
    reads.clear()
    second = _scan(folder, index)
    assert reads == []
    assert first.files == second.files and first.digest() == second.digest()
    assert (first.heights == second.heights).all() and first.formats == second.formats
    assert [(Path(p).name, r.kind) for p, r in second.skipped] == [("broken.jpg", "truncated")]  # still reported


def test_changed_added_and_removed_files_are_seen(folder: Path, tmp_path: Path, reads: list[str]) -> None:
    index = tmp_path / "idx.npz"
    _scan(folder, index)
    reads.clear()
    Image.fromarray(synthetic_image(90, 91, np.random.default_rng(1))).save(folder / "im_00.jpg")  # changed
    Image.fromarray(synthetic_image(33, 34, np.random.default_rng(2))).save(folder / "new.png")  # added
    (folder / "sub" / "im_01.jpg").unlink()  # removed
    cat = _scan(folder, index)
    assert sorted(Path(p).name for p in reads) == ["im_00.jpg", "new.png"]
    sizes = {Path(f).name: (int(h), int(w)) for f, h, w in zip(cat.files, cat.heights, cat.widths)}
    assert sizes["im_00.jpg"] == (90, 91) and sizes["new.png"] == (33, 34) and "im_01.jpg" not in sizes


def test_a_moved_data_set_keeps_its_digest(folder: Path, tmp_path: Path) -> None:
    before = _scan(folder, tmp_path / "a.npz")
    moved = folder.rename(tmp_path / "elsewhere")
    after = _scan(moved, tmp_path / "b.npz")
    assert before.digest() == after.digest()


def _rewrite(index: Path, change) -> None:
    """Write the index again with ``change(arrays)`` applied: a damaged file that is still a valid zip."""
    with np.load(index) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with open(index, "wb") as f:
        np.savez(f, **arrays)


DAMAGE = {
    "short column": lambda a: a.update(height=a["height"][:-3]),
    "wrong dtype": lambda a: a.update(width=a["width"].astype(np.float64)),
    "false sizes": lambda a: a.update(height=np.where(a["problem"] == b"", -7, a["height"]).astype(np.int32)),
    "unknown problem": lambda a: a.update(problem=np.full_like(a["problem"], b"gremlins")),
    "too many channels": lambda a: a.update(channels=np.full_like(a["channels"], 9)),
    "missing column": lambda a: a.pop("ctime"),
}


@pytest.mark.parametrize("damage", ["torn", "foreign", *DAMAGE])
def test_a_damaged_index_is_rebuilt_with_a_warning(folder: Path, tmp_path: Path, damage: str, reads: list[str]) -> None:
    index = tmp_path / "idx.npz"
    _scan(folder, index)
    if damage == "torn":
        index.write_bytes(index.read_bytes()[:200])
    elif damage == "foreign":
        _scan(tmp_path / "data" / "sub", tmp_path / "other.npz")
        os.replace(tmp_path / "other.npz", index)
    else:
        _rewrite(index, DAMAGE[damage])
    reads.clear()
    with pytest.warns(IndexWarning, match="building a new one"):
        cat = _scan(folder, index)
    assert len(reads) == 31 and len(cat) == 30
    reads.clear()
    _scan(folder, index)
    assert reads == []


def _bmp(path: Path, h: int, w: int, value: int) -> None:
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, "BMP")


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(folder: Path, tmp_path: Path, reads: list[str]) -> None:
    """32x40 and 40x32 uncompressed BMPs have the same byte size; ``touch -d`` puts the mtime back. The
    index keys on the inode's change time too, which no rewrite can set back."""
    image = folder / "same_size.bmp"
    _bmp(image, 32, 40, 10)
    index = tmp_path / "idx.npz"
    first = _scan(folder, index)
    before = os.stat(image)
    _bmp(image, 40, 32, 20)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(image).st_size == before.st_size and os.stat(image).st_mtime_ns == before.st_mtime_ns
    reads.clear()
    again = _scan(folder, index)
    assert reads == [str(image)]
    i, j = first.files.index(str(image)), again.files.index(str(image))
    assert (first.heights[i], first.widths[i]) == (32, 40) and (again.heights[j], again.widths[j]) == (40, 32)


def test_an_entry_decoding_proved_wrong_is_read_again_and_corrected(folder: Path, tmp_path: Path,
                                                                    reads: list[str]) -> None:
    index = tmp_path / "idx.npz"
    first = _scan(folder, index)
    doubted = first.files[4]
    first.distrust([doubted])  # what the sampler does when a file decodes to another size
    assert (tmp_path / "idx.npz.distrust").exists()
    reads.clear()
    _scan(folder, index)
    assert reads == [doubted]  # read again, and the index written without the doubt
    assert not (tmp_path / "idx.npz.distrust").exists()
    reads.clear()
    _scan(folder, index)
    assert reads == []


def test_default_index_lives_in_the_user_cache(folder: Path, reads: list[str]) -> None:
    _scan(folder, None)  # 31 files: below the automatic threshold, no index
    assert not os.path.exists(default_index_path(str(folder)))
    _scan(folder, True)
    assert os.path.exists(default_index_path(str(folder)))
    assert default_index_path(str(folder)).startswith(os.environ["XDG_CACHE_HOME"])


def test_an_unwritable_index_warns_and_the_scan_goes_on(folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the index folder should be")
    with pytest.warns(IndexWarning, match="cannot write the catalog index"):
        cat = _scan(folder, blocker / "idx.npz")
    assert len(cat) == 30


def test_trust_index_neither_lists_nor_stats(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             reads: list[str]) -> None:
    index = tmp_path / "idx.npz"
    first = _scan(folder, index)
    reads.clear()
    Image.fromarray(synthetic_image(33, 34, np.random.default_rng(2))).save(folder / "new.png")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("trust_index must not list or stat the data set")

    monkeypatch.setattr("dali_patches.sources.files.pair_sources", refuse)
    monkeypatch.setattr("dali_patches.sources.workers._stat_chunk", refuse)
    trusted = _scan(folder, index, trust_index=True)
    assert reads == [] and trusted.files == first.files  # the new file is not seen: that is the deal


_CHILD = """
import json, sys, warnings
import dali_patches.sources.workers as index
from dali_patches.catalog.catalog import Catalog
seen = []
real = index.read_local
index.read_local = lambda p: (seen.append(p), real(p))[1]
warnings.simplefilter("ignore")
cat = Catalog.scan(sys.argv[1], min_size=(16, 16), index=sys.argv[2])
print(json.dumps({"read": len(seen), "files": list(cat.files), "digest": cat.digest()}))
"""


def _ranks(folder: Path, index: Path, world: int) -> list[dict]:
    runs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(index)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world)})
            for r in range(world)]
    outs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def test_local_ranks_share_the_first_scan(folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx.npz"
    results = _ranks(folder, index, 2)
    assert sum(r["read"] for r in results) == 31  # the data set once, not once per rank
    assert all(r["read"] <= 16 for r in results)
    assert results[0]["files"] == results[1]["files"] and results[0]["digest"] == results[1]["digest"]
    assert [r["read"] for r in _ranks(folder, index, 2)] == [0, 0]  # the merged index serves both


def test_concurrent_writers_leave_a_valid_index(folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx.npz"
    results = _ranks(folder, index, 1) + _ranks(folder, index, 1)  # sequential warm-up, then at once:
    runs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(index)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for _ in range(4)]
    for run in runs:
        run.communicate(timeout=120)
        assert run.returncode == 0
    (folder / "im_00.jpg").touch()
    runs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(index)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for _ in range(4)]
    outs = [json.loads(run.communicate(timeout=120)[0].strip().splitlines()[-1]) for run in runs]
    assert len({o["digest"] for o in outs}) == 1 and results[0]["files"] == outs[0]["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexWarning)  # the index left behind loads cleanly
        _scan(folder, index)
