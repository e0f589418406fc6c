"""Incremental detokenization gives exactly the text of decoding the whole output at once; the tokenizer fast path
(lmopt.models.encode) gives exactly the ids of the tokenizer's own call."""
import random

import pytest

from lmopt.detokenize import IncrementalDetokenizer
from lmopt.models import encode, load_tokenizer

TEXTS = ["def f(x):\n    return x  # é ü — 中文 done", "The   quick\tbrown fox.\n\n", " leading space", "a",
         "<|endoftext|> and </s> written out", "\x00 \ufffd \U0001F600 emoji"]


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


@pytest.mark.parametrize("special", [True, False])
def test_encode_equals_the_tokenizer_call(tok, special):
    from lmopt.serving import held_out_prompts

    for text in TEXTS + held_out_prompts("tiny", 16, 32):
        assert encode(tok, text, add_special_tokens=special) == \
            list(tok(text, add_special_tokens=special)["input_ids"])


def test_encode_takes_the_tokenizer_call_when_truncation_is_on():
    tok = load_tokenizer("tiny")  # its own instance: the backend's truncation is switched on below
    text = TEXTS[0]
    full = encode(tok, text)
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert len(full) > 3 and encode(tok, text) == full  # transformers' call switches it off again


def test_detokenizer_without_a_fast_tokenizer_uses_its_decode(tok):
    class Slow:  # only decode(), as a slow tokenizer
        def decode(self, ids, **kw):
            return tok.decode(ids, **kw)

    ids = tok(TEXTS[0])["input_ids"]
    d = IncrementalDetokenizer(Slow())
    assert d._backend_decode is None
    assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids, skip_special_tokens=True,
                                                                     clean_up_tokenization_spaces=False)


def test_text_stream_stop_strings_and_finish_reason(tok):
    """The one output path: the earliest stop string wins wherever it is listed, a possible stop-string start is held
    back and released at the end, nothing is accepted after the stop, and the finish reason says a stop string ended
    it (else the engine's own)."""
    from lmopt.detokenize import TextStream

    ids = tok("one two three four five")["input_ids"]
    whole = tok.decode(ids)
    ts = TextStream(tok, [], ("four", " two"))
    out = ts.add_many(ids) + ts.finish()
    assert out == whole[:whole.index(" two")] and ts.stopped and ts.finish_reason("length") == "stop"
    assert len(ts.tokens) < len(ids) and ts.add(ids[-1]) == ""
    ts = TextStream(tok, [], (whole[-3:] + "never",))
    pieces = [ts.add(t) for t in ids]
    assert "".join(pieces) != whole and "".join(pieces) + ts.finish() == whole   # the held-back end comes out last
    assert not ts.stopped and ts.finish_reason("length") == "length" and ts.finish_reason("error") == "error"
    with pytest.raises(ValueError):
        ts.finish_reason("done")
    assert TextStream(None, [1, 2]).add(7) == "" and TextStream(None).finish() == ""
