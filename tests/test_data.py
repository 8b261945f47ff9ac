"""Calibration and evaluation data: reference conventions and clear errors."""

import pytest
import torch

from sliderquant.data import (
    DataError,
    c4_documents,
    calibration_text,
    calibration_windows,
    resolve_data_root,
    wikitext2_text,
)


def test_wikitext2_rows_match_the_hub_rows(data_root):
    text = wikitext2_text("test", data_root)
    assert len(text.split("\n\n")) == 4358
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_train_split_offline_is_a_clear_error(data_root):
    with pytest.raises(DataError, match="wikitext2:valid") as err:
        calibration_text("wikitext2:train", data_root)
    assert "c4" in str(err.value) and "hub" in str(err.value)


def test_test_split_is_refused_for_calibration(data_root):
    with pytest.raises(DataError, match="evaluation set"):
        calibration_text("wikitext2:test", data_root)


def test_unknown_source_and_text_file(tmp_path, data_root):
    with pytest.raises(DataError, match="unknown calibration source"):
        calibration_text("pile", data_root)
    f = tmp_path / "mine.txt"
    f.write_text("hello world")
    assert calibration_text(str(f), data_root) == "hello world"


def test_c4_documents(data_root):
    docs = c4_documents(data_root)
    assert len(docs) == 2000 and all(isinstance(d, str) for d in docs)


def test_calibration_windows_are_seeded_and_sized():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 8, 64, seed=2)
    b = calibration_windows(tokens, 8, 64, seed=2)
    c = calibration_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 64)) for row in a)


def test_calibration_windows_refuse_too_little_data():
    with pytest.raises(DataError, match="--nsamples 15"):
        calibration_windows(torch.arange(1000), 16, 64, seed=0)
    with pytest.raises(DataError, match="shorter --seqlen"):
        calibration_windows(torch.arange(50), 1, 64, seed=0)


def test_missing_data_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_root(tmp_path / "nope")
