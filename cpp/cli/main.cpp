// obcache-cli: generate text from a GGUF model with an optionally bounded, OBCache-evicted KV cache.
#include "generator.h"
#include "model.h"
#include "request.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace {

// Ctrl-C as llama-cli handles it: the first stops prefill or generation at the next check (the
// engine polls between micro-batches and ggml between graph nodes), prints what was generated
// and the timings, and exits with 130; a second one exits at once.
volatile std::sig_atomic_t g_interrupted = 0;

extern "C" void on_sigint(int) {
    if (g_interrupted) _exit(130);
    g_interrupted = 1;
}

bool cli_abort(void *) { return g_interrupted != 0; }

void usage(const char * argv0) {
    // The defaults are the engine's, printed from its structs (python -m pyobcache takes the same).
    const obc::ContextParams cp;
    const obc::SamplerParams sp;
    std::printf(
        "usage: %s -m MODEL [options]\n"
        "\n"
        "  -m, --model PATH         GGUF file (registry names: python -m pyobcache fetch NAME --print-path)\n"
        "  -p, --prompt TEXT        prompt\n"
        "  -f, --file PATH          read the prompt from a file\n"
        "  -n, --n-predict N        tokens to generate (default %d; -1: until EOS or the context is full)\n"
        "  -c, --ctx-size N         context size (default %d)\n"
        "  -b, --batch-size N       prompt micro-batch size (default %d)\n"
        "  -t, --threads N          the most CPU threads (default: physical performance cores)\n"
        "  --adaptive-threads 0|1   use fewer threads while other processes keep the CPUs busy (default: 1)\n"
        "  --poll 0..100            how long idle threads spin for the next graph before sleeping (default: 0)\n"
        "  --prio N                 thread priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime (default: 0)\n"
        "  -C, --cpu-mask M         hex mask of the CPUs to run on, e.g. 0x3 (default: inherited)\n"
        "  --cpu-strict 0|1         pin each thread to one CPU of the mask (default: 0)\n"
        "  -ngl, --n-gpu-layers N   layers to offload to the GPU (needs a CUDA ggml; > n_layer: the output too)\n"
        "  -fa, --flash-attn on|off|auto  attention path (default auto: flash attention for\n"
        "                           prompt-heavy requests, mul_mat + soft_max for long generations)\n"
        "  --temp T                 temperature (default %g; 0 = greedy)\n"
        "  --top-k N                (default %d)\n"
        "  --top-p P                (default %g)\n"
        "  --min-p P                (default %g)\n"
        "  --repeat-penalty R       (default %g; 1 = off)\n"
        "  --repeat-last-n N        tokens the penalty looks back over (default %d)\n"
        "  --seed N                 RNG seed (default: random)\n"
        "  --stop TEXT              stop string (repeatable)\n"
        "  --ignore-eos             keep generating after end-of-generation tokens\n"
        "\n"
        "KV eviction (default: full cache):\n"
        "  --kv SPEC                the whole configuration as one string, e.g.\n"
        "                           obc-vk+snapkv,budget=512,evict=chunked,group_pool=sum (the --kv-* flags\n"
        "                           set the same options and win over it)\n"
        "  --kv-method NAME         e.g. obc-vk, obc-v+snapkv, snapkv, h2o, tova, streamingllm (default: full,\n"
        "                           or the default method when --kv-budget or --kv-ratio is given)\n"
        "  --kv-budget N            tokens kept per layer and KV head\n"
        "  --kv-ratio R             or a fraction of the prompt, in (0, 1]\n"
        "  --kv-recent N            most recent tokens always kept\n"
        "  --kv-sink N              first tokens always kept\n"
        "  --kv-window N            queries in the scoring window\n"
        "  --kv-evict MODE          prefill | chunked | decode (default prefill)\n"
        "  --kv-pooling MODE        none | max | avg\n"
        "  --kv-group-pool MODE     sum | mean | max | norm-sum | pre-mean\n"
        "  --kv-gqa MODE            native (a cache per KV head) | expand (per query head)\n"
        "  --kv-head-budget MODE    uniform | adaptive (heads of a layer share its slots by score)\n"
        "  --kv-slack N             decode-time growth before compaction (default %d)\n"
        "  -ctk, --cache-type-k T   what the cache stores K in: f16 (default), q8_0, q4_0, bf16, f32, ...\n"
        "  -ctv, --cache-type-v T   the same for V (a quantized V uses flash attention)\n"
        "  --list-kv-methods        print the method names and exit\n"
        "  -h, --help\n"
        "\n"
        "python -m pyobcache takes these flags too (and registry names), plus a conversation mode\n"
        "(-cnv, -i, -sys, --chat) that renders the model's Jinja chat template.\n",
        argv0, obc::kDefaultMaxNewTokens, cp.n_ctx, cp.n_batch, (double) sp.temperature, sp.top_k, (double) sp.top_p,
        (double) sp.min_p, (double) sp.repeat_penalty, sp.repeat_last_n, obc::KVConfig{}.slack);
}

