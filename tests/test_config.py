import json
import pickle
from pathlib import Path

import pytest

from atq import QuantConfig
from atq.config import Calibration, EndToEnd, MixedPrecision, Reconstruction

RESULTS = Path(__file__).resolve().parents[1] / "results"
CALIBRATED = QuantConfig(calibration="wikitext2_valid", granularity="group", group_size=64)
# a switch that turns each stage on, so that a bad value of one of its fields reaches the stage's check
SWITCH_ON = {"calibration": {"calibration": "wikitext2_valid"}, "reconstruction": {"reconstruct_steps": 8},
             "end_to_end": {"end_to_end_steps": 8}, "mixed_precision": {"fp_fraction": 0.2}, None: {}}


@pytest.mark.parametrize(
    ("keyword", "value", "named", "allowed"),
    [
        ("sparsity", -0.1, "QuantConfig.sparsity", "[0, 1)"), ("sparsity", 1.0, "QuantConfig.sparsity", "[0, 1)"),
        ("sparsity", float("nan"), "QuantConfig.sparsity", "[0, 1)"),
        ("group_size", 0, "QuantConfig.group_size", ">= 1"), ("group_size", 2.5, "QuantConfig.group_size", ">= 1"),
        ("mode", "bogus", "QuantConfig.mode", "one of"), ("granularity", "column", "QuantConfig.granularity", "one of"),
        ("alpha", -1.0, "QuantConfig.alpha", ">= 0"), ("threshold", -0.5, "QuantConfig.threshold", ">= 0"),
        ("threshold", float("inf"), "QuantConfig.threshold", ">= 0"),
        ("quantize_head", "yes", "QuantConfig.quantize_head", "True or False"),
        ("planes", 0, "QuantConfig.planes", "[1, 4]"), ("planes", 5, "QuantConfig.planes", "[1, 4]"),
        ("packing", "3bit", "QuantConfig.packing", "one of"),
        ("activations", "int4", "QuantConfig.activations", "one of"),
        ("embedding", "q2_k", "QuantConfig.embedding", "one of"),
        ("rotation", "random", "QuantConfig.rotation", "one of"),
        ("calibration", "", "Calibration.source (QuantConfig.calibration)", "text file"),
        ("calibration_windows", 0, "Calibration.windows (QuantConfig.calibration_windows)", ">= 1"),
        ("calibration_seq_len", 1, "Calibration.seq_len (QuantConfig.calibration_seq_len)", ">= 2"),
        ("compensation", 1, "Calibration.compensation (QuantConfig.compensation)", "True or False"),
        ("damp", 0.0, "Calibration.damp (QuantConfig.damp)", "> 0"),
        ("block_size", 0, "Calibration.block_size (QuantConfig.block_size)", ">= 1"),
        ("reconstruct_steps", -1, "Reconstruction.steps (QuantConfig.reconstruct_steps)", ">= 1"),
        ("reconstruct_lr", 0.0, "Reconstruction.lr (QuantConfig.reconstruct_lr)", "> 0"),
        ("reconstruct_target", "x", "Reconstruction.target (QuantConfig.reconstruct_target)", "one of"),
        ("reconstruct_weight_lr", -1e-5, "Reconstruction.weight_lr (QuantConfig.reconstruct_weight_lr)", ">= 0"),
        ("end_to_end_steps", 2.5, "EndToEnd.steps (QuantConfig.end_to_end_steps)", ">= 1"),
        ("end_to_end_lr", float("nan"), "EndToEnd.lr (QuantConfig.end_to_end_lr)", "> 0"),
        ("fp_fraction", 1.0, "MixedPrecision.fp_fraction (QuantConfig.fp_fraction)", "(0, 1)"),
        ("sensitivity", "hessian", "MixedPrecision.sensitivity (QuantConfig.sensitivity)", "one of"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(keyword, value, named, allowed):
    stage = next(k.stage for k in QuantConfig.keywords() if k.name == keyword)
    keywords = {**SWITCH_ON[stage], keyword: value}
    with pytest.raises(ValueError) as error:
        QuantConfig(**keywords)
    message = str(error.value)
    assert message.startswith(named) and allowed in message and repr(value) in message


def test_every_keyword_is_in_the_bad_value_table():
    table = test_bad_values_name_the_field_and_the_allowed_range.pytestmark[0].args[1]
    assert {row[0] for row in table} == {k.name for k in QuantConfig.keywords()} - {"include", "exclude"}


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_a_single_pattern_string_is_refused_not_split_into_characters(field):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field} must be a list or tuple .*got 'mlp'"):
        QuantConfig(**{field: "mlp"})
    with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
        QuantConfig(**{field: ["mlp", 3]})
    assert getattr(QuantConfig(**{field: ["mlp", "attn"]}), field) == ("mlp", "attn")


def test_stage_objects_validate_their_own_fields():
    with pytest.raises(ValueError, match=r"Reconstruction\.steps .* must be an integer >= 1 .*got 0"):
        Reconstruction(steps=0)
    with pytest.raises(ValueError, match=r"Calibration\.windows"):
        Calibration(windows=-3)
    with pytest.raises(ValueError, match=r"MixedPrecision\.fp_fraction"):
        MixedPrecision(fp_fraction=0.0)
    with pytest.raises(ValueError, match=r"QuantConfig\.reconstruction must be None or Reconstruction"):
        QuantConfig(reconstruction=EndToEnd())


def test_stages_are_off_by_default_and_defaults_are_the_documented_ones():
    config = QuantConfig()
    assert (config.rotation, config.calibration, config.reconstruction, config.end_to_end,
            config.mixed_precision) == (None, None, None, None, None)
    assert Calibration() == Calibration("wikitext2_valid", 128, 2048, True, 0.01, 128)
    assert Reconstruction() == Reconstruction(96, 1e-3, "fp", 0.0)
    assert EndToEnd() == EndToEnd(128, 1e-4) and MixedPrecision() == MixedPrecision(0.2, "gradient")


def test_flat_keywords_set_the_stages():
    config = QuantConfig(calibration="data.txt", calibration_windows=64, calibration_seq_len=512,
                         compensation=False, damp=0.05, block_size=32, reconstruct_steps=7, reconstruct_lr=2e-3,
                         reconstruct_target="block", reconstruct_weight_lr=1e-5, end_to_end_steps=3,
                         end_to_end_lr=5e-5, fp_fraction=0.1, sensitivity="measured", rotation="hadamard")
    assert config == QuantConfig(
        calibration=Calibration("data.txt", 64, 512, False, 0.05, 32),
        reconstruction=Reconstruction(7, 2e-3, "block", 1e-5), end_to_end=EndToEnd(3, 5e-5),
        mixed_precision=MixedPrecision(0.1, "measured"), rotation="hadamard")
    assert QuantConfig(reconstruct_steps=5).reconstruction == Reconstruction(steps=5)  # windows may come as a tensor
    off = QuantConfig(calibration=None, reconstruct_steps=0, end_to_end_steps=0, fp_fraction=0.0, rotation="none")
    assert off == QuantConfig() and off.rotation is None


@pytest.mark.parametrize(
    ("keywords", "switch"),
    [({"calibration_windows": 64}, "calibration=SOURCE"), ({"damp": 0.1, "calibration": None}, "calibration=SOURCE"),
     ({"reconstruct_lr": 1e-3}, "reconstruct_steps="), ({"reconstruct_steps": 0, "reconstruct_target": "block"},
                                                          "reconstruct_steps="),
     ({"end_to_end_lr": 1e-3}, "end_to_end_steps="), ({"sensitivity": "measured"}, "fp_fraction=")],
)
def test_a_field_of_a_stage_that_is_off_is_an_error_naming_the_switch(keywords, switch):
    keyword = next(k for k in keywords if k != "calibration" and keywords[k] not in (0, None))
    with pytest.raises(ValueError, match=rf"{keyword} sets the \w+ stage, which is off: give {switch}"):
        QuantConfig(**keywords)


def test_replace_applies_keywords_on_top_of_the_stages():
    tuned = CALIBRATED.replace(reconstruct_steps=96)
    assert tuned.calibration == CALIBRATED.calibration and tuned.reconstruction == Reconstruction(steps=96)
    fewer = tuned.replace(calibration_windows=64)
    assert fewer.calibration == Calibration(windows=64) and fewer.reconstruction == tuned.reconstruction
    assert fewer.replace(calibration="generated").calibration == Calibration(source="generated", windows=64)
    assert tuned.replace(reconstruct_lr=5e-4).reconstruction == Reconstruction(steps=96, lr=5e-4)
    assert tuned.replace(reconstruct_steps=0).reconstruction is None
    assert tuned.replace(calibration=None).calibration is None and tuned.replace(calibration=None).reconstruction
    assert tuned.replace(mode="sparsity").calibration == CALIBRATED.calibration
    assert CALIBRATED.replace(end_to_end=EndToEnd(steps=4)).end_to_end == EndToEnd(steps=4)
    with pytest.raises(TypeError, match="unknown keyword 'bits'"):
        CALIBRATED.replace(bits=2)


def test_calibrated_sparsity_targets_take_one_plane():
    QuantConfig(mode="sparsity", planes=2)  # weight-only: fine
    with pytest.raises(ValueError, match="QuantConfig.planes must be 1 when a calibrated run targets a sparsity"):
        QuantConfig(mode="sparsity", planes=2, calibration="wikitext2_valid")


def test_presets():
    config = QuantConfig.seed()
    assert (config.mode, config.alpha, config.threshold, config.granularity) == ("magnitude", 0.7, None, "tensor")
    bitnet = QuantConfig.bitnet()
    assert (bitnet.mode, bitnet.granularity, bitnet.activations) == ("absmean", "tensor", "int8")
    assert bitnet.calibration is None


def test_round_trip_through_json_with_every_stage_on():
    config = QuantConfig(mode="sparsity", sparsity=0.3, granularity="row", exclude=("mlp",), rotation="orthogonal",
                         calibration="generated", calibration_windows=16, reconstruct_steps=4, end_to_end_steps=2,
                         fp_fraction=0.1)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["calibration"] == {"source": "generated", "windows": 16, "seq_len": 2048, "compensation": True,
                                   "damp": 0.01, "block_size": 128}
    assert data["reconstruction"]["steps"] == 4 and data["exclude"] == ["mlp"] and "reconstruct_steps" not in data
    again = QuantConfig.from_dict(data)
    assert again == config and again.exclude == ("mlp",) and hash(again) == hash(config)
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()
    handed = QuantConfig(calibration=Calibration(source=None, windows=8))  # windows handed to quantize()
    assert QuantConfig.from_dict(json.loads(json.dumps(handed.to_dict()))) == handed
    assert QuantConfig().to_dict()["calibration"] is None
    assert pickle.loads(pickle.dumps(config)) == config


OLD_FLAT = {  # a row of results/ptq_smollm2.json as the flat config wrote it
    "mode": "mse", "sparsity": 0.5, "threshold": None, "alpha": 0.7, "granularity": "group", "group_size": 128,
    "include": [], "exclude": [], "quantize_head": False, "planes": 2, "packing": "base3", "activations": "fp",
    "calibration": "wikitext2_valid", "calibration_windows": 64, "calibration_seq_len": 2048, "compensation": True,
    "damp": 0.01, "block_size": 128, "reconstruct_steps": 128, "reconstruct_lr": 0.001, "reconstruct_target": "fp",
    "reconstruct_weight_lr": 0.0, "end_to_end_steps": 32, "end_to_end_lr": 0.0001, "rotation": "hadamard",
    "fp_fraction": 0.0, "sensitivity": "gradient",
}


def test_from_dict_reads_the_old_flat_form():
    config = QuantConfig.from_dict(OLD_FLAT)
    assert config == QuantConfig(group_size=128, planes=2, packing="base3", rotation="hadamard",
                                 calibration=Calibration(windows=64), reconstruction=Reconstruction(steps=128),
                                 end_to_end=EndToEnd(steps=32))
    assert config.rotation == "hadamard" and config.mixed_precision is None
    weight_only = QuantConfig.from_dict({**OLD_FLAT, "calibration": None, "reconstruct_steps": 0, "rotation": "none",
                                         "end_to_end_steps": 0, "planes": 1, "packing": "2bit"})
    assert weight_only == QuantConfig(group_size=128)
    older = {k: v for k, v in OLD_FLAT.items() if not k.startswith("end_to_end") and k != "reconstruct_weight_lr"}
    assert QuantConfig.from_dict(older).end_to_end is None  # written before end-to-end tuning existed


def _quant_configs(node):
    if isinstance(node, dict):
        if {"mode", "granularity", "group_size"} <= set(node):
            yield node
        else:
            for value in node.values():
                yield from _quant_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _quant_configs(value)


def test_every_config_stored_in_results_loads_with_the_same_settings():
    stored = [config for path in sorted(RESULTS.glob("*.json"))
              for config in _quant_configs(json.loads(path.read_text()))]
    assert len(stored) > 50
    for old in stored:
        config = QuantConfig.from_dict(old)
        assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        if "reconstruction" in old:  # written in the nested form: the round trip above is its check
            assert config.to_dict() == old
            continue
        for keyword in QuantConfig.keywords():
            if keyword.name not in old:
                continue
            expected = old[keyword.name]
            expected = tuple(expected) if isinstance(expected, list) else None if expected == "none" else expected
            owner = getattr(config, keyword.stage) if keyword.stage else config
            if owner is None:  # the old flat config had this stage switched off
                switch = next(k for k in QuantConfig.keywords() if k.stage == keyword.stage and k.default in (None, 0))
                assert old.get(switch.name, switch.default) in (None, 0), (keyword.name, old)
            else:
                assert getattr(owner, keyword.field) == expected, (keyword.name, old)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"QuantConfig: unknown field\(s\) \['bits'\]"):
        QuantConfig.from_dict({"mode": "mse", "bits": 2})
    with pytest.raises(ValueError, match=r"Reconstruction: unknown field\(s\) \['epochs'\]"):
        QuantConfig.from_dict({"reconstruction": {"steps": 3, "epochs": 1}})


def test_keyword_table_matches_the_fields():
    keywords = {k.name: k for k in QuantConfig.keywords()}
    assert list(keywords)[:14] == ["mode", "sparsity", "threshold", "alpha", "granularity", "group_size", "include",
                                   "exclude", "quantize_head", "planes", "packing", "activations", "embedding",
                                   "rotation"]
    assert len(keywords) == 28 and all(k.help for k in keywords.values())
    for keyword in keywords.values():
        if keyword.stage is None:
            assert getattr(QuantConfig(), keyword.name) == keyword.default or keyword.name == "rotation"
        elif keyword.default not in (None, 0):  # not the switch: the stage's own default
            stage = QuantConfig(**SWITCH_ON[keyword.stage])
            assert getattr(getattr(stage, keyword.stage), keyword.field) == keyword.default
    assert keywords["reconstruct_steps"].default == 0 and keywords["calibration"].default is None


def test_frozen():
    with pytest.raises(AttributeError):
        QuantConfig().mode = "sparsity"
    with pytest.raises(AttributeError):
        Calibration().windows = 3
