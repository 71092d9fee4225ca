"""Next tokens for a batch of requests, each with its own sampling parameters, in batched tensor ops.

Order: a request's logits processing (runtime/logits_processors.py: logit_bias, allowed_token_ids, bad_words,
min_tokens, repetition_penalty) -> penalties (presence, frequency) -> temperature -> top-k -> top-p -> min_p ->
draw. Greedy requests (temperature 0) take the argmax of the penalised logits. Token log-probs are the
log-softmax of the final distribution: for sampled requests that is the one actually drawn from (penalised,
divided by the temperature, truncated by top-k/top-p and renormalised), so a log-prob is the log of the probability
with which its token was drawn; for greedy requests it is the penalised logits at temperature 1. A request with
`top_log_probs` N also gets the N most likely tokens of that same distribution (runtime/log_probs.py).

On the CPU the truncation and the draws are kernels/cpu/sample_rows.cpp's (selection instead of a sort of the
vocabulary; an inverse-CDF draw from one float64 uniform a row, the seeded request's own generator's), for every row:
a row asking for top-N also gets the torch log-softmax its top-N come from, but draws as the others do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmengine_runtime.kernels import cpu as cpu_kernels
from llmengine_runtime.runtime.greedy import greedy_rows
from llmengine_runtime.runtime.log_probs import TopLogProbs, top_log_probs
from llmengine_runtime.runtime.logits_processors import apply_logits_processing, apply_min_p
from llmengine_runtime.runtime.params import SamplingParams
from llmengine_runtime.runtime.sequence import Sequence as RuntimeSequence


def apply_penalties(logits: torch.Tensor, output_ids: list[list[int]], presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI semantics: `logits - presence * (count > 0) - frequency * count`, with `count` how often
    each token occurs among that request's generated tokens. logits `[B, V]`, presence/frequency `[B]`."""
    num_rows, vocab = logits.shape
    width = max(map(len, output_ids), default=0)
    if width == 0:
        return logits
    padded = torch.full((num_rows, width), vocab, dtype=torch.int64)  # pads count in an extra column
    for row, ids in enumerate(output_ids):
        padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    padded = padded.to(logits.device)
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=logits.dtype))
    counts = counts[:, :vocab]
    return logits - presence[:, None] * (counts > 0).to(logits.dtype) - frequency[:, None] * counts


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's `top_k` largest logits, then the smallest set of those whose probability reaches
    `top_p`; the rest become -inf. top_k `[B]` int (vocab size = off), top_p `[B]` (1 = off). Ties keep
    the lower token id first, as argmax does, so top_k=1 is greedy. On the CPU, kernels/cpu/sample_rows.cpp's
    truncate_logits (selection instead of a sort of the vocabulary: ~3.5 ms a row of 49k); elsewhere torch."""
    if cpu_kernels.cpu_logits(logits):
        return torch.ops.llmengine_cpu.truncate_logits(logits, top_k, top_p)
    return top_k_top_p_torch(logits, top_k, top_p)


def top_k_top_p_torch(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`apply_top_k_top_p` in torch ops (a sort of each row): for CUDA, and the CPU kernel's reference."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # top_p 1: no rounding-off of the tail
    drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def final_logits(logits: torch.Tensor, params: list[SamplingParams], output_ids: Sequence[list[int]]) -> torch.Tensor:
    """The logits each row's token is drawn from: penalties over `output_ids[i]` (read only when some row has a
    penalty), then, for sampled rows, temperature, top-k and top-p. fp32 `[B, V]`; row i follows params[i]."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits.float()

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype).to(device)

    if any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits, list(output_ids), column([p.presence_penalty for p in params]),
                                 column([p.frequency_penalty for p in params]))
    if not all(p.greedy for p in params):
        temperature = column([1.0 if p.greedy else p.temperature for p in params])
        logits = logits / temperature[:, None]
        if any(p.top_k != -1 or p.top_p < 1 for p in params):
            top_k = column([vocab if p.greedy or p.top_k == -1 else p.top_k for p in params], torch.int64)
            top_p = column([1.0 if p.greedy else p.top_p for p in params])
            logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p for p in params):
            logits = apply_min_p(logits, column([0.0 if p.greedy else p.min_p for p in params]))
    return logits


def uniforms(seqs: list[RuntimeSequence], rows: list[int]) -> torch.Tensor:
    """One float64 uniform per row in `rows` for sample_logits' draw: the sequence's own generator's when seeded (so a
    seeded request draws the same whatever else is in the batch), else one batch from torch's default generator."""
    unseeded = [i for i in rows if seqs[i].generator is None]
    drawn = dict(zip(unseeded, torch.rand(len(unseeded), dtype=torch.float64).tolist()))
    return torch.tensor([drawn[i] if i in drawn else
                         float(torch.rand((), dtype=torch.float64, generator=seqs[i].generator)) for i in rows],
                        dtype=torch.float64)


