"""Incremental detokenization gives exactly the text of decoding the whole output at once."""
import random

import pytest

from lmopt.detokenize import IncrementalDetokenizer
from lmopt.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # é ü — 中文 done", "The   quick\tbrown fox.\n\n"])
@pytest.mark.parametrize("prompt_len", [0, 1, 7])
def test_pieces_join_to_full_decode(tok, text, prompt_len):
    ids = tok(text)["input_ids"]
    d = IncrementalDetokenizer(tok, ids[:prompt_len])
    pieces = [d.add(i) for i in ids[prompt_len:]]
    out = "".join(pieces) + d.flush()
    assert out == tok.decode(ids[prompt_len:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert d.text == out
    assert "\ufffd" not in "".join(pieces)  # incomplete characters are held back, not emitted


def test_long_random_stream_matches_and_window_stays_short(tok):
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size) for _ in range(400)]
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(d.ids) < 40  # linear cost: the window does not grow with the output
