import re

import pytest
import yaml

from tasks.env import PROJECT_ROOT
from tasks.params import ParamsError, load_params

REAL = PROJECT_ROOT / "params.yaml"


@pytest.fixture
def real_raw() -> dict:
    """A fresh copy per test: tests edit it."""
    return yaml.safe_load(REAL.read_text(encoding="utf-8"))


def write_params(tmp_path, raw: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def params_error(*fragments: str, path=None, overrides=()) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_loads_the_real_params_yaml(real_raw):
    params = load_params()
    assert params.raw == real_raw
    assert params.data.dataset == real_raw["data"]["dataset"]
    assert params.dataset is params.datasets[real_raw["data"]["dataset"]]
    assert params.data.max_history == real_raw["data"]["max_history"]
    assert set(params.datasets) == set(real_raw["datasets"])
    # YAML lists become tuples, so the frozen configs stay hashable.
    assert params.tokenize.rqvae.hidden_dims == tuple(real_raw["tokenize"]["rqvae"]["hidden_dims"])
    assert params.embed.fields == tuple(real_raw["embed"]["fields"])
    assert isinstance(params.data.min_title_share, float)


def test_relative_dirs_resolve_against_the_project_root():
    params = load_params(overrides=["data.data_dir=out", "data.reports_dir=rep"])
    name = params.data.dataset
    assert params.dataset_dir() == PROJECT_ROOT / "out" / name
    assert params.reports_dir() == PROJECT_ROOT / "rep" / name


def test_every_key_has_a_typed_comment():
    """House rule: each `key: value` line carries `# (type) ...`; section headers end with ':'."""
    offenders = []
    for n, line in enumerate(REAL.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        code = stripped.split(" #", 1)[0].rstrip()
        if code.endswith(":"):
            continue
        if " # (" not in line:
            offenders.append(f"line {n}: {stripped}")
    assert offenders == []


def test_each_comment_type_matches_its_value():
    python_type = {"str": str, "int": int, "float": float, "bool": bool}
    mismatches = []
    for n, line in enumerate(REAL.read_text(encoding="utf-8").splitlines(), start=1):
        m = re.match(r"^\s*[\w-]+:\s*(.+?)\s+# \((\w+)(?:\[(\w+)\])?\)", line)
        if not m:
            continue
        value, declared, element = yaml.safe_load(m.group(1)), m.group(2), m.group(3)
        if declared == "list":
            ok = isinstance(value, list) and all(type(v) is python_type[element] for v in value)
        else:
            ok = type(value) is python_type[declared]
        if not ok:
            mismatches.append(f"line {n}: {value!r} is not ({declared})")
    assert mismatches == []


def test_unknown_key_in_the_file(tmp_path, real_raw):
    real_raw["data"]["max_histroy"] = 5
    params_error("data.max_histroy", "unknown key", path=write_params(tmp_path, real_raw))


def test_unknown_top_level_section(tmp_path, real_raw):
    real_raw["trainer"] = {"epochs": 1}
    params_error("trainer: unknown key", path=write_params(tmp_path, real_raw))


@pytest.mark.parametrize("section, key", [("data", "max_history"), ("tokenize.rqvae", "epochs"), (None, "embed")])
def test_missing_key(tmp_path, real_raw, section, key):
    node = real_raw
    for part in section.split(".") if section else []:
        node = node[part]
    del node[key]
    dotted = f"{section}.{key}" if section else key
    params_error(f"{dotted}: missing key", path=write_params(tmp_path, real_raw))


def test_a_field_with_a_default_may_be_left_out(tmp_path, real_raw):
    real_raw["datasets"]["ml-100k"].pop("index", None)
    assert load_params(write_params(tmp_path, real_raw)).datasets["ml-100k"].index == ""


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.max_history=twenty", ("data.max_history", "expected an integer", "'twenty'")),
        ("data.max_history=5.0", ("data.max_history", "expected an integer", "5.0")),
        ("data.max_history=true", ("data.max_history", "expected an integer", "True")),
        ("data.drop_short_users=1", ("data.drop_short_users", "expected true/false", "1")),
        ("data.min_title_share=yes", ("data.min_title_share", "expected a number")),
        ("data.dataset=[ml-100k]", ("data.dataset", "expected a string")),
        ("embed.fields=title", ("embed.fields", "expected a list, got str")),
        ("tokenize.rqvae.hidden_dims=64", ("tokenize.rqvae.hidden_dims", "expected a list, got int")),
        ("tokenize.rqvae.hidden_dims=[64, x]", ("tokenize.rqvae.hidden_dims[1]", "expected an integer")),
        ("tokenize.rqvae=3", ("tokenize.rqvae", "expected a mapping")),
    ],
)
def test_wrong_type_names_the_dotted_key(override, fragments):
    params_error(*fragments, overrides=[override])


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("tokenize.method=kmeans", ("tokenize.method", "'kmeans' is not one of", "rqvae")),
        ("tokenize.source=Train", ("tokenize.source", "'Train'")),
        ("embed.fields=[title, colour]", ("embed.fields[1]", "'colour'")),
        ("datasets.ml-100k.format=csv", ("datasets.ml-100k.format", "'csv'")),
    ],
)
def test_literal_violation(override, fragments):
    params_error(*fragments, overrides=[override])


def test_unknown_dataset_name():
    params_error("data.dataset", "'nope'", "not a key of `datasets`", overrides=["data.dataset=nope"])


def test_override_is_yaml_typed():
    params = load_params(overrides=["data.max_history=5", "data.drop_short_users=true", "data.min_title_share=1"])
    assert params.data.max_history == 5 and type(params.data.max_history) is int
    assert params.data.drop_short_users is True
    assert params.data.min_title_share == 1.0 and type(params.data.min_title_share) is float  # int -> float
    assert params.raw["data"]["max_history"] == 5


