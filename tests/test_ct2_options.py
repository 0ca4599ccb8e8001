"""CTranslate2's decoding options, against CTranslate2 4.8.5 itself on the same model converted by its own converter
(a copy of the shipped model with a zero pad embedding: what CTranslate2's Marian converter assumes, see
conftest.zero_pad_copy): float32 tokens identical under greedy search. Under beam search CTranslate2's stopping and
ranking rule is its own, not HF's (on the retrained model they part on a Bible verse with no option at all), so beam 4
is checked twice: against CTranslate2 itself under its rules (search_rules="ctranslate2"), and against HF `generate`
with the option's HF form (bad_words_ids, the tokenizer's truncation) under HF's, the rules the model runs by
default. Each test also checks that the option changed something, so equality means it was applied alike."""
from __future__ import annotations

import pytest

import pyengine
from conftest import zero_pad_copy

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test requirement) is the reference")
TEXTS = ["Open the file in a new window.", "Delete all selected items?", "The printer is out of paper.",
         "Save the document before closing it.", "And God said, Let there be light: and there was light.",
         "Could not connect to the server.", "Show hidden files", "The file already exists. Replace it?"]
UNK = 1  # the default model's <unk>


def converted(tmp_path_factory, name: str, logit_bias: dict | None = None):
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianTokenizer
    root = tmp_path_factory.mktemp(name)
    path = zero_pad_copy(pyengine.engine.resolve_model_path("default"), root / "model", logit_bias)
    TransformersConverter(str(path)).convert(str(root / "ct2"), force=True)
    translator = ctranslate2.Translator(str(root / "ct2"), device="cpu", compute_type="float32", intra_threads=2)
    return pyengine.Engine.load(path), translator, MarianTokenizer.from_pretrained(path)


def hf_generate(model, texts: list[str], beam: int, hf_options: dict, max_input: int | None) -> list[list[str]]:
    """HF's own beam search on the same model: token strings of the best (64 new tokens, no forced end)."""
    import torch
    from transformers import MarianMTModel
    _, _, tok = model
    hf = MarianMTModel.from_pretrained(tok.name_or_path, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id
    bad = [[pad]] + hf_options.pop("bad_words_ids", [])
    batch = tok(texts, return_tensors="pt", padding=True, truncation=max_input is not None, max_length=max_input)
    with torch.inference_mode():
        out = hf.generate(**batch, num_beams=beam, max_new_tokens=64, forced_eos_token_id=None, bad_words_ids=bad,
                          **hf_options)
    return [tok.convert_ids_to_tokens([t for t in row.tolist()[1:] if t not in (pad, hf.config.eos_token_id)])
            for row in out]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return converted(tmp_path_factory, "ct2-options")


@pytest.fixture(scope="module")
def unk_model(tmp_path_factory):
    """The same model with its <unk> logit raised until CTranslate2 writes <unk> in some translations but not all
    (where that happens depends on the trained weights: the smallest such bias of a few)."""
    for bias in (6.0, 8.0, 10.0, 12.0):
        model = converted(tmp_path_factory, f"ct2-unk-{bias:.0f}", {UNK: bias})
        _, translator, tok = model
        outputs = [r.hypotheses[0] for r in translator.translate_batch(
            [tok.convert_ids_to_tokens(tok(t).input_ids) for t in TEXTS], beam_size=4)]
        if 0 < sum("<unk>" in o for o in outputs) < len(outputs):
            return model
    pytest.fail("no <unk> bias made the model write <unk> in some translations but not all")


def both(model, texts: list[str], ct2_options: dict, options: dict, beam: int, hf_options: dict | None = None,
         max_input: int | None = None) -> tuple[list, list]:
    """The same texts through the reference (CTranslate2 for greedy, HF `generate` with `hf_options` for beam search)
    and pyengine, with the same length limit and no forced end at it (CTranslate2 has none; the model's generation
    config asks HF's forced_eos): token strings of the best."""
    engine, translator, tok = model
    ct2_options = {"max_decoding_length": 64, **ct2_options}
    options = {"max_decoding_length": 64, "forced_eos": False, **options}
    sources = [tok.convert_ids_to_tokens(tok(t).input_ids) for t in texts]
    ref = [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=beam, **ct2_options)]
    if beam > 1:  # and under CTranslate2's own beam rules, CTranslate2 itself
        ours = engine.translate_batch(texts, beam_size=beam, search_rules="ctranslate2", **options)
        assert [tok.convert_ids_to_tokens(t.tokens[0]) for t in ours] == ref
        got = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(texts, beam_size=beam, **options)]
        return got, hf_generate(model, texts, beam, hf_options or {}, max_input)
    got = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(texts, beam_size=beam, **options)]
    return got, ref


