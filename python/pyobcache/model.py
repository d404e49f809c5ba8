"""The high-level Python API: load a GGUF model, tokenize, generate, score."""

from __future__ import annotations

import operator
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _core
from .kv import KVConfig
from .registry import REGISTRY, fetch

__all__ = ["Model", "GenerationStats", "EvictionTrace"]

Prompt = Union[str, Sequence[int]]
# The engine's defaults (context size, sampling, max_new_tokens): the signatures here, the
# conversation's and the CLI's take them from the engine, which owns them.
_D = _core.DEFAULTS


@dataclass
class GenerationStats:
    """What the last generation did to the KV cache, and how long it took."""

    prompt_tokens: int
    generated_tokens: int
    prompt_ms: float
    generation_ms: float
    finish_reason: str         # "eos", "stop", "length" (max_new_tokens), "context" (n_ctx reached), "interrupt"
    kv_method: str
    budget: int
    tokens_seen: int
    kept_per_layer: list
    evictions: int
    kv_bytes_allocated: int
    kv_bytes_used: int
    kv_bytes_full: int
    kv_bytes_kept: int      # tokens held, without the holes that head-wise budgets leave (== used otherwise)
    score_ms: float
    compact_ms: float

    @property
    def prompt_tokens_per_s(self) -> float:
        return 1000.0 * self.prompt_tokens / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        # The first generated token comes from the prompt's logits; the rest each cost one decode.
        n = max(self.generated_tokens - 1, 0)
        return 1000.0 * n / self.generation_ms if self.generation_ms > 0 else 0.0


@dataclass
class EvictionTrace:
    """Scores and kept slots after a prefill with eviction, for inspection and plotting.

    ``scores[l][h]`` are the running scores of the slots that survived, ``positions[l][h]`` their
    absolute positions, ``kept[l][h]`` the slot indices (in the pre-eviction cache) that were kept.
    With ``capture=True``, ``q[l]`` ([n_q, n_head, head_dim]), ``k[l]`` and ``v[l]``
    ([n_head_kv, n_kv, head_dim]) hold what the eviction saw, and ``pos_q`` the query positions;
    ``k_offset[l]`` ([n_head_kv, head_dim]) is what a quantized K is stored minus (``k[l]`` has it
    added back; zeros for a float K).
    """

    config: KVConfig
    n_prompt: int
    kept: list
    positions: list
    scores: list
    stats: dict
    q: list = field(default_factory=list)
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    pos_q: list = field(default_factory=list)
    k_offset: list = field(default_factory=list)


def _thread_params(n_threads, adaptive, poll, prio, cpu_mask, cpu_strict) -> "_core.ThreadParams":
    """The engine's thread parameters, n_threads resolved (None: the engine's default count) and
    clamped to the CPUs with a Python warning; None keeps the engine's default of the others."""
    d = _core.ThreadParams()
    p = _core.ThreadParams(
        0 if n_threads is None else _int("n_threads", n_threads, 1),
        d.adaptive if adaptive is None else bool(adaptive),
        d.poll if poll is None else _int("poll", poll),
        d.prio if prio is None else _int("prio", prio),
        d.cpu_mask if cpu_mask is None else str(cpu_mask),
        d.cpu_strict if cpu_strict is None else bool(cpu_strict))
    n = _core.resolve_thread_count(p)
    if n_threads is not None and n_threads > n:
        # More threads than the CPUs only time-slice ggml's spinning workers.
        warnings.warn(f"n_threads={n_threads} is more than the {n} CPUs this process may run on (the hardware "
                      f"threads and the cpu_mask); using {n}", stacklevel=3)
    return _core.ThreadParams(n, p.adaptive, p.poll, p.prio, p.cpu_mask, p.cpu_strict)


