"""Held-out texts shipped in data/ (snapshotted by models/train_tiny.py, so results do not change with Python).

    data/calib.txt  calibration split (used by quantization only)
    data/eval.txt   evaluation split (perplexity, agreement; never used for calibration or training)
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .paths import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"


def builtin_text(split: str) -> str:
    path = DATA_DIR / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"missing {path} — run: python models/train_tiny.py")
    return path.read_text()


def read_text(path: str | Path | None, split: str) -> tuple[str, str]:
    """(text, source) from a user file or the built-in split."""
    if path is None:
        return builtin_text(split), f"builtin:{split}"
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} does not exist — pass an existing UTF-8 text file, or omit the flag to use "
                        f"the built-in {split} split")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text — pass a plain UTF-8 text file") from None


def token_windows(tokenizer, text: str, n: int, seq_len: int, what: str = "text") -> list[list[int]]:
    """`n` consecutive windows of `seq_len` tokens; a clear error when the text is too short."""
    ids = tokenizer(text)["input_ids"]
    need = n * seq_len
    if len(ids) < max(need, 2):
        raise UserError(f"{what} has {len(ids)} tokens but {n} samples x {seq_len} tokens need {need} — give a "
                        "longer text or lower the sample count / sequence length")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
