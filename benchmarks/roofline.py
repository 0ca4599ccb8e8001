"""Bytes moved and FLOPs of one decode step, and the roofline time on a given GPU.

    python -m benchmarks.roofline                     # opus-mt-en-de shape, batch 32, beam 4, H100 SXM
    python -m benchmarks.roofline --batch 1 --beam 1
"""
from __future__ import annotations

import argparse


def decode_step(batch: int, beam: int, d: int, ffn: int, layers: int, vocab: int, src_len: int, tgt_pos: int,
                weight_bytes: int = 2, cache_bytes: int = 2) -> dict:
    rows = batch * beam
    per_layer = 4 * d * d + 2 * d * d + 2 * d * ffn  # self q,k,v,out; cross q,out (cross k,v precomputed); FFN
    params = layers * per_layer + vocab * d  # + output projection
    weights = params * weight_bytes
    self_kv = rows * tgt_pos * 2 * d * layers * cache_bytes  # read the cache (K and V) every step
    cross_kv = batch * src_len * 2 * d * layers * cache_bytes  # one copy per sentence, shared by its beams
    logits = rows * vocab * 4 * 3  # write fp32 logits, read for log-softmax, read for top-k
    gemm_flops = 2 * rows * params
    attn_flops = 2 * 2 * rows * (tgt_pos + src_len) * d * layers
    return {"rows": rows, "weight_MB": weights / 1e6, "self_kv_MB": self_kv / 1e6, "cross_kv_MB": cross_kv / 1e6,
            "logits_MB": logits / 1e6, "total_MB": (weights + self_kv + cross_kv + logits) / 1e6,
            "GFLOP": (gemm_flops + attn_flops) / 1e9}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--src-len", type=int, default=30)
    ap.add_argument("--tgt-pos", type=int, default=30, help="decoder position (cache length) of the step")
    ap.add_argument("--bandwidth-tb", type=float, default=3.35, help="HBM TB/s (H100 SXM: 3.35)")
    ap.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOP/s (H100 SXM: 989)")
    args = ap.parse_args(argv)
    s = decode_step(args.batch, args.beam, d=512, ffn=2048, layers=6, vocab=58101, src_len=args.src_len,
                    tgt_pos=args.tgt_pos)
    t_mem = s["total_MB"] * 1e6 / (args.bandwidth_tb * 1e12)
    t_flop = s["GFLOP"] * 1e9 / (args.tflops * 1e12)
    for k, v in s.items():
        print(f"{k:>12}: {v:,.2f}" if isinstance(v, float) else f"{k:>12}: {v}")
    bound = "memory" if t_mem > t_flop else "compute"
    print(f"   time (mem): {t_mem * 1e6:.1f} us\n time (flop): {t_flop * 1e6:.1f} us\n       bound: {bound}; "
          f"{s['rows'] / max(t_mem, t_flop):,.0f} tokens/s at the roofline")


if __name__ == "__main__":
    main()
