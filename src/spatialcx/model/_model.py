"""``CellTypeModel``: a CellTypist-compatible linear model with exact, sparse, chunked scoring.

The model is CellTypist's: a standard scaler (``(x - mean) / scale``, scaled values clipped at 10) followed by a
one-vs-rest logistic regression. Scoring never densifies the query: because a zero is never clipped
(``-mean / scale <= 10`` for non-negative data), the scaled zeros are a constant that folds into the intercept, and
the clip is applied to the non-zero entries only. The result equals CellTypist's decision matrix to float rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from spatialcx._constants import TARGET_SUM
from spatialcx._settings import logger
from spatialcx._utils import as_str_array, write_atomically

if TYPE_CHECKING:
    from celltypist.models import Model as CelltypistModel

#: Version of the on-disk format written by :meth:`CellTypeModel.save` (2 adds the confidence calibration; files
#: without one are still written as version 1).
FORMAT_VERSION = 2
_FORMAT_NAME = "spatialcx.CellTypeModel"

NormalizeOver = Literal["genes", "all"]

#: Key of a CellTypist model's ``description`` under which :meth:`CellTypeModel.to_celltypist` keeps what a CellTypist
#: model cannot hold (normalization, clip, target sum, calibration, description, hash), for
#: :meth:`CellTypeModel.from_celltypist` to restore.
CELLTYPIST_DESCRIPTION_KEY = "spatialcx"
#: The clip CellTypist applies to scaled values, hard-coded in ``celltypist.classifier.Classifier.celltype``.
CELLTYPIST_CLIP = 10.0


@dataclass(frozen=True)
class ScoringWeights:
    """The scaler folded into the weights, for the model genes present in one query.

    A zero is never clipped (its scaled value ``z0 = -mean / scale`` is at most the clip for non-negative means), so
    zeros contribute a constant that is folded into ``intercept``; non-zeros contribute
    ``min(x / scale - mean / scale, clip) - z0``. Scores are exact (float64) and the query stays sparse.
    """

    weights: np.ndarray  # (n_present, n_classes)
    intercept: np.ndarray  # (n_classes,)
    inv_scale: np.ndarray
    shift: np.ndarray
    z0: np.ndarray
    clip: float

    def at_clip(self, x: sparse.csr_matrix) -> np.ndarray:
        """For each present gene, how many cells of a normalized CSR block reach the clip (scaled value >= clip)."""
        cols = x.indices
        reached = x.data * self.inv_scale[cols] - self.shift[cols] >= self.clip
        return np.bincount(cols[reached], minlength=self.weights.shape[0]).astype(np.int64)

    def score(self, x: sparse.spmatrix | np.ndarray) -> np.ndarray:
        """Decision scores ``(n_cells, n_classes)`` of a normalized block whose columns are the present genes."""
        # a new CSR object (the caller's is left alone); its values are replaced, never modified in place
        x = sparse.csr_matrix(x, dtype=np.float64)
        cols = x.indices
        if self._zero_unclipped:
            # min(x/s - m/s, clip) - z0 with z0 = -m/s  ==  min(x/s, clip + m/s): two gathers instead of three
            v = x.data * self.inv_scale[cols]
            np.minimum(v, self._cap[cols], out=v)
        else:
            v = x.data * self.inv_scale[cols]
            v -= self.shift[cols]
            np.minimum(v, self.clip, out=v)
            v -= self.z0[cols]
        x.data = v
        return self.intercept + x @ self.weights

    @functools.cached_property
    def _zero_unclipped(self) -> bool:
        return bool(np.array_equal(self.z0, -self.shift))

    @functools.cached_property
    def _cap(self) -> np.ndarray:
        return self.clip + self.shift


def _match_ensembl_versions(features: np.ndarray, index: pd.Index, pos: np.ndarray) -> np.ndarray:
    """``pos`` with the Ensembl ids not found exactly matched without their versions, where that is one to one."""
    from spatialcx.pp._harmonize import looks_like_ensembl, strip_version

    if not (looks_like_ensembl(features) and looks_like_ensembl(index)):
        return pos
    names = pd.Index(strip_version(index))
    wanted = pd.Series(strip_version(features))
    usable = ~names.duplicated(keep=False) & ~np.isin(np.arange(len(index)), pos[pos >= 0])
    todo = np.flatnonzero((pos < 0) & ~wanted.duplicated(keep=False).to_numpy())
    cols = np.flatnonzero(usable)
    found = names[cols].get_indexer(wanted.to_numpy()[todo])
    out = pos.copy()
    out[todo[found >= 0]] = cols[found[found >= 0]]
    return out


def model_file_path(path: str | os.PathLike) -> Path:
    """Where :meth:`CellTypeModel.save` writes for ``path``: ``~`` expanded, ``.npz`` appended unless the suffix.

    The suffix is compared without case: ``model.NPZ`` is written as given, not as ``model.NPZ.npz``.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    return path


