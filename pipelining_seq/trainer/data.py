"""Token streams and the batch order.

Two sources, both a flat 1-D stream of token ids:

* ``builtin``: the bytes of the text files shipped in :mod:`pipelining_seq.corpus`
  (byte-level tokenizer, vocabulary 256; nothing downloaded);
* a token file in the nanoGPT / llm.c layout: flat little-endian ``uint16`` or ``uint32``
  ids, optionally behind llm.c's 256 x int32 header, memory-mapped with
  ``torch.from_file`` so a corpus larger than memory costs nothing to open.

With ``document_masking`` the builtin corpus is packed as torchtitan packs its samples:
each document (a paragraph: text between blank lines) is followed by the separator
token :data:`DOCUMENT_SEPARATOR` (byte 0, which the text never contains) and the
documents are concatenated; :func:`pipelining_seq.models.document_ids_from_tokens` turns a
window's tokens into document ids, so attention stays within documents.

Batches are random windows of ``seq_len + 1`` tokens. Their start offsets come from a
generator seeded with ``(seed, step)`` alone, so step s draws the same batch whether the
run got there uninterrupted or resumed from a checkpoint; data-parallel ranks take
disjoint rows of the same global batch.

``python -m pipelining_seq.trainer.data in.txt out.bin`` turns text into a token file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "DOCUMENT_SEPARATOR",
    "ByteTokenizer",
    "DatasetInfo",
    "TokenBatches",
    "builtin_corpus_files",
    "builtin_documents",
    "fingerprint",
    "pack_documents",
    "inspect_dataset",
    "load_tokens",
    "write_token_file",
]

logger = logging.getLogger(__name__)

_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}
# llm.c token files start with 256 int32: magic, version, token count, zeros.
_LLMC_MAGIC = 20240520
_LLMC_HEADER_BYTES = 256 * 4
# Token-id range checks read at most this many tokens (the whole file when smaller).
_SCAN_TOKENS = 1 << 22
DOCUMENT_SEPARATOR = 0
"""End-of-document token of the packed builtin corpus (byte 0, absent from the text)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255."""

    vocab_size = 256

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)

    @staticmethod
    def decode(tokens: torch.Tensor | list[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return bytes(int(t) for t in ids).decode("utf-8", errors="replace")


def builtin_corpus_files() -> list[Path]:
    """The corpus text files, in name order (license texts excluded)."""
    root = resources.files("pipelining_seq") / "corpus"
    files = sorted(
        Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt") and not p.name.startswith("LICENSE")
    )
    if not files:
        raise FileNotFoundError(f"no corpus text files in {root}: the package was installed without its data")
    return files


_FINGERPRINT_PART = 1 << 20


def fingerprint(dataset: str) -> str | None:
    """Size and sha256 of a dataset's bytes: the whole file up to 2 MiB, else its first and
    last MiB (a file replaced at the same path reads as another dataset). None if unreadable."""
    paths = builtin_corpus_files() if dataset == "builtin" else [Path(dataset)]
    h = hashlib.sha256()
    size = 0
    try:
        for path in paths:
            n = path.stat().st_size
            size += n
            with open(path, "rb") as f:
                if n <= 2 * _FINGERPRINT_PART:
                    h.update(f.read())
                else:
                    h.update(f.read(_FINGERPRINT_PART))
                    f.seek(n - _FINGERPRINT_PART)
                    h.update(f.read(_FINGERPRINT_PART))
    except OSError:
        return None
    return f"{size} bytes, sha256 {h.hexdigest()[:16]}"


@dataclass(frozen=True)
class DatasetInfo:
    """What validation needs to know about a dataset without loading it."""

    n_tokens: int
    """Tokens in the stream."""
    max_token: int
    """Largest token id (over the first few million tokens of a large file)."""
    header_bytes: int
    """Bytes before the first token (1024 for llm.c files, else 0)."""


def _header_bytes(path: str, dtype: str) -> int:
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) == 12 and int.from_bytes(head[:4], "little") == _LLMC_MAGIC:
        version = int.from_bytes(head[4:8], "little")
        width = {1: 2, 2: 4}.get(version)
        if width is not None and width != torch.tensor([], dtype=_DTYPES[dtype]).element_size():
            raise ValueError(
                f"llm.c header says {'uint16' if width == 2 else 'uint32'} tokens (version {version}) but "
                f"training.dataset_dtype={dtype}: set training.dataset_dtype to match"
            )
        return _LLMC_HEADER_BYTES
    return 0


def inspect_dataset(dataset: str, *, dtype: str = "uint16") -> DatasetInfo:
    """Token count and largest id of ``dataset`` ('builtin' or a token file); raises on bad files."""
    if dataset == "builtin":
        size = sum(p.stat().st_size for p in builtin_corpus_files())
        return DatasetInfo(n_tokens=size, max_token=255, header_bytes=0)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use uint16 or uint32")
    if os.path.isdir(dataset):
        raise ValueError(
            f"{os.path.abspath(dataset)} is a folder, not a token file: give the .bin file inside it "
            "(training.dataset=path/to/file.bin)"
        )
    if not os.path.isfile(dataset):
        raise FileNotFoundError(
            f"file {os.path.abspath(dataset)} does not exist: give a token file (make one with "
            "`python -m pipelining_seq.trainer.data text.txt out.bin`) or use training.dataset=builtin"
        )
    if os.path.getsize(dataset) == 0:
        raise ValueError(f"{os.path.abspath(dataset)} is empty (0 bytes): give a token file with tokens in it")
    _refuse_text(dataset)
    header = _header_bytes(dataset, dtype)
    width = torch.tensor([], dtype=_DTYPES[dtype]).element_size()
    body = os.path.getsize(dataset) - header
    if body <= 0 or body % width:
        raise ValueError(
            f"{body} bytes of tokens is not a whole number of {dtype} tokens: check training.dataset_dtype"
        )
    tokens = load_tokens(dataset, dtype=dtype)
    scan = tokens[:_SCAN_TOKENS].to(torch.int64)
    _check_width(scan, dtype)
    return DatasetInfo(n_tokens=tokens.numel(), max_token=int(scan.max()), header_bytes=header)


def _refuse_text(path: str) -> None:
    """A text file given as token data would train on its bytes read as token ids."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut at the end of the sample
            text = head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    if text and printable >= 0.98 * len(text) and any(c in text for c in " \n"):
        raise ValueError(
            f"{os.path.abspath(path)} looks like a text file, not token ids: convert it with "
            f"`python -m pipelining_seq.trainer.data {path} tokens.bin` and set training.dataset=tokens.bin"
        )


