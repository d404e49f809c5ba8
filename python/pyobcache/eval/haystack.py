"""Natural English prose for haystacks and fidelity documents.

The source is the HTML of Python 3.11's documentation as Debian packages it
(``python3.11-doc``, pinned by version and sha256): installable here with ``apt-get download``
and reproducible anywhere from the Debian archive. Paragraphs (``<p>`` elements) are stripped to
plain text; code blocks, tables and short or symbol-heavy paragraphs are dropped, so what remains
reads as prose. The extracted corpus is cached beside the models as JSON with its own sha256.
"""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..registry import cache_dir

__all__ = ["Page", "load_corpus", "corpus_info", "DEBIAN_SOURCE"]

DEBIAN_SOURCE = {
    "package": "python3.11-doc",
    "version": "3.11.2-6+deb12u8",
    "sha256": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "url": "https://deb.debian.org/debian/pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
}
_HTML_ROOT = "./usr/share/doc/python3.11/html/"
# Prose-heavy parts first; within a part, pages in file-name order.
_SECTIONS = ["tutorial", "howto", "faq", "whatsnew", "reference", "using", "extending", "library"]
CORPUS_VERSION = 1


@dataclass
class Page:
    path: str               # e.g. "tutorial/classes.html"
    paragraphs: List[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


class _Paragraphs(html.parser.HTMLParser):
    """Collects the text of <p> elements that are not inside tables, code or navigation."""

    _SKIP = {"pre", "table", "script", "style", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: List[str] = []
        self._buf: Optional[List[str]] = None
        self._skip = 0
        self._body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("role") == "main":
            self._body = True
        if tag in self._SKIP:
            self._skip += 1
        elif tag == "p" and self._body and not self._skip:
            self._buf = []

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "p" and self._buf is not None:
            self.out.append(" ".join("".join(self._buf).split()))
            self._buf = None

    def handle_data(self, data):
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def _is_prose(p: str) -> bool:
    words = p.split()
    if len(words) < 25:
        return False
    alpha = sum(1 for w in words if re.fullmatch(r"[A-Za-z][a-z'\-]*[.,;:!?)]?", w))
    return alpha / len(words) >= 0.8 and p[-1] in ".!?:)"


def extract_pages(deb_bytes: bytes) -> List[Page]:
    """The prose paragraphs of every page of the documentation package, in a fixed order."""
    data = _deb_member(deb_bytes, "data.tar")
    pages = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf.getmembers():
            if not (m.isfile() and m.name.startswith(_HTML_ROOT) and m.name.endswith(".html")):
                continue
            rel = m.name[len(_HTML_ROOT):]
            if rel.split("/")[0] not in _SECTIONS:
                continue
            parser = _Paragraphs()
            parser.feed(tf.extractfile(m).read().decode("utf-8", "replace"))
            paras = [p for p in parser.out if _is_prose(p)]
            if paras:
                pages[rel] = paras
    order = {s: i for i, s in enumerate(_SECTIONS)}
    return [Page(k, pages[k]) for k in sorted(pages, key=lambda r: (order[r.split("/")[0]], r))]


def _deb_member(deb: bytes, prefix: str) -> bytes:
    """A member of a .deb (an ar archive) whose name starts with prefix."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    off = 8
    while off + 60 <= len(deb):
        hdr = deb[off:off + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        if name.startswith(prefix):
            return deb[off + 60:off + 60 + size]
        off += 60 + size + (size & 1)
    raise ValueError(f"the package has no {prefix}* member")


def _download_deb(dest: Path) -> Path:
    src = DEBIAN_SOURCE
    local = os.environ.get("PYOBCACHE_HAYSTACK_DEB")
    if local:
        return Path(local)
    if not shutil.which("apt-get"):
        raise RuntimeError(f"the haystack text comes from Debian's {src['package']} {src['version']}; apt-get is not "
                           f"available here: download {src['url']} and set PYOBCACHE_HAYSTACK_DEB to its path")
    print(f"[pyobcache] fetching the haystack text once: Debian's {src['package']} {src['version']} "
          f"(the Python documentation, 12.6 MB) with apt-get download, into {dest.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", f"{src['package']}={src['version']}"], cwd=tmp,
                           capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {src['package']}={src['version']} failed: {r.stderr.strip()[-400:]}; "
                               f"download {src['url']} and set PYOBCACHE_HAYSTACK_DEB to its path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(debs[0]), dest)
    return dest


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def load_corpus(cache: Optional[Path] = None) -> List[Page]:
    """The prose pages, extracted once from the pinned Debian package and cached."""
    root = Path(cache) if cache else cache_dir() / "haystack"
    out = root / f"python3.11-doc-prose-v{CORPUS_VERSION}.json"
    if out.exists():
        return [Page(p["path"], p["paragraphs"]) for p in json.loads(out.read_text())["pages"]]
    deb_path = _download_deb(root / f"{DEBIAN_SOURCE['package']}_{DEBIAN_SOURCE['version']}_all.deb")
    deb = deb_path.read_bytes()
    if _sha256(deb) != DEBIAN_SOURCE["sha256"]:
        raise RuntimeError(f"{deb_path}: sha256 {_sha256(deb)} is not the pinned {DEBIAN_SOURCE['sha256']}")
    pages = extract_pages(deb)
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": DEBIAN_SOURCE, "pages": [p.__dict__ for p in pages]}, indent=0))
    tmp.replace(out)
    return pages


def corpus_info(pages: List[Page]) -> dict:
    """What identifies the corpus in a result file."""
    blob = "\n".join(p.path + "\n" + p.text for p in pages).encode()
    return {"source": f"Debian {DEBIAN_SOURCE['package']} {DEBIAN_SOURCE['version']} (HTML <p> prose)",
            "deb_sha256": DEBIAN_SOURCE["sha256"], "corpus_sha256": _sha256(blob), "pages": len(pages),
            "paragraphs": sum(len(p.paragraphs) for p in pages)}
