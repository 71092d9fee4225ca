"""Guided decoding for one engine: its tokenizer's llguidance view, and each request's matcher.

The view takes ~1.5 s to build (llguidance walks the vocabulary) and is shared by every engine of the same
tokenizer (runtime/guided_tokenizer.py); the async engine builds it in a thread of its own at start (`ready` says
whether a caller would wait), and a request whose view is not ready yet gets its matcher off the engine's thread.
"""

from __future__ import annotations

from pathlib import Path

from llmengine_runtime.models.tokenizer import TOKENIZER_FILES, Tokenizer
from llmengine_runtime.runtime.guided import GuidedMatcher, compile_constraint, validate_constraint
from llmengine_runtime.runtime.guided_tokenizer import TokenizerInfo, tokenizer_info, tokenizer_info_built


class EngineGuided:
    def __init__(self, tokenizer: Tokenizer | None, model_dir: Path, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.model_dir = tokenizer, model_dir
        self.vocab_size, self.stop_token_ids = vocab_size, stop_token_ids

    def ready(self) -> bool:
        """Whether `matcher` returns without building the tokenizer's llguidance view first (~1.5 s)."""
        return self.tokenizer is None or tokenizer_info_built(self.tokenizer, self.vocab_size, self.stop_token_ids)

    def view(self) -> TokenizerInfo:
        """The tokenizer's llguidance view: built on the first call (~1.5 s), then cached."""
        self.require_tokenizer()
        return tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"guided decoding needs a tokenizer; {self.model_dir} has none "
                             f"({' or '.join(TOKENIZER_FILES)})")

    def validate(self, guided: tuple[str, object]) -> None:
        """ValueError naming the problem with a constraint (milliseconds: no tokenizer view needed)."""
        self.require_tokenizer()
        validate_constraint(*guided)

    def matcher(self, guided: tuple[str, object] | None) -> GuidedMatcher | None:
        """A fresh matcher for a request's guided-decoding constraint (None: unconstrained); ValueError naming
        the problem for an invalid one, or a model without a tokenizer. The tokenizer's llguidance view is
        built on the first guided request (~1.5 s) and cached; compiled constraints are cached too."""
        if guided is None:
            return None
        return compile_constraint(guided[0], guided[1], self.view()).matcher()
