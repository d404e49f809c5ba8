"""The evaluation harness: deterministic task generators, RULER scoring, PPL/KL metrics, the
one-prefill snapshot against fresh prefills, and a small resumable sweep with its report."""

import io
import json
import math
import tarfile

import numpy as np
import pytest

import pyobcache
from pyobcache.eval import haystack, metrics, report, sweep, tasks
from pyobcache.eval.haystack import Page

# Prose written for these tests, so that they need no download.
_PROSE = [
    "The river bends twice before it reaches the town, and in spring the water rises high enough to cover the "
    "lower fields. Farmers plant late in those years, waiting until the ground is firm again before they plough.",
    "Most of the houses near the square were built of stone from the quarry on the hill. The older ones have thick "
    "walls and small windows, which keep them cool in summer and warm through the long winter months.",
    "A market is held every Saturday morning. Traders arrive before dawn with carts of apples, cheese, bread and "
    "wool, and by noon most of the stalls are empty and the square is quiet once more.",
    "The school teaches children from the surrounding villages as well as the town itself. Some of them walk more "
    "than an hour each way, and in bad weather a farmer with a covered wagon gives them a ride.",
    "Visitors often ask about the old mill by the bridge. It stopped working many years ago, but the wheel is still "
    "in place, and on windy evenings you can hear the timbers creak as the water pushes against them.",
]
PAGES = [Page(f"test/page{i}.html", [_PROSE[(i + j) % len(_PROSE)] for j in range(4)]) for i in range(6)]


# --- scoring -----------------------------------------------------------------------------------

def test_string_match_all_and_part_by_hand():
    answers = ["1234567", "ABCDE", "quiet"]
    assert tasks.score_all("The numbers are 1234567 and abcde.", answers) == pytest.approx(2 / 3)
    assert tasks.score_part("The numbers are 1234567 and abcde.", answers) == 1.0
    assert tasks.score_all("nothing here", answers) == 0.0
    assert tasks.score_part("nothing here", answers) == 0.0
    assert tasks.score_all("QUIET abcde 1234567", answers) == 1.0
    # A substring counts, as in RULER: "123456" is not "1234567", but "1234567" inside "12345678" is.
    assert tasks.score_all("123456", ["1234567"]) == 0.0
    assert tasks.score_all("12345678", ["1234567"]) == 1.0


