"""Combine labelled references over the genes they share with the panel."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import DEFAULT_EXCLUDE_LABELS, ORIGINAL_LABEL_KEY, SOURCE_KEY, TARGET_SUM, label_list
from .._settings import logger
from .._utils import progress, whole_number
from ._balance import REFERENCES_UNS_KEY
from ._harmonize import check_overlap, match_genes

if TYPE_CHECKING:
    from ..io._reference import ReferenceHandle
    from ._harmonize import GeneSymbols

#: Key in ``.uns`` of the output of :func:`combine_references` with its parameters.
COMBINE_UNS_KEY = "spatialcx_combine"


def _as_lists(references: Any, label_keys: Any) -> tuple[list[str | None], list[Any], list[str]]:
    """Normalise ``references`` / ``label_keys`` to ``(names, references, label keys)``."""
    if isinstance(references, Mapping):
        names: list[str | None] = [str(k) for k in references]
        refs = list(references.values())
    else:
        if isinstance(references, AnnData | str | os.PathLike) or hasattr(references, "tables"):  # SpatialData: one
            references = [references]
        try:
            refs = list(references)
        except TypeError:
            refs = [references]  # not iterable: reported below
        names = [None] * len(refs)
    if not refs:
        raise ValueError("No reference given: pass one or more AnnData objects, .h5ad/.zarr paths or URIs.")
    for i, ref in enumerate(refs):
        if not isinstance(ref, AnnData | str | os.PathLike):
            hint = (
                " Pass its table instead, e.g. sdata.tables['table']."
                if hasattr(ref, "tables")
                else " Load it as an AnnData first, or pass the path of its .h5ad file or .zarr folder."
            )
            raise TypeError(
                f"Reference {i} is a {type(ref).__name__}; references must be AnnData objects (in memory, backed or "
                f"lazy), .h5ad / .zarr paths or URIs.{hint}"
            )
    if label_keys is None:
        raise TypeError(
            "label_keys is None: give the obs column holding the cell-type labels, one string for all references or "
            "one per reference."
        )
    if isinstance(label_keys, str):
        keys = [label_keys] * len(refs)
    elif isinstance(label_keys, Mapping):
        if None in names:
            raise ValueError(
                f"label_keys is a mapping (keys {list(label_keys)[:5]}) but references is a "
                f"{type(references).__name__}, not a mapping, so the label keys cannot be matched to references by "
                "name. Pass references as a mapping with the same names (e.g. {'atlas': adata}), or label_keys as "
                "one string or a list in the order of references."
            )
        missing = [n for n in names if n not in label_keys]
        if missing:
            raise ValueError(
                "label_keys is a mapping, so references must be a mapping with the same names; missing label keys "
                f"for {missing}."
            )
        keys = [str(label_keys[n]) for n in names]
    else:
        keys = [str(k) for k in label_keys]
    if len(keys) != len(refs):
        raise ValueError(
            f"{len(refs)} references but {len(keys)} label keys: give one label key per reference (or one string for "
            "all)."
        )
    return names, refs, keys


def _unique_names(names: list[str]) -> list[str]:
    """Readable unique source names (``"/"`` is not allowed in h5ad keys)."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for name in names:
        base = str(name).replace("/", "_") or "ref"
        candidate = base
        while candidate in seen:
            seen[base] += 1
            candidate = f"{base}-{seen[base]}"
        seen.setdefault(candidate, 0)
        out.append(candidate)
    return out


def _warn_case_variants(counts: pd.Series) -> None:
    """Warn about labels that differ only in case (``"T cell"`` and ``"T Cell"``): they stay different types."""
    folded = pd.Series(counts.index.astype(str), index=counts.index).str.casefold()
    clashes = [sorted(g) for _, g in folded.groupby(folded, sort=True).groups.items() if len(g) > 1]
    if clashes:
        logger.warning(
            "Labels that differ only in case are kept as different cell types: %s. If they are the same type, give "
            "them one spelling before combining (or balance and train on an ontology column).",
            "; ".join(" / ".join(f"{t!r} ({int(counts[t])} cells)" for t in g) for g in clashes),
        )


