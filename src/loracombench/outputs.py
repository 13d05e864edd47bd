"""Where a command may write: the one check every `--out` passes before any work starts.

An output location is accepted when it does not exist yet or is an empty folder. An earlier
output of the same kind is replaced only with --overwrite, and only while it holds nothing but
what the command writes (a run folder is resumed instead).
Everything else is refused with one line that says why and how to proceed: an existing file,
a folder that holds something else, or a place that is, contains or lies inside one of the
command's own inputs (writing there would change or delete the input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import io


class OutputError(ValueError):
    """An output location that the command must not write to."""


@dataclass(frozen=True)
class OutputKind:
    name: str
    description: str  # "a trained adapter", as in "already holds a trained adapter"
    recognise: Callable[[Path], bool]
    # A run folder is resumed by the next run, never replaced wholesale.
    resumed: bool = False
    # Whether an entry of an earlier output's folder is one the command writes: --overwrite
    # replaces the whole folder, so it is refused while the folder holds anything else.
    # Required of every kind that is replaced rather than resumed.
    writes: Callable[[Path], bool] | None = None


def _json_field(file: Path, *keys: str):
    """A nested field of a JSON file, or None when the file is missing, unreadable or lacks it."""
    try:
        value = io.read_json(file)
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _adapter_of(kind: str) -> Callable[[Path], bool]:
    def recognise(folder: Path) -> bool:
        from .adapters import METADATA_FILE  # imports torch: only when an adapter is checked

        return _json_field(folder / METADATA_FILE, "kind") == kind

    return recognise


def _is_result(folder: Path) -> bool:
    from .metrics import SCHEMA

    return _json_field(folder / "metrics.json", "schema") == SCHEMA


def _is_baseline_results(folder: Path) -> bool:
    results = [d for d in folder.iterdir() if (d / "metrics.json").is_file()]
    return bool(results) and all(_json_field(d / "metrics.json", "model", "kind") == "baseline" for d in results)


def _is_run(folder: Path) -> bool:
    config = _json_field(folder / "config.json")
    return isinstance(config, dict) and {"model", "tasks", "merges"} <= set(config)


def _has_file(name: str) -> Callable[[Path], bool]:
    return lambda folder: (folder / name).is_file()


def _files(*names: str) -> Callable[[Path], bool]:
    return lambda entry: entry.is_file() and entry.name in names


# What `merge` saves, and `train` too, with PEFT's model card and the loss curve.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "loracombench.json")
RESULT_FILES = ("metrics.json", "predictions.jsonl")


def _trained_adapter_file(entry: Path) -> bool:
    """A file `train` writes; a README.md only as PEFT writes it (a model card naming the library),
    so that the user's own notes under that name are not taken for it."""
    if entry.name == "README.md" and entry.is_file():
        try:
            return "library_name: peft" in entry.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError:
            return False
    return _files(*ADAPTER_FILES, "loss_curve.json", "loss_curve.png")(entry)


def _baseline_result(entry: Path) -> bool:
    """A folder `baseline` writes: its two result files, a baseline's record, named after it (a
    copy the user renamed, or a model's result, is theirs)."""
    if not (entry.is_dir() and {f.name for f in entry.iterdir() if f.is_file()} == set(RESULT_FILES)
            and all(f.is_file() for f in entry.iterdir())):
        return False
    model = _json_field(entry / "metrics.json", "model")
    return isinstance(model, dict) and model.get("kind") == "baseline" and model.get("label") == entry.name


def _eda_file(entry: Path) -> bool:
    """eda_stats.json and the plots it lists."""
    plots = _json_field(entry.parent / "eda_stats.json", "plots") or []
    return entry.is_file() and (entry.name == "eda_stats.json" or entry.name in plots)


KINDS: dict[str, OutputKind] = {}


def register(kind: OutputKind) -> None:
    if kind.name in KINDS:
        raise ValueError(f"output kind {kind.name!r} is already registered")
    if not kind.resumed and kind.writes is None:
        raise ValueError(f"output kind {kind.name!r} is replaced by --overwrite, so it must say what it writes")
    KINDS[kind.name] = kind


def get_kind(name: str) -> OutputKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown output kind {name!r}; valid: {', '.join(sorted(KINDS))}") from None


