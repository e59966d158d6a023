// Runtime CPU dispatch (dispatch.h): which capability levels this library was built with
// (CMake defines PS_CPU_LEVEL_<NAME> for each), which the CPU can run (cpuid + xgetbv: the
// instructions and the OS saving their registers), and the active one: the best level both
// allow, or the one PS_KERNELS_CPU_CAPABILITY names (read at first use; a level the CPU cannot
// run, or an unknown name, is an error naming the variable). Compiled for the baseline target:
// it runs on every CPU before anything is chosen.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "dispatch.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define PS_CPU_X86 1
#endif

#define PS_DECLARE_LEVEL(ns) \
  namespace ps_kernels::cpu::ns { const LevelKernels& kernels(); }
#if defined(PS_CPU_LEVEL_DEFAULT)
PS_DECLARE_LEVEL(level_default)
#endif
#if defined(PS_CPU_LEVEL_AVX2)
PS_DECLARE_LEVEL(level_avx2)
#endif
#if defined(PS_CPU_LEVEL_AVX512)
PS_DECLARE_LEVEL(level_avx512)
#endif
#if defined(PS_CPU_LEVEL_AVX512_BF16)
PS_DECLARE_LEVEL(level_avx512_bf16)
#endif
#if !defined(PS_CPU_LEVEL_DEFAULT) && !defined(PS_CPU_LEVEL_AVX2) && !defined(PS_CPU_LEVEL_AVX512) && \
    !defined(PS_CPU_LEVEL_AVX512_BF16)
#define PS_CPU_SINGLE_LEVEL 1  // built without CMake (one set of flags): one level, named by its code
PS_DECLARE_LEVEL(level_single)
#endif

