"""``scx.pl.ontology_mapping``: input labels -> Cell Ontology names, coloured by how each match was found."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._settings import logger

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from spatialcx.tl import OntologyMapping

#: Tier -> (legend name, colour).
TIER_STYLE = {
    1: ("exact CL name or synonym", "#2E7D32"),
    0: ("pattern table / user index", "#1565C0"),
    2: ("same words / parent term", "#EF6C00"),
    3: ("word overlap", "#8E24AA"),
    -1: ("unknown (no CL term fits)", "#BDBDBD"),
}
_REQUIRED = ("input_label", "ontology_term_id", "ontology_label", "tier", "score")


def _as_table(mapping: Any) -> tuple[pd.DataFrame, float | None]:
    table = getattr(mapping, "table", mapping)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"mapping must be an OntologyMapping (from scx.tl.map_labels or scx.tl.add_ontology_ids) or its table, "
            f"got {type(mapping).__name__}."
        )
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(f"The mapping table lacks the column(s) {missing}; found {list(table.columns)}.")
    if table.empty:
        raise ValueError("The mapping is empty: there is nothing to plot.")
    return table, getattr(mapping, "min_score", None)


#: Input labels longer than this are shortened (with an ellipsis) on the axis.
MAX_LABEL_CHARS = 40


def _shorten(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1].rstrip() + "\u2026"


def _shorten_all(labels: list[str]) -> list[str]:
    """Shorten each label, keeping distinct labels distinct on the axis.

    Labels that would be cut to the same text (long names differing only at their end, as in ``"... subtype 1"``
    and ``"... subtype 2"``) keep their start and their end around a middle ellipsis instead.
    """
    short = [_shorten(x) for x in labels]
    counts = pd.Series(short).value_counts()
    head = (MAX_LABEL_CHARS - 1) // 2
    tail = MAX_LABEL_CHARS - 1 - head
    return [
        s if counts[s] == 1 or len(x) <= MAX_LABEL_CHARS else x[:head].rstrip() + "\u2026" + x[-tail:].lstrip()
        for x, s in zip(labels, short, strict=True)
    ]


def ontology_mapping(
    mapping: OntologyMapping | pd.DataFrame,
    *,
    sort: Literal["input", "score", "tier"] = "tier",
    max_labels: int = 80,
    show_ids: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    save: str | os.PathLike[str] | None = None,
    dpi: int = 150,
    show: bool = False,
) -> Figure:
    """Plot how labels were mapped to the Cell Ontology: one row per label, input label -> CL name.

    Each row's bar is the match score (0-1), coloured by tier (exact name or synonym, pattern table or user index,
    same words / fall-back to a parent term, word overlap); labels that map to ``unknown`` are drawn grey and
    hatched, with their CL column in red. CL terms that several input labels share are marked with ``*``. A dashed
    line, keyed in the legend, shows ``min_score``. Input labels longer than 40 characters are shortened with an
    ellipsis; the figure is as wide as its text needs.

    Parameters
    ----------
    mapping
        The result of :func:`spatialcx.tl.map_labels` or :func:`spatialcx.tl.add_ontology_ids` (or its ``table``).
    sort
        Row order: ``"tier"`` (unknowns last, then by score), ``"score"`` (highest first) or ``"input"``
        (alphabetical).
    max_labels
        Draw at most this many rows: the unknowns first, then the others in the ``sort`` order. The title says how
        many are shown.
    show_ids
        Append the CL id to each CL name.
    title
        Figure title; default a summary (mapped / unknown counts).
    ax
        Axes to draw into; default a new figure sized to the number of rows.
    save
        Write the figure there (the suffix picks the format: png, pdf, svg).
    dpi
        Resolution of the saved figure.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result. With ``ax``, the figure is the
        caller's and is left as it is.

    Returns
    -------
    The matplotlib figure (that of ``ax`` when given).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ._utils import check_show, hand_over, save_figure

    show = check_show(show, "ontology_mapping")
    table, min_score = _as_table(mapping)
    if sort not in ("input", "score", "tier"):
        raise ValueError(f"sort must be 'input', 'score' or 'tier', got {sort!r}.")
    if int(max_labels) < 1:
        raise ValueError(f"max_labels must be at least 1, got {max_labels}.")
    t = table.reset_index(drop=True)  # a copy, with unique row labels
    t["input_label"] = t["input_label"].astype(str)
    unknown = (t["ontology_term_id"].astype(str) == "unknown").to_numpy()
    t["_unknown"] = unknown
    if sort == "input":
        t = t.sort_values("input_label", key=lambda s: s.str.lower(), kind="stable")
    elif sort == "score":
        t = t.sort_values("score", ascending=False, kind="stable")
    else:
        t = t.sort_values(["_unknown", "tier", "score"], ascending=[True, True, False], kind="stable")
    n_total = len(t)
    if n_total > max_labels:
        # unknowns first (they need attention), then the others in the sort order; max_labels rows at most
        keep = pd.concat([t[t["_unknown"]], t[~t["_unknown"]]]).head(int(max_labels)).index
        t = t[t.index.isin(keep)]
        logger.info(
            "ontology_mapping: drawing %d of %d labels (unknowns first); raise max_labels to draw more.",
            len(t),
            n_total,
        )

    shared = t.loc[~t["_unknown"], "ontology_term_id"].duplicated(keep=False)
    shared_ids = set(t.loc[~t["_unknown"]][shared.to_numpy()]["ontology_term_id"]) if len(shared) else set()
    n = len(t)
    inputs = _shorten_all(list(t["input_label"]))
    names = []
    for tid, name, unk in zip(t["ontology_term_id"], t["ontology_label"], t["_unknown"], strict=True):
        if unk:
            names.append("unknown")
            continue
        text = f"{name} ({tid})" if show_ids else str(name)
        names.append(text + (" *" if tid in shared_ids else ""))
    own_figure = ax is None
    if ax is None:
        # wide enough for both columns of text plus a bar area of about 4 inches
        chars = max(map(len, inputs)) + max(map(len, names))
        fig, ax = plt.subplots(figsize=(min(max(8.0, 4.5 + 0.065 * chars), 24.0), 1.3 + 0.26 * n), layout="constrained")
    else:
        fig = ax.figure
    try:
        y = np.arange(n)[::-1]
        tiers = t["tier"].astype(int).to_numpy()
        scores = t["score"].astype(float).to_numpy()
        colors = [TIER_STYLE.get(int(k), TIER_STYLE[-1])[1] for k in tiers]
        bars = ax.barh(y, np.where(t["_unknown"], np.maximum(scores, 0.02), scores), color=colors, height=0.7)
        for bar, unk in zip(bars, t["_unknown"], strict=True):
            if unk:
                bar.set_hatch("///")
                bar.set_edgecolor("#757575")
        ax.set_yticks(y, inputs, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_xlabel("match score")
        if min_score is not None:
            ax.axvline(float(min_score), color="#424242", linestyle="--", linewidth=0.8)

        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks(y, names, fontsize=8)
        for tick, unk in zip(right.get_yticklabels(), t["_unknown"], strict=True):
            if unk:
                tick.set_color("#C62828")
                tick.set_fontstyle("italic")
        right.tick_params(axis="y", length=0)
        for side in ("top",):
            ax.spines[side].set_visible(False)
            right.spines[side].set_visible(False)

        present = sorted({int(k) for k in tiers}, key=lambda k: (k == -1, k != 1, k))
        handles = [
            Patch(facecolor=TIER_STYLE[k][1], label=TIER_STYLE[k][0], hatch="///" if k == -1 else None) for k in present
        ]
        if min_score is not None:
            handles.append(
                Line2D([], [], color="#424242", linestyle="--", linewidth=0.8, label=f"min_score {float(min_score):g}")
            )
        if shared_ids:
            handles.append(Patch(facecolor="none", edgecolor="none", label="* CL term shared by several labels"))
        if own_figure:
            fig.legend(
                handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=7, frameon=False
            )
        else:
            ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=True)
        n_unknown = int(unknown.sum())
        if title is None:
            shown = f" (showing {n})" if n < n_total else ""
            title = (
                f"Cell Ontology mapping: {n_total - n_unknown} of {n_total} labels mapped, {n_unknown} unknown{shown}"
            )
        ax.set_title(title, fontsize=10)
        if save is not None:
            save_figure(fig, save, dpi=dpi)
    except BaseException:
        if own_figure:
            plt.close(fig)
        raise
    return hand_over(fig, show) if own_figure else fig
