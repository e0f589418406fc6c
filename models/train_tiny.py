"""Train the built-in model `tiny`: a small Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) with a BPE
tokenizer, on the English Python documentation every CPython install carries (`pydoc_data.topics`).

Reproduce the committed weights (CPU, ~10 min on 2 cores):
    .venv/bin/python models/train_tiny.py --out models/tiny

Reads:  pydoc_data.topics (standard library)
Writes: <out>/{config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, training.json}
        data/calib.txt, data/eval.txt  (the held-out splits, snapshotted so results do not change with Python)

Split: topics sorted by name; index % 10 == 3 goes to eval, index % 10 == 7 to calibration, index % 10 == 8 is held
out unused, the rest trains. Eval text is never used for calibration or training.
"""
from __future__ import annotations

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
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2


def split_topics() -> tuple[str, str, str]:
    from pydoc_data import topics

    names = sorted(topics.topics)
    train, calib, evals = [], [], []
    for i, n in enumerate(names):
        text = topics.topics[n].strip() + "\n\n"
        if i % 10 == 8:  # held out, unused (kept out of training so the split that trained models/tiny reproduces)
            continue
        (evals if i % 10 == 3 else calib if i % 10 == 7 else train).append(text)
    return "".join(train), "".join(calib), "".join(evals)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    # token_type_ids would break generate(): see ENVIRONMENT.md
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"], model_max_length=512)


def train(*, settings: TrainSettings) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    s = settings
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    train_text, calib_text, eval_text = split_topics()
    data_dir = REPO / s.data_dir if not os.path.isabs(s.data_dir) else Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "calib.txt").write_text(calib_text)
    (data_dir / "eval.txt").write_text(eval_text)
    log.info("text: train %d chars, calib %d, eval %d", len(train_text), len(calib_text), len(eval_text))

    tokenizer = train_tokenizer(train_text, s.vocab_size)
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(eval_text)["input_ids"], dtype=torch.long)
    log.info("tokens: train %d, eval %d", len(ids), len(eval_ids))

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
    model.train()
    t0 = time.time()
    losses = []
    from tqdm import tqdm

    bar = tqdm(range(s.steps), desc="train", mininterval=5)
    for step in bar:
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
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    train_s = time.time() - t0

    model.eval()
    eval_ppl = perplexity(model, eval_ids, s.seq_len * 2)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    log.info("final train loss %.4f (mean of last 50 steps); held-out perplexity %.2f (uniform baseline %d)",
             final_loss, eval_ppl, len(tokenizer))

    out = REPO / s.out if not os.path.isabs(s.out) else Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {"settings": asdict(s), "parameters": n_params, "train_tokens": len(ids), "eval_tokens": len(eval_ids),
              "final_train_loss": round(final_loss, 4), "eval_perplexity": round(eval_ppl, 3),
              "uniform_perplexity": len(tokenizer), "train_seconds": round(train_s, 1),
              "torch": torch.__version__, "python": sys.version.split()[0],
              "command": "python models/train_tiny.py " + " ".join(sys.argv[1:])}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("Saved model to %s (%.1f MB)", out, (out / "model.safetensors").stat().st_size / 1e6)
    return report


def perplexity(model, ids, window: int) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, window):
            chunk = ids[i:i + window + 1]
            if len(chunk) < 2:
                break
            out = model(input_ids=chunk[None, :-1], labels=chunk[None, :-1].clone())
            k = len(chunk) - 2
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
