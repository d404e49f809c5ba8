"""``python -m pyobcache``: generate, fetch registry models, list eviction methods.

    python -m pyobcache -m smollm2-135m -p "The capital of France is" -n 32 --temp 0
    python -m pyobcache -m smollm2-135m -cnv --kv-budget 256 --kv-evict decode
    python -m pyobcache serve -m smollm2-135m --kv-budget 512 --port 8080
    python -m pyobcache fetch qwen2.5-coder-1.5b
    python -m pyobcache eval --preset quick
"""

from __future__ import annotations

import argparse
import sys

from . import _core
from ._core import DEFAULTS as _D


def _fetch_main(argv) -> int:
    from .registry import REGISTRY, fetch

    ap = argparse.ArgumentParser(prog="python -m pyobcache fetch", description="download and verify a registry model")
    ap.add_argument("name", choices=sorted(REGISTRY))
    ap.add_argument("--print-path", action="store_true", help="print only the local path")
    a = ap.parse_args(argv)
    try:
        path = fetch(a.name, quiet=a.print_path)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path if a.print_path else f"{a.name}: {path}")
    return 0


def _list_main(argv) -> int:
    from .kv import kv_methods
    from .registry import cached_path, list_models

    print("models:")
    for m in list_models():
        print(f"  {m.name:22s} {'cached' if cached_path(m.name) else 'not cached':10s} {m.description}")
    print("kv methods:")
    print("  " + ", ".join(kv_methods()))
    return 0


# -n -1: as many tokens as the context holds (the generation then ends with finish_reason "context").
_UNTIL_EOS_OR_CONTEXT = 2**31 - 1


def _add_model_args(ap: argparse.ArgumentParser, model_required: bool = True) -> None:
    ap.add_argument("-m", "--model", required=model_required, help="GGUF path or registry name (see: python -m pyobcache list)")
    ap.add_argument("-c", "--ctx-size", type=int, default=_D["n_ctx"])
    ap.add_argument("-b", "--batch-size", type=int, default=_D["n_batch"])
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="the most CPU threads (default: the physical performance cores)")
    ap.add_argument("--adaptive-threads", type=int, choices=[0, 1], default=None,
                    help="use fewer threads while other processes keep the CPUs busy (default: 1)")
    ap.add_argument("--poll", type=int, default=None,
                    help="0-100: how long idle threads spin for the next graph before sleeping (default: 0)")
    ap.add_argument("--prio", type=int, default=None,
                    help="thread priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime (default: 0)")
    ap.add_argument("-C", "--cpu-mask", default=None, help="hex mask of the CPUs to run on, e.g. 0x3")
    ap.add_argument("--cpu-strict", type=int, choices=[0, 1], default=None,
                    help="pin each thread to one CPU of the mask (default: 0)")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto")


def _add_kv_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kv", default=None, metavar="SPEC",
                    help="the whole KV configuration as one string, e.g. obc-vk+snapkv,budget=512,evict=chunked "
                         "(the --kv-* flags set the same options and win over it)")
    ap.add_argument("--kv-method", default=None,
                    help="eviction method (default: the full cache, or the default method when --kv-budget or "
                         "--kv-ratio is given)")
    ap.add_argument("--kv-budget", type=int, default=None)
    ap.add_argument("--kv-ratio", type=float, default=None)
    ap.add_argument("--kv-recent", type=int, default=None)
    ap.add_argument("--kv-sink", type=int, default=None)
    ap.add_argument("--kv-window", type=int, default=None)
    ap.add_argument("--kv-evict", default=None, choices=["prefill", "chunked", "decode"], help="default: prefill")
    ap.add_argument("--kv-slack", type=int, default=None, help="decode-time growth above the budget before compaction (32)")
    ap.add_argument("--kv-pooling", default=None, choices=["none", "max", "avg"])
    ap.add_argument("--kv-group-pool", default=None, choices=["sum", "mean", "max", "norm-sum", "pre-mean"])
    ap.add_argument("--kv-gqa", default=None, choices=["native", "expand"],
                    help="native: one cache per KV head; expand: one per query head (the paper's reference code)")
    ap.add_argument("--kv-head-budget", default=None, choices=["uniform", "adaptive"],
                    help="adaptive: the KV heads of a layer share its slots by score (AdaKV)")
    types = list(_core.kv_cache_types())
    ap.add_argument("-ctk", "--cache-type-k", default=None, choices=types, help="what the cache stores K in (default: f16)")
    ap.add_argument("-ctv", "--cache-type-v", default=None, choices=types,
                    help="what the cache stores V in (default: f16; a quantized V uses flash attention)")


