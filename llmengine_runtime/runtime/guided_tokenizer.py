"""The tokenizer as llguidance sees it: built once per (tokenizer, vocabulary size, stop tokens), then cached.

Building it takes a second or two (llguidance walks the whole vocabulary), so it is shared by every engine of the
same tokenizer, built under a lock, and `tokenizer_info_built` tells a caller whether it would wait. The view is
read from the tokenizer's own tokenizer.json when there is one; SentencePiece tokenizers go through their pieces.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from copy import copy
from dataclasses import dataclass, field
from typing import Any

import llguidance

from llmengine_runtime.models.tokenizer import Tokenizer


@dataclass(eq=False)
class TokenizerInfo:
    """llguidance's view of one model's tokenizer; masks have `vocab_size` columns (the logits' width)."""

    ll_tokenizer: llguidance.LLTokenizer
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    _constraints: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def bitmask_words(self) -> int:
        return (self.vocab_size + 31) // 32


_INFOS: dict[tuple, TokenizerInfo] = {}
_INFOS_LOCK = threading.Lock()


def _info_key(tokenizer: Tokenizer, vocab_size: int, stops: tuple[int, ...]) -> tuple:
    return (str(tokenizer.folder.resolve()), vocab_size, stops)


def tokenizer_info_built(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> bool:
    """Whether `tokenizer_info` with these arguments returns at once (built already); never waits."""
    return _info_key(tokenizer, vocab_size, tuple(sorted({int(t) for t in stop_token_ids}))) in _INFOS


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> TokenizerInfo:
    """Build (once per folder, vocab size and stop tokens; later calls return the cached one) what
    llguidance needs. `vocab_size`: the model's logits width (config.vocab_size); columns past the
    tokenizer's vocabulary are never allowed. Works for tokenizer.json and sentencepiece folders.
    A built one is returned without the lock, so another model's build (a second or two) delays nobody."""
    stops = tuple(sorted({int(t) for t in stop_token_ids}))
    key = _info_key(tokenizer, vocab_size, stops)
    if (info := _INFOS.get(key)) is not None:
        return info
    with _INFOS_LOCK:  # one build at a time: it takes a second or two
        if key not in _INFOS:
            n_vocab = max(vocab_size, tokenizer.vocab_size)
            if tokenizer._hf is not None:
                source: Any = _tokenizer_json(tokenizer)
            else:
                source = llguidance.TokenizerWrapper(_SentencePieceTokens(tokenizer, n_vocab))
            ll = llguidance.LLTokenizer(source, n_vocab=n_vocab, eos_token=list(stops) or None)
            _INFOS[key] = TokenizerInfo(ll, n_vocab, stops)
        return _INFOS[key]


def _tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer.json text llguidance reads, without padding or truncation (they would change it). The file
    itself when the loaded tokenizer has neither (the usual case): copying and serializing the loaded one holds
    the GIL for about a second, which would stall every other thread of the process."""
    hf = tokenizer._hf
    path = tokenizer.folder / "tokenizer.json"
    if hf.padding is None and hf.truncation is None and path.is_file():
        return path.read_text(encoding="utf-8")
    hf = copy(hf)
    hf.no_padding()
    hf.no_truncation()
    return hf.to_str()


class _SentencePieceTokens:
    """The fields llguidance.TokenizerWrapper reads: each id's bytes, the special ids, and an encoder."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        sp = tokenizer._sp
        self._sp = sp
        self.tokens = [_piece_bytes(sp, i) for i in range(sp.get_piece_size())]
        self.tokens += [b""] * (n_vocab - len(self.tokens))  # ids the model has and the tokenizer lacks
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids)
        self._prefix = sp.encode("\x02")

    def __call__(self, text: str) -> list[int]:
        """`text`'s tokens mid-sequence (llguidance forces these): sentencepiece would put a "▁" in front of
        the text, so encode it after a control character and drop that character's tokens."""
        ids = self._sp.encode("\x02" + text)
        n = len(self._prefix)
        return ids[n:] if ids[:n] == self._prefix else self._sp.encode(text)


def _piece_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # byte fallback: "<0x0A>"
        return bytes([int(piece[3:5], 16)])
    if sp.is_control(i) or sp.is_unknown(i):
        return piece.encode()
    return piece.replace("\u2581", " ").encode()
