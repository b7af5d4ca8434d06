"""The ``spatialcx`` command on AnnData files and SpatialData stores: annotate, classify, errors."""

from __future__ import annotations

import hashlib
import shutil

import anndata as ad
import numpy as np
import pytest

import spatialcx as scx
from spatialcx.cli import main as cli_main


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo slide as a SpatialData store and as an .h5ad table, and its reference with two non-type labels."""
    root = tmp_path_factory.mktemp("cli")
    sdata, reference = scx.datasets.demo(n_cells=700, n_reference_cells=1500, random_state=0)
    labels = reference.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:40] = "Unstable"  # a reference's own word for cells that are not a type
    labels[40:80] = "Ambiguous"  # one of the package's default exclusions
    reference.obs["cell_type"] = labels
    reference.write_h5ad(root / "ref.h5ad")
    sdata.write(root / "slide.zarr")
    table = sdata.tables["table"].copy()
    table.write_h5ad(root / "slide.h5ad")
    table.write_zarr(root / "cells.zarr")  # an AnnData zarr store, not a SpatialData one
    del sdata.tables["table"]
    sdata.write(root / "no_table.zarr")
    return root


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_annotate_h5ad_to_out_then_in_place(demo_files, tmp_path, capsys):
    src = tmp_path / "slide.h5ad"
    src.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(src)
    ref = f"{demo_files / 'ref.h5ad'}::cell_type"
    rc = cli_main(["annotate", str(src), "-r", ref, "--exclude-label", "Unstable", "--out", str(tmp_path / "o.h5ad")])
    assert rc == 0
    assert "annotated 700 cells" in capsys.readouterr().out
    assert _digest(src) == before  # --out leaves the input as it was
    out = ad.read_h5ad(tmp_path / "o.h5ad")
    classes = out.uns["cell_type"]["classes"]
    assert "Unstable" not in classes and "Ambiguous" not in classes and len(classes) == 13
    assert "Unstable" in out.uns["cell_type"]["exclude_labels"] and "NA" in out.uns["cell_type"]["exclude_labels"]
    assert out.obs["cell_type_confidence"].between(0, 1).all()
    assert (out.obs["cell_type_predicted"].astype(str) == out.obs["true_cell_type"].astype(str)).mean() > 0.85

    rc = cli_main(["annotate", str(src), "-r", ref])  # in place, rewritten atomically
    assert rc == 0
    again = ad.read_h5ad(src)
    assert "cell_type_ontology_term_id" in again.obs
    np.testing.assert_array_equal(again.X.toarray(), ad.read_h5ad(demo_files / "slide.h5ad").X.toarray())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5ad", "slide.h5ad"]  # no temporary file left


def test_annotate_keep_label(demo_files, tmp_path, capsys):
    ref = f"{demo_files / 'ref.h5ad'}::cell_type"
    out_path = tmp_path / "o.h5ad"
    rc = cli_main(
        ["annotate", str(demo_files / "slide.h5ad"), "-r", ref, "--keep-label", "Ambiguous", "--out", str(out_path)]
    )
    assert rc == 0
    out = ad.read_h5ad(out_path)
    assert "Ambiguous" in out.uns["cell_type"]["classes"]
    assert "Ambiguous" not in out.uns["cell_type"]["exclude_labels"] and "NA" in out.uns["cell_type"]["exclude_labels"]

    rc = cli_main(
        ["annotate", str(demo_files / "slide.h5ad"), "-r", ref, "--keep-label", "Tcell", "--out", str(out_path)]
    )
    assert rc == 2
    assert "--keep-label 'Tcell' is not in the exclusion list" in capsys.readouterr().err


def test_annotate_key_added_and_read_only_files(demo_files, tmp_path, capsys):
    """A read-only .h5ad is not replaced in place (checked before the work); a writable one keeps its mode."""
    import os
    import stat

    src = tmp_path / "slide.h5ad"
    src.write_bytes((demo_files / "slide.h5ad").read_bytes())
    os.chmod(src, 0o444)
    ref = f"{demo_files / 'ref.h5ad'}::cell_type"
    assert cli_main(["annotate", str(src), "-r", ref]) == 2
    err = capsys.readouterr().err
    assert "is read-only; it is not replaced" in err and "--out" in err
    assert stat.S_IMODE(src.stat().st_mode) == 0o444 and "cell_type" not in ad.read_h5ad(src).obs
    assert cli_main(["annotate", str(src), "-r", ref, "--out", str(tmp_path)]) == 2  # --out is a folder
    assert "is a folder" in capsys.readouterr().err
    os.chmod(src, 0o640)
    assert cli_main(["annotate", str(src), "-r", ref, "--key-added", "ct"]) == 0
    assert "annotated 700 cells" in capsys.readouterr().out
    assert stat.S_IMODE(src.stat().st_mode) == 0o640  # replaced atomically, mode kept
    out = ad.read_h5ad(src)
    assert {"ct", "ct_confidence", "ct_ontology_term_id"} <= set(out.obs) and "cell_type" not in out.obs


def test_failed_h5ad_write_leaves_the_file(demo_files, tmp_path, monkeypatch):
    from spatialcx import cli

    src = tmp_path / "slide.h5ad"
    src.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(src)
    adata = ad.read_h5ad(src)
    adata.obs["new"] = 1

    def half_write(self, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_write)
    with pytest.raises(OSError, match="disk full"):
        cli._write_h5ad_atomic(adata, src)
    assert _digest(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["slide.h5ad"]


def _h5ad_with_everything(demo_files, path):
    """The demo table with log1p X, counts in a layer, raw, var columns, varm and obsp: what a scanpy user has."""
    import scanpy as sc
    import scipy.sparse as sp

    adata = ad.read_h5ad(demo_files / "slide.h5ad")
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 2 == 0
    adata.varm["loadings"] = np.arange(adata.n_vars * 2, dtype=float).reshape(-1, 2)
    adata.obsp["connectivities"] = sp.eye(adata.n_obs, format="csr")
    adata.write_h5ad(path)
    return adata


def _h5_datasets(path, group):
    import h5py

    with h5py.File(path, "r") as f:
        out = {}
        f[group].visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
        return out


def test_h5ad_is_updated_without_reading_its_matrices(demo_files, tmp_path, monkeypatch, capsys):
    """classify on an .h5ad reads X in chunks from the file and replaces only obs, obsm and uns in the copy written."""
    from scipy.sparse import csr_matrix

    src = tmp_path / "slide.h5ad"
    before = _h5ad_with_everything(demo_files, src)
    untouched = {g: _h5_datasets(src, g) for g in ("X", "layers", "raw", "var", "varm", "obsp")}
    read = []
    real_read = ad.read_h5ad
    monkeypatch.setattr(ad, "read_h5ad", lambda *a, **k: read.append(k.get("backed")) or real_read(*a, **k))

    assert cli_main(["classify", str(src), "CD19", "CD79A", "--method", "ks"]) == 0
    assert read == ["r"]  # opened backed: X stays on disk
    assert "written into" in capsys.readouterr().out
    for group, datasets in untouched.items():  # byte for byte what the file held
        after = _h5_datasets(src, group)
        assert after.keys() == datasets.keys(), group
        for name, values in datasets.items():
            np.testing.assert_array_equal(after[name], values, err_msg=f"{group}/{name}")
    out = real_read(src)
    assert out.obs["threshold_cluster"].isin([0, 1]).all() and out.obs["threshold_cluster"].sum() > 0
    assert out.uns["threshold"]["method"] == "ks" and "spatialdata_attrs" in out.uns
    np.testing.assert_array_equal(out.obsm["spatial"], before.obsm["spatial"])
    np.testing.assert_array_equal(out.obs["true_cell_type"], before.obs["true_cell_type"])
    assert isinstance(out.layers["counts"], csr_matrix) and out.raw.n_vars == before.raw.n_vars
    assert out.var["highly_variable"].tolist() == before.var["highly_variable"].tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["slide.h5ad"]  # no temporary file left


def test_failed_h5ad_update_leaves_the_file(demo_files, tmp_path, monkeypatch, capsys):
    """A write that fails after the copy (here in uns) leaves the input as it was and no temporary file."""
    import anndata.io

    src = tmp_path / "slide.h5ad"
    src.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(src)
    real_write = anndata.io.write_elem

    def fail_on_uns(group, name, elem, *args, **kwargs):
        if name == "uns":
            raise OSError("disk full")
        return real_write(group, name, elem, *args, **kwargs)

    monkeypatch.setattr(anndata.io, "write_elem", fail_on_uns)
    assert cli_main(["classify", str(src), "CD19"]) == 1
    assert "error: disk full" in capsys.readouterr().err
    assert _digest(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["slide.h5ad"]


def test_classify_store_with_domains(demo_files, tmp_path, capsys):
    import shutil

    import spatialdata as sd

    store = tmp_path / "slide.zarr"
    shutil.copytree(demo_files / "slide.zarr", store)
    rc = cli_main(["classify", str(store), "CD19", "MS4A1", "--domains", "--key-added", "bcell", "--domain-key", "fol"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bcell: CD19, MS4A1 (gmm, shifted_geometric_mean)" in out and "fol: 1 domain(s)" in out
    back = sd.read_zarr(store)
    obs = back.tables["table"].obs
    assert set(obs["bcell_cluster"].unique()) == {0, 1}
    in_domain = obs["fol"].notna()
    assert in_domain.sum() >= 10 and (obs.loc[in_domain, "bcell_cluster"] == 1).all()
    # the domain holds the slide's B-cell follicle: mostly B cells
    assert (obs.loc[in_domain, "true_cell_type"].astype(str) == "B cell").mean() > 0.6
    assert list(back.shapes["fol_shapes"].index) == ["fol_1"]
    # without --domain-key, the domains of a --key-added run are its own: another marker set does not replace them
    assert cli_main(["classify", str(store), "CD19", "MS4A1", "--domains", "--key-added", "bcell"]) == 0
    assert "bcell_domain: 1 domain(s)" in capsys.readouterr().out
    back = sd.read_zarr(store)
    assert {"fol", "bcell_domain"} <= set(back.tables["table"].obs) and "domain" not in back.tables["table"].obs
    assert {"fol_shapes", "bcell_domain_shapes"} <= set(back.shapes)


def test_classify_h5ad_with_plot(demo_files, tmp_path, capsys):
    rc = cli_main(
        [
            "classify",
            str(demo_files / "slide.h5ad"),
            "ACTA2",
            "--method",
            "ks",
            "--plots-dir",
            str(tmp_path / "plots"),
            "--out",
            str(tmp_path / "c.h5ad"),
        ]
    )
    assert rc == 0
    assert "threshold: ACTA2 (ks" in capsys.readouterr().out
    assert (tmp_path / "plots" / "threshold_threshold.png").stat().st_size > 10_000
    out = ad.read_h5ad(tmp_path / "c.h5ad")
    assert out.uns["threshold"]["method"] == "ks"
    np.testing.assert_array_equal(
        out.obs["threshold_cluster"].to_numpy(), (out.obs["threshold_score"] > out.uns["threshold"]["threshold"])
    )


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["classify", "{tmp}/nope.zarr", "CD19"], 2, "no such file or directory"),
        (["classify", "{tmp}", "CD19"], 2, "could not be read as a SpatialData zarr store"),
        (["classify", "{store}", "CD19", "--table-key", "cells"], 2, r"no table 'cells'; its tables: \['table'\]"),
        (["classify", "{store}", "CD19", "--out", "{tmp}/x.h5ad"], 2, "--out applies to .h5ad input only"),
        (["classify", "{h5ad}", "NOTAGENE"], 1, r"\['NOTAGENE'\] are neither genes"),
        (["annotate", "{h5ad}", "-r", "{ref}"], 2, "no label key for reference"),
        (["annotate", "{h5ad}", "-r", "{ref}::no_such_column"], 1, "no_such_column"),
        (["classify", "{truncated}", "CD19"], 2, "could not be read as an .h5ad file"),
        (["annotate", "{h5ad}", "-r", "{ref}::cell_type", "--model-out", "{h5ad}/m.npz"], 1, "model_out"),
        (["classify", "{anndata_zarr}", "CD19"], 2, r"is an AnnData zarr store, not a SpatialData store.*write_h5ad"),
        (["classify", "{no_table}", "CD19"], 2, r"holds no table of cells \(its elements: \['cells', 'image'\]\)"),
        (["annotate", "{h5ad}", "-r", "{tmp}/nope.h5ad::cell_type"], 2, r"reference \S+nope.h5ad does not exist"),
        (["annotate", "{h5ad}", "-r", "{ref}::cell_type", "--out", "{tmp}"], 2, r"is a folder; --out is the .h5ad"),
        # settings named by the option given, checked before the references are read
        (["annotate", "{h5ad}", "-r", "{ref}::cell_type", "--confidence-threshold", "1.5"], 2, "--threshold must be"),
        (["annotate", "{h5ad}", "-r", "{ref}::cell_type", "--seed", "-3"], 2, "--seed must be a non-negative integer"),
    ],
)
def test_errors_are_one_line_and_write_nothing(demo_files, tmp_path, capsys, argv, code, message):
    import re

    h5ad = tmp_path / "slide.h5ad"
    h5ad.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(h5ad)
    fill = {"tmp": str(tmp_path), "store": str(demo_files / "slide.zarr"), "h5ad": str(h5ad)}
    fill["ref"] = str(demo_files / "ref.h5ad")
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes((demo_files / "slide.h5ad").read_bytes()[:5000])
    fill["truncated"] = str(truncated)
    fill["anndata_zarr"], fill["no_table"] = str(demo_files / "cells.zarr"), str(demo_files / "no_table.zarr")
    assert cli_main([a.format(**fill) for a in argv]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"spatialcx {argv[0]}: error: ") and re.search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 2 and "Pass --out" not in err
    assert _digest(h5ad) == before


def test_verbose_after_the_command_shows_the_traceback(demo_files, tmp_path):
    with pytest.raises(KeyError, match="NOTAGENE"):
        cli_main(["classify", str(demo_files / "slide.h5ad"), "NOTAGENE", "--out", str(tmp_path / "x.h5ad"), "-vv"])
    assert not (tmp_path / "x.h5ad").exists()


def test_verbosity_before_and_after_the_command_adds_up():
    from spatialcx.cli import build_parser

    args = build_parser().parse_args(["-v", "classify", "x.h5ad", "CD19", "-v"])
    assert args.verbose + args.verbose_after == 2


def test_out_never_replaces_a_reference_nor_an_existing_file(demo_files, tmp_path, capsys):
    """--out is refused when it names a reference (even with --overwrite) or an existing file (unless --overwrite)."""
    ref = tmp_path / "ref.h5ad"
    ref.write_bytes((demo_files / "ref.h5ad").read_bytes())
    h5ad = tmp_path / "slide.h5ad"
    h5ad.write_bytes((demo_files / "slide.h5ad").read_bytes())
    ref_before, h5ad_before = _digest(ref), _digest(h5ad)
    for spec in (str(ref), f"file://{ref}"):  # the reference as a path or a file:// URI
        assert cli_main(["annotate", str(h5ad), "-r", f"{spec}::cell_type", "--out", str(ref), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "would replace the reference" in err and "Traceback" not in err
    assert _digest(ref) == ref_before and _digest(h5ad) == h5ad_before

    existing = tmp_path / "existing.h5ad"
    existing.write_bytes(b"keep me")
    assert cli_main(["annotate", str(h5ad), "-r", f"{ref}::cell_type", "--out", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["classify", str(h5ad), "CD19", "--out", str(existing)]) == 2
    assert existing.read_bytes() == b"keep me"
    assert cli_main(["classify", str(h5ad), "CD19", "--out", str(existing), "--overwrite"]) == 0
    assert "threshold_cluster" in ad.read_h5ad(existing).obs
    assert _digest(h5ad) == h5ad_before
    # --out naming the input itself is an in-place rewrite, as without --out
    assert cli_main(["classify", str(h5ad), "CD19", "--out", str(h5ad)]) == 0
    assert "threshold_cluster" in ad.read_h5ad(h5ad).obs


def test_table_key_is_refused_for_h5ad(demo_files, tmp_path, capsys):
    h5ad = tmp_path / "slide.h5ad"
    h5ad.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(h5ad)
    assert cli_main(["classify", str(h5ad), "CD19", "--table-key", "other"]) == 2
    err = capsys.readouterr().err
    assert "--table-key other applies to SpatialData stores only" in err and err.count("\n") == 2
    assert _digest(h5ad) == before


def test_demo_checks_its_arguments_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--threshold", "1.5", "--out", str(out)]) == 2
    assert "--threshold must be a confidence in [0, 1], got 1.5" in capsys.readouterr().err
    assert not out.exists()  # nothing written
    assert cli_main(["demo", "--min-accuracy", "98", "--out", str(out)]) == 2  # a percentage: no run could pass
    assert "--min-accuracy must be an accuracy in [0, 1], got 98" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["demo", "--n-cells", "10", "--out", str(out)]) == 2
    assert "--n-cells must be at least 50" in capsys.readouterr().err  # the option, not the Python argument
    assert not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli_main(["demo", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "Errno" not in err
    assert a_file.read_text() == "x"


def test_every_option_is_documented():
    """``spatialcx <command> --help`` explains every option (and shows the defaults that matter)."""
    import argparse

    from spatialcx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"
    help_text = sub.choices["annotate"].format_help()
    assert "(default: table)" in help_text and "(default: 0.8)" in help_text and "--overwrite" in help_text


def test_annotate_options_also_take_the_config_field_names():
    """--confidence-threshold and --random-state (the AnnotationConfig fields) are --threshold and --seed."""
    from spatialcx.cli import _annotation_config, build_parser

    argv = [
        "annotate",
        "slide.h5ad",
        "-r",
        "ref.h5ad::cell_type",
        "--confidence-threshold",
        "0.6",
        "--random-state",
        "7",
    ]
    config = _annotation_config(build_parser().parse_args(argv))
    assert config.confidence_threshold == 0.6 and config.random_state == 7


def test_a_failing_domain_step_leaves_the_store_unclassified(demo_files, tmp_path, capsys):
    """classify --domains on a store: when the domains cannot be made, the classification is not persisted alone."""
    import shutil

    import spatialdata as sd

    store = tmp_path / "slide.zarr"
    shutil.copytree(demo_files / "slide.zarr", store)
    before = {p.relative_to(store): _digest(p) for p in store.rglob("*") if p.is_file()}
    for bad in (["--min-cells", "0"], ["--max-distance", "-1"]):
        assert cli_main(["classify", str(store), "CD19", "--domains", *bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("spatialcx classify: error: ") and ("min_cells" in err or "max_distance" in err)
        assert {p.relative_to(store): _digest(p) for p in store.rglob("*") if p.is_file()} == before
        assert "threshold_cluster" not in sd.read_zarr(store).tables["table"].obs
    # without --domains, and with domains that can be made, the store gets the columns
    assert cli_main(["classify", str(store), "CD19", "--domains"]) == 0
    obs = sd.read_zarr(store).tables["table"].obs
    assert {"threshold_cluster", "domain"} <= set(obs.columns)


def test_paths_starting_with_a_tilde_are_the_home_folder(demo_files, tmp_path, monkeypatch, capsys):
    """``--out=~/...`` (no shell expansion) is checked and written at the same place: the home folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "slide.h5ad").write_bytes((demo_files / "slide.h5ad").read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert cli_main(["classify", "~/slide.h5ad", "CD19", "--out", "~/classified.h5ad"]) == 0
    assert "threshold_cluster" in ad.read_h5ad(home / "classified.h5ad").obs
    assert list(work.iterdir()) == []
    assert cli_main(["classify", "~/slide.h5ad", "CD19", "--out", "~/classified.h5ad"]) == 2  # exists: checked there
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_annotate_from_a_config_file_with_overrides(demo_files, tmp_path, capsys):
    """--config gives the settings (paths relative to the file); options on the command line override them."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(demo_files / "ref.h5ad", conf_dir / "ref.h5ad")
    (conf_dir / "proportions.csv").write_text("cell_type,proportion\nenterocyte,0.2\nplasma cell,0.2\n")
    (conf_dir / "run.yaml").write_text(
        "references: [ref.h5ad]\n"
        "label_keys: cell_type\n"
        "tissue: colon\n"
        "max_cells_per_ref: 900\n"
        "target_proportions: proportions.csv\n"
        "exclude_labels: [Unstable, Ambiguous]\n"
        "random_state: 3\n"
    )
    out_path = tmp_path / "o.h5ad"
    argv = ["annotate", str(demo_files / "slide.h5ad"), "--config", str(conf_dir / "run.yaml"), "--out", str(out_path)]
    assert cli_main([*argv, "--tissue", "large intestine", "--max-cells-per-type", "none"]) == 0
    assert "annotated 700 cells" in capsys.readouterr().out
    params = ad.read_h5ad(out_path).uns["cell_type"]
    assert params["tissue"] == "large intestine"  # the command line wins
    assert params["max_cells_per_ref"] == 900 and "max_cells_per_type" not in params  # 'none': no cap, not stored
    assert int(params["random_state"]) == 3
    assert list(params["target_proportions"]["cell_types"]) == ["enterocyte", "plasma cell"]
    assert sorted(params["exclude_labels"]) == ["Ambiguous", "Unstable"]  # the config's list, not the defaults

    # -r replaces the config's references, and takes the config's single label key; --keep-label acts on its list
    assert cli_main([*argv, "-r", str(demo_files / "ref.h5ad"), "--keep-label", "Ambiguous", "--overwrite"]) == 0
    params = ad.read_h5ad(out_path).uns["cell_type"]
    assert list(params["exclude_labels"]) == ["Unstable"] and "Ambiguous" in params["classes"]


def test_annotate_config_with_named_references(demo_files, tmp_path, capsys):
    """references: {name: path} in the config names the sources in the provenance; a missing one is found first."""
    (tmp_path / "run.yaml").write_text(
        f"references: {{colon_atlas: {demo_files / 'ref.h5ad'}}}\nlabel_keys: {{colon_atlas: cell_type}}\n"
    )
    out_path = tmp_path / "o.h5ad"
    argv = ["annotate", str(demo_files / "slide.h5ad"), "--config", str(tmp_path / "run.yaml"), "--out", str(out_path)]
    assert cli_main(argv) == 0
    provenance = ad.read_h5ad(out_path).uns["cell_type"]["references"]
    assert [entry["name"] for entry in provenance.values()] == ["colon_atlas"]
    (tmp_path / "run.yaml").write_text("references: {atlas: missing.h5ad}\nlabel_keys: cell_type\n")
    assert cli_main([*argv, "--overwrite"]) == 2
    assert "reference missing.h5ad does not exist" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        (None, [], "no reference: give one or more -r"),
        ("references: [ref.h5ad]\nlabel_keys: cell_type\nthreshhold: 0.5\n", [], r"Unknown AnnotationConfig keys"),
        (
            "references: [ref.h5ad]\nlabel_keys: cell_type\n",
            ["--threshold", "2"],
            r"--threshold must be a number in \[0, 1\], got 2\.0",
        ),
        ("references: ref.h5ad\n", [], r"AnnotationConfig needs \['label_keys'\]"),
        (
            "references: [ref.h5ad\nlabel_keys: cell_type\n",
            [],
            r"--config \S+run.yaml: not valid YAML at line 2, column 11: expected ',' or '\]', but got ':' \(while "
            r"parsing a flow sequence that starts at line 1, column 13\)\.",
        ),
    ],
)
def test_annotate_config_errors_are_one_line(demo_files, tmp_path, capsys, config, extra, message):
    import re

    h5ad = tmp_path / "slide.h5ad"
    h5ad.write_bytes((demo_files / "slide.h5ad").read_bytes())
    argv = ["annotate", str(h5ad), *extra]
    if config is not None:
        (tmp_path / "run.yaml").write_text(config)
        argv += ["--config", str(tmp_path / "run.yaml")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spatialcx annotate: error: ") and re.search(message, err), err
    assert err.count("\n") == 2  # one line, and the hint about -vv
    assert "cell_type" not in ad.read_h5ad(h5ad).obs


@pytest.mark.parametrize(("make", "message"), [(None, "does not exist"), ("mkdir", "is a folder")])
def test_annotate_config_that_is_not_a_file(demo_files, tmp_path, capsys, make, message):
    """A --config path that does not exist or is a folder is a wrong argument (status 2), reported on one line."""
    config = tmp_path / "run.yaml"
    if make:
        config.mkdir()
    assert cli_main(["annotate", str(demo_files / "slide.h5ad"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"spatialcx annotate: error: --config {config} {message}; pass the YAML file of the annotation settings.\n"
        "(run with -vv for the full traceback)\n"
    )


def test_annotate_caps_are_checked_by_the_parser(capsys):
    for bad in ("0", "-5", "many"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["annotate", "x.h5ad", "-r", "ref.h5ad::cell_type", "--max-cells-per-ref", bad])
        assert exc.value.code == 2
        assert "expected a positive number of cells or 'none'" in capsys.readouterr().err


def test_classify_domains_keep_sections_apart(demo_files, tmp_path, capsys):
    """--library-key: sections sharing one coordinate frame get their own domains; --spatial-key: other coordinates."""
    import pandas as pd

    one = ad.read_h5ad(demo_files / "slide.h5ad")
    shifted = one.copy()
    shifted.obsm["spatial"] = one.obsm["spatial"] + 5.0  # a second section in the same frame, a little offset
    two = ad.concat({"a": one, "b": shifted}, label="section", index_unique="-")
    two.obsm["xy"] = two.obsm.pop("spatial")
    src = tmp_path / "sections.h5ad"
    two.write_h5ad(src)
    argv = ["classify", str(src), "CD19", "MS4A1", "--domains", "--max-distance", "35", "--spatial-key", "xy", "--out"]

    assert cli_main([*argv, str(tmp_path / "mixed.h5ad")]) == 0
    obs = ad.read_h5ad(tmp_path / "mixed.h5ad").obs
    mixed = pd.crosstab(obs["domain"], obs["section"])
    assert ((mixed > 0).sum(axis=1) == 2).all()  # without it, each domain links the cells of both sections

    assert cli_main([*argv, str(tmp_path / "apart.h5ad"), "--library-key", "section"]) == 0
    assert "domain: 2 domain(s)" in capsys.readouterr().out
    out = ad.read_h5ad(tmp_path / "apart.h5ad")
    apart = pd.crosstab(out.obs["domain"], out.obs["section"])
    assert ((apart > 0).sum(axis=1) == 1).all() and set(apart.columns) == {"a", "b"}
    assert out.uns["domain"]["spatial_key"] == "xy"


def test_ctrl_c_is_one_line_with_status_130(demo_files, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops the command with 'interrupted' and status 130, no traceback (-vv re-raises); the file is kept."""
    src = tmp_path / "slide.h5ad"
    src.write_bytes((demo_files / "slide.h5ad").read_bytes())
    before = _digest(src)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scx.tl, "annotate_from_config", interrupted)
    argv = ["annotate", str(src), "-r", f"{demo_files / 'ref.h5ad'}::cell_type"]
    try:
        rc = cli_main(argv)
    except KeyboardInterrupt:  # (not caught by the command: a failure here, not a stop of the test session)
        rc = None
    assert rc == 130
    assert capsys.readouterr().err == "spatialcx annotate: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        cli_main([*argv, "-vv"])
    assert _digest(src) == before and [p.name for p in tmp_path.iterdir()] == ["slide.h5ad"]


