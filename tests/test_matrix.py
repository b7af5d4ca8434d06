"""Chunked row access (``spatialcx._matrix``), in particular to CSC matrices backed on disk."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
from scipy import sparse

from spatialcx import _matrix
from spatialcx._matrix import iter_row_blocks, read_rows


def _counts(n_obs: int = 300, n_vars: int = 40, seed: int = 0, dtype=np.float32) -> sparse.csr_matrix:
    """Integer counts with empty rows and columns, a column dense in the first rows only and one in the last."""
    rng = np.random.default_rng(seed)
    x = sparse.random(n_obs, n_vars, density=0.2, format="lil", random_state=seed, dtype=np.float64)
    x[:, [3, 17]] = 0  # empty columns
    x[[0, 5, 6, 7, n_obs - 1], :] = 0  # empty rows, the first and the last among them
    x[1:120, 10] = 4.0  # a column far denser in the first rows than its share (more than one guess)
    x[n_obs - 30 : n_obs - 1, 11] = 2.0  # ... and one only in the last rows
    x = sparse.csr_matrix(x)
    x.data = rng.integers(1, 30, x.nnz).astype(dtype)
    return x


def _backed(tmp_path, x: sparse.spmatrix, name: str = "x.h5ad"):
    ad.AnnData(X=x).write_h5ad(tmp_path / name)
    return ad.read_h5ad(tmp_path / name, backed="r")


def _assert_same(block, expected: sparse.csr_matrix) -> None:
    assert isinstance(block, sparse.csr_matrix)
    assert block.shape == expected.shape
    assert block.dtype == expected.dtype
    assert (block != expected).nnz == 0
    np.testing.assert_array_equal(block.toarray(), expected.toarray())


@pytest.mark.parametrize("chunk", [1, 7, 50, 60, 299, 300, 1000])
@pytest.mark.parametrize("small_windows", [False, True])
def test_backed_csc_row_blocks_equal_in_memory_rows(tmp_path, monkeypatch, chunk, small_windows):
    x = _counts()
    backed = _backed(tmp_path, x.tocsc())
    assert backed.X.format == "csc"
    if small_windows:  # one block per window, pieces of columns never read together: the cursors' paths
        monkeypatch.setattr(_matrix, "_CSC_AHEAD", 1)
        monkeypatch.setattr(_matrix, "_CSC_GAP", 0)
    starts = []
    for start, stop, block in iter_row_blocks(backed.X, chunk):
        starts.append(start)
        _assert_same(block, x[start:stop])
    assert starts == list(range(0, x.shape[0], chunk))


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_backed_csc_keeps_the_stored_dtype(tmp_path, dtype):
    x = _counts(dtype=dtype)
    backed = _backed(tmp_path, x.tocsc())
    blocks = [block for _, _, block in iter_row_blocks(backed.X, 64)]
    assert {b.dtype for b in blocks} == {np.dtype(dtype)}
    _assert_same(sparse.vstack(blocks, format="csr"), x)


def test_backed_csc_read_rows_any_range(tmp_path):
    x = _counts()
    backed = _backed(tmp_path, x.tocsc())
    for start, stop in [(0, 300), (0, 37), (37, 120), (299, 300), (10, 10)]:
        _assert_same(read_rows(backed.X, start, stop), x[start:stop])


def test_backed_csc_blocks_of_varying_sizes_across_windows(tmp_path, monkeypatch):
    x = _counts()
    backed = _backed(tmp_path, x.tocsc())
    monkeypatch.setattr(_matrix, "_CSC_AHEAD", 1200)  # windows of a few blocks: later blocks straddle two windows
    reader = _matrix._BackedCSCRows(backed.X, read_ahead=True)
    bounds = [0, 10, 35, 36, 90, 91, 250, 300]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        _assert_same(reader.rows(start, stop), x[start:stop])
    _assert_same(reader.rows(20, 40), x[20:40])  # out of order: read by a pass over the columns


@pytest.mark.parametrize("pass_values", [None, 300])
def test_backed_csc_unsorted_rows_within_columns(tmp_path, monkeypatch, count_reads, pass_values):
    x = _counts()
    if pass_values is not None:  # windows of a few blocks, each read by one pass over the matrix
        monkeypatch.setattr(_matrix, "_CSC_PASS", pass_values)
    csc = x.tocsc()
    for c in range(csc.shape[1]):  # reverse the rows within each column (still a valid CSC matrix)
        a, b = csc.indptr[c], csc.indptr[c + 1]
        csc.indices[a:b] = csc.indices[a:b][::-1].copy()
        csc.data[a:b] = csc.data[a:b][::-1].copy()
    csc.has_sorted_indices = False
    backed = _backed(tmp_path, csc)
    assert (np.diff(backed.X.group["indices"][:50]) < 0).any()
    count_reads.update(data=0, indices=0)
    blocks = list(iter_row_blocks(backed.X, 45))
    for start, stop, block in blocks:
        _assert_same(block, x[start:stop])
    n_windows = 1 if pass_values is None else -(-x.nnz // pass_values)
    assert count_reads["indices"] <= (n_windows + 1) * x.nnz  # a pass per window (and the check), not per block


@pytest.mark.parametrize("unsorted", [False, True])
def test_backed_csc_select_any_rows(tmp_path, monkeypatch, unsorted):
    x = _counts()
    csc = x.tocsc()
    if unsorted:
        for c in range(csc.shape[1]):
            a, b = csc.indptr[c], csc.indptr[c + 1]
            csc.indices[a:b] = csc.indices[a:b][::-1].copy()
            csc.data[a:b] = csc.data[a:b][::-1].copy()
        csc.has_sorted_indices = False
    backed = _backed(tmp_path, csc)
    monkeypatch.setattr(_matrix, "_CSC_BLOCK", 97)  # many batches of columns
    reader = _matrix._BackedCSCRows(backed.X, read_ahead=False)
    rng = np.random.default_rng(0)
    for rows in [np.sort(rng.choice(300, 40, replace=False)), np.arange(5, 60), np.array([0, 299]), np.array([7])]:
        _assert_same(reader.select(rows), x[rows])
    empty = reader.select(np.array([], dtype=np.int64))
    assert empty.shape == (0, x.shape[1]) and empty.nnz == 0
    with pytest.raises(ValueError, match="sorted, unique"):
        reader.select(np.array([5, 3]))
    with pytest.raises(ValueError, match="within the matrix"):
        reader.select(np.array([0, 300]))


def test_backed_csc_empty(tmp_path):
    backed = _backed(tmp_path, sparse.csc_matrix((20, 5), dtype=np.float32))
    blocks = list(iter_row_blocks(backed.X, 6))
    assert [(s, e) for s, e, _ in blocks] == [(0, 6), (6, 12), (12, 18), (18, 20)]
    assert all(isinstance(b, sparse.csr_matrix) and b.nnz == 0 and b.shape == (e - s, 5) for s, e, b in blocks)


@pytest.fixture
def count_reads(monkeypatch):
    """Number of stored values read from each ``data`` / ``indices`` dataset of an HDF5 file."""
    read: dict[str, int] = {"data": 0, "indices": 0}
    original = h5py.Dataset.__getitem__

    def counting(self, args, *rest, **kwargs):
        out = original(self, args, *rest, **kwargs)
        key = self.name.rsplit("/", 1)[-1]
        if key in read:
            read[key] += int(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return read


@pytest.mark.parametrize("small_windows", [False, True])
def test_backed_csc_blocks_read_the_matrix_about_once(tmp_path, monkeypatch, count_reads, small_windows):
    # 20 blocks of rows: reading the whole matrix per block (what anndata does) would read 20 times its values
    x = sparse.random(4000, 20, density=0.5, format="csr", random_state=1, dtype=np.float32)
    backed = _backed(tmp_path, x.tocsc())
    if small_windows:  # the window is the block
        monkeypatch.setattr(_matrix, "_CSC_AHEAD", 1)
        monkeypatch.setattr(_matrix, "_CSC_GAP", 0)
    count_reads.update(data=0, indices=0)
    n_blocks = 0
    for start, stop, block in iter_row_blocks(backed.X, 200):
        _assert_same(block, x[start:stop])
        n_blocks += 1
    assert n_blocks == 20
    assert count_reads["data"] == x.nnz  # every stored value exactly once
    assert count_reads["indices"] <= 3 * x.nnz  # once to check they are sorted, then about once more


def test_in_memory_and_backed_csr_and_dense_blocks(tmp_path):
    x = _counts()
    dense = x.toarray()
    backed_csr = _backed(tmp_path, x, "csr.h5ad")
    backed_dense = _backed(tmp_path, dense, "dense.h5ad")
    for source in (x, x.tocsc(), backed_csr.X):
        for start, stop, block in iter_row_blocks(source, 64):
            _assert_same(block, x[start:stop])
    for start, stop, block in iter_row_blocks(backed_dense.X, 64):
        np.testing.assert_array_equal(block, dense[start:stop])


# ---------------------------------------------------------------- normalize_block


def _with_duplicated_entries(x: sparse.csr_matrix) -> sparse.csr_matrix:
    """``x`` with each value of 2 or more stored as two entries of the same cell and gene (not canonical)."""
    x = sparse.csr_matrix(x)
    x.sort_indices()
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    split = x.data >= 2
    half = np.floor(x.data[split] / 2)
    data = np.concatenate([np.where(split, x.data - np.where(split, np.floor(x.data / 2), 0), x.data), half])
    r = np.concatenate([rows, rows[split]])
    c = np.concatenate([x.indices, x.indices[split]])
    order = np.argsort(r, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=x.shape[0]))])
    out = sparse.csr_matrix((data[order], c[order], indptr), shape=x.shape)
    assert not out.has_canonical_format and abs(out - x).max() == 0
    return out


@pytest.mark.parametrize("over", ["genes", "all"])
@pytest.mark.parametrize("kind", ["counts", "log1p"])
def test_normalize_block_sums_duplicated_entries(kind, over):
    """A CSR block holding a cell's gene as several entries is normalized as their sum (log1p is not additive)."""
    x = _counts()
    cols = np.arange(0, 40, 3)
    expected = _matrix.normalize_block(x, cols, kind=kind, over=over)
    dup = _with_duplicated_entries(x)
    data_before = dup.data.copy()
    got = _matrix.normalize_block(dup, cols, kind=kind, over=over)
    np.testing.assert_allclose(got.toarray(), expected.toarray(), rtol=1e-12)
    np.testing.assert_array_equal(dup.data, data_before)  # the caller's matrix is left as it was


