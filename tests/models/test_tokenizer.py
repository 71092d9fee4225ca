"""models.tokenizer: same ids, text and chat prompts as transformers; sentencepiece and tokenizers paths."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from llmengine_runtime.models.gguf import default_gguf_path
from llmengine_runtime.models.tokenizer import Tokenizer

TEXTS = [
    "Suggest a name for an icecream shop",
    "  leading spaces,\ttabs and\n\nnewlines  ",
    "café naïve Ünïcödé, 日本語のテキスト, 中文, 한국어, Ελληνικά, русский",
    "emoji 🤗🚀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2 + 12345  # 3.14159\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
    "not special: <|im_start |> <s> </s>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a shop 🍦"},
     {"role": "assistant", "content": "Scoops"}, {"role": "user", "content": "Another?"}],
]


@pytest.fixture(scope="module")
def smollm_folder(default_model_dir):
    """The default model as convert_gguf imported it (tests/conftest.py)."""
    return default_model_dir


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """A tiny byte-fallback sentencepiece model trained here, with a config that names its specials."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog café résumé naïve hello world code token".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True,
    }))
    return folder


@pytest.mark.slow
def test_matches_transformers_gguf_tokenizer(smollm_folder, reference):
    tok = Tokenizer.from_folder(smollm_folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids, tok.vocab_size) == (1, 2, {2}, 49152)
    assert tok.special_token_ids == set(range(17))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_chat_template_matches_transformers(smollm_folder, reference):
    tok = Tokenizer.from_folder(smollm_folder)
    assert tok.has_chat_template
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = reference.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert ours == theirs
    assert tok.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


TEMPLATE = """{{ bos_token }}
{%- for m in messages %}
  {% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}{% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.mark.slow
def test_chat_template_environment_matches_transformers(tmp_path, smollm_folder, reference):
    """Block whitespace trimming, tojson and raise_exception behave as in transformers."""
    shutil.copy(smollm_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((smollm_folder / "tokenizer_config.json").read_text()) | {"chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    messages = [{"role": "user", "content": " hi ", "meta": {"lang": "日本語", "n": [1, 2]}}, *CHATS[1]]
    for add_generation_prompt in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = reference.apply_chat_template(
            messages, chat_template=TEMPLATE, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
    with pytest.raises(Exception, match="tools are not supported"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_decode_any_slice(smollm_folder):
    tok = Tokenizer.from_folder(smollm_folder)
    ids = tok.encode("日本🤗 ok")
    pieces = [tok.decode(ids[i : i + 1]) for i in range(len(ids))]
    assert "\ufffd" in "".join(pieces)  # a lone byte of a multi-byte character
    for k in range(len(ids) + 1):  # an unfinished character shows as U+FFFD at the end, nothing else
        assert "日本🤗 ok".startswith(tok.decode(ids[:k]).rstrip("\ufffd"))
    assert tok.decode(ids) == "日本🤗 ok"


@pytest.mark.parametrize("which", ["sentencepiece", "tokenizers"])
def test_round_trip(which, sp_folder, smollm_folder):
    tok = Tokenizer.from_folder(sp_folder if which == "sentencepiece" else smollm_folder)
    for text in ["héllo wörld", "the café in 日本語 🤗🚀", "  two  spaces\nand a newline", "naïve résumé"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_sentencepiece_specials(sp_folder):
    tok = Tokenizer.from_folder(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids) == (1, 2, {2})
    assert {0, 1, 2} <= tok.special_token_ids and tok.vocab_size == 400
    ids = tok.encode("hello</s>world")
    assert ids[0] == 1 and ids.count(1) == 1 and 2 in ids  # bos added once; "</s>" is the eos token
    assert tok.decode(ids) == "<s>hello</s>world"
    assert tok.decode(ids, skip_special_tokens=True) == "helloworld"
    assert tok.encode("hello", add_special_tokens=False)[0] != 1
    byte_ids = tok.encode("🤗", add_special_tokens=False)
    assert tok.decode(byte_ids) == "🤗" and tok.decode(byte_ids[-1:]) == "\ufffd"
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_config_files_drive_bos_and_stop_tokens(tmp_path, smollm_folder):
    shutil.copy(smollm_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = Tokenizer.from_folder(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids) == (1, 2, {0, 2})
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"No tokenizer in .*tokenizer\.json or tokenizer\.model"):
        Tokenizer.from_folder(tmp_path)