register(OutputKind("adapter", "a trained adapter", _adapter_of("trained"), writes=_trained_adapter_file))
register(OutputKind("merge", "a merged adapter", _adapter_of("merge"), writes=_files(*ADAPTER_FILES)))
register(OutputKind("eval", "an evaluation result", _is_result, writes=_files(*RESULT_FILES)))
register(OutputKind("baseline", "baseline results", _is_baseline_results, writes=_baseline_result))
register(OutputKind("diagnostics", "adapter diagnostics", _has_file("diagnostics.json"),
                    writes=_files("diagnostics.json", "diagnostics.png")))
register(OutputKind("eda", "a dataset analysis", _has_file("eda_stats.json"), writes=_eda_file))
register(OutputKind("run", "a loracombench run", _is_run, resumed=True))
register(OutputKind("sweep", "a learning-rate sweep",
                    lambda folder: (folder / "sweep.json").is_file() or any(folder.glob("lr*/adapters")),
                    resumed=True))
register(OutputKind("verbalizers", "a label-word comparison", _has_file("verbalizers.json"),
                    writes=_files("verbalizers.json", "verbalizers.md")))


def _is_empty(folder: Path) -> bool:
    """Empty, or holding only the leftovers of killed saves and a stale lock file."""
    return all(io.is_leftover(entry.name) for entry in folder.iterdir())


def _overlap(out: Path, source: Path) -> bool:
    return out == source or out in source.parents or source in out.parents


def _refuse_unwritable(out: Path, flag: str, resumed: bool) -> None:
    """Refuse before any work a place this process cannot write (a training of minutes used to
    fail only when it saved). Checked where the command will write: inside an existing `out` that
    a resumed command (run, sweep) writes into; else beside it, where a new or replacing folder is
    published, or in its nearest existing ancestor. A symlinked `out` is published at its target."""
    real = out.resolve()
    if resumed and real.is_dir():
        folder = real
    else:
        folder = real.parent if real.exists() else next(p for p in real.parents if p.exists())
    try:
        io.probe_writable(folder, real)
    except OSError as err:
        raise OutputError(f"{flag} {out}: cannot write in {folder} ({err.strerror or err}); choose a folder "
                          f"you can write to (nothing was written)") from None


def check_out(out: str | Path, kind: str, *, overwrite: bool = False,
              inputs: dict[str, str | Path | list | None] | None = None, flag: str = "--out") -> Path:
    """Refuse an output location that would destroy data; return it when writing there is safe.

    `inputs` maps the flag that named each input to its path (or list of paths), so that the
    refusal names it."""
    out = Path(out)
    kind_ = get_kind(kind)
    resolved = out.resolve()
    for where, paths in (inputs or {}).items():
        for source in paths if isinstance(paths, (list, tuple)) else [paths]:
            if source is not None and _overlap(resolved, Path(source).resolve()):
                raise OutputError(f"{flag} {out} overlaps the input {where} {source}: writing there would "
                                  f"change or delete it; choose an {flag} outside every input")
    for ancestor in [out, *out.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            what = "is an existing file" if ancestor == out else f"lies inside {ancestor}, which is a file"
            raise OutputError(f"{flag} {out} {what}; give a folder path that does not exist yet "
                              f"(nothing was written)")
    _refuse_unwritable(out, flag, kind_.resumed)
    if not out.exists() or _is_empty(out):
        # What fills it before the command ends was not the user's to lose: publish only as new.
        io.create_only(out, not kind_.resumed)
        return out
    if not kind_.recognise(out):
        raise OutputError(f"{flag} {out} is a non-empty folder that does not hold {kind_.description}; "
                          f"choose a new or empty folder (nothing was written)")
    if not kind_.resumed and not overwrite:
        raise OutputError(f"{flag} {out} already holds {kind_.description}; pass --overwrite to replace it, "
                          f"or choose another folder")
    if not kind_.resumed:
        others = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                        if not io.is_leftover(e.name) and not kind_.writes(e))
        if others:
            raise OutputError(f"{flag} {out} holds {kind_.description} and also what this command does not write "
                              f"({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}): --overwrite would "
                              f"delete it; move it out of {out} first, or choose another folder (nothing was written)")
    io.create_only(out, False)
    return out