def _same_first_cells(handles: list[ReferenceHandle], n: int = 64) -> list[list[ReferenceHandle]]:
    """``handles`` grouped by the expression of their first ``n`` cells (all genes), read as float64 CSR."""
    groups: list[tuple[sp.csr_matrix, list[ReferenceHandle]]] = []
    for h in handles:
        k = min(n, h.n_obs)
        block = sp.csr_matrix(h.read(np.arange(k), np.arange(len(h.var_names))), dtype=np.float64)
        block.sum_duplicates()
        block.eliminate_zeros()
        for first, group in groups:
            if first.shape == block.shape and (first != block).nnz == 0:
                group.append(h)
                break
        else:
            groups.append((block, [h]))
    return [group for _, group in groups]


def _warn_same_data(handles: list[ReferenceHandle]) -> None:
    """Warn when references have the same checksum: a reference given twice has its cells counted twice.

    Files are compared by their checksum; references in memory by their cell names, gene names and labels, and, when
    those agree, by the expression of their first cells (the same cells processed two ways are not a repeat).
    """
    by_checksum: dict[str, list[ReferenceHandle]] = {}
    for h in handles:
        if h.checksum:
            by_checksum.setdefault(h.checksum, []).append(h)
    for checksum, same in by_checksum.items():
        groups = _same_first_cells(same) if len(same) > 1 and checksum.startswith("sha256-names:") else [same]
        for group in groups:
            if len(group) > 1:
                logger.warning(
                    "References %s have the same checksum (of the file; in memory: of the cell names, gene names, "
                    "labels and the first cells' expression): they look like one reference given %d times, so each "
                    "of its cells would count %d times in training. Pass each reference once.",
                    [h.name for h in group],
                    len(group),
                    len(group),
                )


def _check_values(counts: sp.csr_matrix, handle: ReferenceHandle, rows: np.ndarray, genes: list[str]) -> None:
    """Raise a ValueError naming the first cell whose expression read is NaN, infinite or negative.

    The normalization detection looks at a sample of cells only, so a few bad cells can get past it; they would turn
    the training matrix into NaN (or negative expression) without a word.
    """
    bad = ~np.isfinite(counts.data) | (counts.data < 0)
    if not bad.any():
        return
    pos = np.flatnonzero(bad)
    bad_rows = np.searchsorted(counts.indptr, pos, side="right") - 1
    first = int(pos[0])
    raise ValueError(
        f"Reference {handle.name!r}: {handle.where} holds {float(counts.data[first])} for cell "
        f"{handle.obs_names[rows[bad_rows[0]]]!r}, gene {genes[counts.indices[first]]!r}; {len(pos)} values in "
        f"{len(np.unique(bad_rows))} of the {counts.shape[0]} cells read are NaN, infinite or negative. Expression "
        f"({handle.kind}) must be finite and >= 0, and the normalization check only looks at a sample of cells. Fix "
        "or drop these cells in the reference, or give its raw counts in layers['counts']."
    )


def _counts_list(series: pd.Series) -> dict[str, list]:
    series = series[series > 0]
    return {"cell_types": [str(t) for t in series.index], "n_cells": [int(v) for v in series.to_numpy()]}