def _add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temp", type=float, default=_D["temperature"])
    ap.add_argument("--top-k", type=int, default=_D["top_k"])
    ap.add_argument("--top-p", type=float, default=_D["top_p"])
    ap.add_argument("--min-p", type=float, default=_D["min_p"])
    ap.add_argument("--repeat-penalty", type=float, default=_D["repeat_penalty"])
    ap.add_argument("--repeat-last-n", type=int, default=_D["repeat_last_n"], help="tokens the penalty looks back over")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--ignore-eos", action="store_true")


def _kv_from_args(a):
    from .kv import KVConfig, spec_kwargs

    kw = spec_kwargs(a.kv) if a.kv else {}
    flags = dict(method=a.kv_method, budget=a.kv_budget, ratio=a.kv_ratio, n_recent=a.kv_recent, n_sink=a.kv_sink,
                 window=a.kv_window, evict=a.kv_evict, slack=a.kv_slack, pooling=a.kv_pooling,
                 group_pool=a.kv_group_pool, gqa=a.kv_gqa, head_budget=a.kv_head_budget, type_k=a.cache_type_k,
                 type_v=a.cache_type_v)
    kw.update({k: v for k, v in flags.items() if v is not None})   # a flag given after --kv wins
    if "method" not in kw and ("budget" in kw or "ratio" in kw):
        kw["method"] = KVConfig.method   # the dataclass default: the engine's default method
    if kw.get("method", "full") == "full" and kw.get("type_k", "f16") == "f16" and kw.get("type_v", "f16") == "f16":
        return None
    return KVConfig(**kw)


def _model_from_args(a):
    from .model import Model

    return Model(a.model, n_ctx=a.ctx_size, n_threads=a.threads, n_batch=a.batch_size, n_gpu_layers=a.n_gpu_layers,
                 flash_attn={"on": True, "off": False}.get(a.flash_attn), **_thread_args(a))


def _thread_args(a) -> dict:
    """The thread flags the user gave, as Model keywords (the rest keep the engine's defaults)."""
    given = dict(adaptive_threads=a.adaptive_threads, poll=a.poll, prio=a.prio, cpu_mask=a.cpu_mask,
                 cpu_strict=a.cpu_strict)
    return {k: v for k, v in given.items() if v is not None}


def _sampling(a, max_new_tokens: int) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def _read_prompt(a) -> str:
    if a.prompt is not None:
        return a.prompt
    if a.file == "-":
        return sys.stdin.read()
    with open(a.file, encoding="utf-8") as f:
        return f.read()


def _print_stats(s) -> None:
    reason = "stopped: the context is full (-c)" if s.finish_reason == "context" else s.finish_reason
    print(f"\nprompt: {s.prompt_tokens} tokens, {s.prompt_tokens_per_s:.2f} tokens/s; "
          f"generation: {s.generated_tokens} tokens, {s.generation_tokens_per_s:.2f} tokens/s ({reason})",
          file=sys.stderr)
    print(f"kv cache: {s.kv_bytes_used / 2**20:.2f} MiB used of {s.kv_bytes_allocated / 2**20:.2f} MiB allocated "
          f"(full cache: {s.kv_bytes_full / 2**20:.2f} MiB)", file=sys.stderr)


def _conversation(model, kv, a) -> int:
    """llama-cli's conversation mode: the chat template, one session whose cache carries over."""
    session = model.session(kv=kv, system=a.system_prompt)
    first = _read_prompt(a) if (a.prompt is not None or a.file is not None) else None
    print("conversation mode: type a message and press Enter; Ctrl-C stops a reply, Ctrl-C at the prompt, "
          "Ctrl-D or /exit ends it", file=sys.stderr)
    while True:
        if first is not None:
            message, first = first, None
            print(f"> {message}")
        else:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
        if message.strip() in ("/exit", "/quit"):
            return 0
        if not message.strip():
            continue
        stream = session.chat(message, stream=True, **_sampling(a, a.n_predict if a.n_predict > 0 else _UNTIL_EOS_OR_CONTEXT))
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()   # the reply so far stays in the conversation
            print("\n[reply interrupted]", file=sys.stderr)
        print()
        s = session.stats
        print(f"[turn {s.turns}: {s.n_past} positions, kv {s.kv_bytes_used / 2**20:.2f} MiB used of "
              f"{s.kv_bytes_allocated / 2**20:.2f} MiB]", file=sys.stderr)


