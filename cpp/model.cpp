#include "model.h"

#include <ggml-alloc.h>
#include <ggml-cpu.h>
#include <gguf.h>

#include "obc_ops.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <map>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>

namespace obc {

namespace {

// The text of s with every byte that is not part of valid UTF-8 written as \xNN: file strings go
// into error messages, and Python turns a message into str (a stray byte there would raise
// UnicodeDecodeError instead of the loader's error).
std::string printable(const std::string & s) {
    std::string out;
    size_t i = 0;
    while (i < s.size()) {
        const unsigned char c = (unsigned char) s[i];
        const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        bool ok = len > 0 && i + len <= s.size() && !(c == 0xC0 || c == 0xC1 || c > 0xF4);
        for (size_t k = 1; ok && k < len; ++k) ok = ((unsigned char) s[i + k] & 0xC0) == 0x80;
        if (ok && len == 3) {   // no overlong forms, no UTF-16 surrogates
            const unsigned char d = (unsigned char) s[i + 1];
            ok = !(c == 0xE0 && d < 0xA0) && !(c == 0xED && d >= 0xA0);
        } else if (ok && len == 4) {
            const unsigned char d = (unsigned char) s[i + 1];
            ok = !(c == 0xF0 && d < 0x90) && !(c == 0xF4 && d >= 0x90);
        }
        if (ok) {
            out.append(s, i, len);
            i += len;
        } else {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\x%02X", c);
            out += buf;
            i += 1;
        }
    }
    return out;
}

[[noreturn]] void fail(const std::string & path, const std::string & what) {
    throw std::runtime_error("cannot load model '" + printable(path) + "': " + printable(what));
}

int64_t find_key(const gguf_context * g, const std::string & key) {
    return gguf_find_key(g, key.c_str());
}

// An integer of any GGUF integer type, checked to lie in [lo, hi]: the graph and the allocations
// take these as int32, and a value cast down unchecked (2^31 wrapped negative) crashed ggml later.
int64_t get_int(const gguf_context * g, const std::string & key, const std::string & path, bool required, int64_t def,
                int64_t lo, int64_t hi) {
    const int64_t id = find_key(g, key);
    int64_t v = def;
    if (id < 0) {
        if (required) fail(path, "missing metadata key '" + key + "'");
    } else {
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_UINT8:  v = gguf_get_val_u8(g, id); break;
            case GGUF_TYPE_INT8:   v = gguf_get_val_i8(g, id); break;
            case GGUF_TYPE_UINT16: v = gguf_get_val_u16(g, id); break;
            case GGUF_TYPE_INT16:  v = gguf_get_val_i16(g, id); break;
            case GGUF_TYPE_UINT32: v = gguf_get_val_u32(g, id); break;
            case GGUF_TYPE_INT32:  v = gguf_get_val_i32(g, id); break;
            case GGUF_TYPE_INT64:  v = gguf_get_val_i64(g, id); break;
            case GGUF_TYPE_UINT64: {
                const uint64_t u = gguf_get_val_u64(g, id);
                v = u > (uint64_t) INT64_MAX ? INT64_MAX : (int64_t) u;
                break;
            }
            case GGUF_TYPE_ARRAY: fail(path, "metadata key '" + key + "' is a per-layer array, which is not supported");
            default: fail(path, "metadata key '" + key + "' has type " + gguf_type_name(gguf_get_kv_type(g, id)) +
                                ", expected an integer");
        }
    }
    if (v < lo || v > hi)
        fail(path, "metadata key '" + key + "' = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "]");
    return v;
}

// A float (F32 or F64 in the file) that must be finite.
float get_float(const gguf_context * g, const std::string & key, const std::string & path, float def) {
    const int64_t id = find_key(g, key);
    if (id < 0) return def;
    double v;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: v = gguf_get_val_f32(g, id); break;
        case GGUF_TYPE_FLOAT64: v = gguf_get_val_f64(g, id); break;
        default: fail(path, "metadata key '" + key + "' has type " + gguf_type_name(gguf_get_kv_type(g, id)) +
                            ", expected a float");
    }
    if (!std::isfinite(v) || std::fabs(v) > 3.0e38) fail(path, "metadata key '" + key + "' = " + std::to_string(v) + " is not a finite float");
    return (float) v;
}

