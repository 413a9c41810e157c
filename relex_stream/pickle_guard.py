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
_OBJECTS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"}


def costly_key(data: bytes) -> str | None:
    """None when no dict key or set element of the pickle `data` exceeds MAX_KEY_NODES nodes,
    else a short reason. A malformed pickle is checked up to where it breaks (the unpickler
    stops there too)."""
    stack: list[int] = []  # node bounds of the objects on the pickle machine's stack
    marks: list[int] = []  # stack depths at each MARK
    memo: dict[int, int] = {}
    pos, end = 0, len(data)
    while pos < end:
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
            pos += width + int.from_bytes(data[pos : pos + width], "little",
                                          signed=layout == _LEN4S)
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, 1))
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if stack:
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
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
        if name in _TUPLES or name in _OBJECTS:
            weight = min(_CAP, 1 + sum(popped) + sum(under))
        else:
            weight = 1
        stack.extend([weight] * n_push)
    return None
