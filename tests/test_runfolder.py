"""The run folder: lock, state checks before any expensive work, the record (model_ref,
finished), formats, what --overwrite may delete; one test per defect of issue 14."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_model

from sliderquant import api, runfolder
from sliderquant.cli import main
from sliderquant.config import QuantConfig

RTN = ["--method", "rtn", "--seqlen", "128", "--nsamples", "4", "--calib", "wikitext2:valid"]
EVAL = ["--tasks", "wikitext2", "--eval-seqlen", "256", "--eval-windows", "2"]


def quantize_cli(data_root, out, *extra):
    return main(["quantize", "stories260k", "--data-dir", str(data_root), *RTN,
                 "--out", str(out), "--quiet", *extra])


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Make loading, the FP reference and quantization fail loudly: a refusal must come
    before them."""
    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before the refusal")
    for name in ("load", "fp_reference", "quantize"):
        monkeypatch.setattr(api, name, boom)


def rtn_config(**kw):
    return QuantConfig.from_dict({"method": "rtn", "lwc": False, "lora_rank": 0,
                                  "nsamples": 2, "seqlen": 32, "batch_size": 1, **kw})


CALIB = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))


def test_second_run_into_a_locked_folder_exits_2(data_root, tmp_path, capsys,
                                                 no_expensive_work):
    with api.open_run(tmp_path / "r"):
        assert quantize_cli(data_root, tmp_path / "r", *EVAL) == 2
    err = capsys.readouterr().err.strip()
    assert "another sliderquant run is writing to" in err and len(err.splitlines()) == 1
    api.open_run(tmp_path / "r").close()  # released with its holder


def test_lock_holds_across_processes(tmp_path):
    import subprocess
    import sys

    with api.open_run(tmp_path / "r"):
        code = ("from sliderquant import api\n"
                "try:\n    api.open_run(r'%s')\nexcept api.RunFolderError as e:\n"
                "    print(e)\n" % (tmp_path / "r"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ}, check=True).stdout
    assert "another sliderquant run" in out


def test_out_that_is_a_file_exits_2_before_any_work(data_root, tmp_path, capsys,
                                                    no_expensive_work):
    (tmp_path / "f").write_text("mine")
    assert quantize_cli(data_root, tmp_path / "f", *EVAL) == 2
    assert "is a file" in capsys.readouterr().err
    assert quantize_cli(data_root, tmp_path / "f" / "sub", *EVAL) == 2
    assert "not writable" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_exits_2_before_any_work(data_root, tmp_path, capsys,
                                               no_expensive_work):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert quantize_cli(data_root, tmp_path / "ro", *EVAL) == 2
    assert "not writable" in capsys.readouterr().err


