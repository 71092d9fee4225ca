r"""Guided (structured) decoding over llguidance: a request's JSON schema, regex, choice list or grammar
becomes a matcher whose token mask is applied to the logits before sampling.

    info = tokenizer_info(tokenizer, config.vocab_size, stop_ids)  # guided_tokenizer.py: once per model, cached
    validate_constraint("json", schema)                            # ValueError if invalid, without `info`
    constraint = compile_constraint("json", schema, info)          # ValueError if invalid; cached by spec
    matcher = constraint.matcher()                                 # one per request (a copy: microseconds)
    apply_token_masks(logits, [matcher or None per row])           # each step, on the raw logits
    matcher.advance(token)                                         # after sampling; is_finished(): "stop"

Kinds: "json" (a JSON schema; `{"type": "object"}` is OpenAI's json_object), "regex" (Rust `regex` syntax,
matched in full, `\d` and `\w` ASCII-only as in JSON schema), "choice" (exactly one of a list of strings)
and "grammar" (llguidance's Lark dialect, vLLM's `?start: ...` grammars included, or GBNF with
`root ::= ...`). JSON may have whitespace between values, but at most one newline and 32 spaces or tabs in
a row, so a small model cannot pad forever; a schema's own "x-guidance" settings replace that. The masks
allow the stop tokens only where the constraint is complete; once it can take nothing else,
`is_finished()` is true and the request ends with finish reason "stop".
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import torch
import torch.nn.functional as F

from llmengine_runtime.runtime.guided_tokenizer import TokenizerInfo

GUIDED_KINDS = ("json", "regex", "choice", "grammar")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
JSON_WHITESPACE = r"(?:[ \t]{1,32}|\r?\n[ \t]{0,32})"  # one run of blanks, or a newline and an indent
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors name the problem, not the parser state
_GBNF = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)
_CACHE_SIZE = 256
assert sys.byteorder == "little", "the bitmask is read as bytes, lowest token first"


class GuidedDecodingError(RuntimeError):
    """A token the constraint does not allow was fed to a matcher (after masking this is an engine bug)."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled constraint: make one matcher per request from it (any thread)."""

    kind: str
    info: TokenizerInfo
    _prototype: llguidance.LLMatcher = field(repr=False)

    def matcher(self) -> GuidedMatcher:
        return GuidedMatcher(self._prototype.deep_copy(), self.info)


def validate_constraint(kind: str, spec: Any) -> None:
    """`compile_constraint`'s checks without a tokenizer (milliseconds, no tokenizer view needed): the same
    ValueError naming the problem, for a request admitted before the view is built."""
    what, grammar_text = _grammar_text(kind, spec)
    error = llguidance.LLMatcher.validate_grammar(grammar_text, None, limits=_LIMITS)
    if error:
        raise ValueError(f"invalid {what}: {error.strip()}")


def compile_constraint(kind: str, spec: Any, info: TokenizerInfo) -> Constraint:
    """Validate and compile one constraint; ValueError naming the problem if it is not valid. Cached by
    (kind, spec) per tokenizer: a repeated schema costs a dict look-up."""
    what, grammar_text = _grammar_text(kind, spec)
    key = (kind, grammar_text)
    with info._lock:
        if key in info._constraints:
            info._constraints.move_to_end(key)
            return info._constraints[key]
    prototype = llguidance.LLMatcher(info.ll_tokenizer, grammar_text, log_level=0, limits=_LIMITS)
    if prototype.is_error():
        raise ValueError(f"invalid {what}: {prototype.get_error().strip()}")
    constraint = Constraint(kind, info, prototype)
    with info._lock:
        info._constraints[key] = constraint
        if len(info._constraints) > _CACHE_SIZE:
            info._constraints.popitem(last=False)
    return constraint


def _grammar_text(kind: str, spec: Any) -> tuple[str, str]:
    """(what the kind is called in errors, llguidance's grammar text); ValueError for a malformed spec."""
    if kind not in GUIDED_KINDS:
        raise ValueError(f"unknown guided decoding kind {kind!r}: accepted {', '.join(GUIDED_KINDS)}")
    what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}[kind]
    try:
        return what, _grammar(kind, spec)
    except ValueError as e:
        raise ValueError(f"invalid {what}: {e}") from None


