#include "kv_cache.h"

#include <ggml-cpu.h>

#include <ggml-alloc.h>
#include <ggml-backend.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace obc {

const std::vector<ggml_type> & kv_cache_types() {
    static const std::vector<ggml_type> types = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16,
                                                 GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1,
                                                 GGML_TYPE_IQ4_NL, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1};
    return types;
}

ggml_type parse_kv_cache_type(const std::string & key, const std::string & name) {
    std::string names;
    for (ggml_type t : kv_cache_types()) {
        if (name == ggml_type_name(t)) return t;
        names += (names.empty() ? "" : ", ") + std::string(ggml_type_name(t));
    }
    throw std::invalid_argument(key + " must be one of " + names + ", not '" + name + "'");
}

void kv_row_to_float(ggml_type t, const void * row, float * out, int64_t n) {
    if (t == GGML_TYPE_F32) std::memcpy(out, row, (size_t) n * sizeof(float));   // f32 has no to_float trait
    else ggml_get_type_traits(t)->to_float(row, out, n);
}

namespace {
void check_cache_type(const char * key, ggml_type t, int32_t head_dim) {
    if (std::find(kv_cache_types().begin(), kv_cache_types().end(), t) == kv_cache_types().end())
        throw std::invalid_argument(std::string(key) + ": type " + std::to_string((int) t) + " is not a KV cache type");
    if (head_dim % ggml_blck_size(t) != 0)
        throw std::invalid_argument(std::string(key) + "=" + ggml_type_name(t) + " stores blocks of " +
                                    std::to_string(ggml_blck_size(t)) + " values, and this model's head_dim " +
                                    std::to_string(head_dim) + " is not a multiple of that");
}

// The orthonormal Sylvester-Hadamard matrix of the largest power of two b dividing n, repeated
// along the diagonal of an n x n matrix: H_2b = [[H_b, H_b], [H_b, -H_b]] / sqrt(2), symmetric.
std::vector<float> block_hadamard(int32_t n) {
    int32_t b = 1;
    while (n % (2 * b) == 0) b *= 2;
    std::vector<float> m((size_t) n * n, 0.0f);
    const float scale = 1.0f / std::sqrt((float) b);
    for (int32_t base = 0; base < n; base += b)
        for (int32_t i = 0; i < b; ++i)
            for (int32_t j = 0; j < b; ++j)   // sign (-1)^popcount(i & j)
                m[(size_t) (base + i) * n + base + j] = __builtin_parity((unsigned) (i & j)) ? -scale : scale;
    return m;
}
}  // namespace

KVCache::KVCache(const HParams & hp, int32_t capacity, bool v_trans, ggml_backend_t backend, bool with_scores,
                 int32_t n_heads, ggml_type type_k, ggml_type type_v)
    : capacity_(capacity), n_head_kv_(n_heads > 0 ? n_heads : hp.n_head_kv), n_head_kv_model_(hp.n_head_kv),
      head_dim_(hp.head_dim), v_trans_(v_trans),
      backend_(backend) {
    if (n_head_kv_ != hp.n_head_kv && n_head_kv_ != hp.n_head)
        throw std::invalid_argument("a KV cache has n_head_kv or n_head heads");
    if (capacity <= 0) throw std::invalid_argument("KV cache capacity must be positive");
    check_cache_type("type_k", type_k, head_dim_);
    check_cache_type("type_v", type_v, head_dim_);
    if (v_trans && kv_type_needs_flash_attn(type_v))
        throw std::invalid_argument(std::string("type_v=") + ggml_type_name(type_v) +
                                    " needs flash attention (flash_attn=0 was asked): a quantized V is stored by "
                                    "token rows, which only ggml_flash_attn_ext reads");
    ggml_init_params ip{};
    ip.mem_size = ggml_tensor_overhead() * (2 * (size_t) hp.n_layer + 4);
    ip.no_alloc = true;
    ctx_ = ggml_init(ip);
    ctx_s_ = ggml_init(ip);
    for (int il = 0; il < hp.n_layer; ++il) {
        ggml_tensor * k = ggml_new_tensor_3d(ctx_, type_k, head_dim_, capacity_, n_head_kv_);
        ggml_tensor * v = v_trans_ ? ggml_new_tensor_3d(ctx_, type_v, capacity_, head_dim_, n_head_kv_)
                                   : ggml_new_tensor_3d(ctx_, type_v, head_dim_, capacity_, n_head_kv_);
        ggml_format_name(k, "cache_k_l%d", il);
        ggml_format_name(v, "cache_v_l%d", il);
        k_.push_back(k);
        v_.push_back(v);
        if (with_scores) {
            ggml_tensor * sc = ggml_new_tensor_2d(ctx_s_, GGML_TYPE_F32, capacity_, n_head_kv_);
            ggml_format_name(sc, "cache_scores_l%d", il);
            s_.push_back(sc);
        }
    }
    buf_ = ggml_backend_alloc_ctx_tensors(ctx_, backend_);
    if (with_scores && buf_)
        buf_s_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_s_, ggml_backend_cpu_buffer_type());
    if (!buf_ || (with_scores && !buf_s_)) {
        release();
        throw std::runtime_error("out of memory allocating a KV cache of " + std::to_string(capacity) + " tokens");
    }
    runner_ = obc_runner_new(backend_);
    if (!runner_) {
        release();
        throw std::runtime_error("out of memory creating the KV cache's op runner");
    }
    // Zeroed so that masked-out slots never hold NaNs that 0 * NaN would spread.
    ggml_backend_buffer_clear(buf_, 0);
    if (buf_s_) ggml_backend_buffer_clear(buf_s_, 0);
    if (ggml_is_quantized(type_k)) {
        ggml_init_params rp{};
        rp.mem_size = 2 * ggml_tensor_overhead();
        rp.no_alloc = true;
        ctx_r_ = ggml_init(rp);
        k_rot_ = ggml_new_tensor_2d(ctx_r_, GGML_TYPE_F32, head_dim_, head_dim_);
        ggml_set_name(k_rot_, "cache_k_rotation");
        k_off_ = ggml_new_tensor_3d(ctx_r_, GGML_TYPE_F32, head_dim_, n_head_kv_, hp.n_layer);
        ggml_set_name(k_off_, "cache_k_offsets");
        buf_r_ = ggml_backend_alloc_ctx_tensors(ctx_r_, backend_);
        if (!buf_r_) {
            release();
            throw std::runtime_error("out of memory allocating the KV cache's K rotation and offsets");
        }
        const std::vector<float> r = block_hadamard(head_dim_);
        ggml_backend_tensor_set(k_rot_, r.data(), 0, r.size() * sizeof(float));
    }
    pos_.assign((size_t) hp.n_layer * n_head_kv_ * capacity_, 0);
}

