"""llama-cpp-python's ``Llama`` surface over pyobcache, so that its users change one import.

    from pyobcache import Llama            # instead of: from llama_cpp import Llama
    llm = Llama("model.gguf", n_ctx=2048, kv=pyobcache.KVConfig(budget=512))
    llm("Q: Name the planets. A:", max_tokens=32, stop=["Q:"])["choices"][0]["text"]
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}])

The responses are the OpenAI-shaped dicts and stream chunks llama-cpp-python 0.3 returns (the
same keys and types; ``usage`` also reports the KV bytes), and the HTTP server builds on them.
``kv`` is the one extra keyword: a bounded, evicted KV cache for the model or for one request.
Options that would change results and that pyobcache does not implement (grammars, mirostat,
logit bias, frequency/presence penalties, JSON mode) raise ValueError instead of being ignored.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _core
from .kv import KVConfig
from .model import Model, _check_kv, _generation_args, text_pieces

__all__ = ["Llama", "LLAMA_DEFAULT_SEED"]

LLAMA_DEFAULT_SEED = 0xFFFFFFFF

# Constructor options of llama_cpp.Llama that do not change what the model computes here.
_HARMLESS_INIT = {"use_mmap", "use_mlock", "verbose", "numa", "main_gpu", "split_mode", "tensor_split", "offload_kqv",
                  "op_offload", "n_ubatch", "n_threads_batch", "logits_all", "no_perf", "last_n_tokens_size",
                  "chat_format", "embedding", "swa_full"}

# pyobcache's own thread options, passed on to Model.
_THREAD_OPTS = {"adaptive_threads", "poll", "prio", "cpu_mask", "cpu_strict"}

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "abandoned": "length"}


def _unsupported(**given) -> None:
    """Options whose llama-cpp-python default means "off": anything else is refused."""
    defaults = dict(suffix=None, typical_p=1.0, frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0,
                    mirostat_mode=0, stopping_criteria=None, logits_processor=None, grammar=None, logit_bias=None,
                    functions=None, function_call=None, tools=None, tool_choice=None)
    for k, v in given.items():
        if v != defaults[k] and v is not None:
            raise ValueError(f"{k}={v!r} is not supported by pyobcache")


@dataclass
class _Run:
    """One request's engine state; as a context manager it hands a cached conversation back."""

    session: object
    gen: object
    kv: Optional[KVConfig]
    n_cached: int                     # prompt tokens the cache already held
    cache: Optional["_PromptCache"]

    def __enter__(self) -> "_Run":
        return self

    def __exit__(self, *exc) -> None:
        if self.cache is not None:
            self.cache.give_back(self.session, self.kv)


class _PromptCache:
    """Conversations kept from earlier requests. A request whose prompt extends one of their whole
    sequences continues it, prefilling only the new tokens; otherwise a new conversation starts.
    Each is used by one request at a time; the least recently used beyond ``size`` are dropped."""

    def __init__(self, model: Model, size: int) -> None:
        self.model, self.size = model, max(1, size)
        self._idle: list = []     # (kv, session), most recently used last
        self._lock = threading.Lock()

    def take(self, ids: list, kv: Optional[KVConfig]):
        """(session, tokens already in it), or None when a conversation cannot hold this kv."""
        with self._lock:
            best, best_len = None, -1
            for i, (k, s) in enumerate(self._idle):
                seq = s.sequence
                if k == kv and best_len < len(seq) < len(ids) and ids[: len(seq)] == seq:
                    best, best_len = i, len(seq)
            if best is not None:
                return self._idle.pop(best)[1], best_len
        try:
            s = self.model._new_conversation(kv, self.model.n_ctx)
        except ValueError:   # a ratio or head-wise budget: one session per request, as without the cache
            return None
        return s, 0

    def give_back(self, session, kv: Optional[KVConfig]) -> None:
        session.end_turn()
        with self._lock:
            self._idle.append((kv, session))
            del self._idle[: max(0, len(self._idle) - self.size)]


