"""
pyobcache native engine (use the pyobcache package, not this module directly)
"""

from collections.abc import Sequence
import enum
from typing import Annotated

import numpy
from numpy.typing import NDArray


class ScoreKind(enum.Enum):
    none = 0

    attn = 1

    v = 2

    k = 3

    vk = 4

    vk_nocross = 5

class Window(enum.Enum):
    last = 0

    latest = 1

    all = 2

class Pooling(enum.Enum):
    none = 0

    max = 1

    avg = 2

class EvictMode(enum.Enum):
    prefill = 0

    chunked = 1

    decode = 2

class GroupPool(enum.Enum):
    sum = 0

    mean = 1

    max = 2

    norm_sum = 3

    pre_mean = 4

class GqaMode(enum.Enum):
    native = 0

    expand = 1

class HeadBudget(enum.Enum):
    uniform = 0

    adaptive = 1

def parse_head_budget(name: str) -> HeadBudget: ...

def parse_group_pool(name: str) -> GroupPool: ...

def parse_gqa_mode(name: str) -> GqaMode: ...

class KVConfig:
    def __init__(self) -> None: ...

    @property
    def method(self) -> str: ...

    @method.setter
    def method(self, arg: str, /) -> None: ...

    @property
    def score(self) -> ScoreKind: ...

    @score.setter
    def score(self, arg: ScoreKind, /) -> None: ...

    @property
    def p(self) -> float: ...

    @p.setter
    def p(self, arg: float, /) -> None: ...

    @property
    def window(self) -> Window: ...

    @window.setter
    def window(self, arg: Window, /) -> None: ...

    @property
    def window_size(self) -> int: ...

    @window_size.setter
    def window_size(self, arg: int, /) -> None: ...

    @property
    def pooling(self) -> Pooling: ...

    @pooling.setter
    def pooling(self, arg: Pooling, /) -> None: ...

    @property
    def kernel(self) -> int: ...

    @kernel.setter
    def kernel(self, arg: int, /) -> None: ...

    @property
    def group_pool(self) -> GroupPool: ...

    @group_pool.setter
    def group_pool(self, arg: GroupPool, /) -> None: ...

    @property
    def gqa(self) -> GqaMode: ...

    @gqa.setter
    def gqa(self, arg: GqaMode, /) -> None: ...

    @property
    def head_budget(self) -> HeadBudget: ...

    @head_budget.setter
    def head_budget(self, arg: HeadBudget, /) -> None: ...

    @property
    def head_floor(self) -> float: ...

    @head_floor.setter
    def head_floor(self, arg: float, /) -> None: ...

    @property
    def budget(self) -> int: ...

    @budget.setter
    def budget(self, arg: int, /) -> None: ...

    @property
    def ratio(self) -> float: ...

    @ratio.setter
    def ratio(self, arg: float, /) -> None: ...

    @property
    def n_recent(self) -> int: ...

    @n_recent.setter
    def n_recent(self, arg: int, /) -> None: ...

    @property
    def n_sink(self) -> int: ...

    @n_sink.setter
    def n_sink(self, arg: int, /) -> None: ...

    @property
    def mode(self) -> EvictMode: ...

    @mode.setter
    def mode(self, arg: EvictMode, /) -> None: ...

    @property
    def slack(self) -> int: ...

    @slack.setter
    def slack(self, arg: int, /) -> None: ...

    @property
    def type_k(self) -> str: ...

    @property
    def type_v(self) -> str: ...

    def __repr__(self) -> str: ...

def kv_config_for_method(method: str) -> KVConfig: ...

def finalize_kv_config(config: KVConfig) -> KVConfig: ...

def kv_method_names() -> list[str]: ...

DEFAULT_KV_METHOD: str = 'obc-k+snapkv'

def kv_budget_for(config: KVConfig, n_prompt: int) -> int: ...

def kv_config_from_options(options: Sequence[tuple[str, str]]) -> KVConfig: ...

def parse_kv_spec(spec: str) -> list[tuple[str, str]]: ...

def kv_cache_types() -> list[str]:
    """
    The types a KV cache stores K and V in (type_k / type_v), as llama.cpp's -ctk / -ctv name them.
    """

def kv_cache_type_name(ggml_type: int) -> str:
    """
    The name of a KV cache type given as its ggml_type id (llama_cpp's type_k=8 is q8_0).
    """

def kv_row_bytes(type: str, n_values: int) -> int:
    """
    Bytes of one cache row of n_values values in a KV cache type (ggml_row_size).
    """

def select_keep(scores: Annotated[NDArray[numpy.float32], dict(shape=(None,), order='C', writable=False)], budget: int, n_sink: int, n_recent: int, pooling: Pooling, kernel: int) -> list[int]: ...

CLI_PROGRESS_MIN_TOKENS: int = 2048

DEFAULTS: dict = ...

