"""ModelBundle: a self-describing model folder (`model.safetensors` + `model.json`).

The bundle owns everything a run needs to know about the model: the timm architecture (and any
constructor arguments), the class names in output order, the preprocessing the weights were trained
with, per-class thresholds, and provenance. Checkpoints are read without unpickling code:
safetensors, or `torch.load(weights_only=True)` with a short allow-list of inert metadata classes
(Lightning's hyper-parameter containers) mapped to stubs that run nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from capsule_batch import __version__
from capsule_batch.errors import BundleError
from capsule_batch.files import output_folder_problem, publish_dir
from capsule_batch.model.classes import CE24_CLASSES, validate_class_names
from capsule_batch.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, seed_preprocess

_logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "capsule-batch-bundle/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MAX_META_BYTES = 1 << 20

#: Globals that Lightning/timm checkpoints carry as metadata (hyper-parameters, CLI args). They are
#: replaced by `_Inert` while unpickling, so no constructor of theirs runs; their values are discarded.
_INERT_GLOBAL_PREFIXES = (
    "lightning.",
    "lightning_fabric.",
    "pytorch_lightning.",
    "omegaconf.",
    "argparse.Namespace",
    "pathlib.",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.",
)


#: Allow-listed classes that are dict subclasses: torch's weights-only unpickler fills only exact dicts,
#: so these are rebuilt as plain dicts.
_DICT_LIKE_SUFFIXES = (".AttributeDict",)


class _Inert:
    """Stands in for an allow-listed metadata class while unpickling; stores nothing, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _stub_for(global_name: str) -> type:
    return dict if global_name.endswith(_DICT_LIKE_SUFFIXES) else _Inert


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= (100 << 20) and head[8:9] == b"{"


