"""Token ids -> text deltas: UTF-8 safe, O(window) per token, with stop strings that never leak.

`IncrementalDetokenizer` decodes only a short window of ids per token (from `prefix_offset`), and holds
text back while it ends in U+FFFD: a byte-level BPE token can carry half a UTF-8 character, which decodes
to U+FFFD until the rest arrives (decoding one token at a time gives the mojibake `â€™` that older LLM
Engine docs show).
The window starts a few prompt tokens back so that decoders which drop a leading space at the start of a
slice (sentencepiece) still see the context.

`TextStream` adds stop strings on top: text that could be the start of a stop string is held back until
it is known not to be one, so a stream never shows part of a stop string. The deltas it returns
concatenate to the final text exactly.
"""

from __future__ import annotations

from llmengine_runtime.models.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for leading-space handling


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is decoded text already emitted
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The text that token completes; "" while it ends inside a UTF-8 character."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back (at the end of generation), even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # Drop ids before the window: keeps each decode O(window), not O(sequence).
        del self.ids[:self.prefix_offset]
        self.read_offset -= self.prefix_offset
        self.prefix_offset = 0
        return text[len(prefix):]


class TextStream:
    """The text of one request's output: `add(token) -> (delta, stopped)`, then `flush()` at the end."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], stop_sequences: list[str],
                 include_stop_str_in_output: bool, skip_special_tokens: bool):
        self.detokenizer = None if tokenizer is None else \
            IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stops = list(stop_sequences)
        self.include_stop = include_stop_str_in_output
        self.text = ""  # everything decoded so far
        self.emitted = 0  # text[:emitted] went out in deltas
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that ended the text

    def add(self, token_id: int, check_stops: bool = True) -> tuple[str, bool]:
        """(new text, stopped). With check_stops False (before min_tokens) stop strings neither end the text nor
        hold text back; later checks look only at text that ends after that."""
        if self.detokenizer is None or self.stopped:
            return "", self.stopped
        start = len(self.text)
        self.text += self.detokenizer.add(token_id)
        if not check_stops:
            return self._emit(len(self.text)), False
        if self.stops:
            # A stop string that ends in the new text may start up to len(stop) - 1 chars before it.
            window = max(0, start - max(map(len, self.stops)) + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, window)) >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index + len(stop) if self.include_stop else index]
                self.stopped, self.stop_reason = True, stop
                return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        if self.detokenizer is not None and not self.stopped:
            self.text += self.detokenizer.flush()
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.emitted), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
