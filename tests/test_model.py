"""CellTypeModel: exact scoring against CellTypist, training, save/load, CellTypist interop."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import spatialcx as scx
from spatialcx.model._train import fit_model

logging.getLogger("celltypist").setLevel(logging.ERROR)


def _counts(n=1500, g=120, k=4, seed=0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    mu = rng.gamma(0.6, 1.5, (k, g))
    x = rng.poisson(mu[lab] * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    a = ad.AnnData(sparse.csr_matrix(x), obs=pd.DataFrame({"label": [f"type {i}" for i in lab]}))
    a.obs_names = [f"cell{i}" for i in range(n)]
    a.var_names = [f"G{i}" for i in range(g)]
    return a


def _lognorm(a):
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def _celltypist_scores(adata, model):
    import celltypist

    res = celltypist.annotate(adata.copy(), model=model)
    return res.decision_matrix.to_numpy(), res.predicted_labels["predicted_labels"].astype(str).to_numpy()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_scores_equal_celltypist_for_exported_model(n_classes):
    ref = _lognorm(_counts(k=n_classes))
    model = fit_model(ref.X, ref.obs["label"], ref.var_names, method="logreg")
    query = _lognorm(_counts(n=400, k=n_classes, seed=1))[:, 15:]  # 15 model genes missing from the query
    theirs, their_labels = _celltypist_scores(query, model.to_celltypist())
    ours = model.decision_function(query.X, query.var_names)
    assert ours.shape == (400, n_classes)
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()
    assert (model.classes[ours.argmax(1)] == their_labels).all()


def test_celltypist_sgd_model_imported_scores_exactly():
    import celltypist

    ref = _lognorm(_counts())
    ct_model = celltypist.train(ref, labels="label", use_SGD=True, check_expression=False)
    model = scx.CellTypeModel.from_celltypist(ct_model)
    assert model.normalize_over == "all"
    query = _lognorm(_counts(n=300, seed=2))
    theirs, their_labels = _celltypist_scores(query, ct_model)
    # through the public predict on the same normalized input
    scx.tl.predict(query, model)
    ours = query.obsm["cell_type_decision_scores"]
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()
    assert (query.obs["cell_type_predicted"].astype(str).to_numpy() == their_labels).all()
    assert query.uns["cell_type"]["classes"] == model.classes.tolist()


def test_genes_in_few_training_cells_are_named(caplog):
    """A gene expressed in 1 of 1,308 reference cells (a macrophage) made a whole cortex query "macrophage" with high
    confidence: its spread is tiny, so every query cell expressing it sat at the clip. Training names such genes."""
    rng = np.random.default_rng(5)
    x = rng.poisson(2.0, (400, 12)).astype(np.float64)
    x[:, 3] = 0
    x[[7, 9], 3] = 4.0  # g3: in 2 cells only
    x[:, 8] = 0
    x[:5, 8] = 1.0  # g8: in 5 cells
    y = rng.choice(["a", "b"], 400)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        model = fit_model(sparse.csr_matrix(x), y, [f"g{i}" for i in range(12)], method="logreg")
    assert "2 gene(s) are expressed in fewer than 10 of the 400 training cells (e.g. g3 (2), g8 (5))" in caplog.text
    assert model.description["genes_in_few_cells"] == {"genes": ["g3", "g8"], "n_cells": [2, 5]}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        common = fit_model(sparse.csr_matrix(rng.poisson(2.0, (400, 12))), y, [f"g{i}" for i in range(12)])
    assert "fewer than 10" not in caplog.text and "genes_in_few_cells" not in common.description


def test_sparse_scoring_handles_values_above_clip_and_zero_variance_genes():
    rng = np.random.default_rng(3)
    x = sparse.random(300, 30, density=0.2, random_state=4, format="csr", dtype=np.float64) * 8
    x = x.tocsr()
    x[:, 5] = 0  # a gene never expressed
    x = sparse.csr_matrix(x)
    y = rng.choice(["a", "b", "c"], 300)
    model = fit_model(x, y, [f"g{i}" for i in range(30)], method="logreg")
    # a dense reference computation of CellTypist's formula
    genes = model.features
    cols = [int(g[1:]) for g in genes]
    dense = x[:, cols].toarray()
    z = np.minimum((dense - model.scaler_mean) / model.scaler_scale, 10)
    expected = z @ model.coef.T + model.intercept
    ours = model.decision_function(x[:, cols] * 50, genes)  # huge values: many clipped
    z50 = np.minimum((dense * 50 - model.scaler_mean) / model.scaler_scale, 10)
    assert (z50 == 10).any()
    np.testing.assert_allclose(ours, z50 @ model.coef.T + model.intercept, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.decision_function(x[:, cols], genes), expected, rtol=1e-10, atol=1e-10)
    assert "g5" not in set(genes)  # not expressed in training -> dropped, as in CellTypist


def test_training_is_seeded_and_methods_work():
    ref = _lognorm(_counts(n=2500))
    m1 = fit_model(ref.X, ref.obs["label"], ref.var_names, method="minibatch", epochs=2, random_state=1)
    m2 = fit_model(ref.X, ref.obs["label"], ref.var_names, method="minibatch", epochs=2, random_state=1)
    m3 = fit_model(ref.X, ref.obs["label"], ref.var_names, method="minibatch", epochs=2, random_state=2)
    assert m1.model_hash == m2.model_hash
    assert m1.model_hash != m3.model_hash
    for method in ("logreg", "sgd", "minibatch"):
        m = fit_model(ref.X, ref.obs["label"], ref.var_names, method=method, epochs=3)
        acc = (m.classes[m.decision_function(ref.X, ref.var_names).argmax(1)] == ref.obs["label"].to_numpy()).mean()
        assert acc > 0.9, method


def test_save_load_roundtrip_and_no_pickle(tmp_path):
    ref = _lognorm(_counts())
    model = fit_model(ref.X, ref.obs["label"], ref.var_names, description={"note": "x", "nested": {"a": [1, 2]}})
    path = model.save(tmp_path / "m.npz")
    back = scx.CellTypeModel.load(path)
    assert back.model_hash == model.model_hash
    assert back.description["nested"] == {"a": [1, 2]}
    np.testing.assert_array_equal(back.coef, model.coef)
    # the archive holds no object arrays: loading never unpickles
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    # a tampered file is detected
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["coef"] = arrays["coef"] + 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="corrupted"):
        scx.CellTypeModel.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="pickle"):
        scx.CellTypeModel.load(tmp_path / "model.pkl")


def test_load_finds_the_file_save_wrote_under_the_name_given(tmp_path):
    ref = _lognorm(_counts())
    model = fit_model(ref.X, ref.obs["label"], ref.var_names)
    assert model.save(tmp_path / "panel_model") == tmp_path / "panel_model.npz"
    # before: FileNotFoundError for the name given to save()
    assert scx.CellTypeModel.load(tmp_path / "panel_model").model_hash == model.model_hash
    assert scx.CellTypeModel.load(str(tmp_path / "panel_model.npz")).model_hash == model.model_hash
    with pytest.raises(FileNotFoundError, match="other_model"):
        scx.CellTypeModel.load(tmp_path / "other_model")


def test_save_and_load_take_suffixes_in_any_case(tmp_path):
    ref = _lognorm(_counts())
    model = fit_model(ref.X, ref.obs["label"], ref.var_names)
    # before: save("model.NPZ") wrote model.NPZ.npz, and load("model.PKL") tried to read a pickle as an archive
    assert model.save(tmp_path / "model.NPZ") == tmp_path / "model.NPZ"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.NPZ"]
    assert scx.CellTypeModel.load(tmp_path / "model.NPZ").model_hash == model.model_hash
    with pytest.raises(ValueError, match="pickle"):
        scx.CellTypeModel.load(tmp_path / "model.PKL")


def test_from_celltypist_path_requires_trust(tmp_path):
    ref = _lognorm(_counts())
    model = fit_model(ref.X, ref.obs["label"], ref.var_names)
    ct = model.to_celltypist()
    path = tmp_path / "model.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"Model": ct.classifier, "Scaler_": ct.scaler, "description": ct.description}, fh)
    with pytest.raises(ValueError, match="trust_pickle"):
        scx.CellTypeModel.from_celltypist(path)
    back = scx.CellTypeModel.from_celltypist(path, trust_pickle=True)
    np.testing.assert_allclose(back.coef, model.coef)
    assert list(back.classes) == list(model.classes)


def test_model_validation_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        scx.CellTypeModel(["a"], ["x"], np.zeros((1, 1)), [0.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="shape"):
        scx.CellTypeModel(["a", "b"], ["x", "y"], np.zeros((2, 3)), [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="single cell type"):
        fit_model(sparse.csr_matrix(np.ones((5, 3))), ["a"] * 5, ["g1", "g2", "g3"])


def test_saving_through_a_symlink_replaces_its_target(tmp_path):
    """A model saved to a symbolic link (e.g. models/current.npz) updates the file it points to; the link stays."""
    ref = _lognorm(_counts(n=200))
    model = fit_model(ref.X, ref.obs["label"], ref.var_names)
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "v1.npz"
    real.write_bytes(b"old")
    link = tmp_path / "current.npz"
    link.symlink_to(real)
    assert model.save(link) == link
    assert link.is_symlink() and link.resolve() == real
    assert scx.CellTypeModel.load(real).model_hash == model.model_hash
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["v1.npz"]  # no temporary file left


def test_saved_files_get_default_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files must be readable as any new file is."""
    import os

    import matplotlib.pyplot as plt

    from spatialcx.pl._utils import save_figure

    umask = os.umask(0o022)
    try:
        ref = _lognorm(_counts(n=200))
        path = fit_model(ref.X, ref.obs["label"], ref.var_names).save(tmp_path / "m.npz")
        fig = plt.figure()
        png = save_figure(fig, tmp_path / "f.png")
        plt.close(fig)
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct(png.stat().st_mode & 0o777) == oct(0o644)


