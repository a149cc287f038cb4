"""Sampling: greedy is argmax; top-k and top-p keep exactly the tokens their definitions keep;
the empirical distribution matches the tempered softmax; the seed makes it repeatable."""

import pytest
import torch

from tpquant.engine.sampling import SamplingParams, sample


def _logits(seed=0, batch=3, vocab=50):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def _support(logits, params, n=3000):
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(n // 100):
        seen |= set(sample(logits.expand(100, -1), params, g).tolist())
    return seen


def test_top_k_support_is_the_k_largest():
    logits = _logits(batch=1)[0]
    k = 5
    want = set(torch.topk(logits, k).indices.tolist())
    assert _support(logits[None], SamplingParams(temperature=5.0, top_k=k)) == want


def test_top_p_support_is_the_nucleus():
    logits = _logits(batch=1, seed=3)[0].double()
    p = 0.7
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    cum, want = 0.0, set()
    for i in order.tolist():  # the smallest prefix whose mass reaches p
        want.add(i)
        cum += probs[i].item()
        if cum >= p:
            break
    assert _support(logits.float()[None], SamplingParams(temperature=1.0, top_p=p), n=20000) == want


def test_distribution_matches_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t = 0.8
    g = torch.Generator().manual_seed(2)
    draws = sample(logits.expand(200000, -1), SamplingParams(temperature=t), g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    want = (logits[0].double() / t).softmax(-1)
    assert (freq - want).abs().max() < 0.005  # ~5 standard errors at n = 2e5


def test_seeded_sampling_repeats():
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, seed=7)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5)])
def test_bad_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
