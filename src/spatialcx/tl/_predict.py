"""``scx.tl.train`` and ``scx.tl.predict``: panel-exact models and exact chunked prediction on a table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from spatialcx._constants import (
    DEFAULT_EXCLUDE_LABELS,
    KEY_ADDED,
    ONTOLOGY_SUFFIX,
    TARGET_SUM,
    label_list,
    output_keys,
)
from spatialcx._matrix import iter_row_blocks, normalize_block
from spatialcx._settings import logger
from spatialcx._utils import as_str_array
from spatialcx.model._model import CellTypeModel
from spatialcx.model._score import check_normalize_over, score_matrix, scoring_chunk_size
from spatialcx.model._train import Method, fit_model
from spatialcx.tl._confidence import DEFAULT_CONFIDENCE, ConfidenceMethod, confidence_with_params, transform_confidence

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def package_versions() -> dict[str, str]:
    """Versions of spatialcx and the libraries whose behaviour its outputs depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spatialcx", "anndata", "numpy", "scipy", "scikit-learn", "celltypist", "spatialdata"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _labels(adata: AnnData, label_key: str) -> pd.Series:
    if label_key not in adata.obs:
        raise KeyError(
            f"Label key {label_key!r} is not a column of the reference's obs. "
            f"Available columns: {list(adata.obs.columns)}."
        )
    from spatialcx._table import obs_column

    return obs_column(adata, label_key)  # a lazily read AnnData's column (xarray) is read now


def _resolve_genes(genes: Sequence[str] | AnnData | SpatialData | None) -> list[str] | None:
    if genes is None:
        return None
    if isinstance(genes, str):
        raise TypeError("genes must be a list of gene names (or a table / SpatialData), not a single string.")
    if hasattr(genes, "var_names") or hasattr(genes, "tables"):
        from spatialcx.pp._genes import panel_genes

        return panel_genes(genes)
    return [str(g) for g in genes]


def _check_min_genes(min_genes: Any) -> None:
    """A ValueError for a ``min_genes`` of :func:`train` that is not a whole number of at least one gene."""
    if isinstance(min_genes, bool) or not isinstance(min_genes, int | np.integer) or min_genes < 1:
        raise ValueError(
            f"min_genes must be a whole number of at least 1 (the panel genes the reference must share; 1 leaves only "
            f"the rule of a quarter of the panel), got {min_genes!r}."
        )


def training_matrix(
    reference: AnnData,
    genes: Sequence[str],
    *,
    target_sum: float = TARGET_SUM,
    chunk_size: int | None = None,
    source: Any = None,
) -> sparse.csr_matrix:
    """Log1p-normalized expression of ``reference`` over ``genes`` (library size over those genes), as CSR float32.

    Read chunk by chunk from the raw counts found by the normalization detection (or verified log1p(10k) ``X``), or
    from ``source`` (the :class:`~spatialcx.pp._normalization.ExpressionSource` already found).
    """
    from spatialcx._matrix import gene_indices
    from spatialcx.pp._normalization import find_expression_source

    src = find_expression_source(reference) if source is None else source
    cols = gene_indices(src.var_names, genes, what="reference")
    chunk = scoring_chunk_size(src.matrix, len(cols), chunk_size)  # a dense block holds every gene: fewer rows
    where = f"The reference's {src.where}"
    blocks = [
        normalize_block(
            b, cols, kind=src.kind, over="genes", target_sum=target_sum, row_offset=start, where=where
        ).astype(np.float32)
        for start, _, b in iter_row_blocks(src.matrix, chunk)
    ]
    return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, len(cols)), dtype=np.float32)


def _gene_symbols(reference: AnnData, names: pd.Index) -> pd.Index:
    """Gene symbols of ``names`` (the expression source's var names), as :func:`~spatialcx.pp.combine_references` reads.

    Ensembl ids are mapped through ``var["feature_name"]`` (CELLxGENE) or the packaged human / mouse tables.
    """
    from spatialcx.io._reference import _feature_names_for
    from spatialcx.pp._harmonize import to_symbols

    try:
        return to_symbols(names, feature_names=_feature_names_for(reference, names)).symbols
    except ValueError:  # Ensembl ids of a species without a packaged table, and no feature_name: names as they are
        return names


