"""``python -m pyobcache``: generate, fetch registry models, list eviction methods.

    python -m pyobcache -m smollm2-135m -p "The capital of France is" -n 32 --temp 0
    python -m pyobcache fetch qwen2.5-coder-1.5b
    python -m pyobcache eval --preset quick
"""

from __future__ import annotations

import argparse
import sys


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


def _generate_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyobcache", description="generate text with pyobcache",
                                 epilog="subcommands: fetch NAME, list, eval (see python -m pyobcache eval -h)")
    ap.add_argument("-m", "--model", required=True, help="GGUF path or registry name")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--prompt")
    g.add_argument("-f", "--file", help="read the prompt from a file")
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--repeat-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("--kv-method", default=None,
                    help="eviction method (default: the full cache, or the default method when --kv-budget or "
                         "--kv-ratio is given)")
    ap.add_argument("--kv-budget", type=int, default=None)
    ap.add_argument("--kv-ratio", type=float, default=None)
    ap.add_argument("--kv-recent", type=int, default=None)
    ap.add_argument("--kv-sink", type=int, default=None)
    ap.add_argument("--kv-window", type=int, default=None)
    ap.add_argument("--kv-evict", default="prefill", choices=["prefill", "chunked", "decode"])
    ap.add_argument("--kv-pooling", default=None, choices=["none", "max", "avg"])
    ap.add_argument("--kv-group-pool", default="sum", choices=["sum", "mean", "max", "norm-sum", "pre-mean"])
    ap.add_argument("--kv-gqa", default="native", choices=["native", "expand"],
                    help="native: one cache per KV head; expand: one per query head (the paper's reference code)")
    ap.add_argument("--kv-head-budget", default="uniform", choices=["uniform", "adaptive"],
                    help="adaptive: the KV heads of a layer share its slots by score (AdaKV)")
    a = ap.parse_args(argv)

    from .kv import KVConfig
    from .model import Model

    try:
        prompt = a.prompt if a.prompt is not None else open(a.file, encoding="utf-8").read()
        kv = None
        if a.kv_method is None and (a.kv_budget is not None or a.kv_ratio is not None):
            a.kv_method = KVConfig.method   # the dataclass default: the engine's default method
        if a.kv_method not in (None, "full"):
            kv = KVConfig(method=a.kv_method, budget=a.kv_budget, ratio=a.kv_ratio, n_recent=a.kv_recent,
                          n_sink=a.kv_sink, window=a.kv_window, evict=a.kv_evict, pooling=a.kv_pooling,
                          group_pool=a.kv_group_pool, gqa=a.kv_gqa,
                          head_budget=a.kv_head_budget)
        model = Model(a.model, n_ctx=a.ctx_size, n_threads=a.threads, n_batch=a.batch_size,
                      n_gpu_layers=a.n_gpu_layers, flash_attn={"on": True, "off": False}.get(a.flash_attn))
        if kv is not None:
            print(f"kv: {kv.describe()}", file=sys.stderr)
        if a.chat:
            text = model.apply_chat_template([{"role": "user", "content": prompt}])
            ids = model.tokenize(text, add_special=False, parse_special=True)
        else:
            print(prompt, end="", flush=True)
            ids = model.tokenize(prompt)
        for piece in model.generate(ids, max_new_tokens=a.n_predict, temperature=a.temp, top_k=a.top_k,
                                    top_p=a.top_p, min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed,
                                    stop=a.stop, kv=kv, stream=True):
            print(piece, end="", flush=True)
        print()
        s = model.last_stats
        print(f"\nprompt: {s.prompt_tokens} tokens, {s.prompt_tokens_per_s:.2f} tokens/s; "
              f"generation: {s.generated_tokens} tokens, {s.generation_tokens_per_s:.2f} tokens/s ({s.finish_reason})",
              file=sys.stderr)
        print(f"kv cache: {s.kv_bytes_used / 2**20:.2f} MiB used of {s.kv_bytes_allocated / 2**20:.2f} MiB allocated "
              f"(full cache: {s.kv_bytes_full / 2**20:.2f} MiB)", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "fetch":
        return _fetch_main(argv[1:])
    if argv and argv[0] == "list":
        return _list_main(argv[1:])
    if argv and argv[0] == "eval":
        from .eval.cli import main as eval_main
        return eval_main(argv[1:])
    return _generate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
