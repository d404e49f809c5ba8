// obc_runner (obc_ops.h): runs each op where its tensors live. Host memory: ggml CPU graphs of the
// custom ops on the runner's CPU backend. A CUDA buffer: the launchers of obc_ops_cuda.h. This file
// is the one place that knows which backends have an implementation.
#include "obc_ops.h"
#ifdef OBCACHE_HAVE_CUDA
#include "obc_ops_cuda.h"
#endif

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpu.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

struct obc_runner {
    ggml_backend_t backend = nullptr;
    bool cpu = false;
    ggml_gallocr_t galloc = nullptr;   // the host graphs' allocator, reused from call to call
    std::vector<uint8_t> meta;         // the host graphs' tensor and graph headers
    std::string error;
};

namespace {

int fail(obc_runner * r, int code, const std::string & what) {
    r->error = what;
    return code;
}

bool on_host(const ggml_tensor * t) { return !t->buffer || ggml_backend_buffer_is_host(t->buffer); }

// Which implementation serves tensors stored like t, on this runner.
enum class Impl { none, host, cuda };

Impl impl_for(const obc_runner * r, const ggml_tensor * t) {
    if (on_host(t)) return r->cpu ? Impl::host : Impl::none;
#ifdef OBCACHE_HAVE_CUDA
    if (!r->cpu) return Impl::cuda;
#endif
    return Impl::none;
}

int no_impl(obc_runner * r, const char * op, const ggml_tensor * t) {
    const std::string where = t->buffer ? ggml_backend_buffer_name(t->buffer) : "host";
    return fail(r, OBC_RUN_EFAILED, std::string(op) + ": no implementation for tensors in " + where + " memory on a runner of " +
                                        ggml_backend_name(r->backend) +
                                        " (a GPU cache needs pyobcache built with CUDA: OBCACHE_CUDA)");
}

int graph_status(obc_runner * r, ggml_status st, const char * op) {
    if (st == GGML_STATUS_SUCCESS) return OBC_RUN_OK;
    if (st == GGML_STATUS_ABORTED) return fail(r, OBC_RUN_ABORTED, std::string(op) + ": interrupted");
    return fail(r, OBC_RUN_EFAILED, std::string(op) + ": the graph failed");
}

ggml_context * header_context(obc_runner * r, size_t n_tensors) {
    const size_t need = ggml_tensor_overhead() * n_tensors + ggml_graph_overhead();
    if (r->meta.size() < need) r->meta.resize(need);
    ggml_init_params ip{};
    ip.mem_size = r->meta.size();
    ip.mem_buffer = r->meta.data();
    ip.no_alloc = true;
    return ggml_init(ip);
}

ggml_tensor * cache_view(ggml_context * ctx, const ggml_tensor * c, int64_t n_kv, bool slots_first) {
    ggml_tensor * t = const_cast<ggml_tensor *>(c);
    return slots_first ? ggml_view_3d(ctx, t, n_kv, c->ne[1], c->ne[2], c->nb[1], c->nb[2], 0)
                       : ggml_view_3d(ctx, t, c->ne[0], n_kv, c->ne[2], c->nb[1], c->nb[2], 0);
}

int saliency_host(obc_runner * r, const obc_saliency_layer * layers, int32_t n_layers, const int32_t * pos_q, int32_t n_q,
                  int32_t n_head, int64_t n_kv, const obc_saliency_params & sp) {
    const int64_t hd = layers[0].k->ne[0], n_head_kv = layers[0].k->ne[2];
    const size_t q_elems = (size_t) hd * n_head * n_q;
    // Layers go through in blocks whose window queries (input and permuted copy) stay under
    // ~8 MiB, so that scoring a whole prompt chunk does not hold every layer's queries at once.
    const size_t q_bytes = q_elems * sizeof(float) * 2;
    const int per_graph = (int) std::max<size_t>(1, std::min<size_t>(n_layers, (8u << 20) / std::max<size_t>(q_bytes, 1)));
    std::vector<int32_t> pk;
    for (int l0 = 0; l0 < n_layers; l0 += per_graph) {
        const int l1 = std::min(n_layers, l0 + per_graph);
        ggml_context * ctx = header_context(r, 16 * (size_t) (l1 - l0) + 16);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_tensor * tpos_q = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_q);
        ggml_set_input(tpos_q);
        std::vector<ggml_tensor *> qs, pks, outs, offs;
        for (int il = l0; il < l1; ++il) {
            ggml_tensor * qi = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, hd, n_head, n_q);
            ggml_set_input(qi);
            ggml_tensor * pki = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_kv, n_head_kv);
            ggml_set_input(pki);
            ggml_tensor * K = cache_view(ctx, layers[il].k, n_kv, false);
            ggml_tensor * V = cache_view(ctx, layers[il].v, n_kv, sp.v_trans != 0);
            ggml_tensor * qp = ggml_cont(ctx, ggml_permute(ctx, qi, 0, 2, 1, 3));   // [hd, n_q, H]
            ggml_tensor * off = nullptr;
            if (layers[il].k_offset) {
                off = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hd, n_head_kv);
                ggml_set_input(off);
            }
            ggml_tensor * o = obc_saliency(ctx, qp, K, V, tpos_q, pki, off, sp);
            ggml_set_output(o);
            ggml_build_forward_expand(gf, o);
            qs.push_back(qi);
            pks.push_back(pki);
            outs.push_back(o);
            offs.push_back(off);
        }
        if (!ggml_gallocr_alloc_graph(r->galloc, gf)) {
            ggml_free(ctx);
            return fail(r, OBC_RUN_ENOMEM, "saliency: cannot allocate the scoring graph");
        }
        ggml_backend_tensor_set(tpos_q, pos_q, 0, (size_t) n_q * sizeof(int32_t));
        for (int il = l0; il < l1; ++il) {
            ggml_backend_tensor_set(qs[il - l0], layers[il].q, 0, q_elems * sizeof(float));
            ggml_backend_tensor_set(pks[il - l0], layers[il].pos_k, 0, (size_t) n_kv * n_head_kv * sizeof(int32_t));
            if (offs[il - l0]) ggml_backend_tensor_set(offs[il - l0], layers[il].k_offset, 0, ggml_nbytes(offs[il - l0]));
        }
        const int rc = graph_status(r, ggml_backend_graph_compute(r->backend, gf), "saliency");
        if (rc == OBC_RUN_OK)
            for (int il = l0; il < l1; ++il)
                ggml_backend_tensor_get(outs[il - l0], layers[il].out, 0, (size_t) n_kv * n_head_kv * sizeof(float));
        ggml_free(ctx);
        if (rc != OBC_RUN_OK) return rc;
    }
    return OBC_RUN_OK;
}

