"""Small JSON inputs (config.json, the safetensors index): strict reading, one RelexError each."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from relex_stream import jsonfile
from relex_stream.errors import RelexError


def write(tmp_path: Path, data: bytes | str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def refused(path: Path, what: str = "config.json", **kwargs: int) -> str:
    """load_json_object must refuse with a one-line RelexError naming the file; the message."""
    with pytest.raises(RelexError) as info:
        jsonfile.load_json_object(path, what, **kwargs)
    message = str(info.value)
    assert str(path) in message and what in message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- load_json_object


def test_valid_object(tmp_path: Path) -> None:
    config = {"a": 1, "b": [1.5, None, True], "c": {"d": "é"}, "e": -0.0}
    path = write(tmp_path, json.dumps(config, ensure_ascii=False))
    assert jsonfile.load_json_object(path, "config.json") == config


@pytest.mark.parametrize(
    "text, kind",
    [("[1, 2]", "array"), ('"x"', "string"), ("3", "number"), ("null", "null"), ("true", "bool")],
)
def test_top_level_must_be_an_object(tmp_path: Path, text: str, kind: str) -> None:
    assert kind[:4] in refused(write(tmp_path, text))


@pytest.mark.parametrize(
    "data, says",
    [
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": "\xc0\x80"}', "not UTF-8"),  # overlong NUL
        (b'{"a": "\xed\xa0\x80"}', "not UTF-8"),  # an encoded surrogate
        ('{"a": 1}'.encode("utf-16"), "UTF-16"),
        ('{"a": 1}'.encode("utf-16-le"), "UTF-16"),
        ('{"a": 1}'.encode("utf-16-be"), "UTF-16"),
        ('{"a": 1}'.encode("utf-32"), "UTF-16 or UTF-32"),
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
    ],
    ids=["ff", "overlong", "surrogate", "utf16", "utf16le", "utf16be", "utf32", "bom"],
)
def test_encodings_other_than_utf8(tmp_path: Path, data: bytes, says: str) -> None:
    """UTF-8 only, no BOM: transformers' own json.loads of the text refuses a BOM too."""
    assert says in refused(write(tmp_path, data))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',
        '{"x": {"a": 1, "b": 2, "a": 1}}',
        '{"x": [{"k": 1, "k": 1}]}',
    ],
)
def test_duplicate_keys(tmp_path: Path, text: str) -> None:
    """json keeps the last of two keys silently; which one did the writer mean?"""
    assert "twice" in refused(write(tmp_path, text))


@pytest.mark.parametrize(
    "token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, '"\\ud800"']
)
def test_non_standard_values(tmp_path: Path, token: str) -> None:
    """NaN/Infinity literals, overflowing numbers, 5000-digit integers (int() raises
    ValueError past 4300 digits) and lone surrogate escapes."""
    refused(write(tmp_path, f'{{"a": [1, {token}]}}'))


def test_nesting_depth(tmp_path: Path) -> None:
    """64 levels are fine; 65 are refused; 100,000 end in a RelexError, not RecursionError."""
    ok = "[" * 63 + "]" * 63
    assert jsonfile.load_json_object(write(tmp_path, f'{{"a": {ok}}}'), "config.json")
    for depth in (64, 100_000):
        deep = "[" * depth + "]" * depth
        assert "nested" in refused(write(tmp_path, f'{{"a": {deep}}}'))


@pytest.mark.parametrize("text", ["", " ", "{", '{"a": 1} x', '{"a": 1}{}', "{'a': 1}", "{a: 1}"])
def test_not_json(tmp_path: Path, text: str) -> None:
    assert "not valid JSON" in refused(write(tmp_path, text))