def combine_references(
    references: AnnData | str | os.PathLike | Sequence[AnnData | str | os.PathLike] | Mapping[str, Any],
    label_keys: str | Sequence[str] | Mapping[str, str],
    *,
    genes: Sequence[str] | None = None,
    output_key: str = ORIGINAL_LABEL_KEY,
    source_key: str = SOURCE_KEY,
    max_cells_per_ref: int | None = 100_000,
    exclude_labels: Sequence[str] = DEFAULT_EXCLUDE_LABELS,
    min_cells_per_type: int = 10,
    filter_min_cells: bool = True,
    random_state: int | np.random.Generator | None = 0,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """Combine labelled references into one training set over the genes they share with the panel.

    Each reference is read lazily: first only its label column; the cells to keep are chosen from the labels alone;
    then only those rows and only the shared genes are read from its raw counts, in bounded blocks. Memory therefore
    grows with the cells kept and the panel, not with the size of the references.

    Steps, per reference:

    1. Labels: surrounding whitespace is stripped (``"T cell "`` is ``"T cell"``); cells without a label (missing
       or empty), and cells whose label is in ``exclude_labels`` (exact, case-sensitive match) are dropped. Labels
       that differ only in case stay different types, with a warning.
    2. Genes: var names are mapped to symbols (Ensembl ids through ``var["feature_name"]`` or the packaged human /
       mouse tables; duplicated symbols: the first in var order wins) and matched to ``genes`` exactly, then
       case-insensitively where unambiguous (mouse ``Gad1`` = human ``GAD1``). The shared genes are the panel genes
       found in every reference, in panel order; too small an overlap raises a ValueError.
    3. Cells: at most ``max_cells_per_ref`` labelled cells, the largest types capped first so that rare types stay
       whole, drawn at random within a type.
    4. Across references, types with fewer than ``min_cells_per_type`` labelled cells (counted before
       ``max_cells_per_ref``, so a cap never removes a type) are removed (``filter_min_cells=True``) or kept with a
       warning. A reference left without cells by this is named in a warning and takes no part in step 2: its genes
       do not limit the genes shared by the others.
    5. Expression: the raw counts are located with the normalization detection (``layers["counts"]``,
       ``layers["raw_counts"]``, ``layers["raw"]``, ``raw.X``, ``X``); a reference with only verified log1p(10k)
       data is used through ``expm1`` of it (counts per 10,000, which normalize to the same values). Cells with no
       counts over the shared genes are dropped. ``X`` is ``log1p(normalize_total(counts, 1e4))`` over the shared
       genes.

    Parameters
    ----------
    references
        AnnData objects (in memory, backed or lazy, e.g. from :func:`spatialcx.io.read_reference`), local paths
        (``.h5ad``, AnnData ``.zarr``) or URIs (``file://``, ``https://``, ``gs://``, ``s3://``); a mapping gives
        each its source name.
    label_keys
        The label column of each reference; one string for all, a sequence, or a mapping by source name.
    genes
        The panel: a list of gene names, or the spatial table / SpatialData itself (its
        :func:`~spatialcx.pp.panel_genes`). ``None`` uses the genes shared by all references, matched as panel
        genes are (so mouse ``Gad1`` and human ``GAD1`` are one gene), in the first reference's order and spelling.
    output_key
        obs column of the output holding the labels.
    source_key
        obs column of the output naming each cell's reference: the mapping key, the file stem, or ``ref<i>``.
    max_cells_per_ref
        Cap of labelled cells read per reference (``None``: all).
    exclude_labels
        Labels that are not cell types; ``[]`` keeps everything.
    min_cells_per_type
        Fewest labelled cells a type needs across references (before ``max_cells_per_ref``; a warning names the
        types that the cap leaves with fewer).
    filter_min_cells
        Remove types below ``min_cells_per_type`` (otherwise keep them with a warning).
    random_state
        Seed of the cell draws, or a :class:`numpy.random.Generator`; ``None`` draws differently on every call
        (recorded as ``-1``).
    cache_dir
        Cache folder for remote URIs.

    Returns
    -------
    A new in-memory AnnData: kept cells x shared genes (symbols, panel spelling), ``layers["counts"]`` the raw
    counts (CSR float32; for a reference with only log1p(10k) data, ``expm1`` of it: counts per 10,000, not
    integers), ``X`` their ``log1p(normalize_total(., 1e4))`` (CSR float32), obs ``output_key`` and
    ``source_key`` (categorical). ``uns["spatialcx_references"]`` is a dict keyed by source name, one entry per
    reference (``index``, ``name``, ``uri``, ``checksum``, ``label_key``, ``expression`` and ``expression_source``,
    ``gene_names``, ``n_cells``, ``n_cells_labelled``, ``n_panel_genes``, ``n_panel_genes_found``,
    ``n_genes_case_insensitive``, ``excluded_labels``, ``cells_kept`` per type); ``uns["spatialcx_combine"]`` the
    parameters and the types removed.
    """
    from ..io._reference import choose_cells, clean_labels, open_reference

    min_cells_per_type = whole_number(min_cells_per_type, "min_cells_per_type", minimum=0)
    if max_cells_per_ref is not None:
        max_cells_per_ref = whole_number(max_cells_per_ref, "max_cells_per_ref", minimum=1, none_ok=True)
    from .._table import check_key

    check_key(output_key, "output_key")
    check_key(source_key, "source_key")
    if output_key == source_key:
        raise ValueError(
            f"output_key and source_key are both {output_key!r}; the labels and the source names need two obs "
            f"columns (defaults: {ORIGINAL_LABEL_KEY!r} and {SOURCE_KEY!r})."
        )
    excluded_set = set(label_list(exclude_labels))  # None (a YAML config's `null`): the default
    names, refs, keys = _as_lists(references, label_keys)
    panel = _panel_list(genes)

    handles: list[ReferenceHandle] = []
    try:
        for i, (name, ref, key) in enumerate(zip(names, refs, keys)):
            if name is None and isinstance(ref, AnnData) and ref.isbacked and ref.filename is not None:
                name = Path(ref.filename).name.removesuffix(".h5ad") or None  # a backed file: its stem, as for paths
            try:
                handles.append(open_reference(ref, key, name=name, cache_dir=cache_dir))
            except (KeyError, ValueError) as e:
                what = repr(name) if name else (str(i) if isinstance(ref, AnnData) else repr(os.fspath(ref)))
                msg = e.args[0] if e.args else str(e)
                cls = KeyError if isinstance(e, KeyError) else ValueError
                raise cls(f"Reference {what} (label key {key!r}): {msg}") from e
            if name is None and isinstance(ref, AnnData) and handles[-1].name == "ref":
                handles[-1].name = f"ref{i}"
        source_names = _unique_names([h.name for h in handles])
        for h, n in zip(handles, source_names):
            h.name = n
            h.labels = clean_labels(h.labels, n)
        _warn_same_data(handles)

        # labels and cells ---------------------------------------------------------------------------------------
        rng = np.random.default_rng(random_state)
        chosen: list[np.ndarray] = []
        excluded_counts: list[pd.Series] = []
        n_labelled: list[int] = []
        valids: list[np.ndarray] = []
        for h in handles:
            labels = h.labels
            has_label = labels.notna().to_numpy()
            is_excluded = labels.astype(object).isin(list(excluded_set)).to_numpy() & has_label
            valids.append(has_label & ~is_excluded)
        # a type's size is its labelled cells across all references, before max_cells_per_ref caps them: a type of
        # 100 cells capped to 8 is not too small. Types too small must not take a share of max_cells_per_ref either.
        type_totals = pd.concat([h.labels[v] for h, v in zip(handles, valids)]).astype(str).value_counts()
        set_aside = pd.Series(dtype=np.int64)  # type -> its cells across references
        if filter_min_cells and min_cells_per_type > 1:
            set_aside = type_totals[type_totals < min_cells_per_type]
        too_small = set(set_aside.index)
        for h, valid in zip(handles, valids):
            labels = h.labels
            has_label = labels.notna().to_numpy()
            is_excluded = has_label & ~valid
            excluded_counts.append(labels[is_excluded].astype(str).value_counts())
            if is_excluded.any():  # as scx.tl.train says it
                logger.warning(
                    "reference %r: %d cells labelled %s are left out (not cell types: exclude_labels; pass "
                    "exclude_labels=() to keep them, or --keep-label LABEL with the CLI).",
                    h.name,
                    int(is_excluded.sum()),
                    sorted(excluded_counts[-1].index),
                )
            n_labelled.append(int(valid.sum()))
            if not valid.any():
                raise ValueError(
                    f"Reference {h.name!r} has no usable labels in obs[{h.label_key!r}] after removing missing labels "
                    f"and {sorted(excluded_set)[:6]}...: check label_keys, or pass exclude_labels=[]."
                )
            fits = valid & ~labels.astype(object).isin(list(too_small)).to_numpy() if too_small else valid
            chosen.append(choose_cells(labels, max_cells_per_ref, rng=rng, valid=fits))

        # the chosen cells' types, and the small types set aside above with their full counts
        all_labels = pd.concat(
            [
                pd.Series(
                    np.concatenate([h.labels.to_numpy()[c].astype(str) for h, c in zip(handles, chosen)])
                ).value_counts(),
                set_aside,
            ]
        ).sort_values(ascending=False, kind="stable")
        _warn_case_variants(all_labels)
        small = sorted(type_totals.index[type_totals < min_cells_per_type])
        if small and filter_min_cells:
            logger.warning(
                "Removing %d cell types with fewer than %d cells across references: %s.",
                len(small),
                min_cells_per_type,
                ", ".join(f"{t!r} ({type_totals[t]})" for t in small),
            )
            small_set = set(small)
            chosen = [c[~np.isin(h.labels.to_numpy()[c].astype(str), list(small_set))] for h, c in zip(handles, chosen)]
        elif small:
            logger.warning(
                "Keeping %d cell types with fewer than %d cells (filter_min_cells=False): %s.",
                len(small),
                min_cells_per_type,
                ", ".join(f"{t!r} ({type_totals[t]})" for t in small),
            )
        chosen_sizes = all_labels.reindex(type_totals.index, fill_value=0)
        capped = chosen_sizes[(chosen_sizes < min_cells_per_type) & (type_totals >= min_cells_per_type)]
        if len(capped):
            logger.warning(
                "max_cells_per_ref=%s leaves %d cell types with fewer than min_cells_per_type=%d cells: %s. They are "
                "kept; raise max_cells_per_ref to train on more of their cells.",
                max_cells_per_ref,
                len(capped),
                min_cells_per_type,
                ", ".join(f"{t!r} ({int(capped[t])} of {int(type_totals[t])})" for t in sorted(capped.index)[:10])
                + (f" and {len(capped) - 10} more" if len(capped) > 10 else ""),
            )

        # genes --------------------------------------------------------------------------------------------------
        # a reference that gives no cells (all its types too small) must not narrow the genes of the others
        gives = [len(c) > 0 for c in chosen]
        if not any(gives):
            raise ValueError(
                f"No cells left: every cell type has fewer than min_cells_per_type={min_cells_per_type} labelled "
                f"cells across references ({', '.join(f'{t!r} ({n})' for t, n in type_totals.iloc[:10].items())}"
                f"{', ...' if len(type_totals) > 10 else ''}). Lower "
                "min_cells_per_type, pass filter_min_cells=False, or add references with more cells of these types."
            )
        for h, n, g in zip(handles, n_labelled, gives):
            if not g:
                logger.warning(
                    "reference %r gives no cells: its %d labelled cells are of types with fewer than "
                    "min_cells_per_type=%d cells across references (%s). It is left out, and its genes do not limit "
                    "the genes shared by the other references.",
                    h.name,
                    n,
                    min_cells_per_type,
                    ", ".join(repr(t) for t in sorted(set(h.labels.dropna()) - excluded_set)[:5]),
                )
        symbols = [h.symbols() for h in handles]
        if panel is None:
            panel = _genes_in_every_reference(
                [h for h, g in zip(handles, gives) if g], [s for s, g in zip(symbols, gives) if g]
            )
        matches = [match_genes(panel, s.symbols, ids=h.var_names) for h, s in zip(handles, symbols)]
        found_sets = [set(m.genes) for m, g in zip(matches, gives) if g]
        shared = [g for g in panel if all(g in f for f in found_sets)]
        for h, m, g in zip(handles, matches, gives):
            if not g:
                continue
            if m.repeated:
                logger.warning(
                    "reference %r: %d panel genes are var names held more than once (e.g. %s); the first entry of "
                    "each is used and the others are left out. Make var names unique (adata.var_names_make_unique()) "
                    "or sum the repeated entries first if they are the same gene.",
                    h.name,
                    len(m.repeated),
                    m.repeated[:5],
                )
            log = logger.warning if m.missing else logger.info
            log(
                "reference %r: %d of %d panel genes found (%d case-insensitively)%s",
                h.name,
                m.n_found,
                len(panel),
                m.n_case_insensitive,
                f"; missing e.g. {m.missing[:5]} (they are left out of the model)." if m.missing else ".",
            )
        missing = [g for g in panel if g not in set(shared)]
        check_overlap(
            len(panel),
            {h.name: m.n_found for h, m, g in zip(handles, matches, gives) if g},
            len(shared),
            missing_example=missing,
        )
        shared_cols = []
        for m in matches:
            pos = dict(zip(m.genes, m.columns))
            shared_cols.append(np.asarray([pos[g] for g in shared if g in pos], dtype=np.int64))

        # expression ---------------------------------------------------------------------------------------------
        blocks: list[sp.csr_matrix] = []
        obs_parts: list[pd.DataFrame] = []
        empty_counts: list[int] = []
        for h, rows, cols in progress(zip(handles, chosen, shared_cols), total=len(handles), desc="references"):
            counts = h.read(rows, cols) if len(rows) else sp.csr_matrix((0, len(shared)), dtype=np.float32)
            _check_values(counts, h, rows, shared)
            if h.kind == "log1p":
                counts.data = np.expm1(counts.data)
            totals = np.asarray(counts.sum(axis=1)).ravel()
            nonempty = totals > 0
            empty_counts.append(int((~nonempty).sum()))
            if not nonempty.all():
                counts, rows = counts[nonempty], rows[nonempty]
            counts.eliminate_zeros()
            blocks.append(counts.astype(np.float32, copy=False))
            obs_parts.append(
                pd.DataFrame(
                    {output_key: h.labels.to_numpy()[rows].astype(str), source_key: h.name},
                    index=h.obs_names[rows],
                )
            )
        if sum(empty_counts):
            logger.info(
                "Dropped %d cells with no counts over the %d shared genes (%s).",
                sum(empty_counts),
                len(shared),
                ", ".join(f"{h.name}: {n}" for h, n in zip(handles, empty_counts) if n),
            )
        obs = pd.concat(obs_parts)
        if filter_min_cells:
            # cells with counts, plus the cells that max_cells_per_ref left unread (they may have counts)
            read = obs[output_key].value_counts().reindex(type_totals.index, fill_value=0)
            sizes = read + type_totals - chosen_sizes
            now_small = set(sizes.index[sizes < min_cells_per_type]) & (set(obs[output_key]) - set(small))
            if now_small:
                logger.warning(
                    "Removing %s: fewer than %d cells with counts over the shared genes.",
                    sorted(now_small),
                    min_cells_per_type,
                )
                keep = ~obs[output_key].isin(now_small).to_numpy()
                offsets = np.cumsum([0] + [b.shape[0] for b in blocks])
                blocks = [b[keep[offsets[k] : offsets[k + 1]]] for k, b in enumerate(blocks)]
                obs = obs[keep]
                small = sorted(set(small) | now_small)
        if obs.empty:
            raise ValueError(
                "No cells left after removing excluded labels, small types and cells without counts over the "
                f"{len(shared)} shared genes. Lower min_cells_per_type or check the references."
            )

        counts = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr", dtype=np.float32)
        del blocks  # the blocks are in counts now: not held twice while X is computed
        obs[output_key] = pd.Categorical(obs[output_key])
        obs[source_key] = pd.Categorical(obs[source_key], categories=[h.name for h in handles])
        provenance: dict[str, dict[str, Any]] = {}
        for i, (h, m, s, excl) in enumerate(zip(handles, matches, symbols, excluded_counts)):
            kept = obs.loc[obs[source_key] == h.name, output_key].value_counts().sort_index()
            provenance[h.name] = {
                "index": i,
                "name": h.name,
                "uri": h.uri,
                "checksum": h.checksum,
                "label_key": h.label_key,
                "expression": h.kind,
                "expression_source": h.where,
                "gene_names": s.method,
                "n_cells": int(h.n_obs),
                "n_cells_labelled": n_labelled[i],
                "n_cells_without_counts": empty_counts[i],
                "n_genes": int(len(h.var_names)),
                "n_panel_genes": len(panel),
                "n_panel_genes_found": int(m.n_found),
                "n_genes_case_insensitive": int(m.n_case_insensitive),
                "excluded_labels": {"labels": [str(t) for t in excl.index], "n_cells": excl.astype(int).tolist()},
                "cells_kept": _counts_list(kept),
            }
    finally:
        for h in handles:
            h.close()

    if not obs.index.is_unique:
        from anndata.utils import make_index_unique

        obs.index = make_index_unique(obs.index.astype(str))
    out = AnnData(
        X=_log1p_normalize(counts),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(shared)),
        layers={"counts": counts},
    )
    out.uns[REFERENCES_UNS_KEY] = provenance
    out.uns[COMBINE_UNS_KEY] = {
        "n_panel_genes": len(panel),
        "n_shared_genes": len(shared),
        "max_cells_per_ref": -1 if max_cells_per_ref is None else int(max_cells_per_ref),
        "exclude_labels": sorted(excluded_set),
        "min_cells_per_type": int(min_cells_per_type),
        "filter_min_cells": bool(filter_min_cells),
        "removed_types": [str(t) for t in small] if filter_min_cells else [],
        "random_state": int(random_state) if isinstance(random_state, int | np.integer) else -1,
        "target_sum": float(TARGET_SUM),
    }
    logger.info("Combined %d references: %d cells x %d genes.", len(handles), out.n_obs, out.n_vars)
    return out