def test_a_read_only_store_is_refused_before_the_work(demo_files, tmp_path, capsys):
    """A store marked read-only is not written into (even by root), and says how to annotate a copy."""
    import os

    store = tmp_path / "slide.zarr"
    shutil.copytree(demo_files / "slide.zarr", store)
    for folder in (store, store / "tables", store / "tables" / "table"):
        os.chmod(folder, 0o555)
    try:
        assert cli_main(["classify", str(store), "CD19"]) == 2
        err = capsys.readouterr().err
        assert f"{store} is read-only" in err and "Copy it (cp -r" in err and err.count("\n") == 2
        assert not list(store.rglob("threshold*"))
    finally:
        for folder in (store, store / "tables", store / "tables" / "table"):
            os.chmod(folder, 0o755)


def test_a_10x_matrix_is_not_taken_for_an_h5ad(shared_data, capsys):
    """Xenium's cell_feature_matrix.h5 (HDF5, like .h5ad) is named as a 10x matrix, with how to convert it."""
    matrix = shared_data("xenium_bonemarrow", "cell_feature_matrix.h5")
    assert cli_main(["classify", str(matrix), "CD19"]) == 2
    err = capsys.readouterr().err
    assert "is a 10x Genomics HDF5 matrix" in err and "scanpy.read_10x_h5" in err and "is it complete" not in err


def test_python_dash_m_runs_the_command():
    """``python -m spatialcx`` is the ``spatialcx`` command (for environments whose scripts folder is not on PATH)."""
    import subprocess
    import sys

    import spatialcx as scx

    done = subprocess.run([sys.executable, "-m", "spatialcx", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"spatialcx {scx.__version__}"
    done = subprocess.run([sys.executable, "-m", "spatialcx", "annotate"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage: spatialcx annotate" in done.stderr
