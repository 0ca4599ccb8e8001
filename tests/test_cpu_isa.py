"""The CPU features pyengine's C++ kernels use: decided once (csrc/cpu_features.cpp), reported (_C.build_info,
engine.backends["cpu_isa"]), and capped for a process by PYENGINE_MAX_CPU_ISA, as ONEDNN_MAX_CPU_ISA caps oneDNN.

Under a cap this machine runs the paths a CPU with less runs, which otherwise no test here reaches (the portable
attention, layer norm and log-softmax + top-k; the library int8 and bf16 GEMMs; the bf16 FMA tile of AVX-512 CPUs
without AVX512-BF16): the kernel and engine tests pass as on a CPU with AVX2 only (pyengine's portable loops,
PyTorch's libraries capped at AVX2: benchmarks.AS_CPU) and as on one with AVX-512 but no VNNI or BF16."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyengine
from benchmarks import AS_CPU
from pyengine import _C

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["portable", "avx512", "avx512_vnni", "avx512_bf16", "amx"]
FLAG_LEVELS = {"avx512": 1, "avx512_vnni": 2, "avx512_bf16": 3, "amx_int8": 4, "amx_bf16": 4}
# the tests whose paths depend on the CPU's features (kernels, decoder step, engines on every dtype)
CAPPED_TESTS = {  # by benchmarks.AS_CPU's CPUs
    "avx2": ["test_csrc_kernels.py", "test_decoder_step.py", "test_int8.py", "test_bf16_gemm.py",
                 "test_f32_gemm.py", "test_bfloat16.py", "test_attention.py", "test_continuous.py",
                 "test_marian_parity.py", "test_engine.py"],
    "avx512": ["test_bf16_gemm.py", "test_bfloat16.py", "test_decoder_step.py", "test_int8.py", "test_continuous.py"],
}
NATIVE = _C.build_info()["cpu_isa"] if not _C.build_info()["cpu_isa_cap"] else None


def as_cpu(cpu: str) -> tuple[dict, str]:
    """This process's environment as on `cpu` (benchmarks.AS_CPU), and the cap it sets on pyengine's kernels."""
    return dict(os.environ, **AS_CPU[cpu]), AS_CPU[cpu]["PYENGINE_MAX_CPU_ISA"]


def test_the_reported_level_is_the_highest_feature_in_effect():
    info = _C.build_info()
    assert info["cpu_isa"] in LEVELS and not info["cpu_isa_error"]
    assert LEVELS.index(info["cpu_isa"]) == max([0] + [level for flag, level in FLAG_LEVELS.items() if info[flag]])
    if info["cpu_isa_cap"]:
        assert LEVELS.index(info["cpu_isa"]) <= LEVELS.index(info["cpu_isa_cap"])
    engine = pyengine.Engine.load("default", dtype="int8")
    assert engine.backends["cpu_isa"].split()[0] == info["cpu_isa"]


REPORT = """
import json, pyengine
from pyengine import _C
out = {"info": _C.build_info()}
for dtype in ("float32", "bfloat16", "int8"):
    engine = pyengine.Engine.load("default", dtype=dtype)
    out[dtype] = {**engine.backends, "text": engine.translate(["Open the file.", "Save your changes?"])}
print(json.dumps(out))
"""


@pytest.mark.parametrize("cpu", sorted(AS_CPU))
def test_a_cap_turns_off_the_features_above_it_and_engines_say_so(cpu):
    env, cap = as_cpu(cpu)
    run = subprocess.run([sys.executable, "-c", REPORT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    info = out["info"]
    assert info["cpu_isa_cap"] == cap
    assert all(not info[flag] for flag, level in FLAG_LEVELS.items() if level > LEVELS.index(cap))
    for dtype in ("float32", "bfloat16", "int8"):
        assert out[dtype]["cpu_isa"] == f"{info['cpu_isa']} (PYENGINE_MAX_CPU_ISA={cap})"
        assert out[dtype]["text"][0] == "Öffnet die Datei.", out[dtype]  # (the README's example, every path)
    if info["avx512"]:  # (cap avx512 on an AVX-512 CPU: the float32 GEMM and the bf16 FMA tile, no VNNI)
        assert out["float32"]["linear"] == "f32-avx512" and out["bfloat16"]["linear"] == "torch-bf16-avx512"
    else:  # no AVX-512: PyTorch's float32, called from the C++ step (bf16: on the bf16-rounded weights)
        assert out["float32"]["decoder_step"] == out["bfloat16"]["decoder_step"] == "cpp-float32"
        assert out["bfloat16"]["linear"] == "torch-bf16-library"
    assert out["int8"]["linear"].startswith("torch-int8-") and out["int8"]["decoder_step"] == "python-layers"


def test_an_unknown_cap_is_refused_at_import():
    run = subprocess.run([sys.executable, "-c", "import pyengine"], env=dict(os.environ, PYENGINE_MAX_CPU_ISA="avx3"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "OptionError: PYENGINE_MAX_CPU_ISA=avx3 is not one of portable avx512 avx512_vnni avx512_bf16 amx" in \
        run.stderr


@pytest.mark.parametrize("cpu", sorted(CAPPED_TESTS))
def test_kernel_and_engine_tests_pass_as_on_a_cpu_with_less(cpu):
    env, cap = as_cpu(cpu)
    if NATIVE is not None and LEVELS.index(cap) >= LEVELS.index(NATIVE):
        pytest.skip(f"this CPU's own level is {NATIVE}: the tests ran these paths uncapped")
    files = [f"tests/{name}" for name in CAPPED_TESTS[cpu]]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider", *files],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 100, summary  # (not a run that skipped its way to green)


def test_compare_as_a_cpu_with_less_runs_itself_capped(monkeypatch):
    """benchmarks.compare --as-cpu starts itself again with AS_CPU's caps (the libraries read them when they load), so
    the floor and every system's worker run capped alike."""
    from benchmarks import compare
    for name in AS_CPU["avx2"]:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def execve(path, argv, env):  # (the real one replaces the process: it never returns)
        calls.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(compare.os, "execve", execve)
    with pytest.raises(SystemExit):
        compare.main(["--as-cpu", "avx2", "--cases", "greedy_b1"])
    (argv, env), = calls
    assert argv[1:] == ["-m", "benchmarks.compare", "--as-cpu", "avx2", "--cases", "greedy_b1"]
    assert all(env[name] == value for name, value in AS_CPU["avx2"].items())
