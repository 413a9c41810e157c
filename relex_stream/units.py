"""Parsing of human-written values: sizes, step lists, targets, counts, durations, windows.

Every value is untrusted, so each parser is strict: ASCII digits only (Python's int(), float()
and regex \\d also take Arabic-Indic or fullwidth digits), no underscores, no NaN or infinity,
and every number bounded so that nothing later overflows a C type or expands into billions of
items. Each refusal is a RelexError that names the flag and shows a valid example.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from .errors import RelexError

MAX_BYTES = 2**50  # 1 PiB: far above any memory budget or shard, far below int64
MAX_STEP = 2**53  # steps are also handled as floats; beyond 2**53 they stop being exact
MAX_RANK = 4096  # rank-r projections: far above what a K x K Gram of real runs supports
MAX_LISTED_STEPS = 1_000_000  # a step list that expands further is a typo
MAX_WINDOW = MAX_LISTED_STEPS
MAX_DURATION_S = 7 * 86400.0
_MAX_DIGITS = 30  # longer digit strings are refused before int() sees them

_SPACE = " \t"  # what may surround a value or a comma-separated part
_UINT = r"[0-9]+"
_DECIMAL = r"[0-9]+(?:\.[0-9]+)?"
_SIZE_RE = re.compile(rf"({_DECIMAL})[ \t]*(?:([kmgtp])(i?)b?|(b)?)", re.IGNORECASE | re.ASCII)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_STEP_PART_RE = re.compile(rf"({_UINT})(?:-({_UINT})(?::({_UINT}))?)?")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_DURATION_RE = re.compile(rf"({_DECIMAL})[ \t]*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# The default --max-memory. On the benches here 4G ran at most 4% faster than 2G (Qwen2.5-1.5B
# shapes, K = 8) and no faster on the 100M model at K = 30, dense or realistic, while 2G holds
# ~1.2 GiB less (bench/RESULTS.md): past a ring of a few chunks, more budget only keeps more
# deltas between the passes, and the store serves a second pass nearly as cheaply.
DEFAULT_MAX_MEMORY = "2G"


def _parts(text: str) -> list[str]:
    """Comma-separated parts with ASCII blanks stripped; an empty part is kept (and refused)."""
    return [part.strip(_SPACE) for part in text.split(",")]


def _digits(text: str, what: str, example: str) -> int:
    """An int from an ASCII digit string already matched by a regex, refusing absurd lengths."""
    if len(text) > _MAX_DIGITS:
        raise RelexError(f"{what}: the number {text[:12]}... is far too large; e.g. {example}")
    return int(text)


def parse_bytes(text: str | int, flag: str = "size") -> int:
    """Bytes from '4G', '512M', '1.5GiB' or a plain integer (binary units: 1G = 2**30).

    More than 0 and at most MAX_BYTES (1 PiB). A fraction of a byte is rounded down.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise RelexError(f"{flag} must be a size like 4G, not {type(text).__name__}")
    if isinstance(text, int):
        return _check_bytes(Fraction(text), str(text), flag)
    match = _SIZE_RE.fullmatch(text.strip(_SPACE))
    if not match or len(match.group(1)) > _MAX_DIGITS:
        raise RelexError(f"cannot read {flag} {text!r}: write it like 4G, 512M or 1.5GiB")
    number, prefix, _, _ = match.groups()
    value = Fraction(number) * 1024 ** _POWERS[(prefix or "").lower()]
    return _check_bytes(value, text, flag)


def _check_bytes(value: Fraction, text: str, flag: str) -> int:
    """Bound a byte count: at least one byte, at most MAX_BYTES."""
    if value > MAX_BYTES:
        raise RelexError(f"{flag} {text!r} is more than 1 PiB; give a size like 4G")
    if value < 1:
        raise RelexError(f"{flag} {text!r} must be at least one byte; give a size like 4G")
    return math.floor(value)


