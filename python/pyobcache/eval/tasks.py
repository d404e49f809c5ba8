"""RULER-style synthetic long-context tasks, generated deterministically from a seed.

Every task builds a prompt of a target length in the model's own tokens: an instruction, a
context (natural prose with needles inserted, or a word list), a question, and an answer prefix
that the model continues. The tasks follow RULER (Hsieh et al., 2024): needle-in-a-haystack
(single, multi-key, multi-value, multi-query), variable tracking, common-words and
frequent-words extraction. Answers are scored by string match as RULER does: ``all`` is the
fraction of reference strings found in the output, ``part`` is 1 if any is found.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

from .haystack import Page

__all__ = ["Sample", "TASKS", "make_sample", "score_all", "score_part", "score_sample", "prompt_ids"]


@dataclass
class Sample:
    task: str
    length: int                  # target prompt length in tokens
    index: int
    seed: int
    context: str                 # instruction + context + question (the user turn)
    answer_prefix: str           # what the assistant turn starts with
    answers: List[str]
    metric: str                  # "all" or "part"
    max_new_tokens: int
    meta: Dict = field(default_factory=dict)


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of the answers found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def score_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part: 1 if any answer is found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return float(any(a.lower() in p for a in answers))


def score_sample(sample: Sample, prediction: str) -> float:
    return (score_all if sample.metric == "all" else score_part)(prediction, sample.answers)


def prompt_ids(model, sample: Sample) -> List[int]:
    """Token ids of the sample's prompt, in the model's chat template when it has one."""
    return _encode(model, sample.context, sample.answer_prefix)


def _encode(model, context: str, answer_prefix: str) -> List[int]:
    if not model.chat_template:
        return model.tokenize(context + "\n\n" + answer_prefix)
    text = model.apply_chat_template([{"role": "user", "content": context}]) + answer_prefix
    ids = model.tokenize(text, add_special=False, parse_special=True)
    bos = model._m.bos
    return [bos] + ids if model._m.add_bos and bos >= 0 and (not ids or ids[0] != bos) else ids


# --- building blocks -----------------------------------------------------------------------

_ADJ = ("amber ancient brave bright calm clever crimson curious distant eager fancy gentle golden hidden humble "
        "icy jolly lively lucky misty noble odd quiet rapid rustic silent silver sleepy smooth solemn steady "
        "sturdy sunny swift tidy vivid wandering wise witty young").split()
_NOUN = ("anchor badger beacon canyon castle comet compass falcon forest garden harbor island lantern meadow "
         "mirror orchard otter pebble pilot prairie quarry raven river saddle canvas shelter signal spruce "
         "summit thimble tower valley violin walnut willow window zephyr").split()


def _sentences(pages: Sequence[Page], rng: random.Random) -> Callable[[int], List[str]]:
    """n -> the first n sentences of the corpus from a seeded starting paragraph (wrapping)."""
    paras = [p for page in pages for p in page.paragraphs]
    start = rng.randrange(len(paras))
    cache: List[str] = []
    i = start

    def first(n: int) -> List[str]:
        nonlocal i
        while len(cache) < n:
            cache.extend(s for s in re.split(r"(?<=[.!?])\s+", paras[i % len(paras)]) if s)
            i += 1
        return cache[:n]

    return first


def _fit(build: Callable[[int], str], count: Callable[[str], int], length: int, hi: int, limit: int = 1 << 22,
         least: int = 0) -> str:
    """The text build(n) for the largest n in [least, limit] whose token count stays within length."""
    lo = least
    while count(build(hi)) <= length:   # grow the upper bound until it overflows
        if hi >= limit:
            raise ValueError(f"this task cannot fill {length} tokens")
        lo, hi = hi, min(hi * 2, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    best = build(lo)
    if lo == least and count(best) > length:
        raise ValueError(f"a prompt of {length} tokens cannot hold this task's instructions")
    return best


def _insert(sentences: List[str], items: Sequence[str], rng: random.Random, ordered: bool = False) -> List[str]:
    """Inserts items between sentences at seeded depths (in the given order when ordered)."""
    slots = [rng.randint(0, len(sentences)) for _ in items]
    if ordered:
        slots.sort()
    out = list(sentences)
    # From the back, so earlier slots keep their meaning; equal slots keep the items' order.
    for slot, item in sorted(zip(slots, items), key=lambda t: t[0], reverse=True):
        out.insert(slot, item)
    return out


def _value(kind: str, rng: random.Random, words: Sequence[str]) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice([w for w in words if len(w) >= 7])


def _keys(rng: random.Random, n: int) -> List[str]:
    keys: List[str] = []
    while len(keys) < n:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in keys:
            keys.append(k)
    return keys


def _vocabulary(pages: Sequence[Page]) -> List[str]:
    words = {w for page in pages[:40] for p in page.paragraphs for w in re.findall(r"\b[a-z]{4,10}\b", p)}
    return sorted(words)


_KIND_NAMES = {"number": ("number", "numbers"), "uuid": ("uuid", "uuids"), "word": ("word", "words")}
_NEW_TOKENS = {"number": 16, "uuid": 40, "word": 12}


def _join(keys: Sequence[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]


# --- tasks ---------------------------------------------------------------------------------

def _niah(kind: str, n_keys: int, n_values: int, n_queries: int):
    """A needle-in-a-haystack task: n_keys keys (the first n_queries are asked about), n_values
    values for each asked key; the other keys are distractors."""
    one, many = _KIND_NAMES[kind]

    def make(ctx) -> dict:
        rng, words = ctx["rng"], ctx["words"]
        keys = _keys(rng, n_keys)
        needles, answers = [], []
        for ki, key in enumerate(keys):
            for _ in range(n_values if ki < n_queries else 1):
                v = _value(kind, rng, words)
                while v in answers:
                    v = _value(kind, rng, words)
                needles.append(f"One of the special magic {many} for {key} is: {v}.")
                if ki < n_queries:
                    answers.append(v)
        rng.shuffle(needles)
        asked = keys[:n_queries]
        if n_queries == 1 and n_values == 1:
            intro = f"A special magic {one} is hidden within the following text. Make sure to memorize it. " \
                    f"I will quiz you about the {one} afterwards."
            question = f"What is the special magic {one} for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic {one} for {asked[0]} mentioned in the provided text is"
        else:
            intro = f"Some special magic {many} are hidden within the following text. Make sure to memorize them. " \
                    f"I will quiz you about the {many} afterwards."
            question = f"What are all the special magic {many} for {_join(asked)} mentioned in the provided text?"
            prefix = f"The special magic {many} for {_join(asked)} mentioned in the provided text are"
        per_answer = _NEW_TOKENS[kind]
        return dict(intro=intro, items=needles, ordered=False, question=question, prefix=prefix, answers=answers,
                    metric="all", max_new_tokens=per_answer * len(answers) + 8)

    return make


def _variable_tracking(n_hops: int = 4):
    def make(ctx) -> dict:
        rng = ctx["rng"]
        names: List[str] = []
        while len(names) < n_hops + 1:
            n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if n not in names:
                names.append(n)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        return dict(
            intro="Memorize and track the chain of variable assignments hidden in the following text.",
            items=chain, ordered=True,
            question=f"Find all variables that are assigned the value {value} in the text above.",
            prefix=f"Answer: According to the chain of variable assignments in the text above, {len(names)} variables "
                   f"are assigned the value {value}, they are:",
            answers=names, metric="all", max_new_tokens=40)

    return make


def _common_words(ctx) -> dict:
    """A numbered list in which 10 words appear often and the rest a few times each."""
    rng, words, length = ctx["rng"], ctx["words"], ctx["length"]
    pool = rng.sample(words, len(words))
    common, rest = pool[:10], pool[10:]
    f_common = 30 if length >= 8192 else 20 if length >= 4096 else 10 if length >= 2048 else 6

    def build(n_rare: int) -> str:
        r = random.Random(ctx["seed"] * 7919 + n_rare)   # same list for the same size
        items = common * f_common + [w for w in rest[:n_rare] for _ in range(3)]
        r.shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return (f"Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{listing}\n"
                f"Question: What are the 10 most common words in the above list?")

    return dict(build=build, hi=min(64, len(rest)), min=0, limit=len(rest),
                prefix="Answer: The top 10 words that appear most often in the list are:",
                answers=common, metric="all", max_new_tokens=80)


def _frequent_words(ctx) -> dict:
    """Coded words with Zipf-like counts: the word of rank r appears int(c / r^2) times, so the
    top 3 (c, c/4, c/9 times) stand apart from the 4th (c/16) once c >= 48; the top 3 are asked."""
    rng = ctx["rng"]
    vocab: List[str] = []
    while len(vocab) < 2000:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in vocab:
            vocab.append(w)

    def build(c1: int) -> str:
        r = random.Random(ctx["seed"] * 104729 + c1)
        items = [w for rank, w in enumerate(vocab, start=1) for _ in range(int(c1 / rank ** 2))]
        r.shuffle(items)
        return ("Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words.\n{' ... '.join(items)}\n"
                "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")

    return dict(build=build, hi=64, min=48, limit=1 << 22, prefix="Answer: According to the coded text above, the three "
                "most frequently appeared words are:", answers=vocab[:3], metric="all", max_new_tokens=32)


TASKS: Dict[str, Callable] = {
    "niah_single_number": _niah("number", 1, 1, 1),
    "niah_single_uuid": _niah("uuid", 1, 1, 1),
    "niah_single_word": _niah("word", 1, 1, 1),
    "niah_multikey": _niah("number", 4, 1, 1),
    "niah_multivalue": _niah("number", 1, 4, 1),
    "niah_multiquery": _niah("number", 4, 1, 4),
    "vt": _variable_tracking(),
    "cwe": _common_words,
    "fwe": _frequent_words,
}
_LIST_TASKS = {"cwe", "fwe"}


def make_sample(model, pages: Sequence[Page], task: str, length: int, index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens. The same (task, length, index, seed)
    gives the same sample for the same model tokenizer and corpus."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    if length < 128:
        raise ValueError("a task prompt needs at least 128 tokens")
    sample_seed = (seed * 1_000_003 + length * 101 + index) * 31 + sorted(TASKS).index(task)
    rng = random.Random(sample_seed)
    ctx = {"rng": rng, "words": _vocabulary(pages), "length": length, "seed": sample_seed}
    spec = TASKS[task](ctx)

    def count(text: str) -> int:
        return len(_encode(model, text, spec["prefix"]))

    if task in _LIST_TASKS:
        text = _fit(spec["build"], count, length, spec["hi"], spec["limit"], spec["min"])
    else:
        haystack = _sentences(pages, rng)

        def build(n: int) -> str:
            body = _insert(haystack(n), spec["items"], random.Random(sample_seed + n), ordered=spec["ordered"])
            return f"{spec['intro']}\n{' '.join(body)}\n{spec['question']}"

        text = _fit(build, count, length, 64)
    return Sample(task=task, length=length, index=index, seed=seed, context=text, answer_prefix=spec["prefix"],
                  answers=list(spec["answers"]), metric=spec["metric"], max_new_tokens=spec["max_new_tokens"])
