// CPU threads: how many the engine uses by default, and a thread pool that uses fewer while
// other processes keep the cores busy.
//
// Why: ggml's CPU workers meet at a barrier after every op and wait for each other by spinning
// (ggml_barrier). When the machine is busy, the OS deschedules one worker and the others spin
// until it runs again: two threads on two cores beside one busy process decoded 2.2x slower than
// one thread. The pool therefore measures how many of its CPUs other processes are using and
// starts no more workers than are free.
#pragma once

#include <ggml-cpu.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace obc {

struct ThreadParams {
    int32_t n_threads = 0;      // the most threads a graph uses; 0: default_thread_count()
    bool adaptive = true;       // use fewer threads while other processes keep the CPUs busy
    int32_t poll = 0;           // 0-100: how long idle workers spin for the next graph before sleeping
    int32_t prio = 0;           // thread priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime
    std::string cpu_mask;       // hex mask of the CPUs to run on, as llama.cpp's --cpu-mask ("" : inherited)
    bool cpu_strict = false;    // pin each worker to one CPU of the mask
};

// Throws std::invalid_argument naming the first bad value.
void check_thread_params(const ThreadParams & p);

// The number of physical performance cores this process may run on, as llama.cpp chooses its
// default: SMT siblings count once, and on hybrid CPUs only the performance cores count (their
// list is /sys/devices/cpu_core/cpus when the kernel exposes it). Read once per process.
int32_t default_thread_count();
// Threads this process may run on (its CPU affinity mask), the bound for n_threads.
int32_t hardware_thread_count();
// The thread count a pool of these params gets: n_threads (or the default) bounded by the CPUs
// of the mask and of the affinity.
int32_t resolve_thread_count(const ThreadParams & p);

// Estimates how many CPUs' worth of work other processes are doing on a set of CPUs, from the
// per-CPU counters in /proc/stat less this process's own CPU time, over windows of window_ms.
// Until the first window has passed, the estimate is the count of runnable tasks less this one
// (/proc/stat's procs_running, an instantaneous system-wide figure).
class CpuLoadMonitor {
public:
    explicit CpuLoadMonitor(std::vector<int> cpus, int window_ms = 200);
    // The process's monitor of these CPUs, shared by its contexts so that a new context starts
    // with what the earlier ones measured.
    static std::shared_ptr<CpuLoadMonitor> shared(std::vector<int> cpus);
    // The latest estimate (CPUs), or a negative number when it cannot be measured here. Thread-safe.
    double others_busy();
    int n_cpus() const { return (int) cpus_.size(); }

private:
    struct Sample {
        std::chrono::steady_clock::time_point t;
        double busy_s = 0;   // busy time of cpus_, all processes
        double self_s = 0;   // this process's CPU time
        bool ok = false;
    };
    Sample sample() const;

    std::mutex mu_;
    std::vector<int> cpus_;
    std::chrono::milliseconds window_;
    Sample last_;
    double estimate_ = -1;
};

// One context's CPU workers: a ggml thread pool of n_threads made with the params' priority,
// mask and polling, attached to the context's CPU backend. Before each graph, a Use sets how
// many of them it uses: all of them, or with `adaptive` the CPUs that other processes and the
// process's other running graphs leave free (at least one).
//
// The calling thread computes too. ggml would give it the pool's mask and priority for good
// when the pool starts; a library must not change its caller's thread, so it keeps its own
// and takes the pool's only while a graph runs.
class CpuThreads {
public:
    CpuThreads(const ThreadParams & params, ggml_backend_t backend_cpu);
    ~CpuThreads();
    CpuThreads(const CpuThreads &) = delete;
    CpuThreads & operator=(const CpuThreads &) = delete;

    int32_t max_threads() const { return n_max_; }
    int32_t last_threads() const { return n_last_; }

    // For the lifetime of one graph's computation: chooses and sets its thread count, counts
    // those threads as busy, and gives the calling thread the pool's mask and priority.
    class Use {
    public:
        explicit Use(CpuThreads & pool);
        ~Use();
        Use(const Use &) = delete;
        Use & operator=(const Use &) = delete;
        int32_t n_threads() const { return n_; }

    private:
        CpuThreads & pool_;
        int32_t n_;
        bool restore_ = false;
    };

private:
    int32_t choose();

    ggml_backend_t backend_;
    ggml_threadpool * pool_ = nullptr;
    int32_t n_max_ = 1;
    int32_t n_last_ = 1;
    bool adaptive_ = true;
    int32_t prio_ = 0;
    std::vector<int> mask_cpus_;   // empty: no mask
    std::shared_ptr<CpuLoadMonitor> monitor_;
};

// Threads of this process's graphs that are computing right now (all contexts).
int32_t threads_in_use();

}  // namespace obc
