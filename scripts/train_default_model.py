"""Train pyengine's default English→German model with Hugging Face `MarianMTModel`.

Seeded and resumable: a checkpoint (model, optimizer, step, RNG) is written every
--save-every steps to --work/ckpt.pt and picked up on restart. Stops after --max-minutes or
--max-steps and exports the model with `save_pretrained` in bfloat16 plus MarianTokenizer's files
(source.spm, target.spm, vocab.json), the same layout users bring from OPUS-MT.

    python scripts/train_default_model.py --corpus data/corpus --work /tmp/train --out pyengine/models/default
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [(r["en"], r["de"]) for r in map(json.loads, fh)]


def build_vocab(train: list[tuple[str, str]], work: Path, vocab_size: int) -> Path:
    """One joint sentencepiece model; ids 0 = </s>, 1 = <unk> as in OPUS-MT; <pad> is appended last."""
    vocab_dir = work / "vocab"
    if (vocab_dir / "vocab.json").exists():
        return vocab_dir
    vocab_dir.mkdir(parents=True, exist_ok=True)
    text = work / "spm_train.txt"
    with open(text, "w", encoding="utf-8") as fh:
        for s, t in train:
            fh.write(s + "\n" + t + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(vocab_dir / "spm"), vocab_size=vocab_size,
        character_coverage=1.0, model_type="unigram", eos_id=0, unk_id=1, bos_id=-1, pad_id=-1,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=500_000,
        num_threads=2, minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(vocab_dir / "spm.model"))
    vocab = {proc.id_to_piece(i): i for i in range(proc.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    for name in ("source.spm", "target.spm"):
        (vocab_dir / name).write_bytes((vocab_dir / "spm.model").read_bytes())
    (vocab_dir / "tokenizer_config.json").write_text(json.dumps(
        {"source_lang": "en", "target_lang": "de", "model_max_length": 256, "separate_vocabs": False,
         "tokenizer_class": "MarianTokenizer"}))
    return vocab_dir


def make_config(vocab_size: int, args) -> MarianConfig:
    pad = vocab_size - 1
    return MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=args.d_model,
        encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
        encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model,
        activation_function="swish", scale_embedding=True, static_position_embeddings=True,
        max_position_embeddings=256, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)


def batches(data: list[tuple[list[int], list[int]]], max_tokens: int, rng: random.Random):
    """Token-budget batches of similar length, shuffled."""
    order = sorted(range(len(data)), key=lambda i: (len(data[i][0]), rng.random()))
    out, cur, longest = [], [], 0
    for i in order:
        longest_new = max(longest, len(data[i][0]), len(data[i][1]))
        if cur and longest_new * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest_new = [], max(len(data[i][0]), len(data[i][1]))
        cur.append(i)
        longest = longest_new
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(rows, pad: int):
    src_len = max(len(s) for s, _ in rows)
    tgt_len = max(len(t) for _, t in rows)
    src = torch.full((len(rows), src_len), pad)
    labels = torch.full((len(rows), tgt_len), -100)
    for i, (s, t) in enumerate(rows):
        src[i, : len(s)] = torch.tensor(s)
        labels[i, : len(t)] = torch.tensor(t)
    return src, (src != pad).long(), labels


def lr_at(step: int, peak: float, warmup: int) -> float:
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--work", default="/tmp/pyengine-train")
    ap.add_argument("--out", default="pyengine/models/default")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=800)
    ap.add_argument("--max-minutes", type=float, default=110)
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and stop")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue from an exported model directory (its weights, vocabulary and step count; "
                         "the optimizer restarts with --rewarmup steps of learning-rate warm-up)")
    ap.add_argument("--rewarmup", type=int, default=100)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    if args.init_from is not None:
        adopt_vocab(args.init_from, work)
    train = read_jsonl(Path(args.corpus) / "train.jsonl")
    vocab_dir = build_vocab(train, work, args.vocab_size)
    tok = MarianTokenizer(str(vocab_dir / "source.spm"), str(vocab_dir / "target.spm"),
                          str(vocab_dir / "vocab.json"), source_lang="en", target_lang="de")
    cache = work / "encoded.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        enc_src = tok([s for s, _ in train], truncation=True, max_length=256)["input_ids"]
        enc_tgt = tok(text_target=[t for _, t in train], truncation=True, max_length=256)["input_ids"]
        data = list(zip(enc_src, enc_tgt))
        torch.save(data, cache)
    vocab_size = len(tok.encoder)
    pad = tok.pad_token_id
    config = make_config(vocab_size, args)
    model = MarianMTModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    step, epoch, restart_step = 0, 0, 0
    ckpt = work / "ckpt.pt"
    if args.init_from is not None and not ckpt.exists():
        step, epoch = init_from_export(model, args.init_from)
        restart_step = step
        print(f"initialised from {args.init_from} at step {step}", flush=True)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, epoch = state["step"], state["epoch"]
        restart_step = state.get("restart_step", 0)
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}, epoch {epoch}", flush=True)
    if args.export_only:
        export(model, tok, vocab_dir, out, step, epoch)
        return
    amp = torch.cpu._is_amx_tile_supported() or torch.backends.mkldnn.is_available()
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)
    start, done = time.time(), False
    model.train()
    while not done:
        for batch in batches(data, args.max_tokens, random.Random(rng.random())):
            src, mask, labels = collate([data[i] for i in batch], pad)
            for group in opt.param_groups:
                group["lr"] = lr_at(step + 1, args.lr, args.warmup)
                if restart_step:  # fresh Adam moments: ramp up again to the schedule's rate
                    group["lr"] *= min(1.0, (step + 1 - restart_step) / args.rewarmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=src, attention_mask=mask, labels=labels).logits
            loss = loss_fn(logits.float().view(-1, logits.size(-1)), labels.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} epoch {epoch} loss {loss.item():.3f} "
                      f"lr {opt.param_groups[0]['lr']:.2e} {(time.time() - start) / 60:.1f} min", flush=True)
            if (time.time() - start) / 60 > args.max_minutes or step >= args.max_steps:
                done = True
            if step % args.save_every == 0 or done:
                save_checkpoint(ckpt, model, opt, step, epoch, rng, restart_step)
            if done:
                break
        else:
            epoch += 1
    export(model, tok, vocab_dir, out, step, epoch)


def adopt_vocab(export_dir: Path, work: Path) -> None:
    """Reuse an exported model's vocabulary so its embeddings keep their meaning."""
    vocab_dir = work / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        (vocab_dir / name).write_bytes((export_dir / name).read_bytes())
    (vocab_dir / "spm.model").write_bytes((export_dir / "source.spm").read_bytes())


