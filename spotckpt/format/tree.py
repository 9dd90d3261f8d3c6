"""The JSON tree codec: the structure of a state and every non-tensor value, tensors by name.

Plain JSON where JSON is exact (str-keyed dicts, lists, str, int, bool, None, finite floats);
a one-key tagged object elsewhere (``{"__tensor__": name}``, ``{"__tuple__": [...]}``, ...).
Tags never collide with user data: a user dict that has a single key starting with ``"__"`` is
itself written in the tagged ``"__dict__"`` form. A pickled value is written only when the saver
opts in and read only when the loader opts in too.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spotckpt.errors import CheckpointCorruptError, PickleRefusedError, StateError
from spotckpt.format.safetensors import _DTYPE_TO_ST

__all__ = ["decode_tree", "encode_tree", "parse_tree_json"]

_TAGS = (
    "__tensor__",
    "__tuple__",
    "__dict__",
    "__float__",
    "__ndarray__",
    "__npscalar__",
    "__bytes__",
    "__dtype__",
    "__size__",
    "__device__",
    "__pickle__",
)


def _key_str(k: object) -> str:
    return str(k).replace("/", "%2F")


def encode_tree(
    obj: Any,
    path: str,
    add_tensor: Callable[[str, torch.Tensor], str],
    *,
    allow_pickle: bool = False,
) -> Any:
    """JSON-able form of ``obj``; each tensor is handed to ``add_tensor(key_path, tensor)``,
    which returns the name it is stored under. Raise :class:`StateError` naming the key path of
    an unsupported value -- unless ``allow_pickle``, which stores such a value pickled (and the
    loader must opt in too)."""
    if allow_pickle:
        def rec(o: Any, p: str) -> Any:
            return encode_tree(o, p, add_tensor, allow_pickle=True)
    else:
        def rec(o: Any, p: str) -> Any:
            return encode_tree(o, p, add_tensor)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            raise StateError(
                f"{path}: a tensor on the meta device has no data: nothing to save, nowhere to restore "
                "into; materialize it first (e.g. module.to_empty(device='cpu'), then initialize or restore it)",
                key_path=path,
            )
        if obj.is_sparse or obj.layout != torch.strided:
            raise StateError(
                f"{path}: sparse/quantized tensor layouts are not supported; convert with "
                ".to_dense() before checkpointing",
                key_path=path,
            )
        if obj.dtype not in _DTYPE_TO_ST:
            raise StateError(
                f"{path}: tensor dtype {obj.dtype} is not supported by the safetensors format; "
                "convert it (e.g. complex -> torch.view_as_real) before checkpointing",
                key_path=path,
            )
        return {"__tensor__": add_tensor(path, obj)}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype.hasobject:
            raise StateError(f"{path}: numpy dtype {obj.dtype} is not supported", key_path=path)
        arr = np.ascontiguousarray(obj)
        return {
            "__ndarray__": {
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "data": base64.b64encode(arr.tobytes()).decode("ascii"),
            }
        }
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise StateError(f"{path}: numpy scalar of dtype {obj.dtype} is not supported", key_path=path)
        return {"__npscalar__": {"dtype": obj.dtype.str, "data": base64.b64encode(obj.tobytes()).decode("ascii")}}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [rec(v, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [rec(v, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)).startswith("__"))
        if plain:
            return {k: rec(v, f"{path}/{_key_str(k)}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (str, int, float, bool, tuple))):
                raise StateError(f"{path}: dict key {k!r} of type {type(k).__name__} is not supported", key_path=path)
            items.append([rec(k, f"{path}/<key>"), rec(v, f"{path}/{_key_str(k)}")])
        return {"__dict__": items}
    if allow_pickle:
        import pickle

        return {"__pickle__": base64.b64encode(pickle.dumps(obj, protocol=4)).decode("ascii")}
    raise StateError(
        f"{path}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
        "checkpointed; store tensors, numbers, strings, lists/tuples/dicts of them, numpy arrays, "
        "or an object with state_dict()/load_state_dict()" + _hint(obj),
        key_path=path,
    )


def _hint(obj: Any) -> str:
    """What to use instead, for the objects people most often put in ``state`` by mistake."""
    names = {c.__module__ + "." + c.__qualname__ for c in type(obj).__mro__}
    if "torch.utils.data.dataloader.DataLoader" in names or "torch.utils.data.sampler.Sampler" in names:
        return (" -- a DataLoader has no resumable state: use spotckpt.data.ResumableDataLoader(dataset, "
                "batch_size=..., shuffle=..., seed=...) (or torchdata's StatefulDataLoader), which "
                "resumes at the exact next batch")
    if "torch.utils.data.dataloader._BaseDataLoaderIterator" in names:
        return " -- put the loader (spotckpt.data.ResumableDataLoader), not its iterator, in state"
    if callable(getattr(obj, "__next__", None)):
        return " -- an iterator or generator cannot be saved; store the object it iterates over"
    return ""


def parse_tree_json(raw: bytes, source: str) -> dict[str, Any]:
    """A tree file's JSON object: bounded in size, valid JSON, an object -- else
    CheckpointCorruptError naming ``source``."""
    from spotckpt.format.manifest import MAX_JSON_BYTES

    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointCorruptError(f"{source}: tree file is too large", path=source)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(f"{source}: not valid JSON ({exc})", path=source) from exc
    if not isinstance(doc, dict):
        raise CheckpointCorruptError(f"{source}: not a JSON object", path=source)
    return doc


def decode_tree(
    doc: Any,
    get_tensor: Callable[[str], torch.Tensor],
    *,
    source: str = "tree",
    allow_pickle: bool = False,
) -> Any:
    """Inverse of :func:`encode_tree`; ``get_tensor(name)`` supplies stored tensors. A pickled
    value raises :class:`PickleRefusedError` unless ``allow_pickle``."""

    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{source}: {why}; the checkpoint is damaged", path=source)

    def dec(d: Any) -> Any:
        if d is None or isinstance(d, (bool, str, int, float)):
            return d
        if isinstance(d, list):
            return [dec(v) for v in d]
        if not isinstance(d, dict):
            raise bad(f"unexpected JSON value {type(d).__name__}")
        if len(d) == 1:
            (tag, val), = d.items()
            if tag == "__pickle__":
                if not allow_pickle:
                    raise PickleRefusedError(
                        f"{source}: the checkpoint holds a pickled value; unpickling runs code "
                        "from the file, so it is refused -- pass allow_pickle=True only for "
                        "checkpoints you trust",
                        path=source,
                    )
                import pickle

                return pickle.loads(base64.b64decode(val, validate=True))  # noqa: S301 - opted in
            if tag in _TAGS:
                try:
                    return _decode_tag(tag, val, dec, get_tensor)
                except CheckpointCorruptError:
                    raise
                except (TypeError, ValueError, KeyError, IndexError) as exc:
                    raise bad(f"malformed {tag} value ({exc})") from exc
        return {k: dec(v) for k, v in d.items()}

    return dec(doc)


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode_tag(tag: str, val: Any, dec: Callable[[Any], Any], get_tensor: Callable[[str], torch.Tensor]) -> Any:
    if tag == "__tensor__":
        if not isinstance(val, str):
            raise TypeError("tensor reference must be a string")
        return get_tensor(val)
    if tag == "__tuple__":
        if not isinstance(val, list):
            raise TypeError("tuple must be a list")
        return tuple(dec(v) for v in val)
    if tag == "__dict__":
        out = {}
        for pair in val:
            k, v = pair
            out[dec(k)] = dec(v)
        return out
    if tag == "__float__":
        return _FLOATS[val]
    if tag == "__ndarray__":
        dt = np.dtype(val["dtype"])
        if dt.kind not in "biuf":
            raise ValueError(f"dtype {dt} not allowed")
        data = base64.b64decode(val["data"], validate=True)
        shape = tuple(int(s) for s in val["shape"])
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()
    if tag == "__npscalar__":
        dt = np.dtype(val["dtype"])
        if dt.kind not in "biuf":
            raise ValueError(f"dtype {dt} not allowed")
        return np.frombuffer(base64.b64decode(val["data"], validate=True), dtype=dt)[0]
    if tag == "__bytes__":
        return base64.b64decode(val, validate=True)
    if tag == "__dtype__":
        dt = getattr(torch, str(val))
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"{val!r} is not a torch dtype")
        return dt
    if tag == "__size__":
        return torch.Size([int(v) for v in val])
    if tag == "__device__":
        return torch.device(str(val))
    raise KeyError(tag)
