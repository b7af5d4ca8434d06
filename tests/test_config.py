from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

import spatialcx as scx
from spatialcx.tl import _annotate
from spatialcx.tl._config import AnnotationConfig

YAML = """\
references:
  - refs/lung.h5ad
  - gs://bucket/airway.zarr
label_keys: [cell_type, ann_finest_level]
tissue: lung
balance: equal
max_cells_per_type: 2000
target_proportions: props.csv
model_out: models/lung.npz
"""


def test_yaml_round_trip_and_relative_paths(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "annotate.yaml"
    path.write_text(YAML)
    cfg = AnnotationConfig.from_yaml(path)
    base = tmp_path / "conf"
    assert cfg.references == [str(base / "refs/lung.h5ad"), "gs://bucket/airway.zarr"]
    assert cfg.label_keys == ["cell_type", "ann_finest_level"]
    assert cfg.balance == "equal" and cfg.max_cells_per_type == 2000 and cfg.max_cells_per_ref == 100_000
    assert cfg.target_proportions == str(base / "props.csv") and cfg.model_out == str(base / "models/lung.npz")
    assert cfg.confidence_threshold == 0.8 and cfg.random_state == 0  # defaults
    out = tmp_path / "copy.yaml"
    text = cfg.to_yaml(out)
    assert out.read_text() == text
    assert AnnotationConfig.from_yaml(out) == cfg
    assert AnnotationConfig.from_yaml(text) == cfg  # YAML text works too


def test_a_config_written_elsewhere_finds_the_same_files(tmp_path, monkeypatch):
    """Paths read relative to one YAML file are written relative to the next one, wherever the working folder is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "annotate.yaml").write_text(YAML)
    cfg = AnnotationConfig.from_yaml("conf/annotate.yaml")
    assert cfg.references[0] == str(Path("conf/refs/lung.h5ad"))
    cfg.to_yaml("conf/used.yaml")
    (tmp_path / "elsewhere").mkdir()
    cfg.to_yaml(tmp_path / "elsewhere" / "used.yaml")
    written = yaml.safe_load((tmp_path / "elsewhere" / "used.yaml").read_text())
    assert written["references"] == ["../conf/refs/lung.h5ad", "gs://bucket/airway.zarr"]
    assert written["model_out"] == "../conf/models/lung.npz" and written["target_proportions"] == "../conf/props.csv"
    assert AnnotationConfig.from_yaml("conf/used.yaml") == cfg
    assert AnnotationConfig.from_yaml("elsewhere/used.yaml") == cfg
    monkeypatch.chdir(tmp_path / "elsewhere")  # read from another working folder: same files
    again = AnnotationConfig.from_yaml("used.yaml")
    assert Path(again.references[0]).resolve() == (tmp_path / "conf/refs/lung.h5ad").resolve()
    assert Path(again.model_out).resolve() == (tmp_path / "conf/models/lung.npz").resolve()


def test_target_proportions_mapping_in_yaml():
    cfg = AnnotationConfig.from_yaml("references: [a.h5ad]\nlabel_keys: cell_type\ntarget_proportions: {T cell: 0.2}\n")
    assert cfg.target_proportions == {"T cell": 0.2} and cfg.references == ["a.h5ad"]


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (
            "references: [a.h5ad]\nlabel_keys: x\ncolour: blue\n",
            ValueError,
            r"Unknown AnnotationConfig keys \['colour'\]",
        ),
        ("label_keys: x\n", ValueError, r"needs \['references'\]"),
        ("references: [a.h5ad, b.h5ad]\nlabel_keys: [x, y, z]\n", ValueError, "2 references but 3 label_keys"),
        ("references: [a.h5ad]\nlabel_keys: x\nbalance: fair\n", ValueError, "balance must be"),
        ("references: [a.h5ad]\nlabel_keys: x\nconfidence_threshold: 2\n", ValueError, "confidence_threshold"),
        ("references: [a.h5ad]\nlabel_keys: x\nmax_cells_per_type: 0\n", ValueError, "positive integer"),
        ("references: []\nlabel_keys: x\n", ValueError, "at least one reference"),
        ("- a\n- b\n", ValueError, "YAML mapping"),
        ("references: [a\n", ValueError, "not valid YAML"),
        ("references: [a.h5ad]\nlabel_keys: ''\n", ValueError, "label_keys must be obs column names"),
        ("references: ['']\nlabel_keys: x\n", ValueError, "references holds an empty path"),
    ],
)
def test_bad_configs(text, error, match):
    with pytest.raises(error, match=match):
        AnnotationConfig.from_yaml(text)


def test_missing_config_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AnnotationConfig.from_yaml(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Config file 'annotate_config' does not exist"):
        AnnotationConfig.from_yaml("annotate_config")  # a file name without suffix, not YAML text
    (tmp_path / "conf.yaml").mkdir()
    with pytest.raises(IsADirectoryError, match=r"Config file '.*conf.yaml' is a folder"):
        AnnotationConfig.from_yaml(tmp_path / "conf.yaml")


HEAD = "references: [a.h5ad]\nlabel_keys: x\n"


@pytest.mark.parametrize(
    ("line", "error", "match"),
    [
        ("confidence_threshold: high", ValueError, r"confidence_threshold must be a number in \[0, 1\], got 'high'"),
        ("confidence_threshold: true", ValueError, r"confidence_threshold must be a number.*True \(bool\)"),
        ("confidence: best", ValueError, r"confidence must be one of \[.*'calibrated'"),
        ("random_state: seven", TypeError, "random_state must be an integer seed, got 'seven'"),
        ("random_state: 1.5", TypeError, "random_state must be an integer seed"),
        ("random_state: -2", ValueError, "random_state must be a non-negative integer seed, got -2"),
        ("plots: 'no'", TypeError, "plots must be true or false, got 'no'"),
        ("add_ontology: 0", TypeError, "add_ontology must be true or false, got 0"),
        ("tissue: 5", TypeError, "tissue must be a string, got 5"),
        ("table_key: [a, b]", TypeError, "table_key must be a string"),
        ("model_out: 5", TypeError, "model_out must be a path"),
        ("max_cells_per_ref: 1e5", ValueError, "max_cells_per_ref must be a positive integer"),
        ("target_proportions: {T cell: -0.2}", ValueError, "non-negative numbers"),
        ("target_proportions: {T cell: many}", ValueError, "non-negative numbers"),
        ("exclude_labels: [NA, null]", TypeError, r"exclude_labels must hold labels.*\[None\]"),
        # what annotate would refuse is reported when the file is read, not after the data are loaded
        ("key_added: cell/type", ValueError, "key_added='cell/type' cannot be stored in a zarr or h5ad file"),
        ("train_kwargs: {c: 0.5}", ValueError, r"train_kwargs names \['c'\], which are not options"),
        ("train_kwargs: {method: fast}", ValueError, "train_kwargs: Unknown training method 'fast'"),
        ("train_kwargs: {C: 0}", ValueError, "train_kwargs: C must be a positive number"),
    ],
)
def test_mistyped_values_are_reported_by_key(line, error, match):
    """A value of the wrong type names its key and what it should be, instead of failing later (or never)."""
    with pytest.raises(error, match=match):
        AnnotationConfig.from_yaml(HEAD + line + "\n")


@pytest.mark.parametrize("refs", ["5", "{a.h5ad: 1}", "[a.h5ad, 3]"])
def test_mistyped_references_are_reported(tmp_path, refs):
    path = tmp_path / "c.yaml"
    path.write_text(f"references: {refs}\nlabel_keys: x\n")
    with pytest.raises(TypeError, match="references must be a path or URI, a list of them .* or a mapping"):
        AnnotationConfig.from_yaml(path)
    with pytest.raises(TypeError, match="label_keys must be a label column name"):
        AnnotationConfig.from_yaml("references: [a.h5ad]\nlabel_keys: [1]\n")


def test_no_cap_and_round_trip_of_every_field(tmp_path):
    cfg = AnnotationConfig(
        references=["a.h5ad"],
        label_keys="x",
        max_cells_per_type=None,
        max_cells_per_ref=None,
        confidence_threshold=1,
        confidence="zscore",
        plots=False,
        random_state=3,
        exclude_labels=["NA", 0],
    )
    assert cfg.confidence_threshold == 1.0 and isinstance(cfg.confidence_threshold, float)
    assert cfg.exclude_labels == ["NA", "0"]  # numeric cluster labels are labels
    assert AnnotationConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_yaml(tmp_path / "c.yaml")  # the file holds the path relative to its folder
    again = AnnotationConfig.from_yaml(tmp_path / "c.yaml")
    assert Path(again.references[0]).resolve() == Path("a.h5ad").resolve()
    assert again.max_cells_per_type is None and again.max_cells_per_ref is None and again.plots is False


def test_numpy_numbers_are_written_as_plain_yaml(tmp_path):
    """Fields set from numpy values (a count, a seed) are kept as Python numbers, so to_yaml can write them."""
    cfg = AnnotationConfig(
        references=["a.h5ad"],
        label_keys="x",
        max_cells_per_type=np.int64(2000),
        max_cells_per_ref=np.int32(50_000),
        chunk_size=np.uint16(4096),
        random_state=np.int64(7),
        confidence_threshold=np.float32(0.5),
        train_kwargs={"C": np.float64(0.25), "epochs": np.int64(3)},
    )
    text = cfg.to_yaml(tmp_path / "c.yaml")
    assert "max_cells_per_type: 2000\n" in text and "random_state: 7\n" in text and "C: 0.25\n" in text
    again = AnnotationConfig.from_yaml(tmp_path / "c.yaml")
    caps = (again.max_cells_per_type, again.max_cells_per_ref, again.chunk_size)
    assert caps == (2000, 50_000, 4096) and again.random_state == 7
    assert again.train_kwargs == {"C": 0.25, "epochs": 3} and again.confidence_threshold == 0.5
    assert type(cfg.random_state) is int and type(cfg.train_kwargs["epochs"]) is int


def test_annotate_from_config_passes_every_field(monkeypatch, tmp_path):
    seen = {}

    def fake_annotate(data, references, **kwargs):
        seen.update(data=data, references=references, **kwargs)
        return "result"

    monkeypatch.setattr(_annotate, "annotate", fake_annotate)
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    adata = ad.AnnData(np.zeros((2, 2)))
    assert scx.tl.annotate_from_config(adata, path, copy=True) == "result"
    assert seen["data"] is adata and seen["copy"] is True
    assert seen["references"] == [str(tmp_path / "refs/lung.h5ad"), "gs://bucket/airway.zarr"]
    assert seen["label_keys"] == ["cell_type", "ann_finest_level"] and seen["balance"] == "equal"
    assert seen["target_proportions"] == str(tmp_path / "props.csv")
    import inspect

    params = set(inspect.signature(scx.tl.annotate).parameters)
    assert set(seen) - {"data", "references"} <= params  # every field is an argument of the real annotate
    seen.clear()
    scx.tl.annotate_from_config(adata, {"references": ["x.h5ad"], "label_keys": "cell_type"})
    assert seen["references"] == ["x.h5ad"] and seen["copy"] is False


def test_exclude_labels_in_config(monkeypatch):
    from spatialcx._constants import DEFAULT_EXCLUDE_LABELS

    cfg = AnnotationConfig.from_yaml("references: [a.h5ad]\nlabel_keys: x\nexclude_labels: [NA, Unstable]\n")
    assert cfg.exclude_labels == ["NA", "Unstable"]
    assert AnnotationConfig.from_yaml(cfg.to_yaml()) == cfg
    assert AnnotationConfig.from_yaml(
        "references: [a.h5ad]\nlabel_keys: x\nexclude_labels: Unstable\n"
    ).exclude_labels == ["Unstable"]
    with pytest.raises(TypeError, match="exclude_labels must be a list"):
        AnnotationConfig.from_yaml("references: [a.h5ad]\nlabel_keys: x\nexclude_labels: {a: 1}\n")
    seen = {}
    monkeypatch.setattr(_annotate, "annotate", lambda data, references, **kw: seen.update(kw))
    scx.tl.annotate_from_config(None, cfg)
    assert seen["exclude_labels"] == ["NA", "Unstable"]
    seen.clear()
    scx.tl.annotate_from_config(None, {"references": ["a.h5ad"], "label_keys": "x"})
    assert "exclude_labels" not in seen  # annotate's own default applies
    import inspect

    assert inspect.signature(scx.tl.annotate).parameters["exclude_labels"].default == DEFAULT_EXCLUDE_LABELS
    assert {"Ambiguous", "Doublets", "Unclassified", "NA", "Unknown"} <= set(DEFAULT_EXCLUDE_LABELS)


def test_real_pair_annotated_from_a_file_uri(shared_data, tmp_path):
    ref = shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad")
    query = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "merfish_query.h5ad"))
    cfg = AnnotationConfig(
        references=[f"file://{ref}"],
        label_keys="cell_type_author",
        tissue="hypothalamus",
        max_cells_per_type=100,
        confidence_threshold=0.5,
        add_ontology=False,
        plots=False,
    )
    scx.tl.annotate_from_config(query, cfg)
    labels = query.obs["cell_type_predicted"].astype(str)
    ref_types = set(ad.read_h5ad(ref).obs["cell_type_author"].astype(str))
    assert set(labels) <= ref_types and labels.nunique() >= 5
    conf = query.obs["cell_type_confidence"].to_numpy()
    assert np.isfinite(conf).all() and ((conf >= 0) & (conf <= 1)).all()
    assert query.uns["cell_type"]["tissue"] == "hypothalamus"


def test_key_added_chunk_size_and_train_kwargs_are_config_fields(monkeypatch, tmp_path):
    """Every argument of annotate besides the data and where results go (copy, write) is a config field."""
    import inspect

    text = (
        "references: [a.h5ad]\nlabel_keys: x\nkey_added: cell_type_v2\nchunk_size: 5000\n"
        "train_kwargs: {method: minibatch, C: 0.5}\n"
    )
    cfg = AnnotationConfig.from_yaml(text)
    assert cfg.key_added == "cell_type_v2" and cfg.chunk_size == 5000
    assert cfg.train_kwargs == {"method": "minibatch", "C": 0.5}
    assert AnnotationConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_yaml(tmp_path / "c.yaml")
    assert AnnotationConfig.from_yaml(tmp_path / "c.yaml").train_kwargs == cfg.train_kwargs
    fields = {f.name for f in __import__("dataclasses").fields(AnnotationConfig)}
    params = set(inspect.signature(scx.tl.annotate).parameters)
    assert params - fields == {"data", "copy", "write"}
    seen = {}
    monkeypatch.setattr(_annotate, "annotate", lambda data, references, **kw: seen.update(kw))
    scx.tl.annotate_from_config(None, cfg, write=False)
    assert seen["key_added"] == "cell_type_v2" and seen["chunk_size"] == 5000 and seen["write"] is False
    assert seen["train_kwargs"] == {"method": "minibatch", "C": 0.5}
    for line, error, match in (
        ("key_added: 3", TypeError, "key_added must be a string"),
        ("chunk_size: 0", ValueError, "chunk_size must be a positive integer"),
        ("train_kwargs: [C, 0.5]", TypeError, "train_kwargs must be a mapping"),
    ):
        with pytest.raises(error, match=match):
            AnnotationConfig.from_yaml(f"references: [a.h5ad]\nlabel_keys: x\n{line}\n")


def test_config_key_added_reaches_the_table(tmp_path):
    """A config's key_added names the columns written (a small run of the real annotate)."""
    sdata, reference = scx.datasets.demo(n_cells=200, n_reference_cells=500, n_genes=150, n_reference_genes=300)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    (tmp_path / "c.yaml").write_text(
        "references: [ref.h5ad]\nlabel_keys: cell_type\nkey_added: ct\nplots: false\nadd_ontology: false\n"
    )
    table = sdata.tables["table"]
    out = scx.tl.annotate_from_config(table, tmp_path / "c.yaml", copy=True)
    assert {"ct", "ct_predicted", "ct_confidence"} <= set(out.obs) and "cell_type" not in out.obs
    assert "ct" not in table.obs


def test_yaml_file_in_the_home_folder(home_and_work):
    """``to_yaml("~/x.yaml")`` writes into the home folder and ``from_yaml`` reads it back from there."""
    home, work = home_and_work
    config = scx.tl.AnnotationConfig(references=["/data/ref.h5ad"], label_keys="cell_type", tissue="lung")
    config.to_yaml("~/run.yaml")
    assert (home / "run.yaml").is_file()
    assert scx.tl.AnnotationConfig.from_yaml("~/run.yaml") == config
    assert list(work.iterdir()) == []


def test_named_references_read_round_trip_and_reach_annotate(monkeypatch, tmp_path):
    """references: {name: path} names the sources (as annotate's mapping does); label_keys may name them too."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "c.yaml"
    path.write_text(
        "references: {hlca: refs/lung.h5ad, airway: gs://bucket/airway.zarr}\n"
        "label_keys: {airway: ann_finest_level, hlca: cell_type}\n"
    )
    cfg = AnnotationConfig.from_yaml(path)  # before: "references must be a path or URI, or a list of them"
    assert cfg.references == {"hlca": str(tmp_path / "conf/refs/lung.h5ad"), "airway": "gs://bucket/airway.zarr"}
    assert cfg.label_keys == {"hlca": "cell_type", "airway": "ann_finest_level"}
    assert AnnotationConfig.from_yaml(cfg.to_yaml(tmp_path / "other.yaml")) == cfg
    monkeypatch.chdir(tmp_path)
    relative = AnnotationConfig(references={"hlca": "conf/refs/lung.h5ad"}, label_keys="cell_type")
    assert "hlca: refs/lung.h5ad" in relative.to_yaml(tmp_path / "conf" / "again.yaml")  # relative to the file
    seen = {}
    monkeypatch.setattr(_annotate, "annotate", lambda data, references, **kw: seen.update(refs=references, **kw))
    scx.tl.annotate_from_config(ad.AnnData(np.zeros((2, 2))), cfg)
    assert seen["refs"] == cfg.references and seen["label_keys"] == cfg.label_keys
    one_key = AnnotationConfig.from_yaml("references: {a: a.h5ad, b: b.h5ad}\nlabel_keys: cell_type\n")
    assert one_key.references == {"a": "a.h5ad", "b": "b.h5ad"} and one_key.label_keys == "cell_type"


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("references: [a.h5ad]\nlabel_keys: {a: x}\n", ValueError, "label_keys is a mapping .* but references is a"),
        ("references: {a: a.h5ad, b: b.h5ad}\nlabel_keys: {a: x}\n", ValueError, r"missing: \['b'\]"),
        ("references: {a: a.h5ad}\nlabel_keys: {a: x, c: y}\n", ValueError, r"not a reference: \['c'\]"),
        ("references: {1: a.h5ad}\nlabel_keys: x\n", TypeError, "source names"),
        ("references: {a: 3}\nlabel_keys: x\n", TypeError, "or a mapping"),
        ("references: {a: ''}\nlabel_keys: x\n", ValueError, "empty path"),
    ],
)
def test_named_references_errors(text, error, match):
    with pytest.raises(error, match=match):
        AnnotationConfig.from_yaml(text)