def _small_model():
    return scx.CellTypeModel(
        features=["G1", "G2", "G3"],
        classes=["a", "b"],
        coef=[[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]],
        intercept=[0.1, -0.1],
        scaler_mean=[0.5, 0.2, 0.1],
        scaler_scale=[1.0, 2.0, 0.5],
    )


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to reach the network (celltypist's model index or a raw socket)."""
    import socket

    import celltypist.models

    def refuse(*args, **kwargs):
        pytest.fail(f"network access attempted: {args!r}")

    for name in ("get_all_models", "get_models_index", "download_models", "download_model_index", "_requests_get"):
        monkeypatch.setattr(celltypist.models, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("relative", ["ct.pkl", "./ct.pkl", "sub/ct.pkl", "PATH"])
def test_from_celltypist_relative_path_is_loaded_locally(tmp_path, monkeypatch, no_network, relative):
    from pathlib import Path

    model = _small_model()
    (tmp_path / "sub").mkdir()
    target = "ct.pkl" if relative == "PATH" else relative
    model.to_celltypist().write(str(tmp_path / target))
    monkeypatch.chdir(tmp_path)
    back = scx.CellTypeModel.from_celltypist(Path(target) if relative == "PATH" else relative, trust_pickle=True)
    np.testing.assert_array_equal(back.coef, model.coef)
    assert list(back.features) == list(model.features)


def test_from_celltypist_bad_path_or_type(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        scx.CellTypeModel.from_celltypist("missing.pkl", trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="Immune_All_Low.pkl"):  # a model name, not a file: never downloaded
        scx.CellTypeModel.from_celltypist("Immune_All_Low.pkl", trust_pickle=True)
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.pkl is not a readable CellTypist model"):
        scx.CellTypeModel.from_celltypist("bad.pkl", trust_pickle=True)
    with pytest.raises(TypeError, match=r"celltypist.models.Model.*got int"):
        scx.CellTypeModel.from_celltypist(5)
    with pytest.raises(TypeError, match="got dict"):
        scx.CellTypeModel.from_celltypist({"classifier": 1}, trust_pickle=True)


def _corrupt(kind: str, path, tmp_path):
    """Write a damaged model file next to the good one at ``path``; returns its path."""
    import json
    import struct
    import zipfile

    raw = path.read_bytes()
    out = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        out.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        out.write_bytes(b"")
    elif kind == "flipped_byte":
        with zipfile.ZipFile(path) as zf:
            offset = zf.getinfo("coef.npy").header_offset
        name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])  # the local file header's
        start = offset + 30 + name_len + extra_len  # first byte of the deflate stream
        data = bytearray(raw)
        data[start] ^= 0xFF
        out.write_bytes(bytes(data))
    elif kind == "npy":
        out = tmp_path / "model.npy"
        np.save(out, np.zeros(3))
    elif kind == "meta_list":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["meta"] = np.array(json.dumps([1, 2]))
        np.savez(out, **arrays)
    elif kind == "no_hash":  # the hash taken out: the weights could no longer be verified
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays["meta"]))
        del meta["model_hash"]
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(out, **arrays)
    elif kind == "missing_array":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "coef"}
        np.savez(out, **arrays)
    elif kind == "garbage":
        out.write_bytes(b"this is not a model at all\n" * 10)
    elif kind == "huge_header":  # an array header that claims 10^7 x 10^7 float64 (800 TB)
        import io

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)})
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, header.getvalue() if name == "coef.npy" else src.read(name))
    return out


