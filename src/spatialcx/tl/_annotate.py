"""``scx.tl.annotate``: references in, CELLxGENE-standard cell-type columns out, in one call."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from spatialcx._constants import (
    DEFAULT_EXCLUDE_LABELS,
    KEY_ADDED,
    ORIGINAL_LABEL_KEY,
    SOURCE_KEY,
    UNASSIGNED,
    UNKNOWN_ONTOLOGY_ID,
    label_list,
    output_keys,
)
from spatialcx._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _as_list(
    references: Any, label_keys: str | Sequence[str] | Mapping[str, str]
) -> tuple[list[Any] | dict[str, Any], list[str] | Mapping[str, str]]:
    """References and label keys as :func:`~spatialcx.pp.combine_references` takes them.

    A mapping of references (``{source name: reference}``) is kept as it is, with its names; anything else becomes a
    list with one label key per reference.
    """
    if isinstance(references, bytes) or not (
        isinstance(references, str | os.PathLike | Iterable) or hasattr(references, "obs")
    ):
        raise TypeError(
            "references must be a labelled AnnData, an .h5ad/.zarr path or URI, a list of them, or a mapping "
            f"{{source name: reference}}; got {type(references).__name__} ({references!r})."
        )
    label_keys = _check_label_keys(label_keys)
    if isinstance(references, Mapping):
        if not references:
            raise ValueError(
                "No reference given: the mapping of references is empty; map source names to labelled AnnData "
                "objects, h5ad/zarr paths or URIs."
            )
        if isinstance(label_keys, Mapping):
            missing = [name for name in references if name not in label_keys]
            if missing:
                raise ValueError(
                    f"label_keys is a mapping but names no label column for the references {missing}; give one for "
                    f"every name of references ({list(references)}), or a single string for all."
                )
            label_keys = {name: label_keys[name] for name in references}
        return dict(references), label_keys
    if isinstance(label_keys, Mapping):
        raise ValueError(
            "label_keys is a mapping by source name, so references must be a mapping with the same names "
            "({name: reference}); otherwise give one label key per reference (or a single string for all)."
        )
    if isinstance(references, str | os.PathLike) or hasattr(references, "obs"):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("No reference given: pass one or more labelled AnnData objects, h5ad/zarr paths or URIs.")
    if isinstance(label_keys, str):
        label_keys = [label_keys] * len(references)
    label_keys = list(label_keys)
    if len(label_keys) != len(references):
        raise ValueError(
            f"{len(references)} references but {len(label_keys)} label keys: give one label key per reference "
            "(or a single string used for all)."
        )
    return references, label_keys


def _check_label_keys(label_keys: Any) -> str | list[str] | Mapping[str, str]:
    """``label_keys`` as given (a sequence as a list), checked: a column name, a list of them, or a mapping of them."""
    if isinstance(label_keys, Mapping):
        values = list(label_keys.values())
    elif isinstance(label_keys, str):
        values = [label_keys]
    elif isinstance(label_keys, Iterable) and not isinstance(label_keys, bytes):
        values = label_keys = list(label_keys)
    else:
        raise TypeError(
            f"label_keys must name the label column of the references: a string for all, a list with one per "
            f"reference, or a mapping {{source name: column}}; got {type(label_keys).__name__} ({label_keys!r})."
        )
    bad = [v for v in values if not isinstance(v, str) or not v]
    if bad:
        raise (ValueError if bad[0] == "" else TypeError)(
            f"label_keys must be obs column names (non-empty strings), got {bad[0]!r} in {label_keys!r}; name the "
            "column of each reference that holds its cell-type labels."
        )
    return label_keys


def ontology_names(classes: Sequence[str], *, index: Any = None) -> tuple[list[str], list[str], list[str], Any]:
    """Map model classes to Cell Ontology ids; return (final names, ids, CL names, mapping).

    The final name of a class (shown in ``cell_type``) is its CL name when one fits, else the class's own label.
    Distinct classes that map to one CL id keep their own labels, so they are not silently merged in ``cell_type``
    (their shared id is in ``cell_type_ontology_term_id`` and the collision is reported).
    """
    from spatialcx.tl._ontology import map_labels

    mapping = map_labels(list(classes), index=index)
    table = mapping.table.drop_duplicates("input_label").set_index("input_label")
    ids, cl_names = [], []
    for c in classes:
        term = str(table.loc[c, "ontology_term_id"]) if c in table.index else UNKNOWN_ONTOLOGY_ID
        name = table.loc[c, "ontology_label"] if c in table.index else None
        if term == UNKNOWN_ONTOLOGY_ID or name is None or pd.isna(name):
            ids.append(UNKNOWN_ONTOLOGY_ID)
            cl_names.append(UNKNOWN_ONTOLOGY_ID)
        else:
            ids.append(term)
            cl_names.append(str(name))
    shared = pd.Series(ids).value_counts()
    final = [
        str(c) if term == UNKNOWN_ONTOLOGY_ID or shared[term] > 1 else name
        for c, term, name in zip(classes, ids, cl_names)
    ]
    return final, ids, cl_names, mapping


def annotate(
    data: AnnData | SpatialData,
    references: Any,
    *,
    label_keys: str | Sequence[str] | Mapping[str, str],
    table_key: str = "table",
    tissue: str = "unknown",
    balance: Literal["proportional", "equal"] = "proportional",
    max_cells_per_type: int | None = 5000,
    max_cells_per_ref: int | None = 100_000,
    target_proportions: Mapping[str, float] | str | os.PathLike | None = None,
    exclude_labels: Sequence[str] = DEFAULT_EXCLUDE_LABELS,
    confidence_threshold: float = 0.8,
    confidence: str = "calibrated",
    model_out: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    add_ontology: bool = True,
    plots: bool = True,
    key_added: str = KEY_ADDED,
    train_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    random_state: int = 0,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Annotate a spatial table with cell types from labelled scRNA-seq references, in one call.

    The pipeline: panel genes of the table -> combine the references over the genes they share with the panel
    (:func:`~spatialcx.pp.combine_references`) -> balance cell types and sources ("Cap & Fill",
    :func:`~spatialcx.pp.subsample_balanced`) -> train a panel-exact CellTypist-compatible model
    (:func:`~spatialcx.tl.train`) -> predict exactly and chunked (:func:`~spatialcx.tl.predict`) -> map the
    labels to the Cell Ontology -> mark low-confidence cells ``Unassigned``
    (:func:`~spatialcx.tl.filter_low_confidence`) -> write everything into the table (and its zarr store).

    Parameters
    ----------
    data
        The spatial data (or its table). Its raw counts are used; nothing else of the table changes.
    references
        One or more labelled references: AnnData objects, local ``.h5ad``/``.zarr`` paths, or URIs; a mapping
        ``{source name: reference}`` names each (the names are kept in ``obs["reference_source"]`` of the training set
        and in the provenance, ``uns[key]["references"]``).
    label_keys
        The label column of each reference: one string for all, one per reference, or (with a mapping of references)
        a mapping by source name.
    table_key
        The table of a SpatialData.
    tissue
        Tissue of the sample (a string), recorded with the results.
    balance
        How a cell type's quota is split between references: ``"proportional"`` to what each has, or ``"equal"``.
    max_cells_per_type
        Cap of training cells per cell type (after combining references); ``None``: no cap.
    max_cells_per_ref
        Cap of cells read from each reference; ``None``: no cap.
    target_proportions
        Optional wanted share of each type in the training set (dict, JSON or CSV path; see
        :func:`~spatialcx.pp.subsample_balanced`). A file is read, and the values checked, before the references are;
        the proportions used are recorded in ``uns[key_added]["target_proportions"]`` (``cell_types``,
        ``proportions``).
    exclude_labels
        Reference labels that are not cell types; their cells are left out of training (exact, case-sensitive
        match). The default (``scx.pp.DEFAULT_EXCLUDE_LABELS``) covers ``NA``, ``Unknown``, ``Doublet``,
        ``Ambiguous``, ``Unclassified``, ``Low quality`` and their usual spellings; pass
        ``[*scx.pp.DEFAULT_EXCLUDE_LABELS, "Unstable"]`` to add a reference's own.
    confidence_threshold
        Cells with a confidence below it are ``Unassigned`` in ``{key_added}``.
    confidence
        Confidence method (:func:`~spatialcx.tl.transform_confidence`); the default ``"calibrated"`` uses the
        trained model's reference calibration.
    model_out
        Save the trained model there (``.npz`` appended unless it is the suffix; loads without executing code;
        ``~`` is expanded). The file takes its name only once the results are in the table (and its store): a failed
        run leaves an earlier file there as it was. Its path is recorded in ``uns[key_added]["model_path"]``.
    plots_dir
        Write QC plots there (when ``plots``), after the results are saved.
    add_ontology
        Map labels to Cell Ontology ids and names (``{key_added}_ontology_term_id``, ``{key_added}_ontology_label``);
        ``{key_added}`` then shows the CL name of each mapped label and the reference's own label otherwise. The id
        goes with ``{key_added}``: ``unknown`` for ``Unassigned`` cells (the CELLxGENE rule for cells without a cell
        type); ``{key_added}_ontology_label`` names every cell's predicted type, unfiltered.
    plots
        Draw the QC plots into ``plots_dir``.
    key_added
        Prefix of the output keys.
    train_kwargs
        Extra arguments of :func:`~spatialcx.tl.train` (e.g. ``{"method": "minibatch"}``).
    chunk_size
        Cells processed at a time when reading and scoring.
    random_state
        Seed of everything random.
    copy
        Return an annotated copy instead of modifying ``data``.
    write
        Persist the outputs into the zarr store of a backed SpatialData (crash-safe; X never rewritten).

    Returns
    -------
    The annotated copy when ``copy=True``, else None. Writes ``obs`` columns ``{key}``, ``{key}_predicted``,
    ``{key}_confidence``, ``{key}_confidence_raw``, ``{key}_n_genes``, ``{key}_ontology_term_id``,
    ``{key}_ontology_label``, the decision
    scores in ``obsm["{key}_decision_scores"]`` and the parameters, model hash, versions and reference provenance in
    ``uns[key]``.
    """
    from spatialcx._table import WRITTEN_ATTR, check_key, resolve_table
    from spatialcx._utils import check_writable_dir, check_writable_file
    from spatialcx.pp import combine_references, panel_genes, subsample_balanced
    from spatialcx.pp._balance import read_target_proportions
    from spatialcx.pp._normalization import find_expression_source
    from spatialcx.tl._confidence import CONFIDENCE_METHODS
    from spatialcx.tl._filter import filter_low_confidence
    from spatialcx.tl._predict import compute_predictions, train, warn_if_foreign, write_predictions

    if isinstance(confidence_threshold, bool) or not isinstance(confidence_threshold, Real):
        raise TypeError(f"confidence_threshold must be a number in [0, 1], got {confidence_threshold!r}.")
    if not 0 <= confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}.")
    if confidence not in CONFIDENCE_METHODS:
        raise ValueError(f"Unknown confidence method {confidence!r}; choose one of {CONFIDENCE_METHODS}.")
    if balance not in ("proportional", "equal"):
        raise ValueError(f"balance must be 'proportional' or 'equal', got {balance!r}.")
    for name, cap in (("max_cells_per_type", max_cells_per_type), ("max_cells_per_ref", max_cells_per_ref)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, Integral) or cap < 1):
            raise ValueError(f"{name} must be a positive integer (or None: no cap), got {cap!r}.")
    if isinstance(random_state, bool) or not isinstance(random_state, Integral) or random_state < 0:
        raise (ValueError if isinstance(random_state, Integral) else TypeError)(
            f"random_state must be a non-negative integer seed (e.g. 0), got {random_state!r}: annotate is "
            "reproducible, so every draw and the training are seeded."
        )
    if not isinstance(tissue, str):
        raise TypeError(f"tissue must be a string naming the tissue of the sample (e.g. 'lung'), got {tissue!r}.")
    _check_train_kwargs(train_kwargs, train)
    check_key(key_added, "key_added")
    # output paths and the target proportions are checked before anything is read, trained or written
    model_path = None
    if model_out is not None:
        from spatialcx.model._model import model_file_path

        model_path = model_file_path(model_out)  # the file model.save() writes
        check_writable_file(model_path, "model_out")
    if plots_dir is not None:
        plots_dir = Path(plots_dir).expanduser()
        if plots:
            check_writable_dir(plots_dir, "plots_dir")
    proportions = read_target_proportions(target_proportions)
    references, label_keys = _as_list(references, label_keys)
    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    panel = panel_genes(adata)
    logger.info("panel: %d genes", len(panel))
    # fail fast, before the references are read and a model trained: the table must hold usable expression
    find_expression_source(adata)
    warn_if_foreign(adata, key_added)

    combined = combine_references(
        references,
        label_keys,
        genes=panel,
        max_cells_per_ref=max_cells_per_ref,
        exclude_labels=exclude_labels,
        random_state=random_state,
    )
    _check_no_unassigned_class(combined.obs[ORIGINAL_LABEL_KEY])
    balanced = subsample_balanced(
        combined,
        ORIGINAL_LABEL_KEY,
        max_cells_per_type=max_cells_per_type,
        source_key=SOURCE_KEY,
        source_balance=balance,
        target_proportions=proportions,
        random_state=random_state,
    )
    model = train(
        balanced,
        ORIGINAL_LABEL_KEY,
        genes=list(balanced.var_names),
        exclude_labels=exclude_labels,  # already applied by combine_references: keeps what the caller kept
        random_state=random_state,
        chunk_size=chunk_size,
        **dict(train_kwargs or {}),
    )
    model.description["tissue"] = tissue
    model.description["references"] = _provenance(balanced)
    out = compute_predictions(adata, model, confidence=confidence, chunk_size=chunk_size)

    classes = [str(c) for c in model.classes]
    if add_ontology:
        names, ids, cl_names, mapping = ontology_names(classes)
    else:
        names, ids, cl_names, mapping = classes, [], [], None

    # The model goes to a temporary file beside model_out and takes that name only once the table holds the results:
    # a failure leaves an earlier model at model_out (which an earlier annotation may name) as it was.
    created = _missing_dirs(model_path.parent) if model_path is not None else []
    staged = None
    keys = output_keys(key_added)
    ref.snapshot()  # what a failure below puts back (already kept for a backed store)
    try:
        if model_path is not None:
            staged = model.save(_staging_path(model_path))
        # all computed: write into the table
        write_predictions(adata, out, key_added=key_added)  # foreign columns: warned about before training
        codes = out.labels.codes
        if add_ontology:
            adata.obs[keys["ontology_id"]] = pd.Categorical(np.asarray(ids, dtype=object)[codes])
            adata.obs[keys["ontology_label"]] = pd.Categorical(np.asarray(cl_names, dtype=object)[codes])
        params = adata.uns[key_added]
        params["model_description"].pop("references", None)  # kept once, at the top level
        params.update(
            {
                "names": names,
                "ontology_term_ids": ids,
                "tissue": tissue,
                "references": _provenance(balanced),
                "balance": balance,
                "exclude_labels": label_list(exclude_labels),
                "random_state": int(random_state),
            }
        )
        for name, cap in (("max_cells_per_type", max_cells_per_type), ("max_cells_per_ref", max_cells_per_ref)):
            if cap is not None:  # None (no cap) is not storable in uns: left out
                params[name] = int(cap)
        if proportions is not None:  # lists, not a dict by label: labels are not always valid zarr/h5ad keys
            params["target_proportions"] = {
                "cell_types": list(proportions),
                "proportions": [float(v) for v in proportions.values()],
            }
        if mapping is not None:
            params["ontology_mapping"] = _mapping_lists(mapping)
        filter_low_confidence(adata, key=key_added, threshold=confidence_threshold, unassigned_label=UNASSIGNED)
        if model_path is not None:  # absolute: the table (and its store) may be opened from any working folder
            adata.uns[key_added]["model_path"] = os.path.abspath(model_path)
    except BaseException:
        ref.restore()
        _discard(staged, created)
        raise
    try:
        result = ref.finish(write=write, elements=("obs", "obsm", "uns"))
    except BaseException as e:
        if getattr(e, WRITTEN_ATTR, False):  # the store holds the results, which name the model: put it in place
            _move_into_place(staged, model_path)
        else:
            _discard(staged, created)
        raise
    _move_into_place(staged, model_path)

    if plots and plots_dir is not None:
        _plots(result if copy else data, plots_dir, key_added, confidence_threshold, mapping, table_key)
    return result


