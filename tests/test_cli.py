"""``caff cost`` as a user runs it: JSON schema, measurement, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from costmodel import ZOO, TrainMode, estimate


def test_console_script_runs_as_a_process():
    result = subprocess.run([sys.executable, "-m", "caff.cli", "cost", "no-such-model"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("caff: error: unknown model")


def test_cost_json_schema_and_agreement_with_the_library(caff):
    result = caff("cost", "char-gpt-xs", "--batch", "4", "--seq", "32", "--train", "last:2", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"model", "train", "layers", "total"}
    assert [layer["name"] for layer in out["layers"]] == ["embed", "block.0", "block.1", "block.2", "block.3",
                                                          "head", "loss"]
    for layer in out["layers"]:
        assert set(layer) >= {"name", "fwd_flops", "bwd_flops", "activation_bytes", "param_bytes", "grad_bytes",
                              "optimizer_bytes", "upload_bytes"}
    report = estimate(ZOO["char-gpt-xs"], TrainMode.parse("last:2", 4), 4, 32)
    assert out["total"]["peak_bytes"] == report.peak_bytes
    assert out["total"]["upload_bytes"] == report.totals["upload_bytes"] > 0
    assert out["layers"][1]["bwd_flops"] == 0 and out["layers"][3]["bwd_flops"] > 0


def test_cost_measure_reports_relative_errors(caff):
    result = caff("cost", "char-gpt-xs", "--batch", "2", "--seq", "16", "--train", "lora:4", "--measure", "--json")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)["measured"]
    assert measured["relative_error"]["fwd_flops"] == 0 and measured["relative_error"]["bwd_flops"] == 0
    assert measured["relative_error"]["activation_bytes"] == 0
    assert abs(measured["relative_error"]["peak_bytes"]) < 0.05


def test_cost_human_table(caff):
    result = caff("cost", "vit-tiny", "--batch", "8", "--train", "blocks:2,5")
    assert result.returncode == 0, result.stderr
    assert "block.5" in result.stdout and "peak memory of one step" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["cost", "no-such-model"], "unknown model"),
    (["cost", "char-gpt-xs", "--train", "blocks:7"], "out of range"),
    (["cost", "char-gpt-xs", "--batch", "0"], "batch must be >= 1"),
    (["cost", "char-gpt-xs", "--train", "wat:3"], "unknown training mode"),
    (["cost", "char-gpt-xs", "--seq", "1000"], "outside 1..128"),
])
def test_bad_input_is_one_line_and_exit_code_2(caff, args, message):
    result = caff(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bad_spec_files(caff, tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"kind": "gpt", "n_blocks": 2, "d_model": 30, "n_heads": 4, "d_ff": 8}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "t5"}))
    for path, message in [(heads, "does not divide"), (broken, "not a JSON model spec file"), (unknown, "unsupported model_type")]:
        result = caff("cost", str(path))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
