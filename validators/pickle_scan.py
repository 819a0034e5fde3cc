"""Static pickle scanner: walks every opcode without unpickling and refuses unknown globals.

The scanner runs a symbolic pickle machine: constants, tuples, containers, globals and call
results are tracked as inert descriptions, so `STACK_GLOBAL` operands (memoized ones too),
the callee of every `REDUCE`/`NEWOBJ`/`INST`/`OBJ` and the target of every `BUILD`/`SETITEM`
/`APPEND` are known exactly. Nothing in the pickle is ever imported or called.
"""

from __future__ import annotations

import io
import pickletools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from validators.base import Rejected
from validators.pickle_rules import (
    ALLOWED_GLOBALS,
    CALLABLE_GLOBALS,
    DICT_LIKE_CALLS,
    INERT_GLOBALS,
    REFERENCE_GLOBALS,
    STORAGE_ITEMSIZE,
    Global,
    is_model_class,
)

_MAX_PROTOCOL = 5
# Every opcode may leave a live symbolic value behind, so the scanner's own memory is bounded
# by the opcode count; a state dict needs ~30 opcodes per tensor.
_MAX_OPCODES = 4_000_000
_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_LOCATION_RE = re.compile(r"[a-z]{1,16}(:[0-9]{1,4})?")
_STATE_DICT_HINT = "upload a state_dict (torch.save(model.state_dict())) or safetensors"


@dataclass(frozen=True, slots=True)
class _Const:
    value: object


@dataclass(frozen=True, slots=True)
class _Tuple:
    items: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Container:
    kind: str  # "dict", "list", "set", "frozenset"


@dataclass(frozen=True, slots=True)
class _Call:
    """What a call returned; `origin` is None for persistent loads (storages)."""

    origin: Global | None
    tainted: bool  # made by a refused global or op, so already reported


@dataclass(frozen=True)
class StorageRef:
    """One `('storage', Type, key, location, numel)` persistent id."""

    key: str
    storage_type: str
    location: str
    nbytes: int


@dataclass
class PickleScan:
    globals: set[Global] = field(default_factory=set)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)  # opcode misuse on trusted values
    unresolved: list[str] = field(default_factory=list)  # global references we cannot allow
    invalid: str | None = None
    end: int = 0  # offset just past STOP
    value: object = None  # the pickled object when it is a plain constant (legacy magic number)

    @property
    def global_names(self) -> list[str]:
        return sorted(g.dotted for g in self.globals)


class _Invalid(Exception):
    pass


def _genops(data: bytes, start: int) -> Iterator[tuple[str, object, int, int]]:
    """(opcode name, arg, position, end position) per opcode; any decoder error → invalid."""
    stream = io.BytesIO(data)
    stream.seek(start)
    ops = pickletools.genops(stream)
    while True:
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            return
        except Exception as exc:  # hostile bytes can make any decoder raise anything
            raise _Invalid(f"{type(exc).__name__}: {exc}"[:200]) from None
        yield op.name, arg, pos or 0, stream.tell()


def _raw_pair(data: bytes, pos: int, end: int) -> Global:
    """Module and name of GLOBAL/INST exactly as the unpickler reads them (no unescaping)."""
    parts = data[pos + 1 : end].split(b"\n")
    try:
        return Global(parts[0].decode("utf-8"), parts[1].decode("utf-8"))
    except (IndexError, UnicodeDecodeError):
        raise _Invalid(f"unreadable global at offset {pos}") from None


