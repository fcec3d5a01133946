"""Both perplexity conventions on cases small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from prune.eval.nll import sequence_nll
from prune.eval.perplexity import CONVENTIONS, Convention, PerplexityEvaluator, perplexity, windows
from tests.conftest import load_tiny, random_ids


def test_windows_drop_or_keep_the_tail() -> None:
    ids = torch.arange(10)
    dropped = windows(ids, Convention(seqlen=4, keep_partial=False, token_weighted=False))
    kept = windows(ids, Convention(seqlen=4, keep_partial=True, token_weighted=True))
    assert [w.tolist() for w in dropped] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w.tolist() for w in kept] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert CONVENTIONS["seq2048"].seqlen == 2048 and not CONVENTIONS["seq2048"].keep_partial
    assert CONVENTIONS["seq4096"].seqlen == 4096 and CONVENTIONS["seq4096"].token_weighted


def test_mean_of_windows_vs_token_weighted() -> None:
    # window A: 3 targets, total NLL 6 (mean 2); window B: 1 target, NLL 1 (mean 1)
    assert perplexity([6.0, 1.0], [3, 1], token_weighted=False) == pytest.approx(math.exp(1.5))
    assert perplexity([6.0, 1.0], [3, 1], token_weighted=True) == pytest.approx(math.exp(7 / 4))


def test_sequence_nll_matches_hf_loss() -> None:
    tiny = load_tiny("llama")
    ids = random_ids(tiny.model.config.vocab_size, batch=2, length=40)
    with torch.inference_mode():
        nll, counts = sequence_nll(tiny.model, ids, chunk=7)  # odd chunk: slices must tile exactly
        for b in range(2):
            hf = tiny.model(ids[b : b + 1], labels=ids[b : b + 1]).loss.item()
            assert nll[b].item() == pytest.approx(hf * 39, rel=1e-5)
    assert counts.tolist() == [39, 39]


@pytest.mark.parametrize("convention", ["seq2048", "seq4096"])
def test_uniform_model_has_perplexity_vocab_size(convention: str) -> None:
    """Zero LM-head weights give uniform next-token probabilities: PPL = vocab size exactly, any
    convention."""
    tiny = load_tiny("llama")
    torch.nn.init.zeros_(tiny.model.get_output_embeddings().weight)  # tied? llama tiny is untied
    evaluator = PerplexityEvaluator(datasets=["wikitext2"], conventions=[convention], max_windows=1,
                                    source="bundled", preset="test")
    metrics = evaluator(tiny.model, tiny.tokenizer)
    assert metrics[f"ppl/wikitext2/{convention}"] == pytest.approx(tiny.model.config.vocab_size, rel=1e-6)
    assert metrics["ppl/wikitext2"] == metrics[f"ppl/wikitext2/{convention}"]
    spec = evaluator.describe()["metrics"][f"ppl/wikitext2/{convention}"]
    assert spec["windows"] == 1 and spec["slice"].startswith("first 1 of") and spec["preset"] == "test"
    assert spec["source"] == "bundled:wikitext2-test"


def test_nll_lower_bound_is_below_the_exact_nll_and_tight_on_the_full_vocabulary(tiny) -> None:
    from prune.eval.nll import hidden_nll, likely_token_sets, nll_lower_bound

    model = tiny.model
    ids = random_ids(model.config.vocab_size, batch=2, length=24, seed=3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    head = model.get_output_embeddings()
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        nll, count = hidden_nll(head, hidden, ids, mask)
        exact = nll / count
        subset = likely_token_sets(head, hidden, ids, (4,))[0]
        assert set(ids[:, 1:].reshape(-1).tolist()) <= set(subset.tolist())
        assert len(subset) < head.weight.shape[0]
        bound = nll_lower_bound(head, hidden, ids, mask, subset)
        assert torch.all(bound <= exact + 1e-9) and torch.all(bound > 0)
        full = nll_lower_bound(head, hidden, ids, mask, torch.arange(head.weight.shape[0]))
        torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-5)
