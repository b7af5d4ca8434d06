"""``scx.pl.annotation_report``: every applicable QC plot of an annotation in one call."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CONFIDENCE_SUFFIX, ONTOLOGY_ID_SUFFIX, ONTOLOGY_SUFFIX
from .._settings import logger
from ..tl._ontology import stored_mapping
from . import _utils
from ._markers import check_label_column, resolve_threshold

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

    from spatialcx.tl import OntologyMapping

__all__ = ["REPORT_PLOTS", "annotation_report"]

#: Names of the plots of the report, in the order they are drawn (also the file names, ``{name}.{fmt}``).
REPORT_PLOTS: tuple[str, ...] = ("confidence", "ontology_mapping", "marker_dotplot", "deg_heatmap", "validation_2d")


def _check_formats(formats: str | Sequence[str]) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(formats, str):
        formats = [formats]
    formats = [str(f).lower().lstrip(".") for f in formats]
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if bad or not formats:
        raise ValueError(
            f"annotation_report: formats must name figure formats, got {bad or 'none'}. "
            f"Use some of: {', '.join(sorted(supported))} (e.g. ('png', 'pdf'))."
        )
    return list(dict.fromkeys(formats))


def _mapping_table(adata: AnnData, key: str, mapping: Any) -> Any:
    """The mapping given, else the one kept in ``uns`` (see :func:`spatialcx.tl._ontology.stored_mapping`) with its ``min_score``."""
    if mapping is not None:
        return mapping
    found = stored_mapping(adata, key)
    if found is None:
        raise ValueError(
            f"No ontology mapping to draw: neither uns[{key!r}]['ontology_mapping'] (written by scx.tl.annotate with "
            f"add_ontology=True) nor uns[{key + ONTOLOGY_SUFFIX!r}]['mapping'] (written by scx.tl.add_ontology_ids "
            f"with target_key={key + ONTOLOGY_ID_SUFFIX!r}) exists. Run one of them, or pass mapping= (the result of "
            "scx.tl.map_labels or scx.tl.add_ontology_ids)."
        )
    where, stored, min_score = found
    columns = {str(k): [v.item() if hasattr(v, "item") else v for v in list(vals)] for k, vals in dict(stored).items()}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(
            f"{where} has lists of different lengths ({sorted(lengths)}); it is not a mapping table. Pass mapping= "
            "(the result of scx.tl.map_labels or scx.tl.add_ontology_ids)."
        )
    return SimpleNamespace(table=pd.DataFrame(columns), min_score=min_score)


def annotation_report(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    table_key: str = "table",
    plots_dir: str | os.PathLike[str] | None = None,
    mapping: OntologyMapping | pd.DataFrame | None = None,
    threshold: float | None = None,
    formats: str | Sequence[str] = ("png",),
    show: bool | None = None,
    random_state: int = 0,
    dpi: int = 150,
) -> dict[str, dict[str, Any]]:
    """Draw every applicable QC plot of an annotation, save them, and report what was drawn.

    The plots, in order (``name``: function):

    - ``confidence``: :func:`spatialcx.pl.confidence`, confidence over the tissue image and per type;
    - ``ontology_mapping``: :func:`spatialcx.pl.ontology_mapping` of ``mapping``, or of the mapping kept by
      :func:`spatialcx.tl.annotate` in ``uns[key]["ontology_mapping"]``, else of the one kept by
      :func:`spatialcx.tl.add_ontology_ids` in ``uns[f"{key}_ontology"]["mapping"]``;
    - ``marker_dotplot``: :func:`spatialcx.pl.marker_dotplot`, canonical markers across the predicted types;
    - ``deg_heatmap``: :func:`spatialcx.pl.deg_heatmap`, the top DE genes of each type;
    - ``validation_2d``: :func:`spatialcx.pl.validation_2d`, marker evidence vs confidence per type.

    A plot that cannot be drawn (no spatial coordinates, no mapping, no canonical marker on the panel, ...) is
    reported with its error and a logged warning, and the others are still drawn; arguments that are wrong for
    every plot (a missing ``key``, a bad threshold or format) raise before anything is drawn.

    Parameters
    ----------
    data
        AnnData table or SpatialData object holding it, annotated by :func:`spatialcx.tl.annotate`.
    key
        The ``key_added`` of the annotation (obs label column).
    table_key
        Name of the table in ``data.tables`` (SpatialData only).
    plots_dir
        Folder to save the figures into as ``{name}.{fmt}`` (created); ``None`` saves nothing (and, by default,
        shows the figures instead: see ``show``). A plot that is not drawn leaves no file there: one an earlier
        report saved under its name is removed (with a warning), so that the folder never shows an old result.
    mapping
        Ontology mapping to draw (:func:`spatialcx.tl.map_labels`); default the one in ``uns[key]``, else the one
        :func:`spatialcx.tl.add_ontology_ids` kept in ``uns[f"{key}_ontology"]``.
    threshold
        Confidence threshold; ``None`` uses ``uns[key]["confidence_threshold"]`` (else 0.8).
    formats
        File formats to save each figure in, e.g. ``("png", "pdf")``.
    show
        Keep the figures open in pyplot, so that matplotlib displays them: below the cell in a notebook, in windows in
        an interactive session (in a script, call :func:`matplotlib.pyplot.show`); each is shown once, as the
        returned dict is not a figure. ``False`` closes each figure in pyplot once drawn and saved (they stay in the
        returned dict, ready to save or display). ``None`` (default) shows them when nothing is saved
        (``plots_dir=None``) and closes them when they are saved. The plotting functions' ``show`` means the same.
    random_state
        Seed of the subsampling in the plots.
    dpi
        Resolution of the saved figures.

    Returns
    -------
    ``{name: {"figure": Figure or None, "paths": [Path, ...], "error": str or None}}`` for every plot, in the
    order above: ``confidence``, ``ontology_mapping``, ``marker_dotplot``, ``deg_heatmap``, ``validation_2d``.

    Raises
    ------
    KeyError
        ``key`` is not an obs column, or ``table_key`` is not a table.
    TypeError
        ``show`` is not a bool or None.
    ValueError
        ``threshold`` is not in [0, 1], a format is not a figure format, ``dpi`` is not a positive number, or
        ``plots_dir`` is a file.

    Examples
    --------
    In a notebook, draw and show every plot:

    >>> report = scx.pl.annotation_report(sdata)  # doctest: +SKIP

    Save them (and show none):

    >>> report = scx.pl.annotation_report(sdata, plots_dir="qc", formats=("png", "pdf"))  # doctest: +SKIP
    >>> {name: r["error"] for name, r in report.items()}  # doctest: +SKIP
    """
    from . import _confidence, _deg, _markers, _ontology

    fn = "annotation_report"
    adata, _ = _utils.split_data(data, table_key)
    check_label_column(adata, key, fn=fn)
    threshold = resolve_threshold(adata, key, threshold, fn=fn)
    formats = _check_formats(formats)
    dpi = _utils.check_dpi(dpi, fn)  # before anything is drawn, rather than once per plot
    if show is not None and not isinstance(show, bool | np.bool_):
        raise TypeError(f"{fn}: show must be True, False or None (show when plots_dir is None), got {show!r}.")
    directory = None
    if plots_dir is not None:
        directory = Path(plots_dir).expanduser()
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{fn}: plots_dir={str(directory)!r} is a file, not a folder; pass a folder to save into.")
    keep_open = directory is None if show is None else bool(show)

    common = {"key": key, "table_key": table_key, "show": keep_open}
    plots: dict[str, Callable[[], Figure]] = {
        "confidence": lambda: _confidence.confidence(
            data,
            **common,
            confidence_key=f"{key}{CONFIDENCE_SUFFIX}",
            threshold=threshold,
            random_state=random_state,
        ),
        "ontology_mapping": lambda: _ontology.ontology_mapping(_mapping_table(adata, key, mapping), show=keep_open),
        "marker_dotplot": lambda: _markers.marker_dotplot(data, **common),
        "deg_heatmap": lambda: _deg.deg_heatmap(data, **common, random_state=random_state),
        "validation_2d": lambda: _markers.validation_2d(data, **common, threshold=threshold, random_state=random_state),
    }
    report: dict[str, dict[str, Any]] = {}
    for name in REPORT_PLOTS:
        entry: dict[str, Any] = {"figure": None, "paths": [], "error": None}
        report[name] = entry
        try:
            entry["figure"] = plots[name]()
        except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn is reported, never raised
            entry["error"] = f"{type(e).__name__}: {e}"
            logger.warning("%s: the %s plot was not drawn: %s", fn, name, entry["error"])
            _remove_stale(directory, name, formats, fn)
            continue
        if directory is not None:
            for fmt in formats:
                try:
                    entry["paths"].append(_utils.save_figure(entry["figure"], directory / f"{name}.{fmt}", dpi=dpi))
                except Exception as e:  # noqa: BLE001
                    entry["error"] = f"saving {name}.{fmt} failed: {type(e).__name__}: {e}"
                    logger.warning("%s: %s", fn, entry["error"])
    drawn = [n for n, r in report.items() if r["error"] is None]
    logger.info("%s: drew %s%s", fn, ", ".join(drawn) or "nothing", f" into {directory}" if directory else "")
    return report


def _remove_stale(directory: Path | None, name: str, formats: Sequence[str], fn: str) -> None:
    """Remove the files an earlier report drew for a plot that was not drawn now: they would look current."""
    if directory is None:
        return
    for fmt in formats:
        old = directory / f"{name}.{fmt}"
        if old.is_file():
            old.unlink()
            logger.warning("%s: removed %s, drawn by an earlier report, as the plot was not drawn now.", fn, old)