int compact_host(obc_runner * r, ggml_tensor * const * caches, const int32_t * axes, const int32_t * const * idx,
                 int32_t n_caches, int64_t n_keep, int32_t n_head) {
    ggml_context * ctx = header_context(r, 4 * (size_t) n_caches + 8);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    // One index tensor per distinct list (K and V of a layer share theirs).
    std::vector<std::pair<const int32_t *, ggml_tensor *>> lists;
    for (int32_t c = 0; c < n_caches; ++c) {
        auto it = std::find_if(lists.begin(), lists.end(), [&](const auto & l) { return l.first == idx[c]; });
        if (it == lists.end()) {
            lists.emplace_back(idx[c], ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, n_head));
            it = lists.end() - 1;
        }
        ggml_build_forward_expand(gf, obc_compact(ctx, caches[c], it->second, axes[c]));
    }
    ggml_backend_buffer_t ibuf = ggml_backend_alloc_ctx_tensors(ctx, r->backend);
    if (!ibuf) {
        ggml_free(ctx);
        return fail(r, OBC_RUN_ENOMEM, "compact: out of memory");
    }
    for (const auto & l : lists) ggml_backend_tensor_set(l.second, l.first, 0, (size_t) n_keep * n_head * sizeof(int32_t));
    const int rc = graph_status(r, ggml_backend_graph_compute(r->backend, gf), "compact");
    ggml_backend_buffer_free(ibuf);
    ggml_free(ctx);
    return rc;
}

