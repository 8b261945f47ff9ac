"""The command line as a user runs it (in-process, on stories260K)."""

import json

import pytest

from sliderquant.cli import build_parser, main


def test_every_option_has_help():
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"


def test_schedule_command_prints_the_table(capsys):
    assert main(["schedule", "--layers", "30"]) == 0
    out = capsys.readouterr().out
    assert "31 windows" in out and "[26..29]" in out and "PCSW" in out
    assert "visits per layer: 4 3 2" in out
    assert main(["schedule", "--layers", "6", "--method", "blockwise", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w["layers"] for w in data["windows"]] == [[i] for i in range(6)]


def test_context_length_is_a_clear_error(capsys, data_root, tmp_path):
    code = main(["quantize", "stories260k", "--data-dir", str(data_root), "--calib",
                 "wikitext2:valid", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "longer than the model's context (512 positions)" in capsys.readouterr().err


def test_bad_bits_is_a_clear_error(capsys, data_root, tmp_path):
    code = main(["quantize", "stories260k", "--data-dir", str(data_root), "--wbits", "5",
                 "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "wbits=5 is not supported; use one of 2, 3, 4, 8, 16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("device", "message"), [
    ("mps", "only cpu and cuda are supported"),
    ("gpu0", "is not a device; use cpu, cuda or cuda:N"),
    ("cuda:7", "CUDA device"),
])
def test_unusable_device_is_a_clear_error(capsys, data_root, tmp_path, device, message):
    code = main(["eval", "stories260k", "--data-dir", str(data_root), "--device", device,
                 "--tasks", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "1"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_group_size_must_divide_the_widths(capsys, data_root, tmp_path):
    code = main(["quantize", "stories260k", "--data-dir", str(data_root), "--group-size",
                 "128", "--seqlen", "128", "--calib", "wikitext2:valid",
                 "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "does not divide" in capsys.readouterr().err


def test_quantize_save_eval_round_trip(capsys, data_root, tmp_path):
    out = tmp_path / "run"
    args = ["quantize", "stories260k", "--data-dir", str(data_root), "--preset", "w4a4",
            "--calib", "wikitext2:valid", "--nsamples", "4", "--seqlen", "128",
            "--epochs", "2", "--batch-size", "2", "--out", str(out), "--tasks", "wikitext2",
            "--eval-seqlen", "256", "--eval-windows", "3", "--quiet"]
    assert main(args) == 0
    record = json.loads((out / "sliderquant.json").read_text())
    in_memory = record["eval"]["wikitext2"]["ppl"]
    assert record["config"]["abits"] == 4 and record["rotation"] == "random_hadamard"
    assert len(record["windows"]) == 2 * len(record["schedule"])
    assert record["eval_fp"]["wikitext2"]["ppl"] < in_memory
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(data_root), "--tasks", "wikitext2",
                 "--eval-seqlen", "256", "--eval-windows", "3", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    reloaded = json.loads((tmp_path / "e.json").read_text())["perplexity"]["wikitext2"]["ppl"]
    assert reloaded == pytest.approx(in_memory, rel=1e-5)
    assert main(args) == 2
    assert "finished run" in capsys.readouterr().err


def test_local_hugging_face_folder_and_w4a16_reload_in_plain_transformers(data_root, tmp_path):
    """A local HF folder quantizes; a weight-only result loads in plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from sliderquant import load

    source = load("stories260k", data_dir=data_root)
    source.model.save_pretrained(tmp_path / "hf")
    source.tokenizer.save_pretrained(tmp_path / "hf")
    out = tmp_path / "rtn"
    assert main(["quantize", str(tmp_path / "hf"), "--data-dir", str(data_root), "--method",
                 "rtn", "--seqlen", "128", "--nsamples", "4", "--calib", "wikitext2:valid",
                 "--tasks", "none", "--out", str(out), "--quiet"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    ours = load(str(out))
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours.model(ids).logits)
        assert not torch.equal(plain(ids).logits, source.model(ids).logits)
