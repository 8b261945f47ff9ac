"""The command line as a user runs it (in-process, on stories260K)."""

import json

import pytest

from sliderquant.cli import COMMANDS, build_parser, main

# The shared vocabulary (cli/options.py): flag -> a value that parses (None: a switch).
SHARED = {"--data-dir": "d", "--device": "cpu", "--quiet": None, "--out": "o",
          "--json": "f.json", "--tasks": "wikitext2", "--eval-seqlen": "64",
          "--eval-windows": "2", "--limit": "3", "--calib": "c4", "--chat-template": None,
          "--nsamples": "2", "--seqlen": "64", "--dtype": "float32",
          "--trust-remote-code": None, "--scheme": "W4A16"}
# Which shared flags each command takes: every command that has the concept spells it so.
USES = {
    "quantize": ["--data-dir", "--device", "--quiet", "--out", "--tasks", "--eval-seqlen",
                 "--eval-windows", "--limit", "--calib", "--chat-template", "--nsamples",
                 "--seqlen", "--dtype", "--trust-remote-code", "--scheme"],
    "eval": ["--data-dir", "--device", "--quiet", "--json", "--tasks", "--eval-seqlen",
             "--eval-windows", "--limit", "--dtype", "--trust-remote-code"],
    "sensitivity": ["--data-dir", "--device", "--quiet", "--out", "--tasks", "--eval-seqlen",
                    "--eval-windows", "--calib", "--chat-template", "--dtype",
                    "--trust-remote-code", "--scheme"],
    "ranges": ["--data-dir", "--device", "--quiet", "--out", "--calib", "--chat-template",
               "--nsamples", "--seqlen"],
    "report": ["--quiet", "--out"],
    "export": ["--quiet", "--out", "--json"],
    "schedule": ["--json"],
}
POSITIONAL = {"quantize": ["m", "--out", "o"], "eval": ["m"], "sensitivity": ["m"],
              "ranges": ["r"], "report": ["r"], "export": ["r", "--format", "gguf"],
              "schedule": ["--layers", "4"]}


def test_every_option_has_help():
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"


def test_every_subcommand_accepts_the_shared_flag_names():
    parser = build_parser()
    assert set(USES) == {c.NAME for c in COMMANDS}
    for command, flags in USES.items():
        argv = [command, *POSITIONAL[command]]
        for flag in flags:
            argv += [flag] if SHARED[flag] is None else [flag, SHARED[flag]]
        parser.parse_args(argv)  # exits on an unknown flag
    helps: dict[str, set] = {}
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            visible = action.help != "==SUPPRESS=="
            for flag in action.option_strings:
                # the old names live on only as hidden aliases
                assert flag not in ("--dataset", "--windows") or not visible, (name, flag)
                if flag in SHARED and visible and name != "export":
                    helps.setdefault(flag, set()).add(action.help.split(" (default")[0])
    assert {f for f, h in helps.items() if len(h) > 1} <= {"--out", "--calib",
                                                            "--eval-windows", "--tasks",
                                                            "--eval-seqlen", "--scheme"}


def test_old_flag_spellings_are_hidden_aliases():
    parser = build_parser()
    assert parser.parse_args(["ranges", "r", "--windows", "3"]).nsamples == 3
    assert parser.parse_args(["sensitivity", "m", "--dataset", "c4"]).tasks == "c4"
    assert parser.parse_args(["sensitivity", "m"]).tasks == "wikitext2"


