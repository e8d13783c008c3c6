"""NVFP4Recipe: presets match the paper's table, validation names the field and the allowed values."""

import pytest

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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_first_blocks=-1), "keep_first_blocks must be an integer >= 0; got -1"),
        (dict(keep_last_blocks=1.5), "keep_last_blocks must be an integer >= 0"),
        (dict(exclude="lm_head"), "exclude must be a list"),
        (dict(enabled="yes"), "enabled must be true or false"),
        (dict(backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'\)"),
        (dict(hadamard_signs=(1, 2)), "16 values"),
        (dict(weight=TensorPolicy(tile=(16, 16), hadamard=True)), "weight.hadamard must be false"),
        (dict(input=TensorPolicy(hadamard=False)), "input.hadamard and grad.hadamard must be equal"),
    ],
)
def test_validation_names_field_and_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recipe(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile="4x4"), "tile must be one of"),
        (dict(rounding="floor"), r"rounding must be one of \('nearest', 'stochastic'\)"),
    ],
)
def test_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorPolicy(**kwargs)


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['keep_first'\].*keep_first_blocks"):
        NVFP4Recipe.from_dict({"keep_first": 2})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['round'\] in nvfp4.grad.*rounding"):
        NVFP4Recipe.from_dict({"grad": {"round": "nearest"}})
    with pytest.raises(ValueError, match="unknown recipe preset 'fp8'"):
        NVFP4Recipe.from_dict({"preset": "fp8"})


def test_a_bad_policy_value_names_its_role():
    with pytest.raises(ValueError, match=r"nvfp4.grad: rounding must be one of"):
        NVFP4Recipe.from_dict({"grad": {"rounding": "floor"}})
