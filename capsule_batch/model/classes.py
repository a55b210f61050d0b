"""Class sets: the built-in Capsule Vision 2024 classes and custom lists from a file."""

from __future__ import annotations

from pathlib import Path

from capsule_batch.errors import BundleError

#: Capsule Vision 2024 classes in the official output order (the challenge's ground-truth and submission columns).
CE24_CLASSES: tuple[str, ...] = (
    "Angioectasia",
    "Bleeding",
    "Erosion",
    "Erythema",
    "Foreign Body",
    "Lymphangiectasia",
    "Normal",
    "Polyp",
    "Ulcer",
    "Worms",
)

BUILTIN_CLASS_SETS: dict[str, tuple[str, ...]] = {"ce24": CE24_CLASSES}


def resolve_classes(spec: str) -> list[str]:
    """Return class names for a built-in set name (``ce24``), a text file with one name per line, or a JSON file:
    a list of names, or an object of name -> output index (the seed's ``class_mapping.json``).

    Blank lines and lines starting with ``#`` are ignored; names must be unique.
    """
    if spec in BUILTIN_CLASS_SETS:
        return list(BUILTIN_CLASS_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise BundleError(f"{spec}: not a built-in class set ({', '.join(BUILTIN_CLASS_SETS)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot read class list: {e}") from e
    if path.suffix.lower() == ".json":
        return _json_classes(path, text)
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    validate_class_names(names, str(path))
    return names


def _json_classes(path: Path, text: str) -> list[str]:
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in data.values())
        if not ok or sorted(data.values()) != list(range(len(data))):
            raise BundleError(f"{path}: a class mapping must map each name to an index 0..N-1, each index once")
        data = sorted(data, key=lambda k: data[k])
    return validate_class_names(data, str(path))


def validate_class_names(names: object, where: str) -> list[str]:
    """Check that `names` is a non-empty list of unique, non-empty strings."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise BundleError(f"{where}: class names must be a non-empty list of non-empty strings")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(f"{where}: duplicate class names: {', '.join(dupes)}")
    return names
