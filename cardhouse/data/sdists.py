"""Text that PyPI source distributions ship as demo or test data: C4 and Wikipedia demo files in
LLaMA-Factory's, the novel Botchan in sentencepiece's."""

from __future__ import annotations

import json
import tarfile

from cardhouse._install import cache_dir, pip_download_sdist

from .text import PARAGRAPH_SEPARATOR, unwrap_greedy


def read_sdist_member(requirement: str, member_suffix: str) -> bytes:
    # One folder per requirement: pip_download_sdist reuses any tar.gz in its folder.
    folder = cache_dir("sdists", requirement.replace("==", "-"))
    archive = pip_download_sdist(requirement, folder)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name.endswith(member_suffix):
                return tar.extractfile(member).read()
    raise FileNotFoundError(f"{archive} has no file ending in {member_suffix}")


# --- C4: the 300-document demo file in LLaMA-Factory's source distribution ----------

LLAMAFACTORY_REQUIREMENT = "llamafactory==0.9.5"
C4_MEMBER_SUFFIX = "/data/c4_demo.jsonl"


def c4_text() -> str:
    lines = read_sdist_member(LLAMAFACTORY_REQUIREMENT, C4_MEMBER_SUFFIX).decode("utf-8").splitlines()
    documents = [json.loads(line)["text"].strip() for line in lines if line.strip()]
    return PARAGRAPH_SEPARATOR.join(documents)


# 30 English Wikipedia articles, one per line, next to the C4 file. Many of them are the
# same articles as in gensim's dump (another revision): about 40% of its 8-word sequences
# are also in the "wikipedia" corpus, so do not train on one and validate on the other.
WIKI_DEMO_MEMBER_SUFFIX = "/data/wiki_demo.txt"


def wiki_demo_text() -> str:
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


def botchan_text() -> str:
    raw = read_sdist_member(SENTENCEPIECE_REQUIREMENT, BOTCHAN_MEMBER_SUFFIX).decode("utf-8-sig")
    lines = [line.rstrip() for line in raw.splitlines() if line.strip()]
    try:
        lines = lines[lines.index(BOTCHAN_FIRST_LINE):lines.index(BOTCHAN_LAST_LINE) + 1]
    except ValueError:
        raise ValueError(f"botchan.txt has no line {BOTCHAN_FIRST_LINE!r} or {BOTCHAN_LAST_LINE!r}") from None
    return PARAGRAPH_SEPARATOR.join(unwrap_greedy(lines, BOTCHAN_WRAP_WIDTH))
