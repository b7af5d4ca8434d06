"""Cell Ontology mapping: precision and coverage on the labelled table, speed of mapping and of loading the index.

Prints
  * precision (share of assigned labels whose CL id is the expected one or an accepted alternative) and coverage
    (share of labels with an expected CL id that get one) on ``tests/data/ontology_labels.tsv``, overall and per split;
  * the time to build the index from cellxgene-ontology-guide's packaged ontology (cold, empty cache), to load it
    from the cache in a fresh process, and to build the matcher;
  * the time to map 5,000 distinct labels (author labels and Cell Ontology names in many spellings), once the index
    is loaded, and end to end in a fresh process;
  * the time of ``add_ontology_ids`` on 1,000,000 cells with 50 distinct labels (labels are mapped once each).

Run: ``python benchmarks/ontology_mapping.py`` (uses a temporary cache directory; ``--cache-dir`` to choose one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "ontology_labels.tsv"


def evaluate(table: pd.DataFrame, mapping: dict[str, str]) -> dict[str, float]:
    """Precision, coverage and exact-term rate of ``mapping`` (label -> id) on the truth table."""
    got = table["label"].map(mapping)
    accepted = [
        {row.cl_id} | {a for a in str(row.also_accepted).split(";") if a.startswith("CL:")}
        for row in table.itertuples()
    ]
    assigned = got != "unknown"
    correct = np.array([g in acc for g, acc in zip(got, accepted, strict=True)]) & assigned.to_numpy()
    mappable = (table["cl_id"] != "unknown").to_numpy()
    return {
        "labels": len(table),
        "mappable": int(mappable.sum()),
        "assigned": int(assigned.sum()),
        "wrong": int(assigned.sum() - correct.sum()),
        "precision": float(correct.sum() / max(assigned.sum(), 1)),
        "coverage": float((assigned.to_numpy() & mappable).sum() / max(mappable.sum(), 1)),
        "exact_term": float((got == table["cl_id"]).to_numpy()[mappable].mean()),
    }


def distinct_labels(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct realistic labels: the truth table, and CL names and synonyms respelled."""
    from spatialcx.ontology import load_index

    rng = np.random.default_rng(seed)
    index = load_index()
    names = []
    for tid in index.term_ids:
        t = index.term(tid)
        names.append(t["label"])
        names.extend(t["synonyms"][:2])
    base = list(pd.read_csv(TABLE, sep="\t", dtype=str, keep_default_na=False)["label"])
    prefixes = ["", "", "", "CD4+ ", "CD8+ ", "Cycling ", "Activated ", "Resting ", "Mature ", "KRT5+ "]
    suffixes = ["", "", "", "s", "_1", " 2", " (cluster 4)", "-like", " 3", "_high"]
    out = dict.fromkeys(base)
    while len(out) < n:
        name = names[int(rng.integers(len(names)))]
        style = int(rng.integers(4))
        if style == 1:
            name = name.title()
        elif style == 2:
            name = name.replace(" ", "_")
        elif style == 3:
            name = name.upper()
        label = prefixes[int(rng.integers(len(prefixes)))] + name + suffixes[int(rng.integers(len(suffixes)))]
        out[label] = None
    return list(out)[:n]


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from spatialcx.ontology import load_index, matcher_for
t1 = time.perf_counter()
index = load_index()
t2 = time.perf_counter()
matcher_for(index)
t3 = time.perf_counter()
out = {"import_s": t1 - t0, "load_index_s": t2 - t1, "build_matcher_s": t3 - t2}
if len(sys.argv) > 1:
    from spatialcx.tl import map_labels
    labels = json.load(open(sys.argv[1]))
    t4 = time.perf_counter()
    map_labels(labels)
    out["map_s"] = time.perf_counter() - t4
    out["end_to_end_s"] = time.perf_counter() - t1
print(json.dumps(out))
"""


def child(cache: Path, *args: str) -> dict[str, float]:
    env = dict(os.environ, SPATIALCX_CACHE_DIR=str(cache))
    res = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache directory (default: a temporary one)")
    parser.add_argument("--n-labels", type=int, default=5000)
    parser.add_argument("--n-cells", type=int, default=1_000_000, help="cells for the add_ontology_ids timing")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    cache = args.cache_dir or Path(tmp.name)
    os.environ["SPATIALCX_CACHE_DIR"] = str(cache)
    print(f"CPU cores: {os.cpu_count()}; python {sys.version.split()[0]}; cache {cache}")

    for f in (cache / "ontology").glob("*.json") if (cache / "ontology").exists() else []:
        f.unlink()
    cold = child(cache)
    warm = child(cache)
    print(f"index, cold (build from the packaged ontology + write cache): {cold['load_index_s']:.2f} s")
    print(f"index, cached (fresh process, read cache):                     {warm['load_index_s']:.2f} s")
    print(f"matcher build (once per process):                             {warm['build_matcher_s']:.2f} s")

    from spatialcx.tl import map_labels

    table = pd.read_csv(TABLE, sep="\t", dtype=str, keep_default_na=False)
    mapping = map_labels(table["label"]).to_dict()
    for name, part in [("all", table), *table.groupby("split")]:
        r = evaluate(part, mapping)
        print(
            f"truth table [{name}]: {r['labels']} labels ({r['mappable']} with a CL id): precision "
            f"{r['precision']:.3f} ({r['wrong']} wrong of {r['assigned']} assigned), coverage {r['coverage']:.3f}, "
            f"exact expected term {r['exact_term']:.3f}"
        )

    labels = distinct_labels(args.n_labels)
    start = time.perf_counter()
    result = map_labels(labels)
    elapsed = time.perf_counter() - start
    print(
        f"map {len(labels)} distinct labels (index loaded): {elapsed:.2f} s "
        f"({1e3 * elapsed / len(labels):.2f} ms/label; {len(result.unmapped)} unknown)"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(labels, fh)
    fresh = child(cache, fh.name)
    os.unlink(fh.name)
    print(
        f"map {len(labels)} distinct labels in a fresh process: {fresh['map_s']:.2f} s "
        f"(+ cached index load {fresh['load_index_s']:.2f} s; end to end {fresh['end_to_end_s']:.2f} s)"
    )
    cells(labels[:50], n_cells=args.n_cells)
    tmp.cleanup()


def cells(labels: list[str], *, n_cells: int) -> None:
    """Time ``add_ontology_ids`` on ``n_cells`` cells holding ``len(labels)`` distinct labels (mapped once each)."""
    from anndata import AnnData

    from spatialcx.tl import add_ontology_ids

    rng = np.random.default_rng(0)
    codes = rng.integers(0, len(labels), n_cells)
    obs = pd.DataFrame({"author": pd.Categorical.from_codes(codes, categories=labels)})
    obs.index = obs.index.astype(str)
    adata = AnnData(obs=obs)
    for name, kwargs in (
        ("first call", {}),
        ("again, overwriting", {}),
        ("skip_if_exists=True", {"skip_if_exists": True}),
    ):
        start = time.perf_counter()
        add_ontology_ids(adata, "author", **kwargs)
        print(
            f"add_ontology_ids, {n_cells:,} cells x {len(labels)} labels, {name}: {time.perf_counter() - start:.2f} s"
        )


if __name__ == "__main__":
    main()
