"""The rule every OpenAI-style request body follows: a field that would change the answer is either honoured or
refused with a 400 that names it, never dropped.

- Every field a route knows is declared on its request model; a field it does not know is a 400 naming it
  (`unknown_field`), so a client's new sampling field never silently does nothing.
- `REFUSED` fields (a request model's class variable: field -> (accepted values, why)) are declared so they parse,
  and refused unless null or one of their accepted values (`use_beam_search: false`, `priority: 0`, ...).
- `NO_EFFECT` fields (field -> why) cannot change the answer (`user`, `metadata`, `service_tier`, ...): accepted
  whatever their value.
- Every other declared field is honoured by the route.

tests/server/test_server_field_policy.py walks vLLM's CompletionRequest and ChatCompletionRequest fields against
this. The LLM Engine route (schemas.CompletionV1Request) keeps ignoring unknown fields: the official client
sends fields of its own, nulls included, and must not be refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from llmengine_runtime.server.errors import bad_request

# Fields of OpenAI's and vLLM's that cannot change a generated answer, and why; accepted on every OpenAI route.
NO_EFFECT_COMMON = {
    "user": "an id of the caller's end user, for the caller's own records",
    "metadata": "the caller's own tags, stored nowhere here",
    "service_tier": "one tier serves every request here",
    "store": "nothing is stored here",
    "safety_identifier": "an id of the caller's end user, for the caller's own records",
    "prompt_cache_key": "the prefix cache finds shared prefixes by their tokens",
    "length_penalty": "it weighs beam search's candidates only, and beam search is refused",
    "guided_decoding_backend": "one backend (llguidance) serves every constraint",
    # vLLM reads it only in its slow-tokenizer detokenizer (a transformers PreTrainedTokenizer with added tokens,
    # --tokenizer-mode slow), joining added tokens' texts with a space; its default fast tokenizers ignore it.
    # Ours decode through the `tokenizers` library (tokenizer.json, and GGUF vocabularies made into one) as those
    # fast tokenizers do, or through sentencepiece with special tokens written in place, without spaces, as the
    # fast tokenizer converted from the same tokenizer.model decodes them: with either value, vLLM's default text.
    "spaces_between_special_tokens": "our tokenizers decode as Hugging Face's fast tokenizers do, which vLLM "
                                     "leaves unchanged by this field too (it only changes vLLM's slow, "
                                     "--tokenizer-mode slow, detokenizer)",
}

# Fields refused unless null or one of the listed values, and why (shared by completions and chat).
REFUSED_COMMON: dict[str, tuple[list[Any], str]] = {
    "use_beam_search": ([False], "beam search is not supported: use n (with best_of equal to n)"),
    "logits_processors": ([[]], "this server loads no custom logits processors"),
    "cache_salt": ([], "the prefix cache is shared by all requests here, not salted per request"),
    "kv_transfer_params": ([{}], "disaggregated serving (KV transfer) is not supported"),
    "vllm_xargs": ([{}], "no extension reads extra arguments here"),
    "repetition_detection": ([], "repetition detection is not supported: use repetition_penalty or stop"),
    "priority": ([0], "requests are served first come, first served (no priority scheduling)"),
    "guided_whitespace_pattern": ([], "JSON's whitespace is fixed here (at most one newline and 32 blanks in a "
                                      "row); a schema's own x-guidance settings replace it"),
    "structural_tag": ([], "structural tags are not supported: use guided_json, guided_regex or guided_grammar"),
}


def unknown_field(field: str) -> str:
    """The 400's message for a field no route knows."""
    return (f"{field}: unknown field: neither OpenAI's nor vLLM's (that this route knows); remove it, since an "
            "unknown field is refused rather than ignored")


class OpenAIBody(BaseModel):
    """A request body under the rule above. Subclasses set REFUSED and NO_EFFECT for their extra fields."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "5" is not an int, 1.5 is not an int

    REFUSED: ClassVar[dict[str, tuple[list[Any], str]]] = REFUSED_COMMON
    NO_EFFECT: ClassVar[dict[str, str]] = NO_EFFECT_COMMON

    @model_validator(mode="after")
    def _refuse(self) -> OpenAIBody:
        for name, (accepted, why) in self.REFUSED.items():
            value = getattr(self, name, None)
            if value is not None and value not in accepted:
                raise bad_request(f"{name}={value!r} is not supported: {why}")
        return self
