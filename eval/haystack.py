"""Background text ("haystack") for BABILong samples: sentences of long books with their GPT-2 token counts.

Sources: PG19 (test split) through `datasets` when the Hub is reachable, any local text files, or the six
public-domain Austen novels of Debian's `r-cran-janeaustenr` (its `Rdata.rdb`, parsed here without R). Token counts
of `' ' + sentence` are computed once per corpus and cached, so building a 10M-token sample never re-tokenizes it.

    python -m eval.haystack fetch-austen     # download + extract the Austen novels into the cache
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

MIN_SENTENCE_TOKENS = 10  # BABILong skips background sentences shorter than this
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_RDB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")


def cache_dir() -> Path:
    """Where extracted text and token counts live: $ARMT_EVAL_CACHE, else ~/.cache/armt-eval."""
    path = Path(os.environ.get("ARMT_EVAL_CACHE", Path.home() / ".cache" / "armt-eval"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Sentences

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]*[A-Z0-9])")
_ABBREVIATIONS = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Sr|Jr|Col|Capt|Gen|Lt|Rev|Prof|Hon|No|vol|viz|i\.e|e\.g)\.$")


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of a text: paragraphs at blank lines, whitespace collapsed, split after . ! ? before a capital
    (common abbreviations such as "Mr." do not end a sentence)."""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            candidate = paragraph[start : match.start()].rstrip()
            if _ABBREVIATIONS.search(candidate.rstrip("\"'\u201d\u2019)]")):
                continue
            yield paragraph[start : match.end()].strip()
            start = match.end()
        tail = paragraph[start:].strip()
        if tail:
            yield tail


# ---------------------------------------------------------------------------------------------------------------
# The Austen novels from Debian's r-cran-janeaustenr


