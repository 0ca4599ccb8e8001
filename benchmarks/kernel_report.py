"""Compile every Triton kernel, in each configuration the engine launches, for real GPUs ahead of time
(no device needed) and report registers, shared memory, stack and local memory (spills) per target.

    python -m benchmarks.kernel_report            # table
    python -m benchmarks.kernel_report --json     # machine-readable (used by tests/test_kernel_compile.py)
    python -m benchmarks.kernel_report --source-tree   # kernels/ imported from the checkout, not through pyengine:
                                                       # an environment with only torch and another Triton

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled). Each kernel is specialized
as Triton's JIT specializes a launch at the opus-mt-en-de shape: 16-byte-aligned pointers, and strides
and model dimensions (D, N, K) divisible by 16; row counts, lengths and head counts are not assumed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

TARGETS = (80, 90)
HEAD_DIMS = (32, 64, 80, 128)
MODEL_DIMS = (256, 512, 1024)
TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ALIGNED_INTS = {"D", "N", "K"}  # model dimensions; every stride_* is aligned too
SOURCE_TREE_ENV = "PYENGINE_KERNELS_FROM_SOURCE"  # set by --source-tree (read by the compile workers too)


def _kernels(name: str):
    """A kernel module: pyengine.kernels.<name>, or kernels.<name> of the checkout with --source-tree (pyengine's
    runtime dependencies need not be installed to compile its kernels with another Triton)."""
    import importlib
    package = "kernels" if os.environ.get(SOURCE_TREE_ENV) == "1" else "pyengine.kernels"
    return importlib.import_module(f"{package}.{name}")


def _divisibility(fn, sig: dict) -> dict:
    """The JIT's 16-divisibility attributes for pointers, strides and model dims (by argument position)."""
    names = fn.arg_names
    attrs = {}
    for name, ty in sig.items():
        if ty.startswith("*") or name.startswith("stride") or name in ALIGNED_INTS:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


@dataclass
class Compiled:
    kernel: str
    config: str
    target: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int


