"""The DALI decode graphs: a source's reader → ``decoders.image`` for every part of a row (and the
main image's alpha where ``anchors="content"`` needs it), and a one-pass decode of given rows.

:class:`~dali_patches.engine.decode.DecodeStage` runs :func:`decode_pipeline` over the shard, with
recovery; :func:`decode_files` decodes listed rows once (a restored cache, the decoder's verdict on
one item, the content report of ``inspect``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from nvidia.dali import fn, pipeline_def, types

from ..sources.base import Source
from ..sources.feeding import Reader
from .backend import Backend

__all__ = ["DALI_DTYPES", "decode_files", "decode_pipeline"]

DALI_DTYPES = {"uint8": types.UINT8, "uint16": types.UINT16}  # the sampler's dtype names → DALI types


def _decoders(encoded: Sequence[Any], decoder_device: str, exif: bool, parts: Sequence[tuple[int, str]],
              hw_decoder_load: float | None) -> list[Any]:
    """Each encoded part decoded with its ``(channels, dtype)``."""
    # nvJPEG splits a batch between the hardware JPEG engine and CUDA (hw_decoder_load), which may
    # differ pixel for pixel; pinning the share makes a decode reproducible batch for batch.
    split: dict[str, Any] = ({"hw_decoder_load": hw_decoder_load}
                             if hw_decoder_load is not None and decoder_device == "mixed" else {})
    return [fn.decoders.image(data, device=decoder_device, output_type=types.RGB if channels == 3 else types.GRAY,
                              dtype=DALI_DTYPES[dtype], adjust_orientation=exif, name=f"Decoder{k or ''}", **split)
            for k, (data, (channels, dtype)) in enumerate(zip(encoded, parts))]


@pipeline_def(enable_conditionals=False)
def _decode_pipeline(reader: Reader, decoder_device: str, exif: bool = True,
                     parts: Sequence[tuple[int, str]] = ((3, "uint8"),), hw_decoder_load: float | None = None):
    """The reader's encoded parts, each decoded with its ``(channels, dtype)``. Returns
    ``(*images, *labels)``: the labels (catalog rows) of every reader that has its own, so that
    :class:`DecodeStage` can check that the parts stay aligned."""
    encoded, labels = reader.nodes()
    return (*_decoders(encoded, decoder_device, exif, parts, hw_decoder_load), *labels)


@pipeline_def(enable_conditionals=True)
def _decode_alpha_pipeline(reader: Reader, decoder_device: str, exif: bool = True,
                           parts: Sequence[tuple[int, str]] = ((3, "uint8"),), hw_decoder_load: float | None = None):
    """:func:`_decode_pipeline` plus the main image's alpha channel ``(H, W, 1)`` where its bytes have
    one — four channels in the file's header (``peek_image_shape`` keeping them), not a JPEG (a CMYK
    JPEG has four too) — decoded again keeping every channel, which DALI does for RGBA PNG, WebP and
    TIFF; and a ``1 × 1`` opaque stand-in for the others (no second decode). Grey JPEGs never take
    the alpha branch (DALI fails on them kept as they are)."""
    encoded, labels = reader.nodes()
    images = _decoders(encoded, decoder_device, exif, parts, hw_decoder_load)
    dtype = DALI_DTYPES[parts[0][1]]
    channels = fn.peek_image_shape(encoded[0], image_type=types.ANY_DATA)[2]
    if (channels == 4) & (encoded[0][0] != 0xFF):
        alpha = fn.decoders.image(encoded[0], device=decoder_device, output_type=types.ANY_DATA, dtype=dtype,
                                  adjust_orientation=exif, name="DecoderAlpha")[:, :, -1:]
    else:
        opaque = fn.cast(fn.reshape(channels, shape=[1, 1, 1], layout="HWC") * 0 + (65535 if dtype == types.UINT16 else 255),
                         dtype=dtype)
        alpha = opaque.gpu() if decoder_device == "mixed" else opaque
    return (*images, alpha, *labels)


def decode_pipeline(reader: Reader, backend: Backend, batch_size: int, num_threads: int, prefetch: int, seed: int,
                    output: dict[str, Any], alpha: bool = False) -> Any:
    """A built decode pipeline over ``reader`` (``output``: ``exif``, ``parts``, ``hw_decoder_load``;
    ``alpha``: decode the main image's alpha too, as one more output after the parts)."""
    with reader.building():
        define = _decode_alpha_pipeline if alpha else _decode_pipeline
        pipe = define(reader=reader, decoder_device=backend.decoder_device, batch_size=batch_size,
                      num_threads=num_threads, device_id=backend.dali_device_id, prefetch_queue_depth=prefetch,
                      seed=seed, enable_checkpointing=reader.checkpointing, checkpoint=reader.dali_checkpoint,
                      **output)
        pipe.build()
    return pipe


def decode_files(source: Source, columns: Sequence[Sequence[str]], backend: Backend, num_threads: int,
                 batch_size: int = 8, exif: bool = True, parts: Sequence[tuple[int, str]] = ((3, "uint8"),),
                 hw_decoder_load: float | None = None, alpha: bool = False) -> Iterator[list[Any]]:
    """Decode the rows of ``columns`` (main images, then each companion's locations in ``source``) once, in order,
    with the same decoders as :class:`DecodeStage` (``alpha``: as there); yields
    ``[image, *companions]`` of each row (views valid until the next row is taken). Used to refill a
    restored cache with the images it held."""
    if not columns or not columns[0]:
        return
    batch_size = min(batch_size, len(columns[0]))
    reader = source.reader(range(len(columns[0])), columns, shuffle=False, batch_size=batch_size)
    pipe = decode_pipeline(reader, backend, batch_size, num_threads, 1, 0,
                           {"exif": exif, "parts": parts, "hw_decoder_load": hw_decoder_load}, alpha)
    left, n = len(columns[0]), len(columns) + alpha
    while left:
        outputs = pipe.run()
        for i in range(min(left, batch_size)):
            yield [backend.as_array(images[i]) for images in outputs[:n]]
        left -= min(left, batch_size)