@pytest.mark.parametrize(
    "kind",
    ["truncated", "empty", "flipped_byte", "npy", "meta_list", "no_hash", "missing_array", "garbage", "huge_header"],
)
def test_load_corrupted_file_raises_one_clear_error(tmp_path, kind):
    good = _small_model().save(tmp_path / "good.npz")
    bad = _corrupt(kind, good, tmp_path)
    with pytest.raises(ValueError, match=r"is not a valid spatialcx model file \(truncated or corrupted\?\)") as info:
        scx.CellTypeModel.load(bad)
    assert str(bad) in str(info.value) and "model.save" in str(info.value)
    if kind in ("truncated", "flipped_byte"):  # errors of the zip / zlib layers are chained, not swallowed
        assert info.value.__cause__ is not None


def test_load_missing_file_and_pickle_content(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        scx.CellTypeModel.load(tmp_path / "nope.npz")
    ct = _small_model().to_celltypist()
    ct.write(str(tmp_path / "ct.pkl"))
    (tmp_path / "ct.pkl").rename(tmp_path / "ct.npz")  # a CellTypist pickle under a .npz name: never unpickled
    with pytest.raises(ValueError, match="from_celltypist"):
        scx.CellTypeModel.load(tmp_path / "ct.npz")


# ---------------------------------------------------------------- model_hash stability


def test_model_hash_is_pinned():
    """Saved models verify their hash on load: the hash of an existing model must never change."""
    assert _small_model().model_hash == "249ab194bd7abb20258df48fbbcfa2f50d86f0cded96124a69feb6aacecaa69b"
    calibrated = dataclasses.replace(
        _small_model(),
        features=["G1", "Gène ☃", "G3"],
        classes=["a", "b µ"],
        calibration={"negative_median": [-1.5, -2.25], "softmax_temperature": 0.5},
    )
    assert calibrated.model_hash == "161e1bb732f7071b182826a1b10e5406cc0c8057c220c833c5491f078982876a"


def test_model_hash_of_names_with_lone_surrogates():
    """Names decoded with "surrogateescape" (undecodable bytes) hash, distinctly from their decoded look-alikes."""
    import dataclasses

    model = _small_model()
    bad_gene = dataclasses.replace(model, features=["bad\udce9", "G2", "G3"])
    bad_class = dataclasses.replace(model, classes=["a", "b\udce9"])
    good = dataclasses.replace(model, features=["bad\xe9", "G2", "G3"])
    hashes = {m.model_hash for m in (model, bad_gene, bad_class, good)}
    assert len(hashes) == 4 and all(len(h) == 64 for h in hashes)
    back = scx.CellTypeModel.from_celltypist(bad_gene.to_celltypist())
    assert back.model_hash == bad_gene.model_hash and back.features[0] == "bad\udce9"


# ---------------------------------------------------------------- to_celltypist / from_celltypist round trip


def _panel_model():
    """A model trained by scx.tl.train on 40 panel genes (normalize_over="genes", with a calibration)."""
    return scx.tl.train(_counts(n=800, g=60), "label", genes=[f"G{i}" for i in range(40)])


@pytest.mark.parametrize("through", ["object", "file"])
def test_celltypist_roundtrip_restores_spatialcx_model(tmp_path, caplog, through):
    import json

    from celltypist.models import Model

    model = _panel_model()
    assert model.normalize_over == "genes" and model.calibration is not None
    ct = model.to_celltypist()
    record = ct.description["spatialcx"]
    json.dumps(record, allow_nan=False)  # plain JSON values
    assert record["model_hash"] == model.model_hash
    if through == "file":
        ct.write(str(tmp_path / "ct.pkl"))
        ct = Model.load(str(tmp_path / "ct.pkl"))
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        back = scx.CellTypeModel.from_celltypist(ct)
    assert "no longer match" not in caplog.text
    assert back.model_hash == model.model_hash
    assert back.calibration == model.calibration
    assert back.description == model.description
    assert (back.normalize_over, back.clip, back.target_sum) == (model.normalize_over, model.clip, model.target_sum)
    # a query with genes the model lacks: normalization over the model's genes differs from over all genes
    query = _counts(n=300, g=60, seed=1)
    ours = scx.tl.predict(query, model, copy=True)
    theirs = scx.tl.predict(query, back, copy=True)
    np.testing.assert_array_equal(theirs.obsm["cell_type_decision_scores"], ours.obsm["cell_type_decision_scores"])
    np.testing.assert_array_equal(theirs.obs["cell_type_confidence"], ours.obs["cell_type_confidence"])
    assert (theirs.obs["cell_type_predicted"] == ours.obs["cell_type_predicted"]).all()
    # without the record (the former import), the scores differ
    del ct.description["spatialcx"]
    plain = scx.tl.predict(query, scx.CellTypeModel.from_celltypist(ct), copy=True)
    assert not np.allclose(plain.obsm["cell_type_decision_scores"], ours.obsm["cell_type_decision_scores"])


def test_celltypist_roundtrip_keeps_clip_and_target_sum():
    import dataclasses

    ref = _lognorm(_counts(n=400))
    model = fit_model(ref.X, ref.obs["label"], ref.var_names, clip=3.0)
    model = dataclasses.replace(model, normalize_over="all", target_sum=1e6)
    back = scx.CellTypeModel.from_celltypist(model.to_celltypist())
    assert (back.clip, back.normalize_over, back.target_sum) == (3.0, "all", 1e6)
    assert back.model_hash == model.model_hash
    np.testing.assert_array_equal(
        back.decision_function(ref.X * 3, ref.var_names), model.decision_function(ref.X * 3, ref.var_names)
    )


def test_edited_celltypist_export_is_imported_as_plain_celltypist(caplog):
    model = _panel_model()
    ct = model.to_celltypist()
    ct.subset(keep_cell_types=list(model.classes[:3]))  # celltypist's own edit: the weights no longer match
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        back = scx.CellTypeModel.from_celltypist(ct)
    assert "no longer match the model it was exported from" in caplog.text
    assert (back.normalize_over, back.clip, back.calibration) == ("all", 10.0, None)
    assert back.description["imported_from"] == "celltypist" and "spatialcx" not in back.description
    assert list(back.classes) == list(model.classes[:3])
    # a record that is not the one to_celltypist writes
    caplog.clear()
    ct = model.to_celltypist()
    ct.description["spatialcx"] = {"model_hash": ct.description["spatialcx"]["model_hash"], "clip": "x"}
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        back = scx.CellTypeModel.from_celltypist(ct)
    assert "no longer match the model it was exported from" in caplog.text and "KeyError" in caplog.text
    assert back.normalize_over == "all" and back.calibration is None
    caplog.clear()
    ct.description["spatialcx"] = "junk"
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        back = scx.CellTypeModel.from_celltypist(ct)
    assert "is not the record written by CellTypeModel.to_celltypist" in caplog.text
    assert back.normalize_over == "all" and "spatialcx" not in back.description


def test_genuine_celltypist_model_imports_as_before(tmp_path, caplog):
    import celltypist
    from celltypist.models import Model

    ref = _lognorm(_counts(n=400, g=40))
    ct_model = celltypist.train(ref, labels="label", use_SGD=True, check_expression=False)
    ct_model.write(str(tmp_path / "ct.pkl"))
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        for m in (ct_model, Model.load(str(tmp_path / "ct.pkl"))):
            model = scx.CellTypeModel.from_celltypist(m)
            assert (model.normalize_over, model.clip, model.target_sum, model.calibration) == ("all", 10.0, 1e4, None)
            assert model.description["imported_from"] == "celltypist"
            assert set(ct_model.description) <= set(model.description)
    assert caplog.text == ""


# ---------------------------------------------------------------- to_celltypist warnings


def test_to_celltypist_warns_when_celltypist_scores_differently(caplog):
    import dataclasses

    def warnings_of(model):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spatialcx"):
            ct = model.to_celltypist()
        assert "spatialcx" in ct.description  # exported anyway
        return caplog.text

    model = dataclasses.replace(_small_model(), normalize_over="all")
    assert warnings_of(model) == ""
    text = warnings_of(dataclasses.replace(model, clip=5.0))
    assert "clips scaled values at 5.0, CellTypist at 10" in text and "normalize_over" not in text
    text = warnings_of(dataclasses.replace(model, normalize_over="genes"))
    assert "normalize_over='genes'" in text and "subset the query's raw counts to the model's genes" in text
    assert "clips" not in text
    assert "expects queries normalized to 1e+06 counts" in warnings_of(dataclasses.replace(model, target_sum=1e6))


def test_celltypist_scores_exported_models_as_the_warnings_say():
    """clip != 10: CellTypist scores differently; normalize_over="genes": equal on a query normalized as advised."""
    ref = _lognorm(_counts(n=600))
    clipped = fit_model(ref.X, ref.obs["label"], ref.var_names, clip=1.0)
    query = _lognorm(_counts(n=200, seed=1))
    theirs, _ = _celltypist_scores(query, clipped.to_celltypist())
    assert not np.allclose(clipped.decision_function(query.X, query.var_names), theirs)

    model = _panel_model()
    raw = _counts(n=200, g=60, seed=1)
    ours = scx.tl.predict(raw, model, copy=True).obsm["cell_type_decision_scores"]
    advised = _lognorm(raw[:, raw.var_names.isin(model.features)])  # counts over the model's genes, to 10,000
    theirs, _ = _celltypist_scores(advised, model.to_celltypist())
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()


def test_integer_clip_and_target_sum_save_and_load(tmp_path):
    """clip=10 (an int) is kept as 10.0, so the saved hash is the one load computes."""
    rng = np.random.default_rng(0)
    m = scx.CellTypeModel(
        features=["a", "b", "c"],
        classes=["x", "y"],
        coef=rng.normal(size=(2, 3)),
        intercept=[0.1, -0.1],
        scaler_mean=[0, 0, 0],
        scaler_scale=[1, 1, 1],
        clip=10,
        target_sum=10_000,
    )
    assert isinstance(m.clip, float) and isinstance(m.target_sum, float)
    back = scx.CellTypeModel.load(m.save(tmp_path / "int_clip"))
    assert back.model_hash == m.model_hash and back.clip == 10.0


def _tiny_model(**kwargs):
    rng = np.random.default_rng(0)
    args = {
        "features": ["a", "b", "c"],
        "classes": ["x", "y"],
        "coef": rng.normal(size=(2, 3)),
        "intercept": [0.1, -0.1],
        "scaler_mean": [0.5, 0.2, 0.1],
        "scaler_scale": [1.0, 2.0, 0.5],
    }
    return scx.CellTypeModel(**{**args, **kwargs})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("scaler_mean", [np.nan, 0.0, 0.0], "scaler_mean"),
        ("scaler_mean", [np.inf, 0.0, 0.0], "scaler_mean"),
        ("scaler_scale", [np.nan, 1.0, 1.0], "scaler_scale"),
        ("scaler_scale", [np.inf, 1.0, 1.0], "scaler_scale"),
        ("clip", np.nan, "clip"),
        ("target_sum", 0, "target_sum"),
        ("target_sum", -1e4, "target_sum"),
        ("target_sum", np.nan, "target_sum"),
        ("target_sum", np.inf, "target_sum"),
    ],
)
def test_model_refuses_settings_that_cannot_score(field, value, match):
    """A NaN scaler (NaN scales passed the 'positive' check) or target sum made every score NaN, found only later."""
    with pytest.raises(ValueError, match=match):
        _tiny_model(**{field: value})