def test_override_of_a_deeply_nested_key():
    assert load_params(overrides=["tokenize.rqvae.epochs=3"]).tokenize.rqvae.epochs == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.max_histroy=5", "'data.max_histroy'"),
        ("trainer.epochs=1", "'trainer'"),
        ("data.max_history.x=1", "'data.max_history.x'"),
        ("datasets.tiny.path=/x", "'datasets.tiny'"),  # a new dataset must be given whole
        ("tokenize.rqvae.epoch=3", "'tokenize.rqvae.epoch'"),
    ],
)
def test_override_of_an_unknown_key_names_it(override, key):
    params_error("unknown key", key, overrides=[override])


def test_override_without_a_value():
    params_error("'data.max_history'", "key.path=value", overrides=["data.max_history"])


def test_override_may_add_a_dataset(tmp_path):
    spec = "{format: lcrec, path: /data/tiny, prefix: Tiny, attributes: [brand]}"
    params = load_params(overrides=[f"datasets.tiny={spec}", "data.dataset=tiny"])
    assert params.dataset.prefix == "Tiny"
    assert params.dataset.attributes == ("brand",)
    assert params.dataset.index == ""  # default


def test_an_added_dataset_is_checked_like_the_others():
    spec = "{format: lcrec, path: /data/tiny, prefix: Tiny, attributes: [], colour: red}"
    params_error("datasets.tiny.colour", "unknown key", overrides=[f"datasets.tiny={spec}"])


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.max_history=0", ("data.max_history", ">= 1")),
        ("data.min_sequence_length=2", ("data.min_sequence_length", ">= 3")),
        ("data.min_title_share=1.5", ("data.min_title_share", "[0, 1]")),
        ("tokenize.rqvae.epochs=0", ("tokenize.rqvae", "epochs must be >= 1")),
    ],
)
def test_out_of_range_values(override, fragments):
    params_error(*fragments, overrides=[override])


def test_missing_file_and_invalid_yaml(tmp_path):
    params_error(str(tmp_path / "absent.yaml"), "not found", path=tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n", encoding="utf-8")
    params_error(str(bad), "not valid YAML", path=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n", encoding="utf-8")
    params_error("top level must be a mapping", path=scalar)


def test_section_hash_changes_only_with_its_section():
    base = load_params()
    changed = load_params(overrides=["tokenize.rqvae.epochs=3"])
    assert base.section_hash("data") == changed.section_hash("data")
    assert base.section_hash("tokenize") != changed.section_hash("tokenize")
    assert len(base.section_hash("tokenize")) == 12


def test_a_key_given_twice_in_params_yaml_is_an_error(tmp_path):
    text = re.sub(r"^(  max_history: \d+)", r"\1\n  max_history: 30", (PROJECT_ROOT / "params.yaml").read_text(), count=1,
                  flags=re.M)
    assert text.count("  max_history: ") == 2
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="key 'max_history' given twice"):
        load_params(path)


def test_the_history_length_is_declared_once():
    # The models' history length is data.max_history; it cannot be set a second time.
    params = load_params(overrides=["data.max_history=7"])
    assert params.backbone.model.max_history == 7 and params.sasrec.max_len == 7
    with pytest.raises(ParamsError, match="unknown key 'backbone.model.max_history'"):
        load_params(overrides=["backbone.model.max_history=7"])


def test_a_derived_field_in_the_file_is_refused(tmp_path):
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["sasrec"]["max_len"] = 20
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="sasrec.max_len: not a key; it is data.max_history"):
        load_params(path)


def test_the_champion_rule_is_checked_where_it_is_read():
    params_error("evaluate.champion_p: need 0 < value <= 1, got 0.0", overrides=["evaluate.champion_p=0"])
    params_error("evaluate.champion_default", "'bm25' is not one of", overrides=["evaluate.champion_default=bm25"])
    assert load_params(overrides=["evaluate.champion_default="]).evaluate.champion_default == ""


def test_tiger_cf_weights_must_be_distinct_and_not_negative():
    for bad in ("[]", "[1, 1]", "[-1, 2]"):
        params_error("evaluate.cf_weights: need one or more distinct weights >= 0", overrides=[f"evaluate.cf_weights={bad}"])
    assert load_params(overrides=["evaluate.cf_weights=[2]"]).evaluate.cf_weights == (2.0,)


def test_the_sasrec_ensemble_is_checked_against_the_first_model_and_the_methods():
    p = load_params(overrides=["sasrec.seed=7", "sasrec_ensemble.seeds=[8, 9]"])
    assert p.sasrec_ensemble.seeds == (8, 9) and "sasrec_ens" in p.ranked_methods()
    # no ensemble: evaluate leaves sasrec_ens out, keeping every other method in order
    bare = load_params(overrides=["sasrec_ensemble.seeds=[]"])
    assert "sasrec_ens" in bare.evaluate.methods
    assert bare.ranked_methods() == tuple(m for m in bare.evaluate.methods if m != "sasrec_ens")
    for overrides, message in (
            (["sasrec.seed=7", "sasrec_ensemble.seeds=[7]"], "holds sasrec.seed 7"),
            (["sasrec_ensemble.seeds=[8, 8]"], "need distinct seeds"),
            (["sasrec_ensemble.weights=[]"], "one or more distinct weights"),
            (["sasrec_ensemble.weights=[-1.0]"], "one or more distinct weights"),
            (["sasrec_ensemble.seeds=[]", "candidates.method=sasrec_ens"], "candidates.method is sasrec_ens")):
        with pytest.raises(ParamsError, match=re.escape(message)):
            load_params(overrides=overrides)