@pytest.mark.parametrize("beam", [1, 4])
def test_disable_unk(unk_model, beam):
    got, ref = both(unk_model, TEXTS, {}, {}, beam)
    assert got == ref and any("<unk>" in r for r in ref), ref  # the model does write <unk> without the option
    got, ref = both(unk_model, TEXTS, {"disable_unk": True}, {"disable_unk": True}, beam,
                    {"bad_words_ids": [[UNK]]})
    assert got == ref and not any("<unk>" in r for r in ref)


@pytest.mark.parametrize("beam", [1, 4])
def test_suppress_sequences(model, beam):
    engine, _, tok = model
    plain, _ = both(model, TEXTS, {}, {}, beam)
    # a two-token sequence from one translation, a three-token one from another, and a single token
    sequences = [plain[0][1:3], plain[3][:3], [plain[5][0]]]
    ids = [tok.convert_tokens_to_ids(q) for q in sequences]
    got, ref = both(model, TEXTS, {"suppress_sequences": sequences}, {"suppress_sequences": ids}, beam,
                    {"bad_words_ids": ids})
    assert got == ref
    assert got[0] != plain[0] and got[3] != plain[3] and got[5] != plain[5]  # each ban took effect
    for q in sequences:
        assert not any(q == out[i:i + len(q)] for out in got for i in range(len(out)))


@pytest.mark.parametrize("beam", [1, 4])
def test_max_input_length_truncates_as_ctranslate2(model, beam):
    plain, _ = both(model, TEXTS, {}, {}, beam)
    got, ref = both(model, TEXTS, {"max_input_length": 5}, {"max_input_length": 5, "truncate_input": True}, beam,
                    max_input=5)
    assert got == ref and got != plain


def test_option_errors(model):
    engine = model[0]
    with pytest.raises(pyengine.OptionError, match="suppress_sequences"):
        engine.translate(["x"], suppress_sequences=[[]])
    with pytest.raises(pyengine.OptionError, match="outside the target vocabulary"):
        engine.translate(["x"], suppress_sequences=[[1, 10 ** 6]])
    with pytest.raises(pyengine.OptionError, match="disable_unk must be true or false"):
        engine.translate(["x"], disable_unk="yes")
    with pytest.raises(pyengine.InputError, match="truncate_input"):
        engine.translate(["a long sentence of more than five tokens"], max_input_length=5)


END_TEXTS = ["Open the file, then save it.", "If the printer is out of paper, add paper and try again.",
             "Yes, delete it", "Save your changes?"]


@pytest.mark.parametrize("return_end_token", [False, True])
def test_end_token_greedy_equals_ctranslate2(model, return_end_token):
    """A comma ends the hypotheses instead of </s> (CTranslate2 takes the token, pyengine its id)."""
    engine, _, tok = model
    # the same length limit in both, and no forced end at it (CTranslate2 has none; HF's forced_eos would force it)
    limits, ours = {"max_decoding_length": 24}, {"max_decoding_length": 24, "forced_eos": False}
    plain, _ = both(model, END_TEXTS, limits, ours, 1)
    got, ref = both(model, END_TEXTS, {**limits, "end_token": ",", "return_end_token": return_end_token},
                    {**ours, "end_token": tok.convert_tokens_to_ids(","), "return_end_token": return_end_token}, 1)
    assert got == ref and got != plain
    ended = [out for out, p in zip(got, plain) if "," in p]  # these stop at their first comma
    assert ended and all(out[-1] == "," if return_end_token else "," not in out for out in ended)


