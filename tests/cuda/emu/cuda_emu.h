// A small CUDA emulator for checking the logic of obc_ops_cuda.cu on a machine without a GPU.
//
// emulate.py rewrites a .cu file into C++ that includes this header instead of the CUDA headers
// (kernel launches become emu::launch, dynamic shared memory becomes emu::dyn_smem()). Every CUDA
// thread of a block runs as a fiber (ucontext) on one OS thread; blocks run one after the other,
// so a `static` variable (what __shared__ becomes) is the block's shared memory. A fiber runs until
// it reaches __syncthreads or a warp intrinsic; the scheduler releases a barrier once every live
// thread of the block waits at it, and a warp intrinsic once every lane of its mask has posted its
// operand. Between synchronisation points the threads run in a shuffled order, so a missing barrier
// tends to show up as a wrong result. Device memory is host memory (cudaMalloc is malloc), so a
// build with -fsanitize=address catches out-of-bounds global accesses; dynamic shared memory is
// filled with 0xff (NaN) before each block and followed by a guard zone checked after it.
// What it cannot show: timing, the real memory model (it is sequentially consistent), or shared
// memory size limits beyond what the code checks itself.
#pragma once

#include <ggml.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct __half {
    uint16_t bits;
};
inline float __half2float(__half h) { return ggml_fp16_to_fp32(h.bits); }

template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

// ---------------------------------------------------------------------------------------------
// Runtime API subset

typedef struct CUstream_st * cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount;
};

