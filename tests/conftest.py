"""Shared test set-up: one torch thread for the whole run, and a word-level tokenizer for tiny models."""

from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine OpenMP spinning slows them 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_tokenizer(folder: Path, words: list[str]) -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is BERT's special tokens plus ``words``, written to ``folder``."""
    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))