def _check_width(scan: torch.Tensor, dtype: str) -> None:
    """uint32 ids below 65536 read as uint16 give a 0 in every second token; uint16 ids read
    as uint32 give ids of billions (no vocabulary has a million tokens)."""
    if scan.numel() < 64:
        return
    if dtype == "uint32":
        if float((scan >= 1 << 20).float().mean()) > 0.5:
            raise ValueError(
                f"most token ids are above a million (largest {int(scan.max())}): this looks like a uint16 token "
                "file read as uint32; set training.dataset_dtype=uint16"
            )
        return
    n = scan.numel() // 2 * 2
    low, high = scan[:n:2], scan[1:n:2]
    if bool((high == 0).all()) and bool((low != 0).any()):
        raise ValueError(
            "every second uint16 token is 0: this looks like a uint32 token file read as uint16; "
            "set training.dataset_dtype=uint32"
        )


def pack_documents(documents: list[bytes], *, separator: int) -> bytes:
    """The documents, each followed by the separator byte, concatenated."""
    sep = bytes([separator])
    for i, doc in enumerate(documents):
        if sep in doc:
            raise ValueError(f"document {i} contains the separator byte {separator}: choose another separator")
    return b"".join(doc + sep for doc in documents)


def builtin_documents() -> list[bytes]:
    """The builtin corpus as documents: its paragraphs (text between blank lines), in order."""
    docs = []
    for p in builtin_corpus_files():
        docs += [d.strip(b"\n") for d in p.read_bytes().split(b"\n\n") if d.strip()]
    return docs


