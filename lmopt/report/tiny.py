"""The README "tiny-model" section: the built-in model's training record (models/tiny/training.json)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lmopt.errors import UserError
from lmopt.paths import REPO_ROOT


def render(results_dir: Path | None = None, repo_root: Path = REPO_ROOT) -> str:
    """`results_dir` is unused: the training record lives with the model, not with the measured results."""
    path = repo_root / "models" / "tiny" / "training.json"
    if not path.is_file():
        raise UserError(f"missing {path} — run: python models/train_tiny.py --out models/tiny")
    t = json.loads(path.read_text())
    s = t.get("settings", {})
    try:
        date = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=repo_root, text=True,
                              capture_output=True, timeout=30).stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        date = "unknown"
    rows = [("parameters", f"{t['parameters'] / 1e6:.2f}M"),
            ("layers / hidden / heads (KV heads)",
             f"{s.get('num_layers')} / {s.get('hidden_size')} / {s.get('num_heads')} ({s.get('num_kv_heads')})"),
            ("vocabulary / context", f"{s.get('vocab_size')} / {s.get('max_positions')}"),
            ("training tokens / steps", f"{t['train_tokens']} / {s.get('steps')}"),
            ("final training loss", f"{t['final_train_loss']:.3f}"),
            ("held-out perplexity (uniform baseline)", f"{t['eval_perplexity']:.1f} ({t['uniform_perplexity']})"),
            ("training time", f"{t['train_seconds']:.0f} s on {s.get('threads', '?')} CPU threads")]
    lines = [f"Built-in model `tiny` — from `models/tiny/training.json` (committed {date}; machine: CPU, "
             f"{s.get('threads', '?')} threads, torch {t.get('torch')}, Python {t.get('python')}; "
             f"command `{t.get('command', '').strip()}`):", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