def format_bytes(n_bytes: float) -> str:
    """'1.5 GiB' style rendering of a byte count."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StepSelection:
    """Which observed steps --steps keeps: any inside a range, and each listed step exactly."""

    ranges: tuple[tuple[int, int, int], ...]  # (low, high, stride), inclusive
    exact: tuple[int, ...]
    text: str

    def count(self) -> int:
        """An upper bound on how many steps listed() returns, computed without expanding."""
        return len(self.exact) + sum(
            (high - low) // stride + 1 for low, high, stride in self.ranges
        )

    def listed(self) -> list[int]:
        """Every step the text names, ranges expanded: what synth writes.

        Refused when that would be more than MAX_LISTED_STEPS steps: as a filter on observed
        steps a wide range is fine, but expanding '1-99999999999' would exhaust memory.
        """
        if self.count() > MAX_LISTED_STEPS:
            raise RelexError(
                f"steps {self.text!r} name more than {MAX_LISTED_STEPS} steps; "
                "use a stride, e.g. 10-80:10"
            )
        expanded = [s for low, high, stride in self.ranges for s in range(low, high + 1, stride)]
        return sorted(set(expanded) | set(self.exact))

    def keeps(self, step: int) -> bool:
        return step in self.exact or any(
            low <= step <= high and (step - low) % stride == 0 for low, high, stride in self.ranges
        )


def parse_step(text: str, flag: str = "step") -> int:
    """One step number: ASCII digits, 0..MAX_STEP (for e.g. --ckpt STEP=PATH)."""
    if not isinstance(text, str) or not re.fullmatch(_UINT, text.strip(_SPACE)):
        raise RelexError(f"{flag} {text!r} is not a step number; give one like 100")
    return _check_step(_digits(text.strip(_SPACE), flag, "100"), flag)


def _check_step(step: int, flag: str) -> int:
    if step > MAX_STEP:
        raise RelexError(f"{flag}: step {step} is beyond 2**53; give a realistic step number")
    return step


def parse_step_selection(text: str) -> StepSelection:
    """'1-75', '10-80:10', '10,20,40' or a mix, as a filter on observed steps."""
    if not isinstance(text, str):
        raise RelexError("--steps must be text like 1-75, 10-80:10 or 10,20,40")
    ranges, exact = [], []
    for part in _parts(text):
        match = _STEP_PART_RE.fullmatch(part)
        if not match:
            raise RelexError(
                f"cannot read steps {text!r}: use ranges and lists like 1-75, 10-80:10 or 10,20,40"
            )
        first, last, stride = (
            None if g is None else _check_step(_digits(g, "--steps", "1-75"), "--steps")
            for g in match.groups()
        )
        if last is None:
            exact.append(first)
        elif last < first or stride == 0:
            raise RelexError(f"step range {part!r} is empty: write it as LOW-HIGH[:STRIDE]")
        else:
            ranges.append((first, last, stride or 1))
    return StepSelection(tuple(ranges), tuple(exact), text)


def parse_steps(text: str) -> list[int]:
    """Step numbers from '1-75' (inclusive), '10-80:10' (stride) and comma lists of those."""
    return parse_step_selection(text).listed()


def parse_float(text: str, flag: str, limit: float = float(MAX_STEP)) -> float:
    """A finite decimal number within ±limit: '500', '512.5', '-3', '1e3'.

    Refuses what Python's float() accepts beyond that: 'nan', 'inf', '1_000', non-ASCII digits,
    and literals that overflow ('1e999').
    """
    part = text.strip(_SPACE)
    if not _FLOAT_RE.fullmatch(part):
        raise RelexError(f"{flag} {text!r} is not a number; give one like 500 or 512.5")
    # compared as written, before rounding: '9007199254740993' is 2**53 as a float, and a run
    # wrote step-9007199254740992 for it
    if not abs(Decimal(part)) <= Decimal(limit):
        raise RelexError(f"{flag} {text!r} is out of range (at most {limit:.17g} in size)")
    return float(part)


def parse_targets(text: str) -> list[float]:
    """Target steps from '500' or '500,750,1000': finite, within ±2**53, no empty parts."""
    if not isinstance(text, str):
        raise RelexError("--target must be text like 500 or 500,750,1000")
    targets = []
    for part in _parts(text):
        if not _FLOAT_RE.fullmatch(part):
            raise RelexError(
                f"--target {text!r} is not a number: give steps like 500 or 500,750,1000"
            )
        targets.append(parse_float(part, "--target"))
    return targets


def parse_positive_int(text: str | int, flag: str, maximum: int) -> int:
    """An integer in 1..maximum from ASCII digits (or an int, not a bool)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and re.fullmatch(_UINT, text.strip(_SPACE)):
        value = _digits(text.strip(_SPACE), flag, "4")
    else:
        raise RelexError(f"{flag} {text!r} is not a whole number; give one like 4")
    if not 1 <= value <= maximum:
        raise RelexError(f"{flag} {text!r} must be between 1 and {maximum}")
    return value