def train(
    reference: AnnData | str | os.PathLike,
    label_key: str,
    *,
    genes: Sequence[str] | AnnData | SpatialData | None = None,
    exclude_labels: Sequence[str] = DEFAULT_EXCLUDE_LABELS,
    method: Method = "auto",
    C: float = 1.0,
    alpha: float = 1e-4,
    max_iter: int | None = None,
    batch_size: int = 1000,
    epochs: int = 10,
    balance_cell_type: bool = False,
    min_genes: int = 10,
    random_state: int = 0,
    n_jobs: int | None = None,
    chunk_size: int | None = None,
) -> CellTypeModel:
    """Train a CellTypist-compatible model on exactly the genes of a spatial panel.

    The reference is normalized to log1p(10k) **over the genes it shares with the panel**, so that training and
    prediction see the same library-size definition however many genes each platform measures; the model is
    CellTypist's (standard scaler, values clipped at 10, one-vs-rest logistic regression).

    Parameters
    ----------
    reference
        Labelled single-cell reference: an AnnData (in memory, backed or lazy), or the path or URI of an ``.h5ad`` /
        AnnData ``.zarr`` (read lazily with :func:`~spatialcx.io.read_reference`, only the panel's genes). Raw counts
        are found in ``layers["counts"]``, ``layers["raw_counts"]``, ``layers["raw"]``, ``raw.X`` or ``X`` (see
        :func:`spatialcx.pp.normalization_status`); verified log1p(10k) data in ``X`` is used when no counts exist.
        Genes named by Ensembl ids are matched to the panel by their symbols (``var["feature_name"]``, as CELLxGENE
        writes it, or the packaged human / mouse tables), in ``raw`` too.
    label_key
        Column of ``reference.obs`` with the cell-type labels. Cells with missing labels are ignored, as are empty
        labels and missing labels written out as text (``"nan"``, ``"<NA>"``); surrounding whitespace is stripped
        (as :func:`~spatialcx.pp.combine_references` reads labels).
    genes
        The panel: gene names, or the spatial table / SpatialData (its :func:`~spatialcx.pp.panel_genes`).
        ``None`` uses every gene of the reference. Panel genes are found in the reference exactly, else
        case-insensitively where that is unambiguous (mouse ``Gad1``, human ``GAD1``), as
        :func:`~spatialcx.pp.combine_references` does; the model keeps the panel's spelling.
    exclude_labels
        Labels that are not cell types (``NA``, ``Unknown``, ``Doublet``, ``Ambiguous``, ...; exact match): their
        cells are left out, with a warning, as :func:`~spatialcx.tl.annotate` does. ``()`` keeps every label.
    method
        ``"logreg"`` (CellTypist's default classifier, L2 logistic regression), ``"sgd"`` (SGD logistic regression),
        ``"minibatch"`` (mini-batch SGD that densifies ``batch_size`` cells at a time, for large references), or
        ``"auto"`` (``"logreg"`` unless the scaled matrix would be too large to hold densely).
    C
        Inverse L2 regularisation strength of ``"logreg"``.
    alpha
        L2 regularisation of the SGD methods.
    max_iter
        Solver iterations of ``"logreg"`` and ``"sgd"``, at least 1 (CellTypist's defaults by number of cells when
        None); ``"minibatch"`` runs ``epochs`` passes instead.
    batch_size, epochs, balance_cell_type
        Mini-batch SGD settings: ``epochs`` passes over as many cells as the reference has, ``batch_size`` at a time;
        with ``balance_cell_type`` the cells of each pass are drawn with replacement, inversely to their type's
        frequency, so that every type is drawn about as often (rare types repeated).
    min_genes
        Panel genes the reference must share: at least this many (half of a panel of fewer than ``2 * min_genes``
        genes) and at least a quarter of the panel, the rule of :func:`~spatialcx.pp.combine_references` and
        :func:`~spatialcx.tl.annotate`; fewer is an error. ``1`` leaves only the quarter rule. Missing panel genes are
        logged as a warning.
    random_state
        Seed of everything random.
    n_jobs
        Parallel jobs of scikit-learn (``None``: one). With ``"logreg"``, ``-1`` fits the one-vs-rest classes in
        parallel processes: on 2 cores, 35 types x 5,000 cells x 477 genes took 2.5 s instead of 5.3 s, with the
        same labels and weights equal to about 5 significant digits (each setting is reproducible by itself). The
        processes share the scaled training matrix through a temporary file.
    chunk_size
        Cells read and normalized at a time.

    Returns
    -------
    The trained :class:`~spatialcx.CellTypeModel`.
    """
    from spatialcx import __version__
    from spatialcx.model._train import _check_fit_params

    fit_settings = {
        "method": method,
        "batch_size": batch_size,
        "epochs": epochs,
        "max_iter": max_iter,
        "balance_cell_type": balance_cell_type,
        "C": C,
        "alpha": alpha,
        "n_jobs": n_jobs,
        "random_state": random_state,
    }
    _check_fit_params(**fit_settings)  # before the reference is read (train clips at 10, as CellTypist)
    _check_min_genes(min_genes)
    from spatialcx._matrix import default_chunk_size

    default_chunk_size(1, chunk_size)  # a ValueError for a chunk_size that is not a positive whole number
    excluded = label_list(exclude_labels)
    panel = _resolve_genes(genes)
    import anndata

    if isinstance(reference, str | os.PathLike):  # a file or URI: read lazily, only the panel's genes
        from spatialcx.io import read_reference

        reference = read_reference(reference, label_key=label_key, genes=panel)
    elif not isinstance(reference, anndata.AnnData):
        raise TypeError(
            "reference must be an AnnData or the path / URI of an .h5ad or AnnData .zarr, got "
            f"{type(reference).__name__}."
        )
    from spatialcx.io._reference import clean_labels

    # as combine_references / annotate: "nan" / "" (missing written as text) are no labels, "T cell " is "T cell"
    labels = clean_labels(_labels(reference, label_key), label_key)
    from spatialcx.pp._normalization import find_expression_source

    source = find_expression_source(reference)
    from spatialcx.pp._harmonize import check_overlap, match_genes

    # the genes of the counts read (raw.X may hold more genes than an X subset to highly variable genes, and name them
    # by Ensembl id where X's were renamed to symbols), and their symbols
    ref_genes = pd.Index(as_str_array(source.var_names))
    if panel is None:  # X's genes, as CellTypist trains
        shared = list(as_str_array(reference.var_names))
        read_as = shared
        if not pd.Index(shared).isin(ref_genes).all():
            found = match_genes(shared, _gene_symbols(reference, ref_genes), ids=ref_genes)
            if found.missing:
                raise KeyError(
                    f"{len(found.missing)} of X's genes are not in the reference's {source.where} (e.g. "
                    f"{found.missing[:5]}), which training reads. Pass genes= (the panel) to train on the genes it "
                    "holds."
                )
            read_as = [str(ref_genes[c]) for c in found.columns]
    else:
        wanted = list(pd.Index(panel).unique())
        # exact first, then case-insensitively where unambiguous; Ensembl ids through their symbols
        found = match_genes(wanted, _gene_symbols(reference, ref_genes), ids=ref_genes)
        shared = found.genes  # the panel's spelling: the model scores the spatial table by these names
        read_as = [str(ref_genes[c]) for c in found.columns]
        (logger.warning if found.missing else logger.info)(
            "%d of %d panel genes found in the reference (%d case-insensitively)%s",
            len(shared),
            len(wanted),
            found.n_case_insensitive,
            f"; missing e.g. {found.missing[:5]} (they are left out of the model)." if found.missing else ".",
        )
        # the rule of combine_references / annotate: a quarter of the panel, and min_genes (half of a small panel)
        check_overlap(
            len(wanted), {"reference": len(shared)}, len(shared), missing_example=found.missing, min_genes=min_genes
        )
    keep = labels.notna().to_numpy()
    if not keep.all():
        logger.info("%d reference cells without a label are ignored", int((~keep).sum()))
    left_out = keep & labels.astype(str).isin(excluded).to_numpy()
    excluded_counts = labels[left_out].astype(str).value_counts().sort_index()
    if left_out.any():
        names = sorted(set(labels[left_out].astype(str)))
        logger.warning(
            "%d reference cells labelled %s are left out of training (not cell types: exclude_labels; pass "
            "exclude_labels=() to keep them).",
            int(left_out.sum()),
            names,
        )
        keep &= ~left_out
    x = training_matrix(reference, read_as, chunk_size=chunk_size, source=source)
    y = labels.astype(str).to_numpy()
    if not keep.all():
        x, y = x[keep], y[keep]
    if x.shape[0] == 0:
        if left_out.any():
            raise ValueError(
                f"Every labelled cell of the reference has a label of exclude_labels ({names}), so none is left to "
                "train on: check label_key, or pass exclude_labels=() to keep those labels."
            )
        raise ValueError(f"The reference has no labelled cells in obs[{label_key!r}].")
    counts = pd.Series(y).value_counts()
    description: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": "spatialcx",
        "version": __version__,
        "label_key": label_key,
        "n_panel_genes": len(panel) if panel is not None else len(shared),
        "n_shared_genes": len(shared),
        # labels are never dict keys in uns (they may not be valid zarr names): two aligned lists
        "cells_per_type": {"labels": [str(k) for k in counts.index], "n_cells": [int(v) for v in counts]},
        "n_cells_unlabelled": int((~labels.notna()).sum()),
        "excluded_labels": {
            "labels": [str(k) for k in excluded_counts.index],
            "n_cells": [int(v) for v in excluded_counts],
        },
    }
    model = fit_model(x, y, shared, **fit_settings, description=description)
    logger.info("trained %r", model)
    return model


