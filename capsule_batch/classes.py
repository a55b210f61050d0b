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
    """Return class names for a built-in set name (``ce24``) or a text file with one name per line.

    Blank lines and lines starting with ``#`` are ignored; names must be unique.
    """
    if spec in BUILTIN_CLASS_SETS:
        return list(BUILTIN_CLASS_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise BundleError(f"{spec}: not a built-in class set ({', '.join(BUILTIN_CLASS_SETS)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot read class list: {e}") from e
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    validate_class_names(names, str(path))
    return names


def validate_class_names(names: object, where: str) -> list[str]:
    """Check that `names` is a non-empty list of unique, non-empty strings."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise BundleError(f"{where}: class names must be a non-empty list of non-empty strings")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(f"{where}: duplicate class names: {', '.join(dupes)}")
    return names
