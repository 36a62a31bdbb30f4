"""Tar shards (WebDataset layout), local and on an S3 server started here: items are keys, decoded
straight from their members' byte ranges; exact patches, distinct items, aligned companions, bad
members and truncated shards skipped and reported, resume bit for bit, shards split among ranks."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.catalog.catalog import Catalog, CatalogWarning
from dali_patches.cli.main import main
from dali_patches.cli.synth import synthetic_image
from dali_patches.engine.backend import resolve_backend
from dali_patches.engine.decode import DecodeStage
from dali_patches.sources import TarShards, item_bytes, open_source

from .conftest import coordinate_image, label_mask, reference_decode

P = 16


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.squeeze()).save(out, "PNG")
    return out.getvalue()


def _jpeg(array: np.ndarray, progressive: bool = False) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=90, progressive=progressive)
    return out.getvalue()


def write_shards(folder: Path, count: int, per_shard: int, seed: int = 0, companions: bool = True) -> dict[str, bytes]:
    """``count`` items in shards of ``per_shard``: ``KEY.jpg`` (or ``.png``: coordinate images),
    with ``KEY.mask.png`` (a label mask) and ``KEY.lr.png`` (the exact 2× decimation of a PNG image,
    or of a decoded JPEG's pixels as Pillow sees them) when ``companions``, and a ``KEY.cls`` label.
    Returns every member's bytes by ``shard#member``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    for start in range(0, count, per_shard):
        shard = folder / f"shard-{start // per_shard:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(start, min(count, start + per_shard)):
                key = f"sample{i:05d}"
                h, w = int(rng.integers(20, 45)) * 2, int(rng.integers(20, 45)) * 2
                if i % 3 == 0:
                    image, ext = synthetic_image(h, w, rng), "jpg"
                    data = {f"{key}.jpg": _jpeg(image, progressive=i % 2 == 1)}
                    image = np.asarray(Image.open(io.BytesIO(data[f"{key}.jpg"])).convert("RGB"))
                else:
                    image, ext = coordinate_image(h, w), "png"
                    data = {f"{key}.png": _png(image)}
                if companions:
                    data[f"{key}.mask.png"] = _png(label_mask(h, w))
                    data[f"{key}.lr.png"] = _png(np.ascontiguousarray(image[::2, ::2]))
                data[f"{key}.cls"] = str(i % 7).encode()
                for name, payload in data.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                    members[f"{shard}#{name}"] = payload
                assert ext
    return members


def _extracted(members: dict[str, bytes], folder: Path) -> dict[str, str]:
    """Each member's bytes as a file (for reference decodes with the sampler's own decoder)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (location, payload) in enumerate(members.items()):
        path = folder / f"{i:05d}_{location.rpartition('#')[2]}"
        path.write_bytes(payload)
        out[location] = str(path)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("tars") / "shards"
    return folder, write_shards(folder, 30, 8)


def test_shards_serve_exact_patches_of_distinct_items_with_aligned_companions(
        device: str, shards: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    folder, members = shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .cls labels are counted, not warned about
        sampler = PatchSampler(folder, patch_size=P, batch_size=6, reuse=4, cache_images=12, seed=3, device=device,
                               index=False, companions={"mask": {"kind": "mask"}, "lr": {"scale": 0.5}})
    with sampler:
        assert isinstance(sampler.catalog.source, TarShards)
        assert len(sampler.files) == 30 and all(".tar#sample" in f for f in sampler.files)
        assert sampler.catalog.scan_report["ignored"] == {".cls": 30}
        files = _extracted(members, tmp_path / "x")
        ref = reference_decode([files[f] for f in sampler.files], "cpu" if device == "sim" else device)
        masks = reference_decode([files[m] for m in sampler.catalog.companions["mask"]],
                                 "cpu" if device == "sim" else device, channels=1)
        for _ in range(12):
            batch = next(sampler)
            sources = batch.source.tolist()
            assert len(set(sources)) == len(sources)
            patches = np.asarray(batch.patches.get() if hasattr(batch.patches, "get") else batch.patches)
            mask = np.asarray(batch.companions["mask"].get() if hasattr(batch.companions["mask"], "get")
                              else batch.companions["mask"])
            lr = np.asarray(batch.companions["lr"].get() if hasattr(batch.companions["lr"], "get")
                            else batch.companions["lr"])
            for j, s in enumerate(sources):
                y, x = batch.anchor[j].tolist()
                image = ref[files[sampler.files[s]]]
                assert np.array_equal(patches[j], image[y:y + P, x:x + P])
                assert np.array_equal(mask[j], masks[files[sampler.catalog.companions["mask"][s]]][y:y + P, x:x + P])
                if sampler.files[s].endswith(".png"):  # lossless: the LR member is the decimated image
                    assert np.array_equal(lr[j], image[y:y + P:2, x:x + P:2])
        source = sampler.catalog.source
        assert isinstance(source, TarShards) and source.bytes_read > 0


def test_a_corrupt_member_and_a_truncated_shard_are_skipped_and_reported(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    members = write_shards(folder, 24, 8, seed=4, companions=False)
    # a member whose pixels are damaged behind an intact header (found only by decoding it) ...
    bad = next(loc for loc in members if loc.endswith("sample00004.png"))
    shard, _, name = bad.partition("#")
    payload = bytearray(members[bad])
    payload[60:-20] = bytes(len(payload) - 80)  # zeroed compressed data: the decoder rejects it
    with tarfile.open(shard) as old:
        items = {m.name: (m, old.extractfile(m).read()) for m in old}  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for member_name, (info, data) in items.items():
            data = bytes(payload) if member_name == name else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # ... and the last shard cut in the middle of its third image
    last = folder / "shard-000002.tar"
    with tarfile.open(last) as tar:
        third = [m for m in tar if m.name.endswith((".jpg", ".png"))][2]
    with open(last, "r+b") as f:
        f.truncate(third.offset_data + third.size // 2)
    with pytest.warns(CatalogWarning, match="skipped 1 of"):
        sampler = PatchSampler(folder, patch_size=P, batch_size=4, reuse=2, cache_images=6, seed=1, device="cpu",
                               index=False)
    with sampler:
        kinds = {loc.rpartition("#")[2]: r.kind for loc, r in sampler.catalog.skipped}
        assert kinds == {third.name: "truncated"}
        assert "cut short" in dict(sampler.catalog.skipped)[f"{last}#{third.name}"]
        for _ in range(40):  # two reader epochs of the 18 usable items: the damaged one is met
            batch = next(sampler)
            assert bad not in [sampler.files[s] for s in batch.source.tolist()]
        stats = sampler.stats()
        assert [f for f, _ in stats["broken_files"]] == [bad]
        assert "rejects it" in stats["broken_files"][0][1]


def test_resume_from_shards_is_bit_identical(shards: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = shards
    options = {"patch_size": P, "batch_size": 5, "reuse": 3, "cache_images": 10, "seed": 9, "device": "cpu",
               "index": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        with PatchSampler(folder, **options) as a:
            for _ in range(7):
                next(a)
            state = a.state_dict()
            expected = [next(a) for _ in range(9)]
            expected = [(b.source.copy(), b.anchor.copy(), np.array(b.patches)) for b in expected]
        with PatchSampler(folder, **options) as b:
            b.load_state_dict(state)
            for source, anchor, patches in expected:
                got = next(b)
                assert np.array_equal(got.source, source) and np.array_equal(got.anchor, anchor)
                assert np.array_equal(got.patches, patches)


def test_shards_are_split_among_ranks_whole_and_cover_the_epoch(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_shards(folder, 36, 6, seed=2, companions=False)  # 6 shards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        catalog = Catalog.scan(folder, index=False)
    backend = resolve_backend("cpu")
    seen = []
    for rank in range(2):
        assert catalog.source is not None
        stage = DecodeStage(catalog.source, list(catalog.files), backend, batch_size=4, num_threads=1, seed=5,
                            shard_id=rank, num_shards=2)
        assert stage.shard_size == 18
        seen.append({catalog.files[stage.next()[0]] for _ in range(stage.shard_size)})
        stage.close()
    assert len(seen[0]) == len(seen[1]) == 18 and not seen[0] & seen[1]
    shards_of = [{f.partition("#")[0] for f in part} for part in seen]
    assert len(shards_of[0]) == len(shards_of[1]) == 3 and not shards_of[0] & shards_of[1]  # whole shards each


def test_listing_reports_unpaired_and_duplicate_members_and_keeps_member_tables(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {"a.png": _png(synthetic_image(40, 40, rng)), "a.mask.png": _png(label_mask(40, 40)),
            "b.jpg": _jpeg(synthetic_image(40, 40, rng)),  # no mask: "no partner"
            "c.mask.png": _png(label_mask(40, 40)),  # no image: "orphan companion"
            "d.png": _png(synthetic_image(40, 40, rng)), "d.mask.png": _png(label_mask(40, 40))}
    for shard, names in (("shard-0.tar", ["a.png", "a.mask.png", "b.jpg", "c.mask.png"]),
                         ("shard-1.tar", ["d.png", "d.mask.png", "a.png"])):  # "a" again: "duplicate key"
        with tarfile.open(folder / shard, "w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(rows[name])
                tar.addfile(info, io.BytesIO(rows[name]))
    source = open_source(str(folder / "*.tar"), {"mask": {"kind": "mask"}})
    catalog = Catalog.scan(source, index=False, check=False)
    assert [f.rpartition("#")[2] for f in catalog.files] == ["a.png", "d.png"]
    kinds = sorted((loc.rpartition("/")[2], r.kind) for loc, r in catalog.skipped)
    assert kinds == [("shard-0.tar#b.jpg", "no partner"), ("shard-0.tar#c.mask.png", "orphan companion"),
                     ("shard-1.tar#a.png", "duplicate key")]
    assert item_bytes(catalog.files[1]) == rows["d.png"]

    def no_tar_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the member tables of unchanged shards come from the cache folder")

    monkeypatch.setattr("dali_patches.sources.tar.tarfile.open", no_tar_reading)
    again = Catalog.scan(open_source(folder, {"mask": {"kind": "mask"}}), index=False, check=False)
    assert again.files == catalog.files


def test_shard_sources_are_recognised_and_bad_ones_refused(tmp_path: Path, shards: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = shards
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    for spec in (folder, str(folder / "*.tar"), tars, tars[0]):
        assert isinstance(open_source(spec), TarShards)
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) do not exist"):
        open_source([*tars, str(folder / "missing.tar")])
    with pytest.raises(FileNotFoundError, match="names no shards"):
        open_source(str(tmp_path / "nothing-*.tar"))


def test_inspect_reports_shards(shards: tuple[Path, dict[str, bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = shards
    assert main(["inspect", str(folder), "--patch", str(P), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"images": 30' in out


# -- on an S3 server -----------------------------------------------------------------------------
def test_shards_in_object_storage_serve_the_same_patches(s3_server: str, monkeypatch: pytest.MonkeyPatch,
                                                         shards: tuple[Path, dict[str, bytes]]) -> None:
    boto3 = pytest.importorskip("boto3", reason="object storage needs boto3 (pip install 'dali-patches[s3]')")
    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    folder, _ = shards
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="shards")
    for path in sorted(folder.glob("*.tar")):
        client.upload_file(str(path), "shards", f"train/{path.name}")
    options = {"patch_size": P, "batch_size": 6, "reuse": 4, "cache_images": 12, "seed": 3, "device": "cpu",
               "index": False, "companions": {"mask": {"kind": "mask"}, "lr": {"scale": 0.5}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        remote = PatchSampler("s3://shards/train/*.tar", **options)
        local = PatchSampler(folder, **options)
    with remote, local:
        assert [f.rpartition("/")[2] for f in remote.files] == [f.rpartition("/")[2] for f in local.files]
        for _ in range(8):
            a, b = next(remote), next(local)
            assert np.array_equal(a.source, b.source) and np.array_equal(a.anchor, b.anchor)
            assert np.array_equal(a.patches, b.patches)
            assert np.array_equal(a.companions["mask"], b.companions["mask"])
        source = remote.catalog.source
        assert isinstance(source, TarShards) and source.bytes_read > 0


def test_provenance_names_shard_and_member_and_the_coverage_figure_draws_them(
        shards: tuple[Path, dict[str, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    from dali_patches import review
    from dali_patches.review.figures import coverage_figure

    folder, _ = shards
    log = tmp_path / "run.prov"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        with PatchSampler(folder, patch_size=P, batch_size=4, reuse=2, cache_images=8, seed=0, device="cpu",
                          index=False, provenance=log) as sampler:
            batches = [next(sampler) for _ in range(6)]
    run = review.load(log)
    assert all(".tar#sample" in f for f in run.files)
    assert [run.files[s] for s in run.source[:4].tolist()] == [sampler.files[s] for s in batches[0].source.tolist()]
    with caplog.at_level("WARNING"):
        stats = coverage_figure(run, tmp_path / "coverage.png", images=2, dpi=40)
    assert stats["shown"] and "without its image" not in caplog.text