@pytest.mark.parametrize("over", ["genes", "all"])
@pytest.mark.parametrize("kind", ["counts", "log1p"])
def test_normalize_block_of_a_dense_block_equals_the_sparse_one(kind, over):
    x = _counts()
    cols = np.array([5, 1, 30, 10, 11])
    expected = _matrix.normalize_block(x, cols, kind=kind, over=over).toarray()
    for dense in (x.toarray(), x.toarray().astype(np.int32), x.toarray().astype(np.float16)):
        got = _matrix.normalize_block(dense, cols, kind=kind, over=over)
        assert isinstance(got, sparse.csr_matrix)
        np.testing.assert_allclose(got.toarray(), expected, rtol=1e-12)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("over", ["genes", "all"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -2.0])
def test_normalize_block_names_the_cell_with_an_invalid_count(bad, over, dense):
    x = _counts().astype(np.float64).tolil()
    x[42, 9] = bad
    x = sparse.csr_matrix(x)
    block = x.toarray() if dense else x
    cols = np.array([9, 12, 20])
    with pytest.raises(ValueError, match=r"layers\['counts'\] holds values that are not finite and non-negative") as e:
        _matrix.normalize_block(block, cols, kind="counts", over=over, row_offset=1000, where="layers['counts']")
    assert (
        f"{bad} in row 1,042" in str(e.value) and "column 9 " in str(e.value) and "rows 1,000 to 1,299" in str(e.value)
    )
    # a bad value in a gene not used (library size over the genes used) is not read
    _matrix.normalize_block(block, np.array([12, 20]), kind="counts", over="genes")