// A string value ("" when absent). GGUF strings are UTF-8; these reach Python as str.
std::string get_str(const gguf_context * g, const std::string & key, const std::string & path) {
    const int64_t id = find_key(g, key);
    if (id < 0) return "";
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING)
        fail(path, "metadata key '" + key + "' has type " + gguf_type_name(gguf_get_kv_type(g, id)) + ", expected a string");
    std::string v = gguf_get_val_str(g, id);
    if (printable(v) != v) fail(path, "metadata key '" + key + "' is not valid UTF-8");
    return v;
}

// For each weight that only feeds mul_mat: the first CPU extra buffer type that can run that
// mul_mat, else the plain host buffer type. Types that obc_mul_mat multiplies with its own kernel on
// this machine stay plain: for Q4_K its kernel prefills Qwen2.5-1.5B 13% faster than ggml's
// repacked GEMM and decodes within 3% of the repacked GEMV (bench/results/speed_qwen25coder_avx2_obc_matmul_*).
std::vector<ggml_backend_buffer_type_t> weight_buffer_types(const std::vector<ggml_tensor *> & weights) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_buffer_type_t host = ggml_backend_dev_buffer_type(dev);
    std::vector<ggml_backend_buffer_type_t> out(weights.size(), host);
    if (std::getenv("PYOBCACHE_NO_REPACK")) return out;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return out;
    std::vector<ggml_backend_buffer_type_t> extra;
    for (ggml_backend_buffer_type_t * p = get_extra(dev); p && *p; ++p) extra.push_back(*p);
    if (extra.empty()) return out;

    ggml_init_params ip{};
    ip.mem_size = ggml_tensor_overhead() * 4;
    ip.no_alloc = true;
    for (size_t i = 0; i < weights.size(); ++i) {
        if (obc_mul_mat_has_kernel(weights[i]->type)) continue;
        for (ggml_backend_buffer_type_t bt : extra) {
            ggml_context * c = ggml_init(ip);
            ggml_tensor * w = ggml_dup_tensor(c, weights[i]);
            ggml_tensor * x = ggml_new_tensor_2d(c, GGML_TYPE_F32, w->ne[0], 512);
            ggml_tensor * op = ggml_mul_mat(c, w, x);
            ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(bt, 0);
            w->buffer = dummy;
            const bool ok = ggml_backend_dev_supports_op(dev, op);
            w->buffer = nullptr;
            ggml_backend_buffer_free(dummy);
            ggml_free(c);
            if (ok) {
                out[i] = bt;
                break;
            }
        }
    }
    return out;
}

// ggml logs each repacked tensor at INFO level; keep warnings and errors unless asked.
void quiet_ggml_logs() {
    static bool done = false;
    if (done) return;
    done = true;
    if (std::getenv("PYOBCACHE_VERBOSE")) return;
    ggml_log_set([](ggml_log_level level, const char * text, void *) {
        if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
    }, nullptr);
}

}  // namespace

Model::~Model() {
    for (auto * b : buffers_) ggml_backend_buffer_free(b);
    for (auto * c : ctx_weights_) ggml_free(c);
    if (gguf_) gguf_free(gguf_);
    if (ctx_meta_) ggml_free(ctx_meta_);
}

