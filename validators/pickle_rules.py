"""The pickle allowlist: exactly the globals a PyTorch state dict needs, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Global:
    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


def _g(dotted: str) -> Global:
    module, _, name = dotted.rpartition(".")
    return Global(module, name)


# Exactly what torch 2.13 `torch.save(state_dict)` emits (inspected with pickletools), nothing
# more: callables may be the target of REDUCE/NEWOBJ; references may only be passed around.
CALLABLE_GLOBALS = frozenset(
    map(
        _g,
        [
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_tensor_v3",  # dtypes without a legacy storage class
            "torch._utils._rebuild_parameter",
        ],
    )
)
DICT_LIKE_CALLS = frozenset({_g("collections.OrderedDict")})
# fmt: off
STORAGE_ITEMSIZE: dict[Global, int] = {
    _g(f"torch.{name}Storage"): size
    for name, size in [
        ("Float", 4), ("Double", 8), ("Half", 2), ("BFloat16", 2), ("Long", 8), ("Int", 4),
        ("Short", 2), ("Char", 1), ("Byte", 1), ("Bool", 1), ("ComplexFloat", 8),
        ("ComplexDouble", 16),
    ]
} | {_g("torch.storage.UntypedStorage"): 1}  # numel is a byte count for untyped storages
# Dtypes appear as the `dtype` argument of `_rebuild_tensor_v3`.
DTYPE_GLOBALS = frozenset(
    Global("torch", name)
    for name in [
        "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128",
        "uint8", "int8", "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    ]
)
# fmt: on
REFERENCE_GLOBALS = frozenset(STORAGE_ITEMSIZE) | DTYPE_GLOBALS
ALLOWED_GLOBALS = CALLABLE_GLOBALS | REFERENCE_GLOBALS
# Plain containers that pickled modules carry (e.g. `_non_persistent_buffers_set`).
INERT_GLOBALS = frozenset(
    Global(module, name)
    for module in ("builtins", "__builtin__")
    for name in ("set", "frozenset", "dict", "list", "tuple", "bytearray")
)
MODULE_PREFIXES = ("__main__", "torch.nn", "transformers")


def is_model_class(g: Global) -> bool:
    """A class of a pickled model object (not dangerous by name, still refused)."""
    if not g.name.isidentifier():
        return False
    return any(g.module == p or g.module.startswith(p + ".") for p in MODULE_PREFIXES)