def test_normalize_block_of_log1p_values_allows_negatives_but_not_nan():
    x = sparse.csr_matrix(np.array([[0.0, -0.5, 1.0], [2.0, 0.0, np.nan]]))
    np.testing.assert_array_equal(
        _matrix.normalize_block(x[:1], np.arange(3), kind="log1p", over="all").toarray(), [[0.0, -0.5, 1.0]]
    )
    with pytest.raises(
        ValueError,
        match=r"The expression matrix holds values that are not finite: e.g. nan in row 1 \(the cell's 0-based position",
    ):
        _matrix.normalize_block(x, np.arange(3), kind="log1p", over="all")


def test_gene_indices_refuses_only_repeated_names_that_are_asked_for():
    names = ["A", "B", "dup", "C", "dup"]
    np.testing.assert_array_equal(_matrix.gene_indices(names, ["C", "A"]), [3, 0])
    with pytest.raises(ValueError, match=r"duplicated gene names \(1, e.g. \['dup'\]\)"):
        _matrix.gene_indices(names, ["A", "dup"])
    with pytest.raises(KeyError, match="not in the table"):
        _matrix.gene_indices(["dup", "dup"], ["A"])


# ---------------------------------------------------------------- lazy arrays over CSC matrices on disk


def _no_dask_compute(*args, **kwargs):
    raise AssertionError("a block of rows was computed through dask (whole columns) instead of read from the file")


