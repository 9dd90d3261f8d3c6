"""From a user's ``state`` mapping to (tree, tensors) and back, in place.

``state`` values may be

- *stateful* objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, schedulers,
  GradScaler, resumable data loaders and samplers, :class:`RNGState`),
- tensors (restored in place, so references held elsewhere see the restored values),
- plain JSON-like values (restored by replacing ``state[key]``).

:func:`capture` runs on the training thread and copies nothing: it returns the live tensors by
name plus a JSON-able tree in which every non-tensor value is already snapshotted.
:func:`apply` loads a verified step into ``state``: module parameters and buffers are read from
the file straight into their existing memory (no second full copy); everything else goes through
``load_state_dict``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CheckpointCorruptError, StateError
from .format import FORMAT, SafetensorsFile, decode_tree, encode_tree
from .shard import ShardIndex, ShardInfo, init_optimizer_state, is_dtensor, load_boxes, local_shard

__all__ = ["RNGState", "Snapshot", "capture", "apply", "is_stateful", "replicated_keys"]

log = logging.getLogger(__name__)


class RNGState:
    """Every random number generator a training loop draws from: Python's ``random``, numpy's
    global generator, torch's CPU generator and, when CUDA is initialised, every CUDA device's.

    Put one in ``state`` (``"rng": spotckpt.RNGState()``): saving captures the generators at that
    moment, restoring sets them, so dropout masks and shuffles after a resume are those an
    uninterrupted run would have drawn.
    """

    def __init__(self, *, cuda: bool = True) -> None:
        self.cuda = cuda

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        try:
            random.setstate(_as_tuple(sd["python"]))
            np.random.set_state(_as_tuple(sd["numpy"]))
            torch.set_rng_state(sd["torch"].to(torch.uint8))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"RNG state in the checkpoint is malformed ({exc})") from exc
        cuda_states = sd.get("cuda")
        if cuda_states and self.cuda and torch.cuda.is_available():
            n = torch.cuda.device_count()
            if len(cuda_states) != n:
                log.warning(
                    "spotckpt: checkpoint has RNG states for %d CUDA devices, this machine has %d; "
                    "restoring the first %d",
                    len(cuda_states),
                    n,
                    min(n, len(cuda_states)),
                )
            for i, s in enumerate(cuda_states[:n]):
                torch.cuda.set_rng_state(s.to(torch.uint8), i)


def _as_tuple(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_as_tuple(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_as_tuple(x) if isinstance(x, list) else x for x in v)
    return v


def is_stateful(obj: Any) -> bool:
    return (
        not isinstance(obj, torch.Tensor)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


@dataclass
class Snapshot:
    """What one writer stores: the JSON tree and the tensors it names (live, not copied).
    ``shards``: the names among ``tensors`` that are this rank's shards of DTensors, with their
    sharding; ``sharded_keys``: the keys of ``state`` holding DTensors."""

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    shards: dict[str, ShardInfo] = field(default_factory=dict)
    sharded_keys: set[str] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def capture(state: Mapping[str, Any], *, step: int, rank: int = 0, allow_pickle: bool = False,
            keys: Collection[str] | None = None) -> Snapshot:
    """Snapshot ``state``'s structure and non-tensor values; collect its tensors by name. With
    ``keys``, only those keys of ``state`` (several ranks: replicated keys on one rank only)."""
    if not isinstance(state, Mapping):
        raise StateError(f"state must be a dict of name -> value, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    shards: dict[str, ShardInfo] = {}
    sharded_keys: set[str] = set()
    dtensors: list[str] = []  # every DTensor's name, written here or not (empty shard, replica)
    namer = _Namer()
    current = [""]

    def add(path: str, t: torch.Tensor) -> str:
        name = namer(path)
        if is_dtensor(t):  # this rank's shard, written by one replica only
            local, info, writes = local_shard(t, path)
            sharded_keys.add(current[0])
            dtensors.append(name)
            if writes:
                tensors[name] = local
                shards[name] = info
        else:
            tensors[name] = t
        return name

    out: dict[str, Any] = {}
    for key, value in state.items():
        if keys is not None and key not in keys:
            continue
        current[0] = key
        if not isinstance(key, str) or not key:
            raise StateError(f"state keys must be non-empty strings, got {key!r}", key_path=repr(key))
        if is_stateful(value):
            try:
                sd = value.state_dict()
            except Exception as exc:
                raise StateError(
                    f"{key}: {type(value).__name__}.state_dict() failed ({exc})", key_path=key
                ) from exc
            out[key] = {"kind": "stateful", "value": encode_tree(sd, key, add, allow_pickle=allow_pickle)}
        elif isinstance(value, torch.Tensor):
            out[key] = {"kind": "tensor", "value": encode_tree(value, key, add)}
        else:
            out[key] = {"kind": "value", "value": encode_tree(value, key, add, allow_pickle=allow_pickle)}
    tree: dict[str, Any] = {"format": FORMAT, "step": step, "rank": rank, "keys": out}
    if dtensors:
        tree["dtensors"] = dtensors
    return Snapshot(tree=tree, tensors=tensors, shards=shards, sharded_keys=sharded_keys)


class _Namer:
    """The stored name of each tensor: its key path, made unique with ``#n`` -- the same names
    on every rank and for the live state at restore (resharding matches tensors by name)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: str) -> str:
        name, n = path, 1
        while name in self.used:
            n += 1
            name = f"{path}#{n}"
        self.used.add(name)
        return name