def _genes_in_every_reference(handles: list[ReferenceHandle], symbols: list[GeneSymbols]) -> list[str]:
    """Genes of the first reference found in every other one, matched as panel genes are (see :func:`match_genes`)."""
    shared = list(dict.fromkeys(symbols[0].symbols))
    for s in symbols[1:]:
        found = set(match_genes(shared, s.symbols).genes)
        shared = [g for g in shared if g in found]
    if not shared:
        per_ref = "; ".join(
            f"{h.name!r}: {len(s.symbols)} genes, e.g. {list(s.symbols[:3])}" for h, s in zip(handles, symbols)
        )
        raise ValueError(
            f"The references have no gene in common ({per_ref}). With genes=None the genes found in every reference "
            "are used. Check that the references are of one species and name genes alike (symbols or Ensembl ids, "
            "with var['feature_name'] for the ids), or pass the panel as genes=."
        )
    return shared


def _panel_list(genes: Any) -> list[str] | None:
    """The panel as a list of unique names (first occurrence kept); a table or SpatialData gives its panel genes."""
    if genes is None:
        return None
    if isinstance(genes, str):
        raise TypeError(
            f"genes must be a list of gene names (or a table / SpatialData), not a single string; pass "
            f"genes=[{genes!r}]."
        )
    if hasattr(genes, "var_names") or hasattr(genes, "tables"):
        from ._genes import panel_genes

        genes = panel_genes(genes)
    panel = list(dict.fromkeys(str(g) for g in genes))
    if not panel:
        raise ValueError("genes is empty: give the panel genes, or None to use the genes shared by the references.")
    return panel


def _log1p_normalize(counts: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p(normalize_total(counts, target_sum=1e4))`` through scanpy, as CSR float32."""
    import scanpy as sc

    tmp = AnnData(X=counts.copy())
    sc.pp.normalize_total(tmp, target_sum=TARGET_SUM)
    sc.pp.log1p(tmp)
    return sp.csr_matrix(tmp.X, dtype=np.float32)