def _attention_configs():
    import torch

    mod = _kernels("attention")
    # (lengths, causal, rows): the encoder; a causal block; decode steps over the indirect cache and the memory slots
    forms = {"encoder": (True, False, False), "causal block": (False, True, False),
             "decode over cache": (True, True, True), "cross over memory": (True, False, True)}
    for dtype, dh, tq, (form, (has_len, causal, rows)) in itertools.product(
            ("float32", "float16", "bfloat16"), HEAD_DIMS, (1, 64), forms.items()):
        cfg = mod.launch_config(tq, dh, getattr(torch, dtype))
        t = TORCH_TO_TRITON[dtype]
        sig = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "o_ptr": f"*{t}", "len_ptr": "*i64",
               "rows_ptr": "*i32"}
        sig.update({name: "i32" for name in (
            "stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt", "stride_vb", "stride_vh",
            "stride_vt", "stride_ob", "stride_oh", "stride_ot", "H", "Tq", "Tk", "KV_GROUP")})
        sig["qk_scale"] = "fp32"
        const = {"HEAD_DIM": dh, "HAS_LENGTHS": has_len, "HAS_ROWS": rows, "CAUSAL": causal,
                 "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32", "UPCAST_DOT": False,
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
        yield ("attention", f"{dtype} Dh={dh} Tq={'1' if tq == 1 else '>16'} {form}", mod._attention_kernel, sig,
               const, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def _layernorm_configs():
    mod = _kernels("layernorm")
    forms = {"post-norm": (True, False), "pre-norm": (True, True), "plain": (False, False)}
    for dtype, d, (form, (has_res, store_sum)) in itertools.product(
            ("float32", "float16", "bfloat16"), MODEL_DIMS, forms.items()):
        cfg = mod.launch_config(d)
        t = TORCH_TO_TRITON[dtype]
        sig = {name: f"*{t}" for name in ("x_ptr", "res_ptr", "w_ptr", "b_ptr", "y_ptr", "sum_ptr")}
        sig.update({name: "i32" for name in ("stride_x", "stride_res", "stride_y", "stride_sum", "D")})
        sig["eps"] = "fp32"
        const = {"HAS_RESIDUAL": has_res, "STORE_SUM": store_sum, "BLOCK_D": cfg["BLOCK_D"]}
        yield "add_layer_norm", f"{dtype} D={d} {form}", mod._add_layer_norm_kernel, sig, const, {
            "num_warps": cfg["num_warps"]}


def _ffn_configs():
    import torch

    mod = _kernels("ffn")
    epilogues = {"relu": (1, False), "gelu": (2, False), "swish": (3, False), "residual": (0, True)}
    for dtype, m, (epi, (act, has_res)) in itertools.product(
            ("float32", "float16", "bfloat16"), (16, 32, 64), epilogues.items()):
        cfg = mod.launch_config(m, getattr(torch, dtype))
        t = TORCH_TO_TRITON[dtype]
        sig = {name: f"*{t}" for name in ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr")}
        sig.update({name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym")})
        const = {"ACTIVATION": act, "HAS_BIAS": True, "HAS_RESIDUAL": has_res,
                 "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32", "UPCAST_DOT": False,
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
        yield "linear", f"{dtype} M-block={cfg['BLOCK_M']} {epi}", mod._linear_kernel, sig, const, {
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _topk_configs():
    mod = _kernels("topk")
    # vocabularies: small test models, the default model, opus-mt-en-de, M2M100/NLLB
    for vocab in (40, 1000, 8001, 58101, 256206):
        cfg = mod.launch_config(vocab)
        sig = {"x_ptr": "*fp32", "banned_ptr": "*i64", "val_ptr": "*fp32", "id_ptr": "*i64",
               "stride_x": "i32", "V": "i32", "M": "i32", "K": "i32"}
        const = {"BLOCK_V": cfg["BLOCK_V"], "BLOCK_M": cfg["BLOCK_M"]}
        yield "log_softmax_topk", f"float32 V={vocab}", mod._log_softmax_topk_kernel, sig, const, {
            "num_warps": cfg["num_warps"]}


def configurations():
    yield from _attention_configs()
    yield from _layernorm_configs()
    yield from _ffn_configs()
    yield from _topk_configs()


def _resources(cubin: bytes, name: str) -> dict:
    import triton.backends.nvidia as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not match:
        raise RuntimeError(f"cuobjdump gave no resource line for {name}:\n{text}")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def _compile_one(index: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, config, fn, sig, const, options = list(configurations())[index]
    sig = dict(sig, **{k: "constexpr" for k in const})
    out = []
    for cc in TARGETS:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=_divisibility(fn, sig)),
                                  target=GPUTarget("cuda", cc, 32), options=options)
        res = _resources(compiled.asm["cubin"], f"{kernel} {config}")
        res["shared_bytes"] = max(res["shared_bytes"], compiled.metadata.shared)  # dynamic shared memory
        out.append(asdict(Compiled(kernel, config, f"sm_{cc}", **res)))
    return out


def compile_all(jobs: int = 2) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    n = len(list(configurations()))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return [row for rows in pool.map(_compile_one, range(n)) for row in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--source-tree", action="store_true", help="import kernels/ from the checkout")
    args = ap.parse_args(argv)
    if args.source_tree:
        os.environ[SOURCE_TREE_ENV] = "1"
    import triton
    print(f"Triton {triton.__version__}", file=sys.stderr)
    rows = compile_all(args.jobs)
    if args.json:
        json.dump(rows, sys.stdout)
        return 0
    print(f"{'kernel':<15} {'configuration':<44} {'target':<6} {'regs':>5} {'smem B':>7} {'stack':>6} {'local':>6}")
    for r in rows:
        print(f"{r['kernel']:<15} {r['config']:<44} {r['target']:<6} {r['registers']:>5} {r['shared_bytes']:>7} "
              f"{r['stack_bytes']:>6} {r['local_bytes']:>6}")
    spills = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    print(f"{len(rows)} compiles, {len(spills)} with spills or stack use")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
