"""From a user's ``state`` mapping to (tree, tensors) and back, in place.

``state`` values may be

- *stateful* objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, schedulers,
  GradScaler, resumable data loaders and samplers, :class:`RNGState`),
- tensors (restored in place, so references held elsewhere see the restored values),
- plain JSON-like values (restored by replacing ``state[key]``).

:func:`capture` runs on the training thread and copies nothing: it returns the live tensors by
name plus a JSON-able tree in which every non-tensor value is already snapshotted.
:func:`prepare_load` checks a verified step against ``state``, and :meth:`LoadPlan.run` loads it
in place: module parameters and buffers are read from
the file straight into their existing memory (no second full copy); everything else goes through
``load_state_dict``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format import FORMAT, SafetensorsFile, decode_tree, encode_tree
from spotckpt.ranks.shard import ShardIndex, ShardInfo, init_optimizer_state, is_dtensor, local_shard, plan_boxes

__all__ = ["RNGState", "Snapshot", "LoadPlan", "capture", "prepare_load", "is_stateful", "replicated_keys"]

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


@dataclass
class LoadPlan:
    """A restore of some keys of ``state`` that passed every check and has not touched live
    state yet. :meth:`run` lands it: resharded tensors, tensors read straight into live memory,
    then ``load_state_dict`` (modules, optimizers, the rest), then plain values."""

    source: str
    reader: SafetensorsFile
    bounce: torch.Tensor | None
    in_place: list[tuple[str, list[tuple[str, torch.Tensor]]]] = field(default_factory=list)  # key, pairs
    boxes: Callable[[], int] | None = None
    boxed_keys: list[str] = field(default_factory=list)
    stateful: list[tuple[str, Any, Any]] = field(default_factory=list)  # key, live object, decoded state
    values: list[tuple[str, Any]] = field(default_factory=list)

    def keys(self) -> list[str]:
        return ([k for k, _ in self.in_place] + self.boxed_keys + [k for k, _, _ in self.stateful]
                + [k for k, _ in self.values])

    def run(self, state: MutableMapping[str, Any], loaded: list[str] | None = None) -> None:
        """Land the plan; ``loaded`` collects the keys done (several plans of one restore share
        it). A failure here -- a ``load_state_dict`` that rejects what the checks could not
        foresee -- raises StateError naming the keys already loaded."""
        done = loaded if loaded is not None else []
        key = "?"
        try:
            if self.boxes is not None:
                key = ", ".join(self.boxed_keys)
                self.boxes()
            with torch.no_grad():
                self.reader.read_many([p for _, pairs in self.in_place for p in pairs], bounce=self.bounce)
            done.extend(k for k, _ in self.in_place)
            for key, live, sd in self.stateful:
                try:
                    live.load_state_dict(sd)
                except Exception as exc:
                    raise StateError(
                        f"{key}: {type(live).__name__}.load_state_dict() rejected the checkpoint ({exc}); "
                        "build it with the same configuration as when it was saved",
                        key_path=key,
                    ) from exc
                done.append(key)
            for key, value in self.values:
                state[key] = value
                done.append(key)
        except StateError as exc:
            if done:
                exc.args = (f"{exc.args[0]} -- the restore stopped part way: {sorted(set(done))} were "
                            "already loaded, the other keys keep their values; rebuild the state before "
                            "training on",)
            raise


def prepare_load(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Any],
    reader: SafetensorsFile,
    *,
    allow_pickle: bool = False,
    bounce: torch.Tensor | None = None,
    source: str = "tree",
    keys: Collection[str] | None = None,
    shards: ShardIndex | None = None,
) -> LoadPlan:
    """Check a verified step's tree and tensors against ``state`` and decode what is not read
    in place -- nothing lands in live state here. With ``keys``, only those keys are considered
    (several ranks: this rank's own keys from its file, the replicated ones from the file of
    the rank that wrote them). ``shards``: the step's sharded tensors (every rank's files); the
    keys that hold them are resharded onto the live tensors' layout.

    Checked before anything lands: the tree's structure, every in-place tensor's dtype and
    shape, a module's keys and shapes, an optimizer's groups and per-parameter state shapes,
    the resharded tensors' sizes and coverage, and every stored value decodes."""
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

    plan = LoadPlan(source=source, reader=reader, bounce=bounce)
    shard_names = set()
    if shards is not None:
        dtensors = tree.get("dtensors")
        shard_names = shards.names() | (set(dtensors) if isinstance(dtensors, list) else set())
    resharded: dict[str, torch.Tensor] = {}
    rest: list[tuple[str, Any, Any, Any]] = []
    for key, entry in saved.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise CheckpointCorruptError(f"{source}: entry {key!r} is malformed", path=source)
        kind, doc = entry.get("kind"), entry["value"]
        if kind not in ("stateful", "tensor", "value"):
            raise CheckpointCorruptError(f"{source}: entry {key!r} has unknown kind {kind!r}", path=source)
        live = state.get(key)
        refs = _tensor_refs(doc) & shard_names
        if refs and ((kind == "tensor" and isinstance(live, torch.Tensor)) or (kind == "stateful" and is_stateful(live))):
            resharded.update(_reshard_targets(key, live, refs))
            plan.boxed_keys.append(key)
            if kind == "stateful":
                rest.append((key, kind, doc, live))
            continue
        if kind == "stateful" and isinstance(live, torch.nn.Module):
            pairs = _module_in_place_plan(live, doc, reader)
            if pairs is not None:
                plan.in_place.append((key, pairs))
                continue
        elif kind == "tensor" and isinstance(live, torch.Tensor) and isinstance(doc, dict) and "__tensor__" in doc:
            reader._checked_spec(doc["__tensor__"], live)  # StateError before anything lands
            plan.in_place.append((key, [(doc["__tensor__"], live)]))
            continue
        rest.append((key, kind, doc, live))
    if resharded:  # every size and the coverage are checked, remote chunks fetched and verified
        assert shards is not None
        plan.boxes = plan_boxes(resharded, shards)

    stateful: list[tuple[int, str, Any, Any]] = []
    for key, kind, doc, live in rest:
        if kind == "stateful":
            if live is None or not is_stateful(live):
                log.warning("spotckpt: checkpoint key %r has no stateful object in state; skipped", key)
                continue
            sd = decode_tree(doc, get, source=source, allow_pickle=allow_pickle)
            if isinstance(live, torch.nn.Module):
                _check_module(key, live, sd)
                order = 0
            elif isinstance(live, torch.optim.Optimizer):
                _check_optimizer(key, live, sd)
                order = 1
            else:
                order = 2
            stateful.append((order, key, live, sd))
        elif kind == "tensor":
            if not (isinstance(live, torch.Tensor) and isinstance(doc, dict) and doc.get("__tensor__") in resharded):
                plan.values.append((key, decode_tree(doc, get, source=source)))
        else:
            plan.values.append((key, decode_tree(doc, get, source=source, allow_pickle=allow_pickle)))
    plan.stateful = [(k, live, sd) for _, k, live, sd in sorted(stateful, key=lambda x: x[0])]
    return plan


