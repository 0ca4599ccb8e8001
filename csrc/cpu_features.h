#pragma once
// What this CPU offers pyengine's kernels: detected once per process, and every kernel's choice of code reads it
// here (one decision, reported by _C.build_info and engine.backends["cpu_isa"]).
//
// PYENGINE_MAX_CPU_ISA caps it, as ONEDNN_MAX_CPU_ISA caps oneDNN's: a machine then runs the paths a CPU with less
// would run (the tests check the portable paths on AVX-512 machines this way). Levels, in order:
//   portable < avx512 (AVX512F + BW) < avx512_vnni < avx512_bf16 < amx (AMX-INT8 / AMX-BF16)
// A feature is in effect when the CPU has it and its level is within the cap; unset, the cap is `amx` (all of it).
#include <string>

namespace pyengine {

// AVX512F and AVX512BW: every AVX-512 kernel (the register tiles, attention, layer norm, log-softmax + top-k).
bool avx512_available();

// And AVX512-VNNI: the int8 register tile.
bool vnni_available();

// And AVX512-BF16 (VDPBF16PS): the bf16 GEMM's dot tile.
bool avx512_bf16_available();

// AMX-INT8, with the OS granting this process the tile state (asked once, on first call, and only within the cap).
bool amx_available();

// AMX-BF16, the same way.
bool amx_bf16_available();

// The highest level in effect ("portable" ... "amx"), and PYENGINE_MAX_CPU_ISA as given ("" when unset).
std::string cpu_isa();
std::string cpu_isa_cap();

// Why the cap cannot be used (a name not among the levels; then no feature is in effect), "" when it can.
std::string cpu_isa_error();

}  // namespace pyengine
