// CUDA implementations of the ops of obc_ops.h, plus the device-side top-k selection of eviction.
//
// ggml's CUDA backend does not run GGML_OP_CUSTOM nodes, so these are not graph ops: they are host
// launchers that the engine calls directly on tensors whose data lives in device memory (a ggml
// CUDA buffer, or any device pointer stored in tensor->data), on a CUDA stream of the caller's
// choice, outside any ggml graph. They never copy data to the host and never synchronise the
// stream; results are ready once the stream's work is done.
//
// Ordering with ggml: ggml's CUDA backend runs its graphs on its own non-blocking streams. Call
// ggml_backend_synchronize() on that backend before a launcher reads what a graph wrote, and
// synchronise (or make ggml wait on an event of) the launcher's stream before the next graph reads
// what a launcher wrote.
//
// The header needs no CUDA headers: a stream is passed as `struct CUstream_st *`, which is what
// cudaStream_t is, and NULL means the legacy default stream.
//
// Every launcher returns 0 on success, or a non-zero code (OBC_CUDA_E*) with a message that
// obc_cuda_last_error() returns for the calling host thread.
#pragma once

#include "obc_ops.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;

enum {
    OBC_CUDA_OK = 0,
    OBC_CUDA_EINVAL = 1,   // bad arguments (shapes, types, strides, null pointers)
    OBC_CUDA_EWORK = 2,    // the workspace is smaller than the *_work_size() function says
    OBC_CUDA_ERUNTIME = 3, // the CUDA runtime refused a launch (no device, out of resources, ...)
};

const char * obc_cuda_last_error(void);

// Waits until the stream's work is done (NULL: the legacy default stream), so that ggml's own
// (non-blocking) streams may read what a launcher wrote.
int obc_cuda_synchronize(struct CUstream_st * stream);

// ---------------------------------------------------------------------------------------------
// Saliency: obc_saliency's arguments and result (see obc_ops.h), in device memory:
//   q F32 [D, W, H], k F16|F32 [D, N, Hkv], v F16|F32 [D, N, Hkv] or [N, D, Hkv] when v_trans,
//   pos_q I32 [W], pos_k I32 [N, Hkv]; out F32 [N, Hkv] (rows of N floats, any row stride).
// head_dim (D) is at most 256. `work` is device scratch of at least
// obc_cuda_saliency_work_size(q, k, params) bytes (256-byte aligned), in use until the stream has
// run the call. Accuracy as the CPU op: fp32 accumulation, within 1e-4 of each head's maximum.
size_t obc_cuda_saliency_work_size(const struct ggml_tensor * q, const struct ggml_tensor * k,
                                   struct obc_saliency_params params);
int obc_cuda_saliency(const struct ggml_tensor * q, const struct ggml_tensor * k, const struct ggml_tensor * v,
                      const struct ggml_tensor * pos_q, const struct ggml_tensor * pos_k,
                      struct obc_saliency_params params, struct ggml_tensor * out, void * work, size_t work_size,
                      struct CUstream_st * stream);

// ---------------------------------------------------------------------------------------------
// Compaction in place: obc_compact's semantics (obc_ops.h) on a device tensor. idx is I32
// [n_keep, H] in device memory, strictly increasing per head, every index in [0, cap) (indices are
// not checked on the device: an index outside the range is skipped, leaving that slot as it was).
// Works for K [d, cap, H] (axis 1, any type), transposed V [cap, d, H] and [cap, H] scores or
// positions (axis 0, non-quantized types). Needs no workspace.
int obc_cuda_compact(struct ggml_tensor * cache, const struct ggml_tensor * idx, int axis, struct CUstream_st * stream);

// ---------------------------------------------------------------------------------------------
// Top-k selection of the slots to keep, per head, as obc_select_keep_host (obc_ops.h) on each row
// of scores F32 [>= n_used, H] (device): the first n_sink slots, the last n_recent and the
// top-scoring candidates between them after pooling over the candidates only (ties to the earlier
// slot). keep is I32
// [>= n_keep, H] (device), n_keep = min(budget, n_used); its first n_keep entries per head get the
// kept slots in increasing order (0..n_used-1 when n_used <= budget). The same indices as
// obc_select_keep_host for any scores that are not NaN. `work` is device scratch of at least
// obc_cuda_select_keep_work_size(n_used, H) bytes.
size_t obc_cuda_select_keep_work_size(int32_t n_used, int32_t n_head);
int obc_cuda_select_keep(const struct ggml_tensor * scores, int32_t n_used, int32_t budget, int32_t n_sink,
                         int32_t n_recent, int32_t pooling, int32_t kernel, struct ggml_tensor * keep, void * work,
                         size_t work_size, struct CUstream_st * stream);

#ifdef __cplusplus
}
#endif
