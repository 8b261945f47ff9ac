"""The standard corpora (WikiText-2, C4): reference conventions and clear errors."""

import pytest

from sliderquant.data import DataError, c4_documents, hub_error, resolve_data_root, wikitext2_text


def test_wikitext2_rows_match_the_hub_rows(data_root):
    text = wikitext2_text("test", data_root)
    assert len(text.split("\n\n")) == 4358
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_c4_documents(data_root):
    docs = c4_documents(data_root)
    assert len(docs) == 2000 and all(isinstance(d, str) for d in docs)


def test_missing_data_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_root(tmp_path / "nope")


def test_hub_failures_become_one_line_that_names_the_data_root():
    error = hub_error("WikiText-2 test", ConnectionError("Couldn't reach 'wikitext' on the Hub"
                                                         "\nmore detail"))
    text = str(error)
    assert isinstance(error, DataError) and "\n" not in text
    assert "could not load WikiText-2 test from the Hugging Face hub (ConnectionError" in text
    assert "--data-dir" in text and "SLIDERQUANT_DATA" in text
