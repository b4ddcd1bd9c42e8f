"""Run configuration: shipped configs, validation on load, KEY=VALUE overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from patchcore.app.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["elpv", "mvtec", "autovi", "mvtec_loco", "visa", "mvtec_ad2"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.data.kind == name
    assert config.source == str(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("name", ["mvtec", "autovi", "mvtec_loco", "visa", "mvtec_ad2"])
def test_mvtec_and_autovi_configs_have_the_papers_settings(name):
    m = load_config(CONFIGS / f"{name}.yaml").model
    assert m.backbone == "wideresnet50"
    assert m.layers == ["layer2", "layer3"]
    assert (m.pretrain_embed_dimension, m.target_embed_dimension) == (1024, 1024)
    assert m.patchsize == 3
    assert (m.sampler, m.percentage) == ("approx_greedy_coreset", 0.1)
    assert m.num_neighbors == 1
    assert m.batch_size == 32
    assert m.resize == 256


def test_mvtec_config_resizes_to_256_and_crops_224():
    m = load_config(CONFIGS / "mvtec.yaml").model
    assert (m.resize, m.imagesize) == (256, 224)


def test_elpv_config_runs_offline_with_efficientnet_lite0():
    config = load_config(CONFIGS / "elpv.yaml")
    assert config.model.backbone == "efficientnet-lite0"
    assert config.data.root is None


def test_no_file_gives_the_defaults():
    config = load_config(None)
    assert config == Config(source="<defaults>")


# ----------------------------------------------------------------------------- validation on load


def test_unknown_top_level_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path / "c.yaml", {"projekt": "x"})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "projekt" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_nested_key_names_the_dotted_key_the_file_and_the_known_keys(tmp_path):
    path = _write(tmp_path / "c.yaml", {"model": {"percentag": 0.1}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "model.percentag" in message
    assert str(path) in message
    assert "percentage" in message.split("known keys", 1)[1]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"model": {"batch_size": "big"}}, "model.batch_size"),
        ({"model": {"batch_size": 4.5}}, "model.batch_size"),
        ({"model": {"batch_size": True}}, "model.batch_size"),  # a bool is not an integer
        ({"model": {"percentage": "ten"}}, "model.percentage"),
        ({"model": {"layers": "layer2"}}, "model.layers"),
        ({"model": {"resize": "256"}}, "model.resize"),
        ({"logging": {"progress": "maybe"}}, "logging.progress"),
        ({"seed": [1]}, "seed"),
        ({"data": {"objects": "bottle"}}, "data.objects"),
        ({"evaluation": {"spro_fpr_limits": [0.05, "x"]}}, "evaluation.spro_fpr_limits"),
    ],
)
def test_wrong_type_names_the_key_and_the_file(tmp_path, data, key):
    path = _write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_section_that_is_not_a_mapping_is_an_error(tmp_path):
    path = _write(tmp_path / "c.yaml", {"model": 5})
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(path)


def test_lossless_conversions_are_accepted(tmp_path):
    path = _write(
        tmp_path / "c.yaml",
        {"model": {"percentage": 1, "resize": [64, 48], "imagesize": None}, "data": {"objects": ["a", "b"]}},
    )
    config = load_config(path)
    assert config.model.percentage == 1.0 and isinstance(config.model.percentage, float)
    assert config.model.resize == [64, 48]
    assert config.model.imagesize is None
    assert config.data.objects == ["a", "b"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"data": {"kind": "imagenet"}}, "data.kind"),
        ({"model": {"sampler": "kmeans"}}, "model.sampler"),
        ({"model": {"distance": "cosine"}}, "model.distance"),
        ({"model": {"precision": "int8"}}, "model.precision"),
        ({"logging": {"online": "tensorboard"}}, "logging.online"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
        ({"model": {"percentage": 0.0}}, "model.percentage"),
        ({"model": {"percentage": 1.5}}, "model.percentage"),
        ({"model": {"batch_size": 0}}, "model.batch_size"),
        ({"model": {"num_neighbors": 0}}, "model.num_neighbors"),
    ],
)
def test_values_out_of_range_name_the_key_and_the_file(tmp_path, data, key):
    path = _write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["mvtec", "autovi", "folder"])
def test_data_sets_on_disk_need_a_root(tmp_path, kind):
    path = _write(tmp_path / "c.yaml", {"data": {"kind": kind}})
    with pytest.raises(ConfigError, match="data.root"):
        load_config(path)


def test_missing_file_invalid_yaml_and_non_mapping_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_empty_file_gives_the_defaults(tmp_path):
    config = load_config(_write(tmp_path / "empty.yaml", ""))
    assert config_to_dict(config) == config_to_dict(Config())


def test_config_dict_round_trips():
    config = load_config(CONFIGS / "autovi.yaml")
    again = config_from_dict(config_to_dict(config), source=config.source)
    assert again == config
    assert "source" not in config_to_dict(config)


# ----------------------------------------------------------------------------- overrides


def test_any_key_can_be_overridden_with_yaml_values():
    config = load_config(
        CONFIGS / "mvtec.yaml",
        [
            "model.percentage=0.05",
            "model.imagesize=null",
            "model.resize=[64, 48]",
            "model.layers=[layer1,layer2]",
            "data.objects=[bottle, cable]",
            "data.root=/data/mvtec",
            "evaluation.enabled=false",
            "logging.online=mlflow",
            "seed=7",
        ],
    )
    assert config.model.percentage == 0.05
    assert config.model.imagesize is None
    assert config.model.resize == [64, 48]
    assert config.model.layers == ["layer1", "layer2"]
    assert config.data.objects == ["bottle", "cable"]
    assert config.data.root == "/data/mvtec"
    assert config.evaluation.enabled is False
    assert config.logging.online == "mlflow"
    assert config.seed == 7
    # Untouched keys keep the file's values.
    assert config.model.backbone == "wideresnet50"


def test_override_fills_a_section_left_empty_in_the_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "model:\n  # percentage: 0.1\ndata:\n  kind: elpv\n")
    assert load_config(path).model.percentage == 0.1
    assert load_config(path, ["model.percentage=0.05"]).model.percentage == 0.05


def test_overrides_apply_to_the_defaults_without_a_file():
    config = load_config(None, ["model.backbone=resnet18"])
    assert config.model.backbone == "resnet18"


def test_string_keys_keep_number_like_override_values_as_text():
    config = load_config(CONFIGS / "mvtec.yaml", ["group=2024", "project=1.10", "model.weights=123"])
    assert config.group == "2024"
    assert config.project == "1.10"
    assert config.model.weights == "123"


def test_number_keys_still_reject_text_overrides():
    with pytest.raises(ConfigError, match="model.batch_size"):
        load_config(CONFIGS / "mvtec.yaml", ["model.batch_size=many"])


def test_unknown_override_key_names_the_key_and_the_override():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "mvtec.yaml", ["model.percent=0.05"])
    message = str(info.value)
    assert "model.percent" in message
    assert str(CONFIGS / "mvtec.yaml") in message
    assert "overrides model.percent=0.05" in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.percentage", "key=value"),
        ("model..percentage=0.1", "empty key part"),
        ("seed.value=1", "not a section"),
        ("model.resize=[1, 2", "cannot parse"),
    ],
)
def test_malformed_overrides_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "mvtec.yaml", [override])


def test_apply_overrides_does_not_change_its_input():
    data = {"model": {"percentage": 0.1}}
    out = apply_overrides(data, ["model.percentage=0.2", "data.kind=folder"])
    assert data == {"model": {"percentage": 0.1}}
    assert out == {"model": {"percentage": 0.2}, "data": {"kind": "folder"}}