def test_model_description_is_a_dict():
    """None is an empty description; anything else but a mapping is refused (predict crashed on it later)."""
    assert _tiny_model(description=None).description == {}
    from types import MappingProxyType

    assert _tiny_model(description=MappingProxyType({"a": 1})).description == {"a": 1}
    with pytest.raises(TypeError, match="description must be a dict"):
        _tiny_model(description=["a list"])
    with pytest.raises(TypeError, match="description must be a dict"):
        _tiny_model(description="text")


def _rewrite_meta(path, out, change):
    import json

    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    change(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.__setitem__("description", ["x"]), "description must be a dict"),
        (lambda m: m.__setitem__("description", "x"), "description must be a dict"),
        (lambda m: m.pop("format_version"), "format_version"),
        (lambda m: m.__setitem__("format_version", True), "format_version"),
        (lambda m: m.__setitem__("format_version", 0), "format_version"),
        (lambda m: m.__setitem__("format_version", "2"), "format_version"),
    ],
)
def test_load_refuses_tampered_metadata(tmp_path, change, match):
    """Metadata outside the hash (description, format_version) is checked too: one clear error, not a later crash."""
    path = _tiny_model().save(tmp_path / "m.npz")
    bad = _rewrite_meta(path, tmp_path / "bad.npz", change)
    with pytest.raises(ValueError, match=rf"not a valid spatialcx model file.*{match}"):
        scx.CellTypeModel.load(bad)


