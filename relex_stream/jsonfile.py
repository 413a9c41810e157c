"""Strict reading of small JSON inputs (config.json, the safetensors index, safetensors headers).

Every input is untrusted. Python's `json` module is lenient where it matters here: it accepts
NaN and Infinity, keeps the last of duplicate keys, decodes lone surrogates such as "\\ud800",
guesses UTF-16/32 from raw bytes and ends in a RecursionError on deep nesting. `loads_strict`
refuses all of these, the way the safetensors format's own parser (serde_json) does, and
`load_json_object` adds a size limit and one RelexError per problem that names the file.

Encoding: UTF-8 only, without a byte-order mark. Hugging Face writes configs that way, and
transformers itself (`json.loads` of the decoded text) refuses a BOM, so accepting one here
would only move the failure to whoever reads our output.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from .errors import RelexError

MAX_CONFIG_BYTES = 4 * 2**20  # config.json, generation_config.json: kilobytes in practice
MAX_INDEX_BYTES = 64 * 2**20  # model.safetensors.index.json: ~10 MB for the largest models
MAX_DEPTH = 64  # real configs nest < 10 deep; serde_json stops at 128
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; longer integers are no count or size of ours
# Objects and arrays in one text. Each costs Python ~100 bytes and a hook call, so 20 million
# `{}` in a 60 MB file took 98 s and 3.2 GB; a safetensors header needs 3 per tensor, a store's
# manifest about as many: a million is room for 300,000 tensors in one file.
MAX_CONTAINERS = 1 << 20

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_RISKY_INT = re.compile(rf"-0(?![0-9.eE])|[0-9]{{{MAX_INT_DIGITS + 1}}}")


class JsonProblem(ValueError):
    """Why a JSON text was refused; the caller adds which file it came from."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """object_pairs_hook: a dict, refusing a key given twice (json keeps the last silently)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise JsonProblem(f"has the key {show(duplicate)} twice")
    return obj


def _refuse_constant(name: str) -> object:
    """parse_constant: NaN and Infinity are not JSON; Python's json accepts them by default."""
    raise JsonProblem(f"contains {name}, which is not valid JSON")


def _finite_float(text: str) -> float:
    """parse_float: refuse literals such as 1e999 that overflow to infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise JsonProblem(f"contains the number {text[:40]}, which is out of range")
    return value


def _bounded_int(text: str) -> int | float:
    """parse_int: refuse integers beyond 64 bits; read '-0' as the float -0.0.

    serde_json (the safetensors parser) reads '-0' as a float, so it is never a valid size or
    offset; turning it into the int 0 would let a header through that the format refuses.
    Bounding the digits first also keeps int() from its own ValueError on 4300+ digits.
    """
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonProblem(f"contains the integer {text[:24]}..., which is out of range")
    if text == "-0":
        return -0.0
    return int(text)


def _check_depth(value: object, max_depth: int) -> None:
    """Refuse nesting deeper than max_depth; iterative, over containers only (it is fast)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise JsonProblem(f"is nested more than {max_depth} levels deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _check_surrogates(value: object) -> None:
    """Refuse any key or string holding a lone surrogate (from an escape such as \\ud800)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise JsonProblem("contains an invalid \\u escape (a lone surrogate)")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_strict(text: str, max_depth: int = MAX_DEPTH,
                 max_containers: int = MAX_CONTAINERS) -> object:
    """Parse a JSON text strictly, or raise JsonProblem saying why not.

    Refused beyond standard JSON syntax errors: duplicate keys, NaN/Infinity, numbers out of
    range (floats overflowing to infinity, integers of more than 20 digits), lone surrogate
    escapes, nesting deeper than max_depth, and more than max_containers objects and arrays
    (counted on the raw text before parsing, brackets in strings included: an upper bound).
    """
    if text.count("{") + text.count("[") > max_containers:
        raise JsonProblem(f"holds more than {max_containers:,} objects and arrays")
    if _SURROGATE.search(text):
        raise JsonProblem("contains a lone surrogate character")
    # The hook that reads '-0' and bounds integers costs a Python call per integer; only
    # texts that may hold such a token (judged on the raw text, strings included) pay it.
    risky_ints = _RISKY_INT.search(text) is not None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_pairs,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int if risky_ints else None,
        )
    except JsonProblem:
        raise
    except json.JSONDecodeError as exc:
        raise JsonProblem(f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise JsonProblem(f"is nested more than {max_depth} levels deep") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise JsonProblem(f"cannot be parsed ({type(exc).__name__})") from None
    _check_depth(value, max_depth)
    if _SURROGATE_ESCAPE.search(text):  # only escapes can produce a lone surrogate here
        _check_surrogates(value)
    return value


def show(text: str, limit: int = 60) -> str:
    """A string as it may appear in a one-line message: repr'd, and cut if long."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _read_limited(path: Path, what: str, max_bytes: int) -> bytes:
    """A regular file's bytes, refusing anything over max_bytes without reading all of it."""
    try:
        # O_NONBLOCK: a FIFO planted under a config's name must not hang the run in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise RelexError(
            f"cannot read {what} {path}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RelexError(f"{what} {path} is not a regular file; replace it with the file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise RelexError(
            f"cannot read {what} {path}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise RelexError(
            f"{what} {path} is larger than {max_bytes} bytes, too large for this kind of file; "
            "check that it is the right file"
        )
    return data


def _decode_utf8(data: bytes, path: Path, what: str) -> str:
    """UTF-8 text; a BOM or a UTF-16/32 file gets its own message, since editors produce them."""
    redo = "save it as UTF-8 without a byte-order mark"
    if data.startswith(b"\xef\xbb\xbf"):
        raise RelexError(f"{what} {path} starts with a UTF-8 byte-order mark; {redo}")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4]:
        raise RelexError(f"{what} {path} is UTF-16 or UTF-32 encoded; {redo}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RelexError(
            f"{what} {path} is not UTF-8 (bad byte at offset {exc.start}); {redo}"
        ) from None