def _has_load_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(m, "_load_state_dict_pre_hooks", None) or getattr(m, "_load_state_dict_post_hooks", None)
               for m in module.modules())


def _check_module(key: str, live: torch.nn.Module, sd: Any) -> None:
    """Before anything lands: the saved module state has the live module's keys and shapes
    (what a strict ``load_state_dict`` would refuse only after loading part of the state).
    Modules with load hooks may transform what is loaded: their own load decides."""
    if not isinstance(sd, Mapping) or _has_load_hooks(live):
        return
    have = live.state_dict()
    missing = sorted(set(have) - set(sd))
    unexpected = sorted(set(sd) - set(have))
    wrong = [f"{k}: saved {list(sd[k].shape)}, live {list(have[k].shape)}" for k in sorted(set(have) & set(sd))
             if isinstance(sd[k], torch.Tensor) and isinstance(have[k], torch.Tensor) and sd[k].shape != have[k].shape]
    if missing or unexpected or wrong:
        parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {unexpected[:5]}"] if unexpected else []) \
            + ([f"shapes differ ({'; '.join(wrong[:3])})"] if wrong else [])
        raise StateError(
            f"{key}: the checkpoint does not fit the live {type(live).__name__}: {', '.join(parts)}; build it "
            "with the same configuration as when it was saved -- nothing was loaded", key_path=key)


def _check_optimizer(key: str, live: torch.optim.Optimizer, sd: Any) -> None:
    """Before anything lands: the saved optimizer has the live one's parameter groups and, for
    torch's own optimizers, per-parameter state of each parameter's shape (``load_state_dict``
    checks only the group sizes, and a model of another width fails at the next ``step()``)."""
    if not isinstance(sd, Mapping) or not isinstance(sd.get("param_groups"), list):
        return
    groups = live.param_groups
    saved_groups = sd["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in saved_groups]
    if sizes != [len(g["params"]) for g in groups]:
        raise StateError(
            f"{key}: the checkpoint's optimizer has parameter groups of sizes {sizes}, the live one "
            f"{[len(g['params']) for g in groups]}; build it over the same parameters as when it was saved "
            "-- nothing was loaded", key_path=key)
    if not type(live).__module__.startswith("torch.optim"):
        return
    _check_optimizer_kind(key, live, saved_groups)
    params = {}
    for sg, g in zip(saved_groups, groups):
        params.update(zip(sg["params"], g["params"]))
    for pid, pstate in (sd.get("state") or {}).items():
        p = params.get(pid)
        if p is None or not isinstance(pstate, Mapping):
            continue
        for name, v in pstate.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise StateError(
                    f"{key}: state {name!r} of parameter {pid} is {list(v.shape)} in the checkpoint, the live "
                    f"parameter is {list(p.shape)}; build the model and optimizer as when it was saved -- "
                    "nothing was loaded", key_path=key)


def _check_optimizer_kind(key: str, live: torch.optim.Optimizer, saved_groups: list[Any]) -> None:
    """Before anything lands: the checkpoint's optimizer is of the live one's kind. An Adam
    checkpoint loads into SGD without a word and the next ``step()`` fails (``KeyError:
    'momentum'``). The saved groups are completed as the live class's ``load_state_dict`` would
    (its ``__setstate__`` fills in what newer torch versions added); refused when they then
    still lack hyperparameters the live class needs *and* hold ones it does not know."""
    cls = type(live)
    try:
        probe = cls.__new__(cls)
        probe.defaults = dict(live.defaults)
        probe.__setstate__({"state": {}, "param_groups": [dict(g) for g in saved_groups]})
        loaded = probe.param_groups
    except Exception:  # noqa: BLE001 - cannot tell: load_state_dict will judge
        return
    # and the keys torch's LR schedulers add to the groups
    known = set(live.defaults) | {"params", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                                  "max_momentum"}
    lacking = sorted({k for g in loaded for k in live.defaults if k not in g})
    foreign = sorted({k for g in loaded for k in g if k not in known and not k.startswith("_")})
    if lacking and foreign:
        raise StateError(
            f"{key}: the checkpoint's optimizer has hyperparameters {foreign} and lacks {lacking} that the live "
            f"{cls.__name__} needs: it was saved from another kind of optimizer; build the same optimizer as "
            "when it was saved -- nothing was loaded", key_path=key)


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
    if _has_load_hooks(module):
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
