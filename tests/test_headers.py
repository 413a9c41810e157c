"""safetensors headers: read_header accepts what the format's parser accepts, refuses the rest.

Each hostile header is checked against the installed `safetensors` package too, so a test here
states the official behaviour it relies on. The module is used only through attributes
(`sio.read_header`), so that the regression tests run against older versions of it as well.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import relex_stream.safetensors_io as sio
from relex_stream.errors import RelexError
from tests.fixtures import Spec, build_trajectory
from tests.helpers import run_cli

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def st_bytes(header: str | bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file's bytes: 8-byte little-endian length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def official_accepts(buf: bytes) -> bool:
    """Whether the safetensors package (its Rust parser) accepts these file bytes."""
    try:
        safetensors.deserialize(buf)
    except Exception:  # noqa: BLE001 - SafetensorError, whatever its module path
        return False
    return True


def refused(tmp_path: Path, buf: bytes, official: bool | None = False) -> str:
    """Write buf, assert read_header refuses it with a RelexError naming the file; the message.

    official: what the safetensors package must say about the same bytes (None: not checked).
    """
    if official is not None:
        assert official_accepts(buf) == official, "test bug: the official parser disagrees"
    path = tmp_path / "model.safetensors"
    path.write_bytes(buf)
    with pytest.raises(RelexError) as info:
        sio.read_header(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    return message


def accepted(tmp_path: Path, buf: bytes) -> tuple[dict, int, bytes]:
    """Write buf, which the official parser accepts; read_header must accept it too."""
    assert official_accepts(buf), "test bug: the official parser refuses this"
    path = tmp_path / "model.safetensors"
    path.write_bytes(buf)
    return sio.read_header(path)


# ----------------------------------------------------------------------------- valid files


def test_real_file_round_trip(tmp_path: Path) -> None:
    """A file written by safetensors: same names, dtypes, shapes, offsets as safe_open."""
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.zeros(4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    entries, data_start, raw = sio.read_header(path)
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(entries)
        for name in f.keys():
            view = f.get_slice(name)
            assert entries[name]["dtype"] == view.get_dtype()
            assert list(entries[name]["shape"]) == list(view.get_shape())
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert data_start == 8 + header_len and len(raw) == header_len
    assert "__metadata__" not in entries
    data = path.read_bytes()[data_start:]
    begin, end = entries["b"]["data_offsets"]
    assert data[begin:end] == tensors["b"].numpy().tobytes()


def test_zero_size_tensors_may_share_an_offset(tmp_path: Path) -> None:
    """Zero-size tensors hold no bytes; the format lets several sit at one offset."""
    header = {
        "z1": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "z2": {"dtype": "BF16", "shape": [3, 0], "data_offsets": [0, 0]},
        "a": F32_2,
        "z3": {"dtype": "I8", "shape": [0], "data_offsets": [8, 8]},
    }
    entries, _, _ = accepted(tmp_path, st_bytes(header, b"\0" * 8))
    assert list(entries) == ["z1", "z2", "a", "z3"]


def test_trailing_padding_and_unknown_fields_are_accepted(tmp_path: Path) -> None:
    """Header padded with spaces (as the format allows), an unknown field in an entry (the
    parser ignores it), and a null __metadata__ (the parser reads it as none)."""
    text = '{"__metadata__":null,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[1]}}'
    entries, data_start, raw = accepted(tmp_path, st_bytes(text + " " * 7, b"\0" * 8))
    assert entries == {"a": F32_2}
    assert data_start == 8 + len(text) + 7 and raw.endswith(b" ")


def test_unsupported_but_valid_dtype_is_named(tmp_path: Path) -> None:
    """A valid F8 tensor: refused as unsupported, naming the dtype; not called corrupt."""
    header = {"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    message = refused(tmp_path, st_bytes(header, b"\0" * 4), official=True)
    assert "F8_E4M3" in message and "not supported" in message
    assert "not a valid" not in message


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize(
    "offsets, data_len",
    [
        pytest.param([[0, 8], [16, 24]], 24, id="gap"),
        pytest.param([[0, 8], [0, 8]], 8, id="overlap-identical"),
        pytest.param([[0, 8], [4, 12]], 12, id="overlap-partial"),
        pytest.param([[8, 16], [16, 24]], 24, id="not-from-zero"),
        pytest.param([[0, 8], [8, 16]], 17, id="trailing-bytes"),
        pytest.param([[0, 8], [8, 16]], 15, id="truncated-data"),
    ],
)
def test_offsets_must_tile_the_data(tmp_path: Path, offsets: list, data_len: int) -> None:
    """Sorted by begin, each tensor starts where the previous ended, from 0 to the file's end."""
    header = {
        name: {"dtype": "F32", "shape": [2], "data_offsets": pair}
        for name, pair in zip(("a", "b"), offsets, strict=True)
    }
    refused(tmp_path, st_bytes(header, b"\0" * data_len))


