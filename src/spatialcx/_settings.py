"""Package-wide settings (``scx.settings``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}

logger = logging.getLogger("spatialcx")


@dataclass
class _Settings:
    """Settings of spatialcx.

    Attributes
    ----------
    verbosity
        0 errors, 1 warnings (default), 2 info, 3 debug. Progress bars are shown at 2 and above, and only on a
        terminal or in a notebook.
    chunk_size
        Default number of cells processed at once by chunked operations (prediction, normalization).
    n_jobs
        Threads that score blocks of cells in parallel: ``None`` or ``-1`` one per CPU core, ``-2`` all but one (as
        in scikit-learn and scanpy), a positive number that many. Results do not depend on it.
    """

    _verbosity: int = 1
    chunk_size: int = 50_000
    n_jobs: int | None = None

    @property
    def verbosity(self) -> int:
        """Verbosity level, 0-3."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        value = int(value)
        if value not in _LEVELS:
            raise ValueError(f"verbosity must be one of {sorted(_LEVELS)}, got {value}.")
        self._verbosity = value
        logger.setLevel(_LEVELS[value])


def n_workers(n_jobs: int | None, n_tasks: int) -> int:
    """Threads for ``n_tasks`` tasks under ``n_jobs`` (``None``/``-1``: every core, ``-2``: all but one, ...)."""
    import os

    cores = os.cpu_count() or 1
    if n_jobs is None:
        wanted = cores
    elif isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ValueError(
            f"scx.settings.n_jobs must be None or a non-zero whole number (-1: every core), got {n_jobs!r}."
        )
    else:
        wanted = n_jobs if n_jobs > 0 else cores + 1 + n_jobs
    return max(1, min(wanted, n_tasks))


settings = _Settings()
logger.setLevel(_LEVELS[settings.verbosity])