bool is_file(const std::string & p) {
    struct stat st {};
    return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The CLI takes paths only. Registry names are resolved by the Python package
// (python -m pyobcache), which downloads, checks and caches the file: running it from here meant
// passing the user's text through a shell.
std::string resolve_model(const std::string & arg) {
    // Something path-like goes to the loader, which says what is wrong with it (not found, ...).
    const bool path_like = arg.find('/') != std::string::npos || (arg.size() > 5 && arg.substr(arg.size() - 5) == ".gguf");
    if (is_file(arg) || path_like) return arg;
    throw std::runtime_error("model '" + arg + "' is not a file: obcache-cli takes the path of a GGUF file; for a registry "
                             "name use python -m pyobcache -m NAME, or obcache-cli -m \"$(python -m pyobcache fetch NAME "
                             "--print-path)\"");
}

template <typename T> T parse_num(const std::string & flag, const char * v) {
    std::istringstream is(v);
    T x;
    if (!(is >> x) || !is.eof()) throw std::invalid_argument("bad value '" + std::string(v) + "' for " + flag);
    return x;
}

// The KV option a --kv-* flag sets, or nullptr for an unknown flag.
const char * kv_flag_key(const std::string & flag) {
    static const std::pair<const char *, const char *> flags[] = {
        {"--kv-method", "method"}, {"--kv-budget", "budget"}, {"--kv-ratio", "ratio"}, {"--kv-recent", "n_recent"},
        {"--kv-sink", "n_sink"}, {"--kv-window", "window"}, {"--kv-evict", "evict"}, {"--kv-pooling", "pooling"},
        {"--kv-group-pool", "group_pool"}, {"--kv-gqa", "gqa"}, {"--kv-head-budget", "head_budget"},
        {"--kv-slack", "slack"}, {"-ctk", "type_k"}, {"--cache-type-k", "type_k"}, {"-ctv", "type_v"},
        {"--cache-type-v", "type_v"}};
    for (const auto & [f, k] : flags)
        if (flag == f) return k;
    return nullptr;
}

bool parse_bool01(const std::string & flag, const char * v) {
    const std::string s = v;
    if (s == "1" || s == "on") return true;
    if (s == "0" || s == "off") return false;
    throw std::invalid_argument(flag + " takes 0 or 1, got '" + s + "'");
}

}  // namespace