@dataclass(eq=False)
class CellTypeModel:
    """A CellTypist-compatible cell-type classifier.

    Parameters
    ----------
    features
        Gene names, in the order of the columns of ``coef``.
    classes
        Cell-type labels, in the order of the rows of ``coef``.
    coef
        One-vs-rest logistic regression weights, ``(n_classes, n_features)``. Binary models store both rows
        (``[-w, w]``) so that scores always have one column per class, as CellTypist reports them.
    intercept
        ``(n_classes,)``.
    scaler_mean, scaler_scale
        The standard scaler fitted on the training data (mean is zero for ``with_mean=False`` scalers).
    clip
        Upper clip of scaled values (CellTypist: 10).
    normalize_over
        How query counts are normalized before scoring: ``"genes"`` (library size over the model's genes: models
        trained by spatialcx on a panel) or ``"all"`` (over every gene of the table: CellTypist's convention, used for
        imported CellTypist models).
    target_sum
        Counts per cell after normalization (10,000).
    description
        Free metadata (training parameters, reference provenance, dates): a dict of JSON values (``None``: empty).
    calibration
        Confidence calibration fitted on reference cells by :func:`~spatialcx.tl.train` (see
        :func:`~spatialcx.tl.transform_confidence`); ``None`` for imported CellTypist models (other than those
        exported by :meth:`to_celltypist`, which keep theirs). JSON-serialisable.
    """

    features: np.ndarray
    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    clip: float = 10.0
    normalize_over: NormalizeOver = "genes"
    target_sum: float = TARGET_SUM
    description: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.features = as_str_array(self.features)
        self.classes = as_str_array(self.classes)
        self.coef = np.asarray(self.coef, dtype=np.float64)
        self.intercept = np.asarray(self.intercept, dtype=np.float64).ravel()
        self.scaler_mean = np.asarray(self.scaler_mean, dtype=np.float64).ravel()
        self.scaler_scale = np.asarray(self.scaler_scale, dtype=np.float64).ravel()
        # floats, as save/load keep them (an int clip hashed as "10" and loaded as 10.0 failed its hash check)
        self.clip = float(self.clip)
        self.target_sum = float(self.target_sum)
        if self.description is None:
            self.description = {}
        elif isinstance(self.description, Mapping):
            self.description = dict(self.description)
        else:
            raise TypeError(
                f"description must be a dict of JSON values (free metadata), got {type(self.description).__name__}."
            )
        n_k, n_g = len(self.classes), len(self.features)
        if n_k < 2:
            raise ValueError(f"A cell-type model needs at least 2 classes, got {n_k}.")
        if self.coef.shape != (n_k, n_g):
            raise ValueError(f"coef has shape {self.coef.shape}; expected (n_classes, n_features) = {(n_k, n_g)}.")
        for name in ("intercept", "scaler_mean", "scaler_scale"):
            arr = getattr(self, name)
            expected = n_k if name == "intercept" else n_g
            if arr.shape != (expected,):
                raise ValueError(f"{name} has shape {arr.shape}; expected ({expected},).")
        if not np.all(np.isfinite(self.coef)) or not np.all(np.isfinite(self.intercept)):
            raise ValueError("The model's weights contain NaN or infinite values.")
        for name in ("scaler_mean", "scaler_scale"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"The model's {name} contains NaN or infinite values: every score would be NaN.")
        if (self.scaler_scale <= 0).any():
            raise ValueError("scaler_scale must be positive for every feature.")
        if np.isnan(self.clip):
            raise ValueError("clip must be a number (CellTypist: 10), got NaN.")
        if not (np.isfinite(self.target_sum) and self.target_sum > 0):
            raise ValueError(
                f"target_sum must be a positive number of counts per cell (10,000), got {self.target_sum}."
            )
        for names, what, why in (
            (
                self.features,
                "features contain {n} duplicated gene names (e.g. {examples})",
                "each gene must name one column of coef, or a query column would be scored twice. Make the names "
                "unique (e.g. train on an AnnData after `adata.var_names_make_unique()`).",
            ),
            (
                self.classes,
                "classes contain {n} duplicated names (e.g. {examples}, compared as text)",
                "each cell type must name one row of coef, or a predicted label could not say which row won. Give "
                "every class its own name (labels that differ only in type, such as 1 and '1', read alike).",
            ),
        ):
            repeated = pd.Index(names)
            repeated = repeated[repeated.duplicated()].unique()
            if len(repeated):
                found = what.format(n=len(repeated), examples=list(repeated[:5]))
                raise ValueError(f"The model's {found}: {why}")
        if self.normalize_over not in ("genes", "all"):
            raise ValueError(f"normalize_over must be 'genes' or 'all', got {self.normalize_over!r}.")
        if self.calibration is not None:
            from spatialcx.model._calibration import check_calibration

            self.calibration = check_calibration(self.calibration, n_k)

    # ------------------------------------------------------------------ properties
    @property
    def n_features(self) -> int:
        """Number of genes the model uses."""
        return len(self.features)

    @property
    def n_classes(self) -> int:
        """Number of cell types."""
        return len(self.classes)

    @property
    def model_hash(self) -> str:
        """SHA-256 over the weights, scaler, features and classes (identifies the model in ``uns``)."""
        h = hashlib.sha256()
        for arr in (self.coef, self.intercept, self.scaler_mean, self.scaler_scale):
            h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        # "surrogatepass" encodes a name holding a lone surrogate (undecodable bytes read with "surrogateescape") and is
        # byte-identical to the strict UTF-8 of every other name, so existing hashes are unchanged
        h.update("\x1f".join(self.features).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
        h.update("\x1f".join(self.classes).encode("utf-8", "surrogatepass"))
        h.update(f"{self.clip}|{self.normalize_over}|{self.target_sum}".encode())
        if self.calibration is not None:  # absent for models without one, so their hash is unchanged
            h.update(b"\x1dcalibration")
            h.update(json.dumps(self.calibration, sort_keys=True, default=_json_default).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        cls = ", ".join(self.classes[:4]) + (", ..." if self.n_classes > 4 else "")
        return (
            f"CellTypeModel with {self.n_classes} cell types and {self.n_features} genes "
            f"(normalized over {'the model genes' if self.normalize_over == 'genes' else 'all genes'})\n"
            f"    cell types: {cls}"
        )

    # ------------------------------------------------------------------ scoring
    def scoring_weights(self, present: np.ndarray) -> ScoringWeights:
        """Fold the scaler into the weights for the model genes that a query has.

        Genes of the model that the query lacks are dropped, as CellTypist does: their scaled value is 0, i.e.
        they sit at the training mean.

        Parameters
        ----------
        present
            Integer positions into ``features`` of the model genes the query has (the first array returned by
            :meth:`match_genes`), in the order of the query columns that will be scored.

        Returns
        -------
        The weights, intercept and scaler terms restricted to those genes. Its ``score(x)`` method takes a
        log1p-normalized cells x ``len(present)`` block (sparse or dense, columns in the order of ``present``) and
        returns the ``(n_cells, n_classes)`` float64 decision scores without densifying ``x``.
        """
        present = np.asarray(present, dtype=np.intp)
        mean = self.scaler_mean[present]
        scale = self.scaler_scale[present]
        coef = self.coef[:, present]
        shift = mean / scale
        z0 = np.minimum(-shift, self.clip)  # the scaled (and clipped) value of a zero
        return ScoringWeights(
            weights=np.ascontiguousarray(coef.T),
            intercept=self.intercept + coef @ z0,
            inv_scale=1.0 / scale,
            shift=shift,
            z0=z0,
            clip=float(self.clip),
        )

    def decision_function(self, x: np.ndarray | sparse.spmatrix, genes: Sequence[str] | None = None) -> np.ndarray:
        """Decision scores for normalized (log1p) expression ``x``.

        Parameters
        ----------
        x
            Cells x genes, already log1p-normalized.
        genes
            Column names of ``x``; defaults to the model's features in order.

        Returns
        -------
        ``(n_cells, n_classes)`` float64 scores, equal to CellTypist's decision matrix.

        Raises
        ------
        ValueError
            When ``x`` has another number of columns than ``genes`` names (or, without ``genes``, than the model has
            genes).
        TypeError
            When ``x`` is an AnnData (pass ``adata.X`` and ``genes=adata.var_names``).
        """
        if hasattr(x, "X") and hasattr(x, "var_names"):
            raise TypeError(
                "decision_function takes an expression matrix, not an AnnData: pass its log1p-normalized matrix and "
                "its gene names, `model.decision_function(adata.X, genes=adata.var_names)`, or use "
                "`scx.tl.predict(adata, model)`, which normalizes the counts itself."
            )
        x = sparse.csr_matrix(x)
        if genes is None:
            if x.shape[1] != self.n_features:
                raise ValueError(
                    f"x has {x.shape[1]} columns but the model has {self.n_features} genes. Without `genes`, the "
                    "columns of x must be the model's features in order; pass the column names to score any other "
                    "matrix: `model.decision_function(x, genes=adata.var_names)`."
                )
            return self.scoring_weights(np.arange(self.n_features)).score(x)
        genes = as_str_array(genes)
        if len(genes) != x.shape[1]:
            raise ValueError(
                f"genes has {len(genes)} names but x has {x.shape[1]} columns: pass one name per column of x, in "
                "order (e.g. `genes=adata.var_names` with `adata.X`)."
            )
        present, cols = self.match_genes(genes)
        return self.scoring_weights(present).score(x[:, cols])

    def match_genes(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Locate the model's genes among the column names of a query.

        Names are compared exactly (case-sensitive); model genes missing from ``genes`` are left out. Duplicated
        names in ``genes`` are an error only when they are model genes (which column would be meant?). Ensembl ids
        not found exactly are matched without their version (``ENSG00000141510`` finds ``ENSG00000141510.16``),
        where that names one column.

        Parameters
        ----------
        genes
            Column (gene) names of the query, e.g. ``adata.var_names``.

        Returns
        -------
        ``(present, cols)``, two integer arrays of equal length: ``present`` are positions into ``features`` of
        the model genes found in ``genes`` (in the model's order) and ``cols`` their positions in ``genes``. Pass
        ``present`` to :meth:`scoring_weights` and score ``x[:, cols]``.

        Raises
        ------
        ValueError
            When a model gene occurs more than once in ``genes``.
        """
        index = pd.Index(as_str_array(genes))
        if index.is_unique:
            pos = index.get_indexer(self.features)
        else:
            repeated = index.duplicated(keep=False)
            ambiguous = pd.Index(self.features).intersection(index[repeated].unique())
            if len(ambiguous):
                raise ValueError(
                    f"{len(ambiguous)} of the model's genes occur more than once in the table (e.g. "
                    f"{list(ambiguous[:5])}), so which column to score is ambiguous. Make the names unique first, "
                    "e.g. with `adata.var_names_make_unique()`, or drop the repeated columns."
                )
            single = np.flatnonzero(~repeated)  # the model's genes are all among the names that occur once
            pos = index[single].get_indexer(self.features)
            pos = np.where(pos >= 0, single[np.maximum(pos, 0)], -1)
        if (pos < 0).any():
            pos = _match_ensembl_versions(self.features, index, pos)
        present = np.flatnonzero(pos >= 0)
        return present, pos[present]

    # ------------------------------------------------------------------ IO
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to an ``.npz`` archive of plain arrays and JSON metadata (loading it executes no code).

        The archive holds the features, classes, weights, intercept and scaler as arrays, and the clip,
        normalization, target sum, description, calibration and :attr:`~spatialcx.CellTypeModel.model_hash` as
        JSON. The file is written atomically: an interrupted save leaves any previous file at ``path`` intact.
        Missing parent folders are created.

        Parameters
        ----------
        path
            Where to write. ``.npz`` is appended when the name has another suffix (``model.v2`` becomes
            ``model.v2.npz``) and used as the suffix when it has none (``model`` becomes ``model.npz``). An existing
            file is replaced.

        Returns
        -------
        The path written, with the ``.npz`` suffix; pass it to :meth:`load`.
        """
        path = model_file_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION if self.calibration is not None else 1,
            "clip": self.clip,
            "normalize_over": self.normalize_over,
            "target_sum": self.target_sum,
            "model_hash": self.model_hash,
            # keys as JSON can hold them (json.dumps refuses numpy or tuple keys, e.g. np.int64 labels' counts)
            "description": _jsonable(self.description),
        }
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        arrays = {
            "features": self.features.astype(str),
            "classes": self.classes.astype(str),
            "coef": self.coef,
            "intercept": self.intercept,
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
            "meta": np.array(json.dumps(meta, default=_json_default)),
        }

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: numpy would add ".npz" to a path
                np.savez_compressed(fh, **arrays)

        return write_atomically(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CellTypeModel:
        """Read a model written by :meth:`~spatialcx.CellTypeModel.save`.

        Nothing is unpickled (``allow_pickle=False``): the file holds plain arrays and JSON only. The weights are
        checked against the hash stored with them.

        Parameters
        ----------
        path
            The ``.npz`` file written by :meth:`~spatialcx.CellTypeModel.save`, or the name given to ``save``
            (``"model"`` finds ``model.npz`` when there is no file ``model``). CellTypist ``.pkl`` models are not read
            here; import them with :meth:`from_celltypist`.

        Returns
        -------
        The model, equal to the one saved (same :attr:`~spatialcx.CellTypeModel.model_hash`).

        Raises
        ------
        FileNotFoundError
            When ``path`` does not exist.
        ValueError
            When ``path`` is a pickle, is not a spatialcx model file (truncated, corrupted, another kind of file),
            was written by a newer spatialcx, or its weights do not match their stored hash.
        """
        path = Path(path).expanduser()
        pickle_hint = (
            f"{path} is a pickle (a CellTypist model?). Pickles can execute code when loaded; import it with "
            "`scx.CellTypeModel.from_celltypist(path, trust_pickle=True)` only if you trust its source."
        )
        if path.suffix.lower() == ".pkl":
            raise ValueError(pickle_hint)
        if not path.exists() and path.suffix.lower() != ".npz" and path.with_name(path.name + ".npz").is_file():
            path = path.with_name(path.name + ".npz")  # save("model") wrote model.npz
        if not path.exists():
            raise FileNotFoundError(f"Model file {str(path)!r} does not exist; pass the path returned by model.save().")
        if not path.is_file():
            raise ValueError(f"{path} is a folder, not a model file; pass the .npz file written by model.save().")
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic.startswith(b"\x80"):  # pickle protocol >= 2: never handed to numpy, which could be told to unpickle
            raise ValueError(pickle_hint)
        if not magic.startswith(b"PK"):
            detail = (
                "the file is empty"
                if not magic
                else "it holds a single NumPy array (.npy), not a model archive"
                if magic == b"\x93NUMPY"
                else f"it is not a zip (.npz) archive (it starts with {magic!r})"
            )
            raise _invalid_model_file(path, detail)
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
                missing = [k for k in (*_ARRAY_KEYS, "meta") if k not in names]
                if not missing:
                    arrays = {k: npz[k] for k in _ARRAY_KEYS}
                    meta = json.loads(str(npz["meta"]))
        # any layer of a damaged file may fail (zip, zlib, npy header, JSON, an impossible shape's MemoryError)
        except Exception as e:
            if isinstance(e, PermissionError):
                raise
            raise _invalid_model_file(path, f"{type(e).__name__}: {e}") from e
        if missing:
            raise _invalid_model_file(path, f"the archive lacks {missing} (it holds {names})")
        if not isinstance(meta, dict):
            raise _invalid_model_file(path, f"its metadata is a JSON {type(meta).__name__}, expected an object")
        if meta.get("format") != _FORMAT_NAME:
            raise ValueError(
                f"{path} is not a spatialcx model file (format={meta.get('format')!r}); pass a file written by "
                "model.save()."
            )
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:  # every file save() writes has one
            raise _invalid_model_file(path, f"its format_version is {version!r}, expected a whole number from 1")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer spatialcx (format {version}); upgrade spatialcx.")
        try:
            model = cls(
                **arrays,
                clip=float(meta["clip"]),
                normalize_over=meta["normalize_over"],
                target_sum=float(meta["target_sum"]),
                description=meta.get("description", {}),
                calibration=meta.get("calibration"),
            )
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing metadata {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise _invalid_model_file(path, detail) from e
        stored_hash = meta.get("model_hash")
        if not isinstance(stored_hash, str) or not stored_hash:  # every file save() writes has one
            raise _invalid_model_file(path, f"its model_hash is {stored_hash!r}, so its weights cannot be verified")
        if stored_hash != model.model_hash:
            raise ValueError(f"{path} is corrupted: its weights do not match the hash stored with them.")
        return model

    # ------------------------------------------------------------------ CellTypist interop
    @classmethod
    def from_celltypist(cls, model_or_path: CelltypistModel | str | os.PathLike, *, trust_pickle: bool = False):
        """Import a CellTypist model.

        Parameters
        ----------
        model_or_path
            A :class:`celltypist.models.Model`, or the path (``str`` or :class:`os.PathLike`, absolute or relative
            to the working directory) of a local CellTypist ``.pkl`` file. A path is always read from disk, never
            taken for the name of a published CellTypist model (nothing is downloaded).
        trust_pickle
            CellTypist files are pickles, which can execute arbitrary code when loaded. A path is read only when
            this is True; pass it only for files from a source you trust.

        Returns
        -------
        A model that scores exactly as the CellTypist one, normalizing queries over all genes (``"all"``), with
        CellTypist's clip (10) and no calibration. A model written by :meth:`to_celltypist` is restored as it was
        exported (its normalization, clip, target sum, calibration and description, hence the same
        :attr:`~spatialcx.CellTypeModel.model_hash` and predictions), from ``description["spatialcx"]``, when its
        weights, scaler, genes and classes still match the hash recorded there. When they do not (the model was
        edited, e.g. by ``Model.subset`` or ``Model.convert``), a warning is logged and it is imported as any
        CellTypist model.

        Raises
        ------
        ValueError
            When a path is given without ``trust_pickle=True``, or the file is not a readable CellTypist model.
        FileNotFoundError
            When the path is not an existing file.
        TypeError
            When ``model_or_path`` is neither a CellTypist model nor a path.
        """
        if isinstance(model_or_path, str | os.PathLike):
            path = Path(model_or_path).expanduser()
            if not trust_pickle:
                raise ValueError(
                    f"Refusing to unpickle {path}: CellTypist models are pickles, which can run arbitrary code when "
                    "loaded. If you trust the file's source, pass `trust_pickle=True`; or load it yourself with "
                    "`celltypist.models.Model.load` and pass the object."
                )
            if not path.is_file():
                raise FileNotFoundError(
                    f"No CellTypist model file at {str(path)!r} (resolved: {str(path.resolve())!r}). Pass the path "
                    "of a local .pkl file; CellTypist model names are not downloaded here: fetch them with "
                    "`celltypist.models.download_models(model=...)` and pass the file's path."
                )
            with open(path, "rb") as fh:
                magic = fh.read(2)
            if magic == b"PK":  # a zip: what CellTypeModel.save writes, never a pickle
                raise ValueError(
                    f"{path} is a zip (.npz) archive, not a CellTypist .pkl: a model written by CellTypeModel.save? "
                    "Read it with `scx.CellTypeModel.load(path)`."
                )
            from celltypist.models import Model

            # An absolute POSIX path always holds a "/": celltypist would otherwise take a bare file name for the
            # name of one of its published models and fetch its model index from the network.
            try:
                model_or_path = Model.load(path.resolve().as_posix())
            except Exception as e:  # celltypist wraps every unpickling failure in a bare Exception
                raise ValueError(
                    f"{path} is not a readable CellTypist model (truncated, corrupted, or not a CellTypist .pkl?): {e}"
                ) from e
        elif not (hasattr(model_or_path, "classifier") and hasattr(model_or_path, "scaler")):
            raise TypeError(
                "model_or_path must be a celltypist.models.Model or the path (str or os.PathLike) of a CellTypist "
                f".pkl file; got {type(model_or_path).__name__}."
            )
        clf, scaler = model_or_path.classifier, model_or_path.scaler
        features = as_str_array(clf.features)
        classes = as_str_array(clf.classes_)
        coef = np.asarray(clf.coef_, dtype=np.float64)
        intercept = np.asarray(clf.intercept_, dtype=np.float64).ravel()
        if len(classes) == 2 and coef.shape[0] == 1:
            coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
        with_mean = bool(getattr(scaler, "with_mean", True))
        mean = np.asarray(scaler.mean_, dtype=np.float64) if with_mean else np.zeros(len(features))
        scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler.scale_ is not None else np.ones(len(features))
        arrays = {
            "features": features,
            "classes": classes,
            "coef": coef,
            "intercept": intercept,
            "scaler_mean": mean,
            "scaler_scale": scale,
        }
        raw_description = dict(getattr(model_or_path, "description", {}) or {})
        exported = raw_description.pop(CELLTYPIST_DESCRIPTION_KEY, None)
        if exported is not None:
            restored = _restore_exported(cls, exported, arrays)
            if restored is not None:
                return restored
        description = {k: _jsonable(v) for k, v in raw_description.items()}
        description["imported_from"] = "celltypist"
        description["with_mean"] = with_mean
        return cls(**arrays, normalize_over="all", description=description)

    def to_celltypist(self) -> CelltypistModel:
        """Export as a :class:`celltypist.models.Model` that ``celltypist.annotate`` accepts.

        What a CellTypist model cannot hold (``normalize_over``, ``clip``, ``target_sum``, ``calibration``, the
        ``description`` and the :attr:`~spatialcx.CellTypeModel.model_hash`) is kept, as plain JSON values, in the
        CellTypist model's ``description["spatialcx"]``, which ``Model.write`` and ``Model.load`` preserve:
        :meth:`from_celltypist` restores the model from it, equal to this one (same hash, calibration and
        predictions).

        CellTypist itself scores the exported model as spatialcx does only when

        - ``clip`` is 10: CellTypist clips scaled values at 10 whatever the model, so a model trained with another
          ``clip`` gets other scores, and possibly other labels, from ``celltypist.annotate``;
        - the query it is given is normalized as this model expects: CellTypist normalizes nothing, it scores the
          log1p values of ``.X`` (and expects them normalized to 10,000 counts over all of the table's genes). For a
          model with ``normalize_over="genes"`` (trained by :func:`spatialcx.tl.train`), subset the query's raw counts
          to the model's genes (``adata[:, adata.var_names.isin(model.features)]``), normalize them to ``target_sum``
          (``sc.pp.normalize_total(q, target_sum=model.target_sum)``, then ``sc.pp.log1p(q)``) and annotate that.

        A warning is logged when either does not hold (or ``target_sum`` is not 10,000); the export is made anyway.

        Returns
        -------
        The CellTypist model: a :class:`~sklearn.linear_model.LogisticRegression` with the weights and the genes
        (``classifier.features``), a :class:`~sklearn.preprocessing.StandardScaler` and the ``description`` dict.
        """
        self._warn_celltypist_differences()
        from celltypist.models import Model
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        clf = LogisticRegression()
        clf.classes_ = self.classes.astype(object)
        clf.coef_ = self.coef.copy()
        clf.intercept_ = self.intercept.copy()
        clf.n_features_in_ = self.n_features
        clf.n_iter_ = np.zeros(1, dtype=np.int32)
        clf.features = self.features.astype(object)
        scaler = StandardScaler(with_mean=True)
        scaler.mean_ = self.scaler_mean.copy()
        scaler.scale_ = self.scaler_scale.copy()
        scaler.var_ = self.scaler_scale**2
        scaler.n_features_in_ = self.n_features
        scaler.n_samples_seen_ = int(self.description.get("n_cells", 0))
        d = self.description
        description = {
            "date": str(d.get("date", "")),
            "details": str(d.get("details", "spatialcx CellTypeModel")),
            "url": str(d.get("url", "")),
            "source": str(d.get("source", "spatialcx")),
            "version": str(d.get("version", "")),
            "number_celltypes": self.n_classes,
            CELLTYPIST_DESCRIPTION_KEY: {
                "format": _FORMAT_NAME,
                "normalize_over": self.normalize_over,
                "clip": _jsonable(self.clip),
                "target_sum": _jsonable(self.target_sum),
                "calibration": _plain_json(self.calibration),
                "description": _plain_json(self.description),
                "model_hash": self.model_hash,
            },
        }
        return Model(clf, scaler, description)

    def _warn_celltypist_differences(self) -> None:
        """Log what ``celltypist.annotate`` would do differently from spatialcx with the exported model."""
        if self.clip != CELLTYPIST_CLIP:
            logger.warning(
                "This model clips scaled values at %s, CellTypist at 10 (hard-coded): celltypist.annotate will score "
                "the exported model differently from spatialcx, and may give other labels. scx.tl.predict scores it "
                "as trained (also after CellTypeModel.from_celltypist).",
                self.clip,
            )
        if self.normalize_over == "genes":
            logger.warning(
                "This model normalizes queries over its own genes (normalize_over='genes'); CellTypist normalizes "
                "nothing and scores the log1p values it is given. For celltypist.annotate, subset the query's raw "
                "counts to the model's genes, normalize them to %s counts per cell and log1p them (CellTypist "
                "expects normalization over all of the table's genes, which gives other scores for this model).",
                f"{self.target_sum:g}",
            )
        elif self.target_sum != TARGET_SUM:
            logger.warning(
                "This model expects queries normalized to %s counts per cell; CellTypist expects 10,000: normalize "
                "the query to %s counts per cell for celltypist.annotate.",
                f"{self.target_sum:g}",
                f"{self.target_sum:g}",
            )


_ARRAY_KEYS = ("features", "classes", "coef", "intercept", "scaler_mean", "scaler_scale")


def _invalid_model_file(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid spatialcx model file (truncated or corrupted?): {detail}. Re-save the model with "
        "model.save(path), or train it again."
    )


def _restore_exported(cls: type[CellTypeModel], exported: Any, arrays: dict[str, np.ndarray]) -> CellTypeModel | None:
    """Rebuild the model that :meth:`CellTypeModel.to_celltypist` exported.

    From the CellTypist model's arrays (the array fields of :class:`CellTypeModel` by name) and its
    ``description["spatialcx"]`` (``exported``); ``None``, with a logged warning, when that record is malformed or they
    no longer match the hash recorded there.
    """
    fallback = (
        "It is imported as a plain CellTypist model (normalize_over='all', clip 10, no calibration), as CellTypist "
        "scores it."
    )
    if not isinstance(exported, dict) or "model_hash" not in exported:
        logger.warning(
            "The CellTypist model's description[%r] is not the record written by CellTypeModel.to_celltypist. %s",
            CELLTYPIST_DESCRIPTION_KEY,
            fallback,
        )
        return None
    try:
        model = cls(
            **arrays,
            clip=exported["clip"],
            normalize_over=exported["normalize_over"],
            target_sum=exported["target_sum"],
            description=dict(exported.get("description") or {}),
            calibration=exported.get("calibration"),
        )
        detail = None if model.model_hash == exported["model_hash"] else "its hash differs from the one recorded"
    except (KeyError, TypeError, ValueError) as e:  # e.g. a calibration for classes that Model.subset removed
        detail = f"the recorded settings do not fit it ({type(e).__name__}: {e})"
    if detail is not None:
        logger.warning(
            "The CellTypist model was exported by spatialcx (description[%r]), but its weights, scaler, genes or "
            "classes no longer match the model it was exported from (edited, e.g. by Model.subset or "
            "Model.convert?): %s. %s",
            CELLTYPIST_DESCRIPTION_KEY,
            detail,
            fallback,
        )
        return None
    logger.info("restored the spatialcx model exported to CellTypist (model_hash %s)", model.model_hash[:12])
    return model


def _plain_json(v: Any) -> Any:
    """``v`` as plain JSON values (dicts, lists, str, numbers, bools, None), as :meth:`CellTypeModel.save` writes it."""
    return None if v is None else json.loads(json.dumps(_jsonable(v), default=_json_default))


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return str(v)


def _json_default(o: Any) -> Any:
    out = _jsonable(o)
    if out is o:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
    return out


logger.debug("spatialcx.model loaded")
