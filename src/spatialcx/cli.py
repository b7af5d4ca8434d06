"""The ``spatialcx`` command: ``demo`` and ``annotate``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path


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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata, reference = scx.datasets.demo(n_cells=args.n_cells, random_state=args.seed)
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
        reference,
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


def _cmd_annotate(args: argparse.Namespace) -> int:
    import spatialdata as sd

    import spatialcx as scx

    refs, keys = [], []
    for spec in args.reference:
        path, key = _parse_reference(spec)
        key = key or args.label_key
        if key is None:
            print(f"No label key for reference {path!r}: use PATH::LABEL_KEY or --label-key.", file=sys.stderr)
            return 2
        refs.append(path)
        keys.append(key)
    sdata = sd.read_zarr(args.store)
    t0 = time.perf_counter()
    scx.tl.annotate(
        sdata,
        refs,
        label_keys=keys,
        table_key=args.table_key,
        tissue=args.tissue,
        confidence_threshold=args.threshold,
        confidence=args.confidence,
        max_cells_per_type=args.max_cells_per_type,
        balance=args.balance,
        model_out=args.model_out,
        plots_dir=args.plots_dir,
        plots=args.plots_dir is not None,
        random_state=args.seed,
    )
    table = sdata.tables[args.table_key]
    counts = table.obs["cell_type"].value_counts()
    print(f"annotated {table.n_obs:,} cells in {time.perf_counter() - t0:.1f} s; written into {args.store}")
    print(counts.to_string())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spatialcx`` command."""
    from spatialcx import __version__

    parser = argparse.ArgumentParser(prog="spatialcx", description="Cell types for spatial transcriptomics.")
    parser.add_argument("--version", action="version", version=f"spatialcx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="annotate the built-in synthetic demo and report accuracy and time")
    demo.add_argument("--out", default="spatialcx_demo", help="output folder (zarr store, model, plots)")
    demo.add_argument("--n-cells", type=int, default=4000, help="cells in the demo slide")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--threshold", type=float, default=0.8, help="confidence threshold")
    demo.add_argument("--min-accuracy", type=float, default=0.0, help="exit with 1 below this accuracy")
    demo.set_defaults(func=_cmd_demo)

    ann = sub.add_parser("annotate", help="annotate a SpatialData zarr store from labelled references")
    ann.add_argument("store", help="SpatialData zarr store (annotated in place, crash-safely)")
    ann.add_argument(
        "-r",
        "--reference",
        action="append",
        required=True,
        help="reference .h5ad/.zarr path or URI, as PATH[::LABEL_KEY]",
    )
    ann.add_argument("-l", "--label-key", default=None, help="label column for references given without ::KEY")
    ann.add_argument("--table-key", default="table")
    ann.add_argument("--tissue", default="unknown")
    ann.add_argument("--threshold", type=float, default=0.8, help="confidence threshold")
    ann.add_argument(
        "--confidence",
        default="calibrated",
        choices=["calibrated", "zscore", "margin", "softmax", "raw"],
        help="confidence method (see the docs)",
    )
    ann.add_argument("--max-cells-per-type", type=int, default=5000)
    ann.add_argument("--balance", choices=["proportional", "equal"], default="proportional")
    ann.add_argument("--model-out", default=None, help="save the trained model (.npz)")
    ann.add_argument("--plots-dir", default=None, help="write QC plots here")
    ann.add_argument("--seed", type=int, default=0)
    ann.set_defaults(func=_cmd_annotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spatialcx`` command."""
    import spatialcx as scx

    args = build_parser().parse_args(argv)
    # zarr's notice about a future default is not actionable for users of the command
    warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
    scx.settings.verbosity = min(1 + args.verbose, 3)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
