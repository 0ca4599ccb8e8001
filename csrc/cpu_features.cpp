// The CPU's features as pyengine's kernels see them (cpu_features.h): the hardware's, within PYENGINE_MAX_CPU_ISA.
#include "cpu_features.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyengine {

namespace {

constexpr const char* kLevels[] = {"portable", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
constexpr int kPortable = 0, kAvx512 = 1, kVnni = 2, kBf16 = 3, kAmx = 4;

// The cap's level: kAmx when PYENGINE_MAX_CPU_ISA is unset or empty, -1 for a name it does not know (then no feature
// is used, and cpu_isa_error says why: the Python package refuses to import; nothing here throws, as the features are
// first read while the extension loads).
int cap_level() {
  const std::string cap = cpu_isa_cap();
  if (cap.empty()) return kAmx;
  for (int level = kPortable; level <= kAmx; ++level)
    if (cap == kLevels[level]) return level;
  return -1;
}

// AMX's tile state: the OS saves it (XCR0 bits 17-18) and grants it to this process (Linux asks for it once per
// process; oneDNN asks the same).
bool amx_tile_state() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

struct Features {
  bool avx512 = false, vnni = false, avx512_bf16 = false, amx_int8 = false, amx_bf16 = false;
};

// The hardware's features within the cap, once (the AMX permission is asked only when AMX is within it).
const Features& features() {
  static const Features f = [] {
    Features f;
    const int cap = cap_level();
#if defined(__x86_64__) && defined(__GNUC__)
    f.avx512 = cap >= kAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    f.vnni = cap >= kVnni && f.avx512 && __builtin_cpu_supports("avx512vnni");
    f.avx512_bf16 = cap >= kBf16 && f.avx512 && __builtin_cpu_supports("avx512bf16");
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool leaf7 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx);
    // AMX-TILE (edx bit 24) and AMX-INT8 (25); the int8 AMX path's epilogue is VNNI code
    f.amx_int8 = cap >= kAmx && f.vnni && leaf7 && ((edx >> 24) & 1) && ((edx >> 25) & 1) && amx_tile_state();
    f.amx_bf16 = f.amx_int8 && ((edx >> 22) & 1);  // AMX-BF16
#endif
    return f;
  }();
  return f;
}

}  // namespace

bool avx512_available() { return features().avx512; }
bool vnni_available() { return features().vnni; }
bool avx512_bf16_available() { return features().avx512_bf16; }
bool amx_available() { return features().amx_int8; }
bool amx_bf16_available() { return features().amx_bf16; }

std::string cpu_isa_error() {
  if (cap_level() >= 0) return "";
  std::string error = "PYENGINE_MAX_CPU_ISA=" + cpu_isa_cap() + " is not one of";
  for (const char* level : kLevels) error += std::string(" ") + level;
  return error;
}

std::string cpu_isa() {
  const Features& f = features();
  const int level = f.amx_int8 ? kAmx : f.avx512_bf16 ? kBf16 : f.vnni ? kVnni : f.avx512 ? kAvx512 : kPortable;
  return kLevels[level];
}

std::string cpu_isa_cap() {
  static const std::string cap = [] {  // read once, as the features are decided once
    const char* value = std::getenv("PYENGINE_MAX_CPU_ISA");
    std::string text = value == nullptr ? "" : value;
    std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
    return text;
  }();
  return cap;
}

}  // namespace pyengine
