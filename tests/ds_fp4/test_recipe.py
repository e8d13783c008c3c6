"""NVFP4Recipe: presets match the paper's table, validation names the field and the allowed values."""

import dataclasses

import pytest

from ds_fp4.engine import NVFP4Config
from ds_fp4.recipe import NVFP4Recipe, TensorPolicy


def test_paper_preset_is_the_design_table():
    r = NVFP4Recipe.paper()
    assert r == NVFP4Recipe()
    assert (r.input.tile, r.input.rounding, r.input.hadamard) == ((1, 16), "nearest", True)
    assert (r.weight.tile, r.weight.rounding, r.weight.hadamard) == ((16, 16), "nearest", False)
    assert (r.grad.tile, r.grad.rounding, r.grad.hadamard) == ((1, 16), "stochastic", True)
    assert r.enabled


def test_ablations_change_exactly_one_thing():
    paper = NVFP4Recipe.paper()
    assert NVFP4Recipe.no_rht().input.hadamard is False and NVFP4Recipe.no_rht().grad.hadamard is False
    assert NVFP4Recipe.no_rht().weight == paper.weight
    assert NVFP4Recipe.no_sr().grad.rounding == "nearest" and NVFP4Recipe.no_sr().input == paper.input
    assert NVFP4Recipe.no_2d().weight.tile == (1, 16) and NVFP4Recipe.no_2d().grad == paper.grad
    assert (NVFP4Recipe.all_fp4().keep_first_blocks, NVFP4Recipe.all_fp4().keep_last_blocks) == (0, 0)
    assert NVFP4Recipe.all_fp4().weight == paper.weight
    assert NVFP4Recipe.bf16().enabled is False


def test_presets_keep_overrides():
    r = NVFP4Recipe.no_sr(keep_first_blocks=2, keep_last_blocks=8, exclude=["*.down_proj"])
    assert (r.keep_first_blocks, r.keep_last_blocks, r.exclude) == (2, 8, ("*.down_proj",))


def test_dict_round_trip_and_preset_key():
    r = NVFP4Recipe.from_dict({"preset": "no_rht", "keep_last_blocks": 3, "weight": {"tile": "1x16"}})
    assert r.input.hadamard is False and r.keep_last_blocks == 3 and r.weight.tile == (1, 16)
    assert NVFP4Recipe.from_dict(r.to_dict()) == r


# Built in Python: pydantic's error names the class, the field, the rule and the value.
@pytest.mark.parametrize(
    "kwargs, field, rule, value",
    [
        (dict(keep_first_blocks=-1), "keep_first_blocks", "Input should be greater than or equal to 0", "-1"),
        (dict(keep_last_blocks=1.5), "keep_last_blocks", "Input should be a valid integer", "1.5"),
        (dict(keep_last_blocks=True), "keep_last_blocks", "Input should be a valid integer", "True"),
        (dict(exclude="lm_head"), "exclude", "Input should be a valid tuple", "'lm_head'"),
        (dict(enabled="yes"), "enabled", "Input should be a valid boolean", "'yes'"),
        (dict(backend="cuda"), "backend", "Input should be 'auto', 'torch' or 'triton'", "'cuda'"),
        (dict(hadamard_signs=(1, 2)), "hadamard_signs", r"Value error, hadamard signs must be 16 values.*",
         r"\(1, 2\)"),
        (dict(bogus=1), "bogus", "Unexpected keyword argument", "1"),
    ],
)
def test_validation_names_field_and_allowed_values(kwargs, field, rule, value):
    match = rf"validation error for NVFP4Recipe\n{field}\n  {rule} .*input_value={value},"
    with pytest.raises(ValueError, match=match):
        NVFP4Recipe(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=TensorPolicy(tile=(16, 16), hadamard=True)), "weight.hadamard must be false"),
        (dict(input=TensorPolicy(hadamard=False)), "input.hadamard and grad.hadamard must be equal"),
    ],
)
def test_rules_between_fields_say_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recipe(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field, rule, value",
    [
        (dict(tile="4x4"), "tile", r"Value error, tile must be one of .*got \(4, 4\)", "'4x4'"),
        (dict(rounding="floor"), "rounding", "Input should be 'nearest' or 'stochastic'", "'floor'"),
        (dict(hadamard=1), "hadamard", "Input should be a valid boolean", "1"),
    ],
)
def test_policy_validation(kwargs, field, rule, value):
    match = rf"validation error for TensorPolicy\n{field}\n  {rule} .*input_value={value},"
    with pytest.raises(ValueError, match=match):
        TensorPolicy(**kwargs)


def test_recipes_are_frozen_and_replace_revalidates():
    r = NVFP4Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.keep_first_blocks = 3
    with pytest.raises(ValueError, match="keep_first_blocks"):
        dataclasses.replace(r, keep_first_blocks=-2)
    assert NVFP4Recipe(exclude=["a"], hadamard_signs=list(r.hadamard_signs)) == NVFP4Recipe(exclude=("a",))


# From the "nvfp4" JSON section: the same errors, phrased as nvfp4.<key>, unknown keys with the valid ones.
def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['keep_first'\] in the \"nvfp4\" config section; "
                                         r"valid keys: \[.*'keep_first_blocks'.*'preset'"):
        NVFP4Config.from_dict({"keep_first": 2})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['round'\] in the \"nvfp4.grad\" config section; "
                                         r"valid keys: \['hadamard', 'rounding', 'tile'\]"):
        NVFP4Config.from_dict({"grad": {"round": "nearest"}})
    with pytest.raises(ValueError, match="unknown recipe preset 'fp8'"):
        NVFP4Config.from_dict({"preset": "fp8"})


def test_a_bad_policy_value_names_its_role():
    with pytest.raises(ValueError, match=r"^nvfp4.grad.rounding must be 'nearest' or 'stochastic'; got 'floor'$"):
        NVFP4Config.from_dict({"grad": {"rounding": "floor"}})
    with pytest.raises(ValueError, match=r"^nvfp4: weight.hadamard must be false: the weight feeds"):
        NVFP4Config.from_dict({"weight": {"hadamard": True}})
    with pytest.raises(ValueError, match=r"^nvfp4.keep_last_blocks must be a valid integer; got 'two'\n"
                                         r"nvfp4.enabled must be a valid boolean; got 'yes'$"):
        NVFP4Config.from_dict({"keep_last_blocks": "two", "enabled": "yes"})  # every error, one line each
