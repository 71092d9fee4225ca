"""Incremental detokenization with the default model's byte-level BPE tokenizer, and stop strings."""

from __future__ import annotations

import pytest

from llmengine_runtime.models.tokenizer import Tokenizer
from llmengine_runtime.runtime.detokenizer import IncrementalDetokenizer, TextStream

TEXT = "It’s 🍦 naïve — 日本語! Done."


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_folder(default_model_dir)


def stream_all(stream: TextStream, ids: list[int]) -> tuple[list[str], bool]:
    deltas, stopped = [], False
    for token in ids:
        delta, stopped = stream.add(token)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(stream.flush())
    return deltas, stopped


def test_multibyte_characters_split_across_tokens_never_leak(tokenizer):
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids), "the text must split characters across tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT == tokenizer.decode(ids)
    assert "â€™" not in "".join(deltas)
    assert len(detok.ids) < 12, "the decode window must not grow with the sequence"


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        assert text == ("Hi there" if skip else "Hi there<|im_end|>")


@pytest.mark.parametrize("stop,include,want", [
    ("naïve — 日", False, "It’s 🍦 "),  # spans several tokens, ends inside a split character
    ("naïve — 日", True, "It’s 🍦 naïve — 日"),
    ("s 🍦", False, "It’"),
    ("Done", False, "It’s 🍦 naïve — 日本語! "),
    ("not there", False, TEXT),
])
def test_stop_strings_across_tokens_never_leak(tokenizer, stop, include, want):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tokenizer, [], [stop, "zzz"], include, skip_special_tokens=True)
    deltas, stopped = stream_all(stream, ids)
    assert "".join(deltas) == want
    assert stopped == (stop in TEXT)
    emitted = ""
    for delta in deltas:  # at no point does the stream show text beyond the cut
        emitted += delta
        assert want.startswith(emitted)


def test_partial_stop_prefix_is_held_then_released(tokenizer):
    stream = TextStream(tokenizer, [], ["na\u00efve!"], False, skip_special_tokens=True)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, stopped = stream_all(stream, ids)
    assert not stopped and "".join(deltas) == TEXT
    emitted = ""
    for delta in deltas[:-1]:
        emitted += delta
        assert not emitted.endswith(" na")  # " na" could start "naïve!": held until "ïve " shows it is not