def _lazy_csc(tmp_path, fmt: str, x: sparse.csr_matrix | None = None, **layers):
    x = _counts() if x is None else x
    table = ad.AnnData(X=x.tocsc(), layers={k: v.tocsc() for k, v in layers.items()})
    table.obs_names = [f"c{i}" for i in range(x.shape[0])]
    table.var_names = [f"g{i}" for i in range(x.shape[1])]
    path = tmp_path / f"x.{fmt}"
    table.write_h5ad(path) if fmt == "h5ad" else table.write_zarr(path)
    return ad.experimental.read_lazy(path), table


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize("chunk", [1, 64, 300])
def test_lazy_csc_row_blocks_are_read_from_the_file(tmp_path, fmt, chunk):
    """anndata's lazy CSC arrays chunk by columns (every row in each chunk): blocks are read from the file instead."""
    import dask

    lazy, table = _lazy_csc(tmp_path, fmt)
    assert len(lazy.X.chunks[0]) == 1  # dask would load whole columns for every block of rows
    x = sparse.csr_matrix(table.X)
    with dask.config.set(scheduler=_no_dask_compute):
        blocks = list(iter_row_blocks(lazy.X, chunk))
        assert [(s, e) for s, e, _ in blocks] == [(s, min(s + chunk, 300)) for s in range(0, 300, chunk)]
        for start, stop, block in blocks:
            _assert_same(block, x[start:stop])
        for start, stop in [(0, 300), (37, 120), (299, 300), (10, 10)]:
            _assert_same(read_rows(lazy.X, start, stop), x[start:stop])


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize(
    "index",
    [
        (slice(40, 260), slice(None)),  # a range of cells
        (slice(3, 290, 7), slice(5, 30)),  # every 7th cell, a range of genes
        (
            np.sort(np.random.default_rng(0).choice(300, 120, replace=False)),
            np.array([30, 2, 17, 9]),
        ),  # genes reordered
        (np.array([250, 3, 3, 120, 0]), slice(None)),  # cells out of order and twice
        (np.arange(300) % 4 == 1, np.arange(40) % 3 == 0),  # masks
        (7, slice(None)),  # one cell
        (slice(0, 0), slice(None)),  # no cell
    ],
)
def test_views_of_lazy_csc_tables_are_read_from_the_file(tmp_path, fmt, index):
    import dask

    x = _counts()
    lazy, table = _lazy_csc(tmp_path, fmt, x, counts=x * 2)
    view, expected = lazy[index], table[index]
    for got_matrix, want_matrix in ((view.X, expected.X), (view.layers["counts"], expected.layers["counts"])):
        assert _matrix._stored_csc(got_matrix) is not None
        want = sparse.csr_matrix(want_matrix)
        with dask.config.set(scheduler=_no_dask_compute):
            blocks = [block for _, _, block in iter_row_blocks(got_matrix, 50)]
            got = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix(want.shape, dtype=want.dtype)
            _assert_same(got, want)
            if want.shape[0] >= 3:
                _assert_same(read_rows(got_matrix, 1, 3), want[1:3])
    # a view of a view is a view of the table
    inner = lazy[10:200][::3, 1:9]
    _assert_same(sparse.vstack([b for *_, b in iter_row_blocks(inner.X, 16)], format="csr"), x[10:200:3, 1:9])