def test_load_keeps_a_missing_description_empty(tmp_path):
    path = _tiny_model(description={"a": 1}).save(tmp_path / "m.npz")
    back = scx.CellTypeModel.load(_rewrite_meta(path, tmp_path / "m2.npz", lambda m: m.pop("description")))
    assert back.description == {}


def test_minibatch_balance_cell_type_balances_what_is_trained_on(monkeypatch):
    """balance_cell_type draws cells inversely to their type's frequency, so a rare type is seen as often as others.

    It used to draw every cell once per epoch (without replacement), which only reordered the cells: each type was
    seen exactly as often as without balancing.
    """
    from sklearn.linear_model import SGDClassifier

    seen = []
    partial_fit = SGDClassifier.partial_fit

    def record(self, x, y, *args, **kwargs):
        seen.append(np.asarray(y))
        return partial_fit(self, x, y, *args, **kwargs)

    monkeypatch.setattr(SGDClassifier, "partial_fit", record)
    ref = _lognorm(_counts(n=2000, k=2))
    labels = ref.obs["label"].to_numpy().copy()
    labels[labels == "type 1"] = "type 0"
    labels[:40] = "rare"  # 2 % of the cells
    fit_model(ref.X, labels, ref.var_names, method="minibatch", epochs=2, batch_size=200, calibrate=False)
    plain = np.concatenate(seen)
    seen.clear()
    fit_model(
        ref.X,
        labels,
        ref.var_names,
        method="minibatch",
        epochs=2,
        batch_size=200,
        balance_cell_type=True,
        calibrate=False,
    )
    balanced = np.concatenate(seen)
    assert len(plain) == len(balanced) == 2 * 2000  # as many cells per epoch either way
    assert (plain == "rare").mean() == pytest.approx(0.02)
    assert (balanced == "rare").mean() == pytest.approx(1 / 2, abs=0.05)  # two types, half the draws each