def default_thread_count() -> int: ...

def hardware_thread_count() -> int: ...

def threads_in_use() -> int: ...

def resolve_thread_count(params: ThreadParams) -> int: ...

class ThreadParams:
    def __init__(self, n_threads: int = 0, adaptive: bool = True, poll: int = 0, prio: int = 0, cpu_mask: str = '', cpu_strict: bool = False) -> None: ...

    @property
    def n_threads(self) -> int: ...

    @property
    def adaptive(self) -> bool: ...

    @property
    def poll(self) -> int: ...

    @property
    def prio(self) -> int: ...

    @property
    def cpu_mask(self) -> str: ...

    @property
    def cpu_strict(self) -> bool: ...

class Vocab:
    @staticmethod
    def load(path: str) -> Vocab: ...

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def detokenize(self, ids: Sequence[int], render_special: bool = False) -> bytes: ...

    @property
    def pre(self) -> str: ...

    @property
    def n_tokens(self) -> int: ...

class Model:
    @staticmethod
    def load(path: str, n_gpu_layers: int = 0) -> Model: ...

    def context_warning(self, n_ctx: int) -> str: ...

    @property
    def gpu_layers(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_ctx_train(self) -> int: ...

    @property
    def n_layer(self) -> int: ...

    @property
    def n_head(self) -> int: ...

    @property
    def n_head_kv(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def n_embd(self) -> int: ...

    @property
    def arch(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def chat_template(self) -> str: ...

    @property
    def bos(self) -> int: ...

    @property
    def eos(self) -> int: ...

    @property
    def add_bos(self) -> bool: ...

    @property
    def tokenizer_pre(self) -> str: ...

    @property
    def weight_bytes(self) -> int: ...

    def describe(self) -> str: ...

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_to_piece(self, id: int, render_special: bool = False) -> bytes: ...

    def token_text(self, id: int) -> bytes: ...

    def detokenize(self, ids: Sequence[int], render_special: bool = False) -> bytes: ...

    def is_eog(self, id: int) -> bool: ...

class Generator:
    def next(self) -> object: ...

    @property
    def generated(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def logprobs(self) -> list: ...

class Request:
    def __init__(self, model: Model, n_ctx: int, n_batch: int, threads: ThreadParams, flash_attn: int, kv: KVConfig, ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, seed: int, stop: Sequence[str], ignore_eos: bool, n_logprobs: int = -1) -> None: ...

    @staticmethod
    def turn(conversation: Session, ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, seed: int, stop: Sequence[str], ignore_eos: bool, n_logprobs: int = -1) -> Request:
        """
        A turn of a conversation: ids join what it holds, then the reply (the report covers this turn).
        """

    def next(self) -> object: ...

    @property
    def session(self) -> Session: ...

    @property
    def generated(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def logprobs(self) -> list: ...

    def report(self) -> dict: ...

class Session:
    def __init__(self, model: Model, n_ctx: int, n_batch: int, threads: ThreadParams, flash_attn: int, kv: KVConfig, n_prompt: int, max_new_tokens: int) -> None: ...

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> None: ...

    def decode(self, ids: Sequence[int], all_logits: bool = False) -> None: ...

    def logits(self) -> NDArray[numpy.float32]: ...

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, seed: int, stop: Sequence[str], ignore_eos: bool, n_logprobs: int = -1) -> Generator: ...

    @staticmethod
    def conversation(model: Model, n_ctx: int, n_batch: int, threads: ThreadParams, flash_attn: int, kv: KVConfig) -> Session: ...

    @staticmethod
    def load_state(model: Model, threads: ThreadParams, data: bytes, max_n_ctx: int) -> Session: ...

    def set_progress(self, callback: object | None) -> None:
        """A callable(done, total) called after each prompt micro-batch, or None."""

    def end_turn(self) -> None: ...

    def save_state(self) -> bytes: ...

    def append(self, ids: Sequence[int]) -> None: ...

    @property
    def sequence(self) -> list[int]: ...

    @property
    def sequence_size(self) -> int: ...

    @property
    def is_conversation(self) -> bool: ...

    @property
    def n_ctx(self) -> int: ...

    def stats(self) -> dict: ...

    def timings(self) -> dict: ...

    @property
    def n_threads(self) -> int: ...

    @property
    def n_threads_last(self) -> int: ...

    @property
    def n_used(self) -> int: ...

    @property
    def n_past(self) -> int: ...

    @property
    def kv_capacity(self) -> int: ...

    def positions(self, layer: int, head: int) -> list[int]: ...

    def scores(self, layer: int, head: int) -> NDArray[numpy.float32]: ...

    def prefill_snapshot(self, ids: Sequence[int], methods: Sequence[KVConfig]) -> None: ...

    def apply_snapshot(self, config: KVConfig) -> int: ...

    def snapshot_scores(self, config: KVConfig, layer: int, head: int) -> NDArray[numpy.float32]: ...

    def snapshot_score_ms(self) -> float: ...

    def last_keep(self) -> list[list[list[int]]]: ...

    def set_debug_capture(self, on: bool) -> None: ...

    def debug_capture(self) -> dict: ...

def saliency(q: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], k: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], v: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], pos_q: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], pos_k: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], score: str, p: float = 2.0, scale: float | None = None, group_pool: str = 'sum', n_threads: int = 2) -> Annotated[NDArray[numpy.float32], dict(shape=(None, None))]:
    """
    saliency(q, k, v, pos_q, pos_k, score, p=2.0, scale=None, group_pool='sum', n_threads=2)

    Per-KV-head saliency of every cached token (obc_saliency on the ggml CPU backend).
    q: float32 (n_head, n_win, head_dim); k, v: float32 (n_head_kv, n_kv, head_dim);
    pos_q: int32 (n_win,); pos_k: int32 (n_head_kv, n_kv); token j is masked for query i when
    pos_k[j] > pos_q[i]. score: attn | v | k | vk | vk-nocross; p: OBC-V norm exponent;
    scale: logit scale (default 1/sqrt(head_dim)); group_pool: sum | mean | max | norm-sum | pre-mean over the query
    heads of a KV head. Returns float32 (n_head_kv, n_kv).
    """