def test_perplexity_and_kl_by_hand():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    # KL(p||q) of row 0 = 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2; row 1 = 0.
    assert metrics.mean_kl(p, q) == pytest.approx(0.25 * math.log(2) / 2)
    assert metrics.mean_kl(p, p) == 0.0
    # Targets 0 and 1: NLL = -ln 0.5 and -ln 0.8.
    assert metrics.perplexity(p, [0, 1]) == pytest.approx(math.exp((math.log(2) - math.log(0.8)) / 2))
    lp = metrics.log_softmax(np.array([[1.0, 2.0, 3.0]]))
    assert np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[0, 2] - lp[0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.mean_kl(p, q[:1])


def test_sign_test_and_paired_comparison_by_hand():
    assert report.sign_test(0, 0) == 1.0
    assert report.sign_test(5, 0) == pytest.approx(2 / 32)          # 2 * P(all five one way)
    assert report.sign_test(1, 4) == pytest.approx(2 * 6 / 32)      # 2 * (C(5,0) + C(5,1)) / 2^5
    assert report.sign_test(3, 3) == 1.0

    def cell(method, sample, score, task="vt"):
        return {"kind": "ruler", "task": task, "length": 100, "mode": "prefill", "budget": "5%",
                "method": method, "sample": sample, "score": score}
    base = [cell("snapkv", i, s) for i, s in enumerate([1.0, 0.0, 0.5, 1.0])] + [cell("snapkv", 0, 0.0, "cwe")]
    obc = [cell("obc-vk+snapkv", i, s) for i, s in enumerate([1.0, 1.0, 0.0, 0.0])] + [cell("obc-vk+snapkv", 0, 1.0, "cwe")]
    full = [{**cell("full", 0, 1.0), "mode": "full", "budget": "full"}]
    text = report.paired(base + obc + full)
    assert text.count("\n") == 0        # one (variant, base, budget) pair
    assert "obc-vk+snapkv against snapkv: better on 2, equal on 1, worse on 2 of 5 samples (sign test p = 1)" in text
    # Fidelity compares KL per document, lower being better.
    fid = [{"kind": "fidelity", "task": "document", "length": 100, "mode": "prefill", "budget": "5%", "method": m,
            "sample": i, "kl": kl, "ppl": 1.0} for m, kls in (("h2o", [0.2, 0.3]), ("obc-v", [0.1, 0.1])) for i, kl in enumerate(kls)]
    assert "obc-v against h2o: better on 2, equal on 0, worse on 0 of 2" in report.paired(fid)


def test_table_gives_rows_with_fewer_samples_their_n_and_no_bold():
    def cell(method, sample, score, budget="10%"):
        return {"kind": "ruler", "task": "vt", "length": 100, "mode": "prefill", "budget": budget,
                "method": method, "sample": sample, "score": score}
    full = [{**cell("full", i, 1.0), "mode": "full", "budget": "full"} for i in range(4)]
    even = [cell(m, i, s) for m, ss in (("snapkv", [1, 0, 0, 1]), ("obc-vk+snapkv", [1, 1, 0, 0])) for i, s in enumerate(ss)]
    text = report.markdown(report.aggregate(full + even))
    assert "(n=4 per cell)" in text and "| snapkv | **50.0** |" in text and "| obc-vk+snapkv | **50.0** |" in text
    # Two prompts of a third method score 100: it gets its n, and the bold stays with the 4-prompt rows.
    text = report.markdown(report.aggregate(full + even + [cell("tova", i, 1.0) for i in range(2)]))
    assert "n per row; bold: the best of the rows with n=4" in text
    assert "| tova | 2 | 100.0 |" in text and "| snapkv | 4 | **50.0** |" in text and "| full cache | 4 | 100.0 |" in text


def test_budget_parsing():
    assert sweep.parse_budget("5%") == sweep.Budget("5%", 0.05, None)
    assert sweep.parse_budget("0.1") == sweep.Budget("10%", 0.1, None)
    assert sweep.parse_budget("256") == sweep.Budget("256", None, 256)
    for bad in ["0", "-3", "150%", "abc", "0.0"]:
        with pytest.raises(ValueError):
            sweep.parse_budget(bad)


# --- haystack ----------------------------------------------------------------------------------

def test_html_prose_extraction_and_deb_reading():
    para = " ".join(["This sentence is plain English prose about the documentation."] * 4)
    html = (f"<html><body><div class='sphinxsidebar'><p>{para}</p></div><div role='main'><p>{para}</p>"
            "<pre><p>code = 1</p></pre><p>Too short.</p><p>x = f(a, b) + g(c) * h[d] -> {'k': 1} ; y = 2 ; z = 3 ; "
            "w = 4 ; v = 5 ; u = 6 ; t = 7 ; s = 8 ; r = 9 ; q = 10 ; p = 11 ; o = 12 ; n = 13.</p></div></body></html>")
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tf:
        data = html.encode()
        info = tarfile.TarInfo("./usr/share/doc/python3.11/html/tutorial/a.html")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    member = tar_bytes.getvalue()

    def ar_entry(name, payload):
        hdr = f"{name + '/':16s}{0:<12d}{0:<6d}{0:<6d}{100644:<8d}{len(payload):<10d}`\n".encode()
        return hdr + payload + (b"\n" if len(payload) % 2 else b"")

    deb = b"!<arch>\n" + ar_entry("debian-binary", b"2.0\n") + ar_entry("data.tar.xz", member)
    pages = haystack.extract_pages(deb)
    # Only the main body's prose paragraph survives: not the sidebar, code, short or symbol-heavy ones.
    assert [p.path for p in pages] == ["tutorial/a.html"]
    assert pages[0].paragraphs == [para]
    with pytest.raises(ValueError):
        haystack.extract_pages(b"not a deb")


# --- task generators -----------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_task_generators_are_deterministic_and_fit_the_length(smollm2, task):
    a = tasks.make_sample(smollm2, PAGES, task, 512, index=3, seed=7)
    b = tasks.make_sample(smollm2, PAGES, task, 512, index=3, seed=7)
    c = tasks.make_sample(smollm2, PAGES, task, 512, index=4, seed=7)
    assert a == b
    assert (a.context, a.answers) != (c.context, c.answers)
    n = len(tasks.prompt_ids(smollm2, a))
    assert 400 <= n <= 512
    assert a.answers and all(isinstance(x, str) and x for x in a.answers)
    if task.startswith("niah") or task == "vt":
        # The answers are written into the context (the needles / the assignment chain).
        assert all(x in a.context for x in a.answers)
    # The prompt ends with the answer prefix, inside the chat template's assistant turn.
    assert smollm2.detokenize(tasks.prompt_ids(smollm2, a)[-8:]) in a.answer_prefix


def test_task_content_by_hand(smollm2):
    s = tasks.make_sample(smollm2, PAGES, "niah_multivalue", 600, 0)
    assert len(s.answers) == 4 and len(set(s.answers)) == 4
    assert all(f"is: {v}." in s.context for v in s.answers)
    s = tasks.make_sample(smollm2, PAGES, "vt", 600, 0)
    value = s.answer_prefix.split("value ")[1].split(",")[0]
    assert f"VAR {s.answers[0]} = {value}." in s.context
    assert all(f"VAR {s.answers[i]} = VAR {s.answers[i - 1]}." in s.context for i in range(1, 5))
    # The chain reads in order.
    assert s.context.index(s.answers[0] + " =") < s.context.index(s.answers[4] + " =")
    s = tasks.make_sample(smollm2, PAGES, "fwe", 600, 0)
    words = s.context.split("\n")[1].split(" ... ")
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert [w for _, w in counts[:3]] == s.answers and counts[2][0] > counts[3][0]
    s = tasks.make_sample(smollm2, PAGES, "cwe", 600, 0)
    items = [t.split(". ", 1)[1] for t in s.context.split("\n")[1].split(" ") if ". " in t] or \
        s.context.split("\n")[1].split(" ")[1::2]
    freq = {w: items.count(w) for w in set(items)}
    top = sorted(freq, key=lambda w: -freq[w])[:10]
    assert set(top) == set(s.answers)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample(smollm2, PAGES, "nope", 600, 0)


# --- one prefill, many configurations --------------------------------------------------------------

def test_snapshot_matches_fresh_prefills_and_full_kl_is_zero(smollm2):
    text = " ".join(_PROSE * 4)
    ids = smollm2.tokenize(text)
    prompt, cont = ids[:300], ids[300:340]
    methods = [pyobcache.KVConfig(method=m, budget=64) for m in
               ["h2o", "tova", "snapkv", "obc-v", "obc-k+tova", "obc-vk", "obc-vk+snapkv", "streamingllm"]]
    snap = smollm2.snapshot(prompt, methods, max_new_tokens=64)
    full = snap.teacher_force(cont) if snap.apply(None) == 300 else None
    again = snap.teacher_force(cont) if snap.apply(None) == 300 else None
    lf = metrics.log_softmax(full)
    assert metrics.mean_kl(lf, metrics.log_softmax(again)) == 0.0
    for kv in methods:
        assert snap.apply(kv) == 64
        got = snap.teacher_force(cont)
        session = smollm2._new_session(len(prompt), len(cont), kv)
        session.prefill(prompt)
        first = session.logits()[-1:].copy()
        session.decode(cont[:-1], True)
        want = np.concatenate([first, session.logits()])
        np.testing.assert_array_equal(got, want, err_msg=kv.method)
        assert metrics.mean_kl(lf, metrics.log_softmax(got)) > 0
    # Greedy decoding from the snapshot equals generate() with the same configuration.
    snap.apply(methods[5])
    out = snap.greedy(12)
    assert smollm2.generate(prompt, max_new_tokens=12, temperature=0, kv=methods[5]) == smollm2.detokenize(out)
    with pytest.raises(ValueError, match="after prefill"):
        smollm2.snapshot(prompt, [pyobcache.KVConfig(method="h2o", budget=64, evict="chunked")])
    with pytest.raises(ValueError, match="did not compute"):
        snap.apply(pyobcache.KVConfig(method="obc-k", budget=64))
    with pytest.raises(ValueError, match="made for 64 tokens"):
        snap.apply(None)
        snap.teacher_force(ids[300:400])


def test_snapshot_matches_fresh_prefills_for_gqa_variants(smollm2):
    """The GQA variants through a snapshot give a fresh prefill's logits bit for bit; a cache per
    query head (gqa=expand) needs a snapshot of its own."""
    ids = smollm2.tokenize(" ".join(_PROSE * 4))
    prompt, cont = ids[:300], ids[300:320]
    for methods in ([pyobcache.KVConfig(method="obc-vk+snapkv", budget=64, group_pool=g) for g in ("norm-sum", "pre-mean")]
                    + [pyobcache.KVConfig(method="obc-v+snapkv", budget=64, head_budget="adaptive")],
                    [pyobcache.KVConfig(method=m, budget=64, gqa="expand") for m in ("snapkv", "obc-vk+snapkv")]):
        snap = smollm2.snapshot(prompt, methods, max_new_tokens=32)
        for kv in methods:
            snap.apply(kv)
            got = snap.teacher_force(cont)
            session = smollm2._new_session(len(prompt), len(cont), kv)
            session.prefill(prompt)
            first = session.logits()[-1:].copy()
            session.decode(cont[:-1], True)
            np.testing.assert_array_equal(got, np.concatenate([first, session.logits()]), err_msg=kv.describe())
    with pytest.raises(ValueError, match="one gqa mode"):
        smollm2.snapshot(prompt, [pyobcache.KVConfig(method="snapkv", budget=64),
                                  pyobcache.KVConfig(method="snapkv", budget=64, gqa="expand")])


# --- sweeps --------------------------------------------------------------------------------------

def test_sweep_resumes_and_reports(smollm2, tmp_path):
    cfg = sweep.SweepConfig(kind="ruler", model="smollm2-135m", tasks=["niah_single_number"], lengths=[256],
                            samples=2, methods=["streamingllm", "obc-vk"], budgets=["25%", "96"])
    run = sweep.run_sweep(cfg, tmp_path, model=smollm2, progress=False, pages=PAGES)
    cells = sweep.load_cells(tmp_path)
    assert run["this_invocation"]["cells"] == len(cells) == 2 * (1 + 2 * 2)
    assert run["this_invocation"]["prefills"] == 2
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["invocations"][0]["finished"] and saved["corpus"]["pages"] == len(PAGES)
    assert run["model"]["sha256"] == pyobcache.REGISTRY["smollm2-135m"].sha256
    assert {c["method"] for c in cells} == {"full", "streamingllm", "obc-vk"}
    assert all(0.0 <= c["score"] <= 1.0 for c in cells)
    assert {c["kept"] for c in cells if c["budget"] == "96"} == {96}

    # Nothing left to do: a second run computes no cell.
    run = sweep.run_sweep(cfg, tmp_path, model=smollm2, progress=False, pages=PAGES)
    assert run["this_invocation"]["cells"] == 0 and len(run["invocations"]) == 2
    # Lose one cell (and leave a cut line): only that one runs again, with the same result.
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    lost = json.loads(lines[3])
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n{\"kind\": \"ru")
    run = sweep.run_sweep(cfg, tmp_path, model=smollm2, progress=False, pages=PAGES)
    assert run["this_invocation"]["cells"] == 1 and run["this_invocation"]["prefills"] == 1
    redone = [c for c in sweep.load_cells(tmp_path) if sweep._cell_key(c) == sweep._cell_key(lost)]
    assert len(redone) == 1 and redone[0]["prediction"] == lost["prediction"]

    summary = report.write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| full cache |" in table and "| obc-vk |" in table and "| 25% | 96 |" in table
    assert "per task, 256 tokens, budgets 25% | 96 (n=2 per cell)" in table and "sample by sample" in table
    full = [r for r in summary["results"] if r["method"] == "full" and r["task"] == "niah_single_number"]
    assert full[0]["n"] == 2
    assert (tmp_path / "cells.csv").read_text().count("\n") == len(sweep.load_cells(tmp_path)) + 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "plot_ruler_niah_single_number.png").stat().st_size > 1000