std::unique_ptr<Model> Model::load(const std::string & path, const ModelParams & params) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) fail(path, std::string("file not found (") + std::strerror(errno) + ")");
    if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
    {
        std::ifstream f(path, std::ios::binary);
        char magic[4] = {0, 0, 0, 0};
        f.read(magic, 4);
        if (!f || std::memcmp(magic, "GGUF", 4) != 0) fail(path, "not a GGUF file (bad magic)");
    }

    quiet_ggml_logs();
    std::unique_ptr<Model> m(new Model());
    m->path = path;
    gguf_init_params gp{};
    gp.no_alloc = true;
    gp.ctx = &m->ctx_meta_;
    m->gguf_ = gguf_init_from_file(path.c_str(), gp);
    if (!m->gguf_) fail(path, "corrupt or truncated GGUF header/metadata");
    const gguf_context * g = m->gguf_;

    // Architecture and hyper-parameters. The bounds are what the graph, ggml's ops and the int32
    // arithmetic of the engine accept; the tensors' shapes then tie most of them to the file.
    HParams & hp = m->hp;
    hp.arch_name = get_str(g, "general.architecture", path);
    if (hp.arch_name == "llama") hp.arch = Arch::llama;
    else if (hp.arch_name == "qwen2") hp.arch = Arch::qwen2;
    else if (hp.arch_name == "qwen3") hp.arch = Arch::qwen3;
    else fail(path, "unsupported architecture '" + hp.arch_name + "' (supported: llama, qwen2, qwen3)");
    const std::string a = hp.arch_name + ".";
    constexpr int64_t kMaxCtx = 1 << 30;
    hp.n_ctx_train = (int32_t) get_int(g, a + "context_length", path, true, 0, 1, kMaxCtx);
    hp.n_embd = (int32_t) get_int(g, a + "embedding_length", path, true, 0, 1, 1 << 17);
    hp.n_layer = (int32_t) get_int(g, a + "block_count", path, true, 0, 1, 4096);
    hp.n_ff = (int32_t) get_int(g, a + "feed_forward_length", path, true, 0, 1, 1 << 20);
    hp.n_head = (int32_t) get_int(g, a + "attention.head_count", path, true, 0, 1, 4096);
    hp.n_head_kv = (int32_t) get_int(g, a + "attention.head_count_kv", path, false, hp.n_head, 1, hp.n_head);
    if (hp.n_head % hp.n_head_kv != 0)
        fail(path, "invalid head counts " + std::to_string(hp.n_head) + "/" + std::to_string(hp.n_head_kv) +
                       " (attention.head_count must be a multiple of attention.head_count_kv)");
    // head_dim 1024 is 4x the largest in use; the eviction ops and rope need it small and positive.
    hp.head_dim = (int32_t) get_int(g, a + "attention.key_length", path, false, hp.n_embd / hp.n_head, 1, 1024);
    const int32_t v_dim = (int32_t) get_int(g, a + "attention.value_length", path, false, hp.head_dim, 1, 1024);
    if (v_dim != hp.head_dim) fail(path, "key and value head sizes differ, which is not supported");
    hp.n_rot = (int32_t) get_int(g, a + "rope.dimension_count", path, false, hp.head_dim, 2, hp.head_dim);
    if (hp.n_rot % 2 != 0) fail(path, "metadata key '" + a + "rope.dimension_count' = " + std::to_string(hp.n_rot) + " is odd (rope rotates pairs)");
    hp.rms_eps = get_float(g, a + "attention.layer_norm_rms_epsilon", path, 1e-5f);
    if (!(hp.rms_eps > 0.0f && hp.rms_eps <= 1.0f))
        fail(path, "metadata key '" + a + "attention.layer_norm_rms_epsilon' = " + std::to_string(hp.rms_eps) + " is not in (0, 1]");
    hp.rope_freq_base = get_float(g, a + "rope.freq_base", path, 10000.0f);
    if (!(hp.rope_freq_base > 0.0f)) fail(path, "metadata key '" + a + "rope.freq_base' must be positive");
    const std::string scaling = get_str(g, a + "rope.scaling.type", path);
    const float factor = get_float(g, a + "rope.scaling.factor", path, 0.0f);
    if (scaling == "linear" && factor > 0.0f) hp.rope_freq_scale = 1.0f / factor;
    else if (!scaling.empty() && scaling != "none" && scaling != "linear" && scaling != "llama3")
        fail(path, "unsupported rope scaling type '" + scaling + "'");
    if (!std::isfinite(hp.rope_freq_scale) || hp.rope_freq_scale <= 0.0f) fail(path, "metadata key '" + a + "rope.scaling.factor' is out of range");
    hp.n_ctx_orig = (int32_t) get_int(g, a + "rope.scaling.original_context_length", path, false, hp.n_ctx_train, 1, kMaxCtx);
    hp.rope_mode = hp.arch == Arch::llama ? GGML_ROPE_TYPE_NORMAL : GGML_ROPE_TYPE_NEOX;
    m->name = get_str(g, "general.name", path);
    m->chat_template = get_str(g, "tokenizer.chat_template", path);

    try {
        m->vocab = Vocab::from_gguf(g);
    } catch (const std::exception & e) {
        fail(path, e.what());
    }
    hp.n_vocab = m->vocab.n_tokens();

    // Tensors: every one must be present with the expected shape and a type the ops reading it
    // support, and the file must hold its data.
    const size_t data_offset = gguf_get_data_offset(g);
    const int64_t n_tensors = gguf_get_n_tensors(g);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const size_t off = gguf_get_tensor_offset(g, i), size = gguf_get_tensor_size(g, i);
        if (off > (size_t) st.st_size || size > (size_t) st.st_size || data_offset + off + size > (size_t) st.st_size)
            fail(path, std::string("truncated file: tensor '") + gguf_get_tensor_name(g, i) + "' ends at byte " +
                           std::to_string(data_offset + off + size) + " but the file has " + std::to_string(st.st_size));
    }
    // Each block has at least 9 tensors: a block_count the file cannot hold is refused before
    // the per-layer tables are sized by it.
    if ((int64_t) hp.n_layer * 9 > n_tensors)
        fail(path, "metadata key '" + a + "block_count' = " + std::to_string(hp.n_layer) + " but the file has only " +
                       std::to_string(n_tensors) + " tensors");
    // What reads each tensor: a matrix multiply (and get_rows for the token embedding), or an
    // element-wise op (norm weights, biases, rope factors), which ggml's CPU kernels run on F32 only.
    enum class Use { matmul, embedding, f32 };
    auto type_ok = [](ggml_type t, Use use) {
        if (use == Use::f32) return t == GGML_TYPE_F32;
        if (t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16) return true;
        if (!ggml_is_quantized(t)) return false;   // I8/I16/I32/I64/F64: no mul_mat kernel
        const ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(t);
        const bool matmul = tc && tc->vec_dot && ggml_get_type_traits_cpu(tc->vec_dot_type)->from_float;
        return matmul && (use != Use::embedding || ggml_get_type_traits(t)->to_float);
    };
    auto get = [&](const std::string & name, std::initializer_list<int64_t> shape, bool required, Use use) -> ggml_tensor * {
        ggml_tensor * t = ggml_get_tensor(m->ctx_meta_, name.c_str());
        if (!t) {
            if (required) fail(path, "missing tensor '" + name + "'");
            return nullptr;
        }
        int d = 0;
        for (int64_t n : shape) {
            if (t->ne[d] != n) {
                std::ostringstream os;
                os << "tensor '" << name << "' has shape [" << t->ne[0] << ", " << t->ne[1] << ", " << t->ne[2]
                   << "] but the metadata implies dimension " << d << " = " << n;
                fail(path, os.str());
            }
            ++d;
        }
        for (; d < GGML_MAX_DIMS; ++d)
            if (t->ne[d] != 1)
                fail(path, "tensor '" + name + "' has " + std::to_string(d + 1) + " dimensions, expected " +
                               std::to_string(shape.size()));
        if (!type_ok(t->type, use))
            fail(path, "tensor '" + name + "' has type " + ggml_type_name(t->type) + ", which " +
                           (use == Use::f32 ? "must be F32" : "no matrix multiply kernel reads"));
        return t;
    };
    const int64_t E = hp.n_embd, Q = (int64_t) hp.head_dim * hp.n_head, KV = (int64_t) hp.head_dim * hp.n_head_kv;
    m->tok_embd = get("token_embd.weight", {E, hp.n_vocab}, true, Use::embedding);
    m->output_norm = get("output_norm.weight", {E}, true, Use::f32);
    m->output = get("output.weight", {E, hp.n_vocab}, false, Use::matmul);
    if (!m->output) m->output = m->tok_embd;
    m->rope_freqs = get("rope_freqs.weight", {hp.n_rot / 2}, false, Use::f32);
    const bool biases = hp.arch == Arch::qwen2, qk_norm = hp.arch == Arch::qwen3;
    m->layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        Layer & L = m->layers[il];
        L.attn_norm = get(p + "attn_norm.weight", {E}, true, Use::f32);
        L.wq = get(p + "attn_q.weight", {E, Q}, true, Use::matmul);
        L.wk = get(p + "attn_k.weight", {E, KV}, true, Use::matmul);
        L.wv = get(p + "attn_v.weight", {E, KV}, true, Use::matmul);
        L.wo = get(p + "attn_output.weight", {Q, E}, true, Use::matmul);
        L.bq = get(p + "attn_q.bias", {Q}, biases, Use::f32);
        L.bk = get(p + "attn_k.bias", {KV}, biases, Use::f32);
        L.bv = get(p + "attn_v.bias", {KV}, biases, Use::f32);
        L.bo = get(p + "attn_output.bias", {E}, false, Use::f32);
        L.q_norm = get(p + "attn_q_norm.weight", {hp.head_dim}, qk_norm, Use::f32);
        L.k_norm = get(p + "attn_k_norm.weight", {hp.head_dim}, qk_norm, Use::f32);
        L.ffn_norm = get(p + "ffn_norm.weight", {E}, true, Use::f32);
        L.ffn_gate = get(p + "ffn_gate.weight", {E, hp.n_ff}, true, Use::matmul);
        L.ffn_up = get(p + "ffn_up.weight", {E, hp.n_ff}, true, Use::matmul);
        L.ffn_down = get(p + "ffn_down.weight", {hp.n_ff, E}, true, Use::matmul);
    }

    // Weights into backend buffers, then the bytes from the file. Matrices that only feed
    // mul_mat go to the CPU's extra buffer types (repacked layouts with faster GEMM kernels)
    // when one accepts them, as llama.cpp does; everything else stays in a plain host buffer.
    // Offloaded layers go whole to the GPU (as llama.cpp's -ngl does, counting from the last
    // layer); the token embedding stays on the host, where get_rows reads it.
    std::map<const ggml_tensor *, ggml_backend_buffer_type_t> on_gpu;
    if (params.n_gpu_layers > 0) {
        if (ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)) {
            m->gpu_dev_ = gpu;
            ggml_backend_buffer_type_t gbt = ggml_backend_dev_buffer_type(gpu);
            m->gpu_layers_ = std::min(params.n_gpu_layers, hp.n_layer);
            for (int il = hp.n_layer - m->gpu_layers_; il < hp.n_layer; ++il) {
                for (ggml_tensor ** t : m->layers[il].slots())
                    if (*t) on_gpu[*t] = gbt;
            }
            if (params.n_gpu_layers > hp.n_layer) {
                on_gpu[m->output_norm] = gbt;
                if (m->output != m->tok_embd) on_gpu[m->output] = gbt;
            }
            if (m->rope_freqs) on_gpu[m->rope_freqs] = gbt;
        }
    }
    std::vector<ggml_tensor *> matmul_only;
    for (const Layer & L : m->layers)
        for (ggml_tensor * t : {L.wq, L.wk, L.wv, L.wo, L.ffn_gate, L.ffn_up, L.ffn_down})
            if (!on_gpu.count(t)) matmul_only.push_back(t);
    if (m->output != m->tok_embd && !on_gpu.count(m->output)) matmul_only.push_back(m->output);
    const std::vector<ggml_backend_buffer_type_t> bufts = weight_buffer_types(matmul_only);

    // One context per buffer type; the Model's tensor pointers move to the allocated copies.
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctxs;
    std::map<const ggml_tensor *, ggml_tensor *> moved;
    ggml_backend_buffer_type_t host = ggml_backend_cpu_buffer_type();
    std::map<const ggml_tensor *, ggml_backend_buffer_type_t> where;
    for (size_t i = 0; i < matmul_only.size(); ++i) where[matmul_only[i]] = bufts[i];
    where.insert(on_gpu.begin(), on_gpu.end());
    for (int64_t i = 0; i < n_tensors; ++i) {
        ggml_tensor * t = ggml_get_tensor(m->ctx_meta_, gguf_get_tensor_name(g, i));
        auto it = where.find(t);
        ggml_backend_buffer_type_t bt = it == where.end() ? host : it->second;
        ggml_context *& c = ctxs[bt];
        if (!c) {
            ggml_init_params ip{};
            ip.mem_size = ggml_tensor_overhead() * (size_t) (n_tensors + 1);
            ip.no_alloc = true;
            c = ggml_init(ip);
            m->ctx_weights_.push_back(c);
        }
        ggml_tensor * d = ggml_dup_tensor(c, t);
        ggml_set_name(d, t->name);
        moved[t] = d;
    }
    auto mv = [&](ggml_tensor *& t) { if (t) t = moved.at(t); };
    mv(m->tok_embd); mv(m->output_norm); mv(m->output); mv(m->rope_freqs);
    for (Layer & L : m->layers)
        for (ggml_tensor ** t : L.slots()) mv(*t);
    for (auto & [bt, c] : ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, bt);
        if (!buf) fail(path, std::string("out of memory allocating the weights (") + ggml_backend_buft_name(bt) + ")");
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        m->buffers_.push_back(buf);
    }

    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
    std::vector<uint8_t> staging;
    for (int64_t i = 0; i < n_tensors; ++i) {
        ggml_tensor * t = moved.at(ggml_get_tensor(m->ctx_meta_, gguf_get_tensor_name(g, i)));
        const size_t n = gguf_get_tensor_size(g, i);
        if (ggml_nbytes(t) != n) { std::fclose(f); fail(path, std::string("size mismatch for tensor ") + t->name); }
        if (std::fseek(f, (long) (data_offset + gguf_get_tensor_offset(g, i)), SEEK_SET) != 0) {
            std::fclose(f);
            fail(path, "seek failed");
        }
        if (ggml_backend_buffer_get_type(t->buffer) == host) {
            if (std::fread(t->data, 1, n, f) != n) { std::fclose(f); fail(path, "short read"); }
        } else {
            // Non-plain buffers (repacking, device memory) transform the bytes on set.
            staging.resize(n);
            if (std::fread(staging.data(), 1, n, f) != n) { std::fclose(f); fail(path, "short read"); }
            ggml_backend_tensor_set(t, staging.data(), 0, n);
        }
    }
    std::fclose(f);
    return m;
}

