"""crc32c (zarr's checksum), computed without holding Python's GIL where that is possible.

google-crc32c's extension module keeps the GIL while it sums a buffer: on the drift bench the
store's checksums (every raw chunk and every frame, ~6 GB) held it for ~1.9 s, stalling the
threads that compute Gram blocks at their next Python line. Its wheels ship the C library
itself, and a call through ctypes lets the GIL go: ~6% off that run (bench/RESULTS.md). Where
the library is not found, or does not give the right checksum of a known input, the extension
module is used: same value, with the GIL held.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numcodecs.checksum32 import crc32c_checksum

log = logging.getLogger(__name__)

# buffers smaller than this go to the extension (a ctypes call costs ~1 µs more)
CTYPES_MIN_BYTES = 1 << 16
_CHECK_VALUE = 0xE3069283  # crc32c of b"123456789" (RFC 3720)


def _library_crc32c() -> Callable[[int, int], int] | None:
    """crc32c_value(address, length) from google-crc32c's bundled C library, or None."""
    try:
        import google_crc32c

        package = Path(google_crc32c.__file__).resolve().parent
        found = sorted((package.parent / "google_crc32c.libs").glob("libcrc32c*.so*"))
        if not found:
            return None
        function = ctypes.CDLL(str(found[0])).crc32c_value
        function.restype = ctypes.c_uint32
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        probe = np.frombuffer(b"123456789", dtype=np.uint8)
        if function(probe.ctypes.data, probe.size) != _CHECK_VALUE:
            return None
        return function
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("crc32c through ctypes is not available (%s): the GIL is held", exc)
        return None


_library = _library_crc32c()


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """crc32c of a buffer's bytes (any contiguity: an array is made contiguous first)."""
    if isinstance(data, np.ndarray):
        array = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    else:
        array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if _library is not None and array.size >= CTYPES_MIN_BYTES:
        return int(_library(array.ctypes.data, array.size))
    return int(crc32c_checksum(array))
