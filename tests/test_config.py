"""Run configurations: every shipped YAML loads, ``extends`` inherits, typos and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neurofm.config import CropConfig, RunConfig, load_config, parse_override, set_path
from neurofm.errors import NeurofmError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _write(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _raw_with_extends(path: Path) -> dict:
    """The YAML's own values merged onto those of the files it extends (what load_config must honour)."""
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("extends", None)
    if base is None:
        return raw
    merged = _raw_with_extends(path.parent / base)
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def test_the_shipped_configs_are_there():
    assert {"prepare.yaml", "pretrain.yaml", "evaluate.yaml", "full.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_config_loads_with_every_section_filled(path):
    device = str((_raw_with_extends(path).get("train") or {}).get("device", "auto"))
    if device.startswith("cuda") and not _cuda_available():
        with pytest.raises(NeurofmError, match="CUDA is not available"):  # refused early, in one line
            load_config(path)
        return
    assert isinstance(load_config(path), RunConfig)
    config = load_config(path, values={"data.path": "cells.h5ad"})  # your data: no demo overlay
    # what the file (and its bases) says wins over the defaults
    for section, values in _raw_with_extends(path).items():
        for key, value in (values or {}).items():
            if not isinstance(value, dict) or value:
                loaded = getattr(getattr(config, section), key)
                assert (list(loaded) if isinstance(loaded, tuple) else loaded) == value, f"{section}.{key}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_hold_only_what_they_change(path):
    """A YAML file says only what differs from the defaults in code (docs/configuration.md lists those)."""
    raw = yaml.safe_load(path.read_text()) or {}
    defaults = RunConfig()
    for section, values in raw.items():
        if section == "extends":
            continue
        for key, value in (values or {}).items():
            default = getattr(getattr(defaults, section), key)
            default = list(default) if isinstance(default, tuple) else default
            assert value != default, f"{path.name}: {section}.{key} repeats its default {default!r}"


def test_no_config_means_the_defaults():
    config = load_config(None)
    assert config.data.path is None and config.default_data.cluster_ids == [2523, 210]
    # the built-in demo's overlay (default_data) laid over the sections it selects with
    assert config.crop == CropConfig(n_cells=1200, n_genes=800)
    assert config.subset.cluster_ids == [2523, 210] and config.region.value == "Cerebral cortex"
    yours = load_config(None, values={"data.path": "cells.h5ad"})
    assert yours.crop == CropConfig() and yours.subset.cluster_ids == [] and yours.region.value is None


def test_pretrain_inherits_the_prepare_sections():
    prepare, pretrain = load_config(CONFIGS / "prepare.yaml"), load_config(CONFIGS / "pretrain.yaml")
    for section in ("data", "default_data", "subset", "region", "dedupe", "crop", "reports"):
        assert getattr(pretrain, section) == getattr(prepare, section), section
    assert pretrain.tokenizer.n_bins == 20


def test_extends_merges_nested_sections_and_child_wins(tmp_path):
    _write(tmp_path / "base.yaml", {"crop": {"n_cells": 100, "n_genes": 50}, "region": {"value": "Cortex"}})
    (tmp_path / "sub").mkdir()
    child = _write(tmp_path / "sub" / "child.yaml", {"extends": "../base.yaml", "crop": {"n_genes": 20}})
    config = load_config(child, values={"data.path": "cells.h5ad"})
    assert config.crop.n_cells == 100  # inherited
    assert config.crop.n_genes == 20  # overridden
    assert config.crop.seed == CropConfig().seed  # default
    assert config.region.value == "Cortex"


def test_extends_chains_over_several_files(tmp_path):
    _write(tmp_path / "a.yaml", {"train": {"epochs": 3}, "crop": {"seed": 1}})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "train": {"batch_size": 8}})
    config = load_config(_write(tmp_path / "c.yaml", {"extends": "b.yaml", "crop": {"seed": 7}}))
    assert config.train.epochs == 3 and config.train.batch_size == 8
    assert config.crop.seed == 7


