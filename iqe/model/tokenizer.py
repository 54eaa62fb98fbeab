"""OpenAI CLIP's byte-level BPE tokenizer (the one MVFA's text prompts go through).

The merge table is OpenAI's `bpe_simple_vocab_16e6.txt` (MIT licence, as shipped in
open_clip_torch), cut to the 48 894 merges the tokenizer reads (`iqe/data/clip_bpe_merges.txt.gz`,
200 kB instead of 1.3 MB). Ids: 256 byte symbols, their 256 word-final forms, one id per
merge, then <start> 49406 and <end> 49407. Text is cleaned as CLIP does (ftfy, HTML
unescape twice, whitespace collapsed, lower-cased) before BPE; ids are checked against the
reference tokenizer's output in the tests.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import regex

from iqe.errors import InputError

MERGES_FILE = Path(__file__).resolve().parents[1] / "data" / "clip_bpe_merges.txt.gz"
N_MERGES = 49152 - 256 - 2
START_ID, END_ID = 49406, 49407
# Words: the two special tokens, English contractions, letter runs, single digits, other symbol runs.
_WORD = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)


def _byte_symbols() -> dict[int, str]:
    """One printable character per byte value, in CLIP's vocabulary order: printable Latin-1
    bytes map to themselves and come first, the others map to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class ClipTokenizer:
    """Text -> CLIP token ids (no padding); `tokenize` adds start/end and pads to the context."""

    def __init__(self, merges_file: str | Path = MERGES_FILE):
        lines = gzip.open(merges_file, "rt", encoding="utf-8").read().split("\n")[1 : N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_symbol = _byte_symbols()
        symbols = list(self.byte_symbol.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.ids["<|startoftext|>"], self.ids["<|endoftext|>"] = START_ID, END_ID
        self.rank = {m: i for i, m in enumerate(merges)}

    @lru_cache(maxsize=4096)
    def _bpe(self, word: str) -> tuple[str, ...]:
        """Greedy merges by rank, lowest first, on a word whose last symbol carries '</w>'."""
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.rank.get((a, b), N_MERGES), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best = min(ranked)[0]
            if best == N_MERGES:
                break
            pair = next((parts[i], parts[i + 1]) for r, i in ranked if r == best)
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    @staticmethod
    def clean(text: str) -> str:
        """ftfy (when installed; the identity on plain ASCII), HTML unescape, whitespace, lower case."""
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            if not text.isascii():
                raise InputError(f"text {text!r} is not ASCII: install ftfy to clean it as CLIP does") from None
        text = html.unescape(html.unescape(text)).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        out = []
        for word in _WORD.findall(self.clean(text)):
            symbols = "".join(self.byte_symbol[b] for b in word.encode("utf-8"))
            out.extend(self.ids[piece] for piece in self._bpe(symbols))
        return out

    def tokenize(self, texts: list[str], context_length: int = 77) -> list[list[int]]:
        """[start, ids..., end] zero-padded to `context_length`; too long is an error (as in CLIP)."""
        rows = []
        for text in texts:
            ids = [START_ID, *self.encode(text), END_ID]
            if len(ids) > context_length:
                raise InputError(f"prompt {text!r} has {len(ids)} tokens, more than the context length {context_length}")
            rows.append(ids + [0] * (context_length - len(ids)))
        return rows


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()