def _grammar(kind: str, spec: Any) -> str:
    """llguidance's grammar text for a spec (cheap: compiling happens in the matcher); ValueError if the
    spec is not of the right type."""
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"expected an object, got {type(spec).__name__}")
        defaults = None if "x-guidance" in spec else {"whitespace_pattern": JSON_WHITESPACE}
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=defaults)
    if kind == "regex":
        if not isinstance(spec, str):
            raise ValueError(f"expected a string, got {type(spec).__name__}")
        if (len(spec) - len(spec.rstrip("\\"))) % 2:  # it would escape the closing "/" below
            raise ValueError("the regex ends with a lone backslash")
        # \d and \w as [0-9] and [0-9a-zA-Z_] (JSON schema's and JavaScript's meaning; Rust's are Unicode)
        return llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(spec, 'dw')}/")
    if kind == "choice":
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ValueError("expected a non-empty list of strings")
        bad = [c for c in spec if not isinstance(c, str) or not c]
        if bad:
            raise ValueError(f"every choice must be a non-empty string, got {bad[0]!r}")
        return llguidance.grammar_from("choice", json.dumps(list(dict.fromkeys(spec))))  # quoted Lark literals
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("expected a non-empty Lark or GBNF grammar string")
    if _GBNF.search(spec):  # llguidance's converter (its own check looks for `start:`, not `?start:`)
        return llguidance.grammar_from("gbnf", spec)
    return llguidance.LLMatcher.grammar_from_lark(spec)


