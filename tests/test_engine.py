"""Engine API: text parity with HF, batch invariance, bad input, loader errors, CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyengine
from conftest import hf_model, sample_lines
from pyengine.errors import CheckpointError, InputError, OptionError, UnknownFormatError
from pyengine.model.f32_linear import f32_available


@pytest.fixture(scope="module")
def engine(text_model_dir):
    return pyengine.Engine.load(text_model_dir)


def test_translate_matches_hf_generate_and_decode(engine, text_model_dir):
    from transformers import MarianTokenizer

    tok = MarianTokenizer.from_pretrained(text_model_dir)
    hf = hf_model(text_model_dir)
    texts = sample_lines()[:24]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf.generate(**batch)  # the model's generation_config: beam 3, max_length 24
    assert engine.translate(texts) == tok.batch_decode(ref, skip_special_tokens=True)


def test_batch_invariance(engine):
    """A sentence's tokens do not depend on what it is batched with (float32)."""
    texts = sample_lines()[:64]
    alone = [engine.translate_batch([t], beam_size=2)[0].tokens for t in texts]
    for size in (1, 2, 64):
        for start in range(0, len(texts), size):
            got = engine.translate_batch(texts[start:start + size], beam_size=2)
            assert [g.tokens for g in got] == alone[start:start + size]


def test_small_token_budget_splits_batches_and_keeps_order(text_model_dir):
    small = pyengine.Engine.load(text_model_dir, max_batch_tokens=60, max_batch_size=3)
    big = pyengine.Engine.load(text_model_dir)
    texts = sample_lines()[:20]
    assert small.translate(texts, beam_size=1) == big.translate(texts, beam_size=1)


def test_empty_inputs(engine):
    assert engine.translate([]) == []
    assert engine.translate(["", "   "]) == ["", ""]
    out = engine.translate(["", sample_lines()[0], ""])
    assert out[0] == "" and out[2] == "" and out[1] == engine.translate([sample_lines()[0]])[0]


def test_n_best_and_scores(engine):
    r = engine.translate_batch([sample_lines()[3]], beam_size=3, num_hypotheses=3, return_scores=True)[0]
    assert len(r.tokens) == len(r.scores) == len(r.hypotheses) == 3
    assert r.scores == sorted(r.scores, reverse=True)


def test_non_string_item_is_named_and_engine_stays_usable(engine):
    with pytest.raises(InputError, match=r"input 1: expected str, got int"):
        engine.translate(["fine", 3, "also fine"])
    with pytest.raises(InputError, match="input 0: expected str, got NoneType"):
        engine.translate([None])
    with pytest.raises(InputError, match="list of strings"):
        engine.translate("a bare string")
    assert engine.translate(["fine"]) == engine.translate(["fine"])


def test_over_long_input_refused_unless_truncated(engine):
    long = " ".join(sample_lines()[:40])  # far beyond the model's 256 positions
    with pytest.raises(InputError, match=r"input 1: \d+ tokens exceed the limit of 256"):
        engine.translate(["short", long])
    out = engine.translate(["short", long], truncate_input=True)
    assert len(out) == 2 and out[0] == engine.translate(["short"])[0]


def test_unknown_and_bad_options(engine):
    with pytest.raises(OptionError, match="unknown decoding option"):
        engine.translate(["x"], beam=3)
    with pytest.raises(OptionError, match="num_hypotheses"):
        engine.translate(["x"], beam_size=2, num_hypotheses=3)
    with pytest.raises(OptionError, match="exceeds the model's 256 target positions"):
        engine.translate(["x"], max_decoding_length=500)


def test_resolved_options_are_kept_and_refusals_repeat(engine):
    """A server's repeated option sets are resolved once: the same options (lists as a JSON body gives them) give the
    same frozen object, equal to a fresh resolution; other types are other options, and a refusal is not kept."""
    first = engine.options(beam_size=2, suppress_tokens=[5, 6], length_penalty=0.5)
    assert engine.options(length_penalty=0.5, suppress_tokens=[5, 6], beam_size=2) is first
    assert first == engine._resolve(dict(beam_size=2, suppress_tokens=[5, 6], length_penalty=0.5))
    assert engine.options(beam_size=2, suppress_tokens=[5, 7], length_penalty=0.5).suppress_tokens == (5, 7)
    for _ in range(2):
        with pytest.raises(OptionError, match="seed"):
            engine.options(seed="1")
        with pytest.raises(OptionError, match="suppress_tokens"):
            engine.options(suppress_tokens=[[1]])
    assert engine.options(seed=1).seed == 1
    with pytest.raises(OptionError, match="seed must be an integer"):  # True == 1, yet not the option seed=1 is
        engine.options(seed=True)


