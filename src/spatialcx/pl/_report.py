"""``scx.pl.annotation_report``: every applicable QC plot of an annotation in one call."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from anndata import AnnData

from .._constants import CONFIDENCE_SUFFIX
from .._settings import logger
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


def _mapping_table(adata: AnnData, key: str, mapping: Any) -> pd.DataFrame | OntologyMapping:
    """The mapping given, or the one :func:`spatialcx.tl.annotate` kept in ``uns[key]["ontology_mapping"]``."""
    if mapping is not None:
        return mapping
    params = adata.uns.get(key)
    stored = params.get("ontology_mapping") if isinstance(params, Mapping) else None
    if not stored:
        raise ValueError(
            f"No ontology mapping to draw: uns[{key!r}] has no 'ontology_mapping' (scx.tl.annotate writes it with "
            "add_ontology=True). Pass mapping= (the result of scx.tl.map_labels or scx.tl.add_ontology_ids)."
        )
    columns = {str(k): list(v) for k, v in dict(stored).items()}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"uns[{key!r}]['ontology_mapping'] has lists of different lengths ({sorted(lengths)}).")
    return pd.DataFrame(columns)


def annotation_report(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    table_key: str = "table",
    plots_dir: str | os.PathLike[str] | None = None,
    mapping: OntologyMapping | pd.DataFrame | None = None,
    threshold: float | None = None,
    formats: str | Sequence[str] = ("png",),
    show: bool = False,
    random_state: int = 0,
    dpi: int = 150,
) -> dict[str, dict[str, Any]]:
    """Draw every applicable QC plot of an annotation, save them, and report what was drawn.

    The plots, in order (``name``: function):

    - ``confidence``: :func:`spatialcx.pl.confidence`, confidence over the tissue image and per type;
    - ``ontology_mapping``: :func:`spatialcx.pl.ontology_mapping` of ``mapping``, or of the mapping kept by
      :func:`spatialcx.tl.annotate` in ``uns[key]["ontology_mapping"]``;
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
        Folder to save the figures into as ``{name}.{fmt}`` (created); ``None`` saves nothing.
    mapping
        Ontology mapping to draw (:func:`spatialcx.tl.map_labels`); default the one in ``uns[key]``.
    threshold
        Confidence threshold; ``None`` uses ``uns[key]["confidence_threshold"]`` (else 0.8).
    formats
        File formats to save each figure in, e.g. ``("png", "pdf")``.
    show
        Keep the figures open (to display them, e.g. in a notebook); by default each is closed once saved.
    random_state
        Seed of the subsampling in the plots.
    dpi
        Resolution of the saved figures.

    Returns
    -------
    ``{name: {"figure": Figure or None, "paths": [Path, ...], "error": str or None}}`` for every plot of
    :data:`REPORT_PLOTS`, in that order.

    Raises
    ------
    KeyError
        ``key`` is not an obs column, or ``table_key`` is not a table.
    ValueError
        ``threshold`` is not in [0, 1], a format is not a figure format, or ``plots_dir`` is a file.

    Examples
    --------
    >>> report = scx.pl.annotation_report(sdata, plots_dir="qc", formats=("png", "pdf"))  # doctest: +SKIP
    >>> {name: r["error"] for name, r in report.items()}  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from . import _confidence, _deg, _markers, _ontology

    fn = "annotation_report"
    adata, _ = _utils.split_data(data, table_key)
    check_label_column(adata, key, fn=fn)
    threshold = resolve_threshold(adata, key, threshold, fn=fn)
    formats = _check_formats(formats)
    directory = None
    if plots_dir is not None:
        directory = Path(plots_dir).expanduser()
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{fn}: plots_dir={str(directory)!r} is a file, not a folder; pass a folder to save into.")

    common = {"key": key, "table_key": table_key}
    plots: dict[str, Callable[[], Figure]] = {
        "confidence": lambda: _confidence.confidence(
            data,
            **common,
            confidence_key=f"{key}{CONFIDENCE_SUFFIX}",
            threshold=threshold,
            random_state=random_state,
        ),
        "ontology_mapping": lambda: _ontology.ontology_mapping(_mapping_table(adata, key, mapping)),
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
            continue
        if directory is not None:
            for fmt in formats:
                try:
                    entry["paths"].append(_utils.save_figure(entry["figure"], directory / f"{name}.{fmt}", dpi=dpi))
                except Exception as e:  # noqa: BLE001
                    entry["error"] = f"saving {name}.{fmt} failed: {type(e).__name__}: {e}"
                    logger.warning("%s: %s", fn, entry["error"])
        if not show:
            plt.close(entry["figure"])
    drawn = [n for n, r in report.items() if r["error"] is None]
    logger.info("%s: drew %s%s", fn, ", ".join(drawn) or "nothing", f" into {directory}" if directory else "")
    return report
