"""A pass over a pickle's opcodes, before it is loaded: refuse keys that are costly to hash.

The restricted unpickler (fsdp.py) never runs code, but the C unpickler still hashes every dict
key and set element it builds, and a tuple's hash walks the whole tuple each time (CPython does
not cache it). Pickles share objects through the memo, so a few hundred bytes can describe a
tuple of 2^100 nodes (t1 = (t0, t0), t2 = (t1, t1), ...): as a dict key it hangs the load in C,
where no signal reaches it. A verl state dict's keys are strings, so any key or set element
that would expand to more than MAX_KEY_NODES nodes is refused before loading.

The pass follows the pickle machine's stack, with each opcode's stack effect and argument
layout from pickletools' table, and tracks for every object an upper bound of the nodes a hash
or comparison would visit. It reads opcodes itself (pickletools.genops decodes every argument:
~4x slower), at ~0.7 µs per opcode.
"""

from __future__ import annotations

import pickletools

MAX_KEY_NODES = 1 << 16
# Keys that are not strings or bytes hash the same on every run (ints k·(2^61 − 1) all hash
# to 0), so many of them can make building one dict quadratic, in C; a state dict has none.
MAX_OTHER_KEYS = 1 << 12
# Every object the pickle machine holds is memory: 8 MiB of one-byte EMPTY_SETs took 2.2 GB.
# A state dict's stack stays a few thousand deep (dicts are built in batches of 1,000 pairs);
# its memo holds ~15 objects per tensor (~1.4M for a 90k-tensor MoE rank file).
MAX_STACK = 1 << 17
MAX_MEMO = 1 << 22
_CAP = 1 << 62  # node counts are capped so that they stay small ints

# argument layouts (pickletools' ArgumentDescriptor.n): bytes to skip, or how to find them
_LINE, _LEN1, _LEN4S, _LEN4U, _LEN8 = -1, -2, -3, -4, -5


def _table() -> dict[int, tuple[str, int, int, int, int]]:
    """opcode byte -> (name, argument layout, items popped, items below a mark, items pushed);
    items popped is -1 for opcodes that pop to a mark."""
    table = {}
    for op in pickletools.opcodes:
        layout = 0 if op.arg is None else op.arg.n
        if op.arg is not None and op.arg.name == "stringnl_noescape_pair":
            layout = -10  # two lines (GLOBAL, INST)
        before = op.stack_before
        if pickletools.markobject in before:
            popped, below = -1, before.index(pickletools.markobject)
        else:
            popped, below = len(before), 0
        table[op.code.encode("latin-1")[0]] = (op.name, layout, popped, below, len(op.stack_after))
    return table


_OPS = _table()
_TUPLES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
# their hash is randomized per process (SipHash): no input makes them collide on purpose
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
            "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_OBJECTS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"}


def costly_key(data: bytes) -> str | None:
    """None when loading the pickle `data` is bounded in time and memory, else a short reason:
    a dict key or set element of more than MAX_KEY_NODES nodes, more than MAX_OTHER_KEYS keys
    that are not strings, a stack or memo beyond MAX_STACK or MAX_MEMO objects, a memo index
    out of sequence (the C unpickler sizes its memo by the largest index), or a negative
    length. A malformed pickle is checked up to where it breaks (the unpickler stops there
    too)."""
    # node bounds of the objects on the pickle machine's stack; negative for a string or
    # bytes (one node, hashed unpredictably)
    stack: list[int] = []
    marks: list[int] = []  # stack depths at each MARK
    memo: dict[int, int] = {}
    other_keys = 0
    pos, end = 0, len(data)
    while pos < end:
        if len(stack) > MAX_STACK or len(memo) > MAX_MEMO:
            return "it holds more objects at once than a state dict does"
        spec = _OPS.get(data[pos])
        if spec is None:
            return None
        name, layout, n_pop, below, n_push = spec
        pos += 1
        arg = 0
        if layout > 0:
            if name in ("BINGET", "BINPUT", "LONG_BINGET", "LONG_BINPUT"):
                arg = int.from_bytes(data[pos : pos + layout], "little")
            pos += layout
        elif layout == _LINE or layout == -10:
            stop = data.find(b"\n", pos)
            if layout == -10 and stop >= 0:
                stop = data.find(b"\n", stop + 1)
            if stop < 0:
                return None
            if name in ("GET", "PUT"):
                try:
                    arg = int(data[pos:stop])
                except ValueError:
                    return None
            pos = stop + 1
        elif layout < 0:
            width = {_LEN1: 1, _LEN4S: 4, _LEN4U: 4, _LEN8: 8}[layout]
            length = int.from_bytes(data[pos : pos + width], "little", signed=layout == _LEN4S)
            if length < 0:
                return "a negative length"
            pos += width + length
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, 1))
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > len(memo):  # picklers number the memo 0, 1, 2, ...
                return "a memo index out of sequence"
            memo[index] = stack[-1] if stack else 1
            continue
        if name == "DUP":
            if stack:
                stack.append(stack[-1])
            continue
        if name == "STOP":
            return None
        if n_pop < 0:
            depth = marks.pop() if marks else 0
            popped = stack[depth:]
            del stack[depth:]
            under = stack[len(stack) - below :] if below else []
            if below:
                del stack[len(stack) - below :]
        else:
            popped = stack[len(stack) - n_pop :] if n_pop else []
            if n_pop:
                del stack[len(stack) - n_pop :]
            under = []
        if name in ("SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET"):
            keys = (popped[1:2] if name == "SETITEM" else
                    popped[0::2] if name in ("SETITEMS", "DICT") else popped)
            if any(k > MAX_KEY_NODES for k in keys):
                return (f"a dict key or set element would take more than {MAX_KEY_NODES} steps "
                        "to hash (a deeply shared structure)")
            other_keys += sum(1 for k in keys if k >= 0)
            if other_keys > MAX_OTHER_KEYS:
                return (f"more than {MAX_OTHER_KEYS} dict keys or set elements that are not "
                        "strings (a state dict's keys are)")
        if name in _TUPLES or name in _OBJECTS:
            weight = min(_CAP, 1 + sum(map(abs, popped)) + sum(map(abs, under)))
        else:
            weight = -1 if name in _STRINGS else 1
        stack.extend([weight] * n_push)
    return None
