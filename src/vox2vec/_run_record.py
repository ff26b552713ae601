"""Run records: what produced a results folder or a checkpoint (model fingerprint, settings), compared on a rerun or
a resume so that results of one run are never returned for another, and a resumed run is the run it claims to be."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["changed_settings", "describe_changes", "record_digest", "vox2vec_version"]


def _flat(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value))  # tuples → lists, as after a JSON round trip
    return flat


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any],
                     ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(setting, old value, new value)`` for every dotted setting (``train.lr``) that differs, except those named
    in ``ignore`` (exact names, or section prefixes ending in ``.``); a missing setting reads as None."""
    skipped = tuple(ignore)
    before, after = _flat(old), _flat(new)
    return [(name, before.get(name), after.get(name)) for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name)
            and not any(name == s or (s.endswith(".") and name.startswith(s)) for s in skipped)]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``train.lr 0.0003 → 0.001, train.temperature 0.1 → 0.2`` (the first ``limit``, then how many more)."""
    shown = ", ".join(f"{name} {json.dumps(a)} → {json.dumps(b)}" for name, a, b in changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def vox2vec_version() -> str:
    """The installed vox2vec version a record names ("source" when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vox2vec")
    except PackageNotFoundError:
        return "source"


def record_digest(record: Mapping[str, Any], ignore: Iterable[str] = ("vox2vec",)) -> str:
    """A short digest of a run record (without the ``ignore`` keys): names folders that belong to one run."""
    kept = {k: v for k, v in record.items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