def _read_r_strings(raw: bytes) -> list[str]:
    """The character vector of one R serialisation (XDR format 'X\\n', version 2 or 3): one string per line."""
    if raw[:2] != b"X\n":
        raise ValueError("Not an XDR R serialisation")
    pos = 2
    (version,) = struct.unpack_from(">i", raw, pos)
    pos += 12
    if version == 3:
        (n,) = struct.unpack_from(">i", raw, pos)
        pos += 4 + n
    flags, length = struct.unpack_from(">ii", raw, pos)
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"Expected a character vector (STRSXP), found SEXP type {flags & 0xFF}")
    strings = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", raw, pos)  # CHARSXP flags, byte length (-1 = NA)
        pos += 8
        if n < 0:
            strings.append("")
            continue
        strings.append(raw[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return strings


def read_rdb_texts(rdb: str | Path) -> list[str]:
    """Each character vector stored in an R lazy-load database (`Rdata.rdb`), joined into one text per vector.

    The file is a sequence of records: 4-byte big-endian uncompressed length, then a zlib stream."""
    data = Path(rdb).read_bytes()
    texts, offset = [], 0
    while offset + 4 < len(data):
        stream = zlib.decompressobj()
        raw = stream.decompress(data[offset + 4 :])
        offset = len(data) - len(stream.unused_data)
        try:
            texts.append("\n".join(_read_r_strings(raw)))
        except ValueError:
            continue  # not a character vector
    return texts


def _locate_austen_rdb(fetch: bool) -> Path:
    if AUSTEN_RDB.exists():
        return AUSTEN_RDB
    extracted = cache_dir() / "janeaustenr-deb"
    found = sorted(extracted.glob("**/janeaustenr/data/Rdata.rdb"))
    if found:
        return found[0]
    if not fetch:
        raise FileNotFoundError(
            f"The Austen novels are not available: run `python -m eval.haystack fetch-austen` (downloads Debian's "
            f"{AUSTEN_DEB} with apt-get) or give local text files with --haystack PATH."
        )
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"Fetching {AUSTEN_DEB} needs apt-get and dpkg-deb; use --haystack PATH instead.")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {AUSTEN_DEB}` failed ({result.stderr.strip()[-300:]}); run `apt-get update` "
                "first, or use --haystack PATH."
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], check=True)
    return _locate_austen_rdb(fetch=False)


def austen_texts(fetch: bool = True) -> list[Path]:
    """The six Austen novels as cached text files (extracted once from the Debian package)."""
    target = cache_dir() / "austen"
    files = sorted(target.glob("*.txt"))
    if len(files) >= 6:
        return files
    texts = read_rdb_texts(_locate_austen_rdb(fetch))
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for text in texts:
        title = text.split("\n", 1)[0].strip() or f"novel-{len(files)}"
        path = target / (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".txt")
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return sorted(files)


# ---------------------------------------------------------------------------------------------------------------
# PG19 and local files


def pg19_texts(max_chars: int = 60_000_000) -> Iterator[str]:
    """Books of PG19's test split from the Hub (streaming), up to `max_chars` characters."""
    import datasets

    total = 0
    for row in datasets.load_dataset("deepmind/pg19", split="test", streaming=True):
        yield row["text"]
        total += len(row["text"])
        if total >= max_chars:
            return


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """Text files named directly or found (*.txt, recursively) in the given folders."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"Haystack path {path} does not exist.")
    if not files:
        raise ValueError(f"No text files found in {list(map(str, paths))}.")
    return files


# ---------------------------------------------------------------------------------------------------------------
# The haystack


class Haystack:
    """Background sentences (of at least MIN_SENTENCE_TOKENS GPT-2 tokens as `' ' + sentence`) and their counts."""

    def __init__(self, sentences: list[str], counts: np.ndarray, name: str = "haystack"):
        if len(sentences) != len(counts) or not sentences:
            raise ValueError("A haystack needs at least one sentence and one token count per sentence.")
        self.sentences = sentences
        self.counts = np.asarray(counts, dtype=np.int64)
        self.name = name
        self.total_tokens = int(self.counts.sum())

    def __len__(self) -> int:
        return len(self.sentences)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, name: str = "haystack", use_cache: bool = True) -> "Haystack":
        sentences = [s for text in texts for s in split_sentences(text)]
        if not sentences:
            raise ValueError(f"The {name} texts hold no sentences.")
        digest = hashlib.sha1("\n".join(sentences).encode("utf-8")).hexdigest()[:16]
        cached = cache_dir() / "token-counts" / f"{name}-{digest}.npy" if use_cache else None
        if cached is not None and cached.exists():
            counts = np.load(cached)
        else:
            counts = np.empty(len(sentences), dtype=np.int32)
            batch = 4096
            for start in tqdm(range(0, len(sentences), batch), desc=f"counting {name} tokens", leave=False):
                chunk = [" " + s for s in sentences[start : start + batch]]
                counts[start : start + len(chunk)] = [len(ids) for ids in tokenizer(chunk)["input_ids"]]
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, counts)
        keep = counts >= MIN_SENTENCE_TOKENS
        sentences = [s for s, k in zip(sentences, keep) if k]
        return cls(sentences, counts[keep], name)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], tokenizer, name: str | None = None) -> "Haystack":
        files = text_files(paths)
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
        return cls.from_texts(texts, tokenizer, name or "files")

    def take(self, start: int, tokens: int) -> tuple[np.ndarray, int]:
        """Sentence indices from `start` (wrapping around) whose counts first reach `tokens`, and the overshoot."""
        if tokens <= 0:
            return np.empty(0, dtype=np.int64), 0
        n = len(self)
        rolled = np.roll(self.counts, -start)
        cycles, rest = divmod(tokens, self.total_tokens)
        if rest == 0:
            cycles, rest = cycles - 1, self.total_tokens
        last = int(np.searchsorted(np.cumsum(rolled), rest))  # first index whose running sum >= rest
        count = cycles * n + last + 1
        indices = (start + np.arange(count)) % n
        overshoot = int(cycles * self.total_tokens + rolled[: last + 1].sum() - tokens)
        return indices, overshoot


def load_haystack(source: str | list[str] | None, tokenizer, online: bool = False) -> Haystack:
    """`source`: text files / folders, "austen", "pg19", or None (PG19 when online, else Austen)."""
    if source is None:
        source = "pg19" if online else "austen"
    if isinstance(source, str):
        source = [source]
    if source == ["pg19"]:
        if not online:
            raise ValueError("The PG19 haystack needs the Hub; offline use --haystack austen or local text files.")
        return Haystack.from_texts(pg19_texts(), tokenizer, "pg19")
    if source == ["austen"]:
        return Haystack.from_files(austen_texts(), tokenizer, "austen")
    return Haystack.from_files(source, tokenizer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.haystack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch-austen", help=f"download Debian's {AUSTEN_DEB} and cache the six novels as text")
    stats = sub.add_parser("stats", help="sentence and token counts of a haystack")
    stats.add_argument("source", nargs="*", default=["austen"], help='text files/folders, or "austen"')
    return parser


def run(args: argparse.Namespace) -> None:
    from .common import EvalError

    try:
        if args.command == "fetch-austen":
            for path in austen_texts(fetch=True):
                print(path)
            return
        from .tokenizer import gpt2_tokenizer

        haystack = load_haystack(args.source, gpt2_tokenizer())
    except (OSError, ValueError, RuntimeError) as err:  # missing files or package, no text, unwritable cache
        raise EvalError(str(err)) from None
    print(f"{haystack.name}: {len(haystack)} sentences, {haystack.total_tokens} GPT-2 tokens")


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
