"""The ``spatialcx`` command: ``demo``, ``annotate`` and ``classify``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Domains listed by ``classify --domains`` (the largest); the others are summed up in one line.
MAX_DOMAINS_LISTED = 20
#: The table a command works on unless ``--table-key`` names another.
DEFAULT_TABLE_KEY = "table"
#: ``classify``'s ``--key-added`` unless given.
DEFAULT_THRESHOLD_KEY = "threshold"


class CommandError(Exception):
    """A problem with the command's input, reported as one line (no traceback) with exit status 2."""


def _is_h5ad(path: Path) -> bool:
    if path.suffix.lower() == ".h5ad":
        return True
    if path.is_file():
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def _not_h5ad_reason(path: Path) -> str | None:
    """Why an HDF5 file that anndata cannot read is no ``.h5ad`` (``None`` when it looks like one, or is unreadable)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            encoding = f.attrs.get("encoding-type")
    except Exception:  # noqa: BLE001 - a damaged file: anndata's own error says more
        return None
    if encoding == "anndata" or {"X", "obs"} & set(keys):
        return None
    if "matrix" in keys:
        return (
            "is a 10x Genomics HDF5 matrix (such as Xenium's cell_feature_matrix.h5), not an .h5ad file. Read the "
            "whole output folder into a SpatialData store (spatialdata_io.xenium(folder).write('slide.zarr')), or "
            "convert the matrix (scanpy.read_10x_h5(path).write_h5ad('cells.h5ad')) and pass that."
        )
    return (
        f"is an HDF5 file but not an AnnData .h5ad (top-level keys: {keys[:10]}). Pass an .h5ad or a SpatialData store."
    )


def _write_h5ad_atomic(adata: Any, path: Path) -> None:
    """Write ``adata`` to ``path`` through a temporary file renamed over it: never a partial file."""
    from spatialcx._utils import write_atomically

    write_atomically(path, adata.write_h5ad, suffix=".h5ad")


#: What the commands change in a table: the rest of an ``.h5ad`` file (X, layers, raw, var, ...) is copied as it is.
CHANGED_ELEMENTS = ("obs", "obsm", "uns")


def _update_h5ad_atomic(adata: Any, source: Path, path: Path) -> None:
    """Write the backed ``adata`` read from ``source`` to ``path``, crash-safely, without reading its matrices.

    The file is copied byte for byte to a temporary file beside ``path``, its :data:`CHANGED_ELEMENTS` are replaced by
    ``adata``'s, and the copy is renamed over ``path``: readers see the old file or the whole new one, and the
    matrices (X, layers, raw) are never read into memory (a million-cell file is annotated in the memory of its obs).
    """
    import h5py
    from anndata.io import write_elem

    from spatialcx._utils import write_atomically

    adata.strings_to_categoricals()  # as AnnData.write_h5ad does (obs only: var is not written)

    def write(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        adata.file.close()  # nothing reads the matrices any more; an open file could not be replaced on Windows
        with h5py.File(tmp, "r+") as f:
            for name in CHANGED_ELEMENTS:
                write_elem(f, name, adata.obs if name == "obs" else dict(getattr(adata, name)))

    write_atomically(path, write, suffix=".h5ad")


def _local_path(spec: str) -> Path | None:
    """The local file a path or ``file://`` URI names (``None`` for a remote URI), read as ``resolve_uri`` does."""
    if spec.startswith(("file://", "local://")):
        from spatialcx.io._uri import _local_path as uri_path

        return uri_path(spec)
    if "://" in spec:
        return None
    return Path(spec).expanduser()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_out(out: str, *, data: Path, inputs: Sequence[str] = (), overwrite: bool = False) -> None:
    """``--out`` must not replace an input (a reference, say), nor an existing file unless ``--overwrite``."""
    target = Path(out).expanduser()
    for spec in inputs:
        local = _local_path(spec)
        if local is not None and (_same_file(target, local) or target.resolve() == local.resolve()):
            raise CommandError(
                f"--out {out} is the reference {spec}; writing there would replace the reference. Choose another "
                "--out file."
            )
    if target.is_dir():
        raise CommandError(
            f"--out {out} is a folder; --out is the .h5ad file to write, e.g. --out {target / data.name}."
        )
    if target.is_file() and not _same_file(target, data) and not overwrite:
        raise CommandError(f"--out {out} exists; pass --overwrite to replace it, or choose another file.")


