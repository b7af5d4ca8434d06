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


def test_backed_csc_unsorted_rows_within_columns(tmp_path):
    x = _counts()
    csc = x.tocsc()
    for c in range(csc.shape[1]):  # reverse the rows within each column (still a valid CSC matrix)
        a, b = csc.indptr[c], csc.indptr[c + 1]
        csc.indices[a:b] = csc.indices[a:b][::-1].copy()
        csc.data[a:b] = csc.data[a:b][::-1].copy()
    csc.has_sorted_indices = False
    backed = _backed(tmp_path, csc)
    assert (np.diff(backed.X.group["indices"][:50]) < 0).any()
    for start, stop, block in iter_row_blocks(backed.X, 45):
        _assert_same(block, x[start:stop])


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
