"""Conversations that keep their KV cache from one turn to the next.

A :class:`Session` holds one token sequence in one engine context. Each turn prefills only its
new tokens, the positions stay absolute, and with a bounded :class:`~pyobcache.KVConfig` the
cache never grows past ``budget + max(n_batch, slack)`` slots, so a conversation can run for as
long as its positions fit ``n_ctx`` in a fixed amount of memory.

Chat turns are rendered with the model's chat template incrementally: the whole conversation is
rendered again, the text the cache already holds must be its prefix, and only the rest (the end
of the last reply, the new user message, the generation prompt) is tokenized and appended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from . import _core
from .kv import KVConfig
from .model import GenerationStats, Model, Progress, _check_kv, _generation_args, _int, _token_ids, set_progress, text_pieces

__all__ = ["Session", "SessionStats"]

_FILE_MAGIC = b"PYOBCSES"
_FILE_VERSION = 1
_MAX_HEADER = 64 * 2**20   # the JSON part of a saved session (the chat history)

# Model.generate's sampling keywords and their defaults (its signature owns them), in the order
# _generation_args takes them; Session.generate and Session.chat accept the same.
_GENERATE_DEFAULTS = {name: p.default for name, p in inspect.signature(Model.generate).parameters.items()
                      if name not in ("self", "prompt", "kv", "stream", "progress")}


@dataclass
class SessionStats:
    """Where a conversation stands: its length, what its cache holds, what eviction did."""

    turns: int
    n_past: int                # positions the sequence has reached (tokens seen, evicted ones included)
    n_ctx: int                 # the most positions it may reach
    kv_method: str
    budget: int
    kept_per_layer: list
    evictions: int
    kv_bytes_allocated: int
    kv_bytes_used: int
    kv_bytes_full: int         # what the full cache would hold for the whole sequence
    score_ms: float
    compact_ms: float
    prompt_ms: float           # summed over the turns
    generation_ms: float


@dataclass
class _Turn:
    req: object              # the engine's request for this turn (_core.Request.turn)
    ids: list                # the tokens this turn appended before generating
    n_before: int            # the sequence's length when it started
    chat_msg: Optional[dict]
    reply: list = dataclasses.field(default_factory=list)
    finished: bool = False


def _generate_args(kwargs: dict) -> tuple:
    unknown = set(kwargs) - set(_GENERATE_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    a = {**_GENERATE_DEFAULTS, **kwargs}
    return _generation_args(*(a[k] for k in _GENERATE_DEFAULTS))


class Session:
    """A conversation with one model whose KV cache carries over from turn to turn.

    Create it with :meth:`pyobcache.Model.session`::

        s = m.session(kv=pyobcache.KVConfig(budget=256, evict="decode"), system="Be brief.")
        s.chat("My name is Ada.", temperature=0)
        s.chat("What is my name?", temperature=0)
        s.stats.kv_bytes_used          # bounded, however many turns follow

    :meth:`chat` takes a user message and returns the reply; :meth:`append` and :meth:`generate`
    work on raw text (a document, then questions about it). Sampling keywords are those of
    :meth:`Model.generate`. A session runs one turn at a time: use one session per thread.
    """

    def __init__(self, model, kv: Optional[KVConfig] = None, system: Optional[str] = None,
                 n_ctx: Optional[int] = None, progress: Progress = None, _state: Optional[bytes] = None,
                 _meta: Optional[dict] = None) -> None:
        _check_kv(kv)
        if kv is not None and kv.method == "full" and (kv.type_k, kv.type_v) == ("f16", "f16"):
            kv = None   # the plain full cache
        self.model = model
        self.kv = kv
        if _state is not None:
            # A saved state may not ask for more positions than a new session of this model could.
            limit = max(model.n_ctx, model.hparams["n_ctx_train"]) if n_ctx is None else _int("n_ctx", n_ctx, 1)
            self._s = _core.Session.load_state(model._m, model._threads, _state, limit)
        else:
            if n_ctx is None:
                bounded = kv is not None and kv.method != "full"
                n_ctx = max(model.n_ctx, model.hparams["n_ctx_train"]) if bounded else model.n_ctx
            self._s = model._new_conversation(kv, _int("n_ctx", n_ctx, 1))
        set_progress(self._s, progress)
        meta = _meta or {}
        # The chat history as the caller sees it, and as the template renders it (a reply cut by a
        # stop string is whole there: the cache holds all of it).
        self.messages: list = list(meta.get("messages", []))
        self._history: list = list(meta.get("history", []))
        if system is not None and _state is None:
            if not isinstance(system, str):
                raise TypeError("system must be a str")
            self.messages.append({"role": "system", "content": system})
            self._history.append({"role": "system", "content": system})
        # The chat text the sequence holds; None once raw text was appended (chat() then refuses).
        self._rendered: Optional[str] = meta.get("rendered", "")
        self.turns: int = int(meta.get("turns", 0))
        self._eog_text: str = str(meta.get("eog_text", ""))
        self.last_stats: Optional[GenerationStats] = None
        self.last_tokens: list = []
        self._turn: Optional[_Turn] = None
        self._pending_render = ""
        self._lock = threading.RLock()

    # --- facts -----------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._s.n_ctx

    @property
    def n_past(self) -> int:
        """Tokens in the sequence, evicted ones included (its last token is decoded when the
        next turn starts)."""
        return self._s.sequence_size

    @property
    def tokens(self) -> list:
        """Every token of the sequence, in order (the cache may hold only some of them)."""
        return list(self._s.sequence)

    @property
    def stats(self) -> SessionStats:
        s = self._s.stats()
        t = self._s.timings()
        return SessionStats(
            turns=self.turns, n_past=self.n_past, n_ctx=self.n_ctx, kv_method=self.kv.method if self.kv else "full",
            budget=s["budget"], kept_per_layer=list(s["kept_per_layer"]), evictions=s["evictions"],
            kv_bytes_allocated=s["kv_bytes_allocated"], kv_bytes_used=s["kv_bytes_used"],
            kv_bytes_full=s["kv_bytes_full"], score_ms=s["score_ms"], compact_ms=s["compact_ms"],
            prompt_ms=t["prompt_ms"], generation_ms=t["gen_ms"])

    def __repr__(self) -> str:
        return (f"Session(turns={self.turns}, n_past={self.n_past}, n_ctx={self.n_ctx}, "
                f"kv={self.kv.describe() if self.kv else 'full'})")

    # --- raw text --------------------------------------------------------------------------
    def _ids(self, text: Union[str, Sequence[int]]) -> list:
        if isinstance(text, str):
            # BOS (where the model wants one) only at the very start of the sequence.
            return self.model.tokenize(text, add_special=self._s.sequence_size == 0) if text else []
        ids = _token_ids(text, "the text")
        self.model._check_ids(ids)
        return ids

    def append(self, text: Union[str, Sequence[int]]) -> None:
        """Appends text (or token ids) to the sequence: it is prefilled, and evicted as the
        session's KVConfig says, without generating."""
        with self._exclusive():
            self._end_turn()
            ids = self._ids(text)
            self._s.append(ids)
            self._rendered = None

    def generate(self, prompt: Union[str, Sequence[int]] = "", stream: bool = False,
                 **kwargs) -> Union[str, Iterator[str]]:
        """Continues the sequence after ``prompt`` (which may be empty); keywords as in
        :meth:`Model.generate`. The reply stays in the sequence."""
        args = _generate_args(kwargs)
        with self._exclusive():
            self._end_turn()
            it = self._start(self._ids(prompt), args, None)
            self._rendered = None
        return it if stream else "".join(it)

    # --- chat ------------------------------------------------------------------------------
    def chat(self, message: Union[str, dict], stream: bool = False, **kwargs) -> Union[str, Iterator[str]]:
        """Sends a user message (a str, or a {"role", "content"} dict) and returns the reply;
        keywords as in :meth:`Model.generate`. Only the new tokens are prefilled. A stream left
        unfinished ends when the next turn starts; what it generated stays in the conversation."""
        msg = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        if not isinstance(msg.get("content"), str) or not isinstance(msg.get("role"), str):
            raise ValueError("a message must be a str or a dict with str 'role' and 'content'")
        args = _generate_args(kwargs)
        with self._exclusive():
            self._end_turn()
            ids = self._chat_ids(self._history + [msg])
            it = self._start(ids, args, msg)
            self.messages.append(msg)
            self._history.append(msg)
        return it if stream else "".join(it)

    def _chat_ids(self, history: list) -> list:
        if self._rendered is None:
            raise RuntimeError("this session holds raw text (append/generate); chat() needs a session that only chats")
        text = self.model.apply_chat_template(history, add_generation_prompt=True)
        held = self._rendered
        if not text.startswith(held):
            # A reply that ended with an end-of-generation token the template does not write
            # there (say <|endoftext|> where it closes turns with <|im_end|>): the cache keeps it.
            eog = self._eog_text
            if eog and held.endswith(eog) and text.startswith(held[: -len(eog)]):
                held = held[: -len(eog)]
            else:
                raise RuntimeError("the chat template does not render the conversation so far as a prefix of the next "
                                   "turn, so the turn cannot be appended to the cache (start a new session)")
        delta = text[len(held):]
        ids = self.model.tokenize(delta, add_special=False, parse_special=True)
        if self._s.sequence_size == 0 and self.model._m.add_bos and (not ids or ids[0] != self.model._m.bos):
            ids = [self.model._m.bos] + ids
        self._pending_render = text
        return ids

    # --- the turn loop ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self):
        # One thread at a time: the engine's turn bookkeeping is not shared-state safe.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this session is in use by another thread (use one session per thread)")
        try:
            yield
        finally:
            self._lock.release()

    def _start(self, ids: list, args: tuple, chat_msg: Optional[dict]) -> Iterator[str]:
        n_before = self._s.sequence_size
        turn = _Turn(_core.Request.turn(self._s, ids, *args), ids, n_before, chat_msg)
        self._turn = turn
        return self._stream(turn)

    def _stream(self, turn: "_Turn") -> Iterator[str]:
        try:
            for text in text_pieces(turn.req, self._exclusive):
                turn.reply.append(text)
                yield text
            turn.finished = True
        finally:
            with self._lock:
                if self._turn is turn:
                    self._end_turn()

    def _end_turn(self) -> None:
        """Records the turn in flight (finished, abandoned or never started) in the history, once:
        the engine then holds its tokens, and the text the cache holds is known again."""
        turn, self._turn = self._turn, None
        if turn is None:
            return
        generated = list(turn.req.generated)
        self._s.end_turn()   # the engine adds the turn's tokens to the sequence
        self.turns += 1
        self.last_tokens = generated
        if turn.chat_msg is not None:
            full = self.model.detokenize(generated)
            self.messages.append({"role": "assistant", "content": "".join(turn.reply) if turn.finished else full})
            self._history.append({"role": "assistant", "content": full})
            eog_text = ""
            if self._s.sequence_size > turn.n_before + len(turn.ids) + len(generated):   # it ended with an end-of-generation token
                eog_text = self.model._m.token_text(self._s.sequence[-1]).decode("utf-8", "replace")
            self._eog_text = eog_text
            self._rendered = self._pending_render + full + eog_text
        stats = self.model._request_stats(turn.req, self.kv)
        self.last_stats = stats if turn.finished else dataclasses.replace(stats, finish_reason="abandoned")

    # --- saving ----------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the whole conversation (history, tokens, KV cache, eviction scores) to ``path``;
        :meth:`Session.load` resumes it with the same model."""
        with self._exclusive():
            self._end_turn()   # a stream in flight ends here, so that the history matches the tokens
            self._save(path)

    def _save(self, path) -> None:
        meta = dict(messages=self.messages, history=self._history, rendered=self._rendered, turns=self.turns,
                    eog_text=self._eog_text,
                    kv=None if self.kv is None else {f.name: getattr(self.kv, f.name) for f in dataclasses.fields(self.kv)})
        head = json.dumps(meta).encode("utf-8")
        state = self._s.save_state()
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_FILE_MAGIC + struct.pack("<II", _FILE_VERSION, len(head)) + head + state)
        os.replace(tmp, path)

    @classmethod
    def load(cls, model, path: Union[str, os.PathLike], n_ctx: Optional[int] = None) -> "Session":
        """Resumes a conversation saved by :meth:`save`. The file is checked before it is used:
        a file of another model, a truncated or altered one gives a ValueError saying what is wrong.
        ``n_ctx`` (default: as :meth:`Model.session`) bounds the positions a file may ask for."""
        data = Path(path).read_bytes()
        n_fixed = len(_FILE_MAGIC) + 8
        if len(data) < n_fixed or data[: len(_FILE_MAGIC)] != _FILE_MAGIC:
            raise ValueError(f"{path} is not a saved pyobcache session")
        version, n_head = struct.unpack_from("<II", data, len(_FILE_MAGIC))
        if version != _FILE_VERSION:
            raise ValueError(f"{path}: session file version {version}, this pyobcache reads version {_FILE_VERSION}")
        if n_head > min(_MAX_HEADER, len(data) - n_fixed):
            raise ValueError(f"{path}: the session header is truncated")
        try:
            meta = json.loads(data[n_fixed:n_fixed + n_head].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            kv = None if meta.get("kv") is None else KVConfig(**meta["kv"])
            for key in ("messages", "history"):
                if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in meta.get(key, [])):
                    raise ValueError(f"bad {key}")
            if not isinstance(meta.get("rendered", ""), (str, type(None))) or not isinstance(meta.get("turns", 0), int):
                raise ValueError("bad fields")
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the session header is invalid ({e})") from None
        return cls(model, kv=kv, n_ctx=n_ctx, _state=data[n_fixed + n_head:], _meta=meta)
