"""Fuzz tests: every untrusted input is accepted and consistent, or refused with a RelexError.

Never another exception. For safetensors headers the reference is the installed `safetensors`
package (the Rust parser behind safe_open): whatever read_header accepts, it accepts with the
same names, dtypes, shapes and bytes; whatever it refuses, read_header refuses. Where
read_header is deliberately stricter, the refusal must give one of the documented reasons.

Examples per test: 200 by default; set RELEX_FUZZ_EXAMPLES to run more (`make fuzz`).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relex_stream import envvars, jsonfile, units
from relex_stream import safetensors_io as sio
from relex_stream.errors import RelexError

EXAMPLES = envvars.read_env_int("RELEX_FUZZ_EXAMPLES", 200, 1, 10**8)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What read_header may refuse although the official parser accepts (see its module docstring).
STRICTER_REASONS = (
    "twice",  # a duplicate key
    "does not start with '{'",
    "holds no tensors",
    "empty name",
    "absurd",  # a dimension or size beyond 2**62
    "nested more than",
    "not supported",  # a valid dtype relex_stream cannot compute with
    "is not an object",  # an entry written as an array
    "out of range",  # an integer of more than 20 digits in an ignored field
)


# ----------------------------------------------------------------------------- JSON emitting


class Raw(str):
    """A JSON token written as is: NaN, -0, 1e400, a lone-surrogate string, deep nesting."""


@dataclass
class Pairs:
    """A JSON object as a list of pairs, so that a key can repeat."""

    items: list[tuple[str, object]]


def emit(value: object) -> str:
    """JSON text for value; Raw tokens verbatim, Pairs as objects (duplicates kept)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{emit(v)}" for k, v in value.items) + "}"
    if isinstance(value, dict):
        return emit(Pairs(list(value.items())))
    if isinstance(value, list):
        return "[" + ",".join(emit(v) for v in value) + "]"
    return json.dumps(value)


RAW_TOKENS = [
    "NaN", "Infinity", "-Infinity", "-0", "1e400", "-1e400", "1e-400", "2.0", "2e0",
    '"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', "18446744073709551615",
    "18446744073709551616", "9" * 25, "9" * 5000, "[" * 130 + "]" * 130, "[" * 63 + "]" * 63,
    "[" * 3000 + "]" * 3000, "true", "null", '"\\u0000"',
]  # fmt: skip
HOSTILE_NUMBERS = [
    -1, 2**62, 2**62 + 1, 2**63, 2**64 - 1, 2**64, 2.0, 2.5, True, False, "2", None, [2], {},
]  # fmt: skip
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(RAW_TOKENS).map(Raw),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
names = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9_.]{0,12}\Z"),
    st.sampled_from(["", "__metadata__", "\u00e9", "x" * 70, "a\nb", "\x00"]),
    st.text(max_size=6),
)
dtypes = st.one_of(
    st.sampled_from(sorted(sio.DTYPES)), st.sampled_from(sorted(sio.FORMAT_DTYPE_BITS))
)


@st.composite
def tensor_table(draw) -> list[list]:
    """[name, dtype, shape, [begin, end]] rows with distinct names, laid out contiguously."""
    rows = [
        [name, draw(dtypes), draw(st.lists(st.integers(0, 4), max_size=3)), None]
        for name in draw(st.lists(names, max_size=4, unique=True))
    ]
    position = 0
    for row in rows:
        numel = math.prod(row[2])
        size = numel * sio.FORMAT_DTYPE_BITS[row[1]] // 8
        row[3] = [position, position + size]
        position += size
    return rows


def _field(fields: list[tuple[str, object]], key: str) -> int | None:
    """Index of the first field named key, or None."""
    return next((k for k, (name, _) in enumerate(fields) if name == key), None)


def _offsets_of(entry: object) -> list | None:
    """An entry's data_offsets if it is still a well-formed [begin, end] list of ints."""
    if not isinstance(entry, Pairs) or (k := _field(entry.items, "data_offsets")) is None:
        return None
    offsets = entry.items[k][1]
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    return offsets if ok else None


MUTATIONS = [
    "shift", "swap", "copy-offsets", "dim", "dtype", "offsets", "extra", "drop", "dup-field",
    "not-object", "dup-name", "as-array",
]  # fmt: skip


