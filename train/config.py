"""Layered configuration: defaults.yaml, an experiment file of differences, then `key=value` overrides.

The resolved config is written into the run folder together with the git revision, so a run describes
itself, as every artefact here does (bundles: model.json, engines: meta.json, studies: their attributes).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from capsule_batch.errors import CapsuleError

_logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"


class ConfigError(CapsuleError):
    """A config file or override that cannot be used."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        from capsule_batch.errors import MissingPackageError

        raise MissingPackageError("pyyaml", "train", "reading training configs") from None
    return yaml


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    yaml = _yaml()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping at the top level")
    return data


def merge(base: dict[str, Any], diff: dict[str, Any], where: str, path: str = "") -> dict[str, Any]:
    """Deep-merge `diff` into a copy of `base`; a key the defaults do not know is an error (catches typos)."""
    out = copy.deepcopy(base)
    for k, v in diff.items():
        key = f"{path}{k}"
        if k not in out:
            raise ConfigError(f"{where}: unknown config key {key!r}")
        if isinstance(out[k], dict) and isinstance(v, dict) and k != "model_args":
            out[k] = merge(out[k], v, where, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """`a.b.c=value` (value parsed as YAML); list items are addressed by index (`data.train.0.root=...`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = _yaml().safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = cfg
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} has no item {p}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            free = node is not cfg and _free_form(parts[:i])
            if p not in node and not free:
                raise ConfigError(f"override {item!r}: unknown config key {'.'.join(parts[: i + 1])!r}")
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping")


def _free_form(parts: list[str]) -> bool:
    """Mappings whose keys the defaults cannot list: model constructor args and dataset specs."""
    return parts[-1:] == ["model_args"] or (len(parts) >= 3 and parts[0] == "data")


def load_config(experiment: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = read_yaml(DEFAULTS)
    if experiment is not None:
        cfg = merge(cfg, read_yaml(experiment), str(experiment))
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def git_revision() -> str:
    """The checkout's commit (with `-dirty` for uncommitted changes), or `unknown` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_resolved(cfg: dict[str, Any], run_dir: Path, stage: str) -> None:
    """Write config.yaml (the resolved config plus where and how the run was started) into the run folder."""
    meta = {
        "stage": stage,
        "git_revision": git_revision(),
        "argv": sys.argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = _yaml().safe_dump({"meta": meta, **cfg}, sort_keys=False)
    (run_dir / "config.yaml").write_text(text, encoding="utf-8")
