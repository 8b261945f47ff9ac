"""Layer sensitivity scans, the shallow/deep suggestion, `--schedule auto`, and the figure
commands (sensitivity, ranges, report)."""

import json

import pytest
import torch
from conftest import tiny_model

from sliderquant import QuantConfig, quantize
from sliderquant.cli import main
from sliderquant.config import ConfigError
from sliderquant.schedule import build_schedule
from sliderquant.sensitivity import perplexity, scan, suggest_depths

WINDOWS = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))


def rtn(**kw):
    return QuantConfig.from_preset("w4a16", method="rtn", **kw)


@pytest.mark.parametrize("bits", [(3, 16), (4, 4)])
def test_scan_shape_counts_and_restores_the_model(bits):
    model = tiny_model(layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = perplexity(model, WINDOWS)
    result = scan(model, WINDOWS, rtn(wbits=bits[0], abits=bits[1]))
    assert len(result.per_layer) == len(result.prefix) == 4
    assert result.per_layer_quantized == [1, 1, 1, 1]
    for asked, (counted, ppl) in enumerate(zip(result.prefix_quantized, result.prefix,
                                               strict=True), start=1):
        assert counted >= asked and ppl > 0
    assert result.prefix_quantized == sorted(result.prefix_quantized)
    assert result.prefix[0] == result.per_layer[0]
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert perplexity(model, WINDOWS) == pytest.approx(fp, rel=1e-6)


def test_trained_method_scans_a_span_and_restores():
    model = tiny_model(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = QuantConfig.from_dict(dict(wbits=3, abits=16, epochs=1, batch_size=3, nsamples=6,
                                        seqlen=32, shallow=1, deep=1))
    result = scan(model, WINDOWS, config, calib=CALIB, prefix=False)
    assert result.per_layer_quantized == [1, 1, 1] and result.prefix == []
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_suggest_depths_rule():
    fp = 10.0
    costs = [5, 3, 0.2, 0.5, 0.4, 0.5, 0.6, 0.5, 0.4, 0.5, 0.3, 4]  # L = 12
    s = suggest_depths([fp + c for c in costs], fp, k=2)
    assert (s.shallow, s.deep) == (2, 1)
    assert "shallow = 2" in s.reasoning and "0 (+5)" in s.reasoning
    # a sensitive layer deep in the first half widens the growing windows up to it, capped
    costs[4] = 9
    assert suggest_depths([fp + c for c in costs], fp).shallow == 5
    costs[5] = 9
    assert suggest_depths([fp + c for c in costs], fp).shallow == 5  # cap L//2 - 1
    # flat costs: nothing is sensitive; a free middle does not mark everything sensitive
    assert (suggest_depths([fp + 1] * 8, fp).shallow, suggest_depths([fp] * 8, fp).deep) == (1, 1)
    assert suggest_depths([fp, fp + 0.5, fp, fp, fp, fp], fp).shallow == 2


def test_schedule_auto_resolves_before_training_and_is_recorded(tmp_path):
    model = tiny_model(layers=6)
    config = QuantConfig.from_dict(dict(wbits=2, abits=16, epochs=1, batch_size=3, nsamples=6,
                                        seqlen=32, schedule="auto"))
    result = quantize(model, None, config, calib=CALIB, output_dir=tmp_path / "run",
                      show_progress=False)
    report = json.loads((tmp_path / "run" / "sliderquant.json").read_text())
    auto = report["auto_schedule"]
    # the record is the pipeline's report plus the run folder's entries (runfolder.save)
    assert {k: report[k] for k in result.report} == json.loads(json.dumps(result.report))
    assert report["config"]["schedule"] is None
    assert (report["config"]["shallow"], report["config"]["deep"]) == (auto["shallow"],
                                                                      auto["deep"])
    assert report["schedule"] == build_schedule(6, auto["shallow"], auto["deep"])
    assert len(auto["per_layer_ppl"]) == 6 and "shallow =" in auto["reasoning"]
    assert auto["windows"] == 4  # calibration windows, not evaluation data
    with pytest.raises(ConfigError, match="auto"):
        QuantConfig.from_dict(dict(method="fixed", schedule="auto"))

    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "figures" / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sensitivity_ranges_and_report_commands(data_root, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", "stories260k", "--data-dir", str(data_root), "--wbits", "3",
                 "--eval-windows", "1", "--eval-seqlen", "128", "--out", str(out),
                 "--quiet"]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    L = result["num_layers"]
    scan_ = result["scans"]["rtn"]
    assert len(scan_["per_layer"]) == len(scan_["prefix"]) == L == 5
    assert all(n >= asked for asked, n in enumerate(scan_["prefix_quantized"], start=1))
    table = [line for line in (out / "sensitivity.md").read_text().splitlines()
             if line.startswith("|")]
    assert len(table) == 2 + L and all(row.count("|") == 6 for row in table)
    assert (out / "sensitivity.png").stat().st_size > 10_000
    assert "suggested: --shallow" in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["quantize", "stories260k", "--data-dir", str(data_root), "--calib",
                 "wikitext2:valid", "--nsamples", "2", "--seqlen", "64", "--epochs", "1",
                 "--batch-size", "2", "--tasks", "none", "--out", str(run), "--quiet"]) == 0
    assert main(["ranges", str(run), "--data-dir", str(data_root), "--nsamples", "1",
                 "--seqlen", "64"]) == 0
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "ranges_layer0.png", "ranges_layer2.png", "ranges_layer4.png"]
    assert main(["report", str(run), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "report.png").is_file()