def test_home_folder_paths_are_expanded(home_and_work):
    """``~`` in a path means the home folder for save, load and the CellTypist import, not a folder named ``~``."""
    home, work = home_and_work
    m = _tiny_model()
    written = m.save("~/models/tiny")
    assert written == home / "models" / "tiny.npz" and written.is_file()
    assert scx.CellTypeModel.load("~/models/tiny").model_hash == m.model_hash
    assert scx.CellTypeModel.load("~/models/tiny.npz").model_hash == m.model_hash
    m.to_celltypist().write(str(home / "ct.pkl"))
    imported = scx.CellTypeModel.from_celltypist("~/ct.pkl", trust_pickle=True)
    assert list(imported.classes) == ["x", "y"]
    assert list(work.iterdir()) == []  # no folder named "~" in the working folder


def test_ensembl_ids_match_across_versions():
    """A model of unversioned Ensembl ids scores a table whose ids carry versions (and the other way round)."""
    ids = ["ENSG00000141510", "ENSG00000012048", "ENSG00000139618"]
    m = _tiny_model(features=ids)
    present, cols = m.match_genes(["ENSG00000139618.17", "ENSG00000141510.16", "ENSG00000012048.23", "ENSG1.1"])
    assert present.tolist() == [0, 1, 2] and cols.tolist() == [1, 2, 0]
    versioned = _tiny_model(features=[f"{g}.5" for g in ids])
    assert versioned.match_genes(ids)[1].tolist() == [0, 1, 2]
    # exact names first; a version-free name held twice in the table is not guessed
    present, cols = m.match_genes(["ENSG00000141510", "ENSG00000012048.1", "ENSG00000012048.2", "ENSG00000139618.9"])
    assert present.tolist() == [0, 2] and cols.tolist() == [0, 3]
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(
        m.decision_function(x[:, [2, 0, 1]], genes=["ENSG00000139618.17", "ENSG00000141510.16", "ENSG00000012048.2"]),
        m.decision_function(x, genes=ids),
        rtol=1e-12,
    )


