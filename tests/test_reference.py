from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialcx as scx
from spatialcx.io import _reference
from spatialcx.io._reference import open_reference

HUMAN = {
    "ENSG00000128683": "GAD1",
    "ENSG00000136750": "GAD2",
    "ENSG00000157005": "SST",
    "ENSG00000075624": "ACTB",
    "ENSG00000198851": "CD3E",
}


def make_reference(n: int = 400, n_genes: int = 40, seed: int = 0, sizes=(250, 100, 40, 10)) -> ad.AnnData:
    """Integer counts, imbalanced labels, symbols as var names."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"type{i}" for i in range(len(sizes))], sizes)[:n]
    rng.shuffle(labels)
    x = rng.poisson(0.6, (len(labels), n_genes)).astype(np.float32)
    x[:, : len(sizes)] += 5 * (labels[:, None] == np.array([f"type{i}" for i in range(len(sizes))]))
    a = ad.AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"Gene{i}" for i in range(n_genes)]),
    )
    return a


def log1p_10k(x: sp.csr_matrix) -> sp.csr_matrix:
    totals = np.asarray(x.sum(axis=1)).ravel()
    y = sp.csr_matrix(sp.diags(1e4 / totals) @ x).astype(np.float32)
    y.data = np.log1p(y.data)
    return y


def expected(adata_counts: ad.AnnData, rows, cols) -> np.ndarray:
    return np.asarray(adata_counts.X[rows][:, cols].todense())


# ------------------------------------------------------------------------------------------- on-disk layouts
@pytest.mark.parametrize("layout", ["csr", "csc", "dense", "layer", "raw", "zarr", "log1p"])
def test_open_reference_reads_exactly_the_rows_and_genes_asked_for(tmp_path, layout):
    ref = make_reference()
    truth = ref.copy()
    path = tmp_path / "ref.h5ad"
    kind, where = "counts", "X"
    if layout == "csc":
        ref.X = sp.csc_matrix(ref.X)
    elif layout == "dense":
        ref.X = ref.X.toarray()
    elif layout == "layer":
        ref.layers["counts"] = ref.X.copy()
        ref.X = log1p_10k(ref.X)
        where = "layers['counts']"
    elif layout == "raw":
        ref.raw = ref.copy()
        ref = ref[:, 5:].copy()  # X has fewer genes than raw
        ref.X = log1p_10k(truth.X)[:, 5:]
        where = "raw.X"
    elif layout == "zarr":
        path = tmp_path / "ref.zarr"
    elif layout == "log1p":
        ref.X = log1p_10k(ref.X)
        ref.uns["log1p"] = {"base": None}
        kind = "log1p"
    if layout == "zarr":
        ref.write_zarr(path)
    else:
        ref.write_h5ad(path)

    rng = np.random.default_rng(1)
    rows = rng.choice(truth.n_obs, 57, replace=False)  # any order
    cols = rng.choice(truth.n_vars, 9, replace=False)
    with open_reference(path, "cell_type") as h:
        assert h.kind == kind and h.where == where and h.name == "ref"
        assert h.n_obs == truth.n_obs and list(h.var_names) == list(truth.var_names)
        assert list(h.labels) == list(truth.obs["cell_type"].astype(str))
        got = h.read(rows, cols)
        assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32
        want = log1p_10k(truth.X)[rows][:, cols].toarray() if kind == "log1p" else expected(truth, rows, cols)
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-6)
        assert h.checksum.startswith(("sha256:", "sha256-tree:"))


def test_blocks_and_gaps_give_the_same_values_and_read_only_what_is_needed(tmp_path, monkeypatch):
    ref = make_reference(n=400)
    ref.write_h5ad(tmp_path / "r.h5ad")
    rows = np.sort(np.random.default_rng(2).choice(400, 60, replace=False))
    cols = np.arange(0, 40, 3)
    with open_reference(tmp_path / "r.h5ad", "cell_type") as h:
        full = h.read(rows, cols).toarray()

    read_elems = []

    class Counting:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, key):
            read_elems.append(key.stop - key.start)
            return self.arr[key]

    real_init = _reference._DiskCompressed.__init__

    def counting_init(self, group, fmt, shape):
        real_init(self, group, fmt, shape)
        self.data, self.indices = Counting(self.data), Counting(self.indices)

    monkeypatch.setattr(_reference._DiskCompressed, "__init__", counting_init)
    monkeypatch.setattr(_reference, "GAP_ELEMS", 0)
    monkeypatch.setattr(_reference, "BLOCK_ELEMS", 50)
    with open_reference(tmp_path / "r.h5ad", "cell_type") as h:
        read_elems.clear()
        np.testing.assert_array_equal(h.read(rows, cols).toarray(), full)
    wanted_nnz = int(np.diff(sp.csr_matrix(ref.X).indptr)[rows].sum())
    assert sum(read_elems) == 2 * wanted_nnz  # data + indices of the chosen rows, nothing else
    assert sum(read_elems) < 2 * ref.X.nnz / 4


@pytest.mark.parametrize("mode", ["memory", "backed", "lazy"])
def test_open_reference_accepts_anndata_objects(tmp_path, mode):
    truth = make_reference()
    truth.write_h5ad(tmp_path / "r.h5ad")
    if mode == "memory":
        adata = truth.copy()
    elif mode == "backed":
        adata = ad.read_h5ad(tmp_path / "r.h5ad", backed="r")
    else:
        adata = ad.experimental.read_lazy(tmp_path / "r.h5ad")
    rows, cols = np.array([5, 1, 300, 42]), np.array([3, 0, 7])
    with open_reference(adata, "cell_type", name="mine") as h:
        assert h.name == "mine" and h.kind == "counts"
        np.testing.assert_array_equal(h.read(rows, cols).toarray(), expected(truth, rows, cols))
        if mode == "backed":
            assert h.uri.endswith("r.h5ad") and h.checksum.startswith("sha256:")
        if mode == "memory":
            assert h.checksum.startswith("sha256-names:")


def test_dask_expression_is_read_only_in_the_genes_asked_for():
    """A lazy reference's dask matrix: only the chunks of the panel's genes are computed, not whole rows."""
    import dask.array as da

    computed = []

    def chunk(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        computed.append(c0)
        rng = np.random.default_rng(r0 * 7 + c0)
        return sp.csr_matrix(rng.poisson(0.3, (r1 - r0, c1 - c0)).astype(np.float32))

    meta = sp.csr_matrix((0, 0), dtype=np.float32)
    x = da.map_blocks(chunk, chunks=((500,) * 4, (1000,) * 5), dtype=np.float32, meta=meta)
    rows, cols = np.arange(0, 2000, 3), np.array([10, 2, 3, 1500])
    block = _reference._InMemory(x).read(rows, cols)
    # before: every row block was computed over all 5,000 genes (20 chunks), then the genes were picked
    assert sorted(set(computed)) == [0, 1000] and len(computed) == 8
    np.testing.assert_array_equal(block.toarray(), x[rows][:, cols].compute().toarray())


def test_open_reference_errors(tmp_path):
    make_reference().write_h5ad(tmp_path / "r.h5ad")
    with pytest.raises(KeyError, match=r"'celltype'.*available: \['cell_type'\]"):
        open_reference(tmp_path / "r.h5ad", "celltype")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(ValueError, match="as an .h5ad"):
        open_reference(tmp_path / "bad.h5ad", "cell_type")
    unusable = make_reference()
    unusable.X = unusable.X * 0.37  # neither counts nor log1p(10k)
    with pytest.raises(ValueError, match="No usable expression matrix"):
        open_reference(unusable, "cell_type")


# ------------------------------------------------------------------------------------------------ read_reference
def test_read_reference_is_lazy_and_caps_large_types_first(tmp_path):
    make_reference(sizes=(250, 100, 40, 10)).write_h5ad(tmp_path / "r.h5ad")
    lazy = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=160)
    assert not isinstance(lazy.X, np.ndarray | sp.spmatrix)  # dask: nothing loaded yet
    mem = lazy.to_memory()
    counts = mem.obs["cell_type"].value_counts()
    assert mem.n_obs == 160
    assert counts["type3"] == 10 and counts["type2"] == 40  # rare types whole
    assert counts["type0"] == counts["type1"] == 55
    info = mem.uns["spatialcx_reference"]
    assert info["n_cells_file"] == 400 and info["label_key"] == "cell_type" and info["checksum"].startswith("sha256:")
    again = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=160).to_memory()
    assert list(again.obs_names) == list(mem.obs_names)  # seeded


@pytest.mark.parametrize("name", ["r.h5", "r.H5AD", "reference"])
def test_read_reference_opens_an_hdf5_file_whatever_its_name(tmp_path, name):
    ref = make_reference(sizes=(30, 20))
    ref.write_h5ad(tmp_path / "r.h5ad")
    (tmp_path / "r.h5ad").rename(tmp_path / name)
    lazy = scx.io.read_reference(tmp_path / name, label_key="cell_type", max_cells=40)
    mem = lazy.to_memory()
    assert mem.n_obs == 40 and set(mem.obs["cell_type"]) == {"type0", "type1"}
    np.testing.assert_array_equal(sp.csr_matrix(mem.X).toarray(), sp.csr_matrix(ref[mem.obs_names].X).toarray())


def test_read_reference_max_cells_skips_non_type_labels(tmp_path):
    """Cells labelled Unknown (not a type) do not take up the max_cells budget; exclude_labels=() draws them."""
    ref = make_reference(sizes=(250, 100, 40, 10))
    labels = ref.obs["cell_type"].astype(str).to_numpy().copy()
    labels[labels == "type2"] = "Unknown"
    ref.obs["cell_type"] = labels
    ref.write_h5ad(tmp_path / "r.h5ad")
    mem = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=160).to_memory()
    counts = mem.obs["cell_type"].value_counts()
    assert mem.n_obs == 160 and "Unknown" not in counts and counts["type3"] == 10
    assert "Unknown" in mem.uns["spatialcx_reference"]["exclude_labels"]
    kept = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=160, exclude_labels=())
    assert kept.to_memory().obs["cell_type"].value_counts()["Unknown"] == 40
    assert scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type").n_obs == 400  # no max_cells: all


def test_read_reference_max_cells_strips_labels_as_combine_does(tmp_path):
    """' Unknown' is not a type either, and an empty label is no label: neither takes up the budget."""
    ref = make_reference(sizes=(250, 100, 40, 10))
    labels = ref.obs["cell_type"].astype(str).to_numpy().copy()
    labels[labels == "type2"] = " Unknown"
    labels[np.flatnonzero(labels == "type1")[:30]] = "  "
    labels[np.flatnonzero(labels == "type3")[:4]] = "type3 "
    ref.obs["cell_type"] = labels
    ref.write_h5ad(tmp_path / "r.h5ad")
    mem = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=160).to_memory()
    counts = mem.obs["cell_type"].str.strip().value_counts()
    # before: 40 ' Unknown' and 30 blank cells were drawn like a type
    assert mem.n_obs == 160 and set(counts.index) == {"type0", "type1", "type3"}
    assert counts["type3"] == 10 and counts["type1"] == 70 and counts["type0"] == 80


def test_read_reference_ensembl_ids_to_panel_symbols(tmp_path):
    ref = make_reference(n_genes=5)
    ref.var_names = list(HUMAN)
    ref.write_h5ad(tmp_path / "ens.h5ad")
    lazy = scx.io.read_reference(f"file://{tmp_path}/ens.h5ad", label_key="cell_type", genes=["Sst", "Gad1", "Pvalb"])
    assert list(lazy.var_names) == ["Sst", "Gad1"]  # mouse-style panel matched to human symbols
    mem = lazy.to_memory()
    np.testing.assert_array_equal(mem.X.toarray(), ref.X[:, [2, 0]].toarray())
    assert mem.uns["spatialcx_reference"]["gene_names"] == "gene_table:homo_sapiens"
    with pytest.raises(ValueError, match="None of the 2 genes"):
        scx.io.read_reference(tmp_path / "ens.h5ad", label_key="cell_type", genes=["Foo", "Bar"])


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_read_reference_genes_only_in_raw(tmp_path, fmt, caplog):
    """X subset to some genes (log1p), raw holds the counts of all: genes only in raw are kept for training."""
    counts = make_reference(n_genes=40)
    ref = counts.copy()
    ref.raw = counts
    ref.X = log1p_10k(counts.X)
    ref = ref[:, :20].copy()
    path = tmp_path / f"r.{fmt}"
    ref.write_h5ad(path) if fmt == "h5ad" else ref.write_zarr(path)
    panel = ["Gene1", "Gene30", "Gene3", "Gene35"]
    with caplog.at_level("WARNING", logger="spatialcx"):
        lazy = scx.io.read_reference(path, label_key="cell_type", genes=panel, max_cells=200)
    assert list(lazy.var_names) == ["Gene1", "Gene3"]
    assert "2 of the genes asked for are in raw but not in X" in caplog.text
    assert lazy.uns["spatialcx_reference"]["n_genes_only_in_raw"] == 2
    mem = lazy.to_memory()
    assert mem.raw.shape == (200, 40)
    model = scx.tl.train(lazy, "cell_type", genes=panel)  # the raw counts of all four
    assert list(model.features) == panel
    only_raw = scx.io.read_reference(path, label_key="cell_type", genes=["Gene30", "Gene35"])
    assert only_raw.n_vars == 0 and only_raw.raw.n_vars == 40
    # every gene asked for only in raw: X holds none, and train reads them from raw (it refused an X of 0 genes)
    model = scx.tl.train(only_raw, "cell_type", genes=["Gene30", "Gene35"], min_genes=1)
    assert list(model.features) == ["Gene30", "Gene35"]
    eager = scx.tl.train(counts, "cell_type", genes=["Gene30", "Gene35"], min_genes=1)
    np.testing.assert_allclose(model.coef, eager.coef, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="None of the 2 genes"):
        scx.io.read_reference(path, label_key="cell_type", genes=["Foo", "Bar"])


def test_read_reference_zarr_and_feature_name(tmp_path):
    ref = make_reference(n_genes=5)
    ref.var_names = [f"ENSG0000000000{i}" for i in range(5)]
    ref.var["feature_name"] = ["A1", "B2", "C3", "D4", "E5"]
    ref.write_zarr(tmp_path / "r.zarr")
    lazy = scx.io.read_reference(tmp_path / "r.zarr", label_key="cell_type")
    assert list(lazy.var_names) == ["A1", "B2", "C3", "D4", "E5"]
    assert lazy.uns["spatialcx_reference"]["gene_names"] == "feature_name"


def test_read_reference_real_hypothalamus(shared_data):
    path = shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad")
    lazy = scx.io.read_reference(path, label_key="cell_type_author", genes=["GAD1", "Slc17a6"], max_cells=280)
    mem = lazy.to_memory()
    assert list(mem.var_names) == ["GAD1", "Slc17a6"]
    counts = mem.obs["cell_type_author"].value_counts()
    assert mem.n_obs == 280 and counts.max() - counts.min() <= 1  # 13 types (not Ambiguous), 21-22 each
    assert "Ambiguous" not in counts
    full = ad.read_h5ad(path)
    sub = full[mem.obs_names, ["Gad1", "Slc17a6"]]
    np.testing.assert_array_equal(mem.X.toarray(), sub.X.toarray())


@pytest.mark.parametrize("max_cells", [0, -5])
def test_read_reference_rejects_non_positive_max_cells(tmp_path, max_cells):
    make_reference().write_h5ad(tmp_path / "r.h5ad")
    with pytest.raises(ValueError, match=rf"max_cells must be >= 1 or None.*got {max_cells}"):
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=max_cells)
    with pytest.raises(TypeError, match="max_cells must be a number of cells or None, got str"):
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells="100")


def test_read_reference_rejects_a_single_gene_string(tmp_path):
    ref = make_reference()
    ref.write_h5ad(tmp_path / "r.h5ad")
    with pytest.raises(TypeError, match=r"genes must be a list of gene names, not a single string.*\['Gene1'\]"):
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes="Gene1")
    with pytest.raises(ValueError, match="genes is empty"):  # was "None of the 0 genes ... (e.g. [])"
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes=[])


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_read_reference_panel_subset_of_log1p_only_reference_stays_usable(tmp_path, fmt):
    """X holds only log1p(10k) over all genes: the panel subset's row sums are no longer 10k, yet it is that data."""
    counts = make_reference(n_genes=40)
    ref = counts.copy()
    ref.X = log1p_10k(counts.X)
    path = tmp_path / f"r.{fmt}"
    ref.write_h5ad(path) if fmt == "h5ad" else ref.write_zarr(path)
    panel = ["Gene0", "Gene1", "Gene2", "Gene3", "Gene7"]
    assert open_reference(path, "cell_type").kind == "log1p"  # the file itself is accepted
    lazy = scx.io.read_reference(path, label_key="cell_type", genes=panel)
    info = lazy.uns["spatialcx_reference"]
    assert info["x_state"] == "log1p_10k" and info["x_log1p_target_sum"] == pytest.approx(1e4, rel=1e-3)
    status = scx.pp.normalization_status(lazy)
    assert status.x_state != "log1p_10k" and status.is_usable  # 5 of 40 genes: verified in the file, not here
    handle = open_reference(lazy, "cell_type")
    assert (handle.kind, handle.where) == ("log1p", "X")
    from_lazy = scx.pp.combine_references([lazy], label_keys=["cell_type"], genes=panel, min_cells_per_type=1)
    from_path = scx.pp.combine_references([path], label_keys=["cell_type"], genes=panel, min_cells_per_type=1)
    np.testing.assert_allclose(from_lazy.X.toarray(), from_path.X.toarray(), rtol=1e-6)
    # a log1p CPM reference stays unusable, and so does data that cannot be a panel of log1p(10k)
    ref.X = log1p_10k(counts.X) * 2
    ref.write_h5ad(tmp_path / "bad.h5ad")
    bad = scx.io.read_reference(tmp_path / "bad.h5ad", label_key="cell_type", genes=panel)
    assert not scx.pp.normalization_status(bad).is_usable
    with pytest.raises(ValueError, match="No usable expression matrix"):
        open_reference(bad, "cell_type")
    lazy.X = lazy.X * 3  # X changed after reading: the record no longer applies
    assert not scx.pp.normalization_status(lazy).is_usable