size_t Model::weight_bytes() const {
    size_t n = 0;
    for (auto * b : buffers_) n += ggml_backend_buffer_get_size(b);
    return n;
}

// A float in the shortest form that reads back the same (std::to_string drops 1e-7 to "0.000000").
static std::string format_g(double x, int digits) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.*g", digits, x);
    return buf;
}

bool Model::meta_value(const std::string & key, std::string & out) const {
    const int64_t id = gguf_ ? gguf_find_key(gguf_, key.c_str()) : -1;
    if (id < 0) return false;
    switch (gguf_get_kv_type(gguf_, id)) {
        case GGUF_TYPE_STRING: out = gguf_get_val_str(gguf_, id); return true;
        case GGUF_TYPE_UINT8: out = std::to_string(gguf_get_val_u8(gguf_, id)); return true;
        case GGUF_TYPE_INT8: out = std::to_string(gguf_get_val_i8(gguf_, id)); return true;
        case GGUF_TYPE_UINT16: out = std::to_string(gguf_get_val_u16(gguf_, id)); return true;
        case GGUF_TYPE_INT16: out = std::to_string(gguf_get_val_i16(gguf_, id)); return true;
        case GGUF_TYPE_UINT32: out = std::to_string(gguf_get_val_u32(gguf_, id)); return true;
        case GGUF_TYPE_INT32: out = std::to_string(gguf_get_val_i32(gguf_, id)); return true;
        case GGUF_TYPE_UINT64: out = std::to_string(gguf_get_val_u64(gguf_, id)); return true;
        case GGUF_TYPE_INT64: out = std::to_string(gguf_get_val_i64(gguf_, id)); return true;
        case GGUF_TYPE_FLOAT32: out = format_g(gguf_get_val_f32(gguf_, id), 9); return true;
        case GGUF_TYPE_FLOAT64: out = format_g(gguf_get_val_f64(gguf_, id), 17); return true;
        case GGUF_TYPE_BOOL: out = gguf_get_val_bool(gguf_, id) ? "true" : "false"; return true;
        default: return false;   // arrays (the vocabulary's) have their own calls
    }
}

std::string Model::context_warning(int32_t n_ctx) const {
    if (hp.n_ctx_train <= 0 || n_ctx <= hp.n_ctx_train) return "";
    return "n_ctx=" + std::to_string(n_ctx) + " is more than the " + std::to_string(hp.n_ctx_train) +
           " positions the model was trained on: output past them may degrade";
}

std::string Model::describe() const {
    std::ostringstream os;
    os << (name.empty() ? path : name) << " (" << hp.arch_name << ", " << hp.n_layer << " layers, d=" << hp.n_embd
       << ", heads " << hp.n_head << "/" << hp.n_head_kv << ", head_dim " << hp.head_dim << ", vocab " << hp.n_vocab
       << ", " << (weight_bytes() / (1024.0 * 1024.0)) << " MiB";
    if (gpu_layers_ > 0) os << ", " << gpu_layers_ << " layers on " << ggml_backend_dev_name(gpu_dev_);
    os << ")";
    return os.str();
}

}  // namespace obc
