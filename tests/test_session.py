"""Conversations (Model.session): the cache carries over between turns, stays bounded, and saves."""

import random

import numpy as np
import pytest

import pyobcache
from pyobcache import KVConfig

GREEDY = dict(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def model(smollm2_path):
    # One attention kernel for every call: a fresh chat() would otherwise pick flash attention by
    # the request's shape, and its greedy tokens may differ in the last bits.
    return pyobcache.Model(smollm2_path, n_ctx=2048, n_threads=2, flash_attn=False)


def test_full_cache_session_equals_fresh_chat_of_the_history(model):
    s = model.session(system="You are a helpful assistant.")
    s.chat("My name is Ada and I live in Paris.", **GREEDY)
    first_prompt_tokens = s.last_stats.prompt_tokens
    reply = s.chat("Where do I live?", **GREEDY)
    # The turn's own timings, not the conversation's running totals.
    assert 0 < s.last_stats.prompt_ms < s.stats.prompt_ms and s.last_stats.generation_ms < s.stats.generation_ms
    # The second turn prefilled only its own tokens, not the history again.
    assert s.last_stats.prompt_tokens < first_prompt_tokens + len(model.tokenize(reply)) + 10
    assert s.last_stats.prompt_tokens < len(model.tokenize(model.apply_chat_template(s.messages[:-1])))
    got = list(s.last_tokens)
    history = model.tokenize(model.apply_chat_template(s.messages[:-1]), add_special=False, parse_special=True)
    assert s.tokens[: len(history)] == history
    model.chat(s.messages[:-1], **GREEDY)
    want = list(model.last_tokens)
    # The same tokens as a fresh prefill of the whole history, up to a near-tie: ggml's kernels
    # round differently for different micro-batch sizes (the session prefilled the history in
    # turns), as llama.cpp's do, so greedy decoding may part where two tokens are within the
    # logit tolerance of the reference tests.
    diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diff is not None:
        top2 = np.sort(model.logits(history + want[:diff]))[-2:]
        assert top2[1] - top2[0] < 0.5, f"step {diff}: {got[diff]} vs {want[diff]}, gap {top2[1] - top2[0]:.3f}"
    else:
        assert reply == model.detokenize(want)
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_incremental_template_tokens_match_the_whole_rendering(model):
    s = model.session()
    s.chat("Count to three.", **GREEDY)
    s.chat("Now to five.", **GREEDY)
    # The sequence holds the rendered history up to the last reply, token for token as the whole
    # conversation tokenizes (the replies' own sampled tokens included).
    text = model.apply_chat_template(s.messages[:-1])
    whole = model.tokenize(text, add_special=False, parse_special=True)
    assert s.tokens[: len(whole)] == whole
    assert s.n_past == len(s.tokens)


def test_bounded_conversation_keeps_kv_bytes_flat(model):
    kv = KVConfig(budget=64, evict="decode")
    s = model.session(kv=kv)
    allocated, used = set(), []
    for i in range(8):
        s.chat(f"Tell me one fact about the number {i}.", temperature=0, max_new_tokens=16)
        st = s.stats
        allocated.add(st.kv_bytes_allocated)
        used.append(st.kv_bytes_used)
        assert max(st.kept_per_layer) <= 64 + max(model.n_batch, kv.slack)
    assert len(allocated) == 1                 # allocated once, never grown
    assert s.n_past > 4 * 64                   # the conversation outgrew the budget several times
    assert s.stats.evictions >= 4
    per_token = s.stats.kv_bytes_full // s.n_past
    assert max(used) <= (64 + kv.slack + 64) * per_token   # budget + slack + one turn's tail at most
    assert s.stats.kv_bytes_full > 3 * max(used)


def test_long_append_is_evicted_chunk_by_chunk(model):
    kv = KVConfig(method="snapkv", budget=48)
    s = model.session(kv=kv)
    doc = " ".join(f"item{i}" for i in range(700))
    s.append(doc)
    assert s.n_past > 700
    st = s.stats
    assert max(st.kept_per_layer) <= 48
    assert st.evictions >= 2
    out = s.generate(" The last item is", temperature=0, max_new_tokens=4)
    assert isinstance(out, str)


def test_raw_append_then_generate_equals_one_prompt(model):
    ids = model.tokenize("The three primary colours are red, ")
    s = model.session()
    s.append(ids[:5])
    out = s.generate(ids[5:], **GREEDY)
    assert out == model.generate(ids, **GREEDY)
    with pytest.raises(RuntimeError, match="raw text"):
        s.chat("hello")


def test_abandoned_stream_ends_its_turn_consistently(model):
    s = model.session()
    it = s.chat("Write a long poem about the sea.", stream=True, temperature=0, max_new_tokens=64)
    pieces = [next(it) for _ in range(3)]
    assert all(pieces)
    reply = s.chat("Thanks. What is 2+2?", **GREEDY)   # starts a new turn: the first one ends there
    assert isinstance(reply, str)
    assert next(it, None) is None                         # the old stream is over
    assert s.n_past == len(s.tokens)


def test_save_and_load_continue_identically(model, tmp_path):
    kv = KVConfig(method="obc-k+snapkv", budget=48, evict="decode")
    s = model.session(kv=kv, system="Be brief.")
    for q in ("Hello, I am Bob.", "I like green apples.", "What fruit do I like?"):
        s.chat(q, temperature=0, max_new_tokens=20)
    path = tmp_path / "chat.obcs"
    s.save(path)
    t = pyobcache.Session.load(model, path)
    assert t.messages == s.messages and t.tokens == s.tokens and t.n_past == s.n_past
    assert t.stats.kv_bytes_used == s.stats.kv_bytes_used
    assert t.kv == kv
    a = s.chat("And what is my name?", temperature=0, max_new_tokens=20)
    b = t.chat("And what is my name?", temperature=0, max_new_tokens=20)
    assert a == b


def test_hostile_session_files_raise_value_errors(model, tmp_path, tiny_model):
    s = model.session(kv=KVConfig(method="snapkv", budget=32))
    s.chat("Hi there.", temperature=0, max_new_tokens=8)
    good = tmp_path / "good.obcs"
    s.save(good)
    data = good.read_bytes()
    rng = random.Random(7)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        b = bytearray(data)
        kind = i % 3
        if kind == 0:
            b = b[: rng.randrange(len(b))]                       # truncated
        elif kind == 1:
            for _ in range(4):                                   # flipped bytes anywhere
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        else:
            at = rng.randrange(len(b) - 4)                       # a large integer planted
            b[at:at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff"])
        p = tmp_path / f"bad{i}.obcs"
        p.write_bytes(bytes(b))
        try:
            t = pyobcache.Session.load(model, p)
        except ValueError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        assert t.n_past == len(t.tokens)   # whatever loads is consistent enough to use
        t.generate("", temperature=0, max_new_tokens=2)
    assert outcomes["refused"] > 50
    # A state of another model is refused by name.
    path, _, _ = tiny_model()
    other = pyobcache.Model(path, n_ctx=256, n_threads=1)
    with pytest.raises(ValueError, match="another model"):
        pyobcache.Session.load(other, good)


def test_session_argument_errors(model):
    with pytest.raises(ValueError, match="budget"):
        model.session(kv=KVConfig(ratio=0.1))
    with pytest.raises(TypeError):
        model.session(kv="snapkv")
    s = model.session()
    with pytest.raises(ValueError, match="empty"):
        s.generate("", max_new_tokens=4)
    with pytest.raises(TypeError, match="unexpected"):
        s.chat("hi", max_tokens=4)
    small = pyobcache.Model(model.path, n_ctx=64, n_threads=1).session()
    with pytest.raises(ValueError, match="n_ctx"):
        small.append("word " * 100)


def _history_tokens(model, s):
    text = model.apply_chat_template(s.messages[:-1])
    return model.tokenize(text, add_special=False, parse_special=True)


def test_unstarted_and_half_read_streams_keep_history_and_tokens_in_step(model):
    s = model.session()
    never = s.chat("Say one word.", stream=True, temperature=0, max_new_tokens=8)   # never iterated
    half = s.chat("Count to ten.", stream=True, temperature=0, max_new_tokens=32)
    next(half)
    s.chat("Thanks.", temperature=0, max_new_tokens=8)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3
    assert s.messages[1]["content"] == ""                 # the unstarted turn generated nothing
    assert s.last_stats.finish_reason in ("eos", "length")
    hist = _history_tokens(model, s)
    assert s.tokens[: len(hist)] == hist                  # what the cache holds is what the history says
    assert next(half, None) is None and next(never, None) is None
    assert len(s.messages) == 6                           # ending them late adds nothing


def test_save_in_the_middle_of_a_stream(model, tmp_path):
    s = model.session()
    it = s.chat("Write a poem.", stream=True, temperature=0, max_new_tokens=32)
    next(it)
    s.save(tmp_path / "mid.obcs")
    t = pyobcache.Session.load(model, tmp_path / "mid.obcs")
    assert t.messages == s.messages and [m["role"] for m in t.messages] == ["user", "assistant"]
    assert t.tokens == s.tokens
    t.chat("Shorter, please.", temperature=0, max_new_tokens=8)
    hist = _history_tokens(model, t)
    assert t.tokens[: len(hist)] == hist


def test_a_state_asking_for_a_huge_cache_is_refused(model, tmp_path):
    s = model.session()
    s.chat("Hi.", temperature=0, max_new_tokens=4)
    s.save(tmp_path / "ok.obcs")
    data = bytearray((tmp_path / "ok.obcs").read_bytes())
    n_head = int.from_bytes(data[12:16], "little")
    blob = 16 + n_head
    assert data[blob:blob + 8] == b"OBCSTATE"
    at = blob + 8 + 4 + 8 + len("llama") + 7 * 4          # the state's n_ctx
    assert int.from_bytes(data[at:at + 4], "little") == s.n_ctx
    data[at:at + 4] = (4_000_000).to_bytes(4, "little")    # ~92 GB of KV cache for SmolLM2
    (tmp_path / "huge.obcs").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="n_ctx"):
        pyobcache.Session.load(model, tmp_path / "huge.obcs")


def test_conversations_refuse_head_wise_budgets_and_single_request_calls(model):
    with pytest.raises(ValueError, match="adaptive"):
        model.session(kv=KVConfig(method="snapkv", budget=32, head_budget="adaptive"))
    s = model.session()
    s.append("Hello there")
    with pytest.raises(RuntimeError, match="conversation"):
        s._s.decode([1, 2])
    with pytest.raises(RuntimeError, match="conversation"):
        s._s.prefill([1, 2])


def test_a_session_used_from_two_threads_errors_instead_of_corrupting(model):
    import threading

    s = model.session(kv=KVConfig(method="snapkv", budget=64, evict="decode"))
    errors, done = [], threading.Event()

    def reader():
        for _ in s.chat("Tell me a long story.", stream=True, temperature=0, max_new_tokens=64, ignore_eos=True):
            pass
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    while not done.is_set():
        try:
            s.append(" and")
        except RuntimeError as e:
            errors.append(str(e))
    t.join()
    assert all("another thread" in e for e in errors)
    assert s.n_past == len(s.tokens)
    s.generate(" The end", temperature=0, max_new_tokens=4)


def test_each_turn_reports_itself_through_the_engine_request(model):
    # A turn is an engine Request on the conversation: its report counts this turn's tokens and
    # time only, and an abandoned turn says so.
    s = model.session(kv=KVConfig("snapkv", budget=64, evict="decode"))
    s.generate("Name three colours:", temperature=0, max_new_tokens=12)
    first = s.last_stats
    ids = model.tokenize(" And three animals?", add_special=False)
    s.generate(ids, temperature=0, max_new_tokens=12, ignore_eos=True)
    second = s.last_stats
    assert second.prompt_tokens == len(ids)
    assert second.generated_tokens == len(s.last_tokens) > 0
    assert 0 < second.prompt_ms and 0 < second.generation_ms
    assert second.prompt_ms + first.prompt_ms <= s.stats.prompt_ms + 1e-6
    assert second.tokens_seen > first.tokens_seen and second.kv_bytes_used <= second.kv_bytes_allocated
    it = s.generate(" More:", stream=True, temperature=0, max_new_tokens=32, ignore_eos=True)
    next(it)
    s.append(" Stop.")                                    # ends the turn in flight
    assert s.last_stats.finish_reason == "abandoned" and s.last_stats.generated_tokens >= 1
    with pytest.raises(Exception, match="conversation"):
        pyobcache._core.Request.turn(model._new_session(8, 4, None), [1, 2], 4, 0.0, 0, 1.0, 0.0, 1.0, 64, 0, [], False)
