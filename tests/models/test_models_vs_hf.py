"""Every model variant against transformers on tiny random checkpoints: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.models.attention import AttentionMetadata
from llmengine_runtime.models.loader import load_model
from tests.models.tiny import VARIANTS, make_hf_model
from tests.reference_generate import generate

PROMPT_LENGTHS = [5, 9, 1, 13, 16, 17]


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def packed_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts([len(p) for p in prompts])))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, hf, load_model(path, progress=False)


def test_logits_match_transformers(pair):
    variant, hf, ours = pair
    # dynamic RoPE depends on the whole batch's length in transformers: compare one long prompt there
    prompts = random_prompts([30] if variant == "llama-dynamic" else PROMPT_LENGTHS)
    with torch.no_grad():
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    got = packed_logits(ours, prompts)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_greedy_tokens_match_transformers(pair):
    variant, hf, ours = pair
    prompts = random_prompts([30] if variant == "llama-dynamic" else [5, 1, 16, 17])
    ours_out = generate(ours, prompts, 32, block_size=16)
    for prompt, got in zip(prompts, ours_out):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert got == expected