class _Machine:
    """The symbolic stack machine; mirrors CPython's Unpickler stack, metastack and memo."""

    def __init__(self, data: bytes, scan: PickleScan, *, legacy: bool) -> None:
        self.data = data
        self.scan = scan
        self.legacy = legacy  # legacy torch.save: 6-field storage ids, checked no further
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []
        self.memo: dict[int, object] = {}
        self.current = ""  # name of the opcode being applied

    def push(self, value: object) -> None:
        self.stack.append(value)

    def pop(self) -> object:
        if not self.stack:
            raise _Invalid("stack underflow")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise _Invalid("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[object]:
        if not self.metastack:
            raise _Invalid("MARK missing")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def record_global(self, g: Global) -> Global:
        self.scan.globals.add(g)
        return g

    def call(self, fn: object) -> _Call:
        """The result of calling `fn`; only allowlisted callables yield a trusted value."""
        if isinstance(fn, Global):
            if fn in CALLABLE_GLOBALS:
                return _Call(fn, tainted=False)
            if fn in REFERENCE_GLOBALS:
                self.scan.unresolved.append(f"{fn.dotted} (called, may only be referenced)")
            return _Call(fn, tainted=True)
        if not (isinstance(fn, _Call) and fn.tainted):
            self.scan.violations.append("a call of a value that is not a global")
        return _Call(None, tainted=True)

    def check_target(self, kind: str, op: str) -> None:
        """SETITEM/APPEND/BUILD run the target's own methods: only trusted containers."""
        target = self.top()
        if isinstance(target, _Call) and target.tainted:
            return  # whatever made it is reported already
        if isinstance(target, _Container) and target.kind == kind:
            return
        # An OrderedDict takes items and, through BUILD, its state_dict `_metadata` attribute.
        trusted_dict = isinstance(target, _Call) and target.origin in DICT_LIKE_CALLS
        if kind in ("dict", "state") and trusted_dict:
            return
        self.scan.violations.append(f"{op} applied to an unexpected object")

    def persistent(self, pid: object) -> _Call:
        """Torch storage records; any other persistent id is not a torch.save pickle."""
        items = pid.items if isinstance(pid, _Tuple) else ()
        if self.legacy and items:
            # legacy ids also name module classes (then NEWOBJ'd); the file is refused anyway
            return _Call(None, tainted=True)
        values = [i.value if isinstance(i, _Const) else i for i in items]
        if len(values) != 5 or values[0] != "storage":
            raise _Invalid("persistent id is not a torch storage record")
        _, stype, key, location, numel = values
        if not (
            isinstance(stype, Global)
            and stype in STORAGE_ITEMSIZE
            and isinstance(key, str)
            and _KEY_RE.fullmatch(key)
            and isinstance(location, str)
            and _LOCATION_RE.fullmatch(location)
            and type(numel) is int
            and numel >= 0
        ):
            raise _Invalid(f"malformed storage record {values!r:.200}")
        ref = StorageRef(key, stype.dotted, location, numel * STORAGE_ITEMSIZE[stype])
        old = self.scan.storages.get(key)
        if old is None or old.nbytes < ref.nbytes:
            self.scan.storages[key] = ref
        return _Call(None, tainted=False)


_Op = Callable[[_Machine, object, int, int], None]
# fmt: off
_CONSTANTS = frozenset([
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
])
_MEMO_OPS = ["GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"]
# fmt: on
_SINGLETONS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_EMPTY = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_FROM_MARK = {"LIST": "list", "DICT": "dict", "FROZENSET": "frozenset"}
# Opcodes that mutate the object below their operands: target kind, operands (-1 = to MARK).
_FILL = {
    "APPEND": ("list", 1),
    "APPENDS": ("list", -1),
    "ADDITEMS": ("set", -1),
    "SETITEM": ("dict", 2),
    "SETITEMS": ("dict", -1),
    "BUILD": ("state", 1),
}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _op_value(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current in _SINGLETONS:
        m.push(_Const(_SINGLETONS[m.current]))
    elif m.current in _EMPTY:
        m.push(_Container(_EMPTY[m.current]))
    elif m.current in _FROM_MARK:
        m.pop_mark()
        m.push(_Container(_FROM_MARK[m.current]))
    else:
        m.push(_Const(arg))


def _op_tuple(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current in _TUPLE_SIZES:
        items = [m.pop() for _ in range(_TUPLE_SIZES[m.current])][::-1]
    else:
        items = [] if m.current == "EMPTY_TUPLE" else m.pop_mark()
    m.push(_Tuple(tuple(items)))


def _op_fill(m: _Machine, arg: object, pos: int, end: int) -> None:
    kind, operands = _FILL[m.current]
    if operands < 0:
        items = m.pop_mark()
        if m.current == "SETITEMS" and len(items) % 2:
            raise _Invalid("SETITEMS with an odd number of items")
    for _ in range(max(operands, 0)):
        m.pop()
    m.check_target(kind, m.current)


def _op_stack(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current == "MARK":
        m.metastack.append(m.stack)
        m.stack = []
    elif m.current == "POP_MARK" or (m.current == "POP" and not m.stack):
        m.pop_mark()  # CPython's POP falls back to dropping a mark
    elif m.current == "POP":
        m.pop()
    else:  # DUP
        m.push(m.top())


def _op_memo(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current.endswith("GET"):
        if not isinstance(arg, int) or arg not in m.memo:
            raise _Invalid(f"memo key {arg!r} was never stored")
        m.push(m.memo[arg])
        return
    index = len(m.memo) if m.current == "MEMOIZE" else arg
    if not isinstance(index, int) or index < 0:
        raise _Invalid("bad PUT argument")
    m.memo[index] = m.top()


def _op_global(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current == "GLOBAL":
        m.push(m.record_global(_raw_pair(m.data, pos, end)))
        return
    name, module = m.pop(), m.pop()  # STACK_GLOBAL: strings pushed (or memoized) before
    module_str = module.value if isinstance(module, _Const) else None
    name_str = name.value if isinstance(name, _Const) else None
    if isinstance(module_str, str) and isinstance(name_str, str):
        m.push(m.record_global(Global(module_str, name_str)))
        return
    m.scan.unresolved.append(f"STACK_GLOBAL at offset {pos} with operands not known statically")
    m.push(_Call(None, tainted=True))


def _op_call(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current == "INST":
        m.pop_mark()
        m.push(m.call(m.record_global(_raw_pair(m.data, pos, end))))
    elif m.current == "OBJ":
        items = m.pop_mark()
        if not items:
            raise _Invalid("OBJ without a class")
        m.push(m.call(items[0]))
    else:  # REDUCE, NEWOBJ, NEWOBJ_EX: callable, args[, kwargs]
        for _ in range(2 if m.current == "NEWOBJ_EX" else 1):
            m.pop()
        m.push(m.call(m.pop()))


def _op_other(m: _Machine, arg: object, pos: int, end: int) -> None:
    if m.current == "BINPERSID":
        m.push(m.persistent(m.pop()))
    elif m.current == "PROTO":
        if not (isinstance(arg, int) and 0 <= arg <= _MAX_PROTOCOL):
            raise _Invalid(f"unsupported pickle protocol {arg!r}")
    elif m.current.startswith("EXT"):
        m.scan.unresolved.append(f"extension-registry global #{arg}")
        m.push(_Call(None, tainted=True))
    elif m.current != "FRAME":  # NEXT_BUFFER, READONLY_BUFFER, PERSID: torch never writes them
        m.scan.violations.append(f"opcode {m.current}")
        m.push(_Call(None, tainted=True))


_DISPATCH: dict[str, _Op] = {
    **dict.fromkeys([*_CONSTANTS, *_SINGLETONS, *_EMPTY, *_FROM_MARK], _op_value),
    **dict.fromkeys(["EMPTY_TUPLE", "TUPLE", *_TUPLE_SIZES], _op_tuple),
    **dict.fromkeys(_FILL, _op_fill),
    **dict.fromkeys(["MARK", "POP", "POP_MARK", "DUP"], _op_stack),
    **dict.fromkeys(_MEMO_OPS, _op_memo),
    **dict.fromkeys(["GLOBAL", "STACK_GLOBAL"], _op_global),
    **dict.fromkeys(["INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"], _op_call),
}


def walk(data: bytes, *, start: int = 0, legacy: bool = False) -> PickleScan:
    """Run the symbolic machine over one pickle from `start`; problems are recorded, not raised."""
    scan = PickleScan()
    machine = _Machine(data, scan, legacy=legacy)
    try:
        for count, (name, arg, pos, end) in enumerate(_genops(data, start)):
            if count >= _MAX_OPCODES:
                raise _Invalid(f"more than {_MAX_OPCODES} opcodes")
            if name == "STOP":
                result = machine.pop()
                scan.value = result.value if isinstance(result, _Const) else None
                scan.end = end
                return scan
            machine.current = name
            _DISPATCH.get(name, _op_other)(machine, arg, pos, end)
        scan.invalid = "the pickle ends without STOP"
    except _Invalid as exc:
        scan.invalid = str(exc) or "malformed pickle"
    return scan


def verdict(scan: PickleScan) -> tuple[str, str] | None:
    """(code, message) for the most dangerous finding of a scan, or None when it is clean."""
    refused = sorted(g for g in scan.globals if g not in ALLOWED_GLOBALS)
    models = [g for g in refused if is_model_class(g)]
    dangerous = [g for g in refused if g not in INERT_GLOBALS and g not in models]
    if dangerous or scan.unresolved:
        what = dangerous[0].dotted if dangerous else scan.unresolved[0]
        return "PICKLE_UNSAFE_GLOBAL", (
            f"the pickle references {what}, which is not an allowed tensor-rebuilding global;"
            f" {_STATE_DICT_HINT}"
        )
    if scan.violations:
        return "PICKLE_UNSAFE_OPCODE", f"the pickle uses {scan.violations[0]}; {_STATE_DICT_HINT}"
    if models:
        return "PICKLED_MODULE", (
            f"the file is a whole pickled model object ({models[0].dotted}): "
            f"{_STATE_DICT_HINT} instead of a pickled module"
        )
    if refused:
        return "PICKLE_UNSAFE_GLOBAL", f"the pickle references {refused[0].dotted}, not allowed"
    if scan.invalid is not None:
        return "PICKLE_INVALID", f"not a valid pickle: {scan.invalid}"
    return None


def scan_pickle(data: bytes, *, path: str | None = None) -> PickleScan:
    """Scan one complete pickle (nothing may follow STOP); raise `Rejected` on any finding."""
    scan = walk(data)
    if scan.invalid is None and scan.end != len(data):
        scan.invalid = f"{len(data) - scan.end} bytes of trailing data after STOP"
    found = verdict(scan)
    if found is not None:
        raise Rejected(*found, path=path)
    return scan
