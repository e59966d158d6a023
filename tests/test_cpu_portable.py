"""The portable (non-AVX-512) paths of the CPU headers, compiled here for AVX2 and run against a
double-precision reference: the fallback a machine without AVX-512 builds."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "skinny_linear.h"
using namespace ps_kernels::cpu;

static unsigned state = 12345;
static float rnd() { state = state * 1664525u + 1013904223u; return float(state >> 8) / float(1 << 24) - 0.5f; }

int main() {
  static_assert(!skinny::kVectorized, "expected the portable path");
  double worst = 0;
  const long shapes[][3] = {{1, 1, 1}, {3, 17, 5}, {5, 576, 37}, {16, 100, 9}, {33, 31, 4}};
  for (const auto& s : shapes) {
    const long M = s[0], K = s[1], N = s[2];
    std::vector<float> x(M * K), w(N * K), b(N), out(M * N);
    std::vector<BFloat16> wb(N * K);
    for (auto& v : x) v = rnd();
    for (long i = 0; i < N * K; ++i) { w[i] = rnd(); wb[i].bits = uint16_t(float_to_bits(w[i]) >> 16); }
    for (auto& v : b) v = rnd();
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 0) skinny::rows_range(x.data(), M, K, w.data(), b.data(), out.data(), N, 0, N);
      else skinny::rows_range(x.data(), M, K, wb.data(), nullptr, out.data(), N, 0, N);
      for (long m = 0; m < M; ++m)
        for (long n = 0; n < N; ++n) {
          double ref = pass == 0 ? b[n] : 0.0;
          for (long k = 0; k < K; ++k) ref += double(pass == 0 ? w[n * K + k] : to_float(wb[n * K + k])) * x[m * K + k];
          worst = std::fmax(worst, std::fabs(ref - out[m * N + n]));
        }
    }
  }
  std::printf("%g\n", worst);
  return 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_portable_skinny_linear_matches_double_reference(tmp_path):
    src = tmp_path / "portable.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "portable"
    cmd = [CXX, "-std=c++17", "-O3", "-mavx2", "-mfma", "-mno-avx512f", f"-I{ROOT / 'csrc' / 'cpu'}", str(src),
           "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    worst = float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    assert worst < 1e-4  # fp32 sums of <= 576 products of magnitude <= 0.25