def _as_model(model: CellTypeModel | Any) -> CellTypeModel:
    if isinstance(model, CellTypeModel):
        return model
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return CellTypeModel.load(model)
    if hasattr(model, "classifier") and hasattr(model, "scaler"):
        return CellTypeModel.from_celltypist(model)
    raise TypeError(
        f"model must be a scx.CellTypeModel, the path of a saved one, or a celltypist Model; got {type(model).__name__}."
    )


def predict(
    data: AnnData | SpatialData,
    model: CellTypeModel | str | Any,
    *,
    table_key: str = "table",
    key_added: str = KEY_ADDED,
    confidence: ConfidenceMethod = DEFAULT_CONFIDENCE,
    chunk_size: int | None = None,
    normalize_over: Literal["genes", "all"] | None = None,
    min_gene_fraction: float = 0.5,
    store_decision_scores: bool = True,
    unsafe_force: bool = False,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Predict cell types, exactly as CellTypist scores, chunk by chunk on the sparse table.

    Parameters
    ----------
    data
        The spatial data or its table. Raw counts are located as in :func:`spatialcx.pp.normalization_status`
        and normalized per chunk; the table is never densified or modified beyond the output keys.
    model
        A :class:`~spatialcx.CellTypeModel`, the path of a saved one, or a ``celltypist.models.Model``.
    table_key
        The table of a SpatialData.
    key_added
        Prefix of the output keys (``cell_type`` -> ``cell_type``, ``cell_type_predicted``,
        ``cell_type_confidence``, ``cell_type_confidence_raw``, ``cell_type_n_genes`` (the model's genes with counts
        in the cell), ``obsm["cell_type_decision_scores"]``, ``uns["cell_type"]``).
    confidence
        How decision scores become ``{key_added}_confidence``; see :func:`~spatialcx.tl.transform_confidence`
        (``"calibrated"``, the default, uses the model's reference calibration when it has one).
        ``{key_added}_confidence_raw`` always holds CellTypist's probability. The method and the parameters it used
        are recorded in ``uns[key_added]["confidence_method"]`` and ``["confidence_params"]``. Cells without
        counts in the model's genes keep CellTypist's label but get confidence 0, whatever the method, and are left
        out of the dataset-level statistics (their number: ``["confidence_params"]["n_cells_without_counts"]``).
    chunk_size
        Cells scored at a time (memory is O(chunk_size)); defaults to ``scx.settings.chunk_size``. Dask-backed
        tables are scored block-parallel on the active dask scheduler.
    normalize_over
        Library size over the model's genes (``"genes"``) or all genes (``"all"``); defaults to the model's own
        convention (``"genes"`` for models trained by :func:`train`, ``"all"`` for imported CellTypist models).
    min_gene_fraction
        Fewer of the model's genes in the table than this share is an error. Missing genes sit at their training
        mean, as in CellTypist; a warning names them (and those the table spells in another case: names are matched
        exactly), and ``uns[key_added]["n_genes_used"]`` counts the genes used.
    store_decision_scores
        Keep the cells x classes decision scores in ``obsm``.
    unsafe_force
        Score even when the table's values are neither raw counts nor verified log1p(10k) data.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store of a backed SpatialData (crash-safe; X is never rewritten).

    Returns
    -------
    The annotated copy when ``copy=True``, else None. ``{key_added}`` and ``{key_added}_predicted`` hold the
    predicted label; :func:`filter_low_confidence` then marks low-confidence cells ``Unassigned`` in
    ``{key_added}``.
    """
    from spatialcx._table import check_key, resolve_table

    check_key(key_added, "key_added")
    ref = resolve_table(data, table_key, copy=copy, write=write)
    warn_if_foreign(ref.adata, key_added)  # before the work, as annotate does before training
    out = compute_predictions(
        ref.adata,
        model,
        confidence=confidence,
        chunk_size=chunk_size,
        normalize_over=normalize_over,
        min_gene_fraction=min_gene_fraction,
        unsafe_force=unsafe_force,
    )
    write_predictions(ref.adata, out, key_added=key_added, store_decision_scores=store_decision_scores)
    return ref.finish(write=write, elements=("obs", "obsm", "uns"))


@dataclass
class Predictions:
    """Everything :func:`predict` writes, computed without touching the table."""

    labels: pd.Categorical
    confidence: np.ndarray
    confidence_raw: np.ndarray
    scores: np.ndarray
    params: dict[str, Any]
    n_genes: np.ndarray  # the model's genes with counts, per cell


def compute_predictions(
    adata: AnnData,
    model: CellTypeModel | str | Any,
    *,
    confidence: ConfidenceMethod = DEFAULT_CONFIDENCE,
    chunk_size: int | None = None,
    normalize_over: Literal["genes", "all"] | None = None,
    min_gene_fraction: float = 0.5,
    unsafe_force: bool = False,
) -> Predictions:
    """Score ``adata`` with ``model`` and derive labels and confidences; ``adata`` is not modified."""
    from spatialcx._matrix import default_chunk_size
    from spatialcx.pp._normalization import find_expression_source
    from spatialcx.tl._confidence import CONFIDENCE_METHODS

    # settings first: a typo must not cost a pass over the whole table
    if confidence not in CONFIDENCE_METHODS:
        raise ValueError(f"Unknown confidence method {confidence!r}; choose one of {CONFIDENCE_METHODS}.")
    if (
        isinstance(min_gene_fraction, bool)
        or not isinstance(min_gene_fraction, int | float | np.integer | np.floating)
        or not 0 <= min_gene_fraction <= 1
    ):
        raise ValueError(
            f"min_gene_fraction must be a number in [0, 1] (the least share of the model's genes the table must have), "
            f"got {min_gene_fraction!r}."
        )
    check_normalize_over(normalize_over)
    default_chunk_size(1, chunk_size)  # a ValueError for a chunk_size that is not a positive whole number
    model = _as_model(model)
    src = find_expression_source(adata, unsafe_force=unsafe_force)
    present, _ = model.match_genes(as_str_array(src.var_names))  # repeated model genes are an error
    frac = len(present) / model.n_features
    if len(present) == 0 or frac < min_gene_fraction:
        raise ValueError(
            f"Only {len(present)} of the model's {model.n_features} genes ({frac:.1%}) are in the table "
            f"(minimum {min_gene_fraction:.0%}). Model genes look like {model.features[:5].tolist()}, table genes "
            f"like {list(src.var_names[:5])}.{_gene_names_hint(adata, src.where, model, len(present))} Train a model "
            "on this panel with `scx.tl.train(reference, label_key, genes=data)`, or lower `min_gene_fraction` if you "
            "accept missing genes sitting at their training mean."
        )
    if len(present) < model.n_features:
        logger.warning(
            "%d of the model's %d genes are missing from the table (e.g. %s); they sit at their training mean (as in "
            "CellTypist).%s",
            model.n_features - len(present),
            model.n_features,
            *_missing_genes_note(model, present, src.var_names),
        )
    scores, _, expressed, at_clip = score_matrix(
        src.matrix,
        src.var_names,
        model,
        kind=src.kind,
        normalize_over=normalize_over,
        chunk_size=chunk_size,
        where=f"The table's {src.where}",
    )
    genes_at_clip = _genes_at_clip(model, present, at_clip, len(expressed))
    best = scores.argmax(axis=1)
    # A cell without counts in the model's genes has no evidence: its scores are the model's constant terms. It keeps
    # CellTypist's label, but gets confidence 0 and stays out of the dataset-level statistics of the confidence.
    empty = expressed == 0
    n_empty = int(empty.sum())
    if n_empty == len(empty):
        raise ValueError(
            f"None of the {len(empty):,} cells has counts in the model's {len(present)} genes found in the table "
            f"(expression read from {src.where}); there is nothing to predict from."
        )
    if n_empty:
        logger.warning(
            "%d of %d cells have no counts in the model's genes: their confidence is 0 (Unassigned at any threshold "
            "above 0).",
            n_empty,
            len(empty),
        )
    conf, conf_params = confidence_with_params(scores, confidence, calibration=model, without_counts=empty)
    if model.calibration is not None:
        conf_params["calibration_source"] = str(model.calibration.get("source", ""))
        conf_params["calibration_n_cells"] = int(model.calibration.get("n_cells", 0))
    params = {
        "model_hash": model.model_hash,
        "classes": model.classes.tolist(),
        "n_model_genes": int(model.n_features),
        "n_genes_used": int(len(present)),
        "confidence_method": confidence,
        "confidence_params": conf_params,
        "normalize_over": normalize_over or model.normalize_over,
        "expression_source": src.where,
        "chunk_size": int(scoring_chunk_size(src.matrix, len(present), chunk_size)),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "model_description": _jsonable_dict(model.description),
    }
    if genes_at_clip:
        params["genes_at_clip"] = genes_at_clip
    return Predictions(
        labels=pd.Categorical.from_codes(best, categories=pd.Index(model.classes)),
        confidence=conf,
        confidence_raw=transform_confidence(scores, "raw"),
        scores=scores,
        params=params,
        n_genes=expressed,
    )


#: A model gene that puts more than this share of the query's cells at the clip is named in a warning.
CLIP_SHARE_WARNING = 0.05


def _genes_at_clip(model: CellTypeModel, present: np.ndarray, at_clip: np.ndarray, n_cells: int) -> dict[str, list]:
    """Warn about model genes that put more than :data:`CLIP_SHARE_WARNING` of the cells at the clip; return them.

    A scaled value at the clip is ``clip`` spreads above the training mean: by Chebyshev's inequality at most
    ``1 / clip**2`` of the training cells (1 % for CellTypist's 10) can be there. A gene that puts far more query cells
    there is expressed by the query far more than by the reference (another tissue, platform or depth: a gene the
    reference detects in a handful of cells), and it pulls the calls towards the types that expressed it in training.
    """
    if n_cells == 0 or at_clip.size == 0:
        return {}
    share = at_clip / n_cells
    over = np.flatnonzero(share > max(CLIP_SHARE_WARNING, 1.0 / model.clip**2))
    if over.size == 0:
        return {}
    over = over[np.argsort(-share[over], kind="stable")]
    genes = model.features[np.asarray(present)[over]]
    logger.warning(
        "%d of the model's genes put more than %.0f %% of the cells at the clip (%g spreads above the training mean, "
        "where at most %.0f %% of training cells can be): e.g. %s. The table expresses them far more than the "
        "reference does (another tissue, platform or depth), and they pull the calls towards the types that "
        "expressed them in training. Check those calls (scx.pl.validation_2d), or train without these genes.",
        over.size,
        100 * CLIP_SHARE_WARNING,
        model.clip,
        100 / model.clip**2,
        ", ".join(f"{g} ({share[i]:.0%} of cells)" for g, i in zip(genes[:5], over[:5])),
    )
    keep = slice(0, 50)
    return {"genes": [str(g) for g in genes[keep]], "share": [round(float(v), 4) for v in share[over][keep]]}


def _missing_genes_note(model: CellTypeModel, present: np.ndarray, var_names: Any) -> tuple[list[str], str]:
    """Examples of the model's genes missing from the table, and a hint when some are there under another case."""
    missing = np.delete(model.features, present)
    folded: dict[str, str] = {}
    for name in as_str_array(var_names):
        folded.setdefault(name.casefold(), name)
    other_case = [(str(g), str(folded[g.casefold()])) for g in missing if g.casefold() in folded]
    if not other_case:
        return missing[:5].tolist(), ""
    g, t = other_case[0]
    return missing[:5].tolist(), (
        f" {len(other_case)} of them are in the table under another case (e.g. the model's {g!r} is the table's "
        f"{t!r}): names are matched exactly. Rename the table's genes to the model's spelling, or train a model on "
        "this panel with `scx.tl.train(reference, label_key, genes=data)`."
    )


def _gene_names_hint(adata: AnnData, where: str, model: CellTypeModel, n_found: int) -> str:
    """Where the model's genes are when the table names its genes otherwise (Ensembl ids vs symbols), for an error."""
    try:  # a hint only: whatever fails here (an unusual var) must not hide the error it completes
        return _find_gene_names(adata, where, model, n_found)
    except Exception:  # noqa: BLE001
        return ""


def _find_gene_names(adata: AnnData, where: str, model: CellTypeModel, n_found: int) -> str:
    from spatialcx.pp._harmonize import looks_like_ensembl

    var = adata.raw.var if where == "raw.X" and adata.raw is not None else adata.var
    if not isinstance(var, pd.DataFrame) and hasattr(var, "to_memory"):  # a lazily read table's var (Dataset2D)
        var = var.to_memory()
    features = pd.Index(model.features)
    best, best_n = None, n_found
    for name in var.columns:
        column = var[name]
        if not (pd.api.types.is_object_dtype(column) or isinstance(column.dtype, pd.CategoricalDtype | pd.StringDtype)):
            continue
        n = int(features.isin(column.astype(str)).sum())
        if n > best_n:
            best, best_n = name, n
    if best is not None:
        which = "raw.var" if where == "raw.X" and adata.raw is not None else "var"
        return (
            f" {which}[{best!r}] holds {best_n} of them: name the genes by it, e.g. "
            f"`adata.var_names = adata.{which}[{best!r}].astype(str)` (then `adata.var_names_make_unique()`)."
        )
    table_ids, model_ids = looks_like_ensembl(list(var.index[:1000])), looks_like_ensembl(list(features[:1000]))
    if table_ids != model_ids:
        return (
            f" The table's genes are {'Ensembl ids' if table_ids else 'gene symbols'} and the model's are "
            f"{'Ensembl ids' if model_ids else 'gene symbols'}: name both the same way."
        )
    folded = {str(g).casefold() for g in var.index}
    n_folded = sum(str(g).casefold() in folded for g in features)
    if n_folded > n_found:
        return (
            f" {n_folded} of the model's genes are in the table when case is ignored (e.g. the model's "
            f"{features[0]!r}): a model trained with `genes=data` takes the panel's spelling (train matches genes "
            "case-insensitively); predict matches names exactly."
        )
    return ""


def write_predictions(
    adata: AnnData,
    out: Predictions,
    *,
    key_added: str = KEY_ADDED,
    store_decision_scores: bool = True,
) -> None:
    """Assign :class:`Predictions` to the output keys of ``adata`` (no computation, so nothing is half-written).

    Callers warn first (:func:`warn_if_foreign`) about label / CL columns that no spatialcx prediction wrote.
    """
    keys = output_keys(key_added)
    index = adata.obs_names
    adata.obs[keys["predicted"]] = out.labels.copy()
    adata.obs[keys["label"]] = out.labels.copy()
    adata.obs[keys["confidence"]] = pd.Series(out.confidence.astype(np.float32), index=index)
    adata.obs[keys["confidence_raw"]] = pd.Series(out.confidence_raw.astype(np.float32), index=index)
    adata.obs[keys["n_genes"]] = pd.Series(out.n_genes.astype(np.int32), index=index)
    if store_decision_scores:
        # an array, not a DataFrame: class names may hold characters that are not valid zarr keys;
        # the column order is uns[key_added]["classes"]
        adata.obsm[keys["decision_scores"]] = out.scores.astype(np.float32)
    elif keys["decision_scores"] in adata.obsm:
        del adata.obsm[keys["decision_scores"]]
    adata.uns[key_added] = dict(out.params)
    # Cell Ontology columns of an earlier run name the labels just replaced: a stale id or name is worse than none
    stale = [k for k in (keys["ontology_id"], keys["ontology_label"]) if k in adata.obs]
    summary = adata.uns.pop(key_added + ONTOLOGY_SUFFIX, None)
    if stale:
        source = summary.get("params", {}).get("source_key") if isinstance(summary, dict) else None
        if source is not None and source not in (keys["label"], keys["predicted"]):
            logger.warning(
                "Removed obs columns %s: add_ontology_ids wrote them for obs[%r], and they would now sit beside the "
                "new %r labels as if they were theirs. To keep CL ids of %r, map them with "
                "scx.tl.add_ontology_ids(data, %r, target_key=%r).",
                stale,
                source,
                key_added,
                source,
                source,
                f"{source}_ontology_term_id",
            )
        else:
            logger.info(
                "Removed obs columns %s of an earlier run (they named the labels now replaced); "
                "scx.tl.add_ontology_ids(data, %r) maps the new labels.",
                stale,
                key_added,
            )
        # a column selection, not DataFrame.drop: a lazily read table's obs (anndata's Dataset2D) has no drop
        adata.obs = adata.obs[[c for c in adata.obs.columns if c not in stale]]


def warn_if_foreign(adata: AnnData, key_added: str) -> None:
    """Warn before replacing output columns that no spatialcx prediction wrote (e.g. a CELLxGENE table's own)."""
    earlier = adata.uns.get(key_added)
    if isinstance(earlier, Mapping) and "model_hash" in earlier:
        return  # an earlier prediction's columns: replacing them is what a new run does
    keys = output_keys(key_added)
    ontology = (keys["ontology_id"], keys["ontology_label"])
    mapped = isinstance(adata.uns.get(key_added + ONTOLOGY_SUFFIX), Mapping)  # add_ontology_ids wrote the CL columns
    foreign = [
        k for name, k in keys.items() if k in adata.obs and name != "decision_scores" and not (mapped and k in ontology)
    ]
    if foreign:
        logger.warning(
            "obs columns %s hold values that no spatialcx prediction wrote (the data's own annotation, e.g. "
            "CELLxGENE's cell_type columns); the predictions replace them. To keep them, copy them to other columns "
            "first, or pass key_added=%r to write the predictions under other names.",
            foreign,
            f"{key_added}_spatialcx",
        )


def _jsonable_dict(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` as values that ``uns`` can store in both h5ad and zarr (a model's description is free JSON).

    None values are dropped, numpy scalars and arrays become Python values, ``/`` in keys (a group separator in zarr
    and HDF5) becomes ``_``. Values anndata cannot write (lists of dicts or holding None, ragged lists, integers beyond
    64 bits) are kept as their JSON text.
    """
    from spatialcx.model._model import _jsonable

    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[str(k).replace("/", "_")] = _uns_value(_jsonable(v))
    return out


def _uns_value(v: Any) -> Any:
    """A JSON value (from ``_jsonable``) as one that anndata writes to h5ad and zarr alike."""
    if isinstance(v, dict):
        return _jsonable_dict(v)
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
        return str(v)
    if isinstance(v, list):
        try:  # what anndata writes: an array of numbers, bools or strings (possibly nested, rectangular)
            storable = np.asarray(v).dtype.kind in "biufU"
        except (ValueError, OverflowError):  # ragged
            storable = False
        return v if storable else json.dumps(v)
    return v