def test_fidelity_sweep_full_cache_has_zero_kl(smollm2, tmp_path):
    cfg = sweep.SweepConfig(kind="fidelity", model="smollm2-135m", lengths=[200], samples=1, continuation=32,
                            methods=["snapkv"], budgets=["20%"], modes=["prefill", "decode"])
    sweep.run_sweep(cfg, tmp_path, model=smollm2, progress=False, pages=PAGES)
    cells = {(c["method"], c["mode"]): c for c in sweep.load_cells(tmp_path)}
    assert cells[("full", "full")]["kl"] == 0.0
    assert cells[("snapkv", "prefill")]["kl"] > 0 and cells[("snapkv", "decode")]["kl"] > 0
    assert all(c["ppl"] > 1 for c in cells.values())


def test_fidelity_sweep_of_cache_types_measures_against_the_f16_cache(smollm2_path, tmp_path):
    # One prefill per cache layout and types; the KL reference stays the plain f16 full cache.
    model = pyobcache.Model(smollm2_path, n_ctx=1024, n_threads=2)   # flash attention: a quantized V needs it
    q8 = ":type_k=q8_0:type_v=q8_0"
    cfg = sweep.SweepConfig(kind="fidelity", model="smollm2-135m", lengths=[256], samples=1, continuation=32,
                            methods=["full" + q8, "snapkv", "snapkv" + q8], budgets=["20%"])
    run = sweep.run_sweep(cfg, tmp_path, model=model, progress=False, pages=PAGES)
    assert run["this_invocation"]["prefills"] == 2
    cells = {c["method"]: c for c in sweep.load_cells(tmp_path)}
    assert cells["full"]["kl"] == 0.0 and 0 < cells["full" + q8]["kl"] < 0.05
    assert cells["full" + q8]["budget"] == "full" and cells["full" + q8]["kept"] == 256
    assert cells["full" + q8]["kv_bytes"] * 128 == cells["full"]["kv_bytes"] * 68
    assert cells["snapkv" + q8]["kv_bytes"] * 128 == cells["snapkv"]["kv_bytes"] * 68
    assert cells["snapkv" + q8]["kl"] > 0
    report.write_report(tmp_path)
    assert "| full:type_k=q8_0:type_v=q8_0 | " in (tmp_path / "table.md").read_text()


