"""Train the built-in model `tiny`: a small Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) with a BPE
tokenizer, on the English documentation and source every CPython install carries (lmopt.corpus: the standard
library's modules with their docstrings and comments, and each `pydoc_data.topics` entry).

Reproduce the committed weights (CPU, seeded; 41 min on one core of a shared 2-core machine):
    .venv/bin/python models/train_tiny.py --out models/tiny

Reads:  the running interpreter's standard library (lmopt.corpus.collect)
Writes: <out>/{config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, training.json (settings, loss curve, train / held-out perplexity)}
        data/corpus.json (every document: path, split, characters, sha256 of its text)
        data/calib.txt, data/eval.txt  (bounded slices of the held-out splits, snapshotted so results do not change
        with Python)

Split: by a hash of each document's path (lmopt.corpus.split_of): 90% train, 5% evaluation, 5% calibration. The
tokenizer and the model see only the training split; evaluation text is never used for calibration or training.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.log import get_logger

log = get_logger("train_tiny")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class TrainSettings:
    out: str = "models/tiny"
    data_dir: str = "data"
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2          # grouped-query attention: 3 query heads share a KV head
    max_positions: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1               # 1: on a shared 2-core machine, 2 threads that lose a core to another
                                   # process run about 5x slower than 1 (measured before the committed run)
    eval_every: int = 250          # steps between held-out loss points on the loss curve (0 = only at the end)
    eval_chars: int = 64000        # size of the data/eval.txt snapshot (characters; >= 8,192 tokens)
    calib_chars: int = 32000       # size of the data/calib.txt snapshot (characters)
    snapshot_per_doc: int = 4000   # at most this many characters of one document in a snapshot


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # token_type_ids would break generate(): see ENVIRONMENT.md
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"], model_max_length=512)


def encode(tokenizer, docs) -> "torch.Tensor":
    """Documents tokenized one by one and concatenated (the same ids as tokenizing their joined text, faster)."""
    import torch

    ids: list[int] = []
    for enc in tokenizer([d.text + "\n\n" for d in docs], verbose=False)["input_ids"]:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train(*, settings: TrainSettings) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lmopt import corpus

    s = settings
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    docs = corpus.collect()
    splits = corpus.by_split(docs)
    eval_text, eval_paths = corpus.snapshot(splits["eval"], s.eval_chars, s.snapshot_per_doc)
    calib_text, calib_paths = corpus.snapshot(splits["calib"], s.calib_chars, s.snapshot_per_doc)
    data_dir = REPO / s.data_dir if not os.path.isabs(s.data_dir) else Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    listing = corpus.manifest(docs)
    listing["snapshots"] = {"eval.txt": {"documents": eval_paths, "chars_per_document": s.snapshot_per_doc},
                            "calib.txt": {"documents": calib_paths, "chars_per_document": s.snapshot_per_doc}}
    _write(data_dir / "corpus.json", json.dumps(listing, indent=0) + "\n")
    _write(data_dir / "calib.txt", calib_text)
    _write(data_dir / "eval.txt", eval_text)
    log.info("documents: %s; characters: %s", listing["documents"], listing["characters"])

    tokenizer = train_tokenizer([d.text + "\n\n" for d in splits["train"]], s.vocab_size)
    ids = encode(tokenizer, splits["train"])
    heldout_ids = encode(tokenizer, splits["eval"])
    snapshot_ids = torch.tensor(tokenizer(eval_text)["input_ids"], dtype=torch.long)
    # the same number of training tokens, read the same way (whole documents in hash order): the generalization gap
    train_sample = corpus.snapshot(splits["train"], 10 ** 12, 10 ** 12)[1]
    by_path = {d.path: d for d in splits["train"]}
    sample_ids = encode(tokenizer, [by_path[p] for p in train_sample])[:len(heldout_ids)]
    curve_ids = heldout_ids[:8192 + 1]
    log.info("tokens: train %d, held-out %d (snapshot data/eval.txt %d)", len(ids), len(heldout_ids),
             len(snapshot_ids))

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, max_position_embeddings=s.max_positions,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps)))
    gen = torch.Generator().manual_seed(s.seed)
    t0 = time.time()
    losses, curve = [], []
    from tqdm import tqdm

    bar = tqdm(range(s.steps), desc="train", mininterval=10)
    for step in bar:
        model.train()
        starts = torch.randint(0, len(ids) - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = torch.stack([ids[i:i + s.seq_len + 1] for i in starts.tolist()])
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        # labels are shifted inside the model
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if (step + 1) % 50 == 0:
            point = {"step": step + 1, "train_loss": round(sum(losses[-50:]) / 50, 4),
                     "seconds": round(time.time() - t0, 1)}
            if s.eval_every and (step + 1) % s.eval_every == 0:
                model.eval()
                point["heldout_loss"] = round(math.log(perplexity(model, curve_ids, s.seq_len)), 4)
            curve.append(point)
            bar.set_postfix({k: v for k, v in point.items() if k.endswith("loss")})
    train_s = time.time() - t0

    model.eval()
    eval_ppl = perplexity(model, heldout_ids, s.seq_len)
    train_ppl = perplexity(model, sample_ids, s.seq_len)
    snapshot_ppl = perplexity(model, snapshot_ids, s.seq_len)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    log.info("final train loss %.4f (mean of last 50 steps); perplexity: held-out %.2f, training text %.2f, "
             "data/eval.txt %.2f (uniform baseline %d)", final_loss, eval_ppl, train_ppl, snapshot_ppl,
             len(tokenizer))

    out = REPO / s.out if not os.path.isabs(s.out) else Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {"settings": asdict(s), "parameters": n_params, "corpus": "data/corpus.json",
              "documents": listing["documents"], "train_tokens": len(ids),
              "tokens_seen": s.steps * s.batch_size * s.seq_len, "eval_tokens": len(heldout_ids),
              "final_train_loss": round(final_loss, 4), "eval_perplexity": round(eval_ppl, 3),
              "train_perplexity": round(train_ppl, 3), "snapshot_eval_tokens": len(snapshot_ids),
              "snapshot_eval_perplexity": round(snapshot_ppl, 3),
              "uniform_perplexity": len(tokenizer), "train_seconds": round(train_s, 1),
              "torch": torch.__version__, "python": sys.version.split()[0],
              "command": "python models/train_tiny.py " + " ".join(sys.argv[1:]), "loss_curve": curve}
    _write(out / "training.json", json.dumps(report, indent=2) + "\n")
    log.info("Saved model to %s (%.1f MB)", out, (out / "model.safetensors").stat().st_size / 1e6)
    return report


def perplexity(model, ids, window: int) -> float:
    """exp(mean next-token NLL) over consecutive windows of `window` + 1 tokens."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, window):
            chunk = ids[i:i + window + 1]
            if len(chunk) < 2:
                break
            out = model(input_ids=chunk[None, :-1], labels=chunk[None, :-1].clone())
            # labels are shifted inside the model: a window of w inputs scores w - 1 predictions
            k = len(chunk) - 2
            if k <= 0:
                break
            nll += out.loss.item() * k
            n += k
    return math.exp(nll / n)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, TrainSettings)
    return p


main = cli.main_for(build_parser, TrainSettings, train)


if __name__ == "__main__":
    cli.run(main)