def load_tokens(dataset: str, *, dtype: str = "uint16", document_masking: bool = False) -> torch.Tensor:
    """The whole token stream as a 1-D tensor (memory-mapped for token files).

    ``document_masking`` packs the builtin corpus's documents, each ended by
    :data:`DOCUMENT_SEPARATOR` (builtin only).
    """
    if document_masking and dataset != "builtin":
        raise ValueError(
            f"training.document_masking=true needs training.dataset=builtin (got {dataset!r}): token files "
            "carry no document separator this trainer knows; set training.document_masking=false"
        )
    if dataset == "builtin":
        if document_masking:
            raw = pack_documents(builtin_documents(), separator=DOCUMENT_SEPARATOR)
        else:
            raw = b"".join(p.read_bytes() for p in builtin_corpus_files())
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    header = _header_bytes(dataset, dtype)
    width = torch.tensor([], dtype=_DTYPES[dtype]).element_size()
    n = (os.path.getsize(dataset) - header) // width
    # from_file maps the whole file; the header (if any) is a whole number of tokens.
    mapped = torch.from_file(dataset, shared=False, size=n + header // width, dtype=_DTYPES[dtype])
    return mapped[header // width:]


def write_token_file(tokens: torch.Tensor, path: str, *, dtype: str = "uint16") -> None:
    """Write ``tokens`` as a flat token file (no header), atomically."""
    limit = {"uint16": 1 << 16, "uint32": 1 << 32}[dtype]
    ids = tokens.reshape(-1).to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise ValueError(f"token ids must be in [0, {limit}) for {dtype}")
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    # A shared file mapping writes the ids straight to disk, without numpy.
    out = torch.from_file(tmp, shared=True, size=ids.numel(), dtype=_DTYPES[dtype])
    out.copy_(ids.to(_DTYPES[dtype]))
    del out
    os.replace(tmp, path)


class TokenBatches:
    """Deterministic batches of (inputs, targets) windows from a token stream.

    Args:
        tokens: 1-D token stream.
        seq_len: tokens per sequence.
        global_batch_size: sequences per step over all data-parallel ranks.
        seed: batch-order seed.
        dp_rank, dp_degree: this rank's rows are ``[dp_rank * local : (dp_rank + 1) * local]``.
    """

    def __init__(
        self, tokens: torch.Tensor, *, seq_len: int, global_batch_size: int, seed: int,
        dp_rank: int = 0, dp_degree: int = 1,
    ) -> None:
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{tokens.numel()} tokens cannot fill one sequence of {seq_len} + 1")
        if global_batch_size % dp_degree:
            raise ValueError(f"global batch {global_batch_size} not divisible by {dp_degree} data-parallel ranks")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.local = global_batch_size // dp_degree
        self.rows = slice(dp_rank * self.local, (dp_rank + 1) * self.local)
        self._window = torch.arange(seq_len + 1)

    def starts(self, step: int) -> torch.Tensor:
        """Start offsets of the global batch of ``step`` (a function of seed and step only)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = self.tokens.numel() - self.seq_len  # last valid start + 1
        return torch.randint(0, high, (self.global_batch_size,), generator=g)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each ``[local_batch, seq_len]`` int64, of this rank for ``step``."""
        idx = self.starts(step)[self.rows, None] + self._window
        win = self.tokens[idx].to(torch.int64)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Turn a text file into a flat byte-level token file.")
    parser.add_argument("input", help="UTF-8 text file")
    parser.add_argument("output", help="token file to write (.bin)")
    parser.add_argument("--dtype", default="uint16", choices=sorted(_DTYPES), help="token width")
    args = parser.parse_args(argv)
    text = Path(args.input).read_text(encoding="utf-8")
    tokens = ByteTokenizer.encode(text)
    write_token_file(tokens, args.output, dtype=args.dtype)
    print(f"wrote {tokens.numel()} tokens ({args.dtype}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