#ifdef OBCACHE_HAVE_CUDA
// A ggml context whose tensors live in a buffer of the runner's device, freed with it.
struct DeviceScratch {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    explicit DeviceScratch(size_t n_tensors) {
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_tensors;
        ip.no_alloc = true;
        ctx = ggml_init(ip);
    }
    bool alloc(ggml_backend_t b) { return (buf = ggml_backend_alloc_ctx_tensors(ctx, b)) != nullptr; }
    ~DeviceScratch() {
        if (buf) ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
};

void * aligned256(ggml_tensor * t) { return (void *) (((uintptr_t) t->data + 255) & ~(uintptr_t) 255); }

int saliency_device(obc_runner * r, const obc_saliency_layer * layers, int32_t n_layers, const int32_t * pos_q,
                    int32_t n_q, int32_t n_head, int64_t n_kv, const obc_saliency_params & sp) {
    const int64_t hd = layers[0].k->ne[0], n_head_kv = layers[0].k->ne[2];
    DeviceScratch s(8 + 2 * (size_t) n_layers);
    ggml_tensor * qd = ggml_new_tensor_3d(s.ctx, GGML_TYPE_F32, hd, n_q, n_head);
    ggml_tensor * tpos_q = ggml_new_tensor_1d(s.ctx, GGML_TYPE_I32, n_q);
    ggml_tensor * tpos_k = ggml_new_tensor_2d(s.ctx, GGML_TYPE_I32, n_kv, n_head_kv);
    ggml_tensor * out = ggml_new_tensor_2d(s.ctx, GGML_TYPE_F32, n_kv, n_head_kv);
    ggml_tensor * K0 = cache_view(s.ctx, layers[0].k, n_kv, false);
    const size_t work_size = obc_cuda_saliency_work_size(qd, K0, sp);
    ggml_tensor * work = ggml_new_tensor_1d(s.ctx, GGML_TYPE_I8, (int64_t) work_size + 256);
    if (!s.alloc(r->backend)) return fail(r, OBC_RUN_ENOMEM, "saliency: cannot allocate the scoring buffers on the GPU");
    ggml_backend_tensor_set(tpos_q, pos_q, 0, (size_t) n_q * sizeof(int32_t));
    ggml_backend_synchronize(r->backend);   // the graphs that wrote the cache are done
    const size_t q_elems = (size_t) hd * n_head * n_q;
    std::vector<float> qh(q_elems);
    for (int il = 0; il < n_layers; ++il) {
        // Given as [n_q][H][hd]; the kernel reads [H][n_q][hd].
        const float * src = layers[il].q;
        for (int64_t i = 0; i < n_q; ++i)
            for (int64_t h = 0; h < n_head; ++h)
                std::copy(src + (i * n_head + h) * hd, src + (i * n_head + h + 1) * hd, qh.begin() + (h * n_q + i) * hd);
        ggml_backend_tensor_set(qd, qh.data(), 0, q_elems * sizeof(float));
        ggml_backend_tensor_set(tpos_k, layers[il].pos_k, 0, (size_t) n_kv * n_head_kv * sizeof(int32_t));
        ggml_tensor * Kl = cache_view(s.ctx, layers[il].k, n_kv, false);
        ggml_tensor * Vl = cache_view(s.ctx, layers[il].v, n_kv, sp.v_trans != 0);
        if (obc_cuda_saliency(qd, Kl, Vl, tpos_q, tpos_k, sp, out, aligned256(work), work_size, nullptr) != 0 ||
            obc_cuda_synchronize(nullptr) != 0)
            return fail(r, OBC_RUN_EFAILED, std::string("saliency on the GPU failed: ") + obc_cuda_last_error());
        ggml_backend_tensor_get(out, layers[il].out, 0, (size_t) n_kv * n_head_kv * sizeof(float));
    }
    return OBC_RUN_OK;
}

int compact_device(obc_runner * r, ggml_tensor * const * caches, const int32_t * axes, const int32_t * const * idx,
                   int32_t n_caches, int64_t n_keep, int32_t n_head) {
    // ggml's CUDA backend cannot run our custom op, so the CUDA gather runs on the cache in place,
    // after the graphs that wrote it and before the next one reads it.
    DeviceScratch s(2);
    ggml_tensor * tidx = ggml_new_tensor_2d(s.ctx, GGML_TYPE_I32, n_keep, n_head);
    if (!s.alloc(r->backend)) return fail(r, OBC_RUN_ENOMEM, "compact: out of device memory");
    ggml_backend_synchronize(r->backend);
    const int32_t * uploaded = nullptr;
    for (int32_t c = 0; c < n_caches; ++c) {
        if (idx[c] != uploaded) {
            ggml_backend_tensor_set(tidx, idx[c], 0, (size_t) n_keep * n_head * sizeof(int32_t));
            uploaded = idx[c];
        }
        if (obc_cuda_compact(caches[c], tidx, axes[c], nullptr) != 0 || obc_cuda_synchronize(nullptr) != 0)
            return fail(r, OBC_RUN_EFAILED, std::string("compact on the GPU failed: ") + obc_cuda_last_error());
    }
    return OBC_RUN_OK;
}

int select_keep_device(obc_runner * r, const ggml_tensor * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                       int32_t n_recent, int32_t pooling, int32_t kernel, ggml_tensor * keep) {
    const size_t ws = obc_cuda_select_keep_work_size(n_used, (int32_t) scores->ne[1]);
    DeviceScratch s(2);
    ggml_tensor * work = ggml_new_tensor_1d(s.ctx, GGML_TYPE_I8, (int64_t) ws + 256);
    if (!s.alloc(r->backend)) return fail(r, OBC_RUN_ENOMEM, "select_keep: out of device memory");
    ggml_backend_synchronize(r->backend);
    if (obc_cuda_select_keep(scores, n_used, budget, n_sink, n_recent, pooling, kernel, keep, aligned256(work), ws,
                             nullptr) != 0 ||
        obc_cuda_synchronize(nullptr) != 0)
        return fail(r, OBC_RUN_EFAILED, std::string("select_keep on the GPU failed: ") + obc_cuda_last_error());
    return OBC_RUN_OK;
}
#endif

}  // namespace