def _mutate(draw, entries: list[tuple[str, object]]) -> None:
    """Apply one hostile change to the tensor entries (as pairs, so keys may repeat)."""
    if not entries:
        return
    i = draw(st.integers(0, len(entries) - 1))
    name, entry = entries[i]
    kind = draw(st.sampled_from(MUTATIONS))
    if not isinstance(entry, Pairs) or not entry.items:
        return  # already replaced by a non-object: nothing to change inside
    fields = entry.items
    offsets = _offsets_of(entry)
    if kind == "shift" and offsets is not None:
        offsets[draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
    elif kind == "swap" and offsets is not None:
        offsets.reverse()
    elif kind == "copy-offsets" and offsets is not None:
        other = _offsets_of(entries[draw(st.integers(0, len(entries) - 1))][1])
        offsets[:] = other if other is not None else offsets
    elif kind == "dim" and (k := _field(fields, "shape")) is not None:
        shape = fields[k][1] if isinstance(fields[k][1], list) else []
        value = draw(st.sampled_from(HOSTILE_NUMBERS) | st.sampled_from(RAW_TOKENS).map(Raw))
        fields[k] = ("shape", [*shape, value] if draw(st.booleans()) else [value, *shape])
    elif kind == "dtype" and (k := _field(fields, "dtype")) is not None:
        fields[k] = ("dtype", draw(st.sampled_from([5, None, ["F32"], "f32", "", "F33", "F16 "])))
    elif kind == "offsets" and (k := _field(fields, "data_offsets")) is not None:
        bad = [[0], [0, 1, 2], "0", {"0": 0}, None, [Raw("-0"), 0], [0, 2.0]]
        fields[k] = ("data_offsets", draw(st.sampled_from(bad)))
    elif kind == "extra":
        key = draw(st.text(max_size=4))
        fields.insert(draw(st.integers(0, len(fields))), (key, draw(json_values)))
    elif kind == "drop":
        del fields[draw(st.integers(0, len(fields) - 1))]
    elif kind == "dup-field":
        fields.append(fields[draw(st.integers(0, len(fields) - 1))])
    elif kind == "not-object":
        entries[i] = (name, draw(json_values))
    elif kind == "dup-name":
        entries.append((name, Pairs(list(fields))))
    elif kind == "as-array":
        entries[i] = (name, [value for _, value in fields])


KNOBS = [
    "mutate", "mutate-more", "reorder", "metadata", "bad-metadata", "leading", "trailing",
    "byte", "data-length", "prefix", "truncate",
]  # fmt: skip


@st.composite
def hostile_files(draw) -> bytes:
    """A safetensors file's bytes: valid, or with a few drawn hostile changes (knobs)."""
    knobs = draw(st.sets(st.sampled_from(KNOBS), max_size=3))
    rows = draw(tensor_table())
    data_len = max((row[3][1] for row in rows), default=0)
    entries: list[tuple[str, object]] = [
        (name, Pairs([("dtype", dtype), ("shape", shape), ("data_offsets", offsets)]))
        for name, dtype, shape, offsets in rows
    ]
    for _ in range(("mutate" in knobs) + 2 * ("mutate-more" in knobs)):
        _mutate(draw, entries)
    if "reorder" in knobs:
        entries = draw(st.permutations(entries))
    if knobs & {"metadata", "bad-metadata"}:
        good = [None, {"format": "pt"}, {}, {"a": "", "": "b"}]
        bad = [{"format": 1}, [], "pt", 0, {"k": None}, {"k": Raw("NaN")}]
        metadata = draw(st.sampled_from(bad if "bad-metadata" in knobs else good))
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", metadata))
    text = emit(Pairs(entries))
    if "leading" in knobs:
        text = draw(st.sampled_from([" ", "\n", "\t", "\ufeff", "x"])) + text
    if "trailing" in knobs:
        text += draw(st.sampled_from([" " * 5, "\r\n", "\t", "x", "}", "\x00", "\u3000"]))
    header = text.encode("utf-8", "surrogatepass")
    if "byte" in knobs and header:
        pos = draw(st.integers(0, len(header) - 1))
        header = header[:pos] + bytes([draw(st.integers(0, 255))]) + header[pos + 1 :]
    if "data-length" in knobs:
        data_len = max(0, data_len + draw(st.sampled_from([-1, 1, 8, -8])))
    length = len(header)
    if "prefix" in knobs:
        length = draw(st.sampled_from([0, length - 1, length + 1, 2**63, 2**64 - 1, 100_000_001]))
    buf = struct.pack("<Q", max(0, length)) + header + bytes(i % 251 for i in range(data_len))
    if "truncate" in knobs:
        buf = buf[: draw(st.integers(0, len(buf)))]
    return buf


def _official(buf: bytes) -> dict[str, tuple[str, list[int], bytes]] | None:
    """name -> (dtype, shape, data) as the safetensors package reads it, or None if refused."""
    try:
        return {
            n: (t["dtype"], list(t["shape"]), bytes(t["data"]))
            for n, t in safetensors.deserialize(buf)
        }
    except Exception:  # noqa: BLE001 - SafetensorError, whatever its module path
        return None


def _check_header_file(buf: bytes, path: Path) -> None:
    """The invariant for one file's bytes (see the module docstring)."""
    path.write_bytes(buf)
    official = _official(buf)
    try:
        entries, data_start, raw = sio.read_header(path)
    except RelexError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message, message
        if official is not None:
            assert any(r in message for r in STRICTER_REASONS), f"wrongly refused: {message}"
        return
    assert official is not None, f"accepted what safetensors refuses: {buf[:300]!r}"
    assert set(entries) == set(official)
    for name, entry in entries.items():
        dtype, shape, data = official[name]
        begin, end = entry["data_offsets"]
        assert (entry["dtype"], entry["shape"]) == (dtype, shape)
        assert buf[data_start + begin : data_start + end] == data
    assert buf[8:data_start] == raw
    with safetensors.safe_open(str(path), "numpy") as f:
        assert {
            n: (f.get_slice(n).get_dtype(), list(f.get_slice(n).get_shape())) for n in f.keys()
        } == {n: (e["dtype"], e["shape"]) for n, e in entries.items()}


@FUZZ
@given(hostile_files())
def test_fuzz_safetensors_headers(buf: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _check_header_file(buf, Path(tmp) / "model.safetensors")


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_safetensors_random_bytes(buf: bytes) -> None:
    """Raw bytes after a matching length prefix, and raw bytes alone."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _check_header_file(buf, path)
        _check_header_file(struct.pack("<Q", len(buf)) + buf, path)


def test_fuzz_generator_reaches_both_outcomes() -> None:
    """A sanity check of the generator: it makes valid files as well as hostile ones."""
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=150, deadline=None)
    @given(hostile_files())
    def sample(buf: bytes) -> None:
        seen["ok" if _official(buf) is not None else "refused"] += 1

    sample()
    assert seen["ok"] >= 5 and seen["refused"] >= 5, seen


# ----------------------------------------------------------------------------- JSON files


@st.composite
def json_files(draw) -> bytes:
    """A JSON file's bytes: a drawn document, perhaps with raw tokens, BOM, other encodings."""
    value = draw(
        json_values | st.dictionaries(st.text(max_size=5), json_values, max_size=4) | st.just({})
    )
    text = emit(value)
    if draw(st.booleans()):
        text = "{" + f'"k":{text},"k":1' + "}" if draw(st.booleans()) else "{" + f'"k":{text}' + "}"
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"]))
    data = text.encode(encoding, "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


def _check_json_file(data: bytes, max_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_bytes(data)
        try:
            result = jsonfile.load_json_object(path, "config.json", max_bytes=max_bytes)
        except RelexError as exc:
            assert "config.json" in str(exc) and "\n" not in str(exc)
            return
    assert isinstance(result, dict)
    assert len(data) <= max_bytes
    # Accepted: plain json agrees (no duplicate keys, nothing non-standard was let through).
    assert json.loads(data.decode("utf-8")) == result


@FUZZ
@given(json_files(), st.sampled_from([10, 2**20]))
def test_fuzz_json_files(data: bytes, max_bytes: int) -> None:
    _check_json_file(data, max_bytes)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_json_random_bytes(data: bytes) -> None:
    _check_json_file(data, 2**20)


@FUZZ
@given(json_values, st.text(max_size=4))
def test_fuzz_json_getters(value: object, key: str) -> None:
    """Typed getters on any parsed value: the promised type, or a RelexError."""
    obj = {key: value}
    for getter, ok in (
        (jsonfile.get_optional_bool, lambda v: isinstance(v, bool) or v is None),
        (jsonfile.get_optional_str, lambda v: isinstance(v, str) or v is None),
        (jsonfile.get_optional_int, lambda v: v is None or type(v) is int),
        (jsonfile.get_str_map, lambda v: all(isinstance(x, str) for x in v.values())),
    ):
        try:
            assert ok(getter(obj, key, "config.json"))
        except RelexError as exc:
            assert "\n" not in str(exc)


# ----------------------------------------------------------------------------- CLI values


values = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\A[0-9٠-٩０-９.,:\- eE+_kKmMgGiIbBsShlanKıſ]{0,14}\Z"),
    st.sampled_from(
        ["1e999", "nan", "inf", "0x10", "1_000", "500,,600", " , ", "1-99999999999999999",
         "99999999999999999999T", "١٠", "１０", "10,20,all", "2m", "500ms", "0", "1P", "2P"]
    ),
)  # fmt: skip


def _outcome(fn, *args):
    """fn(*args), or None when it raises RelexError; any other exception fails the test."""
    try:
        return fn(*args)
    except RelexError as exc:
        assert "\n" not in str(exc)
        return None


@FUZZ
@given(values)
def test_fuzz_cli_values(text: str) -> None:
    """Each parser: a bounded result from an ASCII text, or a RelexError."""
    size = _outcome(units.parse_bytes, text)
    if size is not None:
        assert text.isascii() and type(size) is int and 1 <= size <= units.MAX_BYTES
    steps = _outcome(units.parse_steps, text)
    if steps is not None:
        assert text.isascii() and steps == sorted(set(steps))
        assert len(steps) <= units.MAX_LISTED_STEPS
        assert all(0 <= s <= units.MAX_STEP for s in steps)
    selection = _outcome(units.parse_step_selection, text)
    if selection is not None:
        assert selection.keeps(0) in (True, False) and text.isascii()
    targets = _outcome(units.parse_targets, text)
    if targets is not None:
        assert text.isascii() and targets
        assert all(math.isfinite(t) and abs(t) <= units.MAX_STEP for t in targets)
    count = _outcome(units.parse_positive_int, text, "--n", 64)
    if count is not None:
        assert text.isascii() and 1 <= count <= 64
    seconds = _outcome(units.parse_duration, text, "--interval")
    if seconds is not None:
        assert text.isascii() and 0 < seconds <= units.MAX_DURATION_S
    windows = _outcome(units.parse_windows, text, "--window")
    if windows is not None:
        assert text.isascii() and len(set(windows)) == len(windows)
        assert all(w is None or 2 <= w <= units.MAX_WINDOW for w in windows)


env_values = st.one_of(
    st.none(), st.text(max_size=6), st.integers(-3, 10).map(str),
    st.sampled_from(["", "1", "01", "٣", "３", " 2", "2 ", "+1", "-0", "9" * 30]),
)  # fmt: skip


@FUZZ
@given(env_values, env_values, env_values, env_values)
def test_fuzz_environment(world: str | None, rank: str | None, local: str | None, omp) -> None:
    """torchrun variables and OMP_NUM_THREADS: consistent numbers, None, or a RelexError."""
    env = {
        k: v
        for k, v in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", local),
                     ("OMP_NUM_THREADS", omp))
        if v is not None
    }  # fmt: skip
    try:
        result = envvars.torchrun_env(env)
    except RelexError as exc:
        assert "\n" not in str(exc)
        assert world not in (None, "1")
    else:
        if result is None:
            assert world is None or int(world) == 1
        else:
            r, w, lr = result
            assert world.isascii() and rank.isascii() and (local or "0").isascii()
            assert 0 <= r < w <= envvars.MAX_WORLD_SIZE and 0 <= lr < w
    threads = _outcome(envvars.omp_num_threads, env)
    if threads is not None:
        assert omp.isascii() and 1 <= threads <= envvars.MAX_OMP_THREADS


cpu_lists = st.one_of(
    st.text(alphabet="0123456789-:, \tx٣", max_size=16),
    st.lists(st.tuples(st.integers(0, 70000), st.integers(0, 70000), st.integers(0, 3)),
             max_size=4).map(lambda items: " ".join(f"{a}-{b}:{s}" for a, b, s in items)),
)  # fmt: skip


@FUZZ
@given(cpu_lists)
def test_fuzz_gomp_cpu_affinity(value: str) -> None:
    """GOMP_CPU_AFFINITY: accepted only as libgomp's grammar of rising, bounded ranges with a
    positive stride (anything else hung or exited libgomp), otherwise one RelexError line."""
    import re

    try:
        envvars.gomp_cpu_affinity({"GOMP_CPU_AFFINITY": value})
    except RelexError:
        accepted = False
    else:
        accepted = True

    def conforms(item: str) -> bool:
        found = re.fullmatch(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?", item, re.ASCII)
        if found is None:
            return False
        first, last = int(found[1]), int(found[2] or found[1])
        return first <= last <= envvars.MAX_CPU_INDEX and int(found[3] or 1) >= 1

    items = [item for item in re.split(r"[ ,\t]+", value) if item]
    assert accepted == all(conforms(item) for item in items), value
