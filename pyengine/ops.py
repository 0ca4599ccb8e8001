"""The fused operations the model calls, resolved once per engine to one implementation.

`TorchOps` is the plain-PyTorch path (CPU, and the reference for every kernel). The Triton path
(`pyengine.kernels`) plugs in here with the same method signatures; `resolve_ops` picks one at
construction and reports which implementation each op uses, never falling back silently.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .errors import BackendError, OptionError
from .quant import quantize_rows

OP_NAMES = ("attention", "add_layer_norm", "linear_act", "linear")
ONEDNN_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "swish": ("swish", "")}  # (attr, algorithm)
SMALL_QUERY = 16  # query rows at or under which attention uses explicit matmuls instead of SDPA
CPP_KV_DTYPES = (torch.float32, torch.bfloat16)  # K/V dtypes the fused C++ step attention reads
# keys up to which the C++ attention beats the CPU flash kernel (SDPA) outside decoder steps (encoder):
# measured 3.2x at 32 × 24 tokens, 1.3x at 64, 1.0x at 128, 0.9x at 256 (8 heads of 64, 2 threads)
CPP_ATTENTION_KEYS = 128


def _activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(x)
    if kind == "gelu":
        return F.gelu(x)  # HF "gelu" is the exact erf form
    if kind == "swish":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}")


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Prepacked oneDNN linears: CPU, float32, or bfloat16 where oneDNN has a native bf16 path."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _gather_rows(kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(P, H, T, Dh) keys and a (B, T) row index → (B, H, T, Dh): key j of row b from row rows[b, j]."""
    positions = torch.arange(kv.shape[2], device=kv.device)
    return kv[rows, :, positions[None, :]].transpose(1, 2)