def test_a_spatialdata_store_as_reference_says_to_pass_its_table(tmp_path):
    from spatialdata import SpatialData

    ref = make_reference(n=60, sizes=(30, 30))
    SpatialData(tables={"table": ref}).write(tmp_path / "slide.zarr")
    with pytest.raises(ValueError, match=r"is a SpatialData store.*sdata.tables\[\.\.\.\].*tables/table"):
        scx.io.read_reference(tmp_path / "slide.zarr", label_key="cell_type")
    with pytest.raises(ValueError, match="is a SpatialData store"):
        scx.pp.combine_references([tmp_path / "slide.zarr"], "cell_type")
    # the table's own folder is an AnnData store: it reads
    lazy = scx.io.read_reference(tmp_path / "slide.zarr" / "tables" / "table", label_key="cell_type")
    assert lazy.n_obs == 60


def _integer_reference_file(tmp_path, fmt: str, layout) -> tuple[ad.AnnData, Path]:
    """A 400-cell x 40-gene reference with integer counts in X and layers["counts"] (``layout``: CSR or CSC), written."""
    ref = make_reference(n=400, n_genes=40)
    ref.X = layout(ref.X.astype(np.int32))
    ref.layers["counts"] = ref.X.copy()
    path = tmp_path / f"r.{fmt}"
    ref.write_h5ad(path) if fmt == "h5ad" else ref.write_zarr(path)
    return ref, path