def plain_greedy(seq: RuntimeSequence) -> bool:
    """A greedy request whose rows' tokens are their logits' argmax as they come: no logits processing, penalties
    or top-N."""
    p = seq.params
    return (p.greedy and seq.processing is None and not p.top_log_probs and not p.presence_penalty
            and not p.frequency_penalty)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[RuntimeSequence]) -> tuple[list[int], list[float]]:
        """One next token and its log-prob per row of logits `[B, V]` (row i belongs to seqs[i])."""
        tokens, log_probs, _ = self.sample(logits, seqs)
        return tokens, log_probs

    def sample(self, logits: torch.Tensor, seqs: list[RuntimeSequence], need_log_probs: bool = True,
               argmax: list[int] | None = None) -> tuple[list[int], list[float], list[TopLogProbs]]:
        """As __call__, plus each row's top-N (token, log-prob) for N = its `top_log_probs` ([] for 0). With
        `need_log_probs=False` a greedy batch may return NaN log-probs (the argmax alone: no log-softmax pass);
        `argmax`, the logits rows' argmax when the model step took it already, then stands for that pass."""
        params = [seq.params for seq in seqs]
        greedy = all(p.greedy and not p.top_log_probs for p in params)
        processed = any(seq.processing is not None for seq in seqs)
        if all(plain_greedy(seq) for seq in seqs):
            if argmax is not None and not need_log_probs:
                return argmax, [float("nan")] * len(params), [[] for _ in params]
            if cpu_kernels.cpu_logits(logits):
                tokens, token_log_probs = torch.ops.llmengine_cpu.greedy_sample(logits, need_log_probs)
                return tokens.tolist(), token_log_probs.tolist(), [[] for _ in params]
        if processed:
            logits = apply_logits_processing(logits, seqs)
        logits = final_logits(logits, params, [seq.output_token_ids for seq in seqs])
        if greedy:  # argmax and one log-sum-exp per row
            tokens, token_log_probs = greedy_rows(logits)
            return tokens.tolist(), token_log_probs.tolist(), [[] for _ in params]
        if cpu_kernels.cpu_logits(logits):
            return self.sample_on_cpu(logits, seqs, need_log_probs)
        log_probs = torch.log_softmax(logits, dim=-1)
        tokens = log_probs.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:  # (CPU logits never get here: sample_on_cpu takes every row there)
            probs = log_probs[sampled].exp()
            draws = [torch.multinomial(probs[j], 1, generator=seqs[i].generator) for j, i in enumerate(sampled)]
            tokens[sampled] = torch.cat(draws)
        token_log_probs = log_probs.gather(1, tokens[:, None]).squeeze(1)
        plain = [i for i, p in enumerate(params) if p.greedy and not p.top_log_probs]
        if plain:  # greedy rows beside sampled ones: the numbers they get alone (runtime/greedy.py)
            index = torch.tensor(plain, device=logits.device)
            tokens[index], token_log_probs[index] = greedy_rows(logits[index].contiguous())
        tops = top_log_probs(log_probs, [p.top_log_probs for p in params])
        return tokens.tolist(), token_log_probs.tolist(), tops

    @staticmethod
    def sample_on_cpu(logits: torch.Tensor, seqs: list[RuntimeSequence],
                      need_log_probs: bool) -> tuple[list[int], list[float], list[TopLogProbs]]:
        """The final logits' draws by kernels/cpu/sample_rows.cpp (inverse CDF from one float64 uniform a sampled
        row: the sequence's own generator's when seeded, else one batch from torch's default), greedy rows by
        greedy_sample; rows that ask for top-N get it, and their token's log-prob, from top_log_probs.cpp (the same
        numbers in both). Log-probs NaN where not `need_log_probs`."""
        params = [seq.params for seq in seqs]
        tokens, token_log_probs = [0] * len(seqs), [float("nan")] * len(seqs)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        plain = [i for i, p in enumerate(params) if p.greedy]
        if sampled:
            rows = logits if len(sampled) == len(seqs) else logits[sampled]
            drawn_tokens, drawn_log_probs = torch.ops.llmengine_cpu.sample_logits(rows, uniforms(seqs, sampled),
                                                                                  need_log_probs)
            for i, t, lp in zip(sampled, drawn_tokens.tolist(), drawn_log_probs.tolist()):
                tokens[i], token_log_probs[i] = t, lp
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]
            plain_tokens, plain_log_probs = torch.ops.llmengine_cpu.greedy_sample(rows, need_log_probs)
            for i, t, lp in zip(plain, plain_tokens.tolist(), plain_log_probs.tolist()):
                tokens[i], token_log_probs[i] = t, lp
        tops: list[TopLogProbs] = [[] for _ in seqs]
        asking = [i for i, p in enumerate(params) if p.top_log_probs]
        if asking:
            rows = logits if len(asking) == len(seqs) else logits[asking]
            k = max(params[i].top_log_probs for i in asking)
            own, values, ids = torch.ops.llmengine_cpu.top_log_probs(rows, torch.tensor([tokens[i] for i in asking]),
                                                                      k)
            for i, lp, vs, ts in zip(asking, own.tolist(), values.tolist(), ids.tolist()):
                n = params[i].top_log_probs
                token_log_probs[i] = lp
                tops[i] = [(t, v) for v, t in zip(vs[:n], ts[:n]) if v != -math.inf]
        return tokens, token_log_probs, tops