class TorchOps:
    """PyTorch implementations; any device, any float dtype.

    With `onednn`, every linear layer's weight is reordered once into oneDNN's blocked layout and run
    by `mkldnn._linear_pointwise` (activation fused), the path Inductor uses on CPU: measured here
    1.3-2.5x the default GEMM (MKL) for the decoder's shapes, bf16 and fp32, batch 1 to 128.
    """

    name = "torch"

    def __init__(self, onednn: bool = False):
        self.onednn = onednn

    def prepare_linear(self, layer) -> None:
        """Pack `layer.weight` for this implementation (once, after the weights are loaded)."""
        if self.onednn:
            layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, None)

    def linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        """x·Wᵀ + b for an object with .weight, .bias (and .packed when prepared); into `out` when given."""
        packed = getattr(layer, "packed", None)
        if packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
        else:
            y = F.linear(x, layer.weight, layer.bias)
        return y if out is None else out.copy_(y)

    def fuses_candidates(self, layer) -> bool:
        """Whether `linear_candidates` (the output layer fused with log-softmax + top-k) exists here: no."""
        return False

    def linear_act(self, x: torch.Tensor, layer, activation: str) -> torch.Tensor:
        """activation(x·Wᵀ + b)."""
        packed = getattr(layer, "packed", None)
        if packed is not None:
            attr, algorithm = ONEDNN_ACTIVATIONS[activation]
            return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, attr, [], algorithm)
        return _activation(F.linear(x, layer.weight, layer.bias), activation)

    @staticmethod
    def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """Attention K/V storage. CPU: bfloat16 for a bfloat16 model (its K/V projections are bf16 already,
        so nothing is lost, and the step attention, bound by reading K/V, reads half the bytes), float32
        otherwise (the fused C++ step attention reads these two)."""
        if device.type != "cpu":
            return model_dtype
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32

    @staticmethod
    def reads_cache_rows(device: torch.device) -> bool:
        """The step attention reads keys through a row index (an indirect KV cache): the C++ one, on CPU."""
        return device.type == "cpu"

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                  causal: bool = False, step: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q·kᵀ/√Dh)·v for q (B, H, Tq, Dh), k/v (B, H, Tk, Dh).

        kv_lengths (B,): keys at or past a row's length are padding. causal: query i sits at absolute
        position Tk - Tq + i and sees keys up to it (a block of new tokens after a cache).
        step: a decoder step (few query rows over a cache or the encoder memory).
        rows (B, Tk): key j of row b is k[rows[b, j], :, j] (an indirect cache; k may have more rows).
        """
        tq, tk = q.shape[2], k.shape[2]
        cpp = (q.device.type == "cpu" and k.dtype in CPP_KV_DTYPES and v.dtype == k.dtype and (tq == 1 or not causal)
               and (tq <= SMALL_QUERY if step else tk <= CPP_ATTENTION_KEYS))
        if cpp:
            # the fused C++ loop, one task per (sentence, head): a step's query sees every key given (one new
            # token); B·H tiny GEMMs cost more in dispatch (measured 7x slower at batch 1, 1.3x at 128 rows),
            # and the CPU flash kernel is slower for short sources (encoder, 32 × 24 tokens: 3.2x)
            from . import _C
            return _C.decode_attention(q.float(), k, v, kv_lengths, q.shape[-1] ** -0.5, rows).to(q.dtype)
        if rows is not None:  # the other paths read plain (B, H, Tk, Dh) keys: gather them
            k, v = _gather_rows(k, rows), _gather_rows(v, rows)
        mask = None
        if kv_lengths is not None:
            mask = (torch.arange(tk, device=q.device)[None, :] < kv_lengths[:, None])[:, None, None, :]
        if causal and tq > 1:
            causal_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            mask = causal_mask if mask is None else mask & causal_mask
        if not step or tq > SMALL_QUERY:
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        # a block of several new tokens with a causal mask (forced target prefixes): two batched matmuls
        # beat the CPU flash kernel several-fold; computed in float32 on CPU
        work = torch.float32 if q.device.type == "cpu" else k.dtype
        scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(work)
        return torch.matmul(probs, v.to(work)).to(q.dtype)

    @staticmethod
    def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
        """LN(x + residual) (post-norm form); LN(x) when residual is None."""
        if residual is not None:
            x = x + residual
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def cpp_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    """pyengine's C++ residual + layer norm (csrc/layer_norm.cpp), float32: the one the C++ int8 decoder step runs,
    so the Python layers and that step agree to the bit; at a step's few rows it is faster than ATen's add +
    layer_norm, whose dispatch dominates there (2.4x at 32 rows, 1.5x at 128: `pytest benchmarks/`)."""
    from . import _C
    return _C.add_layer_norm(x.float().contiguous(), None if residual is None else residual.float().contiguous(),
                             weight.float().contiguous(), bias.float().contiguous(), eps)


# Rows above which oneDNN's dynamic int8 GEMM beats FBGEMM's (measured on this project's Zen 4 machine:
# FBGEMM 2x faster at 1-4 rows on the 58101-wide output layer, oneDNN 1.9x faster at 128 rows).
INT8_ONEDNN_ROWS = 64
FUSED_INT8_ACTIVATIONS = ("relu", "swish")  # the VNNI GEMM's epilogue applies these (gelu runs after it)


@contextlib.contextmanager
def _quantized_engine(name: str):
    """Weights are packed for the global quantized engine; switch it for one packing only."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def int8_engines() -> tuple[str, ...]:
    """The dynamic int8 GEMM libraries this PyTorch build has (FBGEMM needs AVX2; oneDNN runs anywhere)."""
    return tuple(e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines)


def vnni_available() -> bool:
    """The CPU has AVX512-VNNI, which pyengine's own int8 GEMM (csrc/int8_gemm.cpp) runs on."""
    from . import _C
    return bool(_C.build_info()["avx512_vnni"])


def amx_available() -> bool:
    """The CPU has AMX-INT8 and the OS grants its tile state: pyengine's int8 GEMM runs its AMX tile."""
    from . import _C
    return bool(_C.build_info()["amx_int8"])


OWN_INT8_KERNELS = ("amx", "vnni")  # pyengine's own GEMM (csrc/int8_gemm.cpp), the C++ decoder step's too


