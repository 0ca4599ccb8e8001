"""Hard alignments (Marian's `--alignment hard` rule over tokens) where the true alignment is known: models trained
here, in seconds, by Hugging Face's own MarianMTModel to copy and to reverse their input align target token t with
source token t (the diagonal) and n-1-t (the anti-diagonal); and the CLI's `--alignment` output is the API's, in
Marian's "s-t" format."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

import pyengine
from pyengine.documents.align import alignment_text, hard_alignment

V, PAD, EOS = 24, 23, 0


def trained(tmp_path_factory, reverse: bool, steps: int) -> pyengine.Engine:
    from transformers import MarianConfig, MarianMTModel
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = MarianConfig(vocab_size=V, decoder_vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=1, decoder_attention_heads=1, encoder_ffn_dim=128, decoder_ffn_dim=128,
                       pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=EOS, max_position_embeddings=32,
                       dropout=0.0, scale_embedding=True, share_encoder_decoder_embeddings=True)
    model = MarianMTModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            n = rng.randint(4, 9)
            body = torch.randint(2, V - 1, (64, n), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
            eos = torch.zeros(64, 1, dtype=torch.long)
            target = body.flip(1) if reverse else body
            loss = model(input_ids=torch.cat([body, eos], 1), labels=torch.cat([target, eos], 1)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1, f"the model did not learn its task (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("reverser" if reverse else "copier")
    model.save_pretrained(path)
    return pyengine.Engine.load(path)


@pytest.fixture(scope="module")
def copier(tmp_path_factory) -> pyengine.Engine:
    # (every output right from ~750 steps when measured; the reversal from ~1000, at 83% on the anti-diagonal)
    return trained(tmp_path_factory, reverse=False, steps=1000)


@pytest.fixture(scope="module")
def reverser(tmp_path_factory) -> pyengine.Engine:
    return trained(tmp_path_factory, reverse=True, steps=1250)


def aligned_share(engine, reverse: bool) -> float:
    """The share of target tokens aligned to their true source token, greedy and beam 3, 24 sentences each; every
    output must be the task's answer."""
    rng = random.Random(1)
    sources = [[rng.randint(2, V - 2) for _ in range(rng.randint(4, 9))] + [EOS] for _ in range(24)]
    right = total = 0
    for beam in (1, 3):
        for src, t in zip(sources, engine.generate(sources, beam_size=beam, max_decoding_length=12,
                                                  return_attention=True)):
            n = len(src) - 1
            assert t.tokens[0] == (src[:n][::-1] if reverse else src[:n])
            truth = {(n - 1 - j if reverse else j, j) for j in range(n)}
            right += len(truth & set(t.hard_alignment()))
            total += n
    return right / total


def test_copy_model_aligns_on_the_diagonal(copier):
    assert aligned_share(copier, reverse=False) == 1.0


def test_reversal_model_aligns_on_the_anti_diagonal(reverser):
    # attention is not an alignment by construction: reversing, the decoder often looks at a neighbour of the token
    # it copies (or at </s>, whose encoder state carries the last source token): 83% on the anti-diagonal when
    # measured (a random choice: ~15%)
    assert aligned_share(reverser, reverse=True) >= 0.75


def test_rule_ties_and_format():
    attention = [[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]
    assert hard_alignment(attention) == [(0, 1), (1, 0), (2, 2)]  # a tie goes to the lower source index
    assert alignment_text(hard_alignment(attention)) == "0-1 1-0 2-2"
    with pytest.raises(pyengine.OptionError, match="return_attention"):
        pyengine.Translation([[1]], [0.0], ["x"]).hard_alignment()


def test_cli_alignment_is_the_apis():
    texts = ["Open the file.", "The printer is out of paper."]
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate", "--alignment", "--beam-size", "4", "--quiet"],
                         input="\n".join(texts) + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    engine = pyengine.Engine.load("default")
    for line, t in zip(run.stdout.splitlines(), engine.translate_batch(texts, beam_size=4, return_attention=True)):
        text, pairs = line.split(" ||| ")
        assert text == t.hypotheses[0] and pairs == alignment_text(t.hard_alignment())
        targets = sorted(int(p.split("-")[1]) for p in pairs.split())
        assert targets == list(range(len(t.tokens[0]) + 1))  # one source token per target token, the end included


def test_cli_word_scores_sum_to_the_search_score():
    """--word-scores (teacher forcing on the decoded ids) against the search's own score: with length_penalty 0 a
    hypothesis's score is the sum of its tokens' log-probabilities, EOS included."""
    texts = ["Open the file.", "Save your changes?", "The printer is out of paper."]
    for beam in ("1", "4"):
        run = subprocess.run([sys.executable, "-m", "pyengine", "translate", "--word-scores", "--scores",
                              "--length-penalty", "0", "--beam-size", beam, "--quiet"],
                             input="\n".join(texts) + "\n", capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        for line in run.stdout.splitlines():
            head, scores = line.split(" ||| WordScores= ")
            total = float(head.split("\t")[0])
            assert sum(map(float, scores.split())) == pytest.approx(total, abs=2e-4)


def test_cli_n_best_is_marians_layout():
    """--n-best: every hypothesis on its own line as Marian's output printer writes it, 'N ||| text[ ||| alignment]
    [ ||| WordScores= ...] ||| F0= path ||| score'; the path score (teacher forcing on the decoded ids) over the
    length (EOS included) is the beam search's own score at length_penalty 1."""
    texts = ["Open the file.", "Save your changes?"]
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate", "--n-best", "--num-hypotheses", "3",
                          "--beam-size", "4", "--length-penalty", "1", "--alignment", "--word-scores", "--quiet"],
                         input="\n".join(texts) + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    want = pyengine.Engine.load("default").translate_batch(texts, beam_size=4, num_hypotheses=3, length_penalty=1.0,
                                                            return_attention=True)
    lines = run.stdout.splitlines()
    assert len(lines) == 6
    for n, line in enumerate(lines):
        index, text, pairs, words, f0, score = line.split(" ||| ")
        t, k = want[n // 3], n % 3
        assert (int(index), text, pairs) == (n // 3, t.hypotheses[k], alignment_text(t.hard_alignment(k)))
        words = [float(w) for w in words.removeprefix("WordScores= ").split()]
        assert len(words) == len(t.tokens[k]) + 1 and f0.startswith("F0= ")
        assert float(f0[4:]) == pytest.approx(sum(words), abs=1e-4)
        assert float(score) == pytest.approx(t.scores[k], abs=1e-5)
        assert float(f0[4:]) / len(words) == pytest.approx(t.scores[k], abs=1e-4)