KVCache::~KVCache() { release(); }

// Frees whatever has been allocated: the destructor, and a constructor that fails part-way (which
// runs no destructor).
void KVCache::release() {
    obc_runner_free(runner_);
    runner_ = nullptr;
    for (ggml_backend_buffer_t * b : {&buf_, &buf_s_, &buf_r_}) {
        if (*b) ggml_backend_buffer_free(*b);
        *b = nullptr;
    }
    for (ggml_context ** c : {&ctx_, &ctx_s_, &ctx_r_}) {
        if (*c) ggml_free(*c);
        *c = nullptr;
    }
    k_rot_ = nullptr;
    k_off_ = nullptr;
}

void KVCache::clear() {
    n_used_ = 0;
    n_past_ = 0;
    holes_ = false;
    k_off_host_.clear();
}

void KVCache::k_offsets_written() {
    if (!k_off_) return;
    k_off_host_.resize(ggml_nelements(k_off_));
    ggml_backend_tensor_get(k_off_, k_off_host_.data(), 0, ggml_nbytes(k_off_));
}

void KVCache::set_k_offsets(const std::vector<float> & c) {
    if (c.empty()) {
        k_off_host_.clear();
        return;
    }
    if (!k_off_ || c.size() != (size_t) ggml_nelements(k_off_))
        throw std::invalid_argument("the K offsets do not fit this cache (" + std::to_string(c.size()) + " values)");
    // A key an f16 cache could hold: beyond that a stranger's offset would overflow the scores.
    for (float x : c)
        if (!(std::fabs(x) <= 65504.0f)) throw std::invalid_argument("a K offset is not a finite number within f16's range");
    ggml_backend_tensor_set(k_off_, c.data(), 0, ggml_nbytes(k_off_));
    k_off_host_ = c;
}

int64_t KVCache::tokens_kept() const {
    if (!holes_) return (int64_t) n_used_ * n_layer() * n_head_kv_;
    int64_t n = 0;
    for (int il = 0; il < n_layer(); ++il)
        for (int h = 0; h < n_head_kv_; ++h) {
            const int32_t * p = pos(il, h);
            for (int32_t j = 0; j < n_used_; ++j) n += p[j] != kHolePos;
        }
    return n;
}

void KVCache::commit(int32_t n_tokens) {
    if (n_used_ + n_tokens > capacity_) throw std::logic_error("KV cache overflow");
    for (int il = 0; il < n_layer(); ++il)
        for (int h = 0; h < n_head_kv_; ++h) {
            int32_t * p = pos(il, h);
            for (int32_t t = 0; t < n_tokens; ++t) p[n_used_ + t] = n_past_ + t;
        }
    n_used_ += n_tokens;
    n_past_ += n_tokens;
}

