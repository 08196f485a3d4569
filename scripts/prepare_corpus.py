#!/usr/bin/env python3
"""Build the World English Bible (public domain) training corpus.

Downloads the Debian package ``sword-text-web`` with ``apt-get download``
(or uses ``--deb PATH``), unpacks it with ``dpkg-deb -x`` and reads the SWORD
zText module ``engWEB2015eb`` directly (no libsword needed):

* ``{ot,nt}.bzv``: verse index, records ``<IIH`` (block, offset, size), in
  canonical (NRSVA) order; ``{ot,nt}.bzs``: block index, records ``<III``
  (offset, size, uncompressed size) into ``{ot,nt}.bzz``, each block a
  zlib-compressed run of OSIS XML. Reading through the verse index (not the
  raw blocks) matters: the .bzz also holds stale copies of rewritten blocks.
* Chapters are OSIS milestones ``<chapter sID="Gen.1" .../>`` ...
  ``<chapter eID="Gen.1"/>``. Text outside chapters (preface, book
  introductions, glossary) is dropped, as are footnotes (``<note>``),
  non-canonical headings (``<title>`` without ``canonical="true"``) and
  Song of Songs speaker labels; canonical titles (psalm superscriptions)
  are kept as text. Verse numbers never appear.

Output (one chapter of plain text per line, canonical order):
``data/web/{train,val}.txt`` and their reproducible ``.gz`` (gzip -9,
mtime 0), plus ``data/web/PROVENANCE.md``. Validation = the whole books in
``VAL_BOOKS``; train = every other book. Re-running gives identical bytes
for the same package version.

Usage: python scripts/prepare_corpus.py [--deb FILE.deb] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import itertools
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

PACKAGE = "sword-text-web"
MODULE_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
COPYRIGHT = f"usr/share/doc/{PACKAGE}/copyright"
# Held-out books (OSIS ids): narrative, prophecy, epistles, poetry.
VAL_BOOKS = ("Ruth", "Lam", "Jonah", "Tob", "Phil", "Jas", "1John")
REPO = Path(__file__).resolve().parent.parent

NOTE_RE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.DOTALL)
TITLE_RE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.DOTALL)
SPEAKER_RE = re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.DOTALL)
CHAPTER_RE = re.compile(r"<chapter\b([^>]*)>")
ATTR_RE = re.compile(r'(\w+)="([^"]*)"')
# Inline elements vanish without a space; any other tag becomes a space.
INLINE_RE = re.compile(r"</?(?:w|q|name|seg|hi|transChange|foreign|divineName|added|rdg)\b[^>]*>")
TAG_RE = re.compile(r"<[^>]*>")
NOTE_MARK = "\x00"  # where a footnote was: a space only if a word follows


def sh(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_deb(dest: Path) -> Path:
    try:
        sh("apt-get", "download", PACKAGE, cwd=dest)
    except subprocess.CalledProcessError as e:
        sys.exit(f"apt-get download {PACKAGE} failed (try apt-get update):\n{e.stderr}")
    (deb,) = dest.glob(f"{PACKAGE}_*.deb")
    return deb


def read_testament(mod: Path, name: str) -> list[str]:
    """OSIS text of every verse entry, in verse-index order.

    Two quirks of this module are handled: entries linked to the same text
    (same block and offset) are emitted once, and the 16-bit entry size
    wraps for entries over 64 KiB (the whole of DanGr is one entry), so the
    real end is taken from the next entry's offset or the block's end.
    """
    bzs = (mod / f"{name}.bzs").read_bytes()
    bzz = (mod / f"{name}.bzz").read_bytes()
    bzv = (mod / f"{name}.bzv").read_bytes()
    entries = [e for e in struct.iter_unpack("<IIH", bzv) if e[2]]
    blocks: dict[int, bytes] = {}
    for blk in sorted({e[0] for e in entries}):
        boff, bsize, usize = struct.unpack_from("<III", bzs, 12 * blk)
        blocks[blk] = zlib.decompress(bzz[boff : boff + bsize])
        assert len(blocks[blk]) == usize, (name, blk)
    starts: dict[int, list[int]] = {}
    for blk, off, _ in entries:
        starts.setdefault(blk, []).append(off)
    ends = {}  # (blk, off) -> offset of the next entry or end of block
    for blk, offs in starts.items():
        offs = sorted(set(offs)) + [len(blocks[blk])]
        ends.update({(blk, a): b for a, b in itertools.pairwise(offs)})
    out, seen = [], set()
    for blk, off, size in entries:
        if (blk, off) in seen:
            continue
        seen.add((blk, off))
        room = ends[blk, off] - off
        if room > size and (room - size) % 0x10000 == 0:
            size = room
        out.append(blocks[blk][off : off + size].decode("utf-8"))
    return out


def clean(xml: str) -> str:
    text = INLINE_RE.sub("", xml)
    text = html.unescape(TAG_RE.sub(" ", text))
    text = re.sub(NOTE_MARK + r"+(?=[\w“‘(\[])", " ", text).replace(NOTE_MARK, "")
    return " ".join(text.split())


def chapters(osis: str) -> list[tuple[str, str]]:
    """[(osisID like 'Gen.1', plain text)] from a verse-ordered OSIS stream."""
    osis = NOTE_RE.sub(NOTE_MARK, osis)
    osis = SPEAKER_RE.sub(" ", osis)
    osis = TITLE_RE.sub(lambda m: f" {m.group(2)} " if 'canonical="true"' in m.group(1) else " ", osis)
    parts = CHAPTER_RE.split(osis)  # text, attrs, text, attrs, ...
    texts: dict[str, list[str]] = {}
    current: str | None = None
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if current is not None:
                texts[current].append(part)
            continue
        attrs = dict(ATTR_RE.findall(part))
        if "sID" in attrs:
            current = attrs.get("osisID", attrs["sID"])
            texts.setdefault(current, [])
        elif attrs.get("eID") == current:
            current = None
    return [(cid, t) for cid, xs in texts.items() if (t := clean(" ".join(xs)))]


def write_gz(src: Path) -> Path:
    dst = src.with_name(src.name + ".gz")
    with (
        dst.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        gz.write(src.read_bytes())
    return dst


def public_domain_statement(copyright_text: str) -> str:
    stanza = copyright_text.split("\n\n")
    pd = [s for s in stanza if s.startswith("Files: *")]
    return (pd[0] if pd else copyright_text).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb", type=Path, help="use this .deb instead of apt-get download")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "web")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        deb = args.deb.resolve() if args.deb else download_deb(tmp)
        fields = {k: sh("dpkg-deb", "-f", str(deb), k).strip() for k in ("Package", "Version")}
        root = tmp / "x"
        sh("dpkg-deb", "-x", str(deb), str(root))
        mod = root / MODULE_DIR
        osis = " ".join(read_testament(mod, "ot") + read_testament(mod, "nt"))
        copyright_text = (root / COPYRIGHT).read_text(encoding="utf-8")
        deb_name, deb_sha = deb.name, sha256(deb)

    chs = chapters(osis)
    books = list(dict.fromkeys(cid.split(".")[0] for cid, _ in chs))
    missing = set(VAL_BOOKS) - set(books)
    assert not missing, f"validation books not found: {missing}"
    split = {"train": [], "val": []}
    for cid, text in chs:
        split["val" if cid.split(".")[0] in VAL_BOOKS else "train"].append(text)

    rows = []
    for name, lines in split.items():
        txt = args.out / f"{name}.txt"
        txt.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        gz = write_gz(txt)
        rows.append((name, len(lines), txt, gz))

    val_chars = sum(len(t) for t in split["val"])
    all_chars = val_chars + sum(len(t) for t in split["train"])
    table = "\n".join(
        f"| {gz.name} | {n} | {txt.stat().st_size} | `{sha256(txt)}` | {gz.stat().st_size} | `{sha256(gz)}` |"
        for name, n, txt, gz in rows
    )
    prov = f"""# World English Bible corpus — provenance

