"""The engine store: compiled artefacts (ONNX exports, TensorRT plans) with a meta.json each.

Layout (root `engines/` by default, or `$CAPSULE_BATCH_ENGINES`, or `--engine-dir DIR`):

    engines/<bundle name>/<entry>/meta.json + the artefact file
    engines/timing-cache/<tensorrt version>-<gpu>.cache

An entry is named by what it is (`onnx-fp32-opset17-legacy`, `tensorrt-fp16-h100-sxm-sm90-b1-256-512`),
and its meta.json says what it was built from: the bundle's weights sha256, architecture and
arguments, backend and version, GPU name and compute capability, precision, batch profile, and the
artefact's own sha256. Before anything is loaded, the stored identity is compared with what the run
needs; a difference (bundle changed, TensorRT upgraded, other GPU) is stale: rebuilt (policy `auto`)
or refused with the reasons (policy `never`). An artefact whose bytes do not match its meta.json is
corrupt and refused with a clear error; it is never loaded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from capsule_batch import __version__
from capsule_batch.errors import EngineError
from capsule_batch.files import publish_dir
from capsule_batch.model.bundle import ModelBundle, sha256_file

_logger = logging.getLogger(__name__)

STORE_FORMAT = "capsule-batch-engine/1"
META_FILE = "meta.json"
ENV_VAR = "CAPSULE_BATCH_ENGINES"
POLICIES = ("auto", "never", "force")
MAX_META_BYTES = 1 << 20


def default_root() -> Path:
    """`$CAPSULE_BATCH_ENGINES`, else the checkout's `engines/` (beside the package), else a user cache folder
    (an installed package has no checkout) — never a folder relative to wherever the command was started."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    checkout = Path(__file__).resolve().parents[2] / "engines"  # this file: capsule_batch/backends/engine_store.py
    if (checkout / "README.md").is_file():
        return checkout
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "capsule-batch" / "engines"