def _open_data(
    path_str: str,
    *,
    table_key: str,
    out: str | None,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
) -> tuple[Any, Callable[[], str]]:
    """Open a SpatialData zarr store or an ``.h5ad`` file; return it and a function that saves the result.

    A SpatialData store is annotated in place (the functions persist their keys crash-safely); an ``.h5ad`` file is
    read backed (X stays on disk) and written atomically, in place or to ``out``, with only its obs, obsm and uns
    replaced. ``out`` never replaces one of ``inputs`` (e.g. the references),
    nor an existing file unless ``overwrite``.
    """
    path = Path(path_str).expanduser()
    if not path.exists():
        raise CommandError(f"{path_str}: no such file or directory (expected a SpatialData .zarr store or an .h5ad).")
    if _is_h5ad(path):
        if table_key != DEFAULT_TABLE_KEY:
            raise CommandError(
                f"--table-key {table_key} applies to SpatialData stores only; {path_str} is an .h5ad file, which "
                "holds one table. Leave --table-key out."
            )
        if out is not None:
            _check_out(out, data=path, inputs=inputs, overwrite=overwrite)
        import anndata as ad

        try:  # X (and raw.X) stay on disk: the functions read them in chunks, and save() copies them unread
            import h5py

            with h5py.File(path, "r") as f:  # a file of anndata < 0.7 has no encoding: it is rewritten whole
                current = "encoding-type" in f.attrs
            adata = ad.read_h5ad(path, backed="r" if current else None)
        except Exception as e:
            reason = _not_h5ad_reason(path)
            if reason is not None:
                raise CommandError(f"{path_str} {reason}") from e
            raise CommandError(
                f"{path_str} could not be read as an .h5ad file ({type(e).__name__}: {e}); is it complete? Pass an "
                ".h5ad file or a SpatialData store."
            ) from e
        target = Path(out).expanduser() if out is not None else path  # as _check_out checked it
        from spatialcx._utils import check_writable_file

        try:  # before the work, not after it: a read-only file, a folder, an unwritable folder
            check_writable_file(target, "--out" if out is not None else "the input")
        except (PermissionError, ValueError) as e:
            hint = " Pass --out to write the result to another file." if out is None else ""
            raise CommandError(f"{e}{hint}") from e

        def save() -> str:
            if adata.isbacked:
                _update_h5ad_atomic(adata, path, target)
            else:
                _write_h5ad_atomic(adata, target)
            return str(target)

        return adata, save
    if out is not None:
        raise CommandError(
            "--out applies to .h5ad input only; a SpatialData store is annotated in place (copy the store first to "
            "keep the original)."
        )
    if _zarr_encoding(path) == "anndata":
        raise CommandError(
            f"{path_str} is an AnnData zarr store, not a SpatialData store; the command reads SpatialData stores and "
            f".h5ad files. Convert it: anndata.read_zarr({path_str!r}).write_h5ad('cells.h5ad'), and pass that."
        )
    import spatialdata as sd

    try:
        with warnings.catch_warnings():  # a store in an older format is read, and written back in it
            warnings.filterwarnings("ignore", message=".*not stored in the most current format", category=UserWarning)
            sdata = sd.read_zarr(path)
    except Exception as e:
        raise CommandError(
            f"{path_str} could not be read as a SpatialData zarr store ({type(e).__name__}: {e}). Pass a SpatialData "
            "store or an .h5ad file."
        ) from e
    if not sdata.tables:
        elements = sorted(name for _, name, _ in sdata.gen_spatial_elements())
        raise CommandError(
            f"{path_str} holds no table of cells (its elements: {elements}); "
            "the command annotates a table. Make the store with the platform's spatialdata-io reader, which adds the "
            "table, or pass an .h5ad."
        )
    if table_key not in sdata.tables:
        raise CommandError(
            f"{path_str} has no table {table_key!r}; its tables: {sorted(sdata.tables)}. Choose one with --table-key."
        )
    for folder in (path, path / "tables", path / "tables" / table_key):
        if folder.is_dir() and (not folder.stat().st_mode & 0o222 or not os.access(folder, os.W_OK)):
            raise CommandError(
                f"{path_str} is read-only ({folder} cannot be written); a SpatialData store is annotated in place. "
                f"Copy it (cp -r {path_str} copy.zarr) and pass the copy, or make it writable (chmod -R u+w)."
            )
    return sdata, lambda: path_str