@pytest.mark.parametrize("ends", [[","], [",", "?"]])
def test_end_token_beam_equals_hf_generate(model, ends):
    """Under beam search CTranslate2's stopping rule is its own (its beam search is not HF's); the HF rules pyengine
    runs are checked against HF `generate` with the same eos_token_id: the comma, or the comma and "?" (then HF
    ranks 3 × beam candidates a step)."""
    import torch
    from transformers import MarianMTModel
    engine, _, tok = model
    ids = tok.convert_tokens_to_ids(ends)
    hf = MarianMTModel.from_pretrained(tok.name_or_path, dtype=torch.float32).eval()  # the same zero-pad copy
    batch = tok(END_TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = hf.generate(**batch, num_beams=4, max_new_tokens=24, eos_token_id=ids, forced_eos_token_id=None)
    want = [[t for t in row.tolist()[1:] if t != hf.config.pad_token_id] for row in out]
    got = engine.translate_batch(END_TEXTS, beam_size=4, max_decoding_length=24, forced_eos=False,
                                 end_token=ids if len(ids) > 1 else ids[0], return_end_token=True)
    assert [t.tokens[0] for t in got] == want
    assert {w[-1] for w in want} >= set(ids)  # every end id ended some translation


BIAS_TEXTS = ["Open the file in a new window.", "Delete all selected items?", "The printer is out of paper.",
              "Save the document before closing it.", "Could not connect to the server.", "Show hidden files"]
BIAS_PREFIXES = ["Öffne die", "Lösche", "Der", "Sichere das", "Konnte", "Zeige die"]


def prefix_tokens(tok, prefixes: list[str]) -> list[list[str]]:
    """The target-side tokens of each prefix, as pyengine's target tokenizer gives them (no </s>)."""
    return [tok.convert_ids_to_tokens(tok(text_target=p).input_ids[:-1]) for p in prefixes]


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_prefix_bias_beta_greedy_equals_ctranslate2(model, beta):
    """prefix_bias_beta: the prefix biases the first steps (the translation may leave it) instead of being forced."""
    engine, translator, tok = model
    sources = [tok.convert_ids_to_tokens(tok(t).input_ids) for t in BIAS_TEXTS]
    ref = [r.hypotheses[0] for r in translator.translate_batch(
        sources, beam_size=1, max_decoding_length=64, target_prefix=prefix_tokens(tok, BIAS_PREFIXES),
        prefix_bias_beta=beta)]
    options = {"beam_size": 1, "max_decoding_length": 64, "forced_eos": False}
    got = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(
        BIAS_TEXTS, target_prefix=BIAS_PREFIXES, prefix_bias_beta=beta, **options)]
    assert got == ref
    forced = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(
        BIAS_TEXTS, target_prefix=BIAS_PREFIXES, **options)]
    free = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(BIAS_TEXTS, **options)]
    assert got != free  # the bias took effect
    assert (got != forced) == (beta < 0.5)  # weakly biased, some translations leave the prefix; strongly, none here


