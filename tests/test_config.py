"""Config loading: YAML + dotted overrides, and every error path names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mult import ConfigError, load_config
from mult.config import from_dict, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_config_is_the_paper_setting():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.model.encoder.startswith("swin_large")
    assert set(cfg.tasks) == {
        "segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture", "reshading",
    }
    assert cfg.train.global_batch_size == 32
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.scaling.num_workers == 32 and cfg.scaling.use_gpu
    assert cfg.model.stem == "patch"  # Swin's patch projection, as pretrained


def test_cpu_small_is_tiny_and_on_two_cpu_workers():
    cfg = load_config(CONFIGS / "cpu-small.yaml")
    assert 64 <= cfg.model.img_size <= 128
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.model.encoder.startswith("swin_tiny")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        CONFIGS / "cpu-small.yaml",
        ["train.max_steps=7", "optim.lr=0.5", "loss_weights.normal=2", "model.shared_attention=none"],
    )
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == 0.5
    assert cfg.loss_weights["normal"] == 2.0 and isinstance(cfg.loss_weights["normal"], float)
    assert cfg.model.shared_attention == "none"
    assert cfg.weight("depth_zbuffer") == 1.0  # unspecified: the task table's default


def test_override_file_merges(tmp_path):
    extra = tmp_path / "best.yaml"
    extra.write_text("loss_weights:\n  depth_zbuffer: 3.5\n")
    cfg = load_config(CONFIGS / "cpu-small.yaml", [f"@{extra}"])
    assert cfg.loss_weights == {"depth_zbuffer": 3.5}


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(CONFIGS / "cpu-small.yaml", ["train.seed=3"])
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_stepz=3", "'train.max_stepz' (did you mean 'train.max_steps'?)"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("model.pretrained=yes please", "model.pretrained: expected true or false"),
        ("model.shared_attention=foo", "choose one of ['reference', 'official', 'encoder', 'none']"),
        ("tasks=[normal, sky]", "unknown task 'sky'"),
        ("loss_weights.normal=-1", "loss_weights.normal: weights must be finite and >= 0"),
        ("loss_weights.normal=.inf", "loss_weights.normal: weights must be finite"),
        ("noequals", "must look like key=value"),
        ("train.max_steps.x=1", "train.max_steps is not a section"),
        ("train.global_batch_size=7", "multiple of micro_batch_size x num_workers"),
        ("model.img_size=100", "model.img_size: must be a positive multiple of 32"),
        ("tune.weight_range=[2, 1]", "tune.weight_range"),
        ("tune.extra_arms=[magic]", "tune.extra_arms: 'magic' is not allowed"),
        ("data.storage_retry_s=0", "data.storage_retry_s: must be a finite number of seconds > 0"),
        ("data.storage_timeout_s=-1", "data.storage_timeout_s: must be a finite number of seconds > 0"),
        ("model.stem=pixels", "model.stem: 'pixels' is not allowed; choose one of ['patch', 'conv']"),
        ("model.pretrained=true", "model.stem: 'conv' replaces the pretrained patch projection"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "cpu-small.yaml", [override])
    assert fragment in str(err.value)


def test_reference_task_must_be_configured():
    with pytest.raises(ConfigError, match="model.reference_task"):
        load_config(CONFIGS / "cpu-small.yaml", ["tasks=[depth_zbuffer]"])
    cfg = load_config(CONFIGS / "cpu-small.yaml", ["tasks=[depth_zbuffer]", "model.shared_attention=none"])
    assert cfg.tasks == ["depth_zbuffer"]


def test_weight_for_unconfigured_task_is_refused():
    with pytest.raises(ConfigError, match="loss_weights.normal: not one of the configured tasks"):
        load_config(
            CONFIGS / "cpu-small.yaml",
            ["tasks=[depth_zbuffer]", "model.shared_attention=none", "loss_weights.normal=1"],
        )


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "section.yaml").write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(tmp_path / "section.yaml")


def test_tune_checks_apply_only_to_a_search():
    from mult.config import validate_tune

    cfg = load_config(CONFIGS / "cpu-small.yaml", ["tasks=[depth_zbuffer]", "model.shared_attention=none"])
    with pytest.raises(ConfigError, match="tune.fixed_task: 'normal' is not among tasks"):
        validate_tune(cfg)
    validate_tune(load_config(CONFIGS / "cpu-small.yaml"))


def test_scientific_notation_without_a_dot_is_a_number():
    cfg = load_config(CONFIGS / "cpu-small.yaml", ["optim.lr=3e-3"])
    assert cfg.optim.lr == pytest.approx(0.003)


def test_derive_changes_dotted_keys_and_validates() -> None:
    from mult.config import derive

    base = load_config(CONFIGS / "cpu-small.yaml")
    cfg = derive(base, {"train.max_steps": 7, "loss_weights": {"normal": 2.0}, "data.train": "/x"})
    assert cfg.train.max_steps == 7 and cfg.loss_weights == {"normal": 2.0} and cfg.data.train == "/x"
    assert cfg.train.global_batch_size == base.train.global_batch_size  # the rest of the section is kept
    assert base.train.max_steps != 7 and base.data.train is None  # the original is untouched
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        derive(base, {"train.max_step": 7})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        derive(base, {"train.max_steps": "many"})


def test_one_image_size_key() -> None:
    with pytest.raises(ConfigError, match="'data.image_size' is now 'model.img_size'"):
        load_config(CONFIGS / "cpu-small.yaml", ["data.image_size=64"])