def test_extends_cycle_is_refused(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(NeurofmError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_or_file_is_refused(tmp_path):
    with pytest.raises(NeurofmError, match="does not exist"):
        load_config(_write(tmp_path / "a.yaml", {"extends": "nope.yaml"}))
    with pytest.raises(NeurofmError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "content, message",
    [
        ("crop: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping of sections"),
        ("region: 5\n", "section 'region' must be a mapping"),
        ("train: [1]\n", "section 'train' must be a mapping"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, message):
    with pytest.raises(NeurofmError, match=message):
        load_config(_write(tmp_path / "bad.yaml", content))


def test_unknown_section_names_the_known_sections(tmp_path):
    with pytest.raises(NeurofmError) as error:
        load_config(_write(tmp_path / "bad.yaml", {"croop": {"n_cells": 5}}))
    message = str(error.value)
    assert "croop" in message and "known sections" in message
    assert all(section in message for section in ("data", "crop", "train", "tokenizer"))
    assert "\n" not in message


@pytest.mark.parametrize(
    "section, key, known",
    [
        ("crop", "n_cell", "n_cells"),
        ("data", "pth", "path"),
        ("train", "epoch", "epochs"),
        ("model", "width", "d_model"),
    ],
)
def test_unknown_key_names_the_known_keys(tmp_path, section, key, known):
    with pytest.raises(NeurofmError) as error:
        load_config(_write(tmp_path / "bad.yaml", {section: {key: 1}}))
    message = str(error.value)
    assert f"'{section}'" in message and key in message and "known keys" in message and known in message


def test_unknown_key_via_set_is_refused_too():
    with pytest.raises(NeurofmError, match="unknown key.*bogus"):
        load_config(CONFIGS / "prepare.yaml", ["region.bogus=1"])
    with pytest.raises(NeurofmError, match="unknown config section"):
        load_config(CONFIGS / "prepare.yaml", ["nosuch.key=1"])


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.epochs=5", ["train", "epochs"], 5),
        ("train.lr=1e-3", ["train", "lr"], 1e-3),
        ("subset.cluster_ids=[2523, 210]", ["subset", "cluster_ids"], [2523, 210]),
        ("region.value=Cerebral cortex", ["region", "value"], "Cerebral cortex"),
        ("region.value=null", ["region", "value"], None),
        ("crop.drop_all_zero=false", ["crop", "drop_all_zero"], False),
        ("data.path=/tmp/a=b.h5ad", ["data", "path"], "/tmp/a=b.h5ad"),
        ("evaluate.probe.seed=3", ["evaluate", "probe", "seed"], 3),
        (
            "default_data.crop={n_cells: 10, n_genes: 5}",
            ["default_data", "crop"],
            {"n_cells": 10, "n_genes": 5},
        ),
        ("data.path=[unclosed", ["data", "path"], "[unclosed"),  # not YAML: kept as text
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["train.epochs", "epochs=5", "=5", ".=5"])
def test_malformed_override_is_refused(text):
    with pytest.raises(NeurofmError, match="--set"):
        parse_override(text)


def test_overrides_apply_after_the_file_and_in_order():
    config = load_config(
        CONFIGS / "pretrain.yaml",
        [
            "data.path=cells.h5ad",
            "crop.n_cells=300",
            "train.epochs=2",
            "train.epochs=3",
            "evaluate.probe.seed=9",
            "region.value=Cortex",
        ],
    )
    assert config.crop.n_cells == 300 and config.train.epochs == 3
    assert config.evaluate.probe.seed == 9
    assert config.region.value == "Cortex"
    assert config.crop.n_genes is None  # untouched neighbours keep the file's value


def test_set_path_refuses_to_descend_into_a_value():
    config = {"region": {"value": "Cortex"}}
    with pytest.raises(NeurofmError, match="not a section"):
        set_path(config, ["region", "value", "x"], 1)
    set_path(config, ["crop", "n_cells"], 10)
    assert config["crop"] == {"n_cells": 10}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.mask_ratio=1.5", "mask_ratio"),
        ("train.mask_ratio=0", "mask_ratio"),
        ("train.epochs=0", "epochs"),
        ("train.val_fraction=1", "val_fraction"),
        ("train.lr=-1", "lr"),
        ("train.mask_ratio=lots", "train"),
        ("model.n_heads=3", "multiple of n_heads"),  # d_model 64
        ("model.dropout=1.0", "dropout"),
        ("tokenizer.n_bins=1", "n_bins"),
        ("tokenizer.binning=linear", "binning"),
    ],
)
def test_out_of_range_dataclass_values_are_refused(override, message):
    with pytest.raises(NeurofmError, match=message) as error:
        load_config(CONFIGS / "pretrain.yaml", [override])
    assert "\n" not in str(error.value)


def test_in_range_dataclass_values_are_kept():
    config = load_config(
        CONFIGS / "pretrain.yaml", ["train.mask_ratio=0.3", "model.d_model=32", "model.n_heads=2"]
    )
    assert config.train.mask_ratio == 0.3
    assert (config.model.d_model, config.model.n_heads) == (32, 2)


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML reads ``1e-3`` as a string (YAML 1.1); configs read it as the float users mean."""
    config = load_config(
        _write(tmp_path / "c.yaml", "train:\n  lr: 1e-3\n  weight_decay: 5E-2\n"), ["train.lr=2e-4"]
    )
    assert config.train.lr == pytest.approx(2e-4) and config.train.weight_decay == pytest.approx(0.05)
    assert load_config(tmp_path / "c.yaml").train.lr == pytest.approx(1e-3)


def test_the_built_in_data_gets_its_own_budget_and_your_data_the_train_defaults():
    from neurofm.train import TrainConfig

    demo = load_config(None)
    assert demo.train.epochs == demo.default_data.train["epochs"] == 10
    assert load_config(None, values={"data.path": "cells.h5ad"}).train.epochs == TrainConfig().epochs
    assert load_config(None, ["train.epochs=3"]).train.epochs == 3  # the user's own keys win
    steps = load_config(None, ["train.max_steps=7"]).train
    assert steps.max_steps == 7 and steps.epochs == TrainConfig().epochs  # a step budget replaces it
    assert demo.reference.label_columns == ("subtype",)  # the demo's reference, for `neurofm map`
    assert load_config(None, values={"data.path": "cells.h5ad"}).reference.label_columns == ()


def test_run_notes_name_the_demo_budget_and_a_capped_baseline():
    from neurofm.runs import run_notes

    demo = run_notes(load_config(None), {"default_data": True})
    assert len(demo) == 1 and "10 epochs" in demo[0] and "30 epochs" in demo[0]
    assert run_notes(load_config(None), {"default_data": True}, pretrained=False) == []
    capped = run_notes(load_config(None, ["evaluate.scvi_max_epochs=20"]), {"default_data": False})
    assert len(capped) == 1 and "capped at 20 epochs" in capped[0]


def test_the_configuration_reference_is_current():
    from pathlib import Path

    from neurofm.config_docs import configuration_markdown

    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert page.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run `python -m neurofm.config_docs > docs/configuration.md`"
    )
    for key in ("| `epochs` |", "| `unknown_quantile` |", "| `baselines` |", "| `C_grid` |"):
        assert key in page.read_text()


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"evaluate": {"probe": {"C_grd": [1.0]}}},
            "in config section 'evaluate.probe' (did you mean C_grd → C_grid?)",
        ),
        ({"evaluate": {"cluster": {"resolutionz": 1.0}}}, "(did you mean resolutionz → resolution?)"),
        ({"trian": {}}, "(did you mean trian → train?)"),
        ({"train": {"epoch": 3}}, "(did you mean epoch → epochs?)"),
        ({"evaluate": {"probe": []}}, "config section 'evaluate.probe' must be a mapping"),
        (
            {"reference": {"head": {"featurs": "auto"}}},
            "in config section 'reference.head' (did you mean featurs → features?)",
        ),
        (
            {"tune": {"pruner": {"n_warmup": 2}}},
            "in config section 'tune.pruner' (did you mean n_warmup → n_warmup_steps?)",
        ),
        ({"train": {"epochs": "ten"}}, "bad value in config section 'train': epochs='ten' is not an integer"),
        (
            {"evaluate": {"cluster": {"n_neighbors": 1.5}}},
            "config section 'evaluate.cluster': n_neighbors=1.5 is not an integer",
        ),
        (
            {"evaluate": {"probe": {"C_grid": "big"}}},
            "config section 'evaluate.probe': C_grid='big' is not a list",
        ),
        (
            {"crop": {"drop_all_zero": "maybe"}},
            "config section 'crop': drop_all_zero='maybe' is not true or false",
        ),
        (
            {"evaluate": {"pooling": "sum"}},
            "pooling='sum' is not one of 'auto', 'mean', 'mean_nonzero' or 'max'",
        ),
    ],
)
def test_unknown_keys_and_wrong_types_anywhere_are_refused_in_one_line_naming_the_nearest_key(
    config, message
):
    from neurofm.config import validate

    with pytest.raises(NeurofmError) as error:
        validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)