def _int(name: str, value, lo: int = -2**31, hi: int = 2**31 - 1) -> int:
    """``value`` as an int in [lo, hi] (the engine takes int32): a ValueError naming ``name``
    instead of nanobind's "incompatible function arguments"."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _float(name: str, value) -> float:
    # Range checks (finite, (0, 1], ...) belong to the engine, which every front door shares.
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}") from None


def _token_ids(ids, what: str) -> list:
    if isinstance(ids, (bytes, bytearray, memoryview)):
        # Iterating bytes gives ints, which used to be read as token ids.
        raise TypeError(f"{what} must be a str or a sequence of integer token ids, not {type(ids).__name__} "
                        "(decode it to str first)")
    if isinstance(ids, str):
        raise TypeError(f"{what} must be a sequence of integer token ids, not str (use Model.tokenize)")
    try:
        return [operator.index(t) for t in ids]
    except TypeError:
        raise TypeError(f"{what} must be a str or a sequence of integer token ids") from None


def _generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop,
                     ignore_eos) -> tuple:
    """The engine's generation arguments, in its order, checked where Python must check them."""
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError("stop strings must be non-empty strings")
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise ValueError("seed must be a non-negative 64-bit integer")
    return (_int("max_new_tokens", max_new_tokens, 0), _float("temperature", temperature), _int("top_k", top_k, 0),
            _float("top_p", top_p), _float("min_p", min_p), _float("repeat_penalty", repeat_penalty),
            _int("repeat_last_n", repeat_last_n, 0), 0xFFFFFFFF if seed is None else int(seed), stop, bool(ignore_eos))


def text_pieces(gen, exclusive=None) -> Iterator[str]:
    """The text of an engine generator, piece by piece (each non-empty and valid UTF-8).
    ``exclusive``: a context manager held around each engine step."""
    pending = b""
    while True:
        if exclusive is None:
            piece = gen.next()
        else:
            with exclusive():
                piece = gen.next()
        if piece is None:
            break
        pending += piece
        # The engine emits whole UTF-8 characters except, possibly, at the very end.
        try:
            text = pending.decode("utf-8")
            pending = b""
        except UnicodeDecodeError:
            continue
        if text:
            yield text
    if pending:
        yield pending.decode("utf-8", errors="replace")


Progress = Union[None, bool, Callable[[int, int], None]]


class PrefillBar:
    """Progress bars of prefills on stderr, one per prompt: tqdm's when tqdm is installed, else a
    line that rewrites itself (a line per update when stderr is not a terminal)."""

    def __init__(self, desc: str = "prompt") -> None:
        self.desc = desc
        self._bar, self._done, self._total, self._t0 = None, 0, 0, 0.0

    def __call__(self, done: int, total: int) -> None:
        if total != self._total or done < self._done:   # the next prompt
            self._close()
            self._total, self._done, self._t0 = total, 0, time.monotonic()
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="tok", desc=self.desc, leave=False)
            except ImportError:
                self._bar = None
        if self._bar is not None:
            self._bar.update(done - self._done)
        else:
            dt = time.monotonic() - self._t0
            tty = sys.stderr.isatty()
            lead, end = ("\r" if tty else ""), ("" if tty and done < total else "\n")
            sys.stderr.write(f"{lead}{self.desc}: {done}/{total} tokens ({100 * done / total:.0f}%), "
                             f"{done / dt if dt > 0 else 0:.1f} tokens/s{end}")
            sys.stderr.flush()
        self._done = done
        if done >= total:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._total = self._done = 0   # the next prompt starts a bar of its own, whatever its length


def set_progress(session: "_core.Session", progress: Progress) -> None:
    """Attaches ``progress`` (None, False, True for a PrefillBar, or a callable(done, total)) to
    an engine session."""
    if progress is None or progress is False:
        return
    if progress is True:
        session.set_progress(PrefillBar())
    elif callable(progress):
        session.set_progress(progress)
    else:
        raise TypeError(f"progress must be None, True or a callable(done, total), not {type(progress).__name__}")


def engine_kv(kv: Optional[KVConfig]) -> "_core.KVConfig":
    """The engine's copy of a configuration; None is the full cache."""
    return kv._core if kv is not None else _core.kv_config_for_method("full")