namespace ps_kernels::cpu {
namespace {

constexpr const char* kVariable = "PS_KERNELS_CPU_CAPABILITY";

// The table of each level built into this library, or null.
const LevelKernels* compiled_table(int level) {
#if defined(PS_CPU_SINGLE_LEVEL)
  const LevelKernels& only = level_single::kernels();
  return int(only.level) == level ? &only : nullptr;
#else
  switch (Level(level)) {
#if defined(PS_CPU_LEVEL_DEFAULT)
    case Level::kDefault: return &level_default::kernels();
#endif
#if defined(PS_CPU_LEVEL_AVX2)
    case Level::kAvx2: return &level_avx2::kernels();
#endif
#if defined(PS_CPU_LEVEL_AVX512)
    case Level::kAvx512: return &level_avx512::kernels();
#endif
#if defined(PS_CPU_LEVEL_AVX512_BF16)
    case Level::kAvx512Bf16: return &level_avx512_bf16::kernels();
#endif
    default: return nullptr;
  }
#endif
}

// Whether the CPU (and the OS, which must save the wider registers) can run each level.
struct CpuFeatures {
  bool level[kNumLevels] = {true, false, false, false};
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(PS_CPU_X86)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_ymm = (xcr0_lo & 0x6u) == 0x6u;     // SSE + AVX state
  const bool os_zmm = (xcr0_lo & 0xe6u) == 0xe6u;   // + opmask, ZMM0-15 upper halves, ZMM16-31
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return f;
  const bool avx2 = b7 & (1u << 5);
  const bool avx512 = (b7 & (1u << 16)) && (b7 & (1u << 17)) && (b7 & (1u << 30)) && (b7 & (1u << 31));  // F DQ BW VL
  unsigned a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  const bool bf16 = a7 >= 1 && __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71) && (a71 & (1u << 5));
  f.level[int(Level::kAvx2)] = os_ymm && avx2 && fma && f16c;
  f.level[int(Level::kAvx512)] = f.level[int(Level::kAvx2)] && os_zmm && avx512;
  f.level[int(Level::kAvx512Bf16)] = f.level[int(Level::kAvx512)] && bf16;
#endif
  return f;
}

const CpuFeatures& cpu() {
  static const CpuFeatures features = detect();
  return features;
}

std::string join(bool (*keep)(int)) {
  std::string out;
  for (int l = 0; l < kNumLevels; ++l) {
    if (!keep(l)) continue;
    if (!out.empty()) out += ", ";
    out += kLevelNames[l];
  }
  return out;
}
bool is_compiled(int l) { return compiled_table(l) != nullptr; }
bool is_supported(int l) { return cpu().level[l]; }
bool is_usable(int l) { return is_compiled(l) && is_supported(l); }

// The level `name` asks for (`what` names the asker in errors); throws when it cannot run here.
int parse_level(const std::string& name, const std::string& what) {
  int level = -1;
  for (int l = 0; l < kNumLevels; ++l)
    if (name == kLevelNames[l]) level = l;
  TORCH_CHECK(level >= 0, what, ": expected one of default, avx2, avx512, avx512_bf16 (this CPU supports ",
              join(is_supported), "), got '", name, "'");
  TORCH_CHECK(is_supported(level), what, ": this CPU supports ", join(is_supported), ", asked for '", name,
              "' (a level above what the CPU has would stop on an illegal instruction)");
  TORCH_CHECK(is_compiled(level), what, ": level '", name, "' was not compiled into this library (compiled: ",
              join(is_compiled), "; the compiler could not build it)");
  return level;
}

std::mutex state_mutex;
std::atomic<const LevelKernels*> active{nullptr};

const LevelKernels& resolve() {
  std::lock_guard<std::mutex> lock(state_mutex);
  if (const LevelKernels* chosen = active.load(std::memory_order_acquire)) return *chosen;
  int level = -1;
  const char* env = std::getenv(kVariable);
  if (env != nullptr && *env != '\0') {
    level = parse_level(env, std::string(kVariable) + "=" + env);
  } else {
    for (int l = kNumLevels - 1; l >= 0 && level < 0; --l)
      if (is_usable(l)) level = l;
    TORCH_CHECK(level >= 0, "ps_kernels: no compiled CPU capability level runs on this CPU (compiled: ",
                join(is_compiled), "; CPU supports: ", join(is_supported), ")");
  }
  const LevelKernels* table = compiled_table(level);
  active.store(table, std::memory_order_release);
  return *table;
}

std::vector<std::string> names(bool (*keep)(int)) {
  std::vector<std::string> out;
  for (int l = 0; l < kNumLevels; ++l)
    if (keep(l)) out.emplace_back(kLevelNames[l]);
  return out;
}

// ps_kernels_C::_cpu_capability(): the active level's name (chooses it at first use).
std::string cpu_capability() { return kLevelNames[int(active_kernels().level)]; }

// ps_kernels_C::_cpu_capability_levels(): (levels compiled into this library, levels this CPU runs).
std::tuple<std::vector<std::string>, std::vector<std::string>> cpu_capability_levels() {
  return {names(is_compiled), names(is_supported)};
}

// ps_kernels_C::_set_cpu_capability(level): force a level in-process (tests, benchmarks); ""
// returns to the automatic choice (the variable, else the best level).
void set_cpu_capability(const std::string& level) {
  if (level.empty()) {
    std::lock_guard<std::mutex> lock(state_mutex);
    active.store(nullptr, std::memory_order_release);
    return;
  }
  const int l = parse_level(level, "cpu capability");
  std::lock_guard<std::mutex> lock(state_mutex);
  active.store(compiled_table(l), std::memory_order_release);
}

}  // namespace

const LevelKernels& active_kernels() {
  if (const LevelKernels* chosen = active.load(std::memory_order_acquire)) return *chosen;
  return resolve();
}

}  // namespace ps_kernels::cpu

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("_cpu_capability() -> str", &ps_kernels::cpu::cpu_capability);
  m.def("_cpu_capability_levels() -> (str[], str[])", &ps_kernels::cpu::cpu_capability_levels);
  m.def("_set_cpu_capability(str level) -> ()", &ps_kernels::cpu::set_cpu_capability);
}