def test_prefix_bias_beta_beam_equals_hf_generate_with_the_bias(model):
    """Beam 4 against HF `generate` with CTranslate2's bias written as an HF logits processor (a beam follows the
    prefix while its own tokens so far are the prefix's)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    engine, _, tok = model
    beta, beam = 0.5, 4
    prefixes = [tok(text_target=p).input_ids[:-1] for p in BIAS_PREFIXES]

    class Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores.clone()
            for row in range(scores.shape[0]):
                prefix, made = prefixes[row // beam], input_ids[row, 1:].tolist()
                if len(made) < len(prefix) and made == prefix[: len(made)]:
                    p = torch.softmax(scores[row], dim=-1) * (1 - beta)
                    p[prefix[len(made)]] += beta
                    out[row] = p.log()
            return out

    want = hf_generate(model, BIAS_TEXTS, beam, {"logits_processor": LogitsProcessorList([Bias()])}, None)
    got = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(
        BIAS_TEXTS, beam_size=beam, target_prefix=BIAS_PREFIXES, prefix_bias_beta=beta, max_decoding_length=64,
        forced_eos=False)]
    assert got == want
    free = [tok.convert_ids_to_tokens(t.tokens[0]) for t in engine.translate_batch(
        BIAS_TEXTS, beam_size=beam, max_decoding_length=64, forced_eos=False)]
    assert got != free
    with pytest.raises(pyengine.OptionError, match="prefix_bias_beta must be below 1"):
        engine.translate(["x"], target_prefix=["Der"], prefix_bias_beta=1.0)



ALT_TEXTS = ["Open the file in a new window.", "Delete all selected items?", "The printer is out of paper.",
             "Could not connect to the server."]


@pytest.mark.parametrize("num, min_prob", [(3, 0.0), (4, 0.05)])
def test_return_alternatives_greedy_equals_ctranslate2(model, num, min_prob):
    """The num_hypotheses most likely first tokens, each continued greedily: as CTranslate2 4.8.5."""
    engine, translator, tok = model
    sources = [tok.convert_ids_to_tokens(tok(t).input_ids) for t in ALT_TEXTS]
    ref = [r.hypotheses for r in translator.translate_batch(
        sources, beam_size=1, max_decoding_length=32, return_alternatives=True, num_hypotheses=num,
        min_alternative_expansion_prob=min_prob)]
    got = engine.translate_batch(ALT_TEXTS, beam_size=1, max_decoding_length=32, return_alternatives=True,
                                 num_hypotheses=num, min_alternative_expansion_prob=min_prob)
    assert [[tok.convert_ids_to_tokens(h) for h in t.tokens] for t in got] == ref
    assert all(ref) and any(len(r) > 1 for r in ref)  # alternatives, not one translation
    assert (min_prob > 0) == any(len(r) < num for r in ref)  # the threshold dropped some


@pytest.mark.parametrize("beam", [1, 4])
def test_return_alternatives_after_a_prefix_as_hf(model, beam):
    """After a target prefix the alternatives are the most likely tokens of HF's teacher-forced distribution there
    (the pad and the end token excluded) and each continues as HF `generate` does from the prefix and the token as
    its decoder prompt. (CTranslate2 4.8.5 expands these Marian models from the distribution at the first position
    instead, ignoring the prefix: after "Öffne" it offers "Datei", "in", "Dateisystem" where its own forced-prefix
    decoding, HF and pyengine continue with "die".)"""
    import torch
    from transformers import MarianMTModel
    engine, _, tok = model
    prefixes = ["Öffne", "Lösche", "Der", "Konnte"]
    got = engine.translate_batch(ALT_TEXTS, target_prefix=prefixes, beam_size=beam, max_decoding_length=32,
                                 return_alternatives=True, num_hypotheses=3, forced_eos=False)
    hf = MarianMTModel.from_pretrained(tok.name_or_path, dtype=torch.float32).eval()
    start, pad, eos = hf.config.decoder_start_token_id, hf.config.pad_token_id, hf.config.eos_token_id
    for text, prefix, translation in zip(ALT_TEXTS, prefixes, got):
        source = tok([text], return_tensors="pt")
        head = tok(text_target=prefix).input_ids[:-1]
        with torch.inference_mode():
            logp = hf(**source, decoder_input_ids=torch.tensor([[start] + head])).logits[0, -1].log_softmax(-1)
            logp[[pad, eos]] = float("-inf")
        firsts = logp.topk(3).indices.tolist()
        assert [h[: len(head) + 1] for h in translation.tokens] == [head + [t] for t in firsts]
        for first, hyp, score in zip(firsts, translation.tokens, translation.scores):
            with torch.inference_mode():
                out = hf.generate(**source, decoder_input_ids=torch.tensor([[start] + head + [first]]),
                                  num_beams=beam, do_sample=False, max_new_tokens=32 - len(head) - 1,
                                  forced_eos_token_id=None, bad_words_ids=[[pad]])
            assert hyp == [t for t in out[0].tolist()[1:] if t not in (pad, eos)]
            assert score < float(logp[first]) + 1e-4  # the token's log-prob plus the continuation's (negative)
    with pytest.raises(pyengine.OptionError, match="return_alternatives works with neither"):
        engine.translate(["x"], return_alternatives=True, prefix_bias_beta=0.5)


@pytest.fixture(scope="module")
def many_unk_model(tmp_path_factory):
    """The <unk> logit raised further (9): greedy search writes <unk> in half of the texts, in one a run of them."""
    return converted(tmp_path_factory, "ct2-unk-9", {UNK: 9.0})


@pytest.mark.parametrize("beam", [1, 4])
def test_replace_unknowns_equals_ctranslate2(many_unk_model, beam):
    """Each <unk> of the output becomes the source piece it attends most (CTranslate2's replace_unknowns, its attention
    the last layer's first head: alignment_heads=1); the text is HF's of those pieces. Beam 4 under CTranslate2's
    rules, CTranslate2 given one sentence at a time: in a batch its beam search gives the first output token another
    sentence's attention row (tests/test_ct2_rules.py)."""
    engine, translator, tok = many_unk_model
    sources = [tok.convert_ids_to_tokens(tok(t).input_ids) for t in TEXTS]
    plain = [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=beam, max_decoding_length=64)]
    ref = [translator.translate_batch([s], beam_size=beam, max_decoding_length=64, replace_unknowns=True)[0]
           .hypotheses[0] for s in sources]
    assert sum("<unk>" in p for p in plain) >= 2 and not any("<unk>" in r for r in ref)  # the option replaced them
    got = engine.translate_batch(TEXTS, beam_size=beam, max_decoding_length=64, forced_eos=False, replace_unknowns=True,
                                 alignment_heads=1, search_rules="ctranslate2")
    want = [tok.convert_tokens_to_string([p for p in r if p not in ("</s>", "<unk>", "<pad>")]) for r in ref]
    assert [t.hypotheses[0] for t in got] == want
    assert got[0].attention is None  # read for the replacement, not returned
    with pytest.raises(pyengine.OptionError, match="translate_batch"):
        engine.generate([tok(TEXTS[0]).input_ids], replace_unknowns=True)