def _generate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pyobcache", description="generate text with pyobcache",
                                 epilog="subcommands: serve, fetch NAME, list, eval (each with -h)")
    _add_model_args(ap, model_required=False)   # --list-kv-methods needs none
    g = ap.add_mutually_exclusive_group()
    g.add_argument("-p", "--prompt")
    g.add_argument("-f", "--file", help="read the prompt from a file ('-': standard input)")
    ap.add_argument("-n", "--n-predict", type=int, default=_D["max_new_tokens"],
                    help="tokens to generate (-1: until EOS or n_ctx)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("-cnv", "--conversation", action="store_true",
                    help="chat interactively with the model's template, keeping the KV cache across turns")
    ap.add_argument("-i", "--interactive", action="store_true", help="the same as --conversation")
    ap.add_argument("-sys", "--system-prompt", default=None, help="the system prompt of a conversation or --chat")
    _add_sampling_args(ap)
    _add_kv_args(ap)
    ap.add_argument("--list-kv-methods", action="store_true", help="print the method names and exit")
    return ap


def _generate_main(argv) -> int:
    ap = _generate_parser()
    a = ap.parse_args(argv)
    if a.list_kv_methods:
        from .kv import kv_methods
        print("\n".join(kv_methods()))
        return 0
    if a.model is None:
        ap.error("the following arguments are required: -m/--model")
    conversation = a.conversation or a.interactive
    if not conversation and a.prompt is None and a.file is None:
        ap.error("give a prompt (-p, -f FILE, -f - for standard input) or --conversation")

    try:
        kv = _kv_from_args(a)
        prompt = None if conversation else _read_prompt(a)
        model = _model_from_args(a)
        if kv is not None:
            print(f"kv: {kv.describe()}", file=sys.stderr)
        if conversation:
            return _conversation(model, kv, a)
        if a.chat:
            messages = ([{"role": "system", "content": a.system_prompt}] if a.system_prompt else [])
            text = model.apply_chat_template(messages + [{"role": "user", "content": prompt}])
            ids = model.tokenize(text, add_special=False, parse_special=True)
        else:
            ids = model.tokenize(prompt)
        model._ids(ids)   # a prompt too long for -c is refused before anything is printed
        if not a.chat:
            print(prompt, end="", flush=True)
        n_predict = a.n_predict if a.n_predict >= 0 else _UNTIL_EOS_OR_CONTEXT

        long_prompt = len(ids) >= _core.CLI_PROGRESS_MIN_TOKENS
        if long_prompt:
            print(file=sys.stderr)   # the progress line gets a line of its own
        for piece in model.generate(ids, kv=kv, stream=True, progress=long_prompt, **_sampling(a, n_predict)):
            print(piece, end="", flush=True)
        print()
        _print_stats(model.last_stats)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted by the user (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def _serve_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyobcache serve", description="an OpenAI-compatible HTTP server")
    _add_model_args(ap)
    _add_kv_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    ap.add_argument("-np", "--parallel", type=int, default=1,
                    help="requests generating at once, each in its own context (the rest wait in order)")
    ap.add_argument("-a", "--alias", default=None, help="the model id clients see (default: the model's name)")
    ap.add_argument("--no-cache-prompt", action="store_true",
                    help="never continue a cached conversation: every request prefills its whole prompt")
    a = ap.parse_args(argv)
    try:
        from .compat import Llama
        from .server import serve
    except ImportError as e:
        print(f"error: the server needs its extra: pip install 'pyobcache[server]' ({e})", file=sys.stderr)
        return 1
    try:
        kv = _kv_from_args(a)
        llama = Llama(a.model, n_ctx=a.ctx_size, n_batch=a.batch_size, n_threads=a.threads,
                      n_gpu_layers=a.n_gpu_layers, flash_attn={"on": True, "off": False}.get(a.flash_attn), kv=kv,
                      **_thread_args(a),
                      prompt_cache=0 if a.no_cache_prompt else a.parallel)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = a.alias or __import__("os").path.basename(llama.model.path)
    if kv is not None:
        print(f"kv: {kv.describe()}", file=sys.stderr)
    serve(llama, name, host=a.host, port=a.port, api_key=a.api_key, parallel=a.parallel)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "fetch":
        return _fetch_main(argv[1:])
    if argv and argv[0] == "list":
        return _list_main(argv[1:])
    if argv and argv[0] == "serve":
        return _serve_main(argv[1:])
    if argv and argv[0] == "eval":
        from .eval.cli import main as eval_main
        return eval_main(argv[1:])
    return _generate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
