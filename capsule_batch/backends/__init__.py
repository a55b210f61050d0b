"""Inference engines behind one interface: `Engine.infer(pixels) -> probs (N, C)`.

See `base.py` for the contract and `create_engine` for selection.
"""

from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.backends.select import create_engine

__all__ = ["BACKENDS", "Engine", "create_engine"]