def _count_chunk_reads(monkeypatch, axis: int) -> list[int]:
    """The rows (``axis=0``) or genes (``axis=1``) of every chunk the lazy reader reads, in order, as it reads them."""
    seen: list[int] = []
    real = _reference._read_sparse_chunk

    def counting(source, block_info=None):
        out = real(source, block_info)
        seen.append(out.shape[axis])
        return out

    monkeypatch.setattr(_reference, "_read_sparse_chunk", counting)
    return seen


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_read_reference_subset_is_read_straight_from_disk(tmp_path, fmt, monkeypatch):
    """With genes and max_cells, X and the counts layer read only the chosen rows and genes, in bounded chunks."""
    ref, path = _integer_reference_file(tmp_path, fmt, sp.csr_matrix)
    monkeypatch.setattr(_reference, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(_reference, "MAX_CHUNK_ROWS", 16)
    read_rows = _count_chunk_reads(monkeypatch, axis=0)
    genes = ["Gene7", "Gene2", "Gene30"]
    lazy = scx.io.read_reference(path, label_key="cell_type", genes=genes, max_cells=100, random_state=3)
    assert lazy.X.chunks[0] == (16,) * 6 + (4,)
    rows = ref.obs_names.get_indexer(lazy.obs_names)
    cols = [7, 2, 30]
    part = lazy[10:20].X.compute()  # two chunks, not the whole file
    assert sum(read_rows) == 32
    np.testing.assert_array_equal(part.toarray(), ref.X[rows[10:20]][:, cols].toarray())
    mem = lazy.to_memory()
    assert mem.X.dtype == np.int32 and mem.layers["counts"].dtype == np.int32  # the file's values, as stored
    np.testing.assert_array_equal(mem.X.toarray(), ref.X[rows][:, cols].toarray())
    np.testing.assert_array_equal(mem.layers["counts"].toarray(), ref.X[rows][:, cols].toarray())
    assert list(mem.var_names) == genes
    assert list(mem.obs["cell_type"]) == list(ref.obs["cell_type"].iloc[rows])
    # combine_references reads the file directly, composing the subset with its own choice of rows and genes
    with open_reference(lazy, "cell_type") as h:
        np.testing.assert_array_equal(
            h.read(np.array([50, 3]), np.array([2, 0])).toarray(), ref.X[rows[[50, 3]]][:, [30, 7]].toarray()
        )


def test_read_reference_names_genes_missing_from_the_reference(tmp_path, caplog):
    make_reference().write_h5ad(tmp_path / "r.h5ad")
    with caplog.at_level("WARNING", logger="spatialcx"):
        lazy = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes=["Gene1", "Nope1", "Nope2"])
    assert list(lazy.var_names) == ["Gene1"]
    assert "2 of the 3 genes asked for are not in the reference and are left out: 'Nope1', 'Nope2'" in caplog.text


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_lazy_subset_of_read_lazy_matches_anndata(tmp_path, fmt):
    """anndata's lazy CSR arrays are recognised: the subset reads the file directly and gives anndata's values."""
    ref = make_reference(n=300, n_genes=30)
    ref.obs_names = [f"c{i % 50}" for i in range(ref.n_obs)]  # names repeat
    ref.obsm["spatial"] = np.arange(600, dtype=float).reshape(300, 2)
    path = tmp_path / f"r.{fmt}"
    ref.write_h5ad(path) if fmt == "h5ad" else ref.write_zarr(path)
    lazy = ad.experimental.read_lazy(path)
    rows, cols = np.array([0, 7, 8, 150, 299]), np.array([29, 0, 4])
    fast = _reference.lazy_subset(lazy, rows, cols)
    assert fast.X.name.startswith("spatialcx-csr-")
    got, want = fast.to_memory(), lazy[rows, cols].to_memory()
    np.testing.assert_array_equal(got.X.toarray(), want.X.toarray())
    assert got.X.dtype == want.X.dtype
    assert list(got.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])
    # rows out of order are left to anndata
    assert not _reference.lazy_subset(lazy, rows[::-1]).X.name.startswith("spatialcx-csr-")


