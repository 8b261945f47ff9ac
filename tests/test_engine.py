"""The window engine: training helps, resume is exact, failures are clear."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from sliderquant import QuantConfig, quantize
from sliderquant.api import RunFolderError, peak_rss_mb
from sliderquant.checkpoint import CheckpointError
from sliderquant.config import ABSENT
from sliderquant.engine import NonFiniteLossError

CALIB = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def config(**kw):
    base = dict(wbits=2, abits=16, epochs=2, batch_size=2, nsamples=8, seqlen=32,
                inference_batch_size=3, lora_lr=5e-3, shallow=2, deep=2)
    return QuantConfig.from_dict({**base, **kw})


class Crash(Exception):
    pass


@pytest.mark.parametrize("intra_mode", ["global_passes", "per_window"])
def test_resume_equals_uninterrupted_run(tmp_path, intra_mode):
    cfg = config(intra_mode=intra_mode)
    full = tiny_model(layers=4)
    quantize(full, None, cfg, calib=CALIB, output_dir=tmp_path / "a", show_progress=False)

    def crash_after_third(record, seen=[]):  # noqa: B006 - counter shared by the calls
        seen.append(record)
        if len(seen) == 3:
            raise Crash

    interrupted = tiny_model(layers=4)
    with pytest.raises(Crash):
        quantize(interrupted, None, cfg, calib=CALIB, output_dir=tmp_path / "b",
                 show_progress=False, on_unit_end=crash_after_third)
    assert not (tmp_path / "b" / "sliderquant.json").exists()
    resumed = tiny_model(layers=4)
    result = quantize(resumed, None, cfg, calib=CALIB, output_dir=tmp_path / "b",
                      resume=True, show_progress=False)
    assert not (tmp_path / "b" / "checkpoint").exists()  # the saved model supersedes it
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert len(result.report["windows"]) == len(json.loads(
        (tmp_path / "a" / "sliderquant.json").read_text())["windows"])


def test_training_lowers_the_window_loss():
    result = quantize(tiny_model(layers=4), None, config(epochs=8), calib=CALIB,
                      show_progress=False)
    windows = result.report["windows"]
    assert len(windows) == 2 * 5  # two stages of L + 1 windows (Ls = Ld = 2)
    improved = [w["epoch_losses"][-1] < w["epoch_losses"][0] for w in windows]
    assert sum(improved) >= 0.8 * len(windows)


def test_window_loss_before_and_after_training_are_measured_alike():
    trained = quantize(tiny_model(layers=4), None, config(epochs=8), calib=CALIB,
                       show_progress=False).report["windows"]
    assert all(w["initial_loss"] > 0 and w["final_loss"] > 0 for w in trained)
    assert sum(w["final_loss"] < w["initial_loss"] for w in trained) >= 0.8 * len(trained)
    # with nothing to learn the two passes see the same weights: equal to the last bit
    frozen = quantize(tiny_model(layers=4), None, config(lora_lr=0.0, clip_lr=0.0),
                      calib=CALIB, show_progress=False).report["windows"]
    assert all(w["final_loss"] == w["initial_loss"] for w in frozen)


def test_rtn_trains_nothing_and_blockwise_uses_single_layer_windows():
    rtn = quantize(tiny_model(), None, config(method="rtn", lwc=False, lora_rank=0),
                   calib=CALIB, show_progress=False)
    assert rtn.report["windows"] == []
    block = quantize(tiny_model(), None, config(method="blockwise", window_size=1,
                                                intra_stages=1), calib=CALIB,
                     show_progress=False)
    assert [w["layers"] for w in block.report["windows"]] == [[0], [1], [2]]


def test_non_finite_loss_is_retried_then_reported():
    cfg = config(lora_lr=1e30, clip_lr=1e30, epochs=4)
    with pytest.raises(NonFiniteLossError, match="lower"):
        quantize(tiny_model(), None, cfg, calib=CALIB, show_progress=False)


def test_finished_run_is_not_overwritten(tmp_path):
    cfg = config(method="rtn", lwc=False, lora_rank=0)
    quantize(tiny_model(), None, cfg, calib=CALIB, output_dir=tmp_path, show_progress=False)
    before = (tmp_path / "sliderquant.json").read_text()
    with pytest.raises(RunFolderError, match="finished run"):
        quantize(tiny_model(), None, cfg, calib=CALIB, output_dir=tmp_path, show_progress=False)
    assert (tmp_path / "sliderquant.json").read_text() == before
    quantize(tiny_model(), None, cfg, calib=CALIB, output_dir=tmp_path, overwrite=True,
             show_progress=False)


def test_unfinished_run_needs_resume_or_overwrite(tmp_path):
    with pytest.raises(Crash):
        quantize(tiny_model(), None, config(), calib=CALIB, output_dir=tmp_path,
                 show_progress=False, on_unit_end=lambda r: (_ for _ in ()).throw(Crash))
    with pytest.raises(RunFolderError, match="--resume"):
        quantize(tiny_model(), None, config(), calib=CALIB, output_dir=tmp_path,
                 show_progress=False)


def test_resume_refuses_a_mismatched_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(Crash):
        quantize(tiny_model(), None, config(), calib=CALIB, output_dir=tmp_path,
                 show_progress=False, on_unit_end=lambda r: (_ for _ in ()).throw(Crash))
    with pytest.raises(CheckpointError, match="different model or config"):
        quantize(tiny_model(), None, config(epochs=4), calib=CALIB, output_dir=tmp_path,
                 resume=True, show_progress=False)
    with pytest.raises(CheckpointError, match="different model or config"):
        quantize(tiny_model(seed=1), None, config(), calib=CALIB, output_dir=tmp_path,
                 resume=True, show_progress=False)
    (tmp_path / "checkpoint" / "learnables.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        quantize(tiny_model(), None, config(), calib=CALIB, output_dir=tmp_path,
                 resume=True, show_progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        quantize(tiny_model(), None, config(), calib=CALIB, output_dir=tmp_path / "new",
                 resume=True, show_progress=False)


def test_fingerprints_of_this_version_stay_fixed():
    # Checkpoints written today must resume in later versions: a new QuantConfig field needs
    # `metadata={ABSENT: value}` (see QuantConfig.fingerprint), or these hashes change.
    assert QuantConfig().fingerprint() == "9e89a0089fddbe59"
    assert QuantConfig(wbits=2, group_size=64).fingerprint() == "f4c02fd01ab3a0df"


@dataclasses.dataclass
class _LaterConfig(QuantConfig):
    """QuantConfig as a later version with one more setting would have it (annotations are
    strings there: config.py postpones their evaluation)."""

    new_knob: "float" = dataclasses.field(default=0.0, metadata={ABSENT: 0.0})


def test_adding_a_setting_keeps_the_fingerprints_of_runs_that_never_use_it():
    # resume compares config.fingerprint() (with the model's); equal here means a checkpoint
    # written before the setting existed resumes after it is added
    later = _LaterConfig(**dataclasses.asdict(config()))
    assert later.fingerprint() == config().fingerprint()
    used = _LaterConfig(**{**dataclasses.asdict(config()), "new_knob": 0.5})
    assert used.fingerprint() != config().fingerprint()


def _current_rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux only")
def test_peak_rss_is_at_least_the_current_resident_memory():
    before = _current_rss_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so it is resident
    now = _current_rss_mb()
    assert now >= before + 60
    assert peak_rss_mb() >= now
    del block
