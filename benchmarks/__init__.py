"""Side-by-side speed and quality runs; results/ holds every file the docs cite."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# A run as on a CPU with less than this one (benchmarks.compare --as-cpu, tests/test_cpu_isa.py): what each library
# reads to cap the instructions it uses. pyengine's C++ kernels (avx2: its portable loops, as a CPU without AVX-512
# runs them), PyTorch's (ATen's dispatch, oneDNN, MKL) and CTranslate2's. FBGEMM has no such switch: it keeps this
# CPU's best (VNNI where there is VNNI).
AS_CPU = {
    "avx2": {"PYENGINE_MAX_CPU_ISA": "portable", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "CT2_FORCE_CPU_ISA": "AVX2"},
    "avx512": {"PYENGINE_MAX_CPU_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "CT2_FORCE_CPU_ISA": "AVX512"},
}


def write_results(kind: str, report: dict) -> Path:
    """benchmarks/results/<kind>-<yyyymmdd-hhmmss>.json, printed as written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"written {out.relative_to(RESULTS.parents[1])}")
    return out


def cpu_name() -> str:
    """The CPU model and how many CPUs this process sees (every results file names its machine)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown"