def slug(text: str) -> str:
    """A file-name-safe lower-case tag: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def bundle_identity(bundle: ModelBundle) -> dict[str, Any]:
    """What an artefact built from `bundle` depends on."""
    return {
        "bundle_sha256": bundle.sha256,
        "arch": bundle.arch,
        "model_args": bundle.model_args,
        "num_classes": bundle.num_classes,
        "input_size": bundle.preprocess.input_size,
    }


def _describe_value(v: Any) -> str:
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
        return v[:12] + "..."
    return json.dumps(v, sort_keys=True) if not isinstance(v, str) else v


def mismatches(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Reasons the stored `meta` cannot serve `expected` (empty when it can)."""
    out = []
    for k, want in expected.items():
        have = meta.get(k)
        if have != want:
            out.append(f"{k} is {_describe_value(have)}, needed {_describe_value(want)}")
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that ranks of one job sharing a store build an engine once, not N times."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EngineStore:
    """A folder of engine entries. `ensure` is the one way artefacts get loaded or (re)built."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    @classmethod
    def of(cls, store: EngineStore | str | os.PathLike | None) -> EngineStore:
        """`store` itself when it is an EngineStore, else the store at that folder (None: the default root)."""
        return store if isinstance(store, EngineStore) else cls(store)

    def entry_dir(self, bundle: ModelBundle, entry: str) -> Path:
        return self.root / slug(bundle.name) / entry

    def timing_cache_path(self, tag: str) -> Path:
        return self.root / "timing-cache" / f"{slug(tag)}.cache"

    @staticmethod
    def read_meta(entry_dir: Path) -> dict[str, Any]:
        path = entry_dir / META_FILE
        try:
            if path.stat().st_size > MAX_META_BYTES:
                raise EngineError(f"{path}: larger than {MAX_META_BYTES} bytes")
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EngineError(f"{path}: not valid JSON ({e}); delete the folder or rebuild with --force") from e
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise EngineError(f"{path}: not an engine meta.json (format {STORE_FORMAT} expected)")
        return meta

    @staticmethod
    def verify_artifact(entry_dir: Path, meta: dict[str, Any]) -> Path:
        """The artefact's path, after proving its bytes are the ones meta.json describes."""
        name = meta.get("file")
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise EngineError(f"{entry_dir / META_FILE}: no valid 'file' entry")
        path = entry_dir / name
        hint = "delete it or rebuild with `capsule-batch engine build --force`"
        if not path.is_file():
            raise EngineError(f"{path}: engine file is missing ({hint})")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise EngineError(f"{path}: corrupt engine file: {size} bytes, meta.json says {meta.get('bytes')} ({hint})")
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise EngineError(f"{path}: corrupt engine file: sha256 {digest[:12]}... does not match meta.json "
                              f"({str(meta.get('sha256'))[:12]}...) ({hint})")
        return path

    def ensure(
        self,
        bundle: ModelBundle,
        entry: str,
        expected: dict[str, Any],
        build: Callable[[Path], tuple[str, dict[str, Any]]],
        policy: str = "auto",
    ) -> tuple[Path, dict[str, Any]]:
        """Return (artefact path, meta) for `entry`, building it when missing or stale (per `policy`).

        `expected` holds the identity fields meta.json must match; `build(tmpdir)` writes the artefact
        into `tmpdir` and returns (file name, extra meta fields to record).
        """
        if policy not in POLICIES:
            raise EngineError(f"unknown rebuild policy {policy!r} (choose from {', '.join(POLICIES)})")
        d = self.entry_dir(bundle, entry)
        with _locked(d.parent / f".{d.name}.lock"):
            return self._ensure_locked(d, expected, build, policy)

    def _ensure_locked(self, d: Path, expected: dict[str, Any], build: Callable[[Path], tuple[str, dict[str, Any]]],
                       policy: str) -> tuple[Path, dict[str, Any]]:
        if (d / META_FILE).exists() and policy != "force":
            meta = self.read_meta(d)
            reasons = mismatches(meta, expected)
            if not reasons:
                return self.verify_artifact(d, meta), meta
            if policy == "never":
                raise EngineError(f"{d}: stale engine, not loaded: {'; '.join(reasons)} "
                                  "(rebuild with `capsule-batch engine build`)")
            _logger.warning("%s: stale engine (%s); rebuilding", d, "; ".join(reasons))
        elif policy == "never":
            raise EngineError(f"{d}: no engine built (run `capsule-batch engine build`)")
        return self._build(d, expected, build)

    def _build(self, d: Path, expected: dict[str, Any], build: Callable[[Path], tuple[str, dict[str, Any]]],
               ) -> tuple[Path, dict[str, Any]]:
        import torch

        d.parent.mkdir(parents=True, exist_ok=True)
        with publish_dir(d) as tmp:
            name, extra = build(tmp)
            art = tmp / name
            meta = {"format": STORE_FORMAT, **expected, **extra, "file": name, "bytes": art.stat().st_size,
                    "sha256": sha256_file(art),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "software": f"capsule-batch {__version__}", "torch": torch.__version__}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _logger.info("built %s (%.1f MB)", d / name, meta["bytes"] / 1e6)
        return d / name, meta

    def entries(self, verify: bool = False) -> list[dict[str, Any]]:
        """Every entry with its meta.json, path and status (`ok`, or why it would be refused).

        `verify` hashes each artefact (slow for large ones); otherwise only its size is checked.
        """
        out = []
        if not self.root.is_dir():
            return out
        for meta_path in sorted(self.root.glob(f"*/*/{META_FILE}")):
            d = meta_path.parent
            row: dict[str, Any] = {"path": str(d)}
            try:
                meta = self.read_meta(d)
                row.update(meta)
                if verify:
                    self.verify_artifact(d, meta)
                else:
                    art = d / str(meta.get("file"))
                    if not art.is_file() or art.stat().st_size != meta.get("bytes"):
                        raise EngineError(f"{art}: missing or wrong size")
                row["status"] = "ok"
            except (EngineError, OSError) as e:
                row["status"] = f"bad: {e}"
            out.append(row)
        return out