def test_streamed_log_probs_equal_ctranslate2_generate_tokens(model):
    """translate_iter's events under greedy search carry each generated token's log-probability, the end token's
    included: CTranslate2's generate_tokens(return_log_prob=True) on the same model (within its float32 difference);
    they sum to the score (no length penalty). Beam search's events carry none (its best so far may be revised)."""
    engine, translator, tok = model
    for text in TEXTS[:5]:
        ref = list(translator.generate_tokens(tok.convert_ids_to_tokens(tok(text).input_ids), max_decoding_length=64,
                                              return_log_prob=True))
        events = list(engine.translate_iter([text], beam_size=1, max_decoding_length=64, forced_eos=False))
        final = events[-1]
        assert final.done and tok.convert_ids_to_tokens(final.tokens) + ["</s>"] == [r.token for r in ref]
        assert final.log_probs == pytest.approx([r.log_prob for r in ref], abs=2e-3)
        assert [len(e.log_probs) for e in events] == list(range(1, len(ref) + 1))  # one more each step
        scored = engine.translate_batch([text], beam_size=1, max_decoding_length=64, forced_eos=False,
                                        length_penalty=0.0)[0]
        assert sum(final.log_probs) == pytest.approx(scored.scores[0], abs=1e-4)
    assert all(e.log_probs is None for e in engine.translate_iter(["", TEXTS[0]], beam_size=2))  # a blank text too
    assert [e.log_probs for e in engine.translate_iter([""], beam_size=1)] == [[]]
