"""pyengine's MarianTokenizer against transformers' MarianTokenizer on real English text."""
from __future__ import annotations

import random

import pytest
from transformers import MarianTokenizer as HFMarianTokenizer

from conftest import build_marian, sample_lines, write_tokenizer
from pyengine.loaders import load_model


@pytest.fixture(scope="module", params=[False, True], ids=["shared-vocab", "separate-vocabs"])
def tokenizers(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    size = write_tokenizer(path, separate=request.param)
    build_marian(path, vocab=size, shared=not request.param, d_model=16, heads=2, ffn=16, layers=(1, 1))
    ours = load_model(path).tokenizer
    ref = HFMarianTokenizer.from_pretrained(path)
    return ours, ref


EXTRA = ["", " ", "  leading and trailing  ", "Tabs\tand\nnewlines", "Ünïcödé — “quotes” … 日本語",
         ">>deu<< with a language code", "a </s> inside", "<unk> and <pad> written out", "x" * 300]


def test_encode_matches_hf_on_real_text(tokenizers):
    ours, ref = tokenizers
    lines = sample_lines() + EXTRA
    expected = ref(lines)["input_ids"]
    for line, exp in zip(lines, expected):
        assert ours.encode(line) == exp, repr(line)


def test_decode_matches_hf(tokenizers):
    ours, ref = tokenizers
    tgt_ids = ref(text_target=sample_lines())["input_ids"]
    rng = random.Random(0)
    vocab = len(ref.decoder)
    random_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    for ids in tgt_ids + random_ids:
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