class Int8Ops(TorchOps):
    """TorchOps with int8 linear layers (CTranslate2's `int8` compute type): weights quantized once per
    output row (symmetric), int32 accumulation, attention K/V stored in bfloat16, float32 everywhere else.

    kernel="amx" (the default where the CPU has AMX-INT8) or "vnni" (the default where it has AVX512-VNNI):
    pyengine's own GEMM, activations quantized per row (asymmetric uint8). "amx" runs AMX tiles where the shape
    suits them (over 6 rows, K a multiple of 64) and the VNNI tile elsewhere, equal to it to the bit; 2.3-2.7x the
    VNNI tile on a decoder step's layers at 32-128 rows (README). VNNI: 1.2-3x FBGEMM and oneDNN on the decoder's
    shapes at 1-128 rows, and on par or faster at the encoder's hundreds. kernel="library": PyTorch's dynamic quantized linear,
    activations quantized per tensor; each weight packed for FBGEMM and oneDNN, and a call picks by its row
    count (INT8_ONEDNN_ROWS).
    """

    name = "torch-int8"

    def __init__(self, kernel: str | None = None) -> None:
        super().__init__(onednn=False)
        self.kernel = kernel or ("amx" if amx_available() else "vnni" if vnni_available() else "library")
        if self.kernel not in (*OWN_INT8_KERNELS, "library"):
            raise OptionError(f"unknown int8 kernel {self.kernel!r}; expected 'amx', 'vnni' or 'library'")
        self.engines = int8_engines()
        if self.kernel == "amx" and not amx_available():
            raise OptionError("the int8 'amx' kernel needs a CPU (and OS) with AMX-INT8")
        if self.kernel == "vnni" and not vnni_available():
            raise OptionError("the int8 'vnni' kernel needs a CPU with AVX512-VNNI")
        if self.kernel == "library" and not self.engines:
            raise OptionError("dtype='int8' needs AVX512-VNNI or PyTorch's FBGEMM or oneDNN quantized engine; this "
                              f"build has {torch.backends.quantized.supported_engines}")

    @property
    def report(self) -> str:
        return f"torch-int8-{self.kernel}" if self.own_kernel else "torch-int8-" + "+".join(self.engines)

    @property
    def own_kernel(self) -> bool:
        """pyengine's own int8 GEMM (AMX or VNNI) runs here, and so can the C++ decoder step."""
        return self.kernel in OWN_INT8_KERNELS

    def prepare_linear(self, layer) -> None:
        q, scale = quantize_rows(layer.weight)
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        if self.own_kernel:
            from . import _C
            packed, colsum = _C.int8_pack(q)  # int8 column tiles; int32 column sums (for the zero points)
            layer.int8 = _C.Int8Weight(packed, colsum, scale.contiguous(), bias, q.shape[0])
        else:
            layer.int8 = {}
            with warnings.catch_warnings():  # quantized tensors are the packing functions' input type
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(q, scale.double(),
                                                                   torch.zeros_like(scale, dtype=torch.long), 0)
                for engine in self.engines:
                    with _quantized_engine(engine):
                        layer.int8[engine] = torch.ops.quantized.linear_prepack(qweight, bias)
        if isinstance(layer, torch.nn.Linear):  # only the packed int8 copies are read from here on
            layer.weight = None

    def linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.own_kernel:
            return self._own_linear(x, layer, out)
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        engine = "onednn" if flat.shape[0] > INT8_ONEDNN_ROWS and "onednn" in layer.int8 else self.engines[0]
        y = torch.ops.quantized.linear_dynamic(flat, layer.int8[engine], False)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if out is None else out.copy_(y)

    def linear_act(self, x: torch.Tensor, layer, activation: str) -> torch.Tensor:
        if self.own_kernel and activation in FUSED_INT8_ACTIVATIONS:  # applied in the GEMM's epilogue
            return self._own_linear(x, layer, activation=activation)
        return _activation(self.linear(x, layer), activation)

    def fuses_candidates(self, layer) -> bool:
        """Whether `linear_candidates` can run on this output layer."""
        return self.own_kernel and getattr(layer, "int8", None) is not None

    def linear_candidates(self, x: torch.Tensor, layer, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k best (log-prob, token) of the output layer on x (N, D), banned ids excluded (but in the
        normalizer), as decoding.candidates takes them from the logits; the (N, V) logits are never written
        (at 32 rows of a 58k vocabulary, 7 MB written and read back per step)."""
        from . import _C
        w = layer.int8
        return _C.int8_linear_log_softmax_topk(x.reshape(-1, x.shape[-1]).float().contiguous(), w.packed, w.colsum,
                                               w.scale, w.bias, w.n, k, torch.tensor(banned, dtype=torch.long),
                                               kernel=self.kernel)

    def _own_linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None,
                    activation: str = "none") -> torch.Tensor:
        from . import _C
        w = layer.int8
        y = _C.int8_linear(x.reshape(-1, x.shape[-1]).float().contiguous(), w.packed, w.colsum, w.scale, w.bias,
                           w.n, out, kernel=self.kernel, activation=activation)
        return y.view(*x.shape[:-1], w.n) if out is None else out

    add_layer_norm = staticmethod(cpp_add_layer_norm)

    @staticmethod
    def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """Attention K/V in bfloat16: the step attention, bound by reading K/V once the int8 GEMMs are fast,
        reads half the bytes (batch 32 greedy: 362 -> 327 ms, A/B in one process), and bf16 rounding of K/V
        (2^-9 relative) is well inside the int8 activations' error (teacher-forced mean |Δ log p| against
        float32 on the default model: 0.0205 with float32 K/V, 0.0203 with bf16)."""
        return torch.bfloat16


class TritonOps:
    """The fused Triton kernels of pyengine.kernels (CUDA; CPU only under the Triton interpreter)."""

    name = "triton"

    @staticmethod
    def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The kernels read K/V in the model's dtype (half the bytes of float32 on a GPU)."""
        return model_dtype

    def __init__(self) -> None:
        from .kernels import attention, ffn, layernorm  # imported here: no compilation at import time
        self._attention, self._layernorm, self._ffn = attention, layernorm, ffn

    @staticmethod
    def reads_cache_rows(device: torch.device) -> bool:
        """The kernels read plain (B, H, T, Dh) caches."""
        return False

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                  causal: bool = False, step: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            raise ValueError("the Triton attention reads plain caches (rows index given)")
        return self._attention.attention(q, k, v, kv_lengths, causal)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
        return self._layernorm.add_layer_norm(x, residual, weight, bias, eps)

    def prepare_linear(self, layer) -> None:
        """Nothing to pack: the kernels read nn.Linear's (N, K) weight as it is."""

    @staticmethod
    def fuses_candidates(layer) -> bool:
        """No output layer fused with log-softmax + top-k here (the logits go to the fused CUDA top-k)."""
        return False

    def linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, layer.weight, layer.bias)  # plain GEMMs stay with cuBLAS
        return y if out is None else out.copy_(y)

    def linear_act(self, x: torch.Tensor, layer, activation: str) -> torch.Tensor:
        return self._ffn.linear_act(x, layer.weight, layer.bias, activation)