def parse_count(text: str | int, flag: str, maximum: int) -> int:
    """An integer in 0..maximum from ASCII digits (0 allowed, unlike parse_positive_int)."""
    if isinstance(text, str) and text.strip(_SPACE) in ("0", "00"):
        return 0
    if isinstance(text, int) and not isinstance(text, bool) and text == 0:
        return 0
    return parse_positive_int(text, flag, maximum)


def parse_duration(
    text: str, flag: str, maximum: float = MAX_DURATION_S, minimum: float = 0.0,
    zero: bool = False,
) -> float:
    """Seconds from '30s', '2m', '1h', '500ms', '1.5s' or a bare number of seconds.

    At least `minimum` (and more than 0) and at most `maximum` (a week by default); with
    `zero`, a zero in any spelling ('0', '0s', '0.0ms') is also accepted.
    """
    match = _DURATION_RE.fullmatch(text.strip(_SPACE)) if isinstance(text, str) else None
    if not match or len(match.group(1)) > _MAX_DIGITS:
        raise RelexError(f"{flag} {text!r} is not a duration; give one like 30s, 2m, 1h or 500ms")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if zero and seconds == 0:
        return 0.0
    if not (0 < seconds and minimum <= seconds <= maximum):
        lowest = f"at least {minimum:g}" if minimum > 0 else "more than 0"
        raise RelexError(
            f"{flag} {text!r} must be {lowest}{' (or 0)' if zero else ''} and at most "
            f"{maximum:g} seconds; e.g. 30s"
        )
    return seconds


def parse_windows(text: str | None, flag: str = "--window") -> list[int | None]:
    """'10,20,all' -> [10, 20, None]: window sizes (last N observed steps), None for all.

    Each size is at least 2 and at most MAX_WINDOW; no size (nor 'all') may repeat. A text of
    None (the flag not given) means all steps: [None].
    """
    if text is None:
        return [None]
    windows: list[int | None] = []
    for part in _parts(text):
        if part == "all":
            window = None
        elif re.fullmatch(_UINT, part):
            window = _digits(part, flag, "10,20,all")
            if not 2 <= window <= MAX_WINDOW:
                raise RelexError(
                    f"{flag} {text!r}: a window of {part} steps is not between 2 and {MAX_WINDOW}"
                )
        else:
            raise RelexError(f"{flag} {text!r}: give step counts like 10 or 10,20,all")
        if window in windows:
            raise RelexError(f"{flag} {text!r} names {part} twice; give each window once")
        windows.append(window)
    return windows


def step_label(step: float) -> str:
    """'500' for 500.0, '512.5' for 512.5: how a step appears in directory names."""
    return str(int(step)) if float(step).is_integer() else repr(float(step))


def argtype(parse: Callable[..., object], flag: str, *args: object) -> Callable[[str], object]:
    """An argparse `type` from one of these parsers (its RelexError becomes argparse's error)."""
    import argparse

    def convert(text: str) -> object:
        try:
            return parse(text, flag, *args)
        except RelexError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert
