"""Fixtures: small random Hugging Face Marian models written by `save_pretrained` (the format users
bring), with every parameter randomized so that a mis-mapped weight, bias or norm changes the output,
and a sentencepiece vocabulary trained on real English text (tests/data/sample.en.txt: held-out
strings of the project's corpus, see data/DATA_CARD.md)."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and compiled Triton kernels (scripts/gpu_check.sh runs "
                                       "them: pytest -m cuda with TRITON_INTERPRET=0)")
SAMPLE_TEXT = DATA / "sample.en.txt"


def sample_lines() -> list[str]:
    return SAMPLE_TEXT.read_text(encoding="utf-8").splitlines()


def randomize_(model, seed: int, embed_std: float = 0.45, weight_gain: float = 2.0) -> None:
    """Random values everywhere (biases and norms too); embeddings wide so the output distribution is peaky."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 or name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "shared" in name or "lm_head" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_gain * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        if hasattr(model, "final_logits_bias"):  # Marian has one; M2M100 does not
            model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=gen))


def build_marian(path: Path, *, vocab: int = 97, d_model: int = 36, layers: tuple[int, int] = (2, 2),
                 heads: int = 3, ffn: int = 52, activation: str = "swish", shared: bool = True,
                 decoder_vocab: int | None = None, tie: bool = True, max_positions: int = 128,
                 scale_embedding: bool = True, seed: int = 0, generation: dict | None = None) -> Path:
    """Save a random MarianMTModel to `path`; returns the path."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    pad = vocab - 1
    cfg = MarianConfig(
        vocab_size=vocab, decoder_vocab_size=decoder_vocab or vocab, d_model=d_model,
        encoder_layers=layers[0], decoder_layers=layers[1], encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn + 4,
        activation_function=activation, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
        forced_eos_token_id=0, max_position_embeddings=max_positions, scale_embedding=scale_embedding,
        share_encoder_decoder_embeddings=shared, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = MarianMTModel(cfg)
    randomize_(model, seed)
    model.generation_config = GenerationConfig(**(generation or {
        "num_beams": 4, "max_length": 40, "bad_words_ids": [[pad]], "pad_token_id": pad, "eos_token_id": 0,
        "decoder_start_token_id": pad, "forced_eos_token_id": 0}))
    model.save_pretrained(path)
    return path


def write_tokenizer(path: Path, vocab_size: int = 300, separate: bool = False) -> int:
    """Train sentencepiece on the sample text and write MarianTokenizer's files; returns the vocab size with <pad>."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(SAMPLE_TEXT), model_prefix=str(path / "spm"), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, eos_id=0, unk_id=1, bos_id=-1, pad_id=-1, minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))
    vocab = {proc.id_to_piece(i): i for i in range(proc.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    if separate:  # same pieces, a different id order, so a source/target mix-up shows
        pieces = sorted(vocab, key=lambda p: (p not in ("</s>", "<unk>"), p == "<pad>", p[::-1]))
        (path / "target_vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False))
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes((path / "spm.model").read_bytes())
    (path / "spm.model").unlink()
    (path / "spm.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": separate, "source_lang": "en",
                                                            "target_lang": "de"}))
    return len(vocab)


# Architectures for parity: activations, shared/separate vocabularies, untied output, odd dims.
ARCHS = {
    "swish-shared": dict(activation="swish", d_model=36, heads=3, ffn=52, seed=1),
    "relu-separate": dict(activation="relu", d_model=40, heads=5, ffn=72, shared=False, decoder_vocab=113, seed=2),
    "gelu-untied": dict(activation="gelu", d_model=30, heads=2, ffn=46, shared=False, tie=False, layers=(3, 1),
                        scale_embedding=False, seed=3),
}
AMX_ARCH = dict(activation="swish", d_model=64, heads=4, ffn=124, seed=6)  # rows of 64: the AMX tiles' shapes


@pytest.fixture(scope="session", params=sorted(ARCHS))
def marian_dir(request, tmp_path_factory) -> Path:
    return build_marian(tmp_path_factory.mktemp(request.param), **ARCHS[request.param])


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    """A random Marian model with a real sentencepiece vocabulary: translate() works end to end."""
    path = tmp_path_factory.mktemp("text-model")
    size = write_tokenizer(path)
    return build_marian(path, vocab=size, d_model=32, heads=4, ffn=48, max_positions=256, seed=11, generation={
        "num_beams": 3, "max_length": 24, "bad_words_ids": [[size - 1]], "pad_token_id": size - 1,
        "eos_token_id": 0, "decoder_start_token_id": size - 1, "forced_eos_token_id": 0})


def hf_model(path: Path, dtype=torch.float32):
    from transformers import MarianMTModel
    return MarianMTModel.from_pretrained(path, dtype=dtype).eval()


def pad_batch(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, : len(seq)] = torch.tensor(seq)
    return x, (x != pad).long()


def random_sources(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 14) -> list[list[int]]:
    """Mixed-length source id lists ending with EOS (0), avoiding the specials 0 and pad."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out.append(torch.randint(2, vocab - 1, (length,), generator=gen).tolist() + [0])
    return out


def fairseq_style_sources(n: int, vocab: int, eos: int, seed: int, first: int = 3) -> list[list[int]]:
    """Mixed-length source ids for models whose specials are <s>=0, <pad>=1, </s>=2, ... (M2M100, BART)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(first, vocab, (int(torch.randint(1, 14, (1,), generator=gen)),), generator=gen).tolist()
            + [eos] for _ in range(n)]


def encoder_and_stepwise_logits(engine, x: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor):
    """pyengine's encoder output and its logits for `tgt` fed one token per step over the KV cache."""
    with torch.no_grad():
        from pyengine.model import ForcedDecoder
        hidden = engine.model.encode(x, mask.sum(1))
        forced = ForcedDecoder(engine.model, x, mask.sum(1), tgt.shape[1] + 1)
        logits = torch.cat([forced.logits(tgt[:, t:t + 1]) for t in range(tgt.shape[1])], 1)
    return hidden, logits


def hf_encoder_and_logits(hf, x: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor):
    """The reference: HF's encoder output and teacher-forced logits for `tgt`."""
    with torch.no_grad():
        hidden = hf.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        logits = hf(input_ids=x, attention_mask=mask, decoder_input_ids=tgt).logits
    return hidden, logits


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a model directory whose config.json has `changes` applied."""
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def check_search_takes_fused_candidates(engine, kernel_name: str, beam: int, monkeypatch) -> None:
    """Greedy / beam search take each step's candidates from the fused output layer `_C.<kernel_name>` (no logits
    written) and translate as the unfused path (logits, then log_softmax_topk): the same tokens, scores within
    float32 rounding; min_decoding_length bans EOS early on, so banned ids reach the kernel too."""
    from pyengine import _C
    src = random_sources(12, engine.config.src_vocab_size, seed=8)
    calls = []
    fused = getattr(_C, kernel_name)
    monkeypatch.setattr(_C, kernel_name, lambda *a, **kw: (calls.append(a[-1]), fused(*a, **kw))[1])
    ours = engine.generate(src, beam_size=beam, max_decoding_length=10, min_decoding_length=3, num_hypotheses=beam)
    assert len(calls) >= 9 and any(len(banned) for banned in calls)
    monkeypatch.setattr(type(engine.model.output), "fuses_topk", False)  # the output layer writes logits
    calls.clear()
    ref = engine.generate(src, beam_size=beam, max_decoding_length=10, min_decoding_length=3, num_hypotheses=beam)
    assert not calls
    assert [t.tokens for t in ours] == [t.tokens for t in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=0, atol=1e-5)


def save_rounded_to_bf16(src: Path, dst: Path) -> Path:
    """A copy of a saved Marian model with every parameter rounded to bf16 by HF itself (float32 files)."""
    from transformers import MarianMTModel
    model = MarianMTModel.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(dst)
    return dst


def zero_pad_copy(source: Path, path: Path, logit_bias: dict[int, float] | None = None) -> Path:
    """A copy of a Marian model as CTranslate2 sees it: CTranslate2's converter starts the decoder from a zero
    embedding and drops the <pad> row (right for models Marian trained, whose pad embedding is zero), so the copy
    has a zero pad embedding and a pad logit of -1e4 — the same model for HF, pyengine and CTranslate2.
    logit_bias: added to final_logits_bias (e.g. to make a token likely)."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(source, path)
    state = load_file(str(path / "model.safetensors"))
    pad = json.loads((path / "config.json").read_text())["pad_token_id"]
    state["model.shared.weight"][pad] = 0
    state["final_logits_bias"][0, pad] = -1e4
    for token, bias in (logit_bias or {}).items():
        state["final_logits_bias"][0, token] += bias
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
