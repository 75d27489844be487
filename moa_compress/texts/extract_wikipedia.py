"""Turn articles of a MediaWiki XML dump into the plain text in ``wikipedia/`` (run once, by hand).

Usage: ``python extract_wikipedia.py DUMP.xml.bz2 OUT_DIR "Title One,Title Two,..."``

The dump used is the shortened English Wikipedia dump in the ``gensim`` wheel's test data (README.md
beside this file). Not part of the installed package: the text it wrote is.
"""

from __future__ import annotations

import bz2
import html
import re
import sys
from pathlib import Path

# Sections from which on an article is lists of sources and links, not prose.
STOP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
}
NON_TEXT_LINK = re.compile(r"\[\[(File|Image|Category|Media):", re.IGNORECASE)
NON_TEXT_TAGS = re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.DOTALL)


def drop_nested(text: str, opening: str, closing: str) -> str:
    """Remove every ``opening ... closing`` span, nested ones included (templates, tables)."""
    kept, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                kept.append(text[i])
            i += 1
    return "".join(kept)


def drop_non_text_links(text: str) -> str:
    """Remove ``[[File:...]]``-style links, whose captions may hold links of their own."""
    kept, i = [], 0
    while (match := NON_TEXT_LINK.search(text, i)) is not None:
        kept.append(text[i : match.start()])
        depth, j = 0, match.start()
        while j < len(text):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        i = j
    kept.append(text[i:])
    return "".join(kept)


def plain_text(markup: str) -> str:
    text = html.unescape(markup)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = drop_nested(text, "{{", "}}")
    text = drop_nested(text, "{|", "|}")
    text = drop_non_text_links(text)
    text = NON_TEXT_TAGS.sub("", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    lines: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.match(r"^(=+)\s*(.*?)\s*\1$", line)
        if heading:
            if len(heading.group(1)) == 2 and heading.group(2).lower() in STOP_SECTIONS:
                break
            lines += ["", heading.group(2)]
            continue
        if line.startswith(("|", "!", "__")):  # table rows and magic words left by broken markup
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
        lines.append(re.sub(r"  +", " ", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main(dump: str, out_dir: str, titles: str) -> None:
    wanted = set(titles.split(","))
    with bz2.open(dump, "rt", encoding="utf-8") as stream:
        data = stream.read()
    for page in re.findall(r"<page>(.*?)</page>", data, re.DOTALL):
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        if title not in wanted:
            continue
        revision = re.search(r"<revision>\s*<id>(\d+)</id>", page).group(1)
        body = plain_text(re.search(r"<text[^>]*>(.*?)</text>", page, re.DOTALL).group(1))
        Path(out_dir, title.replace(" ", "_") + ".txt").write_text(f"{title}\n\n{body}", encoding="utf-8")
        print(f"{title}: revision {revision}, {len(body)} characters")


if __name__ == "__main__":
    main(*sys.argv[1:4])
