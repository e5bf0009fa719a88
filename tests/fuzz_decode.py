"""atheris fuzz target for the image decode path: any bytes must give a prepared tensor or a
ServiceError (a 4xx for the client), never another exception.

    .venv/bin/python tests/fuzz_decode.py tests/data/corpus -max_total_time=600   # make fuzz
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from service.errors import ServiceError
    from service.imaging import DecodeLimits, configure_decoding, prepare_image
    from service.spec import InputSpec

SPECS = [
    InputSpec(channels=1, height=28, width=28, mean=[0.13], std=[0.31], channel_order="L",
              invert="auto"),
    InputSpec(channels=3, height=224, width=224, mean=[0.485, 0.456, 0.406],
              std=[0.229, 0.224, 0.225], resize="center_crop", resize_size=256),
]  # fmt: skip
LIMITS = DecodeLimits(4_000_000)


def test_one_input(data: bytes) -> None:
    spec = SPECS[data[0] % 2] if data else SPECS[0]
    try:
        prepared = prepare_image(data, spec, LIMITS, keep_display=bool(data[-1:] == b"\x01"))
    except ServiceError:
        return
    assert prepared.array.shape == (spec.channels, spec.height, spec.width)
    assert prepared.array.dtype.name == "float32"


if __name__ == "__main__":
    configure_decoding(LIMITS.max_pixels)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
