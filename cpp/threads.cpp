#include "threads.h"

#include <ggml-backend.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

namespace obc {

namespace {

std::atomic<int32_t> g_threads_in_use{0};

std::vector<int> affinity_cpus() {
    std::vector<int> cpus;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        for (int i = 0; i < CPU_SETSIZE; ++i)
            if (CPU_ISSET(i, &set)) cpus.push_back(i);
    return cpus;
}

// "0-3,8,10-11" (the kernel's CPU list format) as a set.
std::set<int> parse_cpu_list(const std::string & text) {
    std::set<int> out;
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, ',')) {
        const auto dash = part.find('-');
        try {
            const int lo = std::stoi(part.substr(0, dash));
            const int hi = dash == std::string::npos ? lo : std::stoi(part.substr(dash + 1));
            for (int i = lo; i <= hi && i - lo < 4096; ++i) out.insert(i);
        } catch (const std::exception &) {
            return {};
        }
    }
    return out;
}

std::string read_line(const std::string & path) {
    std::ifstream f(path);
    std::string line;
    std::getline(f, line);
    return line;
}

// The CPUs a hex mask names ("0x3", "ff": bit i is CPU i); throws on anything else.
std::vector<int> parse_cpu_mask(const std::string & mask) {
    std::string hex = mask;
    if (hex.size() > 2 && hex[0] == '0' && (hex[1] == 'x' || hex[1] == 'X')) hex = hex.substr(2);
    if (hex.empty() || hex.size() > GGML_MAX_N_THREADS / 4)
        throw std::invalid_argument("cpu_mask must be a hex mask of at most " + std::to_string(GGML_MAX_N_THREADS) +
                                    " CPUs such as 0x3, got '" + mask + "'");
    std::vector<int> cpus;
    const int n = (int) hex.size();
    for (int i = 0; i < n; ++i) {
        const char c = (char) std::tolower((unsigned char) hex[n - 1 - i]);
        int v;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else throw std::invalid_argument("cpu_mask must be a hex mask such as 0x3, got '" + mask + "'");
        for (int b = 0; b < 4; ++b)
            if (v & (1 << b)) cpus.push_back(4 * i + b);
    }
    if (cpus.empty()) throw std::invalid_argument("cpu_mask '" + mask + "' names no CPU");
    return cpus;
}

}  // namespace

void check_thread_params(const ThreadParams & p) {
    if (p.n_threads < 0) throw std::invalid_argument("n_threads must be >= 0, got " + std::to_string(p.n_threads));
    if (p.poll < 0 || p.poll > 100) throw std::invalid_argument("poll must be in [0, 100], got " + std::to_string(p.poll));
    if (p.prio < GGML_SCHED_PRIO_LOW || p.prio > GGML_SCHED_PRIO_REALTIME)
        throw std::invalid_argument("prio must be -1 (low), 0 (normal), 1 (medium), 2 (high) or 3 (realtime), got " +
                                    std::to_string(p.prio));
    if (!p.cpu_mask.empty()) {
        const std::vector<int> cpus = parse_cpu_mask(p.cpu_mask);
        const std::vector<int> allowed = affinity_cpus();
        for (int c : cpus)
            if (!allowed.empty() && !std::binary_search(allowed.begin(), allowed.end(), c))
                throw std::invalid_argument("cpu_mask '" + p.cpu_mask + "' names CPU " + std::to_string(c) +
                                            ", which this process may not run on");
    } else if (p.cpu_strict) {
        throw std::invalid_argument("cpu_strict needs a cpu_mask to place the threads on");
    }
}

int32_t hardware_thread_count() {
    const size_t n = affinity_cpus().size();
    if (n > 0) return (int32_t) n;
    const unsigned hc = std::thread::hardware_concurrency();
    return hc > 0 ? (int32_t) hc : 1;
}

namespace {

int32_t count_physical_cores() {
    const std::vector<int> cpus = affinity_cpus();
    // Hybrid CPUs list their performance cores here; a CPU of another type does not count.
    const std::set<int> perf = parse_cpu_list(read_line("/sys/devices/cpu_core/cpus"));
    // A physical core is a set of SMT siblings (the kernel's thread_siblings_list), as llama.cpp counts.
    std::set<std::string> cores;
    for (int c : cpus) {
        if (!perf.empty() && !perf.count(c)) continue;
        const std::string siblings = read_line("/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/thread_siblings_list");
        if (siblings.empty()) return hardware_thread_count();   // no topology: every CPU counts
        cores.insert(siblings);
    }
    if (!cores.empty()) return (int32_t) cores.size();
    return hardware_thread_count();
}

}  // namespace