def test_version_and_choices_in_help(capsys):
    from sliderquant import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sliderquant {__version__}"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method {sliderquant,fixed,blockwise,rtn}" in text
    assert "--intra-mode {global_passes,per_window}" in text
    assert "W4A16G64" in text and "W4A16_ASYM" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["quantize", "m", "--out", "o", "--lora-lr", "nan"], "argument --lora-lr: nan is not a "
                                                          "finite number"),
    (["quantize", "m", "--out", "o", "--clip-lr", "inf"], "inf is not a finite number"),
    (["eval", "m", "--eval-windows", "0"], "argument --eval-windows: 0 must be at least 1"),
    (["sensitivity", "m", "--k", "nan"], "argument --k: nan is not a finite number"),
    (["ranges", "r", "--nsamples", "-1"], "argument --nsamples: -1 must be at least 1"),
])
def test_bad_numbers_are_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _fails_to_load(*_, **__):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize(("extra", "yaml", "message"), [
    ([], "epochs: ten\n", "epochs: 'ten' is not a whole number"),
    ([], "lora_lr: .nan\n", "lora_lr: nan must be a finite number"),
    (["--scheme", "W4A4", "--preset", "w2a16"], "",
     "--scheme W4A4 (4-bit weights, 4-bit activations) trains with the w4a4 recipe, but "
     "--preset w2a16 is the recipe for 2-bit weight-only runs"),
    (["--scheme", "W4A16", "--group-size", "64"], "",
     "--group-size 64 contradicts --scheme W4A16, which sets group_size = 128; use --scheme "
     "W4A16G64"),
    (["--scheme", "W5A16"], "", "unknown scheme 'W5A16'"),
    (["--calib", "tests/data/chat.jsonl"], "", "add --chat-template"),
    (["--calib", "wikitext2:train"], "", "WikiText-2 train split is not in the data root"),
])
def test_bad_config_is_one_line_before_the_model_loads(capsys, data_root, tmp_path,
                                                       monkeypatch, extra, yaml, message):
    from sliderquant import api

    monkeypatch.setattr(api, "load", _fails_to_load)
    config = tmp_path / "run.yaml"
    config.write_text(yaml or "seed: 3\n")
    code = main(["quantize", "stories260k", "--data-dir", str(data_root), "--out",
                 str(tmp_path / "x"), "--config", str(config), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_yaml_values_are_coerced_by_type(tmp_path):
    """PyYAML reads `1e-4` as a string (the README's own spelling): it becomes a float."""
    from sliderquant.config import QuantConfig

    config = tmp_path / "run.yaml"
    config.write_text("lora_lr: 1e-4\nepochs: 4\nrotate: true\ngroup_size: null\n")
    values = QuantConfig.read_yaml(config)
    assert values["lora_lr"] == "1e-4"  # what PyYAML gives
    c = QuantConfig.from_dict(values)
    assert c.lora_lr == 1e-4 and isinstance(c.lora_lr, float) and c.epochs == 4 and c.rotate


def test_ctrl_c_is_one_line_naming_resume(capsys, data_root, tmp_path, monkeypatch):
    from sliderquant import api

    out = tmp_path / "x"
    argv = ["quantize", "stories260k", "--data-dir", str(data_root), "--method", "rtn",
            "--tasks", "none", "--out", str(out), "--quiet"]

    def interrupt(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "quantize", interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; no window had finished, so there is nothing to --resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    def interrupt_after_a_window(*_, output_dir, **__):  # output_dir: the locked RunFolder
        (output_dir.path / api.CHECKPOINT_DIR).mkdir(parents=True)
        (output_dir.path / api.CHECKPOINT_DIR / "learnables.safetensors").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "quantize", interrupt_after_a_window)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"checkpointed in {out}; run the same command with --resume to continue" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_rtn_needs_no_calibration_data(capsys, data_root, tmp_path, monkeypatch):
    """--method rtn --tasks none, offline, with calibration sources that do not exist here
    (the data root has no WikiText-2 train split; the hub is off): no calibration function
    is called and the run finishes."""
    from sliderquant import calibration

    def touched(*args, **kwargs):
        raise AssertionError("rtn read calibration data")

    for name in ("check_source", "source_ids", "_records", "_hf_records"):
        monkeypatch.setattr(calibration, name, touched)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for calib in ("wikitext2:train", "hf:someone/not-here"):
        out = tmp_path / calib.replace(":", "_").replace("/", "_")
        assert main(["quantize", "stories260k", "--data-dir", str(data_root), "--method", "rtn",
                     "--calib", calib, "--tasks", "none", "--out", str(out), "--quiet"]) == 0
        record = json.loads((out / "sliderquant.json").read_text())
        assert record["calibration"] is None and record["windows"] == []


def test_scheme_run_caps_eval_length_and_ends_with_the_summary(capsys, data_root, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "w8a8"  # stories260K's MLP width (172) takes no group size
    assert main(["quantize", "stories260k", "--data-dir", str(data_root), "--scheme",
                 "w8a8", "--fast", "--calib", "wikitext2:valid", "--nsamples", "4",
                 "--seqlen", "128", "--epochs", "2", "--tasks", "wikitext2",
                 "--eval-windows", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert ("note: --eval-seqlen 2048 is longer than the model's context (512 positions); "
            "evaluating 512-token windows") in captured.err
    record = json.loads((out / "sliderquant.json").read_text())
    config = record["config"]
    assert (config["scheme"], config["wbits"], config["abits"], config["group_size"],
            config["symmetric"], config["preset"]) == ("W8A8", 8, 8, None, True, "w4a4-fast")
    assert record["eval"]["wikitext2"]["seqlen"] == 512
    assert record["data_root"] == str(data_root.resolve())
    assert all(w["initial_loss"] > 0 and w["final_loss"] > 0 for w in record["windows"])
    improved = [w["final_loss"] < w["initial_loss"] for w in record["windows"]]
    assert sum(improved) > len(improved) / 2
    assert set(record["phases"]) >= {"load", "FP reference", "quantize", "evaluation", "total"}
    assert {"training", "fold", "save"} <= set(record["phases"]["quantize"]["parts"])
    printed = captured.out
    fp, q = record["eval_fp"]["wikitext2"]["ppl"], record["eval"]["wikitext2"]["ppl"]
    change = f"{(q / fp - 1) * 100:+.1f} %"
    assert any(line.startswith("wikitext2 ppl") and change in line
               for line in printed.splitlines()), printed
    assert "size on disk" in printed and "peak memory" in printed
    assert "window loss before -> after" in printed and "where the time went" in printed
    # the run folder remembers its data root: eval works without --data-dir
    monkeypatch.delenv("SLIDERQUANT_DATA", raising=False)
    assert main(["eval", str(out), "--tasks", "wikitext2", "--eval-windows", "2", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    reloaded = json.loads((tmp_path / "e.json").read_text())
    assert reloaded["data_root"] == str(data_root.resolve())
    assert reloaded["perplexity"]["wikitext2"]["ppl"] == pytest.approx(q, rel=1e-5)
    # the report figure draws the losses from their starting values
    assert main(["report", str(out), "--quiet"]) == 0
    assert "loss before training" in capsys.readouterr().out
    assert (out / "figures" / "report.png").stat().st_size > 10_000


def test_eval_without_data_root_or_hub_is_one_clear_error(capsys, data_root, tmp_path,
                                                          monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.delenv("SLIDERQUANT_DATA", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from sliderquant import api

    monkeypatch.setattr(api, "load", _fails_to_load)
    code = main(["eval", str(tmp_path), "--tasks", "wikitext2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "could not load WikiText-2 test from the Hugging Face hub" in err
    assert "--data-dir" in err


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
                 "--calib", "wikitext2:valid", "--out", str(tmp_path / "x"), "--quiet"])
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


def test_local_hugging_face_folder_and_w4a16_reload_in_plain_transformers(capsys, data_root,
                                                                         tmp_path):
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
    assert "Loading weights" not in capsys.readouterr().err  # --quiet silences transformers
    plain = AutoModelForCausalLM.from_pretrained(out)
    ours = load(str(out))
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours.model(ids).logits)
        assert not torch.equal(plain(ids).logits, source.model(ids).logits)


def test_summary_table_compares_fp_and_quantized_per_task(capsys):
    from sliderquant.cli.printing import print_summary

    fp = {"wikitext2": {"ppl": 20.0}, "piqa": {"metric": "acc_norm", "value": 0.65}}
    quantized = {"wikitext2": {"ppl": 23.0, "windows": 8, "seqlen": 2048},
                 "piqa": {"metric": "acc_norm", "value": 0.62}}
    phases = {"load": {"wall_s": 20.0, "cpu_s": 25.0},
              "quantize": {"wall_s": 300.0, "cpu_s": 580.0,
                           "parts": {"training": 290.0, "fold": 2.0, "save": 3.0}},
              "total": {"wall_s": 400.0, "cpu_s": 700.0}}
    windows = [{"initial_loss": 1.0, "epoch_losses": [0.8, 0.5], "final_loss": 0.4},
               {"initial_loss": 2.0, "epoch_losses": [1.5]}]  # a record without final_loss
    print_summary(quantized, fp, size_bytes=3 * 2**20, peak_rss_mb=1500.0, peak_gpu_mb=None,
                  phases=phases, windows=windows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["wikitext2", "ppl", "20.000", "23.000", "+15.0", "%"]
    assert lines[3].split() == ["piqa", "acc_norm", "0.6500", "0.6200", "-0.0300"]
    assert ("quantize time 300 s (580 CPU s); size on disk 3.0 MiB; peak memory 1500 MiB RSS"
            in lines)
    assert "median -25 %, best -60 %, worst -25 % over 2 windows" in lines[5]
    assert lines[-4].split() == ["training", "290.0"]
