// Run-time ISA dispatch shared by the CPU ops (internal). On x86 with GCC/Clang the hot loops are
// also compiled with target("avx2,fma,f16c") and chosen at run time, so the library needs no
// -march flag and runs on any x86-64 (OBC_NO_DISPATCH at build time disables this).
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && !defined(OBC_NO_DISPATCH)
#define OBC_X86_DISPATCH 1
#define OBC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define OBC_X86_DISPATCH 0
#endif

#if defined(__GNUC__)
#define OBC_INLINE inline __attribute__((always_inline))
#else
#define OBC_INLINE inline
#endif

// An environment switch that is on when set to anything but "" or "0".
inline bool obc_env_flag(const char * name) {
    const char * v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

// true when the AVX2/FMA/F16C builds may run: the CPU has them and OBC_CPU_BASELINE is not set in
// the environment (that variable forces the portable code, for tests and comparisons).
inline bool obc_use_avx2() {
#if OBC_X86_DISPATCH
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }();
    return has && !obc_env_flag("OBC_CPU_BASELINE");
#else
    return false;
#endif
}
