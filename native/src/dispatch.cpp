// ISA dispatch: probe CPUID and XGETBV once, pick the best kernel family this CPU and OS can run.
// A family counts as supported only if it was compiled in and every feature it uses is present,
// including the OS enabling the register state (XCR0), as ggml's cpu-feats does.
#include <cstring>
#include <string>

#include "../include/ryz.h"
#include "../kernels/kernels.h"
#include "internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace ryz {

namespace {

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
    bool amx_int8 = false;  // AMX-TILE + AMX-INT8, tile state enabled in XCR0, and Linux's permission granted
    bool neon_dotprod = false;
};

#if defined(__x86_64__) && defined(__linux__)
// Linux hands out tile data (8 KB of state per thread) only on request, once per process; without it the
// first tile instruction faults. A refusal (old kernel, seccomp, a sigaltstack too small for the state)
// leaves AMX unsupported.
bool request_amx_permission() {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#else
[[maybe_unused]] bool request_amx_permission() { return false; }
#endif

CpuFeatures probe() {
    CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27);
    uint64_t xcr0 = 0;
    if (osxsave) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
    }
    const bool os_avx = (xcr0 & 0x6) == 0x6;       // XMM and YMM state
    const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;  // plus opmask, ZMM_Hi256, Hi16_ZMM
    f.fma = os_avx && (c & (1u << 12));
    f.f16c = os_avx && (c & (1u << 29));
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx2 = os_avx && (b & (1u << 5));
        f.avx512f = os_avx512 && (b & (1u << 16));
        f.avx512dq = os_avx512 && (b & (1u << 17));
        f.avx512bw = os_avx512 && (b & (1u << 30));
        f.avx512vl = os_avx512 && (b & (1u << 31));
        f.avx512vnni = os_avx512 && (c & (1u << 11));
        const bool os_amx = (xcr0 & 0x60000) == 0x60000;  // XTILECFG (17) and XTILEDATA (18)
        f.amx_int8 = os_amx && (d & (1u << 24)) && (d & (1u << 25)) && request_amx_permission();
    }
#elif defined(__aarch64__) && defined(__linux__)
    f.neon_dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;  // run-time: only neon.cpp is built with +dotprod
#endif
    return f;
}

const CpuFeatures &features() {
    static const CpuFeatures f = probe();
    return f;
}

const Kernels *table_for(int32_t isa) {
    const CpuFeatures &f = features();
    switch (isa) {
        case RYZ_ISA_SCALAR: return &kernels_scalar();
        case RYZ_ISA_AVX2: return (f.avx2 && f.fma && f.f16c) ? kernels_avx2() : nullptr;
        case RYZ_ISA_AVX512:
            return (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.avx2 && f.fma && f.f16c)
                       ? kernels_avx512() : nullptr;
        case RYZ_ISA_NEON: return f.neon_dotprod ? kernels_neon() : nullptr;
        case RYZ_ISA_AMX: return f.amx_int8 && table_for(RYZ_ISA_AVX512) ? kernels_amx() : nullptr;  // AVX-512 underneath
        default: return nullptr;
    }
}

const Kernels *best() {
    for (int32_t isa : {RYZ_ISA_AMX, RYZ_ISA_AVX512, RYZ_ISA_AVX2, RYZ_ISA_NEON}) {
        if (const Kernels *k = table_for(isa)) return k;
    }
    return &kernels_scalar();
}

const Kernels *g_current = nullptr;
thread_local std::string g_last_error;

}  // namespace

#if !defined(RYZ_HAVE_AVX2)
const Kernels *kernels_avx2() { return nullptr; }
#endif
#if !defined(RYZ_HAVE_AVX512)
const Kernels *kernels_avx512() { return nullptr; }
#endif
#if !defined(RYZ_HAVE_NEON)
const Kernels *kernels_neon() { return nullptr; }
#endif
#if !defined(RYZ_HAVE_AMX)
const Kernels *kernels_amx() { return nullptr; }
#endif

const Kernels &kernels() {
    if (!g_current) g_current = best();
    return *g_current;
}

ryz_status fail(ryz_status status, const std::string &message) {
    g_last_error = message;
    return status;
}

}  // namespace ryz

using namespace ryz;

extern "C" {

int32_t ryz_abi_version(void) { return RYZ_ABI_VERSION; }

int32_t ryz_isa(void) { return kernels().isa; }

const char *ryz_isa_name(int32_t isa) {
    switch (isa) {
        case RYZ_ISA_SCALAR: return "scalar";
        case RYZ_ISA_AVX2: return "avx2";
        case RYZ_ISA_AVX512: return "avx512";
        case RYZ_ISA_NEON: return "neon";
        case RYZ_ISA_AMX: return "amx";
        default: return "unknown";
    }
}

int32_t ryz_isa_supported(int32_t isa) { return table_for(isa) != nullptr; }

ryz_status ryz_set_isa(int32_t isa) {
    const Kernels *k = table_for(isa);
    if (!k) {
        return fail(RYZ_ERR_UNSUPPORTED, std::string("kernel family '") + ryz_isa_name(isa) +
                                             "' is not compiled in or not supported by this CPU; use RYZ_ISA=auto or scalar");
    }
    g_current = k;
    return RYZ_OK;
}

const char *ryz_last_error(void) { return g_last_error.c_str(); }

const char *ryz_source_hash(void) { return RYZ_SOURCE_HASH; }

}  // extern "C"
