"""``AnnotationConfig``: the arguments of :func:`spatialcx.tl.annotate` as a YAML file, and running it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

_PATH_FIELDS = ("model_out", "plots_dir")


def _shown(value: Any) -> str:
    """A value and its type, for an error message: ``'high' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def _check_strings(name: str, values: Any, what: str) -> None:
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must be {what}, got {_shown(bad[0])} in {list(values)!r}.")


def _is_local_relative(value: str) -> bool:
    return "://" not in value and not Path(value).expanduser().is_absolute()


@dataclass
class AnnotationConfig:
    """Everything :func:`spatialcx.tl.annotate` needs besides the data, as a dataclass that reads and writes YAML.

    Example file:

    .. code-block:: yaml

        references:
          - cellxgene_lung.h5ad                 # relative to the YAML file
          - gs://my-bucket/refs/airway.zarr
        label_keys: [cell_type, ann_finest_level]
        # or named:  references: {hlca: cellxgene_lung.h5ad, airway: gs://...}
        #            label_keys: {hlca: cell_type, airway: ann_finest_level}
        tissue: lung
        balance: proportional
        max_cells_per_type: 5000
        target_proportions: proportions.csv     # or a mapping {cell type: proportion}
        confidence_threshold: 0.8
        model_out: lung_model.npz

    Attributes
    ----------
    references
        Paths or URIs of the references (``.h5ad``, AnnData ``.zarr``; ``file://``, ``https://``, ``gs://``,
        ``s3://``), or a mapping ``{source name: path}`` that names them (the names go into ``reference_source`` and
        the provenance; otherwise they come from the file names). Relative local paths in a YAML file (here and in
        ``target_proportions``, ``model_out`` and ``plots_dir``) are taken relative to that file; elsewhere (YAML
        text, a mapping, the constructor) relative to the working folder.
    label_keys
        Label column of each reference (a list in the order of ``references``, or a mapping with the same source
        names), or one for all.
    exclude_labels
        Reference labels that are not cell types, left out of training; ``None`` (default): the package's list
        (``NA``, ``Unknown``, ``Doublet``, ``Ambiguous``, ...), as in :func:`spatialcx.tl.annotate`.
    table_key, tissue, balance, max_cells_per_type, max_cells_per_ref, target_proportions, confidence_threshold,
    confidence, model_out, plots_dir, add_ontology, plots, key_added, train_kwargs, chunk_size, random_state
        As in :func:`spatialcx.tl.annotate`.
    """

    references: list[str] | dict[str, str]
    label_keys: str | list[str] | dict[str, str]
    table_key: str = "table"
    tissue: str = "unknown"
    balance: str = "proportional"
    max_cells_per_type: int | None = 5000
    max_cells_per_ref: int | None = 100_000
    target_proportions: dict[str, float] | str | None = None
    exclude_labels: list[str] | None = None
    confidence_threshold: float = 0.8
    confidence: str = "calibrated"
    model_out: str | None = None
    plots_dir: str | None = None
    add_ontology: bool = True
    plots: bool = True
    key_added: str = "cell_type"
    train_kwargs: dict[str, Any] | None = None
    chunk_size: int | None = None
    random_state: int = 0

    def __post_init__(self) -> None:
        from spatialcx._table import check_key
        from spatialcx.tl._annotate import _check_label_keys, _check_train_kwargs
        from spatialcx.tl._confidence import CONFIDENCE_METHODS
        from spatialcx.tl._predict import train

        if isinstance(self.references, str | os.PathLike):
            self.references = [self.references]
        named = isinstance(self.references, Mapping)
        paths = list(self.references.values()) if named else self.references
        if not isinstance(paths, list | tuple) or not all(isinstance(r, str | os.PathLike) for r in paths):
            raise TypeError(
                "references must be a path or URI, a list of them (in YAML: references: [atlas.h5ad]) or a mapping "
                f"{{source name: path}} (in YAML: references: {{atlas: atlas.h5ad}}), got {_shown(self.references)}."
            )
        if named:
            _check_strings("references", list(self.references), "a mapping with source names (strings) as keys")
            self.references = {str(k): os.fspath(v) for k, v in self.references.items()}
        else:
            self.references = [os.fspath(r) for r in self.references]
        paths = list(self.references.values()) if named else self.references
        if not paths:
            raise ValueError("AnnotationConfig needs at least one reference (a path or URI) in 'references'.")
        if "" in paths:
            raise ValueError(
                f"references holds an empty path in {self.references!r}; give each reference's path or URI."
            )
        if isinstance(self.label_keys, Mapping):
            if not named:
                raise ValueError(
                    f"label_keys is a mapping (keys {list(self.label_keys)}) but references is a list; name the "
                    "references the same way (references: {name: path}) or give label_keys as a list in their order."
                )
            _check_strings("label_keys", list(self.label_keys.values()), "label column names (strings)")
            missing = sorted(set(self.references) - set(self.label_keys))
            extra = sorted(set(self.label_keys) - set(self.references))
            if missing or extra:
                raise ValueError(
                    f"label_keys names the references {sorted(self.label_keys)} but references names "
                    f"{sorted(self.references)}; give a label column for each named reference"
                    + (f" (missing: {missing})" if missing else "")
                    + (f" (not a reference: {extra})" if extra else "")
                    + "."
                )
            self.label_keys = {str(k): self.label_keys[k] for k in self.references}
        elif isinstance(self.label_keys, list | tuple):
            _check_strings("label_keys", self.label_keys, "a label column name (a string) or a list of them")
            self.label_keys = list(self.label_keys)
            if len(self.label_keys) != len(paths):
                raise ValueError(
                    f"{len(self.references)} references but {len(self.label_keys)} label_keys: give one per reference "
                    "or a single string for all."
                )
        elif not isinstance(self.label_keys, str):
            raise TypeError(
                f"label_keys must be a string, a list of strings or a mapping {{source name: column}}, got "
                f"{_shown(self.label_keys)}."
            )
        _check_label_keys(self.label_keys)  # no empty names
        for name in ("table_key", "tissue", "balance", "confidence", "key_added"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {_shown(getattr(self, name))}.")
        check_key(self.key_added, "key_added")  # a name zarr and h5ad can store, checked when the file is read
        if self.balance not in ("proportional", "equal"):
            raise ValueError(f"balance must be 'proportional' or 'equal', got {self.balance!r}.")
        if self.confidence not in CONFIDENCE_METHODS:
            raise ValueError(f"confidence must be one of {list(CONFIDENCE_METHODS)}, got {self.confidence!r}.")
        threshold = self.confidence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= float(threshold) <= 1:
            raise ValueError(f"confidence_threshold must be a number in [0, 1], got {_shown(threshold)}.")
        self.confidence_threshold = float(threshold)
        for name in ("max_cells_per_type", "max_cells_per_ref", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
                what = "null: no cap" if name != "chunk_size" else "null: chosen by size"
                raise ValueError(f"{name} must be a positive integer (or {what}), got {_shown(value)}.")
            if value is not None:
                setattr(self, name, int(value))  # a numpy integer would not be written by to_yaml
        if self.train_kwargs is not None:
            if not isinstance(self.train_kwargs, Mapping):
                raise TypeError(
                    f"train_kwargs must be a mapping of scx.tl.train options (in YAML: train_kwargs: {{C: 0.5}}), got "
                    f"{_shown(self.train_kwargs)}."
                )
            _check_strings("train_kwargs", list(self.train_kwargs), "a mapping with option names (strings) as keys")
            self.train_kwargs = {k: v.item() if isinstance(v, np.generic) else v for k, v in self.train_kwargs.items()}
            _check_train_kwargs(self.train_kwargs, train)  # the option names and values, when the file is read
        for name in ("add_ontology", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {_shown(getattr(self, name))}.")
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
            raise TypeError(f"random_state must be an integer seed, got {_shown(self.random_state)}.")
        if self.random_state < 0:  # numpy seeds are non-negative
            raise ValueError(f"random_state must be a non-negative integer seed, got {_shown(self.random_state)}.")
        self.random_state = int(self.random_state)
        if isinstance(self.target_proportions, os.PathLike):
            self.target_proportions = os.fspath(self.target_proportions)
        if self.target_proportions is not None and not isinstance(self.target_proportions, str | Mapping):
            raise TypeError(
                "target_proportions must be a mapping {cell type: proportion} or the path of a .json / .csv file, "
                f"got {_shown(self.target_proportions)}."
            )
        if isinstance(self.target_proportions, Mapping):
            bad = {
                k: v
                for k, v in self.target_proportions.items()
                if isinstance(v, bool) or not isinstance(v, Real) or not np.isfinite(v) or v < 0
            }
            if bad:
                raise ValueError(
                    f"target_proportions must map cell types to non-negative numbers; got {bad} (e.g. {{T cell: 0.2}})."
                )
            self.target_proportions = {str(k): float(v) for k, v in self.target_proportions.items()}
        if isinstance(self.exclude_labels, str):
            self.exclude_labels = [self.exclude_labels]
        if self.exclude_labels is not None:
            if not isinstance(self.exclude_labels, list | tuple):
                raise TypeError(
                    f"exclude_labels must be a list of labels (or null for the default), got "
                    f"{_shown(self.exclude_labels)}."
                )
            bad = [x for x in self.exclude_labels if x is None or isinstance(x, bool) or not isinstance(x, str | Real)]
            if bad:
                raise TypeError(
                    f"exclude_labels must hold labels (strings), got {bad}; in YAML, quote labels such as 'null', "
                    "'No' or 'Off' that would otherwise be read as null or false."
                )
            self.exclude_labels = [str(x) for x in self.exclude_labels]
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise TypeError(f"{name} must be a path (or null), got {_shown(value)}.")
            if value is not None:
                setattr(self, name, os.fspath(value))

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (what :meth:`~spatialcx.tl.AnnotationConfig.to_yaml` writes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> AnnotationConfig:
        """Build a config from a mapping; unknown keys are an error.

        Parameters
        ----------
        values
            The fields of :class:`AnnotationConfig` by name; ``references`` and ``label_keys`` are required.
        base_dir
            Folder that relative local paths (references, ``target_proportions``, ``model_out``, ``plots_dir``) are
            joined to (URIs and absolute paths are kept); ``None``: they stay relative to the working folder.

        Returns
        -------
        The config.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"Unknown AnnotationConfig keys {unknown}; valid keys: {names}.")
        missing = [k for k in ("references", "label_keys") if k not in values]
        if missing:
            raise ValueError(f"AnnotationConfig needs {missing}.")
        values = dict(values)
        if base_dir is not None:
            base = Path(base_dir)
            refs = values["references"]

            def join(r: Any) -> Any:
                return os.path.normpath(base / r) if isinstance(r, str) and _is_local_relative(r) else r

            if isinstance(refs, Mapping):
                values["references"] = {k: join(r) for k, r in refs.items()}
            elif isinstance(refs, str | list | tuple):  # anything else is reported by the constructor
                values["references"] = [join(r) for r in ([refs] if isinstance(refs, str) else refs)]
            for name in (*_PATH_FIELDS, "target_proportions"):
                value = values.get(name)
                if isinstance(value, str) and _is_local_relative(value):
                    values[name] = os.path.normpath(base / value)
        return cls(**values)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> AnnotationConfig:
        """Read a config from a YAML file or from YAML text.

        Parameters
        ----------
        source
            A ``.yaml``/``.yml`` file (relative local paths in it are taken relative to its folder) or YAML text
            (relative to the working folder).

        Returns
        -------
        The config.
        """
        import yaml

        is_text = isinstance(source, str) and (
            "\n" in source or not (Path(source).expanduser().is_file() or source.strip().endswith((".yaml", ".yml")))
        )
        if is_text:
            text, base = str(source), None
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                raise IsADirectoryError(f"Config file {str(path)!r} is a folder; pass the YAML file in it.")
            if not path.is_file():
                raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
            text, base = path.read_text(), path.parent
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"The annotation config is not valid YAML: {e}") from e
        if is_text and isinstance(values, str) and "\n" not in str(source).strip():
            raise FileNotFoundError(
                f"Config file {str(source)!r} does not exist (and it is not YAML text with key: value lines)."
            )
        if not isinstance(values, Mapping):
            raise ValueError(
                f"The annotation config must be a YAML mapping (key: value lines), got {type(values).__name__}."
            )
        return cls.from_dict(values, base_dir=base)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """Return the config as YAML text, and write it to ``path`` (atomically) when given.

        Relative local paths (references, ``target_proportions``, ``model_out``, ``plots_dir``) are relative to the
        working folder in the config; in the file they are written relative to the file's folder, as
        :meth:`from_yaml` reads them, so the file finds the same paths from anywhere. URIs and absolute paths are
        written as they are.

        Parameters
        ----------
        path
            File to write (replaced atomically: never a partial file); ``None`` only returns the text (paths as in
            the config).

        Returns
        -------
        The YAML text.
        """
        import yaml

        values = self.to_dict()
        if path is not None:
            folder = os.path.abspath(Path(path).expanduser().parent)

            def rebase(value: Any) -> Any:
                if not isinstance(value, str) or not _is_local_relative(value):
                    return value
                try:
                    return Path(os.path.relpath(os.path.abspath(Path(value).expanduser()), folder)).as_posix()
                except ValueError:  # another drive: no relative path
                    return os.path.abspath(value)

            refs = values["references"]
            values["references"] = (
                {k: rebase(r) for k, r in refs.items()} if isinstance(refs, Mapping) else [rebase(r) for r in refs]
            )
            for name in (*_PATH_FIELDS, "target_proportions"):
                values[name] = rebase(values[name])
        text = yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)
        if path is not None:
            from spatialcx._utils import write_atomically

            write_atomically(path, lambda tmp: tmp.write_text(text))
        return text


def annotate_from_config(
    data: AnnData | SpatialData,
    config: AnnotationConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Run :func:`spatialcx.tl.annotate` with the arguments of a config.

    Parameters
    ----------
    data
        The spatial data or its table.
    config
        An :class:`AnnotationConfig`, a mapping of its fields, or a YAML file (or YAML text).
    copy
        Return an annotated copy instead of modifying ``data``.
    write
        Persist the outputs into the zarr store of a backed SpatialData, as in :func:`spatialcx.tl.annotate`.

    Returns
    -------
    What :func:`spatialcx.tl.annotate` returns: the annotated copy when ``copy=True``, else ``None``.
    """
    from . import _annotate

    if isinstance(config, AnnotationConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = AnnotationConfig.from_dict(config)
    else:
        cfg = AnnotationConfig.from_yaml(config)
    kwargs = cfg.to_dict()
    references = kwargs.pop("references")
    if kwargs["exclude_labels"] is None:
        del kwargs["exclude_labels"]  # annotate's default
    return _annotate.annotate(data, references, copy=copy, write=write, **kwargs)
