"""The CUDA step path audited on the CPU: the engine with backend="triton" (what a GPU runs by default) walked
step by step under the Triton interpreter, with CPU tensors standing in for the device. It records every
pyengine._C call and every read of a tensor's value on the host (what synchronizes with a GPU) made by the step
path (pyengine.model, pyengine.decoding), and checks them against engine.backends: no C++ CPU kernel, no
.numpy(), and per step one read per cohort (is any of its sentences done?) plus a fixed number when sentences
finish, however many.
"""
from __future__ import annotations

import collections
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pyengine
from conftest import build_marian, random_sources
from pyengine import _C
from pyengine.decoding import Runtime

# Tensor methods that copy a value to the host (on a GPU: wait for the stream)
HOST_READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
STEP_PATH = ("pyengine/model/", "pyengine/decoding/")
READS_WHEN_SENTENCES_FINISH = 10  # per cohort: finished rows' tokens, scores, sentences; the rows and slots kept


class HostReads(TorchFunctionMode):
    """Counts host reads by the step path's call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "numpy":
            raise AssertionError("the step path converted a tensor to numpy")
        if name in HOST_READS:
            sites = [f for f in traceback.extract_stack()[:-1] if any(p in f.filename for p in STEP_PATH)]
            if sites:
                self.counts[(name, sites[-1].filename.split("pyengine/")[-1], sites[-1].lineno)] += 1
        return func(*args, **(kwargs or {}))


class CallsOfC:
    """pyengine._C with every call recorded (name, keyword arguments)."""

    def __init__(self, module) -> None:
        self._module, self.calls = module, []

    def __getattr__(self, name):
        target = getattr(self._module, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self.calls.append((name, kwargs))
            return target(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory):
    model = build_marian(tmp_path_factory.mktemp("gpu-path"), vocab=61, d_model=32, heads=2, ffn=40,
                         layers=(2, 2), activation="gelu", seed=5)
    return pyengine.Engine.load(model, backend="triton")


def test_backends_report_every_op_of_the_cuda_step(gpu_engine):
    b = gpu_engine.backends
    assert {b[op] for op in ("attention", "add_layer_norm", "linear_act", "log_softmax_topk")} == {"triton"}, b
    assert b["beam_step"] == "aten"  # the ATen composition, not the CPU loop
    assert b["decoder_step"] == "python-layers" and b["output_layer"] == "logits"


@pytest.mark.parametrize("beam", [1, 3])
def test_step_path_runs_no_cpu_kernel_and_reads_the_host_once_per_step(gpu_engine, beam, monkeypatch):
    calls = CallsOfC(_C)
    monkeypatch.setattr(pyengine, "_C", calls)  # what a `from .. import _C` in a call finds
    for module in [m for name, m in sys.modules.items() if name.startswith("pyengine.")]:
        if getattr(module, "_C", None) is _C:  # and the modules that imported it at their top
            monkeypatch.setattr(module, "_C", calls)
    opts = gpu_engine.options(beam_size=beam, max_decoding_length=9)
    cfg = gpu_engine.config
    batch = Runtime(gpu_engine.model, gpu_engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id)
    src = random_sources(8, 61, seed=beam, lo=2, hi=12)
    done, per_step = {}, []
    with torch.inference_mode():
        batch.admit(src[:4], list(range(4)))
        batch.admit(src[4:], list(range(4, 8)))  # two cohorts: rows at different positions
        while len(done) < len(src):
            cohorts = len(batch.cohorts)
            with HostReads() as reads:
                finished = batch.step()
            done.update(finished)
            per_step.append((len(finished), sum(reads.counts.values()) - cohorts, cohorts))
    # C++: only the beam step, as the ATen composition a GPU runs (greedy calls no C++ at all)
    assert {name for name, _ in calls.calls} <= {"beam_step"}
    assert all(kwargs.get("impl") == "aten" for _, kwargs in calls.calls)
    assert (len(calls.calls) > 0) == (beam > 1)
    quiet = [n for f, n, _ in per_step if f == 0]
    assert quiet and all(n == 0 for n in quiet), per_step  # only each cohort's "is any sentence done?" read
    finishing = [(f, n, cohorts) for f, n, cohorts in per_step if f]
    assert sum(f for f, _, _ in finishing) == len(src)
    assert all(n <= READS_WHEN_SENTENCES_FINISH * cohorts for _, n, cohorts in finishing), per_step


def test_many_sentences_finishing_at_once_cost_the_same_reads(gpu_engine):
    """All 8 sentences stop at the length limit in one step: as many reads as one sentence finishing."""
    opts = gpu_engine.options(beam_size=1, max_decoding_length=2, min_decoding_length=2)
    cfg = gpu_engine.config
    counts = []
    for n in (1, 8):
        batch = Runtime(gpu_engine.model, gpu_engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id,
                        cfg.eos_id)
        with torch.inference_mode():
            batch.admit(random_sources(n, 61, seed=3, lo=3, hi=8), list(range(n)))
            batch.step()
            with HostReads() as reads:
                assert len(batch.step()) == n
        counts.append(sum(reads.counts.values()))
    assert counts[0] == counts[1], counts


def test_cuda_without_a_device_is_a_named_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(pyengine.BackendError, match="device='cuda' asked for"):
        pyengine.Engine.load("default", device="cuda")


def test_gpu_check_fails_fast_without_a_device(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA device" in run.stdout and '"cuda_available": false' in run.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("gpu_check: no CUDA device")