def _tensor_refs(doc: Any) -> set[str]:
    """Every tensor name a JSON tree refers to."""
    out: set[str] = set()
    stack = [doc]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if len(d) == 1 and isinstance(d.get("__tensor__"), str):
                out.add(d["__tensor__"])
            else:
                stack.extend(d.values())
        elif isinstance(d, list):
            stack.extend(d)
    return out


def _live_tensors(value: Any, key: str) -> dict[str, torch.Tensor]:
    """The live tensors of a stateful ``value`` (or a tensor) under the names a save gives them."""
    named: dict[str, torch.Tensor] = {}
    namer = _Namer()

    def add(path: str, t: torch.Tensor) -> str:
        name = namer(path)
        named[name] = t
        return name

    encode_tree(value.state_dict() if is_stateful(value) else value, key, add, allow_pickle=True)
    return named


def apply(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Any],
    reader: SafetensorsFile,
    *,
    allow_pickle: bool = False,
    bounce: torch.Tensor | None = None,
    source: str = "tree",
    keys: Collection[str] | None = None,
    shards: ShardIndex | None = None,
) -> None:
    """Load a verified step's tree and tensors into ``state`` in place. With ``keys``, only those
    keys are considered (several ranks: this rank's own keys from its file, the replicated ones
    from the file of the rank that wrote them). ``shards``: the step's sharded tensors (every
    rank's files); the keys that hold them are resharded onto the live tensors' layout."""
    if not isinstance(tree, Mapping) or tree.get("format") != FORMAT or not isinstance(tree.get("keys"), dict):
        raise CheckpointCorruptError(f"{source}: not a {FORMAT} tree", path=source)
    saved: dict[str, Any] = tree["keys"]
    if keys is not None:
        saved = {k: v for k, v in saved.items() if k in keys}
    missing = [k for k in state if k not in saved and (keys is None or k in keys)]
    if missing:
        log.warning("spotckpt: keys %s are not in the checkpoint; they keep their current values", missing)

    def get(name: str) -> torch.Tensor:
        t = resharded.get(name)
        return t if t is not None else reader.read(name)

    # First every tensor that is read straight into live memory (module parameters and buffers,
    # tensor keys), all shapes checked before the first byte lands, in one parallel pass; then,
    # in order, the keys that go through load_state_dict or replace state[key].
    in_place: list[tuple[str, torch.Tensor]] = []
    rest: list[tuple[str, Any, Any, Any]] = []
    shard_names = set()
    if shards is not None:
        dtensors = tree.get("dtensors")
        shard_names = shards.names() | (set(dtensors) if isinstance(dtensors, list) else set())
    resharded: dict[str, torch.Tensor] = {}
    for key, entry in saved.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise CheckpointCorruptError(f"{source}: entry {key!r} is malformed", path=source)
        kind, doc = entry.get("kind"), entry["value"]
        live = state.get(key)
        refs = _tensor_refs(doc) & shard_names
        if refs and ((kind == "tensor" and isinstance(live, torch.Tensor)) or (kind == "stateful" and is_stateful(live))):
            resharded.update(_reshard_targets(key, live, refs))
            rest.append((key, kind, doc, live))
            continue
        if kind == "stateful" and isinstance(live, torch.nn.Module):
            plan = _module_in_place_plan(live, doc, reader)
            if plan is not None:
                in_place.extend(plan)
                continue
        elif kind == "tensor" and isinstance(live, torch.Tensor) and isinstance(doc, dict) and "__tensor__" in doc:
            in_place.append((doc["__tensor__"], live))
            continue
        rest.append((key, kind, doc, live))
    if resharded:  # every size and the coverage are checked before the first byte lands
        assert shards is not None
        load_boxes(resharded, shards)
    with torch.no_grad():
        reader.read_many(in_place, bounce=bounce)

    for key, kind, doc, live in rest:
        if kind == "stateful":
            if live is None or not is_stateful(live):
                log.warning("spotckpt: checkpoint key %r has no stateful object in state; skipped", key)
                continue
            sd = decode_tree(doc, get, source=source, allow_pickle=allow_pickle)
            try:
                live.load_state_dict(sd)
            except Exception as exc:
                raise StateError(
                    f"{key}: {type(live).__name__}.load_state_dict() rejected the checkpoint ({exc}); "
                    "build it with the same configuration as when it was saved",
                    key_path=key,
                ) from exc
        elif kind == "tensor":
            if not (isinstance(live, torch.Tensor) and isinstance(doc, dict) and doc.get("__tensor__") in resharded):
                state[key] = decode_tree(doc, get, source=source)
        elif kind == "value":
            state[key] = decode_tree(doc, get, source=source, allow_pickle=allow_pickle)
        else:
            raise CheckpointCorruptError(f"{source}: entry {key!r} has unknown kind {kind!r}", path=source)


