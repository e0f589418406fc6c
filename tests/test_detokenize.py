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


@pytest.mark.parametrize("special", [True, False])
def test_encode_of_a_long_text_releases_the_gil_and_gives_the_same_ids(tok, special):
    """Past GIL_FREE_CHARS, encode takes the tokenizer's batch call (it lets other threads run): same ids, and a
    thread ticking meanwhile is not held up for the whole encoding."""
    import threading
    import time

    from lmopt.models import GIL_FREE_CHARS

    text = "".join(TEXTS) * (4 * GIL_FREE_CHARS // len("".join(TEXTS)))
    for t in (text[:GIL_FREE_CHARS + 1], text):
        assert encode(tok, t, add_special_tokens=special) == list(tok(t, add_special_tokens=special)["input_ids"])
    big, ticks, done = text * 60, [], threading.Event()   # ~0.5 MB: ~0.4 s of encoding

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=tick)
    th.start()
    t0 = time.perf_counter()
    encode(tok, big)
    took = time.perf_counter() - t0
    done.set()
    th.join()
    longest = max(b - a for a, b in zip(ticks, ticks[1:]))
    assert longest < took / 2, (longest, took)   # with the GIL held throughout, one gap as long as the encoding


def test_encode_takes_the_tokenizer_call_when_truncation_is_on():
    from lmopt.models import resolve

    tok = resolve("tiny").load_tokenizer()  # its own instance (load_tokenizer's is shared): truncation goes on below
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