def test_finished_and_unfinished_folders_are_refused_before_the_fp_reference(
        data_root, tmp_path, capsys, monkeypatch):
    api.quantize(tiny_model(), None, rtn_config(), calib=CALIB, output_dir=tmp_path / "done",
                 show_progress=False)
    (tmp_path / "part" / "checkpoint").mkdir(parents=True)
    (tmp_path / "part" / "checkpoint" / "learnables.safetensors").write_bytes(b"x")

    def boom(*args, **kwargs):
        raise AssertionError("FP reference before the folder check")
    monkeypatch.setattr(api, "fp_reference", boom)
    monkeypatch.setattr(api, "load", boom)
    assert quantize_cli(data_root, tmp_path / "done", *EVAL) == 2
    assert "finished run" in capsys.readouterr().err
    assert quantize_cli(data_root, tmp_path / "part", *EVAL) == 2
    assert "--resume" in capsys.readouterr().err
    assert quantize_cli(data_root, tmp_path / "new", "--resume", *EVAL) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_schedule_beyond_the_model_exits_2_before_the_fp_reference(data_root, tmp_path,
                                                                   capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("FP reference before the schedule check")
    monkeypatch.setattr(api, "fp_reference", boom)
    code = main(["quantize", "stories260k", "--data-dir", str(data_root), "--schedule", "0-9",
                 "--seqlen", "128", "--calib", "wikitext2:valid", "--out", str(tmp_path / "r"),
                 "--quiet", *EVAL])
    assert code == 2
    assert "outside layers 0..4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder behind


def test_unknown_format_and_gguf_with_activation_quantization_exit_2(
        data_root, tmp_path, capsys, no_expensive_work):
    assert quantize_cli(data_root, tmp_path / "r", "--format", "onnx") == 2
    assert "use one or more of compressed, gguf, fake" in capsys.readouterr().err
    assert quantize_cli(data_root, tmp_path / "r", "--preset", "w4a4", "--format", "gguf") == 2
    assert "holds weights only" in capsys.readouterr().err


def test_run_interrupted_during_evaluation_resumes_to_finish_it(data_root, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "r"
    real_eval = api.evaluate_perplexity

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "evaluate_perplexity", killed)
    assert quantize_cli(data_root, out, *EVAL, "--no-fp-reference") == 130  # Ctrl-C
    assert "evaluation did not finish; run the same command with --resume" in \
        capsys.readouterr().err
    record = json.loads((out / "sliderquant.json").read_text())
    assert record["state"] == "quantized" and record["evaluation_requested"] == ["wikitext2"]
    assert record["model_ref"] == "stories260k"  # eval --kl and ranges can find the source
    assert api.source_model(record, data_root).model.config.num_hidden_layers == 5
    monkeypatch.setattr(api, "evaluate_perplexity", real_eval)
    assert quantize_cli(data_root, out, *EVAL, "--no-fp-reference") == 2
    assert "--resume to finish it" in capsys.readouterr().err

    def no_requantization(*args, **kwargs):
        raise AssertionError("the quantized model was quantized again")
    monkeypatch.setattr(api, "quantize", no_requantization)
    assert quantize_cli(data_root, out, *EVAL, "--no-fp-reference", "--resume") == 0
    record = json.loads((out / "sliderquant.json").read_text())
    assert record["state"] == "finished" and record["eval"]["wikitext2"]["ppl"] > 1
    assert quantize_cli(data_root, out, *EVAL) == 2
    assert "finished run" in capsys.readouterr().err


def test_runs_saved_through_the_python_api_name_their_source(data_root, tmp_path):
    loaded = api.load("stories260k", data_dir=data_root)
    cfg = rtn_config(seqlen=128, nsamples=4)
    result = api.quantize(loaded.model, loaded.tokenizer, cfg, calib="wikitext2:valid",
                          data_dir=data_root, output_dir=tmp_path / "r", show_progress=False)
    record = api.read_run_record(tmp_path / "r")
    assert record["model_ref"] == "stories260k" and record["state"] == "finished"
    ranges = api.ranges(tmp_path / "r", data_dir=data_root, windows=1, seqlen=64)
    assert set(ranges) == {0, 2, 4}
    api.save_quantized(result, loaded.tokenizer, tmp_path / "saved")
    assert api.read_run_record(tmp_path / "saved")["model_ref"] == "stories260k"
    api.quantize(tiny_model(), None, rtn_config(), calib=CALIB, output_dir=tmp_path / "mem",
                 show_progress=False)
    memory = api.read_run_record(tmp_path / "mem")
    assert memory["model_ref"] is None
    with pytest.raises(api.RunFolderError, match="pass the unquantized model"):
        api.source_model(memory)


def test_overwrite_deletes_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "r"
    api.quantize(tiny_model(), None, rtn_config(), calib=CALIB, output_dir=out,
                 formats="fake,compressed", show_progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    api.quantize(tiny_model(), None, rtn_config(), calib=CALIB, output_dir=out,
                 overwrite=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine").is_dir()
    assert not (out / runfolder.GRID_FILE).exists()  # the fake format's grids went
    assert not (out / "compressed").exists()
    assert api.read_run_record(out)["formats"] == {"compressed": "."}


def test_default_output_is_a_compressed_checkpoint_plain_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    result = api.quantize(tiny_model(), None, rtn_config(), calib=CALIB,
                          output_dir=tmp_path / "r", show_progress=False)
    qc = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    ours = api.load(str(tmp_path / "r"))
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = result.model(input_ids=ids).logits
        assert torch.equal(ours.model(input_ids=ids).logits, want)
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        plain.generate(ids, max_new_tokens=3, do_sample=False)


def test_unquantized_tensors_keep_the_source_half_dtype(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    api.quantize(model, None, rtn_config(), calib=CALIB,
                 output_dir=tmp_path / "r", show_progress=False)
    with safe_open(str(tmp_path / "r" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.int32
    notes = api.read_run_record(tmp_path / "r")["notes"]
    assert any("bfloat16 (the source's config.json says bfloat16)" in n for n in notes)
    assert api.read_run_record(tmp_path / "r")["model_ref"] == str(tmp_path / "src")


def test_every_format_reloads_with_the_in_memory_perplexity(data_root, tmp_path, capsys):
    out = tmp_path / "r"
    assert quantize_cli(data_root, out, *EVAL, "--no-fp-reference",
                        "--format", "compressed,gguf,fake") == 0
    record = api.read_run_record(out)
    assert record["formats"] == {"compressed": ".", "gguf": "model.gguf", "fake": "fake"}
    in_memory = record["eval"]["wikitext2"]["ppl"]
    for target, rel in ((out, 1e-5), (out / "fake", 1e-5), (out / "model.gguf", 2e-3)):
        assert main(["eval", str(target), "--data-dir", str(data_root), *EVAL, "--quiet",
                     "--json", str(tmp_path / "e.json")]) == 0
        got = json.loads((tmp_path / "e.json").read_text())["perplexity"]["wikitext2"]["ppl"]
        assert got == pytest.approx(in_memory, rel=rel), target
    assert api.export(out, "gguf", tmp_path / "again.gguf").size_bytes > 0  # from compressed


def test_w4a4_compressed_run_reloads_with_its_activation_quantization(tmp_path):
    cfg = rtn_config(abits=4)
    result = api.quantize(tiny_model(), None, cfg, calib=CALIB, output_dir=tmp_path / "r",
                          show_progress=False)
    qc = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    inputs = qc["config_groups"]["group_0"]["input_activations"]
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == (4, "token", True)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = result.model(input_ids=ids).logits
        assert torch.equal(api.load(str(tmp_path / "r")).model(input_ids=ids).logits, want)


def test_asymmetric_moe_run_is_refused_compressed_before_quantizing(tmp_path, monkeypatch):
    from test_families import tiny_model as family_model

    def boom(*args, **kwargs):
        raise AssertionError("quantized before the format check")
    monkeypatch.setattr(api, "run_pipeline", boom)
    with pytest.raises(api.ConfigError, match="--symmetric"):
        api.quantize(family_model("qwen3_moe"), None, rtn_config(), calib=CALIB,
                     output_dir=tmp_path / "r", formats="compressed", show_progress=False)
    assert not (tmp_path / "r").exists()


def test_default_format_falls_back_to_fake_where_compressed_cannot_hold_the_run(tmp_path):
    """Regression: with the compressed default, an asymmetric MoE run (and an activation-only
    run) exited 2 although the user had asked for no format; the default now writes the
    fake-quantized folder and says why."""
    from test_families import tiny_model as family_model

    notes = []
    api.quantize(family_model("qwen3_moe"), None, rtn_config(), calib=CALIB,
                 output_dir=tmp_path / "moe", show_progress=False, warn=notes.append)
    assert api.read_run_record(tmp_path / "moe")["formats"] == {"fake": "."}
    assert "--symmetric" in notes[0]
    assert runfolder.default_formats(rtn_config(wbits=16, abits=8))[0] == ("fake",)
    assert runfolder.default_formats(rtn_config()) == (("compressed",), None)


def test_a_writer_failing_after_quantization_keeps_the_work(tmp_path, monkeypatch):
    from sliderquant.export import compressed
    from sliderquant.export.source import ExportError

    def refuse(*args, **kwargs):
        raise ExportError("zero points outside 0..15")
    monkeypatch.setattr(compressed, "write_compressed", refuse)
    from test_export import tiny_tokenizer

    warnings = []
    result = api.quantize(tiny_model(), tiny_tokenizer(), rtn_config(), calib=CALIB,
                          output_dir=tmp_path / "r", show_progress=False, warn=warnings.append)
    assert "saved the fake-quantized folder instead" in warnings[0]
    assert api.read_run_record(tmp_path / "r")["formats"] == {"fake": "."}
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(api.load(str(tmp_path / "r")).model(input_ids=ids).logits,
                           result.model(input_ids=ids).logits)