extern "C" {

obc_runner * obc_runner_new(ggml_backend_t backend) {
    if (!backend) return nullptr;
    auto * r = new (std::nothrow) obc_runner;
    if (!r) return nullptr;
    r->backend = backend;
    r->cpu = ggml_backend_is_cpu(backend);
    if (r->cpu) {
        r->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        if (!r->galloc) {
            delete r;
            return nullptr;
        }
    }
    return r;
}

void obc_runner_free(obc_runner * r) {
    if (!r) return;
    if (r->galloc) ggml_gallocr_free(r->galloc);
    delete r;
}

const char * obc_runner_error(const obc_runner * r) { return r ? r->error.c_str() : "runner is NULL"; }

int obc_runner_saliency(obc_runner * r, const obc_saliency_layer * layers, int32_t n_layers, const int32_t * pos_q,
                        int32_t n_q, int32_t n_head, int64_t n_kv, obc_saliency_params sp) {
    if (!r) return OBC_RUN_EINVAL;
    if (!layers || n_layers <= 0 || !pos_q || n_q <= 0 || n_head <= 0 || n_kv <= 0)
        return fail(r, OBC_RUN_EINVAL, "saliency: empty or missing arguments");
    const ggml_tensor * k0 = layers[0].k;
    for (int32_t il = 0; il < n_layers; ++il) {
        const obc_saliency_layer & l = layers[il];
        if (!l.q || !l.k || !l.v || !l.pos_k || !l.out) return fail(r, OBC_RUN_EINVAL, "saliency: a layer has a NULL argument");
        const int64_t v_slots = sp.v_trans ? l.v->ne[0] : l.v->ne[1];
        if (l.k->ne[0] != k0->ne[0] || l.k->ne[2] != k0->ne[2] || l.k->ne[1] < n_kv || v_slots < n_kv ||
            l.v->ne[2] != k0->ne[2])
            return fail(r, OBC_RUN_EINVAL, "saliency: the layers' caches differ in shape or hold fewer than n_kv slots");
        if (on_host(l.k) != on_host(k0) || on_host(l.v) != on_host(k0))
            return fail(r, OBC_RUN_EINVAL, "saliency: the caches are not all in the same memory");
    }
    if (n_head % k0->ne[2] != 0) return fail(r, OBC_RUN_EINVAL, "saliency: n_head is not a multiple of the cache's heads");
    const Impl impl = impl_for(r, k0);
    if (impl == Impl::none) return no_impl(r, "saliency", k0);
    r->error.clear();
#ifdef OBCACHE_HAVE_CUDA
    if (impl == Impl::cuda) {
        // Only a quantized K has an offset, and the CUDA kernels read F16 / F32 caches.
        for (int32_t il = 0; il < n_layers; ++il)
            if (layers[il].k_offset)
                return fail(r, OBC_RUN_EINVAL, "saliency: a K offset (a quantized K cache) has no CUDA implementation");
        return saliency_device(r, layers, n_layers, pos_q, n_q, n_head, n_kv, sp);
    }
#endif
    return saliency_host(r, layers, n_layers, pos_q, n_q, n_head, n_kv, sp);
}

int obc_runner_compact(obc_runner * r, ggml_tensor * const * caches, const int32_t * axes, const int32_t * const * idx,
                       int32_t n_caches, int64_t n_keep, int32_t n_head) {
    if (!r) return OBC_RUN_EINVAL;
    if (!caches || !axes || !idx || n_caches <= 0 || n_keep <= 0 || n_head <= 0)
        return fail(r, OBC_RUN_EINVAL, "compact: empty or missing arguments");
    for (int32_t c = 0; c < n_caches; ++c) {
        const ggml_tensor * t = caches[c];
        if (!t || !idx[c] || (axes[c] != 0 && axes[c] != 1)) return fail(r, OBC_RUN_EINVAL, "compact: a NULL cache or list, or an axis other than 0 or 1");
        if (axes[c] == 0 && ggml_blck_size(t->type) != 1)
            return fail(r, OBC_RUN_EINVAL, "compact: axis 0 needs a non-quantized type (a quantized row moves whole, along axis 1)");
        if (t->ne[2] != n_head && !(t->ne[2] == 1 && t->ne[1] == n_head && axes[c] == 0))
            return fail(r, OBC_RUN_EINVAL, "compact: a cache has other heads than the lists (" + std::to_string(n_head) + ")");
        const int64_t cap = t->ne[axes[c]];
        for (int32_t h = 0; h < n_head; ++h) {
            const int32_t * row = idx[c] + (size_t) h * n_keep;
            // Strictly increasing, or idx[i] = i: obc_compact's padding of a shorter list.
            for (int64_t i = 0; i < n_keep; ++i)
                if (row[i] < i || row[i] >= cap || (i > 0 && row[i] <= row[i - 1] && row[i] != i))
                    return fail(r, OBC_RUN_EINVAL, "compact: kept slots must be strictly increasing and below the capacity " +
                                                       std::to_string(cap));
        }
        if (on_host(t) != on_host(caches[0])) return fail(r, OBC_RUN_EINVAL, "compact: the caches are not all in the same memory");
    }
    const Impl impl = impl_for(r, caches[0]);
    if (impl == Impl::none) return no_impl(r, "compact", caches[0]);
    r->error.clear();
#ifdef OBCACHE_HAVE_CUDA
    if (impl == Impl::cuda) return compact_device(r, caches, axes, idx, n_caches, n_keep, n_head);
#endif
    return compact_host(r, caches, axes, idx, n_caches, n_keep, n_head);
}

int obc_runner_select_keep(obc_runner * r, const ggml_tensor * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                           int32_t n_recent, int32_t pooling, int32_t kernel, ggml_tensor * keep) {
    if (!r) return OBC_RUN_EINVAL;
    if (!scores || !keep || scores->type != GGML_TYPE_F32 || keep->type != GGML_TYPE_I32 || scores->ne[1] != keep->ne[1] ||
        scores->ne[0] < n_used || keep->ne[0] < std::min(budget, n_used) || n_used < 0 || budget < 0 || n_sink < 0 ||
        n_recent < 0 || pooling < OBC_POOL_NONE || pooling > OBC_POOL_AVG)
        return fail(r, OBC_RUN_EINVAL, "select_keep: scores must be F32 [>= n_used, H], keep I32 [>= n_keep, H], counts >= 0");
    if (on_host(scores) != on_host(keep)) return fail(r, OBC_RUN_EINVAL, "select_keep: scores and keep are in different memory");
    const Impl impl = impl_for(r, scores);
    if (impl == Impl::none) return no_impl(r, "select_keep", scores);
    r->error.clear();
#ifdef OBCACHE_HAVE_CUDA
    if (impl == Impl::cuda) return select_keep_device(r, scores, n_used, budget, n_sink, n_recent, pooling, kernel, keep);
#endif
    for (int64_t h = 0; h < scores->ne[1]; ++h)
        obc_select_keep_host((const float *) ((const char *) scores->data + h * scores->nb[1]), n_used, budget, n_sink,
                             n_recent, pooling, kernel, (int32_t *) ((char *) keep->data + h * keep->nb[1]));
    return OBC_RUN_OK;
}

}  // extern "C"