def _check_train_kwargs(train_kwargs: Mapping[str, Any] | None, train: Any) -> None:
    """``train_kwargs`` must name options of :func:`~spatialcx.tl.train` that annotate does not set itself."""
    import inspect

    if train_kwargs is None:
        return
    if not isinstance(train_kwargs, Mapping):
        raise TypeError(f"train_kwargs must be a mapping of train() options, e.g. {{'C': 0.5}}; got {train_kwargs!r}.")
    own = ("reference", "label_key", "genes", "exclude_labels", "random_state", "chunk_size")
    set_here = sorted(k for k in train_kwargs if k in own)
    if set_here:
        raise ValueError(
            f"train_kwargs sets {set_here}, which annotate sets itself (the reference, its labels and the panel genes) "
            "or takes as its own arguments (exclude_labels, random_state, chunk_size); pass those to annotate."
        )
    parameters = inspect.signature(train).parameters
    options = [p for p in parameters if p not in own]
    unknown = sorted(k for k in train_kwargs if k not in options)
    if unknown:
        raise ValueError(f"train_kwargs names {unknown}, which are not options of scx.tl.train; valid: {options}.")
    # values that cannot train are refused now, not once the references are read (remote ones downloaded): the
    # checks scx.tl.train makes before it reads anything
    from spatialcx.model._train import _check_fit_params
    from spatialcx.tl._predict import _check_min_genes

    settings = {name: train_kwargs.get(name, parameters[name].default) for name in _FIT_SETTINGS}
    try:
        _check_fit_params(**settings)
        _check_min_genes(train_kwargs.get("min_genes", parameters["min_genes"].default))
    except ValueError as e:
        raise ValueError(f"train_kwargs: {e}") from None