def _check_kv(kv) -> None:
    if kv is not None and not isinstance(kv, KVConfig):
        hint = f" (for example pyobcache.KVConfig(method={kv!r}, budget=512))" if isinstance(kv, str) else ""
        raise TypeError(f"kv must be a pyobcache.KVConfig or None, not {type(kv).__name__}{hint}")


class Model:
    """A GGUF LLaMA or Qwen2 model.

    ``path`` is a GGUF file or a registry name (``"smollm2-135m"``, ``"qwen2.5-coder-1.5b"``),
    fetched and cached on first use. ``n_ctx`` bounds the positions one sequence may reach.
    ``flash_attn`` picks the attention kernel: ggml's fused flash attention (faster prefill on CPUs)
    or mul_mat + soft_max (faster decoding at depth, and the path llama.cpp's reference logits
    use). ``None`` chooses per request: flash attention when the prompt is at least 3x the
    generation or eviction is on.

    Threads: ``n_threads`` is the most CPU threads a graph uses (default: the physical performance
    cores, as llama.cpp chooses; more than the CPUs this process may run on is clamped with a
    warning). With ``adaptive_threads`` (the default) each graph uses only the CPUs that other
    processes leave free, because ggml's workers spin at every op's barrier and a busy machine
    stalls them (see the README's "Threads" section). ``poll``, ``prio``, ``cpu_mask`` and
    ``cpu_strict`` are llama.cpp's ``--poll``, ``--prio``, ``--cpu-mask`` and ``--cpu-strict``;
    ``None`` keeps the engine's default.

    A Model may be shared by threads: every call gets its own engine context and backend, so
    concurrent calls give the same results as serial ones. :attr:`last_stats` and
    :attr:`last_tokens` then describe the call that finished last. Ctrl-C (KeyboardInterrupt)
    stops a running prefill or generation within a few tens of milliseconds.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        n_ctx: int = _D["n_ctx"],
        n_threads: Optional[int] = None,
        n_batch: int = _D["n_batch"],
        flash_attn: Optional[bool] = None,
        n_gpu_layers: int = 0,
        adaptive_threads: Optional[bool] = None,
        poll: Optional[int] = None,
        prio: Optional[int] = None,
        cpu_mask: Optional[str] = None,
        cpu_strict: Optional[bool] = None,
    ) -> None:
        self._threads = _thread_params(n_threads, adaptive_threads, poll, prio, cpu_mask, cpu_strict)
        p = Path(path)
        if not p.exists() and str(path) in REGISTRY:
            p = fetch(str(path))
        if not p.exists():
            hint = "" if os.sep in str(path) or str(path).endswith(".gguf") else \
                f" (nor a registry name: {', '.join(REGISTRY)})"
            raise FileNotFoundError(f"model file not found: {path}{hint}")
        n_ctx = _int("n_ctx", n_ctx, 1)
        n_batch = _int("n_batch", n_batch, 1)
        n_gpu_layers = _int("n_gpu_layers", n_gpu_layers, 0)
        self._m = _core.Model.load(str(p), n_gpu_layers)
        if n_gpu_layers and self._m.gpu_layers == 0:
            warnings.warn("this ggml has no GPU backend (see the README's GPU section); running on the CPU",
                          stacklevel=2)
        self.path = str(p)
        self.n_ctx = int(n_ctx)
        ctx_warning = self._m.context_warning(self.n_ctx)
        if ctx_warning:
            warnings.warn(ctx_warning, stacklevel=2)
        self.n_batch = int(n_batch)
        self.n_threads = self._threads.n_threads
        self.flash_attn = flash_attn
        self.last_stats: Optional[GenerationStats] = None
        self.last_tokens: list = []
        self._session: Optional[_core.Session] = None

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str, **kwargs) -> "Model":
        """Downloads ``filename`` from the Hugging Face repository ``repo_id`` (cached by huggingface-hub)."""
        from huggingface_hub import hf_hub_download

        return cls(hf_hub_download(repo_id=repo_id, filename=filename), **kwargs)

    # --- model facts -----------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._m.n_vocab

    @property
    def arch(self) -> str:
        return self._m.arch

    @property
    def chat_template(self) -> str:
        return self._m.chat_template

    @property
    def hparams(self) -> dict:
        m = self._m
        return dict(arch=m.arch, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, n_head_kv=m.n_head_kv,
                    head_dim=m.head_dim, n_vocab=m.n_vocab, n_ctx_train=m.n_ctx_train)

    def __repr__(self) -> str:
        return f"Model({self._m.describe()}, n_ctx={self.n_ctx}, n_threads={self.n_threads})"

    # --- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list:
        """Token ids of ``text``. ``add_special`` adds BOS/EOS as the GGUF metadata says;
        ``parse_special`` turns texts such as ``<|im_start|>`` into their special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a str, not {type(text).__name__}")
        return list(self._m.tokenize(text, add_special, parse_special))

    def detokenize(self, ids: Sequence[int], render_special: bool = False) -> str:
        self._check_ids(ids)
        return self._m.detokenize(list(ids), render_special).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int) -> bytes:
        self._check_ids([token])
        return self._m.token_to_piece(int(token))

    def _check_ids(self, ids: Sequence[int]) -> None:
        for t in ids:
            if not 0 <= int(t) < self.n_vocab:
                raise ValueError(f"token id {t} is outside the vocabulary (size {self.n_vocab})")

    def _ids(self, prompt: Prompt) -> list:
        # The engine checks the ids (empty, outside the vocabulary, beyond n_ctx), once, for every door.
        return self.tokenize(prompt) if isinstance(prompt, str) else _token_ids(prompt, "the prompt")

    # --- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: Optional[list] = None, **template_kwargs) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}]) with the GGUF's chat template, as
        Hugging Face's ``apply_chat_template`` does: ``tools`` and ``template_kwargs`` (for
        example Llama 3.x's ``date_string="26 Jul 2024"`` or Qwen3's ``enable_thinking=False``)
        reach the template."""
        from .chat import render_chat

        return render_chat(self, messages, add_generation_prompt, tools, **template_kwargs)

    def chat(self, messages: Sequence[dict], **kwargs) -> str:
        """Generates the assistant's reply to ``messages``; keyword arguments go to :meth:`generate`."""
        prompt = self.apply_chat_template(messages)
        ids = self.tokenize(prompt, add_special=False, parse_special=True)
        if self._m.add_bos and (not ids or ids[0] != self._m.bos):
            ids = [self._m.bos] + ids
        return self.generate(ids, **kwargs)

    # --- generation ------------------------------------------------------------------------
    def _flash_attn_flag(self) -> int:
        return -1 if self.flash_attn is None else int(bool(self.flash_attn))

    def _new_session(self, n_prompt: int, max_new_tokens: int, kv: Optional[KVConfig]) -> "_core.Session":
        _check_kv(kv)
        # A session per call (not shared between threads); self._session only keeps the last
        # one alive for inspection.
        self._session = _core.Session(self._m, self.n_ctx, self.n_batch, self._threads, self._flash_attn_flag(),
                                      engine_kv(kv), n_prompt, max_new_tokens)
        return self._session

    def _new_request(self, ids: list, args: tuple, kv: Optional[KVConfig], n_logprobs: int = -1) -> "_core.Request":
        """The engine's request for one generation (the path the C API and the CLI take): it
        checks the parameters, sizes the cache for the prompt, streams and reports."""
        _check_kv(kv)
        req = _core.Request(self._m, self.n_ctx, self.n_batch, self._threads, self._flash_attn_flag(), engine_kv(kv),
                            ids, *args, n_logprobs)
        self._session = req.session   # kept alive for inspection, as _new_session does
        return req

    def _new_conversation(self, kv: Optional[KVConfig], n_ctx: int) -> "_core.Session":
        """An engine conversation (a session that lives across requests) of up to n_ctx positions."""
        return _core.Session.conversation(self._m, n_ctx, self.n_batch, self._threads, self._flash_attn_flag(),
                                          engine_kv(kv))

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = _D["max_new_tokens"],
        temperature: float = _D["temperature"],
        top_k: int = _D["top_k"],
        top_p: float = _D["top_p"],
        min_p: float = _D["min_p"],
        repeat_penalty: float = _D["repeat_penalty"],
        repeat_last_n: int = _D["repeat_last_n"],
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        kv: Optional[KVConfig] = None,
        stream: bool = False,
        ignore_eos: bool = False,
        progress: Progress = None,
    ) -> Union[str, Iterator[str]]:
        """Generates a continuation of ``prompt`` (text, or token ids).

        ``temperature=0`` is greedy decoding. ``seed`` makes sampling reproducible. Generation
        ends at an end-of-generation token, at ``max_new_tokens``, or before the first ``stop``
        string (which is not returned). ``kv`` bounds the KV cache (see :class:`KVConfig`).
        With ``stream=True`` an iterator of text pieces is returned instead of the whole text.
        ``progress`` reports the prompt's prefill: ``True`` shows a bar on stderr (tqdm's when it
        is installed), a callable is called with (tokens done, total) after each micro-batch.
        After the call, :attr:`last_stats` describes what happened and :attr:`last_tokens` holds
        the generated token ids.
        """
        _check_kv(kv)
        args = _generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed,
                                stop, ignore_eos)
        req = self._new_request(self._ids(prompt), args, kv)
        set_progress(req.session, progress)
        it = self._stream(req, kv)
        return it if stream else "".join(it)

    def session(self, kv: Optional[KVConfig] = None, system: Optional[str] = None,
                n_ctx: Optional[int] = None, progress: Progress = None) -> "Session":
        """A conversation that keeps its KV cache from one turn to the next (see :class:`Session`).

        With ``kv`` (a ``budget`` in tokens; ``evict="decode"`` also evicts while replying), memory
        stays bounded however long the conversation grows. ``system`` is the system prompt of
        :meth:`Session.chat`. ``n_ctx`` bounds the conversation's positions: by default this
        model's ``n_ctx`` with the full cache, and with a bounded cache the larger of that and the
        model's training context. ``progress`` reports each turn's prefill, as in :meth:`generate`."""
        from .conversation import Session

        return Session(self, kv=kv, system=system, n_ctx=n_ctx, progress=progress)

    def _stream(self, req: "_core.Request", kv: Optional[KVConfig]) -> Iterator[str]:
        for text in text_pieces(req):
            yield text
        self.last_tokens = list(req.generated)
        self.last_stats = self._request_stats(req, kv)

    def _request_stats(self, req: "_core.Request", kv: Optional[KVConfig]) -> GenerationStats:
        """What a request did, from the engine's report of it."""
        r = req.report()
        return GenerationStats(
            prompt_tokens=r["prompt_tokens"], generated_tokens=r["generated_tokens"], prompt_ms=r["prompt_ms"],
            generation_ms=r["gen_ms"], finish_reason=r["finish_reason"], kv_method=kv.method if kv else "full",
            budget=r["budget"], tokens_seen=r["tokens_seen"], kept_per_layer=list(r["kept_per_layer"]),
            evictions=r["evictions"], kv_bytes_allocated=r["kv_bytes_allocated"], kv_bytes_used=r["kv_bytes_used"],
            kv_bytes_full=r["kv_bytes_full"], kv_bytes_kept=r["kv_bytes_kept"], score_ms=r["score_ms"],
            compact_ms=r["compact_ms"])

    # --- scoring ---------------------------------------------------------------------------
    def logits(self, prompt: Prompt, all_tokens: bool = False, kv: Optional[KVConfig] = None) -> np.ndarray:
        """Runs ``prompt`` and returns the next-token logits: shape [n_vocab], or with
        ``all_tokens`` [n_tokens, n_vocab] (row i predicts token i+1)."""
        ids = self._ids(prompt)
        session = self._new_session(len(ids), 0, kv)
        session.prefill(ids, bool(all_tokens))
        out = session.logits()
        return out if all_tokens else out[0]

    def score_continuation(self, context: Prompt, continuation: Sequence[int], kv: Optional[KVConfig] = None) -> np.ndarray:
        """Log-probabilities of ``continuation`` tokens after ``context``, teacher-forced.

        With ``kv``, the context is prefilled and evicted first, then the continuation is scored
        against the bounded cache, which is how eviction's effect on quality is measured."""
        _check_kv(kv)
        ids = self._ids(context)
        cont = _token_ids(continuation, "the continuation")
        self._check_ids(cont)
        if not cont:
            return np.zeros(0, dtype=np.float64)
        if len(ids) + len(cont) > self.n_ctx:
            raise ValueError(f"context + continuation ({len(ids) + len(cont)} tokens) exceed n_ctx={self.n_ctx}")
        session = self._new_session(len(ids), len(cont), kv)
        session.prefill(ids)
        first = session.logits()[0].astype(np.float64)
        rows = [first]
        if len(cont) > 1 and (kv is None or kv.evict == "prefill"):
            session.decode(cont[:-1], True)
            rows.extend(session.logits().astype(np.float64))
        else:
            # Eviction during decoding works token by token, as in generation.
            for t in cont[:-1]:
                session.decode([t])
                rows.append(session.logits()[0].astype(np.float64))
        lp = []
        for row, t in zip(rows, cont):
            m = row.max()
            lp.append(row[t] - m - np.log(np.exp(row - m).sum()))
        return np.asarray(lp)

    def snapshot(self, prompt: Prompt, methods: Sequence[KVConfig], max_new_tokens: int = 256) -> "PrefillSnapshot":
        """Prefills ``prompt`` once with the full cache while computing the scores of every
        method in ``methods`` (eviction after prefill), and returns a :class:`PrefillSnapshot`
        that restores and evicts that state for any of them, at any budget, without prefilling
        again. ``max_new_tokens`` is the room left for decoding after the prompt."""
        from .snapshot import PrefillSnapshot

        for kv in methods:
            _check_kv(kv)
        ids = self._ids(prompt)
        max_new_tokens = _int("max_new_tokens", max_new_tokens, 0)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt + max_new_tokens ({len(ids) + max_new_tokens} tokens) exceed n_ctx={self.n_ctx}")
        return PrefillSnapshot(self, ids, methods, max_new_tokens)

    # --- research hooks --------------------------------------------------------------------
    def inspect_eviction(self, prompt: Prompt, kv: KVConfig, capture: bool = False) -> EvictionTrace:
        """Prefills ``prompt`` with eviction and returns the scores and the kept slots per layer
        and KV head. ``capture=True`` also returns the window queries, keys and values the
        eviction saw, so that the selection can be re-computed independently. With a quantized
        ``type_k`` the captured queries and keys are the rotated ones the cache holds, with its
        per-head offsets added back (their dot products are the model's)."""
        _check_kv(kv)
        if kv is None or kv.method == "full":
            raise ValueError("inspect_eviction needs an eviction method")
        ids = self._ids(prompt)
        session = self._new_session(len(ids), 0, kv)
        if capture:
            session.set_debug_capture(True)
        session.prefill(ids)
        hp = self.hparams
        L, H = hp["n_layer"], hp["n_head"] if kv.gqa == "expand" else hp["n_head_kv"]
        trace = EvictionTrace(
            config=kv, n_prompt=len(ids), kept=session.last_keep() if session.stats()["evictions"] else [],
            positions=[[np.asarray(session.positions(l, h)) for h in range(H)] for l in range(L)],
            scores=[[session.scores(l, h) for h in range(H)] for l in range(L)], stats=session.stats())
        if capture:
            d = session.debug_capture()
            trace.q, trace.k, trace.v, trace.pos_q = list(d["q"]), list(d["k"]), list(d["v"]), list(d["pos_q"])
            trace.k_offset = list(d["k_offset"])
        return trace
