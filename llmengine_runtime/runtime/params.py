"""Per-request sampling and stopping parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_TOP_LOG_PROBS = 20


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = -1  # -1 = off
    top_p: float = 1.0
    presence_penalty: float = 0.0  # OpenAI semantics, over the generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same text (a generator per request)
    stop_sequences: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_log_probs: bool = False
    ignore_eos: bool = False
    speculate: bool = True  # with an engine that speculates (Engine(speculative=...)): False opts this request out
    top_log_probs: int = 0  # 0..MAX_TOP_LOG_PROBS: also the top-N (token id, log-prob) of each token's distribution
    prompt_log_probs: bool = False  # the log-prob of each prompt token given those before it (its rank, its top-N)
    prompt_top_log_probs: int = -1  # that top-N: -1 = as top_log_probs, else 0..MAX_TOP_LOG_PROBS
    # Guided decoding: (kind, spec), kind "json" | "regex" | "choice" | "grammar" (runtime/guided.py); the engine
    # compiles it in make_sequence (ValueError naming the problem).
    guided: tuple[str, Any] | None = None
    # vLLM's extra fields (runtime/logits_processors.py, runtime/stopping.py). A request that uses any of the logits
    # processing ones (`processes_logits`) does not speculate.
    min_tokens: int = 0  # neither stop tokens nor stop strings end the request before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end the request as the model's stop tokens do
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (Hugging Face's rule)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these tokens may be generated
    bad_words: list[str] = field(default_factory=list)  # these words are never generated
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first field out of its accepted range; returns self."""
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is out of range: accepted {accepted}")

        if not isinstance(self.prompt_log_probs, bool):
            raise bad("prompt_log_probs", "True or False")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0 or (self.max_new_tokens == 0 and not self.prompt_log_probs):
            raise bad("max_new_tokens", "an integer >= 1, or 0 with prompt_log_probs=True (score the prompt only)")
        if isinstance(self.top_log_probs, bool) or not isinstance(self.top_log_probs, int) \
                or not 0 <= self.top_log_probs <= MAX_TOP_LOG_PROBS:
            raise bad("top_log_probs", f"an integer from 0 to {MAX_TOP_LOG_PROBS}")
        if isinstance(self.prompt_top_log_probs, bool) or not isinstance(self.prompt_top_log_probs, int) \
                or not -1 <= self.prompt_top_log_probs <= MAX_TOP_LOG_PROBS:
            raise bad("prompt_top_log_probs", f"-1 (as top_log_probs) or an integer from 0 to {MAX_TOP_LOG_PROBS}")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or not (self.top_k == -1 or self.top_k >= 1):
            raise bad("top_k", "-1 (off) or an integer >= 1")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "0 < top_p <= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "[-2, 2]")
        if not isinstance(self.speculate, bool):
            raise bad("speculate", "True or False")
        if self.guided is not None and (not isinstance(self.guided, tuple) or len(self.guided) != 2
                                        or self.guided[0] not in ("json", "regex", "choice", "grammar")):
            raise bad("guided", "None or (kind, spec) with kind json, regex, choice or grammar")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        self._validate_extras(bad)
        if isinstance(self.stop_sequences, str):
            self.stop_sequences = [self.stop_sequences]
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise bad("stop_sequences", "a list of non-empty strings")
        return self

    def _validate_extras(self, bad: Any) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= max(self.max_new_tokens, 0):
            raise bad("min_tokens", f"an integer from 0 to max_new_tokens ({self.max_new_tokens})")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "[0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0 (1 = off)")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
        if self.logit_bias is not None and any(not is_int(t) or t < 0 or not -100 <= v <= 100
                                               for t, v in self.logit_bias.items()):
            raise bad("logit_bias", "token id -> bias in [-100, 100]")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or any(
                not is_int(t) or t < 0 for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", "a non-empty list of token ids")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", "a list of non-empty strings")
        if self.truncate_prompt_tokens is not None and (not is_int(self.truncate_prompt_tokens)
                                                        or self.truncate_prompt_tokens < 1):
            raise bad("truncate_prompt_tokens", "an integer >= 1, or None")
        if self.processes_logits:
            self.speculate = False  # the speculative verifier knows only penalties, temperature, top-k and top-p

    @property
    def processes_logits(self) -> bool:
        """Whether the sampler has more to do than penalties, temperature, top-k and top-p
        (runtime/logits_processors.py)."""
        return bool(self.min_tokens or self.min_p or self.repetition_penalty != 1 or self.logit_bias
                    or self.allowed_token_ids is not None or self.bad_words)

    @property
    def prompt_top_n(self) -> int:
        """The top-N kept of each scored prompt position's distribution (with prompt_log_probs)."""
        return self.top_log_probs if self.prompt_top_log_probs == -1 else self.prompt_top_log_probs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
