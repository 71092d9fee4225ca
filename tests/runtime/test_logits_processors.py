"""vLLM's extra sampling fields in the runtime (runtime/logits_processors.py, runtime/stopping.py): each on
synthetic logits first, then on the default model, where ignoring the field would change the answer."""

from __future__ import annotations

import pytest
import torch

from llmengine_runtime.runtime import SamplingParams
from llmengine_runtime.runtime.detokenizer import TextStream
from llmengine_runtime.runtime.logits_processors import LogitsProcessing, apply_min_p, logits_processing
from llmengine_runtime.runtime.sampler import Sampler
from llmengine_runtime.runtime.sequence import Sequence

SHOP = "Suggest a name for an icecream shop"
SHOP_ANSWER = " that's both unique and accessible to a wide range of customers."  # greedy, then eos (14 tokens)


def seq(params: SamplingParams, prompt: list[int] = (0,), output: list[int] = (), vocab: int = 8) -> Sequence:
    s = Sequence("r", list(prompt), params.validate(), TextStream(None, [], [], False, True))
    s.output_token_ids = list(output)
    s.processing = logits_processing(params, None, vocab, {7})
    if params.seed is not None:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


def test_logit_bias_and_allowed_tokens_change_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 0, 0, 0, 0]])
    assert Sampler()(logits, [seq(SamplingParams())])[0] == [1]
    assert Sampler()(logits, [seq(SamplingParams(logit_bias={1: -100.0}))])[0] == [2]
    assert Sampler()(logits, [seq(SamplingParams(logit_bias={3: 4.5}))])[0] == [3]
    assert Sampler()(logits, [seq(SamplingParams(allowed_token_ids=[0, 3]))])[0] == [3]
    before = logits.clone()
    Sampler()(logits, [seq(SamplingParams(logit_bias={1: -100.0}))])
    assert torch.equal(logits, before)  # the caller's logits are never written


def test_rows_without_processing_are_untouched_in_a_mixed_batch():
    logits = torch.tensor([[0.0, 5.0, 4.0, 0, 0, 0, 0, 0]] * 2)
    tokens, log_probs = Sampler()(logits, [seq(SamplingParams(logit_bias={1: -100.0})), seq(SamplingParams())])
    assert tokens == [2, 1]
    plain = torch.log_softmax(logits[1], -1)[1].item()
    assert log_probs[1] == pytest.approx(plain)


def test_a_row_left_with_nothing_allowed_keeps_its_logits_and_the_batch_goes_on():
    logits = torch.tensor([[0.0, 1.0, 3.0, 0, 0, 0, 0, 0]] * 2)
    stuck = seq(SamplingParams(temperature=1.0, seed=1, allowed_token_ids=[2]))
    stuck.processing.bad_words = [[2]]  # the one allowed token banned too
    tokens, log_probs = Sampler()(logits, [stuck, seq(SamplingParams())])
    assert tokens[1] == 2 and all(lp == lp for lp in log_probs)  # no NaN; the other row is served


def test_min_tokens_masks_the_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0, 0, 0, 0, 0, 9.0]])  # 7 is the model's stop token here
    params = SamplingParams(max_new_tokens=5, min_tokens=2, stop_token_ids=[1])
    assert Sampler()(logits, [seq(params, output=[3])])[0] == [0]  # 7 and 1 both masked
    assert Sampler()(logits, [seq(params, output=[3, 3])])[0] == [7]
    ignore = SamplingParams(max_new_tokens=5, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits, [seq(ignore, output=[3])])[0] == [7]  # with ignore_eos, eos is not a stop token


def test_repetition_penalty_is_hugging_faces_rule():
    processing = LogitsProcessing(vocab_size=4, repetition_penalty=2.0)
    row = torch.tensor([2.0, -2.0, 2.0, -2.0])
    got = processing.apply(row, prompt_ids=[0], output_ids=[1, 1])
    assert got.tolist() == [1.0, -4.0, 2.0, -2.0]  # seen tokens: positive / 2, negative * 2


def test_bad_words_ban_the_token_that_would_complete_them():
    processing = LogitsProcessing(vocab_size=6, bad_words=[[4], [1, 2, 3]])
    assert processing.banned([0]) == [4]
    assert processing.banned([0, 1, 2]) == [4, 3]
    row = processing.apply(torch.zeros(6), [], [1, 2])
    assert row[3] == float("-inf") and row[4] == float("-inf") and row[5] == 0