class Llama:
    """A GGUF model with llama_cpp.Llama's methods and return shapes.

    ``n_ctx=0`` takes the model's training context, as llama-cpp-python does. ``seed`` is the
    default seed of every request (``LLAMA_DEFAULT_SEED``: a random one each time). ``kv``
    bounds the KV cache of every request unless a request gives its own. ``prompt_cache=N``
    keeps the caches of the last N requests (as llama-server's ``cache_prompt`` does): a prompt
    that extends one of those whole sequences, as a chat client's next request does, prefills only
    its new tokens, and with a bounded ``kv`` the conversation stays in bounded memory (usage
    reports ``prompt_tokens_details.cached_tokens``). The underlying :class:`pyobcache.Model` is
    ``self.model``.
    """

    def __init__(self, model_path: str, *, n_ctx: int = 512, n_batch: int = 512, n_threads: Optional[int] = None,
                 n_gpu_layers: int = 0, seed: int = LLAMA_DEFAULT_SEED, flash_attn: bool = False,
                 kv: Optional[KVConfig] = None, prompt_cache: int = 0, type_k: Union[int, str, None] = None,
                 type_v: Union[int, str, None] = None, **kwargs) -> None:
        bad = set(kwargs) - _HARMLESS_INIT - _THREAD_OPTS
        if bad:
            raise ValueError(f"llama_cpp.Llama option(s) not supported by pyobcache: {', '.join(sorted(bad))}")
        _check_kv(kv)
        self.model_path = str(model_path)
        self.model = Model(model_path, n_ctx=max(int(n_ctx), 1), n_threads=n_threads, n_batch=n_batch,
                           n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                           **{k: v for k, v in kwargs.items() if k in _THREAD_OPTS})
        if int(n_ctx) == 0:
            self.model.n_ctx = self.model.hparams["n_ctx_train"]
        self.seed = int(seed)
        # llama_cpp passes the cache types as ggml type ids (GGML_TYPE_Q8_0 = 8); names work too.
        types = {k: _core.kv_cache_type_name(v) if isinstance(v, int) else v
                 for k, v in (("type_k", type_k), ("type_v", type_v)) if v is not None}
        if types:
            kv = (kv or KVConfig("full")).replace(**types)
        self.kv = kv
        self._cache = _PromptCache(self.model, int(prompt_cache)) if prompt_cache else None
        self.verbose = bool(kwargs.get("verbose", True))

    # --- model facts, as llama_cpp.Llama has them -----------------------------------------
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def n_embd(self) -> int:
        return self.model.hparams["n_embd"]

    def token_bos(self) -> int:
        return self.model._m.bos

    def token_eos(self) -> int:
        return self.model._m.eos

    @property
    def metadata(self) -> dict:
        return {"general.architecture": self.model.arch, "tokenizer.chat_template": self.model.chat_template}

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"tokenize takes bytes, as llama_cpp.Llama does, not {type(text).__name__}")
        return self.model.tokenize(bytes(text).decode("utf-8", errors="replace"), add_special=add_bos,
                                   parse_special=special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None, special: bool = False) -> bytes:
        self.model._check_ids(tokens)
        return self.model._m.detokenize(list(tokens), bool(special))

    # --- completions ----------------------------------------------------------------------
    def _seed(self, seed: Optional[int]) -> Optional[int]:
        s = self.seed if seed is None else int(seed)
        return None if s == LLAMA_DEFAULT_SEED else s

    def _max_new(self, max_tokens: Optional[int], n_prompt: int) -> int:
        room = self.model.n_ctx - n_prompt
        if room <= 0:
            raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self.model.n_ctx}")
        return room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)

    def _engine(self, ids: list, args: tuple, kv: Optional[KVConfig], n_logprobs: int, cache_prompt: bool = True):
        """The engine generator for a request, and the _Run that says what it used."""
        _check_kv(kv)
        kv = kv if kv is not None else self.kv
        if self._cache is not None and cache_prompt:
            taken = self._cache.take(ids, kv)
            if taken is not None:
                session, n_cached = taken
                try:
                    req = _core.Request.turn(session, ids[n_cached:], *args, n_logprobs)
                except BaseException:
                    self._cache.give_back(session, kv)
                    raise
                return _Run(session, req, kv, n_cached, self._cache)
        req = self.model._new_request(ids, args, kv, n_logprobs)
        return _Run(req.session, req, kv, 0, None)

    def _usage(self, run: "_Run", n_prompt: int, n_gen: int) -> dict:
        s = run.session.stats()
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": run.n_cached},
                "kv_bytes_used": int(s["kv_bytes_used"]), "kv_bytes_allocated": int(s["kv_bytes_allocated"]),
                "kv_bytes_full": int(s["kv_bytes_full"])}

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None,
                          max_tokens: Optional[int] = 16, temperature: float = 0.8, top_p: float = 0.95,
                          min_p: float = 0.05, typical_p: float = 1.0, logprobs: Optional[int] = None,
                          echo: bool = False, stop: Optional[Union[str, List[str]]] = None,
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: Optional[int] = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: Optional[str] = None, stopping_criteria=None, logits_processor=None, grammar=None,
                          logit_bias=None, kv: Optional[KVConfig] = None, cache_prompt: bool = True):
        """llama_cpp.Llama.create_completion: a dict, or with ``stream=True`` an iterator of chunks."""
        _unsupported(suffix=suffix, typical_p=typical_p, frequency_penalty=frequency_penalty,
                     presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                     stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
                     logit_bias=logit_bias)
        if logprobs is not None and int(logprobs) < 0:
            raise ValueError("logprobs must be >= 0")
        if echo and logprobs is not None and stream:
            raise ValueError("echo with logprobs is not supported with stream=True")
        ids = self.model._ids(prompt) if isinstance(prompt, str) else self.model._ids(list(prompt))
        prompt_text = prompt if isinstance(prompt, str) else self.model.detokenize(ids)
        args = _generation_args(self._max_new(max_tokens, len(ids)), temperature, top_k, top_p, min_p, repeat_penalty,
                                64, self._seed(seed), stop, False)
        n_lp = -1 if logprobs is None else int(logprobs)
        run = self._engine(ids, args, kv, n_lp, cache_prompt)
        meta = dict(id=f"cmpl-{uuid.uuid4()}", object="text_completion", created=int(time.time()),
                    model=model or self.model_path)
        it = self._completion_chunks(meta, run, ids, prompt_text if echo else "", n_lp)
        if stream:
            return it
        text, lp, finish, usage = "", None, None, None
        for chunk in it:
            c = chunk["choices"][0]
            text += c["text"]
            if c["logprobs"] is not None:
                if lp is None:
                    lp = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
                for k in lp:
                    lp[k].extend(c["logprobs"][k])
            finish = c["finish_reason"] or finish
            usage = chunk.get("usage", usage)
        if echo and n_lp >= 0:
            lp = self._echo_logprobs(ids, n_lp, lp)
        return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
                "usage": usage}

    __call__ = create_completion

    def _completion_chunks(self, meta: dict, run: "_Run", ids: list, echo_text: str, n_lp: int) -> Iterator[dict]:
        with run:
            yield from self._completion_body(meta, run, ids, echo_text, n_lp)

    def _completion_body(self, meta: dict, run: "_Run", ids: list, echo_text: str, n_lp: int) -> Iterator[dict]:
        gen = run.gen
        offset = len(self.model.detokenize(ids))
        n_done = 0
        if echo_text:
            yield {**meta, "choices": [{"text": echo_text, "index": 0, "logprobs": None, "finish_reason": None}]}
        for text in text_pieces(gen):
            lp = None
            if n_lp >= 0:
                lp, offset, n_done = self._token_logprobs(gen, n_done, offset)
            yield {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": None}]}
        lp = None
        if n_lp >= 0 and n_done < len(gen.logprobs):   # tokens whose text was held back or cut by a stop
            lp, offset, n_done = self._token_logprobs(gen, n_done, offset)
        self.model.last_tokens = list(gen.generated)
        self.model.last_stats = self.model._request_stats(gen, run.kv)
        yield {**meta, "choices": [{"text": "", "index": 0, "logprobs": lp,
                                    "finish_reason": _FINISH.get(gen.finish_reason, "length")}],
               "usage": self._usage(run, len(ids), len(gen.generated))}

    def _token_logprobs(self, gen, n_done: int, offset: int):
        toks = list(gen.generated)
        lps = gen.logprobs
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for i in range(n_done, len(lps)):
            piece = self.model.detokenize([toks[i]])
            lp, top = lps[i]
            alts = {self.model.detokenize([t]): float(v) for t, v in top}
            alts[piece] = float(lp)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(float(lp))
            out["top_logprobs"].append(alts)
            offset += len(piece)
        return out, offset, len(lps)

    def _echo_logprobs(self, ids: list, n_lp: int, gen_lp: Optional[dict]) -> dict:
        # The prompt's own tokens, teacher-forced: the first has no logprob, as in llama-cpp-python.
        # That keeps a row of logits per prompt token: bounded, so that one request cannot take
        # gigabytes (4096 tokens of a 150k vocabulary would be 2.5 GB).
        if len(ids) * self.model.n_vocab > 2**28:
            raise ValueError(f"echo with logprobs keeps logits for every prompt token: at most "
                             f"{2**28 // self.model.n_vocab} tokens with this vocabulary, got {len(ids)}")
        rows = self.model.logits(ids, all_tokens=True) if len(ids) > 1 else np.zeros((1, 1), dtype=np.float32)
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        offset = 0
        for i, t in enumerate(ids):
            piece = self.model.detokenize([t])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if i == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            row = rows[i - 1].astype(np.float64)
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            top = np.argsort(-row, kind="stable")[:n_lp]
            alts = {self.model.detokenize([int(j)]): float(row[j] - lse) for j in top}
            alts[piece] = float(row[t] - lse)
            out["token_logprobs"].append(float(row[t] - lse))
            out["top_logprobs"].append(alts)
        if gen_lp:
            for k in out:
                out[k].extend(gen_lp[k])
        return out

    # --- chat -----------------------------------------------------------------------------
    def create_chat_completion(self, messages: List[dict], functions=None, function_call=None, tools=None,
                               tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: Optional[Union[str, List[str]]] = None, seed: Optional[int] = None,
                               response_format: Optional[dict] = None, max_tokens: Optional[int] = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: Optional[str] = None,
                               logits_processor=None, grammar=None, logit_bias=None, logprobs: Optional[bool] = None,
                               top_logprobs: Optional[int] = None, kv: Optional[KVConfig] = None,
                               cache_prompt: bool = True):
        """llama_cpp.Llama.create_chat_completion, with the model's own chat template."""
        _unsupported(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                     typical_p=typical_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     tfs_z=tfs_z, mirostat_mode=mirostat_mode, logits_processor=logits_processor, grammar=grammar,
                     logit_bias=logit_bias)
        if response_format is not None and response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {response_format.get('type')!r} is not supported by pyobcache "
                             "(it has no constrained decoding yet)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list")
        msgs = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError("each message must be a dict with a 'role'")
            content = m.get("content")
            if isinstance(content, list):   # OpenAI content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise ValueError("each message needs a 'content' string")
            msgs.append({"role": m["role"], "content": content})
        text = self.model.apply_chat_template(msgs)
        ids = self.model.tokenize(text, add_special=False, parse_special=True)
        if self.model._m.add_bos and (not ids or ids[0] != self.model._m.bos):
            ids = [self.model._m.bos] + ids
        ids = self.model._ids(ids)
        n_lp = -1
        if logprobs:
            n_lp = 0 if top_logprobs is None else int(top_logprobs)
            if n_lp < 0:
                raise ValueError("top_logprobs must be >= 0")
        args = _generation_args(self._max_new(max_tokens, len(ids)), temperature, top_k, top_p, min_p, repeat_penalty,
                                64, self._seed(seed), stop, False)
        run = self._engine(ids, args, kv, n_lp, cache_prompt)
        meta = dict(id=f"chatcmpl-{uuid.uuid4()}", object="chat.completion", created=int(time.time()),
                    model=model or self.model_path)
        it = self._chat_chunks(meta, run, ids, n_lp)
        if stream:
            return it
        content, lp, finish, usage = "", None, None, None
        for chunk in it:
            c = chunk["choices"][0]
            content += c["delta"].get("content", "")
            if c["logprobs"] is not None:
                lp = lp or {"content": [], "refusal": None}
                lp["content"].extend(c["logprobs"]["content"])
            finish = c["finish_reason"] or finish
            usage = chunk.get("usage", usage)
        return {**meta, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "logprobs": lp, "finish_reason": finish}], "usage": usage}

    def _chat_logprobs(self, gen, n_done: int) -> list:
        toks, lps = list(gen.generated), gen.logprobs
        out = []
        for i in range(n_done, len(lps)):
            tok_lp, top = lps[i]
            out.append({"token": self.model.detokenize([toks[i]]), "logprob": float(tok_lp), "bytes": None,
                        "top_logprobs": [{"token": self.model.detokenize([t]), "logprob": float(v), "bytes": None}
                                         for t, v in top]})
        return out

    def _chat_chunks(self, meta: dict, run: "_Run", ids: list, n_lp: int) -> Iterator[dict]:
        with run:
            yield from self._chat_body(meta, run, ids, n_lp)

    def _chat_body(self, meta: dict, run: "_Run", ids: list, n_lp: int) -> Iterator[dict]:
        gen = run.gen
        meta = {**meta, "object": "chat.completion.chunk"}
        yield {**meta, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                    "finish_reason": None}]}
        n_done = 0
        for text in text_pieces(gen):
            lp = None
            if n_lp >= 0:
                lp = {"content": self._chat_logprobs(gen, n_done), "refusal": None}
                n_done = len(lp["content"]) + n_done
            yield {**meta, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}]}
        lp = None
        if n_lp >= 0 and n_done < len(gen.logprobs):   # tokens whose text was held back or cut by a stop
            lp = {"content": self._chat_logprobs(gen, n_done), "refusal": None}
        self.model.last_tokens = list(gen.generated)
        self.model.last_stats = self.model._request_stats(gen, run.kv)
        yield {**meta, "choices": [{"index": 0, "delta": {}, "logprobs": lp,
                                    "finish_reason": _FINISH.get(gen.finish_reason, "length")}],
               "usage": self._usage(run, len(ids), len(gen.generated))}
