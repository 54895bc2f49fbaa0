// Helpers for CPU kernels compiled more than once for different instruction sets.
//
// DELORA_TARGET_CLONES(...) compiles a function once per listed target (GCC/Clang target_clones); the loader picks
// one for the CPU at load time through an ifunc, so one machine always runs the same code. x86-64 Linux only;
// elsewhere the function is compiled once, for the baseline. DELORA_ALWAYS_INLINE marks the helpers such a function
// calls, so they are inlined into each clone and compiled for its target too.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define DELORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DELORA_ALWAYS_INLINE inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define DELORA_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#else
#define DELORA_TARGET_CLONES(...)
#endif
