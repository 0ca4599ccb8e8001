"""Every Triton kernel, in each configuration the engine launches, compiles for sm_80 and sm_90 ahead of
time (no GPU needed), without local-memory spills or stack use. Runs benchmarks.kernel_report in a
process without TRITON_INTERPRET, since interpreted kernels cannot be compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def test_every_configuration_compiles_for_both_targets(report):
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_report import TARGETS, configurations
    expected = {(k, c) for k, c, *_ in configurations()}
    assert len(expected) > 100
    for target in TARGETS:
        got = {(r["kernel"], r["config"]) for r in report if r["target"] == f"sm_{target}"}
        assert got == expected, f"sm_{target}: missing {sorted(expected - got)[:5]}"


def test_no_spills_or_stack(report):
    bad = [r for r in report if r["local_bytes"] or r["stack_bytes"]]
    assert not bad, bad[:5]


def test_registers_and_shared_memory_fit(report):
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for r in report:
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= limits[r["target"]], r