def test_sweep_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        sweep.SweepConfig(kind="ruler", methods=["nope"]).check()
    with pytest.raises(ValueError, match="budget"):
        sweep.SweepConfig(kind="ruler", budgets=["lots"]).check()
    with pytest.raises(ValueError, match="unknown task"):
        sweep.SweepConfig(kind="ruler", tasks=["nope"]).check()
    with pytest.raises(ValueError):
        sweep.SweepConfig(kind="other").check()


def test_eval_cli_errors(capsys):
    from pyobcache.eval.cli import main

    assert main(["ruler", "--preset", "quick"]) == 2
    assert main(["ruler", "--methods", "nope", "--out", "/nonexistent/x"]) == 1
    assert "unknown method" in capsys.readouterr().err


def test_bootstrap_interval_and_versus_table():
    lo, hi = report.bootstrap_ci([2.0] * 10)
    assert lo == hi == 2.0
    lo, hi = report.bootstrap_ci([0.0, 0.0, 0.0, 100.0])
    assert 0.0 <= lo < 25.0 < hi <= 100.0

    def cell(method, sample, score):
        return {"kind": "ruler", "task": "vt", "length": 100, "mode": "prefill", "budget": "10%",
                "method": method, "sample": sample, "score": score}
    cells = ([cell("snapkv", i, s) for i, s in enumerate([0.0, 1.0, 0.0, 1.0])] +
             [cell("obc-vk+snapkv:group_pool=norm-sum", i, s) for i, s in enumerate([1.0, 1.0, 1.0, 1.0])])
    text = report.versus(cells)
    row = next(l for l in text.splitlines() if l.startswith("| obc-vk+snapkv:group_pool=norm-sum"))
    assert "| 4 | 100.0 | +50.0 |" in row and "| 2 / 0 |" in row
    # an override is compared with its base under the same overrides, where present
    assert report._obc_pairs({"obc-vk+snapkv:gqa=expand", "snapkv:gqa=expand", "snapkv"}) == [
        ("obc-vk+snapkv:gqa=expand", "snapkv:gqa=expand")]


def test_sweep_method_overrides_and_tova_recent():
    from pyobcache.eval.sweep import SweepConfig, kv_for, parse_budget, parse_method
    assert parse_method("obc-vk+snapkv:group_pool=norm-sum:gqa=expand") == (
        "obc-vk+snapkv", {"group_pool": "norm-sum", "gqa": "expand"})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("snapkv:budget=3")
    cfg = SweepConfig(kind="ruler")
    b = parse_budget("10%")
    assert kv_for(cfg, "tova", b, "prefill")._core.n_recent == 0          # TOVA keeps no recent tokens
    assert kv_for(cfg, "obc-vk+tova", b, "prefill")._core.n_recent == 0
    assert kv_for(cfg, "snapkv", b, "prefill")._core.n_recent == 16
    assert kv_for(cfg, "snapkv:head_budget=adaptive", b, "prefill").head_budget == "adaptive"