def saliency_composed(q: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], k: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], v: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], pos_q: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], pos_k: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], score: str, p: float = 2.0, scale: float | None = None, group_pool: str = 'sum', n_threads: int = 2) -> Annotated[NDArray[numpy.float32], dict(shape=(None, None))]:
    """
    Same as saliency(), computed with stock ggml ops (obc_saliency_composed), as a cross-check.
    """

def saliency_cache(q: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], k: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], v: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], pos_q: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], pos_k: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], score: str, p: float = 2.0, scale: float | None = None, group_pool: str = 'sum', n_threads: int = 2, kv_type: str = 'f32', v_trans: bool = False, pad: int = 0, backend: str = 'cpu', k_offset: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)] | None = None) -> Annotated[NDArray[numpy.float32], dict(shape=(None, None))]:
    """
    saliency() on K/V stored the way a ggml KV cache stores them: kv_type one of kv_cache_types(),
    V transposed ([n_kv, head_dim, n_head_kv] in ggml) when v_trans, both as strided views
    with `pad` NaN-filled slots of capacity before and after the n_kv used ones; run as the
    engine runs it (obc_runner) in the memory of `backend` (one of op_backends()).
    k_offset: float32 (n_head_kv, head_dim) or None; k then holds the keys minus it (per head),
    as a quantized KV cache stores them, and the op adds it back.
    """

def mul_mat(w: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], x: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], w_type: str = 'q6_K', n_threads: int = 1, ggml_only: bool = False) -> tuple[Annotated[NDArray[numpy.float32], dict(shape=(None, None))], bool]:
    """
    mul_mat(w, x, w_type='q6_K', n_threads=1, ggml_only=False) -> (y, tiled): y = x @ w.T as float32
    (N, M), with w (M, K) stored in w_type (a ggml type name) in the CPU backend's memory, computed
    by obc_mul_mat (or ggml_mul_mat with ggml_only); tiled says whether obc_mul_mat used its own
    kernel rather than ggml_mul_mat.
    """

def kv_round_trip(x: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], kv_type: str) -> NDArray[numpy.float32]:
    """
    kv_round_trip(x, kv_type) -> float32 rows of x (rows, values) stored in a KV cache type and read back.
    """

def compact(cache: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], idx: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], axis: int, backend: str = 'cpu', kv_type: str = 'f32') -> NDArray[numpy.float32]:
    """
    compact(cache, idx, axis, backend='cpu', kv_type='f32') -> copy of cache after obc_compact.

    kv_type: the type the cache is stored in while it moves (one of kv_cache_types(); a quantized
    type moves whole rows, axis 1 only).
    cache: float32 (H, d, cap) [axis=0], (H, cap, d) [axis=1] or (H, cap) [axis=0]; axis is the
    ggml axis (0 = last NumPy axis). idx: int32 (H, n_keep), strictly increasing per head.
    Slot n of head h receives slot idx[h, n]; slots >= n_keep keep their old values.
    """

def select_keep_heads(scores: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], budget: int, n_sink: int, n_recent: int, pooling: str = 'none', kernel: int = 7, backend: str = 'cpu') -> Annotated[NDArray[numpy.int32], dict(shape=(None, None))]:
    """
    The slots each head of scores (H, n_used) keeps, as int32 (H, min(budget, n_used)), from
    obc_runner_select_keep in the memory of `backend`.
    """

def op_backends() -> list[str]:
    """The backends this build runs the ops on: 'cpu', and 'cuda' with a GPU."""
