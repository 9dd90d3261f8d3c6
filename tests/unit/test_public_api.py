"""The public surface: `__all__` is exactly what is advertised, and every error is a SpotCkptError."""

from __future__ import annotations

import inspect

import spotckpt
from spotckpt import errors

PUBLIC = {
    "CheckpointManager", "RNGState", "__version__",
    "SpotCkptError", "ConfigError", "StateError", "CheckpointCorruptError", "AllStepsCorruptError", "PickleRefusedError",
    "NoCheckpointError", "ClosedError", "CollectiveError", "SaveError", "StorageError", "UploadError", "DownloadError",
    "LocalStepVanishedError", "FolderChangedError",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(spotckpt.__all__) == PUBLIC
    assert len(spotckpt.__all__) == len(PUBLIC)  # no duplicates
    for name in spotckpt.__all__:
        assert hasattr(spotckpt, name), name
    # nothing public-looking is importable from the package without being in __all__,
    # except its submodules
    exported = {n for n in vars(spotckpt) if not n.startswith("_") and not inspect.ismodule(getattr(spotckpt, n))}
    assert exported <= PUBLIC, exported - PUBLIC


def test_error_tree() -> None:
    classes = {n: getattr(errors, n) for n in errors.__all__}
    assert set(classes) <= set(spotckpt.__all__)
    for name, cls in classes.items():
        assert issubclass(cls, spotckpt.SpotCkptError), name
        assert getattr(spotckpt, name) is cls, name
        assert name in (errors.__doc__ or ""), f"{name} is not drawn in errors.py's docstring"
    # every SpotCkptError subclass defined in errors.py is exported
    defined = {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.SpotCkptError)}
    assert defined == set(classes)
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.StateError, TypeError)
    assert issubclass(errors.ClosedError, RuntimeError)
    # a refusal by policy is not corruption: restore must not fall back past it
    assert not issubclass(errors.PickleRefusedError, errors.CheckpointCorruptError)
    assert issubclass(errors.UploadError, errors.StorageError) and issubclass(errors.DownloadError, errors.StorageError)
    assert issubclass(errors.LocalStepVanishedError, errors.StorageError)
    assert issubclass(errors.FolderChangedError, errors.SaveError)  # nothing committed, earlier steps intact
    assert errors.CheckpointCorruptError("x", path="/p").path == "/p"
    assert errors.PickleRefusedError("x", path="/q").path == "/q"
    assert errors.SaveError("x", step=3).step == 3 and errors.StorageError("x", key="k").key == "k"
    assert errors.NoCheckpointError("x", step=4).step == 4


# -- the layers: what each part of the package may import ---------------------------------------

#: Each internal folder and the parts it may import (besides itself). The public top-level
#: modules sit on top of the layers (and the base modules errors/events/policy/autopilot/_version
#: under them); the tools use everything and nothing uses the tools.
BASE = {"errors", "events", "policy", "autopilot", "_version"}
LAYERS = {
    "format": BASE,
    "ranks": BASE | {"format"},
    "core": BASE | {"format", "ranks"},
    "remote": BASE | {"format", "ranks", "core"},
}
PUBLIC_MODULES = {"__init__", "__main__", "_version", "cli", "data", "dcp", "errors", "events", "manager", "policy",
                  "autopilot", "integrations"}


def _imports(path: "Path") -> set[str]:
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spotckpt"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("spotckpt"))
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_layers_import_one_way() -> None:
    from pathlib import Path

    root = Path(spotckpt.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        here = rel.parts[0].removesuffix(".py")
        allowed = LAYERS.get(here)
        for mod in _imports(path):
            part = _part(mod)
            if part is None or part == here or part not in {p.name.removesuffix(".py") for p in root.iterdir()}:
                continue
            if here in BASE and part not in BASE:
                bad.append(f"{rel} imports {mod} (a base module imports only base modules)")
            elif allowed is not None and part not in allowed:
                bad.append(f"{rel} imports {mod} ({here}/ may import {sorted(allowed)})")
            elif here != "tools" and part == "tools" and rel.name not in ("cli.py", "__main__.py"):
                bad.append(f"{rel} imports {mod} (nothing but the entry points uses the tools)")
    assert bad == []


def test_the_top_level_is_the_public_surface() -> None:
    from pathlib import Path

    root = Path(spotckpt.__file__).parent
    top = {p.name.removesuffix(".py") for p in root.iterdir()
           if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert top - PUBLIC_MODULES == set(LAYERS) | {"tools"}, "a new top-level module: public (list it) or internal (a layer)"
    for folder in ("core", "remote", "ranks"):
        doc = __import__(f"spotckpt.{folder}", fromlist=["_"]).__doc__ or ""
        assert doc.startswith("Internal"), folder