def _no_dask_compute(*args, **kwargs):
    raise AssertionError("computed through dask (whole columns of the file) instead of read from the file")


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_read_reference_of_a_csc_file_reads_only_the_chosen_genes(tmp_path, fmt, monkeypatch):
    """A CSC reference subset by genes and max_cells reads the chosen genes' columns, not blocks of 1,000 columns."""
    import dask

    ref, path = _integer_reference_file(tmp_path, fmt, sp.csc_matrix)
    truth = sp.csr_matrix(ref.X)
    read_cols = _count_chunk_reads(monkeypatch, axis=1)
    genes = ["Gene7", "Gene2", "Gene30"]
    lazy = scx.io.read_reference(path, label_key="cell_type", genes=genes, max_cells=100, random_state=3)
    assert lazy.X.name.startswith("spatialcx-csc-") and lazy.layers["counts"].name.startswith("spatialcx-csc-")
    rows = ref.obs_names.get_indexer(lazy.obs_names)
    want = truth[rows][:, [7, 2, 30]].toarray()
    mem = lazy.to_memory()
    assert mem.X.dtype == np.int32 and sum(read_cols) == 6  # X and the layer: 3 genes each
    np.testing.assert_array_equal(mem.X.toarray(), want)
    np.testing.assert_array_equal(mem.layers["counts"].toarray(), want)
    assert list(mem.var_names) == genes
    # blocks of rows (training, scoring) and combine_references' reads come from the file, not through dask
    from spatialcx._matrix import iter_row_blocks

    with dask.config.set(scheduler=_no_dask_compute):
        blocks = [b for _, _, b in iter_row_blocks(lazy.X, 16)]
        np.testing.assert_array_equal(sp.vstack(blocks).toarray(), want)
        sub = lazy[20:80:2, [2, 0]]
        np.testing.assert_array_equal(
            sp.vstack([b for _, _, b in iter_row_blocks(sub.X, 7)]).toarray(), want[20:80:2][:, [2, 0]]
        )
    with open_reference(lazy, "cell_type") as h, dask.config.set(scheduler=_no_dask_compute):
        got = h.read(np.array([50, 3]), np.array([2, 0]))
    np.testing.assert_array_equal(got.toarray(), want[[50, 3]][:, [2, 0]])
    with open_reference(ad.experimental.read_lazy(path)[::3, [5, 1]], "cell_type") as h:
        with dask.config.set(scheduler=_no_dask_compute):
            got = h.read(np.array([9, 0, 4]), np.array([1, 0]))
    np.testing.assert_array_equal(got.toarray(), truth[::3][[9, 0, 4]][:, [1, 5]].toarray())


