"""Parsing of human-written sizes and step lists ("4G", "1-75", "10,20,40", "10-80:10")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RelexError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_bytes(text: str | int) -> int:
    """Bytes from '4G', '512M', '1.5GiB' or a plain integer (binary units: 1G = 2**30)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise RelexError(f"cannot read size {text!r}: write it like 4G, 512M or 1.5GiB")
    number, prefix, _ = match.groups()
    return int(float(number) * 1024 ** _POWERS[prefix.lower()])


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

    def listed(self) -> list[int]:
        """Every step the text names, ranges expanded: what synth writes."""
        expanded = [s for low, high, stride in self.ranges for s in range(low, high + 1, stride)]
        return sorted(set(expanded) | set(self.exact))

    def keeps(self, step: int) -> bool:
        return step in self.exact or any(
            low <= step <= high and (step - low) % stride == 0 for low, high, stride in self.ranges
        )


def parse_step_selection(text: str) -> StepSelection:
    """'1-75', '10-80:10', '10,20,40' or a mix, as a filter on observed steps."""
    ranges, exact = [], []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not match:
            raise RelexError(
                f"cannot read steps {text!r}: use ranges and lists like 1-75, 10-80:10 or 10,20,40"
            )
        first, last, stride = match.groups()
        if last is None:
            exact.append(int(first))
        elif int(last) < int(first) or (stride is not None and int(stride) == 0):
            raise RelexError(f"step range {part!r} is empty: write it as LOW-HIGH[:STRIDE]")
        else:
            ranges.append((int(first), int(last), int(stride or 1)))
    return StepSelection(tuple(ranges), tuple(exact), text)


def parse_steps(text: str) -> list[int]:
    """Step numbers from '1-75' (inclusive), '10-80:10' (stride) and comma lists of those."""
    return parse_step_selection(text).listed()


def parse_targets(text: str) -> list[float]:
    """Target steps from '500' or '500,750,1000'."""
    targets = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise RelexError(
                f"--target {text!r} is not a number: give steps like 500 or 500,750,1000"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise RelexError(f"--target {text!r} must be a finite step number")
        targets.append(value)
    return targets


def step_label(step: float) -> str:
    """'500' for 500.0, '512.5' for 512.5: how a step appears in directory names."""
    return str(int(step)) if float(step).is_integer() else repr(float(step))
