"""experiments/ablation.py end to end on a tiny model: the grid, the JSON and the plots."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ablation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_json_and_plots(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ablation.json"
    code = load_script().main([
        "--model", str(tiny_model_dir), "--data", str(text_file), "--calibration", str(text_file),
        "--seq-len", "16", "--max-batches", "4", "--score-windows", "2", "--sparsities", "0.3", "0.6",
        "--fp-fractions", "0", "0.2", "--device", "cpu", "--out", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    # seed, mse and 2 planes once per fp fraction; the two calibrated methods once per (fraction, sparsity)
    assert len(rows) == 3 * 2 + 2 * 2 * 2
    calibrated = [r for r in rows if r["method"] == "calibrated" and r["fp_fraction"] == 0]
    assert [r["sparsity_target"] for r in calibrated] == [0.3, 0.6]
    assert all(abs(r["sparsity"] - r["sparsity_target"]) < 0.05 for r in calibrated)
    mixed = [r for r in rows if r["fp_fraction"] == 0.2]
    assert all(r["bits_per_linear_weight"] > r["bits_per_weight"] for r in mixed)
    assert (tmp_path / "ablation_sparsity.png").stat().st_size > 1000
    assert (tmp_path / "ablation_pareto.png").stat().st_size > 1000
    assert "| calibrated + compensation |" in capsys.readouterr().out


def test_shards_combine_to_the_whole_grid(tiny_model_dir, text_file, tmp_path):
    script = load_script()
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--calibration", str(text_file),
              "--seq-len", "16", "--max-batches", "2", "--score-windows", "2", "--sparsities", "0.3", "0.6",
              "--fp-fractions", "0", "--device", "cpu"]
    whole = tmp_path / "whole.json"
    assert script.main(common + ["--out", str(whole)]) == 0
    shards = [tmp_path / f"shard{i}.json" for i in range(2)]
    for i, shard in enumerate(shards):
        assert script.main(common + ["--shard", f"{i}/2", "--out", str(shard)]) == 0
    combined = tmp_path / "combined.json"
    assert script.main(common + ["--combine", *map(str, shards), "--out", str(combined)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "quant_seconds"} for r in rows]
    assert strip(json.loads(combined.read_text())["rows"]) == strip(json.loads(whole.read_text())["rows"])
