"""Verified cell caches: a cell's folder is reused only when its key matches and every file it
wrote is still there, byte for byte.

When a cell completes, `record_outputs` writes cell_manifest.json last (atomically): the cell's
key and the size and SHA-256 of every file in the folder. `stale_reason` checks them before
reuse, so a truncated weights file or a deleted predictions file is recomputed, not trusted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from . import __version__, io

MANIFEST = "cell_manifest.json"
SCHEMA = "loracombench.cell/1"
# Libraries whose versions can change a model cell's numbers (kernels, tokenisation, LoRA maths).
MODEL_LIBRARIES = ("torch", "transformers", "peft")
BASELINE_LIBRARIES = ("scikit-learn", "numpy")
# Merges also solve eigenproblems in scipy (merging/ops.py); a composition adds its own (Composition.libraries).
COMPOSITION_LIBRARIES = (*MODEL_LIBRARIES, "scipy", "numpy")
NOT_COMPUTED = "not computed yet"
KEY_CHANGED = "its inputs or settings changed"
# Why a cell is recomputed in the ordinary course; any other reason means its files were damaged.
ORDINARY_REASONS = (NOT_COMPUTED, KEY_CHANGED)


def code_versions(libraries: tuple[str, ...] = MODEL_LIBRARIES) -> dict:
    """The package's and the given libraries' versions, for cache keys."""
    versions = {"loracombench": __version__}
    for name in libraries:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_digest(file: Path) -> dict:
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"size": file.stat().st_size, "sha256": sha.hexdigest()}


def _outputs(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST
                  and not any(io.is_leftover(part) for part in f.relative_to(folder).parts))


def record_outputs(folder: str | Path, key: str) -> Path:
    """Mark a completed cell: its key and every file's size and hash, written last."""
    folder = Path(folder)
    files = {f.relative_to(folder).as_posix(): file_digest(f) for f in _outputs(folder)}
    return io.write_json(folder / MANIFEST, {"schema": SCHEMA, "key": key, "files": files})


def stale_reason(folder: str | Path, key: str) -> str | None:
    """None when the folder holds the cell `key` intact; else why it must be recomputed."""
    folder = Path(folder)
    try:
        manifest = io.read_json(folder / MANIFEST)
        recorded_key, files = manifest["key"], manifest["files"]
    except FileNotFoundError:
        return NOT_COMPUTED
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    if recorded_key != key:
        return KEY_CHANGED
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} changed size ({file.stat().st_size} bytes, {expected['size']} recorded)"
        if file_digest(file)["sha256"] != expected["sha256"]:
            return f"{name} changed content (SHA-256 differs from the recorded one)"
    return None


def damage(folder: str | Path) -> str | None:
    """Why a finished cell's files no longer match what its manifest recorded when the cell was
    written, whatever its key; None when they match or the folder has no manifest."""
    folder = Path(folder)
    try:
        key = io.read_json(folder / MANIFEST)["key"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    return stale_reason(folder, key)


def cached(folder: str | Path, key: str) -> bool:
    return stale_reason(folder, key) is None