def test_decision_function_refuses_a_matrix_its_gene_names_do_not_describe():
    """A table wider than the model was scored on its first columns, whatever genes they held; now that is an error."""
    m = _tiny_model()
    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    with pytest.raises(ValueError, match="x has 5 columns but the model has 3 genes"):
        m.decision_function(x)  # used to return the scores of columns 0-2
    with pytest.raises(ValueError, match="x has 2 columns but the model has 3 genes"):
        m.decision_function(x[:, :2])  # used to raise IndexError
    with pytest.raises(ValueError, match="genes has 3 names but x has 5 columns"):
        m.decision_function(x, genes=["a", "b", "c"])
    with pytest.raises(ValueError, match="genes has 5 names but x has 3 columns"):
        m.decision_function(x[:, :3], genes=["c", "b", "a", "d", "e"])
    with pytest.raises(TypeError, match="not an AnnData"):
        m.decision_function(ad.AnnData(x))
    # what they should have been: the names given, column by column
    named = m.decision_function(x, genes=["e", "c", "a", "d", "b"])
    np.testing.assert_allclose(named, m.decision_function(x[:, [2, 4, 1]]), rtol=1e-12)
    np.testing.assert_allclose(m.decision_function(x[0, :3]), m.decision_function(x[:, :3]), rtol=0)  # one cell


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "minibatch", "epochs": 0}, "epochs must be a positive whole number"),
        ({"method": "minibatch", "batch_size": 0}, "batch_size must be a positive whole number"),
        ({"method": "auto", "batch_size": 2.5}, "batch_size must be a positive whole number"),
        ({"method": "lbfgs"}, "Unknown training method 'lbfgs'"),
        ({"clip": float("nan")}, "clip must be a number"),
        ({"method": "logreg", "max_iter": 0}, "max_iter must be a positive whole number"),  # sklearn: a warning only
        ({"method": "sgd", "max_iter": 0}, "max_iter must be a positive whole number"),
        ({"method": "minibatch", "balance_cell_type": "no"}, "balance_cell_type must be True or False"),
        ({"C": -1.0}, "C must be a positive number"),
        ({"method": "minibatch", "alpha": 0.0}, "alpha must be a positive finite number"),
        ({"method": "logreg", "alpha": float("nan")}, "alpha must be a non-negative finite number"),
        ({"n_jobs": 1.5}, "n_jobs must be None"),
        ({"random_state": -1}, "random_state must be a non-negative whole number"),
    ],
)
def test_fit_model_refuses_settings_that_cannot_train(monkeypatch, kwargs, match):
    """Such settings failed after the data were scaled, with AttributeError / 'range() arg 3' / sklearn's NaN error."""
    import spatialcx.model._train as train

    def no_scaling(*args, **kw):
        raise AssertionError("the data were scaled before the settings were checked")

    monkeypatch.setattr(train, "_scale_params", no_scaling)
    ref = _lognorm(_counts(n=200, g=20, k=3))
    with pytest.raises(ValueError, match=match):
        fit_model(ref.X, ref.obs["label"], ref.var_names, **kwargs)


