// FASTLAND_TARGET_CLONES: compile a kernel once per instruction set (AVX-512, AVX2, baseline) and
// pick the best at load time (GCC on x86-64; elsewhere a no-op).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLAND_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLAND_TARGET_CLONES
#endif