def _torch_load_safely(path: Path) -> Any:
    import pickle
    import zipfile

    import torch
    import torch.serialization as ser

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise BundleError(f"{path}: not a PyTorch checkpoint or safetensors file ({_short(e)})") from e
    except Exception as e:  # a garbage file can make the unpickler fail in many ways; none is a crash
        raise BundleError(f"{path}: not a PyTorch checkpoint or safetensors file ({_short(e)})") from e

    if zipfile.is_zipfile(path):
        unsafe = list(ser.get_unsafe_globals_in_checkpoint(str(path)))
    else:
        unsafe = re.findall(r"GLOBAL ([\w.]+)", msg) or re.findall(r"global: ([\w.]+)", msg)
    if not unsafe:
        raise BundleError(f"{path}: refused to unpickle: {_short(msg)}")
    dangerous = [g for g in unsafe if not g.startswith(_INERT_GLOBAL_PREFIXES)]
    if dangerous:
        raise BundleError(
            f"{path}: refused: the checkpoint would import {', '.join(sorted(set(dangerous)))} while loading "
            "(pickled code is never executed); re-save the weights as safetensors or a plain state_dict"
        )
    _logger.info("%s: ignoring metadata objects %s", path, ", ".join(sorted(set(unsafe))))
    try:
        with ser.safe_globals([(_stub_for(g), g) for g in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"{path}: refused to unpickle: {_short(e)}") from e


def _short(e: object, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


@dataclass
class Checkpoint:
    """Tensors of a checkpoint in timm naming, plus what format they came from."""

    state_dict: dict[str, Any]
    format: str  # "lightning-seed", "timm", "safetensors"
    extra: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a seed Lightning .ckpt, a timm/torch state_dict (possibly wrapped) or a safetensors file.

    Keys are normalised to timm names: `backbone.X` -> `X`, `classifier.linear.*` -> `head.*`,
    and a DDP `module.` prefix is dropped.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such file")
    if path.is_dir():
        raise BundleError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise BundleError(f"{path}: empty file")

    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{path}: broken safetensors file ({_short(e)})") from e
        fmt = "safetensors"
    else:
        obj = _torch_load_safely(path)
        if not isinstance(obj, dict):
            raise BundleError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
        inner = None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                inner = obj[key]
                break
        raw = inner if inner is not None else obj
        fmt = "timm"
        if any(str(k).startswith("backbone.") for k in raw) and any(str(k).startswith("classifier.") for k in raw):
            fmt = "lightning-seed"
    non_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if non_tensors or not raw:
        what = f"non-tensor entries {non_tensors[:3]}" if non_tensors else "no tensors"
        raise BundleError(f"{path}: not a model state_dict ({what})")

    sd: dict[str, Any] = {}
    for k, v in raw.items():
        k = str(k)
        k = k.removeprefix("module.")
        if k.startswith("backbone."):
            k = k.removeprefix("backbone.")
        elif k.startswith("classifier.linear."):
            k = "head." + k.removeprefix("classifier.linear.")
        if k in sd:
            raise BundleError(f"{path}: two tensors map to the key {k!r}")
        sd[k] = v
    return Checkpoint(sd, fmt)


# ----------------------------------------------------------------------------------------------
# Architectures


def check_arch(arch: str) -> None:
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        close = difflib.get_close_matches(str(arch), timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BundleError(f"unknown timm architecture {arch!r}{hint}")


def create_model(arch: str, num_classes: int, model_args: dict[str, Any] | None = None) -> Any:
    """A randomly initialised timm model (never downloads weights)."""
    import timm

    check_arch(arch)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **(model_args or {}))
    except TypeError as e:
        raise BundleError(f"{arch}: bad model_args {model_args}: {_short(e)}") from e


def fit_state_dict(model: Any, sd: dict[str, Any], where: str, arch: str) -> None:
    """Load `sd` into `model` strictly; refuse with the mismatching keys named."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mism = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mism:
        parts = []
        if mism:
            shown = ", ".join(f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in mism[:4])
            more = ", ..." if len(mism) > 4 else ""
            parts.append(f"{len(mism)} tensors have other shapes (checkpoint vs model: {shown}{more})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
            )
        raise BundleError(f"{where}: weights do not fit {arch}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


TRANSFORMS = ("seed", "timm")


def default_preprocess(arch: str, model_args: dict[str, Any] | None, norm: str,
                       transform: str | None = None) -> Preprocess:
    """Preprocessing for an import. `norm`: `imagenet` (the seed's mean/std) or `clip`/`timm` (the arch's pretrained
    cfg). `transform`: `seed` (whole frame, bicubic as OpenCV's INTER_CUBIC, no antialiasing: the seed's validation
    and inference transform) or `timm` (timm's eval transform for the arch: shorter side to size / crop_pct, the
    cfg's interpolation, antialiased, center crop). Default: `seed` with `imagenet`, else `timm`."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    cfgd = cfg.to_dict() if cfg is not None else {}
    size = int((model_args or {}).get("img_size") or cfgd.get("input_size", (3, 224, 224))[-1])
    if norm == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif norm in ("timm", "clip"):
        mean, std = tuple(cfgd.get("mean", IMAGENET_MEAN)), tuple(cfgd.get("std", IMAGENET_STD))
    else:
        raise BundleError(f"unknown normalisation {norm!r} (imagenet, timm)")
    transform = transform or ("seed" if norm == "imagenet" else "timm")
    if transform == "seed":
        return replace(seed_preprocess(size), mean=mean, std=std)
    if transform != "timm":
        raise BundleError(f"unknown transform {transform!r} ({', '.join(TRANSFORMS)})")
    interp = cfgd.get("interpolation", "bilinear")
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bilinear"
    resize = max(size, int(math.floor(size / float(cfgd.get("crop_pct") or 1.0))))
    return Preprocess(input_size=size, resize=resize, resize_mode="shorter", crop="center", interpolation=interp,
                      antialias=True, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# The bundle


@dataclass
class ModelBundle:
    """A loaded bundle folder. Use `ModelBundle.load(path)`; `create_model()` builds the torch module."""

    path: Path
    arch: str
    class_names: list[str]
    preprocess: Preprocess
    weights_sha256: str
    normal_class: str | None = "Normal"
    thresholds: dict[str, float] | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sha256(self) -> str:
        """Identity of the weights; engines and study files refer to the bundle by it."""
        return self.weights_sha256

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "arch": self.arch,
            "model_args": self.model_args,
            "class_names": self.class_names,
            "normal_class": self.normal_class,
            "preprocess": self.preprocess.to_dict(),
            "thresholds": self.thresholds,
            "weights_sha256": self.weights_sha256,
            "provenance": self.provenance,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelBundle:
        """Read and validate model.json; the weights are checked when the model is created."""
        path = Path(path)
        meta_path = path / META_FILE
        if not path.exists():
            raise BundleError(f"{path}: no such bundle folder")
        if not path.is_dir() or not meta_path.is_file():
            raise BundleError(f"{path}: not a model bundle (expected a folder with {META_FILE} and {WEIGHTS_FILE})")
        if not (path / WEIGHTS_FILE).is_file():
            raise BundleError(f"{path}: {WEIGHTS_FILE} is missing")
        if meta_path.stat().st_size > MAX_META_BYTES:
            raise BundleError(f"{meta_path}: larger than {MAX_META_BYTES} bytes")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{meta_path}: not valid JSON ({_short(e)})") from e
        return cls.from_json(meta, path)

    @classmethod
    def from_json(cls, meta: object, path: Path) -> ModelBundle:
        where = str(path / META_FILE)
        if not isinstance(meta, dict):
            raise BundleError(f"{where}: must hold a JSON object")
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{where}: unsupported format {meta.get('format')!r} (expected {BUNDLE_FORMAT})")
        arch = meta.get("arch")
        if not isinstance(arch, str) or not arch:
            raise BundleError(f"{where}: 'arch' must be a timm model name")
        names = validate_class_names(meta.get("class_names"), f"{where}: class_names")
        normal = meta.get("normal_class")
        if normal is not None and normal not in names:
            raise BundleError(f"{where}: normal_class {normal!r} is not one of the class names")
        thresholds = meta.get("thresholds")
        if thresholds is not None:
            if not isinstance(thresholds, dict):
                raise BundleError(f"{where}: thresholds must be an object of class -> number")
            for k, v in thresholds.items():
                if k not in names:
                    raise BundleError(f"{where}: threshold for unknown class {k!r}")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0) or math.isnan(v):
                    raise BundleError(f"{where}: threshold for {k!r} must be a number in [0, 1], got {v!r}")
            thresholds = {k: float(v) for k, v in thresholds.items()}
        model_args = meta.get("model_args") or {}
        if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
            raise BundleError(f"{where}: model_args must be an object")
        sha = meta.get("weights_sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise BundleError(f"{where}: weights_sha256 must be a sha256 hex digest")
        prov = meta.get("provenance") or {}
        if not isinstance(prov, dict):
            raise BundleError(f"{where}: provenance must be an object")
        pre = Preprocess.from_dict(meta.get("preprocess", {}), f"{where}: preprocess")
        return cls(
            path=path,
            arch=arch,
            class_names=list(names),
            preprocess=pre,
            weights_sha256=sha,
            normal_class=normal,
            thresholds=thresholds,
            model_args=dict(model_args),
            provenance=dict(prov),
        )

    def verify_weights(self) -> None:
        """Refuse weights that changed since the bundle was written."""
        actual = sha256_file(self.weights_path)
        if actual != self.weights_sha256:
            expected = self.weights_sha256[:12]
            raise BundleError(f"{self.weights_path}: sha256 {actual[:12]}... does not match model.json ({expected}...)")

    def create_model(self, verify: bool = True) -> Any:
        """The eval-mode torch module with the bundle's weights, on CPU in float32."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if verify:
            self.verify_weights()
        try:
            sd = load_file(str(self.weights_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{self.weights_path}: broken safetensors file ({_short(e)})") from e
        head = sd.get("head.weight")
        if head is not None and head.shape[0] != self.num_classes:
            raise BundleError(
                f"{self.path}: model.json lists {self.num_classes} classes but the weights have {head.shape[0]} outputs"
            )
        model = create_model(self.arch, self.num_classes, self.model_args)
        fit_state_dict(model, sd, str(self.path), self.arch)
        return model.eval()

    def info(self) -> dict[str, Any]:
        """What `capsule-batch model info` prints."""
        d = self.to_json()
        d["path"] = str(self.path)
        d["weights_bytes"] = self.weights_path.stat().st_size
        return d


def save_bundle(
    out: str | os.PathLike,
    state_dict: dict[str, Any],
    *,
    arch: str,
    class_names: list[str],
    preprocess: Preprocess,
    normal_class: str | None = "Normal",
    thresholds: dict[str, float] | None = None,
    model_args: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ModelBundle:
    """Write a bundle folder atomically (a temporary sibling renamed into place) and return it loaded."""
    import timm
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    why = output_folder_problem(parent)
    if why:
        raise BundleError(f"{parent}: {why}")
    with publish_dir(out) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        prov = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "software": f"capsule-batch {__version__}",
            "torch": torch.__version__,
            "timm": timm.__version__,
        }
        prov.update(provenance or {})
        bundle = ModelBundle(
            path=out,
            arch=arch,
            class_names=list(class_names),
            preprocess=preprocess,
            weights_sha256=sha256_file(tmp / WEIGHTS_FILE),
            normal_class=normal_class if normal_class in class_names else None,
            thresholds=thresholds,
            model_args=dict(model_args or {}),
            provenance=prov,
        )
        (tmp / META_FILE).write_text(json.dumps(bundle.to_json(), indent=2) + "\n", encoding="utf-8")
    return ModelBundle.load(out)


def import_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str,
    class_names: list[str] | None = None,
    normal_class: str | None = "Normal",
    model_args: dict[str, Any] | None = None,
    norm: str | None = None,
    transform: str | None = None,
    field_of_view: str = "full",
    overwrite: bool = False,
) -> ModelBundle:
    """Import a checkpoint into a bundle after proving its tensors fit `arch` exactly.

    `norm` picks the mean/std and `transform` the resize (see `default_preprocess`): the seed's Lightning
    checkpoints were validated with ImageNet statistics and the seed's whole-frame bicubic resize (the defaults for
    them); other formats default to the arch's timm pretrained config and timm's eval transform.
    """
    check_arch(arch)
    names = list(class_names or CE24_CLASSES)
    ckpt = read_checkpoint(src)
    head = ckpt.state_dict.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != len(names):
        raise BundleError(
            f"{src}: the classifier has {head.shape[0]} outputs but {len(names)} class names were given"
        )
    model = create_model(arch, len(names), model_args)
    fit_state_dict(model, ckpt.state_dict, str(src), arch)
    seed = ckpt.format == "lightning-seed"
    norm = norm or ("imagenet" if seed else "timm")
    transform = transform or ("seed" if seed else "timm")
    pre = default_preprocess(arch, model_args, norm, transform)
    if field_of_view != "full":  # only for weights trained on field-of-view crops (capsule_batch/model/fov.py)
        pre = dataclasses.replace(pre, field_of_view=field_of_view)
    prov = {
        "source": Path(src).name,
        "source_sha256": sha256_file(src),
        "source_format": ckpt.format,
        "normalisation": norm,
        "transform": transform,
    }
    return save_bundle(
        out,
        model.state_dict(),
        arch=arch,
        class_names=names,
        preprocess=pre,
        normal_class=normal_class,
        model_args=model_args,
        provenance=prov,
        overwrite=overwrite,
    )