int32_t default_thread_count() {
    // Read once per process, as llama.cpp does: every context of a C API or CLI request would
    // otherwise read the topology of each CPU again. resolve_thread_count still bounds it by
    // the CPUs the process may run on at the time.
    static const int32_t n = count_physical_cores();
    return n;
}

int32_t threads_in_use() { return g_threads_in_use.load(); }

CpuLoadMonitor::CpuLoadMonitor(std::vector<int> cpus, int window_ms) : cpus_(std::move(cpus)), window_(window_ms) {
    std::sort(cpus_.begin(), cpus_.end());
    last_ = sample();
    if (!last_.ok) return;
    std::ifstream f("/proc/stat");
    std::string key;
    long long n = -1;
    while (f >> key)
        if (key == "procs_running" && (f >> n)) break;
    if (n >= 1) estimate_ = std::min<double>((double) (n - 1), (double) cpus_.size());
}

std::shared_ptr<CpuLoadMonitor> CpuLoadMonitor::shared(std::vector<int> cpus) {
    static std::mutex mu;
    // Kept for the process's lifetime (a process uses one or two CPU sets), so that the estimate
    // outlives the contexts: Python makes one per request.
    static std::map<std::vector<int>, std::shared_ptr<CpuLoadMonitor>> monitors;
    std::sort(cpus.begin(), cpus.end());
    std::lock_guard<std::mutex> lk(mu);
    std::shared_ptr<CpuLoadMonitor> & m = monitors[cpus];
    if (!m) m = std::make_shared<CpuLoadMonitor>(cpus);
    return m;
}

