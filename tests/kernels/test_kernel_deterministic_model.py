"""A tiny float Llama (GQA) through the Triton kernels under `--deterministic` (interpreted on CPU, compiled on
CUDA): a sequence's logits at every position are bit-identical (`==`) whether its prompt ran alone, beside another
prompt, in chunks beside another sequence's decode step, without a cache, or position by position as decode steps.
The float products (fixed-tile matmul), attention (fixed key splits), norms and rotary all take part."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.kernels.deterministic import ENV, set_deterministic
from llmengine_runtime.models.attention import AttentionMetadata, allocate_kv_caches
from llmengine_runtime.models.causal_lm import CausalLM
from llmengine_runtime.models.config import parse_config

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
A = [5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53]  # 21 tokens
B = [60, 61, 62, 63, 64, 65, 66, 67, 68]
BLOCK = 8


class PagedRun:
    """Steps over a paged cache, each sequence owning its blocks: step([(seq, tokens, start), ...]) computes the
    tokens at positions start.. of each sequence (their K/V stored) and returns each part's logits."""

    def __init__(self, model: CausalLM, device) -> None:
        self.model, self.device = model, device
        self.caches = allocate_kv_caches(model.config, 16, BLOCK, torch.float32, device)
        self.tables = torch.arange(16, dtype=torch.int32).view(2, 8)  # sequence s owns blocks 8s .. 8s + 7

    @torch.inference_mode()
    def step(self, parts: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        ids, positions, slots, lens, cu = [], [], [], [], [0]
        for seq, tokens, start in parts:
            span = range(start, start + len(tokens))
            ids += tokens
            positions += list(span)
            slots += [int(self.tables[seq, p // BLOCK]) * BLOCK + p % BLOCK for p in span]
            lens.append(span.stop)
            cu.append(cu[-1] + len(tokens))
        device = self.device
        meta = AttentionMetadata(torch.tensor(cu, dtype=torch.int32, device=device),
                                 torch.tensor(lens, dtype=torch.int32, device=device),
                                 torch.tensor(slots, device=device),
                                 self.tables[[seq for seq, _, _ in parts]].to(device),
                                 max_seqlen_q=max(len(t) for _, t, _ in parts),
                                 is_decode=all(len(t) == 1 for _, t, _ in parts))
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta,
                            self.caches)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(t) for _, t, _ in parts]))


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    model = CausalLM(parse_config(CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device)


@pytest.fixture
def deterministic_triton(monkeypatch):
    monkeypatch.setenv("LLMENGINE_FORCE_TRITON", "1")
    monkeypatch.setenv(ENV, "0")  # restored after the test, as set_deterministic writes it
    set_deterministic(True)
    yield
    set_deterministic(False)


def logits_of_a(model: CausalLM, device) -> dict[str, torch.Tensor]:
    """Sequence A's 21 rows of logits, computed five ways."""
    ways = {}
    ways["alone"] = PagedRun(model, device).step([(0, A, 0)])[0]
    ways["beside B"] = PagedRun(model, device).step([(1, B, 0), (0, A, 0)])[1]
    run = PagedRun(model, device)  # chunks of 8 and 13, the second beside B's decode step
    first = run.step([(0, A[:8], 0), (1, B[:-1], 0)])[0]
    ways["chunked"] = torch.cat([first, run.step([(1, B[-1:], len(B) - 1), (0, A[8:], 8)])[1]])
    with torch.inference_mode():
        meta = AttentionMetadata.for_prompts([len(B), len(A)], device)
        ids = torch.tensor(B + A, device=device)
        positions = torch.tensor(list(range(len(B))) + list(range(len(A))), device=device)
        ways["no cache"] = model.compute_logits(model(ids, positions, meta))[len(B):]
    run = PagedRun(model, device)  # the first 5 as a prompt, then one decode step per position (B decoding too)
    rows = [run.step([(0, A[:5], 0), (1, B[:5], 0)])[0]]
    for p in range(5, len(A)):
        parts = [(0, A[p:p + 1], p)] + ([(1, B[p:p + 1], p)] if p < len(B) else [])
        rows.append(run.step(parts)[0])
    ways["decode steps"] = torch.cat(rows)
    return ways


@pytest.mark.slow  # a whole model through the Triton interpreter, five times
def test_rows_are_bit_identical_however_the_prompt_is_batched(model, device, deterministic_triton):
    ways = logits_of_a(model, device)
    alone = ways.pop("alone")
    assert alone.shape == (len(A), 96) and torch.isfinite(alone).all()
    for name, logits in ways.items():
        assert torch.equal(logits, alone), (name, (logits - alone).abs().max().item())
