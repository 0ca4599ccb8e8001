"""engine.translate_iter: each sentence's best hypothesis as it grows, greedy and beam, ending in the
same translation translate() gives."""
from __future__ import annotations

import pytest

import pyengine
from conftest import sample_lines


@pytest.fixture(scope="module")
def engine(text_model_dir):
    return pyengine.Engine.load(text_model_dir)


@pytest.mark.parametrize("beam", [1, 3])
def test_stream_ends_with_the_translation(engine, beam):
    texts = sample_lines()[:6] + [""]
    expected = engine.translate(texts, beam_size=beam)
    events = list(engine.translate_iter(texts, beam_size=beam))
    finals = {e.index: e for e in events if e.done}
    assert sorted(finals) == list(range(len(texts)))
    assert [finals[i].text for i in range(len(texts))] == expected
    for i in range(len(texts) - 1):  # every non-empty sentence streams partial results before its final one
        partial = [e for e in events if e.index == i and not e.done]
        assert partial and all(len(a.tokens) + 1 == len(b.tokens) for a, b in zip(partial, partial[1:]))
        if beam == 1:  # greedy: each event extends the previous one
            assert all(b.tokens[:len(a.tokens)] == a.tokens for a, b in zip(partial, partial[1:]))
            assert finals[i].tokens[:len(partial[-1].tokens)] == partial[-1].tokens


def test_stream_input_errors_come_first(engine):
    with pytest.raises(pyengine.InputError, match="input 1"):
        next(engine.translate_iter(["ok", 5]))
    with pytest.raises(pyengine.OptionError):
        next(engine.translate_iter(["ok"], beam=2))
