import pytest

from dali_patches.config import Device, SamplerConfig, format_bytes, parse_bytes


@pytest.mark.parametrize(("text", "expected"), [
    (1024, 1024), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)),
    ("800MB", 800 * 10**6), ("64 kib", 64 * 1024), ("123", 123),
])
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["2 parsecs", "GiB", "-1GiB", "", "1e9"])
def test_parse_bytes_rejects_nonsense_and_names_parameter(bad: str) -> None:
    with pytest.raises(ValueError, match="cache_bytes=.*512MiB"):
        parse_bytes(bad)


def test_format_bytes() -> None:
    assert format_bytes(2 * 2**30) == "2.00 GiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(10) == "10 B"


def test_defaults_and_normalisation() -> None:
    cfg = SamplerConfig(patch_size=64, batch_size=8, reuse=4, cache_bytes="1MiB")
    assert cfg.patch_size == (64, 64)
    assert cfg.cache_bytes == 2**20
    assert cfg.device is Device.AUTO
    assert cfg.patch_bytes == 64 * 64 * 3
    with pytest.raises(AttributeError):
        cfg.batch_size = 3  # type: ignore[misc]  # frozen
    assert cfg.hw_decoder_load is None  # DALI's own default
    pinned = SamplerConfig(patch_size=64, batch_size=8, reuse=4, cache_bytes="1MiB", hw_decoder_load=0)
    assert pinned.hw_decoder_load == 0.0 and pinned.stream_fields() == cfg.stream_fields()  # pixels, not the stream


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"patch_size": 0}, "patch_size=0"),
    ({"patch_size": (32, 0)}, r"patch_size=\(32, 0\)"),
    ({"patch_size": (1, 2, 3)}, "patch_size"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"reuse": 0}, "reuse=0"),
    ({"reuse": 0.5}, "reuse=0.5"),
    ({"cache_bytes": None}, "exactly one of cache_bytes and cache_images"),
    ({"cache_images": 4}, "exactly one of cache_bytes and cache_images"),
    ({"cache_bytes": 0}, "cache_bytes=0"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"seed": -1}, "seed=-1"),
    ({"queue_depth": 0}, "queue_depth=0"),
    ({"decode_batch": 0}, "decode_batch=0"),
    ({"shard_id": 2, "num_shards": 2}, "shard_id"),
    ({"hw_decoder_load": 1.5}, "hw_decoder_load=1.5 must be a share between 0 and 1"),
    ({"hw_decoder_load": "half"}, "hw_decoder_load='half'"),
    ({"hw_decoder_load": True}, "hw_decoder_load=True"),
])
def test_nonsense_parameters_fail_with_their_name(kwargs: dict, match: str) -> None:
    base = {"patch_size": 32, "batch_size": 8, "reuse": 4, "cache_bytes": "1MiB"}
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**{**base, **kwargs})


def test_shards_and_device_default_to_the_launchers_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6)
    assert (config.shard_id, config.num_shards, config.device_id) == (3, 4, 1)
    explicit = SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6, shard_id=0, num_shards=1,
                             device_id=0)
    assert (explicit.shard_id, explicit.num_shards, explicit.device_id) == (0, 1, 0)


def test_single_process_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6)
    assert (config.shard_id, config.num_shards, config.device_id) == (0, 1, 0)
    with pytest.raises(ValueError, match="give both shard_id and num_shards"):
        SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6, shard_id=1)


@pytest.mark.parametrize(("options", "message"), [({"channels": 4}, "channels=4 must be 3"),
                                                  ({"dtype": "float32"}, "dtype='float32' must be one of")])
def test_output_format_is_validated(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6, **options)
    assert SamplerConfig(patch_size=8, batch_size=4, reuse=2, cache_bytes=10**6, channels=1,
                         dtype="uint16").patch_bytes == 8 * 8 * 2
