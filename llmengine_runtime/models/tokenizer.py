"""Text <-> token ids for a model folder, over `tokenizer.json` (HF `tokenizers`) or
`tokenizer.model` (`sentencepiece`), plus the folder's chat template.

    tok = Tokenizer.from_folder("cache/smollm2")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    text = tok.decode(ids, skip_special_tokens=True)

Special tokens and the bos/eos choice come from the folder's tokenizer_config.json,
special_tokens_map.json, generation_config.json and config.json, as transformers reads them.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmengine_runtime.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _as_set(ids) -> set[int]:
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, list) else {int(ids)}


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")
        tok_config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        self.folder = folder

        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            added = self._hf.get_added_tokens_decoder()
            special = {i for i, t in added.items() if t.special}
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self.vocab_size = self._sp.get_piece_size()
            special = {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
            # Tokens added on top of the sentencepiece model (ChatML markers and the like).
            for i, token in tok_config.get("added_tokens_decoder", {}).items():
                if int(i) < self.vocab_size and (not isinstance(token, dict) or token.get("special", True)):
                    special.add(int(i))
        else:
            raise FileNotFoundError(f"No tokenizer in {folder}: looked for {' or '.join(TOKENIZER_FILES)}")

        def token_id(name: str) -> int | None:
            token = _content(tok_config.get(name))
            tid = self.token_to_id(token) if token is not None else None
            return tid if tid is not None else config.get(f"{name}_id", generation.get(f"{name}_id"))

        eos_ids = generation.get("eos_token_id", config.get("eos_token_id"))
        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        if self.eos_token_id is None and eos_ids is not None:
            self.eos_token_id = eos_ids[0] if isinstance(eos_ids, list) else eos_ids
        self.stop_token_ids = _as_set(self.eos_token_id) | _as_set(eos_ids)
        named = {token_id(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.special_token_ids = special | (named - {None})

        # bos: added by the tokenizer.json post-processor, or by us when the config asks for it.
        self._adds_bos = self._hf is not None and self.bos_token_id in self._hf.encode("").ids
        self.add_bos_token = tok_config.get("add_bos_token", self._sp is not None or self._adds_bos)

        self.chat_template = self._read_chat_template(folder, tok_config)
        self.bos_token = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        self.eos_token = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        if self._sp is not None:  # sentencepiece leaves special tokens in text unmatched: split them out
            names = sorted((self.id_to_token(i) for i in self.special_token_ids), key=len, reverse=True)
            self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        return cls(folder)

    @staticmethod
    def _read_chat_template(folder: Path, tok_config: dict) -> str | None:
        if (folder / "chat_template.jinja").is_file():  # where transformers 5 saves it
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return template

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        tid = self._sp.piece_to_id(token)
        return None if tid == self._sp.unk_id() and token != self._sp.id_to_piece(tid) else tid

    def id_to_token(self, token_id: int) -> str:
        return self._hf.id_to_token(token_id) if self._hf is not None else self._sp.id_to_piece(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            parts = self._special_split.split(text) if self._special_split else [text]
            ids = []
            for i, part in enumerate(parts):
                if i % 2:  # the split's captured group: a special token
                    ids.append(self.token_to_id(part))
                elif part:
                    ids.extend(self._sp.encode(part))
        if add_special_tokens and self.add_bos_token and not self._adds_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Works on any slice: a byte-level piece of an unfinished UTF-8 character decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # sentencepiece drops control tokens from its output; write them ourselves between runs.
        text, run = [], []
        for i in ids:
            if i in self.special_token_ids:
                text.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    text.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        text.append(self._sp.decode(run))
        return "".join(text)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError(f"The tokenizer in {self.folder} has no chat_template (tokenizer_config.json)")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    # The environment transformers renders chat templates in: sandboxed, trim/lstrip blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def stop_token_ids(config: ModelConfig, tokenizer: Tokenizer | None) -> set[int]:
    """The tokens that end a generation: config.json's eos ids, plus the tokenizer's when there is one."""
    return set(config.eos_token_id) | (tokenizer.stop_token_ids if tokenizer is not None else set())
