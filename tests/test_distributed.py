"""Data-parallel quantization: Gloo processes on the CPU give the single-process result,
hold 1/N of the activation caches, and a killed run resumes on any number of processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from safetensors.torch import load_file

from sliderquant import QuantConfig, quantize
from sliderquant.api import RunFolderError
from sliderquant.distributed import Collective, launch, shard

CALIB = torch.randint(0, 96, (7, 32), generator=torch.Generator().manual_seed(0))
LAYERS = 4
KILLED_AFTER = 4  # units finished before the killed run dies (of 2 stages x 5 windows)
KILL_EXIT = 17
DEADLINE_S = 300  # a spawned group that has not finished by then is killed


def config(**changes) -> QuantConfig:
    # 7 windows in batches of 3: shards of 4 and 3 (or 3, 2, 2), batches split unevenly and
    # some batches with no member on a rank
    return QuantConfig.from_dict(dict(wbits=2, abits=16, epochs=2, batch_size=3, nsamples=7,
                                      seqlen=32, inference_batch_size=2, lora_lr=5e-3,
                                      shallow=2, deep=2) | changes)


LONE = dict(batch_size=1, nsamples=1)  # one window: on two ranks, rank 1 holds none


# ---- pure parts --------------------------------------------------------------------------

def test_shards_cover_every_window_once_in_near_equal_blocks():
    for total in (0, 1, 5, 7, 128):
        for world in (1, 2, 3, 8):
            shards = [shard(total, r, world) for r in range(world)]
            assert [s.start for s in shards[1:]] == [s.stop for s in shards[:-1]]
            assert shards[0].start == 0 and shards[-1].stop == total
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_shard_picks_its_members_of_a_batch():
    s = shard(7, 1, 2)  # rows 4, 5, 6
    assert (s.start, s.stop) == (4, 7)
    assert s.local(torch.tensor([6, 0, 4, 3])).tolist() == [2, 0]
    assert s.local(torch.tensor([1, 2])).tolist() == []


def test_a_single_process_is_a_world_of_one():
    comm = Collective()
    assert (comm.rank, comm.world_size, comm.is_main, comm.active) == (0, 1, True, False)
    assert comm.on_main(lambda: 42) == 42 and comm.gather("x") == ["x"]
    p = torch.nn.Parameter(torch.ones(3))
    (p * 2).sum().backward()
    assert comm.reduce_gradients(torch.tensor(0.5), [p]) == 0.5
    assert p.grad.tolist() == [2.0, 2.0, 2.0]  # untouched


def test_launch_joins_only_the_group_torchrun_describes(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert launch(torch.device("cpu")) == torch.device("cpu") and not Collective().active
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        assert launch(torch.device("cpu")) == torch.device("cpu")
        comm = Collective()
        assert (comm.active, comm.backend, comm.world_size, comm.is_main) == (
            True, "gloo", 1, True)
    finally:
        dist.destroy_process_group()


# ---- Gloo groups ---------------------------------------------------------------------------

# Ranks are forked from a server that imported these once, not spawned (each spawned rank
# would spend seconds importing transformers); the server has run no torch threads.
PRELOAD = ["torch", "transformers.models.llama.modeling_llama",
           "transformers.models.qwen3_moe.modeling_qwen3_moe", "sliderquant.api"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member(rank: int, world: int, port: int, threads: int, task, args) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        task(rank, *args)
    finally:
        dist.destroy_process_group()


def run_group(world: int, task, *args, expect_exit: int | None = None) -> None:
    """Run `task(rank, *args)` in `world` processes joined in a Gloo group. A rank that
    raises or exits fails the group (the others are terminated); so does the deadline.
    With `expect_exit`, rank 0 must end with that exit code instead."""
    forkserver = mp.get_context("forkserver")
    forkserver.set_forkserver_preload(PRELOAD)
    context = mp.start_processes(
        _member, args=(world, _free_port(), torch.get_num_threads(), task, args),
        nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process group did not finish in {DEADLINE_S} s")
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        # the partners of a rank that died fail at their next collective
        context.processes[0].join(timeout=10)
        if expect_exit is None or context.processes[0].exitcode != expect_exit:
            raise
        return
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert expect_exit is None, f"rank 0 did not exit with {expect_exit}"


def _two_rank_runs(rank: int, out: Path, log: Path, killed: Path) -> None:
    """Everything the tests need from two ranks, in one group: a run, a refused second
    run, a run with one calibration window, an MoE run, and last a run rank 0 dies in."""
    from safetensors.torch import save_file

    result = quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=out,
                      formats="fake", show_progress=False)
    try:  # rank 0 finds a finished run; every rank must hear of it rather than wait
        quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=out,
                 formats="fake", show_progress=False)
        refused = None
    except RunFolderError as e:
        refused = str(e)
    (log / f"rank{rank}.json").write_text(json.dumps(
        {"report": result.report, "refused": refused,
         "files": sorted(p.name for p in out.iterdir())}))
    lone = quantize(tiny_model(layers=2), None, config(**LONE), calib=CALIB[:1],
                    show_progress=False)
    (log / f"lone{rank}.json").write_text(json.dumps(lone.report))
    save_file(lone.model.state_dict(), str(log / f"lone{rank}.safetensors"))
    moe = quantize(tiny_model("qwen3_moe", layers=2), None, config(), calib=CALIB,
                   show_progress=False)
    (log / f"moe{rank}.json").write_text(json.dumps(moe.report))
    save_file(moe.model.state_dict(), str(log / f"moe{rank}.safetensors"))

    def kill(record, seen=[]):  # noqa: B006 - counter shared by the calls
        seen.append(record)
        if rank == 0 and len(seen) == KILLED_AFTER:
            os._exit(KILL_EXIT)  # the checkpoint of this unit is on disk; no cleanup runs

    quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=killed,
             formats="fake", show_progress=False, on_unit_end=kill)


def _resume(rank: int, out: Path) -> None:
    quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=out,
             resume=True, formats="fake", show_progress=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run: its folder and report."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=out,
                      formats="fake", show_progress=False)
    return out, result.report


def folded(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def checkpoint_progress(out: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint" / "learnables.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["progress"])


def assert_same_run(out: Path, reference: Path) -> None:
    a, b = folded(out), folded(reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    windows = json.loads((out / "sliderquant.json").read_text())["windows"]
    expected = json.loads((reference / "sliderquant.json").read_text())["windows"]
    assert [w["layers"] for w in windows] == [w["layers"] for w in expected]
    for w, e in zip(windows, expected, strict=True):
        assert w["epoch_losses"] == pytest.approx(e["epoch_losses"], rel=1e-4)
        # the loss passes over the first 4 windows (on 3 ranks: rows of ranks 0 and 1)
        assert (w["initial_loss"], w["final_loss"]) == pytest.approx(
            (e["initial_loss"], e["final_loss"]), rel=1e-4)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`_two_rank_runs` on two Gloo processes: (run folder, folder of per-rank results,
    folder of the killed run)."""
    root = tmp_path_factory.mktemp("two")
    out, log, killed = root / "run", root / "log", root / "killed"
    log.mkdir()
    run_group(2, _two_rank_runs, out, log, killed, expect_exit=KILL_EXIT)
    return out, log, killed


