"""The read ring hands out non-overlapping buffers whatever the order of frees."""

from __future__ import annotations

import random

from relex_stream.reader import Ring


def _span(ring: Ring, view) -> tuple[int, int]:
    start = view.__array_interface__["data"][0] - ring._array.__array_interface__["data"][0]
    return start, start + view.nbytes


def test_allocations_never_overlap_live_ones() -> None:
    ring = Ring(64 * 100)
    rng = random.Random(1)
    live: list[tuple[int, tuple[int, int]]] = []
    wrapped = 0
    for _ in range(20000):
        if live and (rng.random() < 0.5 or len(live) > 5):
            token, _ = live.pop(0 if rng.random() < 0.8 else rng.randrange(len(live)))
            ring.free(token)
            continue
        size = rng.randrange(1, 40) * 64
        with ring._cond:
            if ring._fits(size) is None:
                continue
        token, view = ring.allocate(size)
        span = _span(ring, view)
        assert all(not (span[0] < b and a < span[1]) for _, (a, b) in live), (span, live)
        wrapped += bool(live) and span[0] < live[-1][1][0]
        live.append((token, span))
    assert wrapped > 100, "test bug: the ring never wrapped around"


def test_a_full_ring_after_wrapping_has_no_room() -> None:
    ring = Ring(6400)
    a, _ = ring.allocate(3840)
    b, _ = ring.allocate(2560)  # fills [3840, 6400)
    ring.free(a)
    c, view = ring.allocate(3840)  # wraps to [0, 3840): now full
    assert _span(ring, view) == (0, 3840)
    with ring._cond:
        assert ring._fits(64) is None  # the bug this guards: [3840, 6400) offered again
    ring.free(b)
    ring.free(c)
