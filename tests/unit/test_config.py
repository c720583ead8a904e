"""fedtune.config: federation.yaml and recipes, with every error of a file reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedtune.config import (
    FederationConfig,
    Recipe,
    federation_to_yaml,
    load_federation,
    load_recipe,
    parse_model,
)
from fedtune.errors import BadInput

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32


def federation_data(**changes) -> dict:
    data = {
        "name": "testfed",
        "base_model": {"id": "some/model", "sha256": SHA},
        "seq_len": 64,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"steps": 5},
        "sites": [{"name": "clinic"}, {"name": "bank"}],
    }
    data.update(changes)
    return data


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def recipe_data(**changes) -> dict:
    data = {
        "name": "demo",
        "rounds": 2,
        "seq_len": 64,
        "sites": [{"name": "a", "inputs": ["data/a.jsonl"]}, {"name": "b", "inputs": ["data/b.jsonl"]}],
    }
    data.update(changes)
    return data


# --- load_federation -------------------------------------------------------------------------------


def test_valid_federation_loads_with_values_and_defaults(tmp_path):
    config = load_federation(write_yaml(tmp_path / "federation.yaml", federation_data()))
    assert isinstance(config, FederationConfig)
    assert config.name == "testfed"
    assert config.site_names() == ["clinic", "bank"]
    assert config.lora.r == 4 and config.lora.alpha == 8
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training.steps == 5
    assert config.training.lr == pytest.approx(2e-3)  # default kept
    assert config.seq_len == 64
    assert config.base_model.sha256 == SHA


def test_unknown_key_and_mistyped_value_reported_together(tmp_path):
    data = federation_data(training={"stepz": 5}, lora={"r": "eight"})
    path = write_yaml(tmp_path / "federation.yaml", data)
    with pytest.raises(BadInput) as info:
        load_federation(path)
    message = str(info.value)
    assert str(path) in message
    assert "training.stepz: unknown key" in message
    assert "lora.r: Input should be a valid integer" in message
    # one message, both problems, each its own "; "-separated part led by its key path
    problems = message.removeprefix(f"{path}: ").split("; ")
    assert sorted(problem.split(":")[0] for problem in problems) == ["lora.r", "training.stepz"]


def test_value_out_of_range_names_its_path(tmp_path):
    path = write_yaml(tmp_path / "f.yaml", federation_data(lora={"r": 0}, seq_len=4))
    with pytest.raises(BadInput) as info:
        load_federation(path)
    message = str(info.value)
    assert "lora.r:" in message and "seq_len:" in message


def test_missing_file_is_bad_input_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "federation.yaml"
    with pytest.raises(BadInput) as info:
        load_federation(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_invalid_yaml_is_bad_input(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("name: x\nsites: [unclosed\n  - a: b: c\n", encoding="utf-8")
    with pytest.raises(BadInput) as info:
        load_federation(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_file_that_is_not_utf8_is_bad_input(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_bytes(b"name: caf\xe9\xff\n")
    with pytest.raises(BadInput) as info:
        load_federation(path)
    assert str(path) in str(info.value)


def test_top_level_not_a_mapping_is_bad_input(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(BadInput, match="mapping"):
        load_federation(path)


def test_duplicate_site_names_rejected(tmp_path):
    data = federation_data(sites=[{"name": "clinic"}, {"name": "bank"}, {"name": "clinic"}])
    with pytest.raises(BadInput) as info:
        load_federation(write_yaml(tmp_path / "f.yaml", data))
    assert "sites" in str(info.value)
    assert "clinic" in str(info.value)
    assert "twice" in str(info.value)


def test_bad_site_name_rejected(tmp_path):
    data = federation_data(sites=[{"name": "../escape"}])
    with pytest.raises(BadInput, match=r"sites\.0\.name"):
        load_federation(write_yaml(tmp_path / "f.yaml", data))


def test_missing_sha256_is_bad_input(tmp_path):
    data = federation_data(base_model={"id": "some/model"})
    with pytest.raises(BadInput, match="base_model.sha256"):
        load_federation(write_yaml(tmp_path / "f.yaml", data))


def test_target_modules_string_is_split(tmp_path):
    data = federation_data(lora={"target_modules": "q_proj, v_proj,,k_proj"})
    config = load_federation(write_yaml(tmp_path / "f.yaml", data))
    assert config.lora.target_modules == ["q_proj", "v_proj", "k_proj"]
    config = load_federation(write_yaml(tmp_path / "g.yaml", federation_data(lora={"target_modules": "q_proj,v_proj"})))
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    config = load_federation(write_yaml(tmp_path / "h.yaml", federation_data(lora={"target_modules": "all-linear"})))
    assert config.lora.target_modules == "all-linear"


def test_data_bounds_checked():
    with pytest.raises(BadInput, match="min_chars must be below max_chars"):
        parse_model(FederationConfig, federation_data(data={"min_chars": 50, "max_chars": 10}), "test")


def test_federation_to_yaml_round_trips(tmp_path):
    original = parse_model(
        FederationConfig,
        federation_data(lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "q_proj,k_proj,v_proj"},
                        aggregation={"method": "trimmed-mean", "trim": 0.1, "quorum": 3},
                        data={"min_chars": 4, "max_chars": 999, "eval_fraction": 0.25}, seed=7),
        "test",
    )
    text = federation_to_yaml(original)
    assert text.startswith("#")
    path = tmp_path / "federation.yaml"
    path.write_text(text, encoding="utf-8")
    loaded = load_federation(path)
    assert loaded == original
    assert loaded.model_dump() == original.model_dump()
    assert loaded.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert loaded.aggregation.method == "trimmed-mean" and loaded.seed == 7


def test_unknown_aggregation_method_refused_naming_the_choices():
    with pytest.raises(BadInput, match="aggregation") as info:
        parse_model(FederationConfig, federation_data(aggregation={"method": "trimmed_mean"}), "x")
    assert "trimmed-mean" in str(info.value)


# --- recipes ---------------------------------------------------------------------------------------


def test_load_recipe_from_folder_and_from_yaml_path(tmp_path):
    folder = tmp_path / "myrecipe"
    path = write_yaml(folder / "recipe.yaml", recipe_data())
    from_folder, base1 = load_recipe(folder)
    from_file, base2 = load_recipe(path)
    from_str, base3 = load_recipe(str(path))
    assert isinstance(from_folder, Recipe)
    assert from_folder == from_file == from_str
    assert base1 == base2 == base3 == folder
    assert [s.name for s in from_folder.sites] == ["a", "b"]
    assert from_folder.sites[0].inputs == ["data/a.jsonl"]
    assert from_folder.rounds.count == 2


def test_load_recipe_folder_without_recipe_yaml(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput) as info:
        load_recipe(tmp_path / "empty")
    assert "recipe.yaml" in str(info.value)


def test_recipe_errors_reported_together(tmp_path):
    data = recipe_data(rounds=0, roundz=3)
    with pytest.raises(BadInput) as info:
        load_recipe(write_yaml(tmp_path / "r" / "recipe.yaml", data))
    message = str(info.value)
    assert "rounds.count:" in message and "roundz: unknown key" in message


def test_recipe_duplicate_sites_rejected(tmp_path):
    data = recipe_data(sites=[{"name": "a", "inputs": ["x.jsonl"]}, {"name": "a", "inputs": ["y.jsonl"]}])
    with pytest.raises(BadInput, match="twice: a"):
        load_recipe(write_yaml(tmp_path / "r" / "recipe.yaml", data))


def test_recipe_needs_two_sites_with_inputs(tmp_path):
    with pytest.raises(BadInput, match="sites"):
        load_recipe(write_yaml(tmp_path / "r1" / "recipe.yaml", recipe_data(sites=[{"name": "a", "inputs": ["x"]}])))
    bad = recipe_data(sites=[{"name": "a", "inputs": []}, {"name": "b", "inputs": ["y"]}])
    with pytest.raises(BadInput, match=r"sites\.0\.inputs"):
        load_recipe(write_yaml(tmp_path / "r2" / "recipe.yaml", bad))


def test_shipped_recipes_are_valid_and_their_inputs_exist():
    """Every recipes/*/recipe.yaml in the repository loads and names only files that exist (0 or more)."""
    found = sorted((REPO / "recipes").glob("*/recipe.yaml"))
    for path in found:
        recipe, folder = load_recipe(path.parent)
        assert folder == path.parent
        assert len(recipe.sites) >= 2
        names = [s.name for s in recipe.sites]
        assert len(set(names)) == len(names)
        for site in recipe.sites:
            for item in site.inputs:
                source = folder / item
                assert source.is_file(), f"{path}: site {site.name} names {item}, which does not exist"


def test_the_sum_only_list_agrees_with_the_methods_own_capabilities():
    """config checks privacy against fedtune.methods.SUM_ONLY (plain data); the classes declare `sum_only`."""
    from fedtune.aggregate import method_class
    from fedtune.methods import METHODS, SUM_ONLY

    assert set(SUM_ONLY) == {name for name in METHODS if method_class(name).sum_only}


def test_the_refactoring_list_agrees_with_the_methods_own_capabilities():
    """config refuses async rounds for fedtune.methods.REFACTORING (plain data); the classes declare `refactors`."""
    from fedtune.aggregate import method_class
    from fedtune.methods import METHODS, REFACTORING

    assert set(REFACTORING) == {name for name in METHODS if method_class(name).refactors}