def test_a_group_of_one_gives_the_plain_run(tmp_path, single):
    reference, _ = single
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))
    try:
        assert Collective().active
        quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB,
                 output_dir=tmp_path / "run", formats="fake", show_progress=False)
    finally:
        dist.destroy_process_group()
    assert_same_run(tmp_path / "run", reference)
    ranks = json.loads((tmp_path / "run" / "sliderquant.json").read_text())["ranks"]
    assert (ranks["world_size"], ranks["backend"], ranks["samples"]) == (1, "gloo", [7])


def test_two_processes_give_the_single_process_model_with_half_the_caches(two_ranks, single):
    reference, report = single
    out, log, _ = two_ranks
    assert_same_run(out, reference)

    ranks = [json.loads((log / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["files"] == ranks[1]["files"]  # rank 1 saw rank 0's folder, wrote nothing
    record = json.loads((out / "sliderquant.json").read_text())["ranks"]
    assert record == ranks[0]["report"]["ranks"] == ranks[1]["report"]["ranks"]
    assert (record["world_size"], record["backend"], record["samples"]) == (2, "gloo", [4, 3])
    # every cache is rows x seqlen x hidden floats: a rank holds its share of the rows
    whole = report["ranks"]["peak_cache_bytes"][0]
    assert report["ranks"]["samples"] == [7] and whole > 0
    assert record["peak_cache_bytes"] == [whole * 4 // 7, whole * 3 // 7]


def test_an_error_of_rank_0_is_raised_on_every_rank(two_ranks):
    _, log, _ = two_ranks
    ranks = [json.loads((log / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["refused"] and "holds a finished run" in r["refused"] for r in ranks)


def test_a_rank_without_windows_still_takes_every_step(two_ranks):
    _, log, _ = two_ranks
    single = quantize(tiny_model(layers=2), None, config(**LONE), calib=CALIB[:1],
                      show_progress=False)
    for rank in range(2):
        report = json.loads((log / f"lone{rank}.json").read_text())
        assert report["ranks"]["samples"] == [1, 0]
        assert report["ranks"]["peak_cache_bytes"][1] == 0
        for w, e in zip(report["windows"], single.report["windows"], strict=True):
            assert w["epoch_losses"] == pytest.approx(e["epoch_losses"], rel=1e-5)
        weights = load_file(str(log / f"lone{rank}.safetensors"))
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_an_moe_run_counts_every_ranks_expert_tokens(two_ranks):
    _, log, _ = two_ranks
    single = quantize(tiny_model("qwen3_moe", layers=2), None, config(), calib=CALIB,
                      show_progress=False)
    expected = single.report["experts"]["tokens_per_expert"]
    assert sum(map(sum, expected.values())) == 2 * CALIB.numel() * len(expected)  # top-2
    for rank in range(2):
        report = json.loads((log / f"moe{rank}.json").read_text())
        assert report["experts"]["tokens_per_expert"] == expected
        weights = load_file(str(log / f"moe{rank}.safetensors"))
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_killed_run_resumes_on_three_processes_and_on_one(tmp_path, two_ranks, single):
    reference, _ = single
    _, _, killed = two_ranks
    assert checkpoint_progress(killed)["done_unit"] == KILLED_AFTER - 1
    assert not (killed / "sliderquant.json").exists()
    shutil.copytree(killed, tmp_path / "copy")

    run_group(3, _resume, killed)
    assert_same_run(killed, reference)
    assert json.loads((killed / "sliderquant.json").read_text())["ranks"]["samples"] == [3, 2, 2]

    quantize(tiny_model(layers=LAYERS), None, config(), calib=CALIB, output_dir=tmp_path / "copy",
             resume=True, formats="fake", show_progress=False)
    assert_same_run(tmp_path / "copy", reference)