void KVCache::compact(const std::vector<std::vector<std::vector<int32_t>>> & keep_in) {
    if ((int) keep_in.size() != n_layer()) throw std::invalid_argument("compact: one keep list per layer expected");
    size_t n_keep = 0;
    for (const auto & layer : keep_in) {
        if ((int) layer.size() != n_head_kv_) throw std::invalid_argument("compact: one keep list per KV head expected");
        for (const auto & idx : layer) {
            for (size_t i = 0; i < idx.size(); ++i)
                if (idx[i] < 0 || idx[i] >= n_used_ || (i > 0 && idx[i] <= idx[i - 1]))
                    throw std::invalid_argument("compact: kept slots must be strictly increasing and in use");
            n_keep = std::max(n_keep, idx.size());
        }
    }
    // A shorter list is padded with slots that stay where they are (idx[i] = i, a no-op move, and
    // every earlier move wrote below i); they become holes.
    std::vector<std::vector<std::vector<int32_t>>> padded;
    const std::vector<std::vector<std::vector<int32_t>>> * keep = &keep_in;
    bool holes = false;
    for (const auto & layer : keep_in)
        for (const auto & idx : layer) holes = holes || idx.size() != n_keep;
    if (holes) {
        padded = keep_in;
        for (auto & layer : padded)
            for (auto & idx : layer)
                for (size_t i = idx.size(); i < n_keep; ++i) idx.push_back((int32_t) i);
        keep = &padded;
    }

    for (int il = 0; il < n_layer(); ++il)
        for (int h = 0; h < n_head_kv_; ++h) {
            const std::vector<int32_t> & idx = (*keep)[il][h];
            const size_t n_real = keep_in[il][h].size();
            int32_t * p = pos(il, h);
            float * sc = s_.empty() ? nullptr : scores(il, h);
            // In place from the front: idx[i] >= i, so no source is overwritten before it is read.
            for (size_t i = 0; i < n_keep; ++i) {
                p[i] = i < n_real ? p[idx[i]] : kHolePos;
                if (sc) sc[i] = i < n_real ? sc[idx[i]] : 0.0f;
            }
            if (sc) std::fill(sc + n_keep, sc + capacity_, 0.0f);
        }
    // K and V of a layer move by the same lists, flattened to [head][n_keep].
    std::vector<std::vector<int32_t>> flat(n_layer());
    std::vector<ggml_tensor *> caches;
    std::vector<int32_t> axes;
    std::vector<const int32_t *> lists;
    for (int il = 0; il < n_layer(); ++il) {
        for (int h = 0; h < n_head_kv_; ++h) flat[il].insert(flat[il].end(), (*keep)[il][h].begin(), (*keep)[il][h].end());
        caches.insert(caches.end(), {k_[il], v_[il]});
        axes.insert(axes.end(), {1, v_trans_ ? 0 : 1});
        lists.insert(lists.end(), {flat[il].data(), flat[il].data()});
    }
    if (obc_runner_compact(runner_, caches.data(), axes.data(), lists.data(), (int32_t) caches.size(), (int64_t) n_keep,
                           n_head_kv_) != OBC_RUN_OK)
        throw std::runtime_error(obc_runner_error(runner_));
    n_used_ = (int32_t) n_keep;
    holes_ = holes_ || holes;
}

KVCache::Snapshot KVCache::snapshot() const {
    Snapshot s;
    for (int il = 0; il < n_layer(); ++il) {
        s.k.emplace_back(ggml_nbytes(k_[il]));
        s.v.emplace_back(ggml_nbytes(v_[il]));
        ggml_backend_tensor_get(k_[il], s.k.back().data(), 0, s.k.back().size());
        ggml_backend_tensor_get(v_[il], s.v.back().data(), 0, s.v.back().size());
    }
    s.pos = pos_;
    s.k_offsets = k_offsets_values();
    s.n_used = n_used_;
    s.n_past = n_past_;
    s.holes = holes_;
    return s;
}

void KVCache::restore(const Snapshot & s) {
    if ((int) s.k.size() != n_layer() || s.pos.size() != pos_.size() || s.k[0].size() != ggml_nbytes(k_[0]) ||
        s.v[0].size() != ggml_nbytes(v_[0]))
        throw std::invalid_argument("restore: the snapshot comes from a cache of another shape");
    for (int il = 0; il < n_layer(); ++il) {
        ggml_backend_tensor_set(k_[il], s.k[il].data(), 0, s.k[il].size());
        ggml_backend_tensor_set(v_[il], s.v[il].data(), 0, s.v[il].size());
    }
    set_k_offsets(s.k_offsets);
    pos_ = s.pos;
    n_used_ = s.n_used;
    n_past_ = s.n_past;
    holes_ = s.holes;
}