def init_from_export(model: MarianMTModel, export_dir: Path) -> tuple[int, int]:
    """Load an exported (bfloat16) model's weights in float32; return its recorded step and epoch."""
    exported = MarianMTModel.from_pretrained(export_dir, torch_dtype=torch.float32)
    model.load_state_dict(exported.state_dict())
    info = json.loads((export_dir / "TRAINING.json").read_text())
    return int(info["steps"]), int(info["epochs"])


def save_checkpoint(path: Path, model, opt, step: int, epoch: int, rng: random.Random,
                    restart_step: int = 0) -> None:
    """Atomically write what a restart needs to continue where this run stopped."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch,
                "restart_step": restart_step, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()},
               path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def export(model: MarianMTModel, tok: MarianTokenizer, vocab_dir: Path, out: Path, step: int, epoch: int) -> None:
    model.eval()
    model.generation_config = GenerationConfig(
        num_beams=4, max_length=256, bad_words_ids=[[tok.pad_token_id]], pad_token_id=tok.pad_token_id,
        eos_token_id=0, decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=0)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        (out / name).write_bytes((vocab_dir / name).read_bytes())
    (out / "TRAINING.json").write_text(json.dumps({"steps": step, "epochs": epoch}))
    print(f"exported to {out} after {step} steps", flush=True)


if __name__ == "__main__":
    main()
