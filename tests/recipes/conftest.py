"""Fixtures shared by the harness tests: a tiny BERT classifier and toy sentiment data on disk."""

import pytest

from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``{"model", "train", "eval"}`` paths: a random 2-layer BERT, 40 training and 12 eval rows (modules
    that need other sizes define their own ``data``)."""
    root = tmp_path_factory.mktemp("data")
    return {"model": str(save_tiny_bert(root / "bert")),
            "train": str(write_jsonl(root / "train.jsonl", sentiment_rows(40))),
            "eval": str(write_jsonl(root / "eval.jsonl", sentiment_rows(12, seed=1)))}