def _zarr_encoding(path: Path) -> str | None:
    """The ``encoding-type`` of a zarr group's attributes (``"anndata"`` for an AnnData store), if it has one."""
    if not path.is_dir():
        return None
    try:
        import zarr

        return zarr.open_group(path, mode="r").attrs.get("encoding-type")
    except Exception:  # noqa: BLE001 - not a zarr group: spatialdata's reader reports it
        return None


def _table(data: Any, table_key: str) -> Any:
    return data.tables[table_key] if hasattr(data, "tables") else data


def _parse_reference(spec: str) -> tuple[str, str | None]:
    """``PATH[::LABEL_KEY]`` -> (path, label key)."""
    if "::" in spec:
        path, key = spec.rsplit("::", 1)
        return path, key
    return spec, None


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import spatialdata as sd

    import spatialcx as scx
    from spatialcx._utils import check_writable_dir
    from spatialcx.datasets._demo import MIN_CELLS

    if not 0 <= args.threshold <= 1:
        raise CommandError(f"--threshold must be a confidence in [0, 1], got {args.threshold:g}.")
    if not 0 <= args.min_accuracy <= 1:  # (NaN too) above 1, every run would fail after all the work
        raise CommandError(f"--min-accuracy must be an accuracy in [0, 1], got {args.min_accuracy:g}.")
    if args.n_cells < MIN_CELLS:
        raise CommandError(
            f"--n-cells must be at least {MIN_CELLS} (a smaller section is too sparse to show its tissue), got "
            f"{args.n_cells}."
        )
    out = Path(args.out).expanduser()
    try:
        check_writable_dir(out, "--out")
    except ValueError as e:
        raise CommandError(str(e)) from e
    t0 = time.perf_counter()
    sdata, reference = scx.datasets.demo(n_cells=args.n_cells, random_state=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "demo.zarr"
    if store.exists():
        shutil.rmtree(store)
    sdata.write(store)
    sdata = sd.read_zarr(store)
    table = sdata.tables["table"]
    print(
        f"demo: {table.n_obs:,} cells x {table.n_vars} panel genes; reference {reference.n_obs:,} cells x "
        f"{reference.n_vars:,} genes from {reference.obs['source'].nunique()} sources"
    )
    t1 = time.perf_counter()
    scx.tl.annotate(
        sdata,
        {"demo_reference": reference},  # named: messages and the provenance say "demo_reference", not "ref0"
        label_keys="cell_type",
        tissue="demo tissue",
        confidence_threshold=args.threshold,
        model_out=out / "model.npz",
        plots_dir=out / "plots",
        random_state=args.seed,
    )
    t2 = time.perf_counter()
    table = sd.read_zarr(store).tables["table"]  # what was persisted
    truth = table.obs["true_cell_type"].astype(str).to_numpy()
    predicted = table.obs["cell_type_predicted"].astype(str).to_numpy()
    final = table.obs["cell_type"].astype(str).to_numpy()
    assigned = final != scx._constants.UNASSIGNED
    acc = float(np.mean(predicted == truth))
    acc_assigned = float(np.mean(predicted[assigned] == truth[assigned])) if assigned.any() else float("nan")
    n_known = int((table.obs["cell_type_ontology_term_id"].astype(str) != "unknown").sum())
    print(f"accuracy (all cells, before filtering): {acc:.3f}")
    print(
        f"accuracy of assigned cells: {acc_assigned:.3f}; assigned {assigned.mean():.1%} at threshold {args.threshold}"
    )
    print(f"cells with a Cell Ontology id: {n_known:,} of {table.n_obs:,}")
    print(f"time: annotate {t2 - t1:.1f} s, total {time.perf_counter() - t0:.1f} s")
    print(f"written: {store} (table columns cell_type*), {out / 'model.npz'}, plots in {out / 'plots'}")
    if acc < args.min_accuracy:
        print(f"accuracy {acc:.3f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


#: ``annotate`` options that set a field of :class:`~spatialcx.tl.AnnotationConfig` (option dest -> field); given on
#: the command line, they override the value of a ``--config`` file.
_CONFIG_OPTIONS = {
    "table_key": "table_key",
    "tissue": "tissue",
    "threshold": "confidence_threshold",
    "confidence": "confidence",
    "max_cells_per_type": "max_cells_per_type",
    "max_cells_per_ref": "max_cells_per_ref",
    "target_proportions": "target_proportions",
    "balance": "balance",
    "key_added": "key_added",
    "model_out": "model_out",
    "plots_dir": "plots_dir",
    "chunk_size": "chunk_size",
    "seed": "random_state",
}


#: What ``--max-cells-per-type none`` parses to (``None`` means "not given", which keeps the config's value).
NO_CAP = "none"


def _positive(value: str, *, no_cap: bool = False) -> int | str:
    """A positive integer, or :data:`NO_CAP` when ``no_cap`` allows it (argparse type)."""
    if no_cap and value.strip().lower() == NO_CAP:
        return NO_CAP
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        expected = "a positive number of cells or 'none' (no cap)" if no_cap else "a positive integer"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


_cap = functools.partial(_positive, no_cap=True)


def _yaml_error(error: Exception) -> str:
    """The message of a config error on one line; a YAML syntax error names its line and column."""
    import yaml

    cause = error.__cause__
    if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
        mark = cause.problem_mark
        message = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {cause.problem}"
        if cause.context:
            where = cause.context_mark
            start = f" that starts at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            message += f" ({cause.context}{start})"
        return f"{message}."
    return " ".join(str(error).split())


def _annotation_config(args: argparse.Namespace) -> Any:
    """The :class:`~spatialcx.tl.AnnotationConfig` of an ``annotate`` command: ``--config``, then the options given."""
    from spatialcx._constants import DEFAULT_EXCLUDE_LABELS
    from spatialcx.tl import AnnotationConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        config_path = Path(args.config).expanduser()
        if not config_path.is_file():
            what = "is a folder" if config_path.is_dir() else "does not exist"
            raise CommandError(f"--config {args.config} {what}; pass the YAML file of the annotation settings.")
        try:
            values = AnnotationConfig.from_yaml(config_path).to_dict()
        except (TypeError, ValueError, OSError) as e:
            raise CommandError(f"--config {args.config}: {_yaml_error(e)}") from e
    elif not args.reference:
        raise CommandError("no reference: give one or more -r PATH[::LABEL_KEY], or a --config file that lists them.")
    if args.reference:  # -r replaces the config's references
        config_key = values.get("label_keys") if isinstance(values.get("label_keys"), str) else None
        refs, keys = [], []
        for spec in args.reference:
            path, key = _parse_reference(spec)
            key = key or args.label_key or config_key
            if key is None:
                raise CommandError(f"no label key for reference {path!r}: use PATH::LABEL_KEY or --label-key.")
            refs.append(path)
            keys.append(key)
        values["references"], values["label_keys"] = refs, keys
    elif args.label_key is not None:
        values["label_keys"] = args.label_key
    for dest, field in _CONFIG_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            values[field] = None if value is NO_CAP else value
    base = values.get("exclude_labels")
    base = list(DEFAULT_EXCLUDE_LABELS) if base is None else base
    keep = set(args.keep_label or [])
    unknown = sorted(keep - set(base))
    if unknown:
        raise CommandError(
            f"--keep-label {unknown[0]!r} is not in the exclusion list (only those labels are left out unless "
            f"--exclude-label names more): {base}."
        )
    if args.exclude_label or keep or "exclude_labels" in values:
        values["exclude_labels"] = [label for label in (*base, *(args.exclude_label or [])) if label not in keep]
    # plots are drawn only where they can go: a --plots-dir or the config's plots_dir
    values["plots"] = bool(values.get("plots", True)) and values.get("plots_dir") is not None
    try:
        return AnnotationConfig(**values)
    except (TypeError, ValueError) as e:
        message = str(e)
        for dest, field in _CONFIG_OPTIONS.items():  # a value given as an option is named as the option
            if getattr(args, dest) is not None and message.startswith(f"{field} "):
                message = f"--{dest.replace('_', '-')}{message[len(field) :]}"
                break
        where = f" (with --config {args.config})" if args.config is not None else ""
        raise CommandError(f"{message}{where}") from e


def _cmd_annotate(args: argparse.Namespace) -> int:
    import spatialcx as scx

    config = _annotation_config(args)
    paths = list(config.references.values()) if isinstance(config.references, dict) else list(config.references)
    for reference in paths:
        local = _local_path(str(reference))
        if local is not None and not local.exists():
            raise CommandError(
                f"reference {reference} does not exist (looked for {local.resolve()}). Check the path, or give a "
                "remote URI (gs://, s3://, https://)."
            )
    data, save = _open_data(
        args.store, table_key=config.table_key, out=args.out, inputs=paths, overwrite=args.overwrite
    )
    t0 = time.perf_counter()
    scx.tl.annotate_from_config(data, config)
    written = save()
    table = _table(data, config.table_key)
    counts = table.obs[config.key_added].value_counts()
    print(f"annotated {table.n_obs:,} cells in {time.perf_counter() - t0:.1f} s; written into {written}")
    print(counts.to_string())
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    import spatialcx as scx

    data, save = _open_data(args.data, table_key=args.table_key, out=args.out, overwrite=args.overwrite)
    key = args.key_added
    # With --domains, the classification is persisted together with the domains (by spatial_domains): a domain step
    # that fails leaves the store as it was, not classified without domains.
    scx.tl.classify_by_threshold(
        data,
        args.features,
        metagene=args.metagene,
        method=args.method,
        probability_cutoff=args.probability_cutoff,
        key_added=key,
        table_key=args.table_key,
        random_state=args.seed,
        plot=args.plots_dir is not None,
        plots_dir=args.plots_dir,
        write=not args.domains,
    )
    table = _table(data, args.table_key)
    high = table.obs[f"{key}_cluster"].to_numpy() == 1
    params = table.uns[key]
    print(
        f"{key}: {', '.join(args.features)} ({params['method']}, {params['metagene']}): threshold "
        f"{params['threshold']:.4g}; {int(high.sum()):,} of {table.n_obs:,} cells high ({high.mean():.1%})"
    )
    if args.domains:
        if args.domain_key is None:
            args.domain_key = "domain" if key == DEFAULT_THRESHOLD_KEY else f"{key}_domain"
        scx.tl.spatial_domains(
            data,
            f"{key}_cluster",
            value=1,
            table_key=args.table_key,
            spatial_key=args.spatial_key,
            library_key=args.library_key,
            platform=args.platform,
            max_distance=args.max_distance,
            min_cells=args.min_cells,
            key_added=args.domain_key,
            prefix=args.domain_key,
            add_shapes=hasattr(data, "tables"),
        )
        domains = table.obs[args.domain_key].value_counts()  # categories are the domains, each with cells
        info = table.uns[args.domain_key]
        print(
            f"{args.domain_key}: {len(domains)} domain(s) of at least {info['min_cells']} linked high cells "
            f"(linking distance {info['max_distance']:.4g}); {int(info['n_cells_dropped']):,} high cells in none"
        )
        if len(domains):
            shown = domains.head(MAX_DOMAINS_LISTED)
            print(shown.to_string())
            if len(domains) > len(shown):
                rest = domains.iloc[len(shown) :]
                print(f"... and {len(rest)} smaller domain(s) ({int(rest.sum()):,} cells) in obs[{args.domain_key!r}]")
        else:
            print("no domain: the high cells are scattered; raise --max-distance or lower --min-cells to link them")
    print(f"written into {save()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spatialcx`` command."""
    from spatialcx import __version__
    from spatialcx.tl._confidence import CONFIDENCE_METHODS
    from spatialcx.tl._config import AnnotationConfig
    from spatialcx.tl._domains import PLATFORM_MAX_DISTANCE
    from spatialcx.tl._threshold import METAGENES, METHODS

    parser = argparse.ArgumentParser(prog="spatialcx", description="Cell types for spatial transcriptomics.")
    parser.add_argument("--version", action="version", version=f"spatialcx {__version__}")
    verbose_help = "more logging (-v info, -vv debug and full tracebacks)"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    # -v also after the command (`spatialcx classify ... -vv`); counts before and after it add up
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    demo_help = "annotate the built-in synthetic demo and report accuracy and time"
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help=demo_help,
        description=f"{demo_help[0].upper()}{demo_help[1:]}: a synthetic colon slide (SpatialData) and a labelled "
        "reference are made by code, the slide is annotated end to end, and the store, the model and the QC plots "
        "are written into --out.",
    )
    demo.add_argument(
        "--out", default="spatialcx_demo", help="output folder: demo.zarr, model.npz, plots/ (default: %(default)s)"
    )
    demo.add_argument("--n-cells", type=int, default=4000, help="cells in the demo slide (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument(
        "--threshold", type=float, default=0.8, help="confidence threshold, in [0, 1] (default: %(default)s)"
    )
    demo.add_argument(
        "--min-accuracy", type=float, default=0.0, help="exit with 1 below this accuracy (default: %(default)s)"
    )
    demo.set_defaults(func=_cmd_demo)

    data_help = (
        "SpatialData zarr store (annotated in place, crash-safely) or .h5ad file (its obs, obsm and uns replaced "
        "atomically)"
    )
    out_help = (
        "for .h5ad input: write the result here instead of replacing the input (an existing file only with --overwrite)"
    )
    overwrite_help = "let --out replace an existing file"
    table_help = "table of a SpatialData store (default: %(default)s)"
    seed_help = "random seed (default: %(default)s)"
    ann_help = "annotate a SpatialData zarr store or an .h5ad from labelled references"
    ann = sub.add_parser(
        "annotate",
        parents=[common],
        help=ann_help,
        description=f"{ann_help[0].upper()}{ann_help[1:]}: train a panel-exact model on the references, predict, "
        "map the labels to the Cell Ontology and write the cell_type columns into the table. The settings can come "
        "from a YAML file (--config, the fields of scx.tl.AnnotationConfig); options given on the command line "
        "override it.",
    )
    # Options that a --config file can set have no argparse default (None: not given); the defaults shown are those
    # of AnnotationConfig, which applies them.
    defaults = {f.name: f.default for f in dataclasses.fields(AnnotationConfig)}
    ann.add_argument("store", metavar="data", help=data_help)
    ann.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="YAML",
        help="annotation settings (scx.tl.AnnotationConfig fields: references, label_keys, ...; relative paths are "
        "relative to the file)",
    )
    ann.add_argument(
        "-r",
        "--reference",
        action="append",
        help="reference .h5ad/.zarr path or URI, as PATH[::LABEL_KEY] (repeatable; replaces the config's references)",
    )
    ann.add_argument("-l", "--label-key", default=None, help="label column for references given without ::KEY")
    ann.add_argument(
        "--table-key", default=None, help=f"table of a SpatialData store (default: {defaults['table_key']})"
    )
    ann.add_argument(
        "--key-added", default=None, help=f"prefix of the obs/obsm/uns keys written (default: {defaults['key_added']})"
    )
    ann.add_argument("--tissue", default=None, help="tissue of the sample, recorded with the results")
    ann.add_argument(
        "--threshold",
        "--confidence-threshold",  # the config field's name
        dest="threshold",
        type=float,
        default=None,
        help=f"confidence below which a cell is Unassigned, in [0, 1] (default: {defaults['confidence_threshold']})",
    )
    ann.add_argument(
        "--confidence",
        default=None,
        choices=[m for m in CONFIDENCE_METHODS if m != "cell_zscore"],  # the per-cell z-score is a baseline only
        help=f"confidence method (see the docs; default: {defaults['confidence']})",
    )
    ann.add_argument(
        "--max-cells-per-type",
        type=_cap,
        default=None,
        metavar="N",
        help=f"most training cells per cell type, or 'none' (default: {defaults['max_cells_per_type']})",
    )
    ann.add_argument(
        "--max-cells-per-ref",
        type=_cap,
        default=None,
        metavar="N",
        help=f"most cells read from each reference, or 'none' (default: {defaults['max_cells_per_ref']})",
    )
    ann.add_argument(
        "--target-proportions",
        default=None,
        metavar="FILE",
        help="wanted share of each cell type in the training set: a .csv (header cell_type,proportion) or .json file",
    )
    ann.add_argument(
        "--balance",
        choices=["proportional", "equal"],
        default=None,
        help=f"how a type's quota is split between references (default: {defaults['balance']})",
    )
    ann.add_argument(
        "--exclude-label",
        action="append",
        metavar="LABEL",
        help="a reference label that is not a cell type, left out of training (repeatable; added to the defaults "
        "NA, Unknown, Doublet, Ambiguous, ..., or to the config's exclude_labels)",
    )
    ann.add_argument(
        "--keep-label",
        action="append",
        metavar="LABEL",
        help="a label of the exclusion list to train on all the same, e.g. --keep-label Unknown (repeatable)",
    )
    ann.add_argument("--model-out", default=None, help="save the trained model (.npz)")
    ann.add_argument("--plots-dir", default=None, help="write QC plots here")
    ann.add_argument(
        "--chunk-size", type=_positive, default=None, metavar="N", help="cells scored at a time (default: by size)"
    )
    ann.add_argument(
        "--seed",
        "--random-state",  # the config field's name
        dest="seed",
        type=int,
        default=None,
        help=f"random seed (default: {defaults['random_state']})",
    )
    ann.add_argument("--out", default=None, help=out_help)
    ann.add_argument("--overwrite", action="store_true", help=overwrite_help)
    ann.set_defaults(func=_cmd_annotate)

    cls_help = "classify cells as high or low for markers, optionally grouping the high cells into domains"
    cls = sub.add_parser(
        "classify",
        parents=[common],
        help=cls_help,
        description=f"{cls_help[0].upper()}{cls_help[1:]} (scx.tl.classify_by_threshold, scx.tl.spatial_domains).",
    )
    cls.add_argument("data", help=data_help)
    cls.add_argument("features", nargs="+", help="marker genes (var_names) and/or numeric obs columns")
    cls.add_argument(
        "--method", choices=METHODS, default="gmm", help="how the score is split (see the docs; default: %(default)s)"
    )
    cls.add_argument(
        "--metagene",
        choices=METAGENES,
        default="shifted_geometric_mean",
        help="how several markers become one score (default: %(default)s)",
    )
    cls.add_argument(
        "--probability-cutoff",
        type=float,
        default=0.3,
        help="P(high) above which a cell is high (gmm; default: %(default)s)",
    )
    cls.add_argument(
        "--key-added", default=DEFAULT_THRESHOLD_KEY, help="prefix of the obs/uns keys written (default: %(default)s)"
    )
    cls.add_argument("--table-key", default=DEFAULT_TABLE_KEY, help=table_help)
    cls.add_argument("--plots-dir", default=None, help="write the diagnostic figure here")
    cls.add_argument("--seed", type=int, default=0, help=seed_help)
    cls.add_argument("--domains", action="store_true", help="group the high cells into contiguous spatial domains")
    cls.add_argument(
        "--domain-key",
        default=None,
        help="obs column (and shapes prefix) of the domains (default: domain, or KEY_domain with --key-added KEY, so "
        "that runs for other markers keep their own domains)",
    )
    cls.add_argument(
        "--platform",
        choices=list(PLATFORM_MAX_DISTANCE),
        default=None,
        help="platform default for the linking distance of the domains",
    )
    cls.add_argument("--max-distance", type=float, default=None, help="linking distance of the domains")
    cls.add_argument(
        "--min-cells",
        type=int,
        default=10,
        help="smallest domain: a smaller one joins the nearest domain within twice the linking distance, or is "
        "dropped (default: %(default)s)",
    )
    cls.add_argument(
        "--library-key",
        default=None,
        metavar="COLUMN",
        help="obs column of the sections or samples (e.g. section): cells of different sections are never linked "
        "into one domain",
    )
    cls.add_argument(
        "--spatial-key",
        default="spatial",
        help="obsm key of the cell coordinates for the domains (default: %(default)s; a SpatialData table without "
        "it uses the centroids of its cells' shapes)",
    )
    cls.add_argument("--out", default=None, help=out_help)
    cls.add_argument("--overwrite", action="store_true", help=overwrite_help)
    cls.set_defaults(func=_cmd_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spatialcx`` command."""
    verbose, prog = 0, "spatialcx"
    try:
        import spatialcx as scx

        args = build_parser().parse_args(argv)
        prog = f"spatialcx {args.command}"
        # zarr's notice about a future default is not actionable for users of the command
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        verbose = args.verbose + getattr(args, "verbose_after", 0)
        scx.settings.verbosity = min(1 + verbose, 3)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return int(args.func(args) or 0)
        except (CommandError, ValueError, KeyError, OSError, ImportError) as e:
            if verbose >= 2:
                raise
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            notes = "".join(f" {note}" for note in getattr(e, "__notes__", []))
            print(f"{prog}: error: {message}{notes}", file=sys.stderr)
            print("(run with -vv for the full traceback)", file=sys.stderr)
            return 2 if isinstance(e, CommandError) else 1
    except KeyboardInterrupt:
        if verbose >= 2:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