def _reshard_targets(key: str, live: Any, refs: set[str]) -> dict[str, torch.Tensor]:
    """The live tensors (DTensors of the current mesh, or plain tensors) that the saved shards
    named ``refs`` of ``key`` are read into. A fresh optimizer first gets its state tensors."""
    if isinstance(live, torch.optim.Optimizer):
        init_optimizer_state(live)
    named = _live_tensors(live, key)
    missing = sorted(refs - set(named))
    if missing:
        raise StateError(
            f"{key}: the checkpoint has sharded tensors {missing[:3]} that the live {type(live).__name__} "
            "does not; build it with the same configuration as when it was saved", key_path=key)
    return {n: named[n] for n in refs}


def replicated_keys(state: Mapping[str, Any], hint: Collection[str] = ()) -> set[str]:
    """The keys of ``state`` whose value is the same on every rank, so one rank writes them:
    a ``DistributedDataParallel`` module, an optimizer over only such modules' parameters, and
    the keys named in ``hint``. Everything else (RNG, data position, plain values) is per rank."""
    from torch.nn.parallel import DistributedDataParallel

    out = {k for k in hint if k in state}
    ddp_params: set[int] = set()
    for key, value in state.items():
        if isinstance(value, DistributedDataParallel):
            out.add(key)
            ddp_params.update(id(p) for p in value.parameters())
    for key, value in state.items():
        if isinstance(value, torch.optim.Optimizer):
            params = [p for g in value.param_groups for p in g["params"]]
            if params and all(id(p) in ddp_params for p in params):
                out.add(key)
    return out


def _module_in_place_plan(
    module: torch.nn.Module, doc: Any, reader: SafetensorsFile
) -> list[tuple[str, torch.Tensor]] | None:
    """``(stored name, live tensor)`` for each of a module's parameters and buffers, to read
    the saved tensors straight into them; None (the caller falls back to ``load_state_dict``)
    when the layouts do not line up one to one. Changes nothing."""
    if not isinstance(doc, dict):
        return None
    if any(
        getattr(m, "_load_state_dict_pre_hooks", None) or getattr(m, "_load_state_dict_post_hooks", None)
        for m in module.modules()
    ):
        return None  # hooks may transform what is loaded: let load_state_dict run them
    live = module.state_dict()
    if set(live) != set(doc):
        return None
    plan = []
    for k, ref in doc.items():
        t = live[k]
        if not (isinstance(ref, dict) and len(ref) == 1 and "__tensor__" in ref and isinstance(t, torch.Tensor)):
            return None
        spec = reader.specs.get(ref["__tensor__"])
        if spec is None or spec.dtype != t.dtype or spec.shape != tuple(t.shape):
            return None
        plan.append((ref["__tensor__"], t))
    return plan
