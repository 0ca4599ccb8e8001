"""On a CUDA GPU (`pytest -m cuda`, run by scripts/gpu_check.sh with TRITON_INTERPRET=0): the Triton kernels compiled
and run on the device against float64; the Triton path, the PyTorch path and Hugging Face `generate` on the same
GPU (greedy and beam: float32 tokens identical; float16/bfloat16 log-probs within twice HF's own error in that
precision); batch invariance; a real `pyengine serve --device cuda` process under concurrent load.
Collected everywhere, skipped with the reason where there is no CUDA device."""
from __future__ import annotations

import json

import pytest
import torch

import pyengine
from kernel_tolerance import check

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: these run on a GPU machine (scripts/gpu_check.sh OUTDIR)")]

CUDA = torch.device("cuda")
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    from pyengine.kernels._common import interpreting
    if interpreting():
        pytest.fail("TRITON_INTERPRET=1 is set: the GPU tests run compiled kernels (TRITON_INTERPRET=0; "
                    "scripts/gpu_check.sh sets it)")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Held-out UI strings and Bible verses of the default model (data/heldout), mixed lengths."""
    from pathlib import Path
    heldout = Path(__file__).resolve().parents[1] / "data" / "heldout"
    rows = []
    for name in ("test.ui.jsonl", "test.bible.jsonl"):
        with open(heldout / name, encoding="utf-8") as fh:
            rows += [json.loads(line)["en"] for _, line in zip(range(12), fh)]
    return rows


# -- the kernels, compiled for this GPU ---------------------------------------------------------------
def test_topk_kernel_equals_the_cpp_op():
    from pyengine import _C
    from pyengine.kernels.topk import log_softmax_topk
    gen = torch.Generator().manual_seed(0)
    for rows, vocab, k, banned in [(64, 58101, 8, [0, 58100]), (7, 1000, 1000, [3]), (3, 37, 5, [])]:
        x = 4 * torch.randn(rows, vocab, generator=gen)
        x[:, 5] = x[:, 9] = x.max() + 1  # a tie at the top
        values, ids = log_softmax_topk(x.to(CUDA), k, banned)
        ref_values, ref_ids = _C.log_softmax_topk(x.clone(), k, torch.tensor(banned, dtype=torch.long))
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_layernorm_and_attention_kernels(dtype):
    from pyengine.kernels.attention import attention, attention_ref
    from pyengine.kernels.layernorm import add_layer_norm, add_layer_norm_ref
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(33, 512, generator=gen) for _ in range(2))
    w, b = 1 + 0.3 * torch.randn(512, generator=gen), 0.3 * torch.randn(512, generator=gen)
    got = add_layer_norm(*(t.to(CUDA, dtype) for t in (x, r, w, b)), 1e-5)
    check(got.cpu(), add_layer_norm_ref(x.double(), r.double(), w.double(), b.double(), 1e-5),
          add_layer_norm_ref(*(t.to(CUDA, dtype) for t in (x, r, w, b)), 1e-5).cpu(), "layer norm")
    q, k, v = (torch.randn(4, 8, tq, 64, generator=gen) for tq in (1, 37, 37))
    lengths = torch.tensor([37, 20, 5, 1])
    got = attention(q.to(CUDA, dtype), k.to(CUDA, dtype), v.to(CUDA, dtype), lengths.to(CUDA))
    low = attention_ref(q.to(CUDA, dtype), k.to(CUDA, dtype), v.to(CUDA, dtype), lengths.to(CUDA))
    check(got.cpu(), attention_ref(q.double(), k.double(), v.double(), lengths), low.cpu(), "attention")


# -- decoding on the GPU ----------------------------------------------------------------------------
def hf_generate(texts: list[str], beam: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import MarianMTModel, MarianTokenizer
    path = pyengine.engine.resolve_model_path("default")
    tok = MarianTokenizer.from_pretrained(path)
    model = MarianMTModel.from_pretrained(path, dtype=dtype).to(CUDA).eval()
    batch = tok(texts, return_tensors="pt", padding=True).to(CUDA)
    with torch.inference_mode():
        out = model.generate(**batch, num_beams=beam, max_length=256, do_sample=False)
    pad, eos = model.config.pad_token_id, model.config.eos_token_id
    return [[t for t in row.tolist()[1:] if t not in (pad, eos)] for row in out]


@pytest.mark.parametrize("beam", [1, 4])
def test_float32_triton_torch_and_hf_generate_give_the_same_tokens(texts, beam):
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 GEMMs in every system
    triton = pyengine.Engine.load("default", device="cuda", backend="triton")
    plain = pyengine.Engine.load("default", device="cuda", backend="torch")
    assert triton.backends["log_softmax_topk"] == plain.backends["log_softmax_topk"] == "triton"
    got = [t.tokens[0] for t in triton.translate_batch(texts, beam_size=beam)]
    assert got == [t.tokens[0] for t in plain.translate_batch(texts, beam_size=beam)]
    assert got == hf_generate(texts, beam, torch.float32)


def teacher_forced(texts: list[str], targets: list[str], dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """HF's log-probs of each target token (EOS included) given its source."""
    from transformers import MarianMTModel, MarianTokenizer
    path = pyengine.engine.resolve_model_path("default")
    tok = MarianTokenizer.from_pretrained(path)
    model = MarianMTModel.from_pretrained(path, dtype=dtype).to(device).eval()
    out = []
    for src, tgt in zip(texts, targets):
        batch = tok([src], text_target=[tgt], return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).logits
        logp = torch.log_softmax(logits.double(), dim=-1)[0]
        out.append(logp.gather(1, batch["labels"][0][:, None])[:, 0].cpu())
    return out


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_log_probs_within_twice_hfs_own_error(texts, dtype):
    """pyengine's float16/bfloat16 (Triton kernels) scores the float32 translations; its error against float64
    is at most twice HF's own error in that precision on the same GPU."""
    engine = pyengine.Engine.load("default", device="cuda", dtype=dtype)
    targets = pyengine.Engine.load("default", device="cuda").translate(texts)
    ref = teacher_forced(texts, targets, torch.float64, "cpu")
    hf = teacher_forced(texts, targets, dtype, "cuda")
    ours = [torch.tensor(r.log_probs, dtype=torch.float64) for r in engine.score_batch(texts, targets)]
    ours_err = max((o - r).abs().max().item() for o, r in zip(ours, ref))
    hf_err = max((h - r).abs().max().item() for h, r in zip(hf, ref))
    assert ours_err <= 2 * max(hf_err, torch.finfo(dtype).eps), (ours_err, hf_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_on_the_gpu(texts, dtype):
    engine = pyengine.Engine.load("default", device="cuda", dtype=dtype)
    together = engine.translate_batch(texts, beam_size=4)
    alone = [engine.translate_batch([t], beam_size=4)[0] for t in texts]
    assert [t.tokens for t in together] == [t.tokens for t in alone]


def test_server_on_the_gpu_answers_concurrent_clients_with_the_offline_translations(texts):
    from benchmarks.load import ServerProcess, run_load
    options = {"beam_size": 2, "max_decoding_length": 48}
    engine = pyengine.Engine.load("default", device="cuda", dtype="float16")
    want = {t: engine.translate([t], **options)[0] for t in texts}
    with ServerProcess("default", threads=2, extra=["--device", "cuda", "--dtype", "float16"]) as server:
        outcomes = run_load(server.url, clients=16, requests=2, pool=texts, options=options, seed=1, deadline_s=120)
    assert len(outcomes) == 32 and all(o.status == 200 for o in outcomes), [o.error for o in outcomes][:3]
    for o in outcomes:
        if o.endpoint != "/translate":  # LibreTranslate's answers use the model's defaults, compared on the CPU
            assert o.translations == [want[t] for t in o.texts]