namespace {
// Copies the used rows of a cache tensor [hd, cap, H] (or transposed [cap, hd, H]) to or from
// rows [head][slot], whole rows of row_bytes; a transposed tensor moves element by element.
void copy_rows(bool to_rows, bool trans, const ggml_tensor * t, uint8_t * img, uint8_t * rows, size_t n, size_t row_bytes) {
    const size_t H = t->ne[2];
    for (size_t h = 0; h < H; ++h)
        for (size_t j = 0; j < n; ++j) {
            uint8_t * row = rows + (h * n + j) * row_bytes;
            if (!trans) {
                uint8_t * cell = img + h * t->nb[2] + j * t->nb[1];
                to_rows ? std::memcpy(row, cell, row_bytes) : std::memcpy(cell, row, row_bytes);
                continue;
            }
            const size_t es = t->nb[0], hd = t->ne[1];
            for (size_t d = 0; d < hd; ++d) {
                uint8_t * cell = img + h * t->nb[2] + d * t->nb[1] + j * es;
                to_rows ? std::memcpy(row + d * es, cell, es) : std::memcpy(cell, row + d * es, es);
            }
        }
}
}  // namespace

void KVCache::get_layer_rows(int il, std::vector<uint8_t> & k, std::vector<uint8_t> & v) const {
    const size_t n = n_used_;
    std::vector<uint8_t> tk(ggml_nbytes(k_[il])), tv(ggml_nbytes(v_[il]));
    ggml_backend_tensor_get(k_[il], tk.data(), 0, tk.size());
    ggml_backend_tensor_get(v_[il], tv.data(), 0, tv.size());
    k.resize(n_head_kv_ * n * k_row_bytes());
    v.resize(n_head_kv_ * n * v_row_bytes());
    copy_rows(true, false, k_[il], tk.data(), k.data(), n, k_row_bytes());
    copy_rows(true, v_trans_, v_[il], tv.data(), v.data(), n, v_row_bytes());
}

void KVCache::get_layer_values(int il, std::vector<float> & k, std::vector<float> & v) const {
    std::vector<uint8_t> kr, vr;
    get_layer_rows(il, kr, vr);
    const size_t rows = (size_t) n_head_kv_ * n_used_, hd = head_dim_;
    k.resize(rows * hd);
    v.resize(rows * hd);
    const float * c = k_offset_host(il);
    for (size_t r = 0; r < rows; ++r) {
        kv_row_to_float(type_k(), kr.data() + r * k_row_bytes(), k.data() + r * hd, head_dim_);
        kv_row_to_float(type_v(), vr.data() + r * v_row_bytes(), v.data() + r * hd, head_dim_);
        if (c)
            for (size_t d = 0; d < hd; ++d) k[r * hd + d] += c[(r / n_used_) * hd + d];   // row r = head * n_used + slot
    }
}

void KVCache::set_used(int32_t n_used, int32_t n_past, bool holes, const std::vector<int32_t> & pos_used) {
    if (n_used < 0 || n_used > capacity_ || n_past < n_used || pos_used.size() != (size_t) n_layer() * n_head_kv_ * n_used)
        throw std::invalid_argument("set_used: the state does not fit this cache");
    for (int il = 0; il < n_layer(); ++il)
        for (int h = 0; h < n_head_kv_; ++h)
            std::copy_n(pos_used.data() + ((size_t) il * n_head_kv_ + h) * n_used, n_used, pos(il, h));
    n_used_ = n_used;
    n_past_ = n_past;
    holes_ = holes;
}

void KVCache::set_layer_rows(int il, const std::vector<uint8_t> & k, const std::vector<uint8_t> & v) {
    const size_t n = n_used_;
    if (k.size() != n_head_kv_ * n * k_row_bytes() || v.size() != n_head_kv_ * n * v_row_bytes())
        throw std::invalid_argument("set_layer_rows: wrong row count");
    // Zeroed first: the slots beyond n_used stay as a fresh cache has them.
    std::vector<uint8_t> tk(ggml_nbytes(k_[il]), 0), tv(ggml_nbytes(v_[il]), 0);
    copy_rows(false, false, k_[il], tk.data(), const_cast<uint8_t *>(k.data()), n, k_row_bytes());
    copy_rows(false, v_trans_, v_[il], tv.data(), const_cast<uint8_t *>(v.data()), n, v_row_bytes());
    ggml_backend_tensor_set(k_[il], tk.data(), 0, tk.size());
    ggml_backend_tensor_set(v_[il], tv.data(), 0, tv.size());
}

size_t KVCache::bytes_per_token() const {
    return (size_t) n_layer() * n_head_kv_ * (k_row_bytes() + v_row_bytes());
}

size_t KVCache::bytes_allocated() const {
    return ggml_backend_buffer_get_size(buf_) + (buf_s_ ? ggml_backend_buffer_get_size(buf_s_) : 0);
}

size_t KVCache::bytes_used() const { return bytes_per_token() * (size_t) n_used_; }

}  // namespace obc
