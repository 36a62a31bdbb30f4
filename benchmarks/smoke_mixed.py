"""Decode one small JPEG with DALI's mixed (nvJPEG) decoder on GPU 0: nvJPEG and nvImageCodec load only
when such a decoder is built, so a missing or mismatched library shows here, before any measurement.
Used by benchmarks/gpu.sh."""

import io

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

buffer = io.BytesIO()
Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, "JPEG")


@pipeline_def(batch_size=1, num_threads=1, device_id=0)
def one():  # a DALI graph
    encoded = fn.external_source(source=lambda: [np.frombuffer(buffer.getvalue(), np.uint8)])
    return fn.decoders.image(encoded, device="mixed", output_type=types.RGB)


pipe = one()
pipe.build()
(out,) = pipe.run()
print(np.asarray(out.as_cpu().as_tensor()).shape)