inline const char * cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int * d) {
    *d = 0;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int * n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp * p, int) {
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "CPU emulator");
    p->major = 9;
    p->multiProcessorCount = 132;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int * v, cudaDeviceAttr a, int) {
    *v = 232448;  // sm_90's opt-in shared memory per block
    return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void ** p, size_t n) {
    *p = aligned_alloc(256, (n + 255) / 256 * 256);  // cudaMalloc's alignment
    if (*p) memset(*p, 0xA5, n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void * p) {
    free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void * d, const void * s, size_t n, cudaMemcpyKind) {
    memcpy(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }   // launches run to completion

// ---------------------------------------------------------------------------------------------
// Fibers and the scheduler

namespace emu {

enum class St { run, bar, warp, done };
enum class Op { shfl_xor, shfl_up, ballot, match_any, syncwarp };

struct Fiber {
    ucontext_t ctx;
    dim3 thread;
    int lin = 0;
    St st = St::run;
    Op op = Op::syncwarp;
    unsigned mask = 0;
    uint64_t val = 0, res = 0;
    int arg = 0;
};

struct Block {
    dim3 block, bidx;
    std::function<void()> body;
    char * smem = nullptr;
    ucontext_t sched;
};

constexpr size_t STACK = 256 * 1024;
constexpr size_t GUARD = 4096;

inline Fiber * g_cur = nullptr;
inline Block * g_blk = nullptr;
inline std::mt19937 g_rng(7);

inline char * dyn_smem() { return g_blk->smem; }

inline void yield() { swapcontext(&g_cur->ctx, &g_blk->sched); }

inline void entry() {
    g_blk->body();
    g_cur->st = St::done;
}

inline uint64_t warp_op(Op op, unsigned mask, uint64_t val, int arg) {
    Fiber * f = g_cur;
    const unsigned lane = (unsigned) f->lin & 31u;
    if (!(mask >> lane & 1u)) {
        fprintf(stderr, "emu: lane %u calls a warp intrinsic with a mask (%08x) that leaves it out\n", lane, mask);
        abort();
    }
    f->op = op;
    f->mask = mask;
    f->val = val;
    f->arg = arg;
    f->st = St::warp;
    yield();
    return f->res;
}

// Completes the warp operations whose lanes have all arrived; returns whether any did.
inline bool resolve_warps(std::vector<Fiber> & fs) {
    bool any = false;
    for (size_t w0 = 0; w0 < fs.size(); w0 += 32) {
        Fiber * lanes[32] = {};
        for (size_t l = 0; l < 32 && w0 + l < fs.size(); ++l) lanes[l] = &fs[w0 + l];
        for (int l = 0; l < 32; ++l) {
            if (!lanes[l] || lanes[l]->st != St::warp) continue;
            const unsigned m = lanes[l]->mask;
            bool ready = true;
            for (int x = 0; x < 32 && ready; ++x) {
                if (!(m >> x & 1u)) continue;
                if (!lanes[x] || lanes[x]->st == St::done) {
                    fprintf(stderr, "emu: warp intrinsic waits for lane %d, which has exited\n", x);
                    abort();
                }
                ready = lanes[x]->st == St::warp && lanes[x]->mask == m;
            }
            if (!ready) continue;
            for (int x = 0; x < 32; ++x) {
                if (!(m >> x & 1u)) continue;
                Fiber * f = lanes[x];
                if (f->op != lanes[l]->op) {
                    fprintf(stderr, "emu: lanes of one mask are at different warp intrinsics\n");
                    abort();
                }
                switch (f->op) {
                    case Op::shfl_xor: {
                        const int src = x ^ f->arg;
                        f->res = (src < 32 && (m >> src & 1u)) ? lanes[src]->val : f->val;
                        break;
                    }
                    case Op::shfl_up: {
                        const int src = x - f->arg;
                        f->res = (src >= 0 && (m >> src & 1u)) ? lanes[src]->val : f->val;
                        break;
                    }
                    case Op::ballot: {
                        uint64_t b = 0;
                        for (int y = 0; y < 32; ++y)
                            if ((m >> y & 1u) && lanes[y]->val) b |= 1ull << y;
                        f->res = b;
                        break;
                    }
                    case Op::match_any: {
                        uint64_t b = 0;
                        for (int y = 0; y < 32; ++y)
                            if ((m >> y & 1u) && lanes[y]->val == f->val) b |= 1ull << y;
                        f->res = b;
                        break;
                    }
                    case Op::syncwarp: f->res = 0; break;
                }
            }
            for (int x = 0; x < 32; ++x)
                if (m >> x & 1u) lanes[x]->st = St::run;
            any = true;
        }
    }
    return any;
}

inline std::vector<std::unique_ptr<char[]>> & stacks() {
    static std::vector<std::unique_ptr<char[]>> s;
    return s;
}

inline void run_block(Block & b, size_t smem_bytes) {
    const size_t n = (size_t) b.block.x * b.block.y * b.block.z;
    while (stacks().size() < n) stacks().emplace_back(new char[STACK]);
    std::vector<char> smem(smem_bytes + GUARD + 16);
    char * sm = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
    memset(sm, 0xff, smem_bytes);
    memset(sm + smem_bytes, 0x5a, GUARD);
    b.smem = sm;
    g_blk = &b;

    std::vector<Fiber> fs(n);
    for (size_t i = 0; i < n; ++i) {
        Fiber & f = fs[i];
        f.lin = (int) i;
        f.thread = dim3((unsigned) (i % b.block.x), (unsigned) (i / b.block.x % b.block.y),
                        (unsigned) (i / ((size_t) b.block.x * b.block.y)));
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks()[i].get();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, entry, 0);
    }
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    for (;;) {
        bool progress = false;
        std::shuffle(order.begin(), order.end(), g_rng);
        for (size_t i : order) {
            if (fs[i].st != St::run) continue;
            g_cur = &fs[i];
            swapcontext(&b.sched, &fs[i].ctx);
            progress = true;
        }
        if (resolve_warps(fs)) continue;
        size_t live = 0, at_bar = 0;
        for (const Fiber & f : fs) {
            live += f.st != St::done;
            at_bar += f.st == St::bar;
        }
        if (live == 0) break;
        if (at_bar == live) {
            for (Fiber & f : fs)
                if (f.st == St::bar) f.st = St::run;
            continue;
        }
        if (!progress) {
            fprintf(stderr, "emu: deadlock in block (%u, %u, %u): %zu live threads, %zu at __syncthreads\n", b.bidx.x,
                    b.bidx.y, b.bidx.z, live, at_bar);
            abort();
        }
    }
    for (size_t i = 0; i < GUARD; ++i) {
        if ((unsigned char) sm[smem_bytes + i] != 0x5a) {
            fprintf(stderr, "emu: write past the end of dynamic shared memory (%zu bytes) in block (%u, %u, %u)\n",
                    smem_bytes, b.bidx.x, b.bidx.y, b.bidx.z);
            abort();
        }
    }
    g_blk = nullptr;
    g_cur = nullptr;
}

template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
    Block b;
    b.block = block;
    b.body = [&]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                b.bidx = dim3(x, y, z);
                run_block(b, smem);
            }
}

template <class T>
inline uint64_t bits_of(T v) {
    static_assert(sizeof(T) <= 8, "");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

#define threadIdx (::emu::g_cur->thread)
#define blockIdx (::emu::g_blk->bidx)
#define blockDim (::emu::g_blk->block)

// ---------------------------------------------------------------------------------------------
// Device intrinsics

inline void __syncthreads() {
    emu::g_cur->st = emu::St::bar;
    emu::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::Op::syncwarp, mask, 0, 0); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::shfl_xor, mask, emu::bits_of(v), lane_mask));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::shfl_up, mask, emu::bits_of(v), (int) delta));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned) emu::warp_op(emu::Op::ballot, mask, pred != 0, 0);
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
    return (unsigned) emu::warp_op(emu::Op::match_any, mask, v, 0);
}
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz((unsigned) x) + 1; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __float_as_int(float x) { return emu::from_bits<int>(emu::bits_of(x)); }
inline unsigned __float_as_uint(float x) { return emu::from_bits<unsigned>(emu::bits_of(x)); }
inline float __int_as_float(int x) { return emu::from_bits<float>(emu::bits_of(x)); }
template <class T>
inline T __ldg(const T * p) {
    return *p;
}
inline unsigned atomicAdd(unsigned * p, unsigned v) {
    const unsigned o = *p;
    *p = o + v;
    return o;
}
