"""Builders of bad inputs for the data layer's tests: random PNGs, a decompression bomb's
header, tar shards from (name, bytes) members."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import zlib


__all__ = ["png", "bomb_png", "tar_bytes"]


def png(seed: int = 0, size: int = 16) -> bytes:
    from PIL import Image

    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size))
    img.putdata([tuple(rnd.randrange(256) for _ in range(3)) for _ in range(size * size)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