def bf16_kernels() -> tuple[str, ...]:
    """pyengine's own bf16 GEMM kernels this CPU runs (csrc/bf16_gemm.cpp), fastest first."""
    from . import _C
    info = _C.build_info()
    return tuple(k for k, key in (("amx", "amx_bf16"), ("avx512", "avx512")) if info[key])


class Bf16Ops(TorchOps):
    """TorchOps with bfloat16 linear weights and float32 activations (the CPU's `dtype=bfloat16`).

    A plain bf16 GEMM rounds the activations to bf16 too (8 significant bits), which changed 4-5% of the default
    model's UI strings and ~22% of its verses against float32 (README). Here every activation stays float32; a
    GEMM takes it as two bf16 terms (hi = bf16(x), lo = bf16(x − hi)) whose products with the bf16 weight are
    exact, summed in float32 (csrc/bf16_gemm.cpp). On the default model, whose weights are bf16, that gave
    float32's tokens for all of 600 held-out sentences, at half float32's weight memory and, on AMX-BF16, 2-3x
    float32's GEMM speed. kernel: "amx" (AMX-BF16), "avx512" (an FMA register tile, any AVX-512 CPU), or
    "library" (CPUs without AVX-512: the same terms through PyTorch's float32 GEMM on the bf16-rounded weight).
    """

    name = "torch-bf16"
    add_layer_norm = staticmethod(cpp_add_layer_norm)

    def __init__(self, kernel: str | None = None) -> None:
        super().__init__(onednn=False)
        own = bf16_kernels()
        self.kernel = kernel or (own[0] if own else "library")
        if self.kernel not in ("amx", "avx512", "library"):
            raise OptionError(f"unknown bf16 kernel {self.kernel!r}; expected 'amx', 'avx512' or 'library'")
        if self.kernel != "library" and self.kernel not in own:
            raise OptionError(f"the bf16 {self.kernel!r} kernel needs a CPU with "
                              f"{'AMX-BF16' if self.kernel == 'amx' else 'AVX-512'}")

    @property
    def report(self) -> str:
        return f"torch-bf16-{self.kernel}"

    def prepare_linear(self, layer) -> None:
        layer.bf16_bias = None if layer.bias is None else layer.bias.float().contiguous()
        if self.kernel == "library":
            layer.bf16 = layer.weight.detach().bfloat16().float()
        else:
            from . import _C
            layer.bf16 = _C.bf16_pack(layer.weight.detach())
        layer.bf16_n, layer.bf16_k = layer.weight.shape
        if isinstance(layer, torch.nn.Linear):  # only the bf16 copy is read from here on
            layer.weight = None

    def linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._linear(x, layer, out)

    def linear_act(self, x: torch.Tensor, layer, activation: str) -> torch.Tensor:
        if activation in FUSED_INT8_ACTIVATIONS and self.kernel != "library":  # applied in the GEMM's epilogue
            return self._linear(x, layer, activation=activation)
        return _activation(self._linear(x, layer), activation)

    def fuses_candidates(self, layer) -> bool:
        """Whether `linear_candidates` can run on this output layer (pyengine's own kernels)."""
        return self.kernel != "library" and getattr(layer, "bf16", None) is not None

    def linear_candidates(self, x: torch.Tensor, layer, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k best (log-prob, token) of the output layer on x (N, D), banned ids excluded (but in the
        normalizer), the (N, V) logits never written (Int8Ops.linear_candidates' pass, on the bf16 GEMM)."""
        from . import _C
        if x.shape[-1] != layer.bf16_k:
            raise ValueError(f"linear_candidates: input width {x.shape[-1]}, the layer takes {layer.bf16_k}")
        return _C.bf16_linear_log_softmax_topk(x.reshape(-1, x.shape[-1]).float().contiguous(), layer.bf16,
                                               layer.bf16_bias, layer.bf16_n, k, torch.tensor(banned, dtype=torch.long),
                                               kernel=self.kernel)

    def _linear(self, x: torch.Tensor, layer, out: torch.Tensor | None = None,
                activation: str = "none") -> torch.Tensor:
        if x.shape[-1] != layer.bf16_k:  # the packed weight knows K only to its padding
            raise ValueError(f"linear: input width {x.shape[-1]}, the layer takes {layer.bf16_k}")
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        if self.kernel == "library":
            hi = flat.bfloat16()
            y = F.linear(hi.float() + (flat - hi.float()).bfloat16().float(), layer.bf16, layer.bf16_bias)
            y = y.view(*x.shape[:-1], layer.bf16_n)
            return y if out is None else out.copy_(y)
        from . import _C
        y = _C.bf16_linear(flat, layer.bf16, layer.bf16_bias, layer.bf16_n, out, kernel=self.kernel,
                           activation=activation)
        return y.view(*x.shape[:-1], layer.bf16_n) if out is None else out


def _triton_ops(device: torch.device) -> TritonOps:
    try:
        import triton
    except ImportError:
        raise BackendError("backend='triton' needs the triton package (pip install triton)") from None
    if device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise BackendError("backend='triton' on CPU runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported (slow; for tests), or use backend='torch'")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"backend='triton' does not run on {device.type} devices")
    if device.type == "cuda" and triton.knobs.runtime.interpret:
        raise BackendError("TRITON_INTERPRET=1 is set: the Triton kernels would not run on the GPU")
    return TritonOps()


def resolve_ops(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                weights: str = "float") -> tuple[object, dict[str, str]]:
    """Pick the op implementation for `backend` on `device`; report which implementation each op uses.
    weights="int8": int8 linear layers; weights="bf16": bfloat16 linear weights, float32 activations (both CPU,
    PyTorch backend)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if weights not in ("float", "int8", "bf16"):
        raise OptionError(f"unknown weights {weights!r}; expected 'float', 'int8' or 'bf16'")
    if weights == "bf16":
        if dtype != torch.float32 or backend not in ("auto", "torch") or device.type != "cpu":
            raise OptionError("bf16 weights run on the CPU with float32 activations (dtype='bfloat16' sets them)")
        ops = Bf16Ops()
        return ops, {**{op: "torch" for op in OP_NAMES}, "linear": ops.report, "linear_act": ops.report}
    if weights == "int8":
        if dtype != torch.float32:
            raise OptionError("int8 weights run with float32 activations; use dtype='int8' (or dtype=float32)")
        if backend != "torch" or device.type != "cpu":
            raise OptionError(f"dtype='int8' runs on the CPU with backend='torch' (asked: {backend} on {device.type})")
        ops = Int8Ops()
        return ops, {**{op: "torch" for op in OP_NAMES}, "linear": ops.report, "linear_act": ops.report}
    if backend == "torch":
        onednn = onednn_usable(device, dtype)
        report = {op: "torch" for op in OP_NAMES}
        if onednn:
            report.update(linear="torch-onednn-prepacked", linear_act="torch-onednn-prepacked")
        return TorchOps(onednn), report
    if backend == "triton":
        return _triton_ops(device), {**{op: "triton" for op in OP_NAMES}, "linear": "torch"}
    raise BackendError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
