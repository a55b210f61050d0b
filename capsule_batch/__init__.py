"""capsule_batch: whole-recording triage of video capsule endoscopy.

The public face for Python users (imported on first use, so `import capsule_batch` stays cheap; heavy optional
packages such as DALI, TensorRT and ONNX Runtime are imported only by the source or backend that needs them):

    import capsule_batch as cb
    batch = cb.run_recordings(["patient.mp4"], "bundles/ce24", "out/")     # triage recordings into studies
    with cb.open_study("out/patient.h5") as study: ...                    # read a study (probabilities, events)
    bundle = cb.load_bundle("bundles/ce24")                                # a model bundle (weights, classes, ...)

The packages read as the pipeline (docs/design.md has the map): sources/ -> model/ -> backends/ -> run/ -> study/
-> evaluation/, review/, with cli/ on top and the plumbing (errors, devices, files, registry, logs, exits) beside.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute)
_PUBLIC = {
    "run_recordings": ("capsule_batch.run.runner", "run_recordings"),
    "EngineSpec": ("capsule_batch.run.runner", "EngineSpec"),
    "RunOptions": ("capsule_batch.run.pipeline", "RunOptions"),
    "StudyReader": ("capsule_batch.study.store", "StudyReader"),
    "ModelBundle": ("capsule_batch.model.bundle", "ModelBundle"),
    "create_engine": ("capsule_batch.backends.select", "create_engine"),
    "open_source": ("capsule_batch.sources", "open_source"),
}

__all__ = ["__version__", "load_bundle", "open_study", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'capsule_batch' has no attribute {name!r}")


def open_study(path: Any) -> Any:
    """A study file for reading (a `StudyReader`; use it as a context manager)."""
    from capsule_batch.study.store import StudyReader

    return StudyReader(path)


def load_bundle(path: Any) -> Any:
    """A model bundle folder (`ModelBundle`): its weights are read when a model or engine is made from it."""
    from capsule_batch.model.bundle import ModelBundle

    return ModelBundle.load(path)
