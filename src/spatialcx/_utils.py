"""Small internal helpers: progress bars, string arrays, optional imports, atomic file writes."""

from __future__ import annotations

import importlib
import math
import numbers
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ._settings import settings

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar when verbose and attached to a terminal or notebook."""
    if settings.verbosity < 2:
        yield from iterable
        return
    from tqdm.auto import tqdm

    disable = None if sys.stderr.isatty() or "ipykernel" in sys.modules else True
    yield from tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def as_str_array(values: Any) -> np.ndarray:
    """``values`` as a numpy array of ``str``, whatever its string dtype.

    Arrays read back from zarr can hold numpy's variable-width ``StringDType``, which ``.astype(str)`` refuses to cast
    (numpy asks for a fixed width); going through ``object`` works for it, lists, pandas objects and ``<U`` arrays.
    """
    return np.asarray(values, dtype=object).astype(str)


def label_codes(values: Any) -> tuple[np.ndarray, list[str]]:
    """``(codes, names)`` of labels (a 1-D array, list, Series or Categorical), ``-1`` coding a missing label.

    ``names[codes[i]]`` is cell ``i``'s label as text. Each distinct label is converted once (a table of a million cells has a few dozen). Whole numbers held as floats
    (``3.0``: a column of cluster ids with a missing value is stored as floats) read ``"3"``, as the class ``3`` a
    model was trained on, never ``"3.0"``. Two values may read alike (``1`` and ``"1"`` in an object column): both
    names are kept, as given.
    """
    import pandas as pd

    if not isinstance(values, pd.Series | pd.Categorical | pd.Index):
        values = pd.Series(np.asarray(values, dtype=object))
    codes, uniques = pd.factorize(values, use_na_sentinel=True)  # hashed: fast on millions of cells
    names = [str(int(u)) if isinstance(u, float | np.floating) and float(u).is_integer() else str(u) for u in uniques]
    return codes, names


def label_text(values: Any) -> np.ndarray:
    """Labels as an object array of ``str``, missing values as ``None`` (see :func:`label_codes`)."""
    codes, names = label_codes(values)
    return np.array([*names, None], dtype=object)[codes]


def whole_number(value: Any, name: str, *, minimum: int = 0, none_ok: bool = False) -> int:
    """``value`` as an int: a whole number (``5``, ``np.int64(5)``, ``1e4``, a YAML ``10.0``) of at least ``minimum``.

    A bool, a string or another non-number is a TypeError, ``10.5``, NaN or a number below ``minimum`` a ValueError;
    both name the argument. ``none_ok`` only adds "or None" to the messages: the caller handles ``None`` itself.
    """
    alternative = " or None" if none_ok else ""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a whole number{alternative}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}{alternative}, got {value!r}.")
    return int(value)


def check_writable_dir(path: str | os.PathLike, name: str) -> Path:
    """Check, without creating anything, that ``path`` is or can become a folder we can write into.

    Called before long computations so that a bad output path fails at once, before anything is written. ``~`` is
    expanded; the path returned is the one to write to.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a folder; pass a folder (it is created if needed).")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(
            f"{name} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder; choose another path."
        )
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r} cannot be written: no write permission in {str(existing)!r}.")
    return path


def check_writable_file(path: str | os.PathLike, name: str) -> Path:
    """Check, without creating anything, that a file can be written at ``path`` (its folder exists or can be made).

    ``~`` is expanded; the path returned is the one to write to.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; pass a file path (e.g. {str(path / 'model.npz')!r}).")
    check_replaceable(path)
    check_writable_dir(path.parent, name)
    return path


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise a PermissionError when ``path`` is an existing file marked read-only (no write permission bit set).

    A file the user made read-only is not replaced, even where the folder would allow it (or for root).
    """
    path = Path(path)
    if path.is_file() and (not os.stat(path).st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise PermissionError(
            f"{str(path)!r} is read-only; it is not replaced. Write elsewhere, or make it writable "
            f"(chmod u+w) to replace it."
        )


def import_optional(module: str, extra: str) -> Any:
    """Import an optional dependency or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module!r} is required for this feature but is not installed. "
            f"Install it with `pip install 'spatialcx[{extra}]'`."
        ) from e


def set_default_permissions(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the permissions a plain ``open(path, "w")`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any], *, suffix: str = ".tmp") -> Path:
    """Make the file ``path`` with ``write(tmp)`` on a temporary file beside it, then rename that over ``path``.

    Readers see the old file or the whole new one, never a partial one; on any error (or interrupt) the temporary file
    is removed and ``path`` is left as it was. The folder is created if needed. A file replaced keeps its permissions
    (a read-only one is not replaced: PermissionError); a new one gets those a plain ``open(path, "w")`` would give.
    ``suffix`` is the temporary file's (some writers want ``.h5ad`` or ``.png``). A symbolic link is kept: the file it
    points to is replaced. The new file's data is flushed to disk before the rename. ``~`` is expanded; the path
    written is returned.
    """
    path = Path(path).expanduser()
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        if target.is_file():
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        else:
            set_default_permissions(tmp)
        write(Path(tmp))
        with open(tmp, "rb") as fh:  # the data on disk before the name points to it
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
