"""Fuzz model.json parsing: any JSON document gives a bundle or a BundleError, never another exception."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsule_batch.errors import BundleError
from capsule_batch.model.bundle import BUNDLE_FORMAT, ModelBundle
from capsule_batch.model.classes import CE24_CLASSES

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)

VALID = {
    "format": BUNDLE_FORMAT,
    "arch": "eva02_tiny_patch14_224",
    "class_names": list(CE24_CLASSES),
    "normal_class": "Normal",
    "preprocess": {"input_size": 224, "resize": 224, "crop": "center", "interpolation": "bilinear",
                   "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "whole", "antialias": False},
    "thresholds": {"Bleeding": 0.2},
    "weights_sha256": "0" * 64,
    "model_args": {},
    "provenance": {},
}


def parse(meta: object) -> None:
    try:
        b = ModelBundle.from_json(meta, Path("/fuzz"))
    except BundleError:
        return
    # whatever was accepted must be self-consistent
    assert b.class_names and len(set(b.class_names)) == len(b.class_names)
    assert b.normal_class is None or b.normal_class in b.class_names
    assert b.preprocess.resize >= b.preprocess.input_size and min(b.preprocess.std) > 0
    assert all(0.0 <= v <= 1.0 for v in (b.thresholds or {}).values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json(meta):
    parse(meta)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VALID)), json_values)
def test_one_field_replaced(key, value):
    parse({**VALID, key: value})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VALID["preprocess"])), json_values)
def test_one_preprocess_field_replaced(key, value):
    parse({**VALID, "preprocess": {**VALID["preprocess"], key: value}})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_model_json_bytes(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("b")
    (d / "model.json").write_bytes(data)
    (d / "model.safetensors").write_bytes(b"")
    try:
        ModelBundle.load(d)
    except BundleError:
        pass


def test_valid_document_parses():
    b = ModelBundle.from_json(json.loads(json.dumps(VALID)), Path("/fuzz"))
    assert b.thresholds == {"Bleeding": 0.2} and b.preprocess.mean == (0.5, 0.5, 0.5)