def test_size_limit(tmp_path: Path) -> None:
    """Over max_bytes: refused, without reading the whole (here sparse, 4 GiB) file."""
    path = write(tmp_path, '{"a": 1}')
    assert jsonfile.load_json_object(path, "config.json", max_bytes=8) == {"a": 1}
    assert "larger than 7 bytes" in refused(path, max_bytes=7)
    big = tmp_path / "model.safetensors.index.json"
    with open(big, "wb") as f:
        f.write(b'{"weight_map": {')
        f.truncate(4 * 2**30)
    assert "larger than" in refused(big, "safetensors index", max_bytes=jsonfile.MAX_INDEX_BYTES)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "cannot read" in refused(tmp_path / "config.json")
    (tmp_path / "dir.json").mkdir()
    refused(tmp_path / "dir.json")


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            jsonfile.load_json_object(path, "config.json")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("load_json_object blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], RelexError), outcome


def test_negative_zero_is_a_float() -> None:
    """'-0' reads as -0.0 (as serde_json does), so it never passes as an integer count."""
    value = jsonfile.loads_strict('{"n": -0, "m": 0}')
    assert value == {"n": 0.0, "m": 0} and type(value["n"]) is float and type(value["m"]) is int


# ----------------------------------------------------------------------------- typed getters


def test_get_str_map(tmp_path: Path) -> None:
    index = {"metadata": {"total_size": 8}, "weight_map": {"a": "m-1.safetensors"}}
    assert jsonfile.get_str_map(index, "weight_map", "idx.json") == {"a": "m-1.safetensors"}


@pytest.mark.parametrize(
    "index, says",
    [
        ({}, "no 'weight_map'"),
        ({"weight_map": ["a", "b"]}, "array"),
        ({"weight_map": "a"}, "string"),
        ({"weight_map": None}, "null"),
        ({"weight_map": {"a": 1}}, "number"),
        ({"weight_map": {"a": None}}, "null"),
        ({"weight_map": {"a": ["m.safetensors"]}}, "array"),
    ],
)
def test_get_str_map_refuses(index: dict, says: str) -> None:
    with pytest.raises(RelexError) as info:
        jsonfile.get_str_map(index, "weight_map", "idx.json")
    assert "idx.json" in str(info.value) and says in str(info.value)


def test_get_optional_bool() -> None:
    get = jsonfile.get_optional_bool
    assert get({}, "tie_word_embeddings", "c.json") is None
    assert get({"tie_word_embeddings": True}, "tie_word_embeddings", "c.json") is True
    assert get({"tie_word_embeddings": False}, "tie_word_embeddings", "c.json") is False
    for bad in (None, 1, 0, "true", "false", [], {}):
        with pytest.raises(RelexError, match="true or false"):
            get({"tie_word_embeddings": bad}, "tie_word_embeddings", "c.json")


def test_get_optional_str() -> None:
    get = jsonfile.get_optional_str
    assert get({}, "torch_dtype", "c.json") is None
    assert get({"torch_dtype": None}, "torch_dtype", "c.json") is None
    assert get({"torch_dtype": "bfloat16"}, "torch_dtype", "c.json") == "bfloat16"
    for bad in (1, True, ["bfloat16"], {}):
        with pytest.raises(RelexError, match="a string"):
            get({"torch_dtype": bad}, "torch_dtype", "c.json")


def test_get_optional_int() -> None:
    get = jsonfile.get_optional_int
    assert get({}, "vocab_size", "c.json") is None
    assert get({"vocab_size": 64}, "vocab_size", "c.json") == 64
    for bad in (True, 64.0, "64", -0.0):
        with pytest.raises(RelexError, match="an integer"):
            get({"vocab_size": bad}, "vocab_size", "c.json")
    with pytest.raises(RelexError, match="outside"):
        get({"vocab_size": 2**60}, "vocab_size", "c.json")
    with pytest.raises(RelexError, match="outside"):
        get({"vocab_size": 5}, "vocab_size", "c.json", minimum=10)


def test_container_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """More objects and arrays than MAX_CONTAINERS: refused before parsing (20 million `{}`
    took 98 s and 3.2 GB to parse and walk); at the limit, parsed."""
    at_limit = "[" + ",".join(["{}"] * (jsonfile.MAX_CONTAINERS - 1)) + "]"
    assert len(jsonfile.loads_strict(at_limit)) == jsonfile.MAX_CONTAINERS - 1
    hostile = '{"a": [' + ",".join(["{}"] * 20_000_000) + "]}"

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed a text it should refuse from the count alone")

    monkeypatch.setattr(jsonfile.json, "loads", no_parse)
    with pytest.raises(jsonfile.JsonProblem, match="objects and arrays"):
        jsonfile.loads_strict(hostile)