class GuidedMatcher:
    """One request's position in its constraint. Not thread-safe: the engine's thread drives it."""

    __slots__ = ("_matcher", "info")

    def __init__(self, matcher: llguidance.LLMatcher, info: TokenizerInfo):
        self._matcher = matcher
        self.info = info

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into row `row` of an int32 CPU bitmask `[rows, bitmask_words]`
        (bit t % 32 of word t // 32 set = token t allowed)."""
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask[row].is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def allowed_token_ids(self) -> list[int]:
        """The allowed next tokens, as a list (for tests and debugging; the engine uses the bitmask)."""
        bitmask = torch.empty(1, self.info.bitmask_words, dtype=torch.int32)
        self.fill_bitmask(bitmask)
        return _unpack(bitmask)[0, :self.info.vocab_size].nonzero().flatten().tolist()

    def advance(self, token_id: int) -> None:
        """Consume one sampled token; GuidedDecodingError if the constraint does not allow it."""
        if not self._matcher.consume_token(int(token_id)):
            raise GuidedDecodingError(f"token {int(token_id)} breaks the constraint: {self._matcher.get_error()}")

    def advance_many(self, token_ids: Sequence[int]) -> int:
        """Consume the longest allowed prefix of `token_ids`; returns its length (the rest is left)."""
        return self._matcher.try_consume_tokens([int(t) for t in token_ids])

    def valid_prefix_len(self, token_ids: Sequence[int]) -> int:
        """How many leading `token_ids` the constraint would accept from here (no state change): trims
        speculative proposals before they cost a forward pass."""
        return self._matcher.validate_tokens([int(t) for t in token_ids])

    def rollback(self, num_tokens: int) -> None:
        if not self._matcher.rollback(num_tokens):
            raise GuidedDecodingError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")

    def is_accepting(self) -> bool:
        """The text so far is complete (a stop token is allowed now), though it may go on."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """The constraint is complete and allows nothing more: end the request with "stop"."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


# -- masks for a batch ------------------------------------------------------------------------------------
_EXECUTOR: llguidance.LLExecutor | None = None
_BIAS_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def apply_token_masks(logits: torch.Tensor, matchers: Sequence[GuidedMatcher | None],
                      draft_tokens: Sequence[Sequence[int]] | None = None) -> None:
    """Set to -inf, in place, the logits each row's constraint forbids; rows of `None` are not touched.

    logits `[rows, V]` (CPU or CUDA, any float dtype). Without `draft_tokens`, row i belongs to matchers[i].
    With them (speculative verification), request i owns 1 + len(draft_tokens[i]) consecutive rows, and its
    row j is masked as after draft_tokens[i][:j]; rows past its first disallowed draft are left open (the
    verifier rejects that draft, so they are never used). The masks are computed on the CPU (in parallel
    for several rows), copied once, and added as a 0/-inf bias to the guided rows in one operation.
    """
    if draft_tokens is not None and len(draft_tokens) != len(matchers):
        raise ValueError(f"{len(matchers)} matchers but {len(draft_tokens)} draft lists")
    counts = [1] * len(matchers) if draft_tokens is None else [1 + len(d) for d in draft_tokens]
    rows: list[int] = []
    jobs = []
    start = 0
    for i, (matcher, n) in enumerate(zip(matchers, counts)):
        if matcher is not None:
            jobs.append((matcher._matcher, len(rows), list(draft_tokens[i]) if draft_tokens else []))
            rows.extend(range(start, start + n))
        start += n
    if not jobs:
        return
    if start != logits.shape[0]:
        raise ValueError(f"{start} rows of logits expected, got {logits.shape[0]}")
    info = matchers[next(i for i, m in enumerate(matchers) if m is not None)].info
    cuda = logits.device.type == "cuda"
    bitmask = torch.full((len(rows), info.bitmask_words), -1, dtype=torch.int32, pin_memory=cuda)
    # llguidance.torch wraps these same calls, but importing it sets up torch.compile (seconds)
    plain = [job[:2] for job in jobs if not job[2]]
    drafted = [job for job in jobs if job[2]]  # the draft version takes no empty draft list
    pointer, row_bytes = bitmask.data_ptr(), info.bitmask_words * 4
    if len(plain) == 1 and not drafted:
        plain[0][0].unsafe_compute_mask_ptr(pointer, row_bytes)
    elif plain:
        _executor().unsafe_compute_mask_ptr(plain, pointer, row_bytes, len(rows))
    if drafted:
        _executor().unsafe_compute_mask_ptr_with_draft_token(drafted, pointer, row_bytes, len(rows))
    apply_bitmask(logits, bitmask, rows)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Add -inf to logits[rows[k], t] where bit t of bitmask[k] is clear; other rows stay bit-identical."""
    vocab = logits.shape[1]
    key = (logits.device, logits.dtype)
    if key not in _BIAS_TABLES:  # byte value -> its 8 tokens' bias (0 allowed, -inf forbidden)
        _BIAS_TABLES[key] = torch.zeros(256, 8, dtype=logits.dtype).masked_fill_(
            _unpack(torch.arange(256, dtype=torch.uint8)[:, None]).logical_not(), float("-inf")).to(logits.device)
    as_bytes = bitmask.to(logits.device, non_blocking=True).view(torch.uint8).long()
    bias = F.embedding(as_bytes, _BIAS_TABLES[key]).view(len(rows), -1)
    if bias.shape[1] < vocab:
        raise ValueError(f"the bitmask covers {bias.shape[1]} tokens, the logits have {vocab}")
    bias = bias[:, :vocab]
    with torch.inference_mode(logits.is_inference()):  # the runner's logits may be inference tensors
        if len(rows) == logits.shape[0]:  # every row guided (rows are ascending and distinct)
            logits.add_(bias)
        else:
            logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """bool `[rows, bits * columns]` from packed int32 or uint8 `[rows, columns]`, lowest bit first."""
    shifts = torch.arange(8 * packed.element_size(), dtype=torch.int32)
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).view(packed.shape[0], -1).bool()


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


# -- request fields -------------------------------------------------------------------------------------------
def guided_spec(response_format: dict | None = None, **fields: Any) -> tuple[str, Any] | None:
    """(kind, spec) from a request's fields, or None: the v1 / vLLM `guided_json`, `guided_regex`,
    `guided_choice`, `guided_grammar` (None = absent) and OpenAI's `response_format`. ValueError for
    more than one, an unknown field, or a response_format that is not text, json_object or json_schema."""
    unknown = set(fields) - set(GUIDED_FIELDS)
    if unknown:
        raise ValueError(f"unknown guided decoding field {sorted(unknown)[0]!r}: accepted {', '.join(GUIDED_FIELDS)}")
    given = [(name, GUIDED_FIELDS[name], spec) for name, spec in fields.items() if spec is not None]
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            given.append(("response_format", "json", {"type": "object"}))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            given.append(("response_format", "json", schema))
        elif kind != "text":
            raise ValueError(f"response_format type {kind!r} is not supported: accepted text, json_object, "
                             "json_schema")
    if len(given) > 1:
        raise ValueError(f"at most one guided decoding field per request, got {', '.join(g[0] for g in given)}")
    return given[0][1:] if given else None
