"""Where checkpoints go: arguments, ``SPOTCKPT_*`` environment variables, SageMaker discovery.

Resolution order of the local directory: the argument, then ``$SPOTCKPT_LOCAL_DIR``, then
``LocalPath`` in SageMaker's ``/opt/ml/input/config/checkpointconfig.json``, then
``/opt/ml/checkpoints``. The S3 URI: the argument, then ``$SPOTCKPT_S3_URI``; None means local only
(e.g. when SageMaker's own checkpoint sync uploads ``LocalPath``).

``$SPOTCKPT_SAGEMAKER_CONFIG_DIR`` replaces ``/opt/ml/input/config`` (for tests and other
platforms that lay out the same files).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotckpt.errors import ConfigError

__all__ = [
    "DEFAULT_LOCAL_DIR",
    "SageMakerInfo",
    "sagemaker_info",
    "resolve_local_dir",
    "resolve_s3_uri",
    "is_s3_uri",
    "env_float",
    "env_bool",
]

log = logging.getLogger(__name__)

DEFAULT_LOCAL_DIR = "/opt/ml/checkpoints"
_SM_CONFIG_DIR = "/opt/ml/input/config"


@dataclass(frozen=True, kw_only=True)
class SageMakerInfo:
    """What SageMaker tells the container (all optional)."""

    checkpoint_local_path: str | None
    checkpoint_s3_uri: str | None
    current_host: str | None
    hosts: tuple[str, ...]
    job_name: str | None

    @property
    def checkpoint_sync_active(self) -> bool:
        """True when SageMaker itself syncs ``LocalPath`` to S3 (CheckpointConfig was given)."""
        return self.checkpoint_local_path is not None or self.checkpoint_s3_uri is not None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("spotckpt: ignoring unreadable %s (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def sagemaker_info() -> SageMakerInfo:
    cfg_dir = Path(os.environ.get("SPOTCKPT_SAGEMAKER_CONFIG_DIR", _SM_CONFIG_DIR))
    ck = _read_json(cfg_dir / "checkpointconfig.json") or {}
    rc = _read_json(cfg_dir / "resourceconfig.json") or {}
    hosts_env = os.environ.get("SM_HOSTS")
    hosts: list[str] = list(rc.get("hosts") or [])
    if not hosts and hosts_env:
        try:
            hosts = list(json.loads(hosts_env))
        except ValueError:
            hosts = []
    lp = ck.get("LocalPath")
    s3 = ck.get("S3Uri")
    return SageMakerInfo(
        checkpoint_local_path=lp if isinstance(lp, str) and lp else (DEFAULT_LOCAL_DIR if ck else None),
        checkpoint_s3_uri=s3 if isinstance(s3, str) and s3 else None,
        current_host=rc.get("current_host") or os.environ.get("SM_CURRENT_HOST"),
        hosts=tuple(str(h) for h in hosts),
        job_name=os.environ.get("TRAINING_JOB_NAME"),
    )


def resolve_local_dir(arg: str | os.PathLike[str] | None = None) -> Path:
    """``local_dir``: the argument, else $SPOTCKPT_LOCAL_DIR, else SageMaker's LocalPath, else
    /opt/ml/checkpoints. An empty or blank value is a mistake (ConfigError), never a silent
    fallback to the default directory."""
    if arg is not None:
        if not os.fspath(arg).strip():
            raise ConfigError(f"local_dir={os.fspath(arg)!r} is empty; pass a directory, or None for the default "
                              "($SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath, /opt/ml/checkpoints)")
        return Path(arg).expanduser()
    env = os.environ.get("SPOTCKPT_LOCAL_DIR")
    if env is not None and env != "":
        if not env.strip():
            raise ConfigError("SPOTCKPT_LOCAL_DIR is blank; set it to a directory or unset it")
        return Path(env).expanduser()
    sm = sagemaker_info()
    if sm.checkpoint_local_path:
        return Path(sm.checkpoint_local_path)
    return Path(DEFAULT_LOCAL_DIR)


def resolve_s3_uri(arg: str | None = None) -> str | None:
    uri = arg if arg else os.environ.get("SPOTCKPT_S3_URI") or None
    if uri is not None and not is_s3_uri(uri):
        raise ConfigError(f"S3 URI must look like s3://bucket/prefix, got {uri!r} (argument or SPOTCKPT_S3_URI)")
    return uri


def is_s3_uri(src: str) -> bool:
    """Whether ``src`` (a command-line source or target) names S3: True for ``s3://...``, False
    for a local path. Something that starts like an S3 URI but is not one (``S3://b/p``,
    ``s3:/b/p``, ``s3:b``) is a ConfigError naming the fix, not a local directory of that name."""
    if src.startswith("s3://"):
        return True
    if src[:3].lower() == "s3:":
        rest = src[3:].lstrip("/")
        raise ConfigError(f"malformed S3 URI {src!r}: an S3 URI looks like s3://bucket/prefix (lower-case "
                          f"'s3', two slashes) -- did you mean s3://{rest}?")
    return False


def env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"${name} must be a number, got {raw!r}") from exc


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"${name} must be 0/1/true/false, got {raw!r}")