@pytest.mark.parametrize("options,words", [
    ({"suppress_tokens": [[1]]}, "suppress_tokens"), ({"suppress_tokens": 5}, "suppress_tokens"),
    ({"suppress_tokens": [10 ** 9]}, "outside the target vocabulary"), ({"seed": "1"}, "seed"),
    ({"seed": 2 ** 63}, "seed"), ({"sampling_topp": "0.9"}, "sampling_topp"),
    ({"sampling_temperature": None}, "sampling_temperature"), ({"sampling_temperature": 1e-300}, "sampling_temperature"),
    ({"max_input_length": "5"}, "max_input_length"), ({"forced_bos_token": 5.5}, "forced_bos_token"),
    ({"forced_bos_token": 10 ** 6}, "outside the target vocabulary"), ({"max_length_factor": 1e308}, "max_length_factor"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"length_penalty": 1e308}, "length_penalty"),
    ({"coverage_penalty": float("inf")}, "coverage_penalty"), ({"beam_size": True}, "beam_size"),
    ({"beam_size": 2.0}, "beam_size"), ({"return_scores": "yes"}, "return_scores"),
    ({"early_stopping": 2}, "early_stopping"), ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
], ids=lambda x: str(x) if isinstance(x, str) else None)
def test_every_option_is_checked_and_named(engine, options, words):
    """Type, range, finiteness and vocabulary: one OptionError naming the option, before any decoding."""
    with pytest.raises(OptionError, match=words):
        engine.translate(["x"], **options)


def test_max_beam_size_bounds_beam_size(tmp_path):
    bounded = pyengine.Engine.load("default", max_beam_size=8)
    with pytest.raises(OptionError, match=r"beam_size 9 is over this engine's limit of 8 \(max_beam_size\)"):
        bounded.translate(["x"], beam_size=9)
    assert bounded.translate(["Open the file."], beam_size=8) == pyengine.Engine.load("default").translate(
        ["Open the file."], beam_size=8)


def test_generate_validates_ids(engine):
    with pytest.raises(InputError, match="input 1: token ids must be ints"):
        engine.generate([[5, 0], [10 ** 6, 0]])
    with pytest.raises(InputError, match="input 0: expected a non-empty list"):
        engine.generate([[]])


def test_unknown_format_lists_what_was_looked_for(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(UnknownFormatError, match=r"no known model format.*model_type 'marian'.*weights.bin"):
        pyengine.Engine.load(tmp_path)
    with pytest.raises(UnknownFormatError, match="no such file"):
        pyengine.Engine.load(tmp_path / "missing")


def _copy_with(text_model_dir, tmp_path, edit):
    dst = tmp_path / "model"
    shutil.copytree(text_model_dir, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(text_model_dir, tmp_path):
    key = "model.decoder.layers.0.fc1.weight"
    dst = _copy_with(text_model_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        pyengine.Engine.load(dst)


def test_misshaped_tensor_names_key_and_both_shapes(text_model_dir, tmp_path):
    key = "model.encoder.layers.1.self_attn.k_proj.weight"
    dst = _copy_with(text_model_dir, tmp_path, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(32, 31\), expected \(32, 32\)"):
        pyengine.Engine.load(dst)


def test_unused_tensor_is_an_error(text_model_dir, tmp_path):
    dst = _copy_with(text_model_dir, tmp_path, lambda t: t.__setitem__("model.encoder.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="matched nothing.*model.encoder.extra.weight"):
        pyengine.Engine.load(dst)


def test_truncated_weights_file(text_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(text_model_dir, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read tensors"):
        pyengine.Engine.load(dst)


def test_unavailable_backend_is_an_error(text_model_dir):
    with pytest.raises(pyengine.BackendError, match="unknown backend"):
        pyengine.Engine.load(text_model_dir, backend="tensorrt")
    # on CPU without the interpreter, asking for Triton is an error, never a silent fallback to torch
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", f"import pyengine; pyengine.Engine.load({str(text_model_dir)!r}, "
                          "backend='triton')"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "BackendError" in run.stderr and "TRITON_INTERPRET=1" in run.stderr
    backends = pyengine.Engine.load(text_model_dir, backend="torch").backends
    assert backends["attention"] == "torch" and backends["add_layer_norm"] == "torch"
    # float32: pyengine's own GEMM where the CPU has AVX-512, else PyTorch's
    want = ("f32-avx512",) if f32_available() else ("torch", "torch-onednn-prepacked")
    assert backends["linear"] in want


def _cli(args, stdin: bytes):
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=stdin, capture_output=True, timeout=300)


def test_cli_translates_stdin_like_the_api(engine, text_model_dir):
    texts = sample_lines()[:30]
    run = _cli(["translate", "-m", str(text_model_dir), "--beam-size", "2"], "\n".join(texts).encode() + b"\n")
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().splitlines() == engine.translate(texts, beam_size=2)


def test_cli_reports_bad_lines(text_model_dir):
    run = _cli(["translate", "-m", str(text_model_dir)], b"good line\n\xff\xfe broken\n")
    assert run.returncode == 2 and b"line 2 is not valid UTF-8" in run.stderr
    long = (" ".join(sample_lines()[:40])).encode()
    run = _cli(["translate", "-m", str(text_model_dir)], b"ok\n" + long + b"\n")
    assert run.returncode == 2 and b"line 2:" in run.stderr and b"exceed the limit" in run.stderr


@pytest.mark.parametrize("v,k", [(58101, 8), (5000, 1), (1024, 10), (40, 3)])
def test_topk_rows_equals_torch_topk(v, k):
    from pyengine.decoding.processors import topk_rows
    gen = torch.Generator().manual_seed(v + k)
    x = torch.randn(37, v, generator=gen)
    x[3, :] = float("-inf")
    x[3, 17] = 0.0  # a forced-EOS-like row
    x[5, torch.randint(0, v, (k,), generator=gen)] = 50.0  # several maxima in one chunk
    values, ids = topk_rows(x, k)
    ref_values, _ = torch.topk(x, k, dim=-1)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, ids), values)  # the ids point at those values