#: Options of scx.tl.train checked by ``_check_fit_params``.
_FIT_SETTINGS = ("method", "batch_size", "epochs", "max_iter", "balance_cell_type", "C", "alpha", "n_jobs")


def _check_no_unassigned_class(labels: pd.Series) -> None:
    """A reference type named like the label of low-confidence cells could not be told apart from them."""
    present = set(pd.unique(labels.astype(str)))
    if UNASSIGNED in present:
        raise ValueError(
            f"A reference labels cells {UNASSIGNED!r}, which is the label annotate gives cells below the confidence "
            f"threshold: the two could not be told apart in the results. Leave those cells out (keep {UNASSIGNED!r} "
            "in exclude_labels, as the default does) or rename the label."
        )


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet (deepest first): the ones saving there creates."""
    out = []
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        out.append(folder)
        folder = folder.parent
    return out


def _staging_path(path: Path) -> Path:
    """A hidden temporary name beside ``path`` (beside the file a symbolic link points to) with the ``.npz`` suffix."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.npz")


def _move_into_place(staged: Path | None, path: Path | None) -> None:
    """Rename the saved model onto ``path`` (a file replaced keeps its permissions; a symbolic link is kept)."""
    if staged is None or path is None:
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        if target.is_file():
            os.chmod(staged, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(staged, target)
    except OSError as e:
        e.add_note(
            f"The results are in the table, but the model they name could not be moved from {staged} to {target}; "
            "move it there yourself."
        )
        raise


def _discard(staged: Path | None, created: list[Path]) -> None:
    """Remove a staged model and the (empty) folders made for it."""
    if staged is not None:
        staged.unlink(missing_ok=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there) or already gone: leave it
            break


def _provenance(balanced: AnnData) -> dict[str, dict[str, Any]]:
    """Reference provenance as ``{"ref0": {...}, ...}``: keys that are always valid zarr/h5ad names, in input order.

    (A list of dicts cannot be written to h5ad; source names are kept inside each entry, ``name``.)
    """
    from spatialcx.tl._predict import _jsonable_dict

    prov = balanced.uns.get("spatialcx_references", {})
    entries = list(prov.values()) if isinstance(prov, dict) else list(prov)
    entries = sorted((dict(e) for e in entries), key=lambda e: int(e.get("index", 0)))
    return {f"ref{i}": _jsonable_dict(e) for i, e in enumerate(entries)}


def _mapping_lists(mapping: Any) -> dict[str, list]:
    t = mapping.table
    out = {}
    for col in t.columns:
        vals = t[col]
        out[str(col)] = [v.item() if hasattr(v, "item") else ("" if v is None else v) for v in vals.tolist()]
        out[str(col)] = [("" if (isinstance(v, float) and np.isnan(v)) else v) for v in out[str(col)]]
    return out


def _plots(data: Any, plots_dir: Path, key: str, threshold: float, mapping: Any, table_key: str) -> dict[str, Any]:
    """Draw every QC plot into ``plots_dir`` with :func:`spatialcx.pl.annotation_report`.

    A plot that cannot be drawn is logged, never raised: the annotation is already saved.
    """
    from spatialcx import pl

    return pl.annotation_report(
        data, key=key, table_key=table_key, plots_dir=plots_dir, mapping=mapping, threshold=threshold
    )