def test_end_before_begin(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}
    refused(tmp_path, st_bytes(header, b"\0" * 8))


# ----------------------------------------------------------------------------- field types


@pytest.mark.parametrize(
    "entry, data_len",
    [
        pytest.param({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}, 8, id="float-dim"),
        pytest.param({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, 8, id="2.0-dim"),
        pytest.param({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, 8, id="bool"),
        pytest.param({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, 8, id="str-shape"),
        pytest.param({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, 8, id="str-dim"),
        pytest.param({"dtype": "F32", "shape": [-2], "data_offsets": [8, 0]}, 8, id="neg-dim"),
        pytest.param({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, 8, id="float-off"),
        pytest.param({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}, 8, id="3-offs"),
        pytest.param({"dtype": "F32", "shape": [2], "data_offsets": "0,8"}, 8, id="str-offs"),
        pytest.param({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, 8, id="list-dt"),
        pytest.param({"dtype": {"a": 1}, "shape": [2], "data_offsets": [0, 8]}, 8, id="dict-dt"),
        pytest.param({"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}, 8, id="lower-dt"),
        pytest.param({"shape": [2], "data_offsets": [0, 8]}, 8, id="no-dtype"),
        pytest.param({"dtype": "F32", "data_offsets": [0, 8]}, 8, id="no-shape"),
        pytest.param({"dtype": "F32", "shape": [2]}, 0, id="no-offsets"),
        pytest.param({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, 8, id="size"),
        pytest.param([0, 8], 8, id="entry-list"),
        pytest.param(["F32", [2], [0, 8]], 8, id="entry-as-array"),
        pytest.param("F32", 0, id="entry-str"),
        pytest.param(None, 0, id="entry-null"),
    ],
)
def test_bad_tensor_entries(tmp_path: Path, entry: object, data_len: int) -> None:
    """Shapes and offsets are lists of non-negative integers (not floats, bools or strings),
    the dtype a string of the format's list; size and offsets agree. An entry written as an
    array [dtype, shape, offsets] passes the parser (serde reads structs from arrays too) but
    is refused here: the specification says an object, and no writer produces arrays."""
    official = isinstance(entry, list) and len(entry) == 3
    refused(tmp_path, st_bytes({"a": entry}, b"\0" * data_len), official=official)


@pytest.mark.parametrize(
    "metadata",
    [{"format": 1}, {"format": None}, {"format": ["pt"]}, ["format"], "pt", 5],
    ids=["int", "null-value", "list-value", "list", "str", "number"],
)
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata: object) -> None:
    refused(tmp_path, st_bytes({"__metadata__": metadata, "a": F32_2}, b"\0" * 8))


def test_unknown_dtype_is_corrupt_not_unsupported(tmp_path: Path) -> None:
    """'F33' is no safetensors dtype: a broken file, not one relex_stream merely lacks."""
    header = {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}
    assert "not a safetensors dtype" in refused(tmp_path, st_bytes(header, b"\0" * 8))


def test_negative_zero_is_no_size(tmp_path: Path) -> None:
    """JSON '-0' is a float to the parser (serde_json), so not a valid dimension."""
    text = '{"a":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}'
    refused(tmp_path, st_bytes(text))


def test_size_overflow_in_parser_order(tmp_path: Path) -> None:
    """The parser multiplies dimensions left to right with overflow checks: [2**40, 2**40, 0]
    overflows before the 0 (refused) although its size is 0."""
    header = {"a": {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}
    refused(tmp_path, st_bytes(header))
    swapped = {"a": {"dtype": "U8", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}
    entries, _, _ = accepted(tmp_path, st_bytes(swapped))
    assert entries["a"]["shape"] == [0, 2**40, 2**40]


# ----------------------------------------------------------------------------- JSON itself


def test_duplicate_tensor_field_is_refused(tmp_path: Path) -> None:
    text = '{"a":{"dtype":"F16","dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    refused(tmp_path, st_bytes(text, b"\0" * 8))


def test_duplicate_tensor_name_is_refused(tmp_path: Path) -> None:
    """The parser keeps the last of two identical entries; a name given twice is refused here
    (deliberately stricter: which one did the writer mean?)."""
    entry = json.dumps(F32_2)
    buf = st_bytes(f'{{"a":{entry},"a":{entry}}}', b"\0" * 8)
    assert "twice" in refused(tmp_path, buf, official=True)


@pytest.mark.parametrize(
    "extra",
    ["NaN", "Infinity", "-Infinity", "1e400", '"\\ud800"', '"\\udc00x"'],
)
def test_non_json_values_in_ignored_fields(tmp_path: Path, extra: str) -> None:
    """Python's json accepts NaN, Infinity, overflowing floats and lone surrogates; the parser
    refuses them even in a field it otherwise ignores."""
    text = f'{{"a":{{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{extra}}}}}'
    refused(tmp_path, st_bytes(text, b"\0" * 8))


def test_lone_surrogate_in_tensor_name(tmp_path: Path) -> None:
    refused(tmp_path, st_bytes('{"\\ud800":' + json.dumps(F32_2) + "}", b"\0" * 8))


def test_deep_nesting_is_refused_without_recursion_error(tmp_path: Path) -> None:
    for depth in (200, 100_000):
        text = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
        text += "[" * depth + "]" * depth + "}}"
        refused(tmp_path, st_bytes(text, b"\0" * 8))


def test_huge_integer_is_refused(tmp_path: Path) -> None:
    """5000 digits: Python's int() raises ValueError past 4300 digits; no traceback here."""
    text = '{"a":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,8]}}'
    refused(tmp_path, st_bytes(text, b"\0" * 8))


def test_header_must_start_with_brace(tmp_path: Path) -> None:
    """The specification says the header MUST begin with '{'; the parser would skip leading
    whitespace, this reader does not (deliberately stricter)."""
    message = refused(tmp_path, st_bytes(" " + json.dumps({"a": F32_2}), b"\0" * 8), official=True)
    assert "'{'" in message


def test_utf16_header_is_refused(tmp_path: Path) -> None:
    """json.loads(bytes) would guess UTF-16; the format is UTF-8 only."""
    raw = json.dumps({"a": F32_2}).encode("utf-16-le")
    refused(tmp_path, st_bytes(raw, b"\0" * 8))


@pytest.mark.parametrize(
    "raw",
    [b"{\xff}", b'{"a\xc0\x80":1}', b"\xef\xbb\xbf{}", b""],
    ids=["bad-byte", "overlong", "bom", "empty"],
)
def test_header_bytes_not_utf8_json(tmp_path: Path, raw: bytes) -> None:
    refused(tmp_path, st_bytes(raw))


@pytest.mark.parametrize("text", ["[]", '"a"', "1", "null", "{} {}", "{}x"])
def test_header_not_one_object(tmp_path: Path, text: str) -> None:
    refused(tmp_path, st_bytes(text))


def test_file_without_tensors_is_refused(tmp_path: Path) -> None:
    """Valid to the format, but nothing to predict: refused with a clear message."""
    message = refused(tmp_path, st_bytes('{"__metadata__":{"format":"pt"}}'), official=True)
    assert "no tensors" in message


def test_empty_tensor_name_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, st_bytes({"": F32_2}, b"\0" * 8), official=True)


# ----------------------------------------------------------------------------- the length prefix


@pytest.mark.parametrize("size", [0, 5])
def test_shorter_than_prefix(tmp_path: Path, size: int) -> None:
    refused(tmp_path, b"\x10" * size)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    refused(tmp_path, st_bytes({"a": F32_2}, b"\0" * 8, length=10_000))


def test_header_length_over_the_limit(tmp_path: Path) -> None:
    """The parser's limit is 100,000,000 bytes (not 100 MiB). A sparse file holds a header
    length one over it, so the check must come before any attempt to read the header."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(8 + 100_000_001 + 8)
    with pytest.raises(RelexError, match="limit"):
        sio.read_header(path)


def test_header_length_2_64_minus_1(tmp_path: Path) -> None:
    refused(tmp_path, b"\xff" * 8 + b"{}")


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.mkdir()
    with pytest.raises(RelexError, match=re.escape(str(path))):
        sio.read_header(path)


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    """A FIFO under a shard's name: refused at once, not an open() blocked forever."""
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            sio.read_header(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the reader so the thread can end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("read_header blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], RelexError), outcome


# ----------------------------------------------------------------------------- the dtype table


def _official_dtype_names() -> list[str]:
    """The dtypes the installed safetensors knows, from its 'unknown variant' message."""
    buf = st_bytes('{"a":{"dtype":"NOPE","shape":[],"data_offsets":[0,0]}}')
    with pytest.raises(Exception) as info:  # noqa: PT011 - SafetensorError
        safetensors.deserialize(buf)
    listed = re.search(r"expected one of (.*?) at line", str(info.value))
    assert listed, f"unexpected message from safetensors: {info.value}"
    return re.findall(r"`([A-Z0-9_]+)`", listed.group(1))


def test_dtype_table_matches_installed_safetensors() -> None:
    """Every dtype the installed parser knows is in FORMAT_DTYPE_BITS and vice versa; if a new
    safetensors adds one, add it with its width in bits."""
    assert sorted(_official_dtype_names()) == sorted(sio.FORMAT_DTYPE_BITS)
    assert set(sio.DTYPES) <= set(sio.FORMAT_DTYPE_BITS)


@pytest.mark.parametrize("dtype", sorted(getattr(sio, "FORMAT_DTYPE_BITS", {})))
def test_dtype_widths_match_the_parser(dtype: str) -> None:
    """8 elements of each dtype take exactly bits bytes: the parser agrees, one less it refuses."""
    nbytes = sio.FORMAT_DTYPE_BITS[dtype]
    for size, ok in ((nbytes, True), (nbytes - 1, False)):
        header = {"a": {"dtype": dtype, "shape": [8], "data_offsets": [0, size]}}
        buf = st_bytes(header, b"\0" * size)
        assert official_accepts(buf) == ok
        raw = json.dumps(header).encode()
        if ok:
            assert sio.parse_header(raw, size)["a"]["shape"] == [8]
        else:
            with pytest.raises(sio.HeaderProblem):
                sio.parse_header(raw, size)


# ----------------------------------------------------------------------------- through the CLI


def _damage(path: Path, how: str) -> None:
    """Rewrite a real safetensors file's header in one hostile way."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    first = next(k for k in header if k != "__metadata__")
    if how == "gap":
        begin, end = header[first]["data_offsets"]
        header[first]["data_offsets"] = [begin + 2, end + 2]
        path.write_bytes(st_bytes(header, body + b"\0\0"))
    elif how == "float-shape":
        header[first]["shape"] = [float(d) for d in header[first]["shape"]]
        path.write_bytes(st_bytes(header, body))
    elif how == "deep-nesting":
        path.write_bytes(st_bytes('{"x":' + "[" * 50_000 + "]" * 50_000 + "}", body))


@pytest.mark.parametrize("how", ["gap", "float-shape", "deep-nesting"])
def test_cli_end_to_end_hostile_base_header(tmp_path: Path, how: str) -> None:
    """END-TO-END (depends on the whole run command): a hostile header in the base gives exit
    code 2 and one 'error: ' line, no traceback."""
    traj = build_trajectory(tmp_path / "t", Spec(steps=(10, 20, 30)))
    _damage(traj.base / "model.safetensors", how)
    proc = run_cli(
        "run", "--base", traj.base, "--runs", traj.runs, "--target", "100",
        "--out", tmp_path / "out", "--device", "cpu", "--quiet", expect_rc=None,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "base" in lines[0] and "model.safetensors" in lines[0], lines[0]