def test_read_reference_rejects_nan_max_cells(tmp_path):
    make_reference().write_h5ad(tmp_path / "r.h5ad")
    with pytest.raises(ValueError, match="max_cells is NaN"):  # was "cannot convert float NaN to integer"
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=float("nan"))


def test_read_reference_keeps_a_gene_asked_for_twice_once(tmp_path, caplog):
    make_reference().write_h5ad(tmp_path / "r.h5ad")
    with caplog.at_level("WARNING", logger="spatialcx"):
        lazy = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes=["Gene3", "Gene1", "Gene3"])
    assert list(lazy.var_names) == ["Gene3", "Gene1"]
    assert "1 genes are asked for more than once (e.g. 'Gene3'); each is kept once" in caplog.text
    assert "not in the reference" not in caplog.text  # it was said to be missing
    assert lazy.uns["spatialcx_reference"]["n_genes_requested"] == 2


def test_read_reference_max_cells_without_any_cell_type_says_why(tmp_path):
    ref = make_reference(n=60, sizes=(40, 20))
    ref.obs["cell_type"] = pd.Categorical(np.where(np.arange(60) < 40, "Unknown", None))
    ref.write_h5ad(tmp_path / "r.h5ad")
    with pytest.raises(ValueError, match=r"of its 60 cells, 20 have no label in obs\['cell_type'\] and the other 40 "):
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=10)  # was: 0 cells, silently
    lazy = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", max_cells=10, exclude_labels=())
    assert lazy.n_obs == 10


