"""recipe.py: typed loading, every problem reported at once with dotted paths, overrides, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from incr_cli.config.recipe import (
    Recipe,
    build_recipe,
    iter_keys,
    load_recipe,
    recipe_to_yaml,
    strategy_presets,
)
from incr_cli.errors import RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def problems_of(data, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        build_recipe(data, "test.yaml", overrides)
    return info.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    assert isinstance(load_recipe(path), Recipe)


def test_defaults_and_frozen():
    recipe = build_recipe({})
    assert recipe.train.lr == 5e-5 and recipe.model.max_seq_len == 128
    with pytest.raises(AttributeError):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_names_dotted_path_and_suggests():
    (problem,) = problems_of({"train": {"learning_rate": 1e-4, "lr": 1e-4}})
    assert problem.startswith("train.learning_rate: unknown key")
    assert problems_of({"train": {"batch_sise": 4}}) == ["train.batch_sise: unknown key (did you mean 'batch_size'?)"]


def test_unknown_section_suggests():
    (problem,) = problems_of({"trian": {"lr": 1e-4}})
    assert problem.startswith("trian: unknown section") and "'train'" in problem


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "batch_size", "eight", "train.batch_size: expected an integer"),
    ("train", "batch_size", 2.5, "train.batch_size: expected an integer"),
    ("train", "lr", "fast", "train.lr: expected a number"),
    ("masking", "whole_word", "yes", "masking.whole_word: expected true or false"),
    ("train", "freeze", "bert.embeddings", "train.freeze: expected a list of strings"),
    ("model", "max_seq_len", None, "model.max_seq_len: must not be null"),
])
def test_wrong_types(section, key, value, expected):
    (problem,) = problems_of({section: {key: value}})
    assert problem.startswith(expected)


@pytest.mark.parametrize("section, key, value", [
    ("train", "batch_size", 0), ("train", "batch_size", -4), ("masking", "probability", 0.0),
    ("masking", "probability", 1.5), ("replay", "ratio", 1.0), ("train", "lr", 0.0), ("data", "heldout_fraction", 0.9),
])
def test_out_of_range(section, key, value):
    (problem,) = problems_of({section: {key: value}})
    assert problem.startswith(f"{section}.{key}: ") and "out of range" in problem


def test_bad_choice_suggests():
    (problem,) = problems_of({"train": {"schedule": "cosin"}})
    assert "train.schedule" in problem and "did you mean 'cosine'" in problem


def test_every_problem_is_reported_at_once():
    problems = problems_of({"train": {"lr": -1, "batch_sise": 4, "steps": "x"}, "bogus": {}, "masking": {"probability": 2}},
                           overrides=["eval.seed=-1", "nodot=1"])
    assert len(problems) == 7
    for fragment in ["train.lr", "train.batch_sise", "train.steps", "bogus", "masking.probability", "eval.seed", "nodot"]:
        assert any(fragment in p for p in problems), fragment
    # the file's and the command line's problems together, and the header says both are at fault
    with pytest.raises(RecipeError, match=r"^test\.yaml and the command-line overrides: 7 problems"):
        build_recipe({"train": {"lr": -1, "batch_sise": 4, "steps": "x"}, "bogus": {},
                      "masking": {"probability": 2}}, "test.yaml", ["eval.seed=-1", "nodot=1"])


def test_mask_ratios_must_fit():
    (problem,) = problems_of({"masking": {"mask_token_ratio": 0.9, "random_token_ratio": 0.2}})
    assert "mask_token_ratio + masking.random_token_ratio" in problem


def test_overrides_are_typed_like_yaml_and_win_over_the_file():
    recipe = build_recipe({"train": {"steps": 10, "lr": 1.0e-3}}, "f.yaml",
                          ["train.steps=100", "train.lr=0.5e-3", "masking.whole_word=true", "train.freeze=[embeddings]",
                           "data.sample=null", "train.schedule=linear"])
    assert recipe.train.steps == 100 and isinstance(recipe.train.steps, int)
    assert recipe.train.lr == 5e-4 and recipe.masking.whole_word is True
    assert recipe.train.freeze == ["embeddings"] and recipe.data.sample is None and recipe.train.schedule == "linear"
    assert recipe.train.epochs == 1.0 and isinstance(build_recipe({}, overrides=["train.epochs=2"]).train.epochs, float)


def test_override_errors_are_validated_the_same_way():
    assert problems_of({}, ["train.batch_size=0"])[0].startswith("train.batch_size: ")
    assert "did you mean 'steps'" in problems_of({}, ["train.step=3"])[0]


def test_override_exponent_without_dot():
    assert build_recipe({}, overrides=["train.lr=1e-4"]).train.lr == 1e-4


@pytest.mark.parametrize("name", sorted(strategy_presets()))
def test_strategy_presets_fix_their_keys(name):
    recipe = build_recipe({"strategy": {"name": name}, "distill": {"alpha": 0.7, "hidden_weight": 0.3},
                           "replay": {"ratio": 0.4}})
    for path, forced in strategy_presets()[name].items():
        section, key = path.split(".")
        assert getattr(getattr(recipe, section), key) == forced
    if name == "replay+distill":
        assert (recipe.distill.alpha, recipe.replay.ratio) == (0.7, 0.4)


def test_bad_yaml_missing_file_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*\n.*invalid YAML at line \d+"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(listed)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(evil)


def test_resolved_yaml_round_trips(tmp_path, tiny_recipe_path):
    recipe = load_recipe(tiny_recipe_path, ["train.steps=7"])
    out = tmp_path / "resolved.yaml"
    out.write_text(recipe_to_yaml(recipe))
    assert load_recipe(out) == recipe


def test_every_key_is_documented():
    keys = list(iter_keys())
    assert len({k.path for k in keys}) == len(keys) > 40
    assert all(k.help for k in keys)


def test_yaml_file_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    assert load_recipe(path).train.lr == 1e-4
