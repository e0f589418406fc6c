"""One table of stop-string cases for the three paths that must agree on them: offline (lmopt.generate.generate_text
and the in-process scheduler, tests/test_scheduler.py), through Triton (lm_stream and lm, tests/test_serve.py) and
through the OpenAI gateway (tests/test_openai.py). Each case builds its stop strings from the reference greedy text of
the prompt (the built-in model's text is whatever its weights make it), and `expected` says what every path must
return: the text up to the earliest stop string (stop string excluded) and finish reason "stop", or the whole text
and the reference's own finish reason."""
from __future__ import annotations

PROMPTS = ("def f(", "The import statement")
MAX_TOKENS = 24


def _piece(text: str, start: int, width: int = 4) -> str:
    """A piece of `text` at or after `start` that does not occur earlier (so a stop string cuts exactly there)."""
    for i in range(start, len(text) - width):
        piece = text[i:i + width]
        if piece.strip() and text.index(piece) == i:
            return piece
    raise AssertionError(f"no unrepeated piece after {start} in the reference text: {text!r}")


# name -> stop strings from the reference text. Triton's `stop` input holds one string: cases with several go through
# the offline paths and the gateway (which matches several itself).
CASES = {
    "no stop": lambda full: (),
    "absent": lambda full: ("@@ not in the text @@",),
    "middle": lambda full: (_piece(full, len(full) // 3),),
    "earliest of two wins": lambda full: (_piece(full, 2 * len(full) // 3), _piece(full, len(full) // 3)),
    "at the start": lambda full: (full[:3],),
    # the text ends with the start of a stop string that never completes: held back, then handed out at the end
    "end is a stop prefix": lambda full: (full[-2:] + "\x01never",),
}


def cases(single_only: bool = False) -> list[tuple[str, str]]:
    """(case name, prompt) pairs; single_only: the cases with at most one stop string."""
    multi = {"earliest of two wins"}
    return [(c, p) for c in CASES for p in PROMPTS if not (single_only and c in multi)]


def expected(stops, full: str, full_reason: str) -> tuple[str, str]:
    """(text, finish reason) every path must give, from the reference text without stop strings."""
    hits = [full.index(s) for s in stops if s and s in full]
    return (full[:min(hits)], "stop") if hits else (full, full_reason)