def load_json_object(path: Path | str, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """Read a small JSON file whose top level must be an object; RelexError for anything else.

    `what` names the file's role in messages ("config.json", "safetensors index"). Strict in
    the ways loads_strict is, UTF-8 without BOM, and at most max_bytes long.
    """
    path = Path(path)
    text = _decode_utf8(_read_limited(path, what, max_bytes), path, what)
    try:
        value = loads_strict(text)
    except JsonProblem as exc:
        raise RelexError(f"{what} {path} {exc}; fix or re-create the file") from None
    if not isinstance(value, dict):
        raise RelexError(
            f"{what} {path} holds a JSON {_json_type(value)}, not an object ({{...}}); "
            "check that it is the right file"
        )
    return value


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrong_type(path: Path | str, key: str, wanted: str, value: object) -> RelexError:
    return RelexError(
        f"{path}: {show(key)} must be {wanted}, not a JSON {_json_type(value)}; fix the file"
    )


def get_str_map(obj: dict, key: str, path: Path | str) -> dict[str, str]:
    """obj[key], which must be present and an object of string -> string (an index's weight_map)."""
    if key not in obj:
        raise RelexError(f"{path} has no {show(key)}; it is not a complete file, re-create it")
    value = obj[key]
    if not isinstance(value, dict):
        raise _wrong_type(path, key, "an object of names to strings", value)
    for name, item in value.items():
        if not isinstance(item, str):
            raise RelexError(
                f"{path}: {show(key)} maps {show(name)} to a JSON {_json_type(item)}, "
                "not a string; fix the file"
            )
    return value


def get_optional_bool(obj: dict, key: str, path: Path | str) -> bool | None:
    """obj[key] as a bool, or None when absent; null and 1/0 are refused.

    null is refused rather than read as absent because the two differ downstream:
    transformers treats a missing tie_word_embeddings as True but a null one as false.
    """
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, bool):
        raise _wrong_type(path, key, "true or false", value)
    return value


def get_optional_str(obj: dict, key: str, path: Path | str) -> str | None:
    """obj[key] as a str, or None when absent or null (configs write null for 'not set')."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(path, key, "a string", value)
    return value


def get_optional_int(
    obj: dict, key: str, path: Path | str, minimum: int = 0, maximum: int = 2**53
) -> int | None:
    """obj[key] as an int in [minimum, maximum], or None when absent or null; bools refused."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise _wrong_type(path, key, "an integer", value)
    if not minimum <= value <= maximum:
        raise RelexError(
            f"{path}: {show(key)} is {value}, outside {minimum}..{maximum}; fix the file"
        )
    return value
