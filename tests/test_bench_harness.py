"""The duel harness's own logic (benchmarks/duel.py, benchmarks/store.py): no model runs."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy
import duel
from store import record_in_list

from sliderquant import QuantConfig


def test_fit_iters_interpolates_between_the_bracketing_points():
    # 4 iters without torch.compile, 10 and 50 with it: two lines, not one.
    points = [(4, 300.0), (10, 535.0), (50, 2268.0)]
    assert duel.fit_iters(points, 535.0) == 10
    assert duel.fit_iters(points, 350.0) == 5  # on the 4-10 segment (the 10-50 line: 6)
    assert duel.fit_iters(points, 1401.0) == 30
    assert duel.fit_iters(points, 3000.0) == 67  # beyond the last point: nearest two


def test_cost_lines_and_matched_pairs():
    def rec(tool, variant, cpu, seed=2, **kw):
        return {"setting": "W4A16 g64", "tool": tool, "seed": seed, "variant": variant,
                "cpu_s": cpu, "wikitext2": 20.0, "c4": 30.0, **kw}

    records = [rec("sliderquant", "fast", 1000.0), rec("auto-round", "iters 20", 1100.0,
                                                       iters=20),
               rec("auto-round", "iters 50", 2300.0, iters=50),
               rec("auto-round", "iters 20", 1000.0, seed=3, iters=20)]
    assert duel.cost_lines(records)[("W4A16 g64", 2)] == [(20, 1100.0), (50, 2300.0)]
    (ours, theirs), = duel.matched_pairs(records)
    assert ours["variant"] == "fast" and theirs["variant"] == "iters 20" and theirs["seed"] == 2
    records[1]["cpu_s"] = 1200.0  # 20 % more: no longer equal compute
    assert duel.matched_pairs(records) == []
    # ... unless its machine was 20 % slower at the reference workload
    records[0]["reference_cpu_s"], records[1]["reference_cpu_s"] = 1.0, 1.2
    assert len(duel.matched_pairs(records)) == 1
    records[1]["reference_cpu_s"] = 0.6  # a machine twice as fast: twice the work
    assert duel.matched_pairs(records) == []
    records[0]["boot_id"] = records[1]["boot_id"] = "same"  # one machine: as measured
    records[1]["cpu_s"] = 1100.0
    assert len(duel.matched_pairs(records)) == 1
    del records[0]["reference_cpu_s"], records[0]["boot_id"]  # unknown machine: never equal
    records[1]["cpu_s"] = 1000.0
    assert duel.matched_pairs(records) == []


def test_record_in_list_replaces_the_same_key_and_keeps_the_rest(tmp_path):
    path = tmp_path / "r.json"
    record_in_list(path, {"k": "a", "v": 1}, lambda r: r["k"])
    record_in_list(path, {"k": "b", "v": 2}, lambda r: r["k"])
    records = record_in_list(path, {"k": "a", "v": 3}, lambda r: r["k"])
    assert sorted((r["k"], r["v"]) for r in records) == [("a", 3), ("b", 2)]


def test_config_from_flags_is_the_cli_config():
    flags = ["--preset", "w2a16", "--group-size", "64", "--fast", "--no-rotate", "--seed", "3"]
    expected = QuantConfig.from_preset("w2a16", fast=True, group_size=64, rotate=False, seed=3)
    assert duel.config_from_flags(flags) == expected


@pytest.mark.parametrize("only,expected", [
    ("W2A16 g64/seed 3", {("W2A16 g64", 3, "sliderquant"), ("W2A16 g64", 3, "auto-round")}),
    ("W4A4 rotation/seed 2/auto-round", {("W4A4 rotation", 2, "auto-round")}),
])
def test_only_selects_cells_by_their_key(only, expected):
    args = argparse.Namespace(tool=None, recipes={"fast": "--fast"}, iters=[4], match=None,
                              only=only)
    cells = duel.planned(args, {})
    assert {(s.name, seed, tool) for s, seed, tool, _, _ in cells} == expected


def _peer():
    """benchmarks/peers/quantize_peer.py, loaded by path (benchmarks/peers/ stays off
    sys.path: its run.py would shadow benchmarks/run.py)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "quantize_peer.py"
    spec = importlib.util.spec_from_file_location("quantize_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _two_projections():
    import torch

    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(128, 4, bias=False)   # 2 groups of 64 per row
    model.k_proj = torch.nn.Linear(64, 2, bias=False)
    with torch.no_grad():  # 8 distinct values in every group of q, 4 in every row of k
        model.q_proj.weight.copy_(torch.arange(512.0).remainder(8).reshape(4, 128))
        model.k_proj.weight.copy_(torch.arange(128.0).remainder(4).reshape(2, 64))
    return model


def test_peer_storage_counts_codes_scales_and_zero_points_per_layer_width():
    peer = _peer()
    got = peer.storage(_two_projections(), {"q_proj": (2, 64), "k_proj": (3, None)})
    # q: 2-bit codes + 8 groups x (16-bit scale + 2-bit zero); k: 3-bit codes + 2 rows x 19
    assert got["bits"] == 2 * 512 + 8 * 18 + 3 * 128 + 2 * 19
    assert got["weights"] == 640 and got["projections_by_bits"] == {"2": 1, "3": 1}


def test_peer_check_grid_checks_each_layer_against_its_own_bits():
    peer = _peer()
    model = _two_projections()
    peer.check_grid(model, {"q_proj": (3, 64), "k_proj": (2, None)})
    with pytest.raises(RuntimeError, match="q_proj: 8 distinct values"):
        peer.check_grid(model, {"q_proj": (2, 64), "k_proj": (2, None)})


def test_peer_chosen_formats_refuses_a_symmetric_or_missing_choice():
    peer = _peer()
    asym = {"bits": 3, "group_size": 64, "sym": False, "data_type": "int", "act_bits": 16}
    assert peer.chosen_formats({"q_proj": asym}, ["q_proj"]) == {"q_proj": (3, 64)}
    with pytest.raises(RuntimeError, match="k_proj"):
        peer.chosen_formats({"q_proj": asym}, ["q_proj", "k_proj"])
    with pytest.raises(RuntimeError, match="asymmetric"):
        peer.chosen_formats({"q_proj": {**asym, "sym": True}}, ["q_proj"])


def test_accuracy_script_reads_its_options_after_the_name_and_the_flags_after_dashes():
    args = accuracy.parse_args(["run1", "--model", "stories260k", "--data-dir", "D",
                                "--tasks", "wikitext2", "--", "--preset", "w2a16", "--fast"])
    assert (args.name, args.model, args.data_dir, args.tasks) == ("run1", "stories260k", "D",
                                                                  "wikitext2")
    assert args.flags == ["--preset", "w2a16", "--fast"]


def test_match_iters_reads_costs_on_our_records_machine_only():
    setting = next(s for s in duel.SETTINGS if s.name == "W4A16 g64")

    def rec(tool, variant, cpu, **kw):
        return {"setting": "W4A16 g64", "tool": tool, "seed": 2, "variant": variant,
                "cpu_s": cpu, "wikitext2": 20.0, "c4": 30.0, **kw}

    records = [rec("sliderquant", "fast", 1000.0, reference_cpu_s=1.0),
               # a machine twice as fast: 300 s and 500 s there are 600 s and 1000 s here
               rec("auto-round", "iters 10", 300.0, iters=10, reference_cpu_s=0.5),
               rec("auto-round", "iters 20", 500.0, iters=20, reference_cpu_s=0.5),
               # an older record of unknown machine, which alone would say 5 iters
               rec("auto-round", "iters 5", 1000.0, iters=5)]
    done = {duel.record_key(r): r for r in records}
    assert duel.match_iters(setting, 2, "fast", done) == 20