def test_other_dask_arrays_are_read_through_dask_as_before(tmp_path):
    """Arrays computed from a lazy table, or made by the user, are not taken for the file: dask computes them."""
    import dask.array as da

    x = _counts()
    lazy, _ = _lazy_csc(tmp_path, "h5ad", x)
    doubled = lazy.X * 2
    from_user = da.from_array(x.tocsc(), chunks=(300, 16))
    for array, want in ((doubled, x * 2), (from_user, x), (lazy.X.rechunk((100, 40)), x)):
        assert _matrix._stored_csc(array) is None
        got = sparse.vstack([b for *_, b in iter_row_blocks(array, 64)], format="csr")
        np.testing.assert_array_equal(got.toarray(), want.toarray())


def test_a_view_whose_values_were_replaced_is_not_read_from_the_file(tmp_path):
    lazy, _ = _lazy_csc(tmp_path, "h5ad")
    view = lazy[5:50]
    other = lazy.X[6:51]  # not the view's subset: a different dask name
    assert _matrix._stored_csc(view.X) is not None
    assert _matrix._stored_csc(other) is None


def test_compressed_chunked_csc_blocks_are_cut_from_passes_over_the_matrix(tmp_path, monkeypatch):
    """In zarr every read decodes whole chunks: a window is read by one pass in large pieces, not column by column."""
    import zarr

    x = sparse.random(2000, 60, density=0.3, format="csr", random_state=3, dtype=np.float32)
    backed_zarr = tmp_path / "x.zarr"
    ad.AnnData(X=x.tocsc()).write_zarr(backed_zarr)
    csc = ad.io.sparse_dataset(zarr.open_group(backed_zarr, mode="r")["X"])
    monkeypatch.setattr(_matrix, "_CSC_GAP", 0)  # column pieces are never merged: one read per column otherwise
    monkeypatch.setattr(_matrix, "_CSC_AHEAD", 1)
    monkeypatch.setattr(_matrix, "_CSC_PASS", x.nnz // 4)  # windows of a quarter of the matrix
    reads = {"n": 0}
    original = zarr.Array.__getitem__

    def counting(self, key):
        if self.path.endswith("data"):
            reads["n"] += 1
        return original(self, key)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    blocks = list(iter_row_blocks(csc, 100))
    _assert_same(sparse.vstack([b for *_, b in blocks], format="csr"), x)
    assert reads["n"] <= 5  # one piece per window (4 or 5 windows), not one per column (60 per window)


def test_gzip_compressed_backed_csc_blocks_equal_in_memory_rows(tmp_path, monkeypatch):
    x = _counts()
    ad.AnnData(X=x.tocsc()).write_h5ad(tmp_path / "x.h5ad", compression="gzip")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    assert _matrix._small_reads_decode_chunks(backed.X.group["data"])
    monkeypatch.setattr(_matrix, "_CSC_PASS", 500)
    for start, stop, block in iter_row_blocks(backed.X, 32):
        _assert_same(block, x[start:stop])


@pytest.mark.parametrize("where", ["backed", "lazy", "lazy view"])
def test_rows_on_disk_reads_any_rows_of_a_csc_matrix_on_disk(tmp_path, where):
    import dask

    x = _counts()
    lazy, table = _lazy_csc(tmp_path, "h5ad", x)
    if where == "backed":
        matrix, want = ad.read_h5ad(tmp_path / "x.h5ad", backed="r").X, x
    elif where == "lazy":
        matrix, want = lazy.X, x
    else:
        matrix, want = lazy[20:250, [4, 1, 8]].X, x[20:250][:, [4, 1, 8]]
    rows = np.array([100, 3, 57, 3, 0])
    with dask.config.set(scheduler=_no_dask_compute):
        _assert_same(_matrix.rows_on_disk(matrix, rows), sparse.csr_matrix(want[rows]))
    assert _matrix.rows_on_disk(x, rows) is None  # in memory: not its business
