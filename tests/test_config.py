import pytest

from atq import QuantConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sparsity", -0.1), ("sparsity", 1.0), ("sparsity", float("nan")), ("group_size", 0),
        ("group_size", 2.5), ("mode", "bogus"), ("granularity", "column"), ("alpha", -1.0),
        ("threshold", -0.5), ("threshold", float("inf")),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
        QuantConfig(**{field: value})


def test_seed_preset_is_the_seed_recipe():
    config = QuantConfig.seed()
    assert (config.mode, config.alpha, config.threshold, config.granularity) == ("magnitude", 0.7, None, "tensor")


def test_round_trip_through_dict():
    config = QuantConfig(mode="sparsity", sparsity=0.3, granularity="row", exclude=("mlp",))
    again = QuantConfig.from_dict(config.to_dict())
    assert again == config and again.exclude == ("mlp",)


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown field"):
        QuantConfig.from_dict({"mode": "mse", "bits": 2})


def test_frozen():
    with pytest.raises(AttributeError):
        QuantConfig().mode = "sparsity"
