"""The packed weights on huge pages (pyengine/model/pages.py): placing them changes no token or score, every
packed weight the GEMMs read lies in the one buffer, what engine.backends reports matches what the kernel says
(/proc/self/smaps_rollup, read here on its own), and where the kernel grants no huge pages, or the option is off,
nothing moves and the report says why."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import build_marian, random_sources
from pyengine.errors import OptionError
from pyengine.model import pages
from pyengine.model.f32_linear import f32_available
from pyengine.model.linear import Linear, amx_available, bf16_kernels, vnni_available

OWN_DTYPES = (["int8"] if amx_available() or vnni_available() else []) + (["bfloat16"] if bf16_kernels() else []) + \
    (["float32"] if f32_available() else [])
pytestmark = pytest.mark.skipif(not OWN_DTYPES, reason="none of pyengine's own int8, bf16 or float32 GEMMs runs here")
# with d_model 384: 2.3 MB of int8 (4.6 MB of bf16, 9.2 MB of float32) output layer, ~5 (~10, ~20) MB of packed weights
VOCAB = 6000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_marian(tmp_path_factory.mktemp("pages"), vocab=VOCAB, d_model=384, heads=4, ffn=256, seed=21)


def huge_total() -> int:
    """AnonHugePages of the whole process, in bytes (the kernel's own count)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def packed_tensors(engine) -> list[torch.Tensor]:
    model = engine.model
    records = [m.packed for m in model.modules() if isinstance(m, Linear)] + [model.output.packed]
    return [r.packed for r in records]


@pytest.mark.parametrize("dtype", OWN_DTYPES)
def test_placed_weights_translate_the_same(model_dir, dtype):
    placed = pyengine.Engine.load(model_dir, dtype=dtype)
    kept = pyengine.Engine.load(model_dir, dtype=dtype, huge_pages=False)
    assert kept.backends["weight_pages"] == "off (huge_pages=False)"
    src = random_sources(12, VOCAB, seed=5, hi=20)
    for beam in (1, 4):
        a = placed.generate(src, beam_size=beam, max_decoding_length=24, num_hypotheses=min(beam, 2))
        b = kept.generate(src, beam_size=beam, max_decoding_length=24, num_hypotheses=min(beam, 2))
        assert [(t.tokens, t.scores) for t in a] == [(t.tokens, t.scores) for t in b]
    if pages.thp_setting() in ("always", "madvise"):
        # every packed weight lies in one buffer from a 2 MiB boundary, each on pages of its own, none overlapping
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in packed_tensors(placed))
        assert all(start % pages.ALIGN == 0 for start, _ in spans)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
        total = sum(-(-(end - start) // pages.ALIGN) * pages.ALIGN for start, end in spans)
        assert spans[-1][1] - spans[0][0] <= total and spans[0][0] % pages.HUGE_PAGE == 0


@pytest.mark.skipif(pages.thp_setting() not in ("always", "madvise"), reason="this kernel grants no huge pages")
def test_report_matches_the_kernel(model_dir):
    gc.collect()  # (an engine freed by the collector during the load would lower the count)
    gc.disable()
    try:
        before = huge_total()
        engine = pyengine.Engine.load(model_dir, dtype=OWN_DTYPES[0])
        gained = huge_total() - before
    finally:
        gc.enable()
    placement = engine.model.weight_pages
    assert engine.backends["weight_pages"] == placement.pages == "2 MiB", placement
    assert 2 << 20 <= placement.huge_bytes <= placement.total_bytes
    assert gained >= placement.huge_bytes  # the process gained at least what the report claims


def test_without_transparent_huge_pages_nothing_moves(model_dir, tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(pages, "THP_SETTING", setting)
    assert pages.thp_setting() == "never"
    monkeypatch.setattr(pages, "huge_page_buffer", lambda nbytes: pytest.fail("a buffer was made"))
    engine = pyengine.Engine.load(model_dir, dtype=OWN_DTYPES[0])
    assert engine.backends["weight_pages"] == "4 KiB: transparent huge pages are never"
    monkeypatch.setattr(pages, "THP_SETTING", tmp_path / "missing")
    assert pages.thp_setting() == "unavailable"
    assert pages.place_weights([(torch.ones(4), lambda t: pytest.fail("rebound"))]) == \
        pages.Placement("4 KiB: transparent huge pages are unavailable")


def test_float_weights_and_bad_option(model_dir):
    """float32 weights are placed where pyengine's own float32 GEMM runs them (AVX-512), else left to PyTorch."""
    engine = pyengine.Engine.load(model_dir)
    if f32_available():
        assert engine.backends["weight_pages"] == "2 MiB" or engine.backends["weight_pages"].startswith("4 KiB: ")
        assert engine.model.weight_pages.total_bytes >= 4 * VOCAB * 384  # the output layer's float32 weight at least
    else:
        assert engine.backends["weight_pages"] == "default: no packed weights of pyengine's own GEMMs"
    with pytest.raises(OptionError, match="huge_pages must be true or false"):
        pyengine.Engine.load(model_dir, dtype=OWN_DTYPES[0], huge_pages="yes")


def test_huge_page_buffer_is_aligned_and_backed():
    buffer = pages.huge_page_buffer(6 << 20)
    assert buffer.data_ptr() % pages.HUGE_PAGE == 0 and buffer.numel() == 6 << 20
    buffer.fill_(7)
    assert int(buffer.sum()) == 7 * (6 << 20)
    if pages.thp_setting() in ("always", "madvise"):
        assert pages.huge_bytes(buffer) >= 4 << 20  # at least two of its three pages (the kernel may be short)
