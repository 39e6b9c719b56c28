import numpy as np
import pytest
from oracle import sylvester

from oscar_cupy import PRESETS, QuantConfig


def test_default_is_the_paper_recipe():
    config = QuantConfig()
    fields = (config.bits, config.key_group, config.value_group, config.rotation, config.token_scaling, config.window)
    assert fields == (2, 32, 32, "hadamard", "l2", 256)
    assert config == QuantConfig.preset("oscar-2")


def test_presets():
    for bits in (2, 4):
        assert PRESETS[f"oscar-{bits}"].rotation == "hadamard" and PRESETS[f"oscar-{bits}"].token_scaling == "l2"
        assert PRESETS[f"kivi-{bits}"].rotation == "none" and PRESETS[f"kivi-{bits}"].token_scaling == "none"
        assert PRESETS[f"hadamard-only-{bits}"].token_scaling == "none"
        assert PRESETS[f"scaling-only-{bits}"].rotation == "none"
        assert all(c.bits == int(name[-1]) for name, c in PRESETS.items())
    assert QuantConfig.preset("kivi-2", key_group=128).key_group == 128
    assert QuantConfig.preset("hadamard_only_4") == PRESETS["hadamard-only-4"]
    with pytest.raises(ValueError, match="unknown preset"):
        QuantConfig.preset("oscar-3")


@pytest.mark.parametrize("field, value", [
    ("bits", 3), ("bits", True), ("key_group", 16), ("value_group", 256), ("token_scaling", "l1"),
    ("scale_dtype", "float64"), ("rotation", "random"), ("window", 0), ("window", 100), ("rotate_values", 1),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_window_must_hold_whole_key_groups():
    QuantConfig(key_group=128, window=256)
    with pytest.raises(ValueError, match="window.*multiple of key_group"):
        QuantConfig(key_group=128, window=192)


def test_custom_rotation_is_checked_and_copied(rng):
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    config = QuantConfig(rotation=q)
    q[0, 0] = 5.0
    assert config.rotation[0, 0] != 5.0 and not config.rotation.flags.writeable
    with pytest.raises(ValueError, match="rotation is not orthogonal"):
        QuantConfig(rotation=q)
    with pytest.raises(ValueError, match="rotation must be a square"):
        QuantConfig(rotation=np.ones((4, 8)))
    with pytest.raises(ValueError, match="value_group"):
        QuantConfig(value_group=128).check_head_dim(64)
    with pytest.raises(ValueError, match="rotation has shape"):
        QuantConfig(rotation=sylvester(64)).check_head_dim(128)
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        QuantConfig().check_head_dim(96)


def test_equality_and_hash():
    h = sylvester(64)
    assert QuantConfig(rotation=h) == QuantConfig(rotation=h.copy())
    assert hash(QuantConfig(rotation=h)) == hash(QuantConfig(rotation=h.copy()))
    assert QuantConfig() != QuantConfig(bits=4)
    assert len({QuantConfig(), QuantConfig(), QuantConfig(bits=4)}) == 2