CpuLoadMonitor::Sample CpuLoadMonitor::sample() const {
    Sample s;
    s.t = std::chrono::steady_clock::now();
    std::ifstream f("/proc/stat");
    if (!f) return s;
    static const double hz = (double) sysconf(_SC_CLK_TCK);
    if (hz <= 0) return s;
    std::string line;
    size_t found = 0;
    while (std::getline(f, line)) {
        if (line.compare(0, 3, "cpu") != 0) break;   // the cpu lines come first
        if (line.size() < 4 || !std::isdigit((unsigned char) line[3])) continue;   // the "cpu " total
        std::istringstream in(line.substr(3));
        int cpu;
        // user nice system idle iowait irq softirq steal (guest time is already in user)
        unsigned long long v[8] = {0};
        in >> cpu;
        for (auto & x : v) in >> x;
        if (!in || !std::binary_search(cpus_.begin(), cpus_.end(), cpu)) continue;
        s.busy_s += (double) (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz;
        ++found;
    }
    if (found != cpus_.size()) return s;
    rusage ru{};
    if (getrusage(RUSAGE_SELF, &ru) != 0) return s;
    s.self_s = (double) ru.ru_utime.tv_sec + 1e-6 * (double) ru.ru_utime.tv_usec + (double) ru.ru_stime.tv_sec +
               1e-6 * (double) ru.ru_stime.tv_usec;
    s.ok = true;
    return s;
}

double CpuLoadMonitor::others_busy() {
    std::lock_guard<std::mutex> lk(mu_);
    const auto now = std::chrono::steady_clock::now();
    if (now - last_.t < window_) return estimate_;
    const Sample s = sample();
    if (s.ok && last_.ok) {
        const double wall = std::chrono::duration<double>(s.t - last_.t).count();
        // The counters tick at 100 Hz: clamp what rounding makes negative or above the CPUs.
        const double others = ((s.busy_s - last_.busy_s) - (s.self_s - last_.self_s)) / wall;
        estimate_ = std::min(std::max(others, 0.0), (double) cpus_.size());
    } else if (!s.ok) {
        estimate_ = -1;
    }
    last_ = s;
    return estimate_;
}

static std::vector<int> pool_cpus(const ThreadParams & p) {
    if (!p.cpu_mask.empty()) return parse_cpu_mask(p.cpu_mask);
    std::vector<int> cpus = affinity_cpus();
    if (cpus.empty())
        for (int i = 0; i < hardware_thread_count(); ++i) cpus.push_back(i);
    return cpus;
}

int32_t resolve_thread_count(const ThreadParams & p) {
    const int32_t cpus = std::min<int32_t>(hardware_thread_count(), (int32_t) pool_cpus(p).size());
    const int32_t n = p.n_threads > 0 ? p.n_threads : default_thread_count();
    return std::max(1, std::min(n, cpus));
}

namespace {

// A thread's CPU affinity and scheduling, saved to be put back.
struct ThreadState {
    cpu_set_t mask;
    bool have_mask = false;
    int policy = SCHED_OTHER;
    sched_param param{};
    bool have_sched = false;

    static ThreadState save() {
        ThreadState st;
        CPU_ZERO(&st.mask);
        st.have_mask = pthread_getaffinity_np(pthread_self(), sizeof(st.mask), &st.mask) == 0;
        st.have_sched = pthread_getschedparam(pthread_self(), &st.policy, &st.param) == 0;
        return st;
    }
    void restore() const {
        if (have_mask) pthread_setaffinity_np(pthread_self(), sizeof(mask), &mask);
        if (have_sched) pthread_setschedparam(pthread_self(), policy, &param);
    }
};

// The calling thread's own state while a graph runs (the outermost Use saves and restores it).
thread_local ThreadState t_saved;
thread_local int t_depth = 0;

// ggml's policy for each priority level (ggml_sched_priority), for the calling thread.
void apply_priority(int32_t prio) {
    sched_param p{};
    int policy = SCHED_OTHER;
    switch (prio) {
        case GGML_SCHED_PRIO_LOW: policy = SCHED_BATCH; break;
        case GGML_SCHED_PRIO_MEDIUM: policy = SCHED_FIFO; p.sched_priority = 40; break;
        case GGML_SCHED_PRIO_HIGH: policy = SCHED_FIFO; p.sched_priority = 80; break;
        case GGML_SCHED_PRIO_REALTIME: policy = SCHED_FIFO; p.sched_priority = 90; break;
        default: return;
    }
    pthread_setschedparam(pthread_self(), policy, &p);   // may be refused without privileges, as ggml's
}

}  // namespace

CpuThreads::CpuThreads(const ThreadParams & params, ggml_backend_t backend_cpu)
    : backend_(backend_cpu), adaptive_(params.adaptive), prio_(params.prio),
      monitor_(CpuLoadMonitor::shared(pool_cpus(params))) {
    check_thread_params(params);
    n_max_ = n_last_ = resolve_thread_count(params);
    if (params.n_threads > n_max_) {
        // More threads than the CPUs only time-slice ggml's spinning workers (16 threads on 2
        // cores took 85 s for one token); llama.cpp bounds its threads by the cores as well.
        static std::atomic<bool> warned{false};
        if (!warned.exchange(true))
            std::fprintf(stderr, "warning: n_threads=%d is more than the %d CPUs it may run on; using %d\n",
                         params.n_threads, n_max_, n_max_);
    }
    ggml_threadpool_params tp = ggml_threadpool_params_default(n_max_);
    tp.prio = (ggml_sched_priority) params.prio;
    tp.poll = (uint32_t) params.poll;
    tp.strict_cpu = params.cpu_strict;
    if (!params.cpu_mask.empty()) {
        mask_cpus_ = parse_cpu_mask(params.cpu_mask);
        for (int c : mask_cpus_) tp.cpumask[c] = true;   // parse_cpu_mask bounds c by GGML_MAX_N_THREADS
    }
    const ThreadState caller = ThreadState::save();
    pool_ = ggml_threadpool_new(&tp);
    caller.restore();   // ggml gives the creating thread the pool's mask and priority
    if (!pool_) throw std::runtime_error("cannot start a ggml thread pool of " + std::to_string(n_max_) + " threads");
    ggml_backend_cpu_set_threadpool(backend_, pool_);
    ggml_backend_cpu_set_n_threads(backend_, n_max_);
}

CpuThreads::~CpuThreads() {
    if (pool_) ggml_threadpool_free(pool_);
}

int32_t CpuThreads::choose() {
    int32_t n = n_max_;
    if (adaptive_ && n_max_ > 1) {
        const double others = monitor_->others_busy();
        if (others >= 0) {
            // The CPUs that neither other processes nor this process's other graphs occupy.
            const double free_cpus = monitor_->n_cpus() - others - threads_in_use();
            n = std::max<int32_t>(1, std::min<int32_t>(n_max_, (int32_t) std::floor(free_cpus + 0.5)));
        }
    }
    if (n != n_last_) ggml_backend_cpu_set_n_threads(backend_, n);
    n_last_ = n;
    return n;
}

CpuThreads::Use::Use(CpuThreads & pool) : pool_(pool), n_(pool.choose()) {
    g_threads_in_use += n_;
    if ((!pool_.mask_cpus_.empty() || pool_.prio_ != GGML_SCHED_PRIO_NORMAL) && t_depth == 0) {
        ++t_depth;
        t_saved = ThreadState::save();
        restore_ = true;
        if (!pool_.mask_cpus_.empty() && t_saved.have_mask) {   // never pin what cannot be restored
            cpu_set_t set;
            CPU_ZERO(&set);
            for (int c : pool_.mask_cpus_)
                if (c < CPU_SETSIZE) CPU_SET(c, &set);
            pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
        }
        apply_priority(pool_.prio_);
    }
}

CpuThreads::Use::~Use() {
    if (restore_) {
        t_saved.restore();
        --t_depth;
    }
    g_threads_in_use -= n_;
}

}  // namespace obc