def test_read_reference_says_when_a_gene_asked_for_is_held_twice(tmp_path, caplog):
    ref = make_reference(n_genes=6)
    ref.var_names = ["Gene0", "Gene1", "Gene1", "Gene3", "Gene4", "Gene5"]
    ref.write_h5ad(tmp_path / "r.h5ad")
    with caplog.at_level("WARNING", logger="spatialcx"):
        lazy = scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes=["Gene3", "Gene1"])
    np.testing.assert_array_equal(lazy.to_memory().X.toarray(), ref.X[:, [3, 1]].toarray())  # the first entry
    # before: the first of the two columns was taken without a word
    assert "1 of the genes asked for are var names held more than once (e.g. ['Gene1'])" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spatialcx"):
        scx.io.read_reference(tmp_path / "r.h5ad", label_key="cell_type", genes=["Gene3", "Gene0"])
    assert "more than once" not in caplog.text  # repeated names not asked for do not matter


def test_read_reference_of_an_anndata_object_says_what_to_pass(tmp_path):
    ref = make_reference()
    with pytest.raises(TypeError, match="got an AnnData object.*pass it to scx.tl.train"):  # was: "expected str, ..."
        scx.io.read_reference(ref, label_key="cell_type")
    ref.write_h5ad(tmp_path / "r.h5ad")
    backed = ad.read_h5ad(tmp_path / "r.h5ad", backed="r")
    with pytest.raises(TypeError, match=r"backed by .*r\.h5ad'.*pass that path"):
        scx.io.read_reference(backed, label_key="cell_type")
    backed.file.close()


def test_a_file_or_folder_that_is_not_anndata_says_so(tmp_path):
    import h5py

    with h5py.File(tmp_path / "cell_feature_matrix.h5", "w") as f:  # a 10x HDF5 file: a 'matrix' group, no 'obs'
        f.create_group("matrix")
    with pytest.raises(ValueError, match=r"not an AnnData \.h5ad file.*holds \['matrix'\].*read_10x_h5"):
        scx.io.read_reference(tmp_path / "cell_feature_matrix.h5", label_key="cell_type")  # was: KeyError 'obs'
    with pytest.raises(ValueError, match="not an AnnData .h5ad file"):
        open_reference(tmp_path / "cell_feature_matrix.h5", "cell_type")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match=r"not an AnnData \.zarr store"):  # was: zarr's GroupNotFoundError
        scx.io.read_reference(tmp_path / "empty.zarr", label_key="cell_type")
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").create_group("images")
    with pytest.raises(ValueError, match=r"not an AnnData \.zarr store.*holds \['images'\]"):
        scx.io.read_reference(tmp_path / "other.zarr", label_key="cell_type")