@pytest.mark.parametrize("method", ["auto", "logreg", "sgd"])
def test_balance_cell_type_outside_minibatch_is_reported(caplog, method):
    """balance_cell_type only changes mini-batch training; asked for with another method it was ignored silently."""
    ref = _lognorm(_counts(n=300, g=20, k=3))
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fit_model(ref.X, ref.obs["label"], ref.var_names, method=method, balance_cell_type=True, calibrate=False)
    assert "balance_cell_type applies to method='minibatch' only" in caplog.text
    assert f"method={method!r}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fit_model(ref.X, ref.obs["label"], ref.var_names, method="minibatch", epochs=1, balance_cell_type=True)
        fit_model(ref.X, ref.obs["label"], ref.var_names, method=method, calibrate=False)
    assert "balance_cell_type" not in caplog.text


def test_duplicated_features_and_npz_given_to_from_celltypist_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"1 duplicated gene names \(e.g. \['a'\]\).*var_names_make_unique"):
        _tiny_model(features=["a", "b", "a"])
    path = _tiny_model().save(tmp_path / "m.npz")
    # was: "not a readable CellTypist model ... A load persistent id instruction was encountered" (the zip unpickled)
    with pytest.raises(ValueError, match=r"zip \(\.npz\) archive, not a CellTypist \.pkl.*CellTypeModel\.load"):
        scx.CellTypeModel.from_celltypist(path, trust_pickle=True)


def test_real_celltypist_model_scores_as_celltypist_annotate(shared_data, tmp_path):
    """A model trained by celltypist on a real scRNA-seq reference, imported as an object and from its .pkl, scores
    a real MERFISH query (genes reordered, some missing, an extra and a repeated non-model gene) as celltypist does."""
    import celltypist

    folder = shared_data("hypothalamus_merfish_pair")
    ref = _lognorm(ad.read_h5ad(folder / "reference_scrna.h5ad"))
    query = _lognorm(ad.read_h5ad(folder / "merfish_query.h5ad"))
    ct_model = celltypist.train(ref, labels="cell_type_author", use_SGD=True, max_iter=50, n_jobs=1)
    ct_model.write(str(tmp_path / "hyp.pkl"))
    cols = np.random.default_rng(0).permutation(query.n_vars)[:120]
    dense = query.X[:, cols].toarray()
    q = ad.AnnData(np.hstack([dense, np.ones((query.n_obs, 3))]), obs=query.obs[[]])
    q.var_names = [*query.var_names[cols], "extra", "dup", "dup"]
    res = celltypist.annotate(q.copy(), model=ct_model, majority_voting=False)
    theirs = res.decision_matrix.to_numpy()
    for source in (ct_model, tmp_path / "hyp.pkl"):
        model = scx.CellTypeModel.from_celltypist(source, trust_pickle=True)
        assert model.classes.tolist() == res.decision_matrix.columns.astype(str).tolist()
        ours = model.decision_function(q.X, q.var_names)
        assert np.abs(ours - theirs).max() <= 1e-9 * np.abs(theirs).max()
        assert (model.classes[ours.argmax(1)] == res.predicted_labels["predicted_labels"].astype(str)).all()


def test_description_with_numpy_or_tuple_keys_saves_and_exports(tmp_path):
    """``dict(zip(np.unique(y), counts))`` has np.int64 keys: save and to_celltypist raised json's TypeError on them."""
    labels, counts = np.unique(np.array([3, 1, 3]), return_counts=True)
    m = _tiny_model(
        description={"counts": dict(zip(labels, counts, strict=True)), ("a", "b"): [np.float32(1.5), (1, 2)]}
    )
    back = scx.CellTypeModel.load(m.save(tmp_path / "m.npz"))
    assert back.description == {"counts": {"1": 1, "3": 2}, "('a', 'b')": [1.5, [1, 2]]}
    assert back.model_hash == m.model_hash
    assert scx.CellTypeModel.from_celltypist(m.to_celltypist()).description == back.description


def test_duplicated_class_names_are_refused_when_the_model_is_made():
    """Classes that read alike as text (1 and "1") made a model that scored, then crashed ``predict`` with pandas'
    "Categorical categories must be unique" once the whole table was scored."""
    with pytest.raises(ValueError, match=r"classes contain 1 duplicated names \(e.g. \['1'\].*one row of coef"):
        scx.CellTypeModel(
            features=["G1", "G2"],
            classes=[1, "1", 2],
            coef=np.zeros((3, 2)),
            intercept=np.zeros(3),
            scaler_mean=np.zeros(2),
            scaler_scale=np.ones(2),
        )
