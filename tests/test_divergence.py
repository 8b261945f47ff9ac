"""KL divergence of a model's next-token distribution from its FP reference."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from sliderquant.cli import main
from sliderquant.eval.divergence import window_divergence
from sliderquant.eval.perplexity import perplexity_from_nlls, window_nlls


def test_kl_against_a_direct_computation():
    reference = tiny_model()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(0))
    r = window_divergence(model, reference, windows, show_progress=False, chunk=16)
    with torch.no_grad():
        log_q = F.log_softmax(model(input_ids=windows).logits[:, :-1], -1).flatten(0, 1)
        log_p = F.log_softmax(reference(input_ids=windows).logits[:, :-1], -1).flatten(0, 1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()
    assert r["kl"] == pytest.approx(expected, rel=1e-4) and r["kl"] > 0
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()
    assert r["top1_agreement"] == pytest.approx(agree)
    assert r["positions"] == 3 * 39
    nlls = window_nlls(model, windows, show_progress=False)
    assert r["ppl"] == pytest.approx(perplexity_from_nlls(nlls), rel=1e-5)
    ref_nlls = window_nlls(reference, windows, show_progress=False)
    assert r["reference_ppl"] == pytest.approx(perplexity_from_nlls(ref_nlls), rel=1e-5)
    same = window_divergence(reference, reference, windows, show_progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1


def test_eval_kl_of_a_run_folder_uses_its_source_model(data_root, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", "stories260k", "--data-dir", str(data_root), "--method", "rtn",
                 "--wbits", "3", "--seqlen", "128", "--nsamples", "3", "--calib",
                 "wikitext2:valid", "--tasks", "none", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "sliderquant.json").read_text())["model_ref"] == "stories260k"
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(data_root), "--tasks", "wikitext2",
                 "--eval-seqlen", "128", "--eval-windows", "2", "--kl", "--quiet",
                 "--json", str(tmp_path / "kl.json")]) == 0
    assert "KL(FP||Q)" in capsys.readouterr().out
    r = json.loads((tmp_path / "kl.json").read_text())
    wikitext = r["perplexity"]["wikitext2"]
    assert r["reference"].endswith("stories260K.bin")
    assert wikitext["kl"] > 0 and wikitext["ppl"] > wikitext["reference_ppl"]
    assert 0 < wikitext["top1_agreement"] < 1