Generated by `python scripts/prepare_corpus.py` (from the repository root;
needs `apt-get` and `dpkg-deb`, otherwise Python stdlib only; `--deb FILE`
reuses a downloaded package).

- Debian package: `{fields["Package"]}` version `{fields["Version"]}`
  (`apt-get download {PACKAGE}`), file `{deb_name}`
- sha256 of the .deb: `{deb_sha}`
- SWORD module: `engWEB2015eb` (World English Bible with Deuterocanon, OSIS,
  zText), read through its verse index
- Format: UTF-8, one chapter of plain text per line, canonical order;
  footnotes, headings, book introductions and verse numbers removed
- Split by whole books: val = {", ".join(VAL_BOOKS)} (OSIS ids);
  train = the other {len(books) - len(VAL_BOOKS)} books
  ({val_chars / all_chars:.2%} of characters in val)

| file | chapters | .txt bytes | .txt sha256 | .gz bytes | .gz sha256 |
|---|---|---|---|---|---|
{table}

The `.txt` files are not committed; `gunzip -k` the `.gz` files (gzip -9,
mtime 0, no name) or re-run the script to get them.

## License (from `/{COPYRIGHT}`)

```
{public_domain_statement(copyright_text)}
```

This corpus drops the module's footnotes, headings, introductions and
glossary, and reflows the text one chapter per line; refer to it as
"derived from the World English Bible" (see the trademark request above).
"""
    (args.out / "PROVENANCE.md").write_text(prov, encoding="utf-8")

    print(f"{fields['Package']} {fields['Version']}  sha256 {deb_sha}")
    print(f"{len(books)} books, {len(chs)} chapters; val books: {', '.join(VAL_BOOKS)}")
    for name, n, txt, gz in rows:
        print(
            f"{name:5s} {n:5d} chapters  {txt.stat().st_size:>9,d} B txt  "
            f"{gz.stat().st_size:>9,d} B gz  -> {gz.relative_to(REPO) if gz.is_relative_to(REPO) else gz}"
        )


if __name__ == "__main__":
    main()
