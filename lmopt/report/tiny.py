"""The "tiny-model" section of results/README.md: the built-in model's training record (models/tiny/training.json)
and, when committed, the accuracy of its INT8 CPU graph with the evaluation's own noise (results/quantize/tiny-int8-cpu-u8s8-
manifest.json, a copy of the quantize stage's manifest)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lmopt.errors import UserError
from lmopt.paths import REPO_ROOT


QUANT_MANIFEST = Path("quantize") / "tiny-int8-cpu-u8s8-manifest.json"


def _commit_date(path: Path, repo_root: Path) -> str:
    try:
        return subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=repo_root, text=True,
                              capture_output=True, timeout=30).stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _threads(settings: dict) -> str:
    n = settings.get("threads", "?")
    return f"{n} CPU thread{'' if n == 1 else 's'}"


def render(results_dir: Path | None = None, repo_root: Path = REPO_ROOT) -> str:
    """The training table; then the INT8 accuracy table when `results_dir` holds the committed quantize manifest."""
    path = repo_root / "models" / "tiny" / "training.json"
    if not path.is_file():
        raise UserError(f"missing {path} — run: python models/train_tiny.py --out models/tiny")
    t = json.loads(path.read_text())
    s = t.get("settings", {})
    date = _commit_date(path, repo_root)
    rows = [("parameters", f"{t['parameters'] / 1e6:.2f}M"),
            ("layers / hidden / heads (KV heads)",
             f"{s.get('num_layers')} / {s.get('hidden_size')} / {s.get('num_heads')} ({s.get('num_kv_heads')})"),
            ("vocabulary / context", f"{s.get('vocab_size')} / {s.get('max_positions')}"),
            ("training tokens / steps", f"{t['train_tokens']} / {s.get('steps')}"),
            ("final training loss", f"{t['final_train_loss']:.3f}"),
            ("held-out perplexity (uniform baseline)", f"{t['eval_perplexity']:.1f} ({t['uniform_perplexity']})"),
            ("training time", f"{t['train_seconds']:.0f} s on {_threads(s)}")]
    if "train_perplexity" in t:   # records from before the standard-library corpus have no gap
        docs = t.get("documents", {})
        rows[3:3] = [("documents train / held-out / calibration",
                      f"{docs.get('train')} / {docs.get('eval')} / {docs.get('calib')} (`{t.get('corpus')}`)"),
                     ("tokens seen (passes over the training split)",
                      f"{t['tokens_seen']} ({t['tokens_seen'] / t['train_tokens']:.1f})")]
        rows[-2] = (f"held-out perplexity, all {t['eval_tokens']} tokens (uniform baseline)", rows[-2][1])
        rows.insert(-1, ("perplexity on as many training tokens (gap to held-out)",
                         f"{t['train_perplexity']:.1f} ({t['eval_perplexity'] / t['train_perplexity'] - 1:+.0%})"))
    lines = [f"Built-in model `tiny` — from `models/tiny/training.json` (committed {date}; machine: CPU, "
             f"{_threads(s)}, torch {t.get('torch')}, Python {t.get('python')}; "
             f"command `{t.get('command', '').strip()}`):", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if results_dir is not None and (Path(results_dir) / QUANT_MANIFEST).is_file():
        lines += ["", *_int8_table(Path(results_dir), repo_root)]
    return "\n".join(lines)


def _int8_table(results_dir: Path, repo_root: Path) -> list[str]:
    path = results_dir / QUANT_MANIFEST
    m = json.loads(path.read_text())
    a, s = m["accuracy"], m["settings"]
    nz = a["noise"]
    budget = s["max_ppl_increase"]
    lo, hi = nz["ppl_increase_pct_interval"]
    rel = Path(results_dir.name) / QUANT_MANIFEST
    return [f"Its INT8 CPU graph (`{m['variant']}`, stage 2) against FP32 on {a['eval_tokens']} held-out tokens "
            f"(`data/eval.txt`, {a['eval_windows']} windows of {s['eval_seq_len']}); data: `{rel}` (committed "
            f"{_commit_date(path, repo_root)}). Noise: {nz['method']}. The perplexity itself is known only to "
            f"±{nz['ppl_fp32_halfwidth_pct']:.1f}% — {'wider' if nz['ppl_fp32_halfwidth_pct'] > budget else 'narrower'}"
            f" than the {budget:g}% budget — but the budget is checked on the paired difference (both graphs on the "
            f"same tokens), whose interval is ±{nz['ppl_increase_pct_halfwidth']:.2f} points:", "",
            "| | |", "|---|---|",
            f"| FP32 perplexity (95% interval) | {a['ppl_fp32']:.2f} ({nz['ppl_fp32_interval'][0]:.2f}–"
            f"{nz['ppl_fp32_interval'][1]:.2f}) |",
            f"| INT8 perplexity, Δ (95% interval) vs budget | {a['ppl']:.2f}, {a['ppl_increase_pct']:+.2f}% "
            f"({lo:+.2f}% to {hi:+.2f}%) vs ≤ {budget:g}% |",
            f"| top-1 next-token agreement | {a['top1_agreement']:.1%} |",
            f"| greedy agreement ({a['greedy_prompts']} prompts × {a['greedy_tokens']} tokens) | "
            f"{a['greedy_agreement']:.1%} |"]