def test_min_p_keeps_tokens_at_least_min_p_times_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_min_p(logits, torch.tensor([0.5])).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.3 >= 0.25 > 0.15


def test_out_of_range_values_and_unknown_token_ids_are_refused():
    for params, field in ((SamplingParams(max_new_tokens=3, min_tokens=4), "min_tokens"),
                          (SamplingParams(min_p=1.5), "min_p"), (SamplingParams(repetition_penalty=0), "repetition"),
                          (SamplingParams(logit_bias={1: 101.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=field):
            params.validate()
    with pytest.raises(ValueError, match="allowed_token_ids.*outside"):
        logits_processing(SamplingParams(allowed_token_ids=[99]), None, 8, set())
    assert SamplingParams(min_p=0.1).validate().speculate is False  # the verifier knows none of this


# -- on the default model ------------------------------------------------------------------------------------
def one(llm, prompt: str | list[int], **fields):
    return llm.generate([prompt], SamplingParams(**fields), progress=False)[0]


def test_min_tokens_equal_to_max_tokens_gives_exactly_that_many(default_llm):
    out = one(default_llm, SHOP, max_new_tokens=20, min_tokens=20)
    eos = default_llm.engine.stop_token_ids
    assert out.num_completion_tokens == 20 and out.finish_reason == "length"
    assert not eos & set(out.token_ids) and out.text.startswith(SHOP_ANSWER)


def test_stop_token_ids_end_the_request_with_stop_reason(default_llm):
    unique = default_llm.tokenizer.encode(" unique", add_special_tokens=False)[0]
    engine = default_llm.engine
    seq = engine.add_request(SHOP, SamplingParams(max_new_tokens=16, stop_token_ids=[unique]))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert "".join(o.text for o in outputs) == " that's both" and seq.output_token_ids[-1] == unique
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == unique
    seq = engine.add_request(SHOP, SamplingParams(max_new_tokens=16, stop_sequences=["accessible"]))
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].stop_reason == "accessible"


def test_bias_bad_words_and_allowed_tokens_change_the_answer(default_llm):
    tokenizer = default_llm.tokenizer
    unique = tokenizer.encode(" unique", add_special_tokens=False)[0]
    biased = one(default_llm, SHOP, max_new_tokens=8, logit_bias={unique: -100.0})
    assert biased.text.startswith(" that's both") and unique not in biased.token_ids
    banned = one(default_llm, SHOP, max_new_tokens=8, bad_words=["unique"])
    assert "unique" not in banned.text and banned.text.startswith(" that's both")
    allowed = tokenizer.encode(" ice cream shop", add_special_tokens=False)
    out = one(default_llm, SHOP, max_new_tokens=6, allowed_token_ids=allowed)
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 6


def test_repetition_penalty_and_min_p_on_the_model(default_llm):
    plain = one(default_llm, "1, 2, 3, 4,", max_new_tokens=12)
    penalised = one(default_llm, "1, 2, 3, 4,", max_new_tokens=12, repetition_penalty=3.0)
    assert plain.text.count(",") >= 4 and penalised.text != plain.text
    greedy = one(default_llm, SHOP, max_new_tokens=10)
    # min_p 1 keeps only the most likely token: sampling at temperature 1.5 then gives the greedy answer
    sampled = [one(default_llm, SHOP, max_new_tokens=10, temperature=1.5, seed=s, min_p=1.0).text for s in range(3)]
    assert sampled == [greedy.text] * 3
    unconstrained = {one(default_llm, SHOP, max_new_tokens=10, temperature=1.5, seed=s).text for s in range(3)}
    assert unconstrained != {greedy.text}


def test_truncate_prompt_tokens_keeps_the_last_ones(default_llm):
    ids = default_llm.tokenizer.encode("Once upon a time, in a land far away, " + SHOP)
    short = one(default_llm, ids, max_new_tokens=4, truncate_prompt_tokens=8)
    same = one(default_llm, ids[-8:], max_new_tokens=4)
    assert short.num_prompt_tokens == 8 and short.text == same.text
