from __future__ import annotations

import logging
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import spatialcx as scx
from spatialcx import _matrix
from spatialcx.pp import _normalization as norm
from spatialcx.pp._normalization import (
    RAW_SEARCH_ORDER,
    STATES,
    ExpressionSource,
    NormalizationStatus,
    find_expression_source,
)

# --------------------------------------------------------------------------------------------------------------------
# synthetic data


def make_counts(n_obs: int = 1500, n_vars: int = 120, *, mean: float = 0.6, seed: int = 0) -> np.ndarray:
    """Poisson counts with gene-specific means and cell-specific library sizes (float32, integer-valued)."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(2.0, mean / 2, size=(1, n_vars)) * rng.lognormal(0, 0.5, size=(n_obs, 1))
    return rng.poisson(lam).astype(np.float32)


def log1p_norm(counts: np.ndarray, target_sum: float, *, log: bool = True) -> np.ndarray:
    a = ad.AnnData(counts.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=target_sum)
        if log:
            sc.pp.log1p(a)
    return np.asarray(a.X)


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    return make_counts()


def adata_of(x, n_vars: int | None = None) -> ad.AnnData:
    n_vars = x.shape[1] if n_vars is None else n_vars
    return ad.AnnData(x, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))


# --------------------------------------------------------------------------------------------------------------------
# states


def test_states_constant():
    assert STATES == ("raw", "log1p_10k", "log1p_cpm", "log1p_other", "linear", "negative", "unknown")
    assert RAW_SEARCH_ORDER == ("layers['counts']", "layers['raw_counts']", "layers['raw']", "raw.X", "X")


@pytest.mark.parametrize(
    ("transform", "state"),
    [
        (lambda c: c, "raw"),
        (lambda c: c.astype(np.int64), "raw"),
        (lambda c: log1p_norm(c, 1e4), "log1p_10k"),
        (lambda c: log1p_norm(c, 1e6), "log1p_cpm"),
        (lambda c: log1p_norm(c, 100), "log1p_other"),
        (lambda c: log1p_norm(c, 1e5), "log1p_other"),
        (lambda c: np.log1p(c), "log1p_other"),  # log1p of counts never normalized per cell
        (lambda c: log1p_norm(c, 1e4)[:, :60], "log1p_other"),  # genes dropped after normalization
        (lambda c: log1p_norm(c, 1e4, log=False), "linear"),
        (lambda c: log1p_norm(c, 1e6, log=False), "linear"),
        (lambda c: log1p_norm(c, 1, log=False), "linear"),
        (lambda c: c / np.linspace(50, 500, c.shape[0])[:, None], "linear"),  # counts / cell volume
        (lambda c: log1p_norm(c, 1e4) - 1.0, "negative"),
    ],
)
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_x_states(counts, transform, state, fmt):
    x = np.asarray(transform(counts))
    x = sparse.csr_matrix(x) if fmt == "csr" else x
    status = scx.pp.normalization_status(adata_of(x))
    assert isinstance(status, NormalizationStatus)
    assert status.x_state == state
    assert status.raw_source == ("X" if state == "raw" else None)
    assert status.is_usable == (state in ("raw", "log1p_10k"))
    assert status.stats["checked"]["X"]["state"] == state
    if state.startswith("log1p"):
        assert status.x_target_sum is not None
    else:
        assert status.x_target_sum is None


def test_target_sum_measured(counts):
    for target in (1e4, 1e6, 250.0):
        status = scx.pp.normalization_status(adata_of(log1p_norm(counts, target)))
        assert status.x_target_sum == pytest.approx(target, rel=1e-4)


def test_scaled_data_is_negative_and_not_usable(counts):
    a = adata_of(counts.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.scale(a)
    status = scx.pp.normalization_status(a)
    assert status.x_state == "negative"
    assert not status.is_usable
    assert status.has_log1p_uns
    assert status.stats["checked"]["X"]["min"] < 0


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((0, 5), dtype=np.float32),
        np.zeros((5, 0), dtype=np.float32),
        np.zeros((20, 5), dtype=np.float32),
        sparse.csr_matrix((20, 5), dtype=np.float32),
        np.array([[1.0, np.nan], [2.0, 3.0]]),
    ],
    ids=["no-cells", "no-genes", "all-zero", "all-zero-sparse", "nan"],
)
def test_unknown(x):
    status = scx.pp.normalization_status(adata_of(x))
    assert status.x_state == "unknown"
    assert status.raw_source is None
    assert not status.is_usable


def test_all_zero_rows_are_ignored(counts):
    x = log1p_norm(counts, 1e4)
    x[::3] = 0  # a third of the cells are empty
    status = scx.pp.normalization_status(adata_of(sparse.csr_matrix(x)))
    assert status.x_state == "log1p_10k"
    assert status.x_target_sum == pytest.approx(1e4, rel=1e-4)
    assert status.stats["checked"]["X"]["n_zero_rows"] > 0


def test_mostly_integer_threshold(counts):
    x = counts.copy()
    nz = np.flatnonzero(x)
    rng = np.random.default_rng(0)
    # 2 % non-integer values: still counts (ambient-corrected counts, say); 20 %: not counts
    for frac, state in ((0.02, "raw"), (0.2, "linear")):
        y = x.copy().ravel()
        y[rng.choice(nz, int(frac * nz.size), replace=False)] += 0.5
        status = scx.pp.normalization_status(adata_of(y.reshape(x.shape)))
        assert status.x_state == state, frac
        assert status.stats["checked"]["X"]["integer_fraction"] == pytest.approx(1 - frac, abs=0.02)


def test_float32_counts_with_rounding_noise_are_raw():
    """Counts computed in float32 are a few float32 steps off integers: above ~8 that exceeds an absolute 1e-6."""
    c = make_counts(2000, 80, mean=30.0, seed=6)
    x = np.expm1(np.log1p(c)).astype(np.float32)  # counts taken back from log1p(counts) in float32
    assert (np.abs(x - c)[c > 0] > 1e-6).mean() > 0.3  # many counts are off
    status = scx.pp.normalization_status(adata_of(sparse.csr_matrix(x)))
    assert (status.x_state, status.raw_source) == ("raw", "X")
    assert status.stats["checked"]["X"]["integer_fraction"] == 1.0
    a = adata_of(x.copy())
    scx.pp.ensure_normalized(a)
    np.testing.assert_array_equal(a.layers["counts"], x)  # kept as they were, not rounded
    np.testing.assert_allclose(a.X, log1p_norm(c, 1e4), rtol=1e-5, atol=1e-5)
    # non-integer data of the same magnitude is still not counts
    assert scx.pp.normalization_status(adata_of(x + np.float32(0.25) * (x > 0))).x_state == "linear"


def test_summary_is_readable(counts):
    a = adata_of(log1p_norm(counts, 1e4))
    a.layers["counts"] = sparse.csr_matrix(counts)
    status = scx.pp.normalization_status(a)
    text = str(status)
    assert text == status.summary()
    assert "usable" in text and "layers['counts']" in text and "log1p_10k" in text and "10,000" in text


# --------------------------------------------------------------------------------------------------------------------
# where raw counts are found


@pytest.mark.parametrize("layer", ["counts", "raw_counts", "raw"])
def test_raw_in_layer(counts, layer):
    a = adata_of(log1p_norm(counts, 1e4))
    a.layers[layer] = sparse.csr_matrix(counts)
    status = scx.pp.normalization_status(a)
    assert status.raw_source == f"layers[{layer!r}]"
    assert status.x_state == "log1p_10k"
    assert status.is_usable


def test_search_order(counts):
    a = adata_of(counts.copy())  # X holds counts too: last in the order
    a.layers["raw"] = counts.copy()
    a.layers["raw_counts"] = counts.copy()
    assert scx.pp.normalization_status(a).raw_source == "layers['raw_counts']"
    a.layers["counts"] = counts.copy()
    assert scx.pp.normalization_status(a).raw_source == "layers['counts']"
    # a non-count candidate is skipped (and reported) in favour of the next one
    a.layers["counts"] = log1p_norm(counts, 1e4)
    status = scx.pp.normalization_status(a)
    assert status.raw_source == "layers['raw_counts']"
    assert status.stats["checked"]["layers['counts']"]["state"] == "log1p_10k"
    # candidates after the first raw one are not read, X always is
    assert "layers['raw']" not in status.stats["checked"]
    assert "X" in status.stats["checked"]


def test_raw_x_before_x(counts):
    raw = adata_of(counts)
    a = raw[:, :80].copy()
    a.raw = raw
    a.X = log1p_norm(counts, 1e4)[:, :80]
    status = scx.pp.normalization_status(a)
    assert status.raw_source == "raw.X"
    # raw.X with more genes than X: the source's columns are raw's genes
    src = find_expression_source(a)
    assert isinstance(src, ExpressionSource)
    assert (src.kind, src.where) == ("counts", "raw.X")
    assert src.matrix.shape == (counts.shape[0], counts.shape[1])
    assert list(src.var_names) == list(raw.var_names)


def test_negative_layer_is_never_raw(counts):
    a = adata_of(counts.copy())
    a.layers["counts"] = counts - 1  # integer-valued but negative: not counts
    status = scx.pp.normalization_status(a)
    assert status.stats["checked"]["layers['counts']"]["state"] == "negative"
    assert status.raw_source == "X"


def test_sampling_is_reproducible():
    a = adata_of(log1p_norm(make_counts(5000, 60, seed=3), 1e4))
    s1 = scx.pp.normalization_status(a)
    s2 = scx.pp.normalization_status(a)
    s3 = scx.pp.normalization_status(a, random_state=1)
    assert s1.stats == s2.stats
    assert s1.stats["n_rows_sampled"] == norm.N_SAMPLE_ROWS
    assert s1.stats["checked"]["X"]["n_values_checked"] == norm.N_SAMPLE_VALUES
    assert s1.stats["checked"]["X"]["row_sum_median"] != s3.stats["checked"]["X"]["row_sum_median"]
    assert s3.x_state == "log1p_10k"


# --------------------------------------------------------------------------------------------------------------------
# backings: dask and file-backed, never loaded whole


class _RowCounter:
    def __init__(self):
        self.rows = 0

    def __call__(self, block):
        self.rows += block.shape[0]
        return block


def counting_dask(x, chunk_rows: int, counter: _RowCounter):
    """A dask array whose every computed block adds its number of rows to ``counter``."""
    import dask.array as da

    base = da.from_array(x, chunks=(chunk_rows, x.shape[1]), asarray=False)
    meta = x[:0] if sparse.issparse(x) else np.empty((0, 0), dtype=x.dtype)
    return base.map_blocks(counter, dtype=x.dtype, meta=meta)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_dask_reads_only_sampled_rows(fmt):
    c = make_counts(20_000, 30, mean=2.0, seed=1)
    x = sparse.csr_matrix(c) if fmt == "csr" else c
    counter = _RowCounter()
    a = adata_of(counting_dask(x, 10, counter))
    status = scx.pp.normalization_status(a)
    assert (status.x_state, status.raw_source) == ("raw", "X")
    n = status.stats["n_rows_sampled"]
    assert 0 < counter.rows <= 10 * n < c.shape[0]
    # same rows as the in-memory matrix
    assert status.stats == scx.pp.normalization_status(adata_of(x)).stats


def test_dask_with_small_chunks_reads_a_few_chunks_not_the_whole_table():
    """anndata's lazy reader makes 1,000-row chunks: rows drawn from the whole table would touch almost all of them."""
    c = sparse.csr_matrix(make_counts(200_000, 20, mean=1.0, seed=5))
    counter = _RowCounter()
    a = adata_of(counting_dask(c, 1_000, counter))
    status = scx.pp.normalization_status(a)
    assert (status.x_state, status.raw_source) == ("raw", "X")
    assert status.stats["n_rows_sampled"] == norm.N_SAMPLE_ROWS
    # drawn from about SAMPLE_ROW_BUDGET rows of whole chunks instead of touching ~200 of the 200 chunks
    assert norm.SAMPLE_ROW_BUDGET <= counter.rows <= norm.SAMPLE_ROW_BUDGET + 1_000
    rows = norm._sample_row_indices(200_000, 20, 0, a.X.chunks[0])
    assert len(np.unique(rows // 1_000)) == counter.rows // 1_000  # the rows lie in the chunks that were read
    assert np.array_equal(rows, norm._sample_row_indices(200_000, 20, 0, a.X.chunks[0]))  # seeded
    # a log1p(10k) table is still told from counts on that sample
    lognorm = sparse.csr_matrix(log1p_norm(c.toarray(), 1e4))
    assert scx.pp.normalization_status(adata_of(counting_dask(lognorm, 1_000, _RowCounter()))).x_state == "log1p_10k"


def test_dask_log1p_10k_lazy_and_ensure_normalized_stays_lazy():
    import dask.array as da

    c = make_counts(20_000, 30, mean=2.0, seed=2)
    counter = _RowCounter()
    a = adata_of(counting_dask(sparse.csr_matrix(c), 10, counter))
    scx.pp.ensure_normalized(a)
    sampled = counter.rows
    assert sampled < c.shape[0]
    assert isinstance(a.X, da.Array) and isinstance(a.layers["counts"], da.Array)
    assert counter.rows == sampled  # nothing computed by the normalization itself
    result = a.X[:500].compute()
    assert sparse.issparse(result)
    expected = log1p_norm(c[:500], 1e4)
    np.testing.assert_allclose(result.toarray(), expected, rtol=1e-5, atol=1e-6)


def test_in_memory_sparse_is_never_densified():
    full_shape = (8000, 50)
    c = make_counts(*full_shape, seed=4)

    class NoDense(sparse.csr_matrix):
        def toarray(self, *args, **kwargs):
            if self.shape == full_shape:
                raise AssertionError("the whole matrix was densified")
            return super().toarray(*args, **kwargs)

        def todense(self, *args, **kwargs):
            return self.toarray()

    status = scx.pp.normalization_status(adata_of(NoDense(c)))
    assert status.x_state == "raw"


def test_backed_csc_is_read_by_column_blocks(tmp_path, counts, monkeypatch):
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    c = make_counts(3000, 40, seed=5)
    adata_of(sparse.csc_matrix(log1p_norm(c, 1e4))).write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    monkeypatch.setattr(_matrix, "_CSC_BLOCK", 5000)  # many column blocks
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", lambda self: pytest.fail("read whole"))
    try:
        status = scx.pp.normalization_status(backed)
    finally:
        backed.file.close()
    monkeypatch.undo()
    assert status.x_state == "log1p_10k"
    assert status.stats == scx.pp.normalization_status(adata_of(sparse.csr_matrix(log1p_norm(c, 1e4)))).stats


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_lazy_csc_sample_is_read_from_the_file(tmp_path, suffix):
    """anndata's lazy CSC array has one chunk of all rows per column block: the sampled rows are read from the file,
    never computed through dask (which would load whole columns: the whole table)."""
    import dask

    def no_dask_compute(*args, **kwargs):
        raise AssertionError("computed through dask")

    c = make_counts(3000, 40, seed=6)
    path = tmp_path / f"csc{suffix}"
    a = adata_of(sparse.csc_matrix(c))
    a.write_h5ad(path) if suffix == ".h5ad" else a.write_zarr(path)
    lazy = ad.experimental.read_lazy(path)
    with dask.config.set(scheduler=no_dask_compute):
        status = scx.pp.normalization_status(lazy)
    assert status.x_state == "raw"
    assert status.stats == scx.pp.normalization_status(adata_of(sparse.csr_matrix(c))).stats


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_backed_h5ad(tmp_path, counts, fmt, monkeypatch):
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    x = log1p_norm(counts, 1e4)
    a = adata_of(sparse.csr_matrix(x) if fmt == "csr" else x)
    a.layers["counts"] = sparse.csr_matrix(counts)
    raw = adata_of(sparse.csr_matrix(counts) if fmt == "csr" else counts)
    a.raw = raw
    path = tmp_path / "t.h5ad"
    a.write_h5ad(path)

    def no_full_read(self, *args, **kwargs):
        raise AssertionError("the whole backed matrix was read")

    backed = ad.read_h5ad(path, backed="r")  # layers are read into memory; X and raw.X stay on disk
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", no_full_read)
    try:
        status = scx.pp.normalization_status(backed)
        assert (status.raw_source, status.x_state) == ("layers['counts']", "log1p_10k")
        del backed.layers["counts"]
        status = scx.pp.normalization_status(backed)
        assert (status.raw_source, status.x_state) == ("raw.X", "log1p_10k")
        # a backed X cannot be replaced: clear error, nothing changed
        with pytest.raises(ValueError, match="backed"):
            scx.pp.ensure_normalized(backed)
        assert "log1p" not in backed.uns
    finally:
        backed.file.close()


# --------------------------------------------------------------------------------------------------------------------
# ensure_normalized


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_ensure_normalized_from_counts_in_x(counts, fmt):
    to = {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}[fmt]
    a = adata_of(to(counts.copy()))
    before = a.X
    scx.pp.ensure_normalized(a)
    # the counts are kept, unchanged, in layers["counts"]
    assert a.layers["counts"] is before
    kept = a.layers["counts"].toarray() if sparse.issparse(a.layers["counts"]) else a.layers["counts"]
    np.testing.assert_array_equal(kept, counts)
    assert sparse.issparse(a.X) == (fmt != "dense")
    x = a.X.toarray() if sparse.issparse(a.X) else a.X
    np.testing.assert_allclose(x, log1p_norm(counts, 1e4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.expm1(x).sum(axis=1)[counts.sum(axis=1) > 0], 1e4, rtol=1e-4)
    assert a.uns["log1p"] == {"base": None}
    status = scx.pp.normalization_status(a)
    assert (status.raw_source, status.x_state, status.is_usable) == ("layers['counts']", "log1p_10k", True)
    # idempotent
    x1 = a.X.copy()
    scx.pp.ensure_normalized(a)
    x2 = a.X.toarray() if sparse.issparse(a.X) else a.X
    np.testing.assert_allclose(x2, x1.toarray() if sparse.issparse(x1) else x1, rtol=1e-6)
    np.testing.assert_array_equal(kept, counts)


def test_ensure_normalized_integer_counts_and_target_sum(counts):
    a = adata_of(counts.astype(np.int32))
    scx.pp.ensure_normalized(a, target_sum=1e6)
    assert a.layers["counts"].dtype == np.int32
    np.testing.assert_array_equal(a.layers["counts"], counts.astype(np.int32))
    assert scx.pp.normalization_status(a).x_state == "log1p_cpm"


def test_ensure_normalized_from_layer_keeps_layer(counts):
    a = adata_of(log1p_norm(counts, 100))  # X at another target
    a.layers["raw_counts"] = sparse.csr_matrix(counts)
    layer = a.layers["raw_counts"]
    scx.pp.ensure_normalized(a)
    assert a.layers["raw_counts"] is layer
    np.testing.assert_array_equal(layer.toarray(), counts)
    assert "counts" not in a.layers
    assert sparse.issparse(a.X)  # X takes the format of the counts
    np.testing.assert_allclose(a.X.toarray(), log1p_norm(counts, 1e4), rtol=1e-5, atol=1e-6)


def test_ensure_normalized_from_raw_x_normalizes_over_raw_genes(counts):
    raw = adata_of(counts.copy())
    a = raw[:, 10:70].copy()
    a.raw = raw
    a.X = np.zeros(a.shape, dtype=np.float32) + 0.5  # something unusable
    scx.pp.ensure_normalized(a)
    np.testing.assert_allclose(a.X, log1p_norm(counts, 1e4)[:, 10:70], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.raw.X, counts)


def test_ensure_normalized_raw_missing_genes(counts):
    raw = adata_of(counts[:, :50].copy())
    a = adata_of(np.zeros((counts.shape[0], 60), dtype=np.float32) + 0.5)
    a.raw = raw
    with pytest.raises(ValueError, match="not in raw.var_names"):
        scx.pp.ensure_normalized(a)


def test_ensure_normalized_leaves_verified_log1p_10k(counts):
    x = sparse.csr_matrix(log1p_norm(counts, 1e4))
    a = adata_of(x)
    scx.pp.ensure_normalized(a)
    assert a.X is x
    assert a.uns["log1p"] == {"base": None}
    assert "counts" not in a.layers


@pytest.mark.parametrize("where", ["X", "raw.X"])
def test_log1p_of_unnormalized_counts_near_10k_is_not_taken_for_normalized(where):
    # counts of about 10,000 per cell, logged but never normalized: the row sums are near 10k, the cells differ
    c = make_counts(400, 200, mean=45.0, seed=3)
    assert 8e3 < np.median(c.sum(axis=1)) < 1.2e4
    logged = np.log1p(c)
    if where == "X":
        a = adata_of(logged)
    else:  # scanpy's layout: log1p in raw, a scaled gene subset in X
        a = adata_of(logged)
        a.raw = a
        a = a[:, :150].copy()
        a.X = (a.X - a.X.mean(axis=0)) / a.X.std(axis=0)
    status = scx.pp.normalization_status(a)
    assert status.stats["checked"][where]["state"] == "log1p_other"
    assert not status.is_usable
    before = np.array(a.X, copy=True)
    with pytest.raises(ValueError, match="log1p"):
        scx.pp.ensure_normalized(a)
    np.testing.assert_array_equal(a.X, before)


@pytest.mark.parametrize(
    ("fmt", "bad", "where"),
    [("dense", np.nan, "X"), ("csc", -3.0, "X"), ("csr", np.inf, "layers['counts']")],
)
def test_ensure_normalized_refuses_bad_counts_outside_the_sample(fmt, bad, where):
    """One NaN (anndata.concat(join='outer') fills dense gaps with NaN) in a cell the detection did not read."""
    c = make_counts(3000, 40, seed=7)
    sampled = norm._sample_row_indices(c.shape[0], c.shape[1], 0)
    cell = int(np.setdiff1d(np.arange(c.shape[0]), sampled)[0])
    c[cell, 5] = bad
    to = {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}[fmt]
    a = adata_of(to(c))
    if where == "X":
        assert scx.pp.normalization_status(a).raw_source == "X"  # the sample sees clean counts
    else:
        a.X = sparse.csr_matrix(log1p_norm(np.nan_to_num(c, posinf=0), 1e4))
        a.layers["counts"] = to(c)
    before = a.X
    with pytest.raises(ValueError, match="not finite and non-negative") as e:
        scx.pp.ensure_normalized(a)
    assert f"cell '{cell}', gene 'g5'" in str(e.value) and where in str(e.value)
    assert a.X is before and "log1p" not in a.uns  # nothing changed
    assert list(a.layers) == ([] if where == "X" else ["counts"])


def test_ensure_normalized_copy(counts):
    a = adata_of(counts.copy())
    out = scx.pp.ensure_normalized(a, copy=True)
    assert isinstance(out, ad.AnnData)
    np.testing.assert_array_equal(a.X, counts)
    assert "counts" not in a.layers and "log1p" not in a.uns
    assert scx.pp.normalization_status(out).x_state == "log1p_10k"
    assert scx.pp.ensure_normalized(a) is None


def test_never_overwrites_other_counts_layer(counts):
    a = adata_of(counts.copy())
    other = log1p_norm(counts, 1e4)
    a.layers["counts"] = other
    with pytest.raises(ValueError, match=r"layers\['counts'\] already holds") as e:
        scx.pp.ensure_normalized(a)
    assert "log1p_10k" in str(e.value) and "delete" in str(e.value)
    # nothing half-written
    assert a.layers["counts"] is other
    np.testing.assert_array_equal(a.X, counts)
    assert "log1p" not in a.uns


@pytest.mark.parametrize(
    ("transform", "state", "hint"),
    [
        (lambda c: log1p_norm(c, 1e4, log=False), "linear", "sum to a median of 10,000), sc.pp.normalize_total"),
        # cells normalized to different totals (around 100): no constant to rescale by (one total per cell is
        # rescaled exactly, see test_log1p_of_scanpys_default_normalize_total_is_rescaled_exactly)
        (
            lambda c: np.log1p(np.expm1(log1p_norm(c, 100)) * (0.5 + (np.arange(len(c)) % 11)[:, None] / 10)),
            "log1p_other",
            "X looks like log1p of data normalized to a median of 100 counts per cell",
        ),
        (lambda c: log1p_norm(c, 1e4) - 1, "negative", "negative"),
    ],
)
def test_error_says_what_and_how(counts, transform, state, hint):
    x = transform(counts)
    a = adata_of(x.copy())
    a.layers["counts"] = x.copy()  # a non-count "counts" layer is reported too
    with pytest.raises(ValueError) as e:
        scx.pp.ensure_normalized(a)
    msg = str(e.value)
    assert f"X is {state!r}" in msg
    assert f"layers['counts'] is {state!r}" in msg
    assert "absent: layers['raw_counts'], layers['raw'], raw.X" in msg
    assert hint in msg
    assert "adata.layers['counts']" in msg and "unsafe_force=True" in msg
    # only the functions that take unsafe_force are told to pass it (combine_references, train, ... do not)
    assert "for scx.tl.predict and scx.pp.ensure_normalized only, pass unsafe_force=True" in msg
    np.testing.assert_array_equal(a.X, x)
    with pytest.raises(ValueError, match=f"X is {state!r}"):
        find_expression_source(a)


@pytest.mark.parametrize("fmt", ["dense", "csr", "dask"])
def test_log1p_cpm_is_rescaled_exactly_to_log1p_10k(counts, fmt):
    """log1p(expm1(x) / 100) of log1p CPM data is log1p(10k) of the same counts, to float rounding."""
    import dask.array as da

    to = {
        "dense": np.asarray,
        "csr": sparse.csr_matrix,
        "dask": lambda m: da.from_array(sparse.csr_matrix(m), chunks=(500, -1), asarray=False),
    }[fmt]
    computed = lambda m: m.compute() if hasattr(m, "compute") else m
    dense = lambda m: m.toarray() if sparse.issparse(m) else np.asarray(m)
    cpm = log1p_norm(counts, 1e6)
    a = adata_of(to(cpm.copy()))
    status = scx.pp.normalization_status(a)
    assert (status.x_state, status.is_usable) == ("log1p_cpm", False)
    assert "ensure_normalized rescales it exactly" in status.stats["checked"]["X"]["reason"]
    assert "ensure_normalized rescales it exactly" in str(status)
    with pytest.raises(ValueError, match=r"scx.pp.ensure_normalized\(adata\) rescales it exactly"):
        find_expression_source(a)  # what predict / train see: not usable as it is, and told how
    out = scx.pp.ensure_normalized(a, copy=True)
    np.testing.assert_array_equal(dense(computed(a.X)), cpm)  # copy=True left it alone
    assert type(out.X) is type(a.X) and out.X.dtype == np.float32
    np.testing.assert_allclose(dense(computed(out.X)), log1p_norm(counts, 1e4), rtol=1e-5, atol=1e-5)
    assert out.uns["log1p"] == {"base": None} and "counts" not in out.layers
    after = scx.pp.normalization_status(out)
    assert (after.x_state, after.is_usable) == ("log1p_10k", True)
    assert after.x_target_sum == pytest.approx(1e4, rel=1e-4)
    # and back: log1p(10k) to log1p CPM when asked for target_sum=1e6
    back = scx.pp.ensure_normalized(out, target_sum=1e6, copy=True)
    np.testing.assert_allclose(dense(computed(back.X)), cpm, rtol=1e-5, atol=1e-4)


def test_log1p_cpm_in_raw_is_rescaled_for_x_genes(counts):
    """scanpy's layout with CPM: log1p CPM frozen in raw, X a scaled gene subset."""
    a = adata_of(log1p_norm(counts, 1e6))
    a.raw = a
    a = a[:, 20:80].copy()
    sc.pp.scale(a)
    status = scx.pp.normalization_status(a)
    assert status.stats["checked"]["raw.X"]["state"] == "log1p_cpm" and not status.is_usable
    with pytest.raises(ValueError, match="raw.X holds log1p of CPM"):
        find_expression_source(a)
    scx.pp.ensure_normalized(a)
    np.testing.assert_allclose(a.X, log1p_norm(counts, 1e4)[:, 20:80], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.raw.X, log1p_norm(counts, 1e6))  # raw is left as it was


def test_unsafe_force_warns(counts, caplog):
    x = log1p_norm(counts, 1e4, log=False)
    a = adata_of(x.copy())
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.ensure_normalized(a, unsafe_force=True)
    assert any(r.levelno == logging.WARNING and "UNSAFE" in r.getMessage() for r in caplog.records)
    assert "linear" in caplog.text
    np.testing.assert_array_equal(a.X, x)  # left as it is
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        src = find_expression_source(a, unsafe_force=True)
    assert "UNSAFE" in caplog.text
    assert (src.kind, src.where) == ("log1p", "X")
    assert src.matrix is a.X


def test_expression_source_kinds(counts):
    a = adata_of(log1p_norm(counts, 1e4))
    src = find_expression_source(a)
    assert (src.kind, src.where, src.status.x_state) == ("log1p", "X", "log1p_10k")
    assert src.matrix is a.X
    a.layers["counts"] = counts
    src = find_expression_source(a)
    assert (src.kind, src.where) == ("counts", "layers['counts']")
    assert src.matrix is a.layers["counts"]
    assert list(src.var_names) == list(a.var_names)


def test_scanpy_layout_log1p_in_raw_and_scaled_subset_in_x(counts):
    """sc.pp.log1p, adata.raw = adata, a gene subset, sc.pp.scale: the log1p data in raw.X are used, as CellTypist does."""
    a = adata_of(log1p_norm(counts, 1e4))
    a.raw = a
    a = a[:, :60].copy()
    sc.pp.scale(a)
    status = scx.pp.normalization_status(a)
    assert status.x_state == "negative" and status.raw_source is None and status.is_usable
    src = find_expression_source(a)
    assert (src.kind, src.where) == ("log1p", "raw.X") and src.matrix is a.raw.X and len(src.var_names) == 120
    out = scx.pp.ensure_normalized(a, copy=True)
    np.testing.assert_allclose(np.asarray(out.X), log1p_norm(counts, 1e4)[:, :60], rtol=1e-6)
    assert a.X.min() < 0  # copy=True left the scaled X alone
    a.raw = ad.AnnData(log1p_norm(counts, 1e6), var=a.raw.var)  # log1p of CPM in raw: not usable as it is
    assert not scx.pp.normalization_status(a).is_usable
    with pytest.raises(ValueError, match="No usable expression matrix"):
        find_expression_source(a)


def test_uns_round_trip(tmp_path, counts):
    a = adata_of(sparse.csr_matrix(counts))
    scx.pp.ensure_normalized(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert "log1p" in b.uns
    status = scx.pp.normalization_status(b)
    assert status.has_log1p_uns and status.raw_source == "layers['counts']" and status.x_state == "log1p_10k"


def test_spatialdata_table(counts):
    import spatialdata as sd

    sdata = sd.SpatialData(tables={"cells": adata_of(counts.copy())})
    status = scx.pp.normalization_status(sdata, table_key="cells")
    assert (status.raw_source, status.x_state) == ("X", "raw")
    scx.pp.ensure_normalized(sdata, table_key="cells")
    table = sdata.tables["cells"]
    np.testing.assert_array_equal(table.layers["counts"], counts)
    assert scx.pp.normalization_status(sdata, table_key="cells").x_state == "log1p_10k"


# --------------------------------------------------------------------------------------------------------------------
# real data


@pytest.mark.parametrize(
    "parts",
    [
        ("starmap_mpfc", "starmap_mpfc.h5ad"),
        ("hypothalamus_merfish_pair", "reference_scrna.h5ad"),
        ("hypothalamus_merfish_pair", "merfish_query.h5ad"),
    ],
)
def test_real_counts_detected_as_raw(shared_data, parts):
    path = shared_data(*parts)
    backed = ad.read_h5ad(path, backed="r")
    try:
        status = scx.pp.normalization_status(backed)
    finally:
        backed.file.close()
    assert (status.raw_source, status.x_state, status.is_usable) == ("X", "raw", True)
    assert status.stats["checked"]["X"]["integer_fraction"] == 1.0


def test_real_ensure_normalized(shared_data, tmp_path):
    path = tmp_path / "starmap.h5ad"
    shutil.copy(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"), path)
    a = ad.read_h5ad(path)
    original = a.X.copy()
    scx.pp.ensure_normalized(a)
    assert sparse.issparse(a.X)
    assert (a.layers["counts"] != original).nnz == 0
    status = scx.pp.normalization_status(a)
    assert (status.raw_source, status.x_state) == ("layers['counts']", "log1p_10k")
    nonempty = np.asarray(original.sum(axis=1)).ravel() > 0
    np.testing.assert_allclose(np.asarray(np.expm1(a.X).sum(axis=1)).ravel()[nonempty], 1e4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["dense", "dask"])  # scipy.sparse has no float16
def test_ensure_normalized_float16_counts_do_not_overflow(counts, fmt):
    """float16 holds at most 65,504: cell totals above it, and CPM values, must not become inf (X all zero / NaN)."""
    import dask.array as da

    c = counts[:200].copy()
    c[0] = 600  # a cell with 72,000 counts, common in scRNA-seq
    half = c.astype(np.float16)
    to = {"dense": lambda m: m, "dask": lambda m: da.from_array(m, chunks=(50, -1))}[fmt]
    for target in (1e4, 1e6):
        a = adata_of(to(half.copy()))
        scx.pp.ensure_normalized(a, target_sum=target)
        x = a.X.compute() if hasattr(a.X, "compute") else a.X
        x = x.toarray() if sparse.issparse(x) else np.asarray(x)
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x, log1p_norm(c, target), rtol=1e-5, atol=1e-5)
        assert a.layers["counts"].dtype == np.float16  # the counts are kept as they were


def test_ensure_normalized_corrects_a_wrong_log_base_in_uns(counts, caplog):
    """X verified natural log1p(10k) but uns['log1p'] says base 2: scanpy would undo the log with 2**x - 1."""
    a = adata_of(log1p_norm(counts, 1e4))
    a.uns["log1p"] = {"base": 2}
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.ensure_normalized(a)
    assert a.uns["log1p"] == {"base": None}
    assert "base=2" in caplog.text
    b = adata_of(counts.copy())
    b.uns["log1p"] = {"base": 10}
    scx.pp.ensure_normalized(b)  # from the counts
    assert b.uns["log1p"] == {"base": None}


def test_error_for_a_gene_subset_or_another_log_base_says_so(counts):
    """log1p(10k) subset to a few genes, or log2 data marked in uns['log1p']: the message names the likely cause."""
    subset = adata_of(log1p_norm(counts, 1e4)[:, :20])
    with pytest.raises(ValueError, match="gene subset"):
        scx.pp.ensure_normalized(subset)
    log2 = ad.AnnData(counts.copy())
    sc.pp.normalize_total(log2, target_sum=1e4)
    sc.pp.log1p(log2, base=2)
    with pytest.raises(ValueError, match=r"uns\['log1p'\] says base=2"):
        scx.pp.ensure_normalized(log2)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "dask"])
def test_ensure_normalized_never_overwrites_other_counts_in_x(counts, fmt):
    """X holds ambient-corrected integer counts, layers['counts'] the original ones: X's counts must not be lost."""
    import dask.array as da

    rng = np.random.default_rng(1)
    corrected = np.maximum(counts - rng.binomial(1, 0.3, counts.shape), 0).astype(np.float32)
    to = {
        "dense": np.asarray,
        "csr": sparse.csr_matrix,
        "csc": sparse.csc_matrix,
        "dask": lambda m: da.from_array(m, chunks=(500, -1)),
    }[fmt]
    a = adata_of(to(corrected.copy()))
    a.layers["counts"] = counts.copy()
    before = a.X
    with pytest.raises(ValueError, match=r"X holds raw counts of its own that differ from .* layers\['counts'\]") as e:
        scx.pp.ensure_normalized(a)
    assert "adata.layers['counts_x'] = adata.X.copy()" in str(e.value)
    assert a.X is before and list(a.layers) == ["counts"] and "log1p" not in a.uns  # nothing changed
    # the same counts (float32 rounding aside) in both: normalized as before
    same = adata_of(to(np.expm1(np.log1p(counts)).astype(np.float32)))
    same.layers["counts"] = counts.copy()
    scx.pp.ensure_normalized(same)
    x = same.X  # made from layers["counts"]
    np.testing.assert_allclose(x.toarray() if sparse.issparse(x) else x, log1p_norm(counts, 1e4), rtol=1e-5, atol=1e-5)


def test_ensure_normalized_never_overwrites_other_counts_in_x_subset_of_raw(counts):
    """X a gene subset of raw: compared with raw.X on X's genes only."""
    raw = adata_of(counts.copy())
    a = raw[:, 10:50].copy()
    a.raw = raw
    scx.pp.ensure_normalized(a.copy())  # same counts: fine
    a.X[3, 2] += 1
    with pytest.raises(ValueError, match=r"differ from the raw counts in raw.X \(e.g. cell '3', gene 'g12'") as e:
        scx.pp.ensure_normalized(a)
    assert "adata.raw = None" in str(e.value)
    assert "counts" not in a.layers


def test_log1p_of_scanpys_default_normalize_total_is_rescaled_exactly():
    """sc.pp.normalize_total without target_sum scales every cell to the median total (here a few hundred), then
    sc.pp.log1p: without the counts, this was refused as "log1p_other"; every cell has the same total, so it is
    rescaled exactly to log1p(10k). A gene subset of it (no constant totals) is still refused."""
    counts = sparse.csr_matrix(make_counts(seed=3).astype(np.float32))
    want = ad.AnnData(counts.copy())
    sc.pp.normalize_total(want, target_sum=1e4)
    sc.pp.log1p(want)
    adata = ad.AnnData(counts.copy())
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    status = scx.pp.normalization_status(adata)
    assert status.x_state == "log1p_other" and not status.is_usable
    assert "ensure_normalized rescales it exactly" in status.stats["checked"]["X"]["reason"]
    with pytest.raises(ValueError, match=r"X is log1p of counts normalized to [\d,.]+ per cell .*rescales it exactly"):
        scx.tl.predict(adata, _tiny_model(adata.var_names))
    scx.pp.ensure_normalized(adata)  # before: ValueError "No usable expression matrix"
    np.testing.assert_allclose(adata.X.toarray(), want.X.toarray(), rtol=1e-5, atol=1e-5)
    assert scx.pp.normalization_status(adata).x_state == "log1p_10k"
    # scanpy's layout: the log1p data frozen in raw, X scaled
    frozen = ad.AnnData(counts.copy())
    sc.pp.normalize_total(frozen)
    sc.pp.log1p(frozen)
    frozen.raw = frozen
    sc.pp.scale(frozen)
    scx.pp.ensure_normalized(frozen)
    np.testing.assert_allclose(np.asarray(frozen.X.todense()), want.X.toarray(), rtol=1e-5, atol=1e-5)
    subset = ad.AnnData(counts.copy())
    sc.pp.normalize_total(subset)
    sc.pp.log1p(subset)
    subset = subset[:, :40].copy()  # highly variable genes, say: the totals are no longer constant
    with pytest.raises(ValueError, match="No usable expression matrix"):
        scx.pp.ensure_normalized(subset)


def _tiny_model(genes):
    from spatialcx.model._model import CellTypeModel

    genes = [str(g) for g in genes]
    k = len(genes)
    return CellTypeModel(genes, ["a", "b"], np.zeros((2, k)), [0.0, 0.0], np.zeros(k), np.ones(k))