int main(int argc, char ** argv) {
    std::string model_arg, prompt, prompt_file;
    obc::ContextParams cp;
    obc::ModelParams mp;
    obc::GenerateParams gp;
    obc::KVConfig kv;
    // --kv specs, then the --kv-* flags (which win), read by kv_config_from_options as Python's
    // KVConfig is.
    obc::KVOptions kv_opts, kv_flag_opts;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string a = argv[i];
            auto val = [&]() -> const char * {
                if (i + 1 >= argc) throw std::invalid_argument("missing value for " + a);
                return argv[++i];
            };
            if (a == "-h" || a == "--help") { usage(argv[0]); return 0; }
            else if (a == "--list-kv-methods") { for (auto & n : obc::kv_method_names()) std::printf("%s\n", n.c_str()); return 0; }
            else if (a == "-m" || a == "--model") model_arg = val();
            else if (a == "-p" || a == "--prompt") prompt = val();
            else if (a == "-f" || a == "--file") prompt_file = val();
            else if (a == "-n" || a == "--n-predict") {
                gp.max_new_tokens = parse_num<int32_t>(a, val());
                if (gp.max_new_tokens == -1) gp.max_new_tokens = INT32_MAX;   // the context then ends it
            }
            else if (a == "-c" || a == "--ctx-size") cp.n_ctx = parse_num<int32_t>(a, val());
            else if (a == "-b" || a == "--batch-size") cp.n_batch = parse_num<int32_t>(a, val());
            else if (a == "-t" || a == "--threads") cp.threads.n_threads = parse_num<int32_t>(a, val());
            else if (a == "--adaptive-threads") cp.threads.adaptive = parse_bool01(a, val());
            else if (a == "--poll") cp.threads.poll = parse_num<int32_t>(a, val());
            else if (a == "--prio") cp.threads.prio = parse_num<int32_t>(a, val());
            else if (a == "-C" || a == "--cpu-mask") cp.threads.cpu_mask = val();
            else if (a == "--cpu-strict") cp.threads.cpu_strict = parse_bool01(a, val());
            else if (a == "-ngl" || a == "--n-gpu-layers" || a == "--gpu-layers") mp.n_gpu_layers = parse_num<int32_t>(a, val());
            else if (a == "-fa" || a == "--flash-attn") {
                const std::string v = val();
                if (v != "on" && v != "off" && v != "auto" && v != "1" && v != "0")
                    throw std::invalid_argument("-fa takes on, off or auto");
                cp.flash_attn = v == "auto" ? -1 : (v == "on" || v == "1") ? 1 : 0;
            }
            else if (a == "--temp") gp.sampling.temperature = parse_num<float>(a, val());
            else if (a == "--top-k") gp.sampling.top_k = parse_num<int32_t>(a, val());
            else if (a == "--top-p") gp.sampling.top_p = parse_num<float>(a, val());
            else if (a == "--min-p") gp.sampling.min_p = parse_num<float>(a, val());
            else if (a == "--repeat-penalty") gp.sampling.repeat_penalty = parse_num<float>(a, val());
            else if (a == "--repeat-last-n") gp.sampling.repeat_last_n = parse_num<int32_t>(a, val());
            else if (a == "--seed") gp.sampling.seed = parse_num<uint64_t>(a, val());
            else if (a == "--stop") gp.stop.push_back(val());
            else if (a == "--ignore-eos") gp.ignore_eos = true;
            else if (a == "--kv") for (auto & o : obc::parse_kv_spec(val())) kv_opts.push_back(o);
            else if (kv_flag_key(a)) kv_flag_opts.emplace_back(kv_flag_key(a), val());
            else throw std::invalid_argument("unknown argument '" + a + "' (see --help)");
        }
        if (model_arg.empty()) { usage(argv[0]); return 2; }
        if (!prompt_file.empty()) {
            std::ifstream f(prompt_file, std::ios::binary);
            if (!f) throw std::runtime_error("cannot read prompt file '" + prompt_file + "'");
            std::ostringstream os;
            os << f.rdbuf();
            prompt = os.str();
        }
        if (prompt.empty()) throw std::invalid_argument("give a prompt with -p or -f");

        kv_opts.insert(kv_opts.end(), kv_flag_opts.begin(), kv_flag_opts.end());
        // No method named: the full cache, or the default method when a budget or ratio is given.
        auto given = [&](const char * key) {
            for (const auto & o : kv_opts)
                if (o.first == key) return true;
            return false;
        };
        if (!given("method"))
            kv_opts.insert(kv_opts.begin(), {"method", given("budget") || given("ratio") ? obc::kDefaultKVMethod : "full"});
        kv = obc::kv_config_from_options(kv_opts);
        obc::check_thread_params(cp.threads);

        const std::string path = resolve_model(model_arg);
        auto model = obc::Model::load(path, mp);
        std::fprintf(stderr, "model: %s\n", model->describe().c_str());
        if (const std::string w = model->context_warning(cp.n_ctx); !w.empty()) std::fprintf(stderr, "warning: %s\n", w.c_str());
        if (mp.n_gpu_layers > 0 && model->gpu_layers() == 0)
            std::fprintf(stderr, "note: this ggml has no GPU backend; running on the CPU\n");
        obc::Request req(*model, cp, kv, obc::Request::tokenize(*model, prompt), gp);
        obc::Context & ctx = req.context();
        std::fprintf(stderr, "kv: %s, %d threads, %s attention\n", obc::describe(kv).c_str(), ctx.n_threads(),
                     ctx.flash_attn() ? "flash" : "mul_mat");

        struct sigaction sa {};
        sa.sa_handler = on_sigint;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, nullptr);
        ctx.set_abort_callback(cli_abort, nullptr);

        std::fwrite(prompt.data(), 1, prompt.size(), stdout);
        std::fflush(stdout);
        if (req.report().prompt_tokens >= obc::kCliProgressMinTokens) {
            // A long prefill takes minutes on a laptop: say how far it is, on a line of its own.
            std::fprintf(stderr, "\n");
            const bool tty = isatty(fileno(stderr));
            const auto t0 = std::chrono::steady_clock::now();
            ctx.set_progress_callback([tty, t0](int32_t done, int32_t total) {
                const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                std::fprintf(stderr, "%sprompt: %d/%d tokens (%.0f%%), %.1f tokens/s%s", tty ? "\r" : "", done, total,
                             100.0 * done / total, s > 0 ? done / s : 0.0, tty && done < total ? "" : "\n");
                std::fflush(stderr);
            });
        }
        std::string piece;
        try {
            while (!g_interrupted && req.next(piece)) {
                std::fwrite(piece.data(), 1, piece.size(), stdout);
                std::fflush(stdout);
            }
        } catch (const obc::Interrupted &) {
            // the prefill or the token in flight was dropped; what was printed stays
        }
        std::printf("\n");
        std::fflush(stdout);
        const obc::RequestReport r = req.report();
        const obc::EvictionStats & st = r.kv;
        const auto & t = ctx.timings;
        std::fprintf(stderr, "\nprompt: %lld tokens in %.1f ms (%.2f tokens/s)\n", (long long) t.prompt_tokens, r.prompt_ms,
                     r.prompt_ms > 0 ? 1000.0 * t.prompt_tokens / r.prompt_ms : 0.0);
        std::fprintf(stderr, "generation: %lld tokens in %.1f ms (%.2f tokens/s), finished by %s\n",
                     (long long) r.generated_tokens, r.gen_ms, r.gen_ms > 0 ? 1000.0 * t.gen_tokens / r.gen_ms : 0.0,
                     r.finish_reason.empty() || r.finish_reason == "interrupt" ? "interrupt"
                     : r.finish_reason == "context" ? "a full context (-c)" : r.finish_reason.c_str());
        std::fprintf(stderr, "kv cache: %.2f MiB allocated, %.2f MiB used (full cache would use %.2f MiB)",
                     st.kv_bytes_allocated / 1048576.0, st.kv_bytes_used / 1048576.0, st.kv_bytes_full / 1048576.0);
        if (kv.enabled())
            std::fprintf(stderr, "; %lld evictions, scoring %.1f ms, compaction %.1f ms", (long long) st.evictions,
                         st.score_ms, st.compact_ms);
        std::fprintf(stderr, "\n");
        if (g_interrupted) {
            std::fprintf(stderr, "interrupted by the user (Ctrl-C)\n");
            return 130;
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
