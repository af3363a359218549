"""engine.serving.sampling: greedy, seeded reproducibility, the sampled distribution, filters, penalties, masks,
validation and raw logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import InvalidRequestError, RyzError, SamplingError
from engine.serving import sampling
from engine.serving.sampling import Sample, Sampler, SamplingParams, apply_penalties, log_softmax, token_logprobs

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32) + 3.0  # softmax(LOGITS) == PROBS


def draw(params: SamplingParams, logits, n: int, **kwargs) -> np.ndarray:
    sampler = Sampler(params, len(logits) if "vocab" not in kwargs else kwargs.pop("vocab"))
    return np.array([sampler.sample(logits, [], [], **kwargs).token for _ in range(n)])


def reference_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- greedy and reproducibility -------------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(SamplingParams(temperature=0), 1000).sample(logits, [], []).token == int(np.argmax(logits))


def test_greedy_ties_pick_lowest_id():
    logits = np.zeros(50, dtype=np.float32)
    logits[[7, 3, 40]] = 5.0
    assert Sampler(SamplingParams(temperature=0), 50).sample(logits, [], []).token == 3
    assert Sampler(SamplingParams(temperature=0.7, top_k=1), 50).sample(logits, [], []).token == 3


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.standard_normal(5000).astype(np.float32)
        sample = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=3), 5000).sample(logits, [], [])
        assert sample.token == int(np.argmax(logits))


def test_same_seed_same_sequence_different_seeds_differ():
    logits = np.random.default_rng(3).standard_normal(3000).astype(np.float32)

    def run(seed):
        return draw(SamplingParams(seed=seed, top_p=0.95), logits, 50).tolist()

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert len(set(run(None))) > 1


def test_a_request_samples_do_not_depend_on_other_requests():
    logits = np.random.default_rng(4).standard_normal(500).astype(np.float32)
    alone = draw(SamplingParams(seed=7), logits, 30).tolist()
    a, b = Sampler(SamplingParams(seed=7), 500), Sampler(SamplingParams(seed=8), 500)
    interleaved = []
    for _ in range(30):
        b.sample(logits, [], [])  # another request in the same batch
        interleaved.append(a.sample(logits, [], []).token)
        b.sample(logits, [], [])
    assert interleaved == alone


# --- the sampled distribution ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_samples_follow_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], dtype=np.float32)
    tokens = draw(SamplingParams(temperature=temperature, seed=11), logits, 20000)
    counts = np.bincount(tokens, minlength=8)
    # chi-square, 7 degrees of freedom: 24.3 is the 0.1% critical value
    assert chi_square(counts, reference_softmax(logits / temperature)) < 24.3


def test_samples_follow_softmax_over_a_large_vocabulary():
    """More than two inverse-CDF blocks: exercises the block-sum path of the draw."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(5000).astype(np.float32)
    logits[rng.choice(5000, 15, replace=False)] += 4.0
    probs = reference_softmax(logits)
    tokens = draw(SamplingParams(seed=12), logits, 20000)
    top = np.argsort(-probs)[:20]
    counts = np.bincount(tokens, minlength=5000)
    binned = np.append(counts[top], counts.sum() - counts[top].sum())
    binned_probs = np.append(probs[top], 1 - probs[top].sum())
    assert chi_square(binned, binned_probs) < 45.3  # 20 degrees of freedom, 0.1%


def test_top_k_keeps_only_the_k_best():
    tokens = draw(SamplingParams(top_k=2, seed=1), LOGITS, 3000)
    assert set(tokens) == {0, 1}
    assert abs(np.mean(tokens == 0) - 0.5 / 0.8) < 0.03


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # mass above token 1 is 0.5 < 0.75 (kept); above token 2 it is 0.8 >= 0.75 (dropped)
    tokens = draw(SamplingParams(top_p=0.75, seed=2), LOGITS, 3000)
    assert set(tokens) == {0, 1}
    assert abs(np.mean(tokens == 0) - 0.5 / 0.8) < 0.03
    assert set(draw(SamplingParams(top_p=0.45, seed=2), LOGITS, 200)) == {0}
    assert set(draw(SamplingParams(top_p=0.85, seed=2), LOGITS, 3000)) == {0, 1, 2}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Without top-k, token 2 is kept at top_p=0.83 (0.8 above it); after top_k=3 renormalises, the mass
    # above it is 0.8/0.95 = 0.842 >= 0.83, so it is dropped.
    assert set(draw(SamplingParams(top_p=0.83, seed=3), LOGITS, 3000)) == {0, 1, 2}
    assert set(draw(SamplingParams(top_k=3, top_p=0.83, seed=3), LOGITS, 3000)) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_best():
    # min_p=0.2: keep p >= 0.1 -> tokens 0, 1, 2; token 3 (0.05) never sampled
    tokens = draw(SamplingParams(min_p=0.2, seed=4), LOGITS, 3000)
    assert set(tokens) == {0, 1, 2}
    assert abs(np.mean(tokens == 2) - 0.15 / 0.95) < 0.03
    # min_p follows the tempered distribution: at temperature 0.5 probabilities are ~ PROBS**2
    assert set(draw(SamplingParams(temperature=0.5, min_p=0.2, seed=4), LOGITS, 2000)) == {0, 1}


def test_temperature_applies_before_top_p():
    # T=0.5 sharpens PROBS to [.69, .25, .06, .006]: top_p=0.7 now keeps only tokens 0 and 1
    tokens = draw(SamplingParams(temperature=0.5, top_p=0.7, seed=5), LOGITS, 2000)
    assert set(tokens) == {0, 1}


def reference_nucleus(e: np.ndarray, top_p: float, min_p: float) -> set[int]:
    order = np.lexsort((np.arange(len(e)), -e.astype(np.float64)))
    probs = e[order].astype(np.float64) / e.astype(np.float64).sum()
    above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    kept = order[above < top_p]
    return {int(i) for i in kept if e[i] >= np.float32(min_p)}


@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0])
@pytest.mark.parametrize("top_p,min_p", [(0.9, 0.0), (0.5, 0.0), (0.99, 0.0), (0.95, 0.05), (0.9, 1e-4)])
def test_nucleus_matches_a_full_sort(scale, top_p, min_p):
    """The adaptive floor must give exactly the full-sort nucleus, on flat and on peaked distributions."""
    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal(20000) * scale).astype(np.float32)
    e = np.exp(x - x.max())
    kept = sampling._nucleus(e, top_p, min_p, np.empty(20000, dtype=bool))
    assert set(kept.tolist()) == reference_nucleus(e, top_p, min_p)


def test_draw_never_picks_zero_weight():
    w = np.zeros(5000, dtype=np.float32)
    w[[0, 2047, 2048, 4000]] = [1.0, 1e-30, 1.0, 1.0]
    for r in [0.0, 0.3, 0.5, 0.999999, np.nextafter(1.0, 0.0)]:
        assert w[sampling._draw(w, r)] > 0
    assert sampling._draw(w, np.nextafter(1.0, 0.0)) == 4000


# --- penalties --------------------------------------------------------------------------------------


def test_penalties_formula():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5, 3.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[0, 1], generated_ids=[2, 2, 3])
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -2.0 * 2,  # prompt token, negative: multiplied
        1.0 / 2 - (2 * 0.5 + 0.25),  # generated twice: repetition, then count*freq + presence
        -1.0 * 2 - (1 * 0.5 + 0.25),
        0.5,  # untouched
        3.0,
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.5, 3.0])  # input not modified


def test_frequency_and_presence_ignore_the_prompt():
    logits = np.ones(4, dtype=np.float32)
    out = apply_penalties(logits, SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), [0, 0, 1], [1])
    np.testing.assert_allclose(out, [1.0, -1.0, 1.0, 1.0])


def test_penalties_change_the_sampled_token():
    logits = np.array([5.0, 4.0, 0.0], dtype=np.float32)
    greedy = SamplingParams(temperature=0)
    assert Sampler(greedy, 3).sample(logits, [0], [0]).token == 0
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 3).sample(logits, [0], []).token == 1
    assert Sampler(SamplingParams(temperature=0, presence_penalty=1.5), 3).sample(logits, [0], [0]).token == 1
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.4), 3).sample(logits, [], [0, 0, 0]).token == 1
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.4), 3).sample(logits, [], [0, 0]).token == 0


def test_incremental_penalty_state_matches_a_fresh_computation():
    rng = np.random.default_rng(6)
    vocab = 300
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=-0.4)
    logits = rng.standard_normal(vocab).astype(np.float32)
    prompt = rng.integers(0, vocab, 50).tolist()
    history = sampling._History(vocab)
    out = np.empty(vocab, dtype=np.float32)
    generated: list[int] = []
    steps = [1] * 20 + [-5] + [3] * 5 + [-100] + [1] * 4  # grow, roll back, grow in chunks, restart
    for step in steps:
        if step > 0:
            generated += rng.integers(0, vocab, step).tolist()
        else:
            generated = generated[: max(0, len(generated) + step)]
        incremental = history.apply(logits, params, prompt, generated, out=out)
        np.testing.assert_array_equal(incremental, apply_penalties(logits, params, prompt, generated))
    other_prompt = rng.integers(0, vocab, 51).tolist()  # a different prompt rebuilds the state
    np.testing.assert_array_equal(
        history.apply(logits, params, other_prompt, generated, out=out),
        apply_penalties(logits, params, other_prompt, generated),
    )


def test_out_of_range_history_ids_are_rejected():
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        Sampler(SamplingParams(repetition_penalty=1.2), 4).sample(np.zeros(4, np.float32), [0, 9], [])


# --- allowed mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(),
        SamplingParams(top_k=50),
        SamplingParams(top_p=0.9),
        SamplingParams(min_p=0.1, temperature=1.5),
        SamplingParams(top_k=3, top_p=0.999, repetition_penalty=1.2),
    ],
)
def test_allowed_mask_is_respected(params):
    rng = np.random.default_rng(7)
    vocab = 4000
    logits = rng.standard_normal(vocab).astype(np.float32) * 3
    allowed = np.zeros(vocab, dtype=bool)
    allowed_ids = np.argsort(logits)[:5]  # the five *least* likely tokens
    allowed[allowed_ids] = True
    sampler = Sampler(params.__class__(**{**params.__dict__, "seed": 1}), vocab)
    tokens = {sampler.sample(logits, [1, 2], [3], allowed=allowed).token for _ in range(300)}
    assert tokens <= set(allowed_ids.tolist())
    if not params.greedy:
        assert len(tokens) > 1


def test_allowed_mask_greedy_picks_best_allowed():
    logits = np.array([9.0, 1.0, 3.0, 2.0], dtype=np.float32)
    allowed = np.array([False, True, False, True])
    assert Sampler(SamplingParams(temperature=0), 4).sample(logits, [], [], allowed=allowed).token == 3


def test_no_allowed_token_is_a_clear_error():
    logits = np.zeros(10, dtype=np.float32)
    with pytest.raises(SamplingError, match="allows none of the 10 tokens") as info:
        Sampler(SamplingParams(), 10).sample(logits, [], [], allowed=np.zeros(10, dtype=bool))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, RyzError)
    logits[3] = -np.inf
    only_3 = np.arange(10) == 3
    with pytest.raises(SamplingError, match="-inf"):
        Sampler(SamplingParams(), 10).sample(logits, [], [], allowed=only_3)


def test_nan_logits_are_a_clear_error():
    logits = np.zeros(10, dtype=np.float32)
    logits[4] = np.nan
    with pytest.raises(SamplingError, match="non-finite logits"):
        Sampler(SamplingParams(), 10).sample(logits, [], [])


# --- wider logits, validation -----------------------------------------------------------------------


def test_padded_logits_beyond_the_vocabulary_are_never_sampled():
    logits = np.zeros(16, dtype=np.float32)
    logits[12:] = 100.0  # padding rows of the embedding
    for params in (SamplingParams(temperature=0, logprobs=0), SamplingParams(seed=1), SamplingParams(top_k=4, seed=1)):
        sampler = Sampler(params, 10)
        for _ in range(50):
            sample = sampler.sample(logits, [], [])
            assert sample.token < 10
            assert math.isclose(sample.logprob, -math.log(10), rel_tol=1e-6)
    mask = np.ones(16, dtype=bool)  # a mask as wide as the logits is accepted too
    assert Sampler(SamplingParams(), 10).sample(logits, [], [], allowed=mask).token < 10
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(), 10).sample(np.zeros(8, np.float32), [], [])


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("temperature", 2.5, r"temperature must be a number in \[0, 2\] \(0 means greedy\), got 2.5"),
        ("temperature", -0.1, "temperature .* got -0.1"),
        ("temperature", float("nan"), "temperature .* got nan"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\] .* got 0.0"),
        ("top_p", 1.5, "top_p .* got 1.5"),
        ("min_p", 1.1, r"min_p must be a number in \[0, 1\] .* got 1.1"),
        ("frequency_penalty", 2.5, r"frequency_penalty must be a number in \[-2, 2\], got 2.5"),
        ("presence_penalty", -3, r"presence_penalty must be a number in \[-2, 2\], got -3"),
        ("repetition_penalty", 0.0, "repetition_penalty must be a number greater than 0 .* got 0.0"),
        ("top_k", -1, r"top_k must be an integer >= 0 \(0 disables it\), got -1"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("logprobs", 21, "logprobs must be an integer between 0 and 20 .* got 21"),
        ("logprobs", -1, "logprobs .* got -1"),
        ("seed", "abc", "seed must be an integer or null, got 'abc'"),
        ("temperature", "hot", "temperature .* got 'hot'"),
    ],
)
def test_validate_names_field_value_and_range(field, value, expected):
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidRequestError, match=expected) as info:
        params.validate()
    assert info.value.param == field
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidRequestError):
        Sampler(params, 10)


def test_validate_accepts_the_edges():
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0, top_p=1e-9, min_p=1.0, logprobs=0),
        SamplingParams(
            temperature=2,
            frequency_penalty=-2,
            presence_penalty=2,
            logprobs=20,
            top_k=100000,
            repetition_penalty=0.01,
            seed=0,
        ),
    ):
        params.validate()


# --- logprobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(logprobs=5, seed=1),
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.3, top_k=10, logprobs=20, repetition_penalty=1.5, seed=2),
        SamplingParams(top_p=0.5, frequency_penalty=1.0, logprobs=1, seed=3),
    ],
)
def test_logprobs_are_raw_log_softmax(params):
    rng = np.random.default_rng(8)
    vocab = 2000
    sampler = Sampler(params, vocab)
    generated: list[int] = []
    for _ in range(10):
        logits = (rng.standard_normal(vocab) * 4).astype(np.float32)
        reference = log_softmax(logits)
        sample = sampler.sample(logits, [5, 6], generated)
        generated.append(sample.token)
        assert isinstance(sample, Sample)
        assert math.isclose(sample.logprob, reference[sample.token], abs_tol=1e-5)
        assert len(sample.top) == params.logprobs
        ids = [i for i, _ in sample.top]
        values = [v for _, v in sample.top]
        assert values == sorted(values, reverse=True)
        assert ids == np.argsort(-reference, kind="stable")[: params.logprobs].tolist()
        np.testing.assert_allclose(values, reference[ids], atol=1e-5)


def test_a_greedy_pick_without_logprobs_reports_none():
    # No exp pass over the vocabulary when nothing asked for a logprob; the token is the same.
    logits = np.arange(10, dtype=np.float32)
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1, seed=3)):
        sample = Sampler(params, 10).sample(logits, [], [])
        assert sample.token == 9 and math.isnan(sample.logprob) and sample.top == []
        asked = Sampler(SamplingParams(**{**params.__dict__, "logprobs": 0}), 10).sample(logits, [], [])
        expected = float(logits[9] - np.log(np.exp(logits).sum()))
        assert asked.token == 9 and math.isclose(asked.logprob, expected, rel_tol=1e-6)


def test_a_scaled_draw_without_logprobs_skips_the_raw_pass():
    # At a temperature other than 1 the draw's weights need their own exp pass, so the raw one (for the logprob)
    # is made only when asked for; the tokens drawn are the same either way.
    logits = (np.random.default_rng(3).standard_normal(500) * 3).astype(np.float32)
    plain, asked = (
        Sampler(SamplingParams(temperature=0.7, seed=4), 500),
        Sampler(SamplingParams(temperature=0.7, seed=4, logprobs=0), 500),
    )
    for _ in range(20):
        a, b = plain.sample(logits, [], []), asked.sample(logits, [], [])
        assert a.token == b.token and math.isnan(a.logprob) and b.logprob <= 0


def test_no_top_alternatives_without_logprobs():
    logits = np.arange(10, dtype=np.float32)
    assert Sampler(SamplingParams(), 10).sample(logits, [], []).top == []
    sample = Sampler(SamplingParams(logprobs=0), 10).sample(logits, [], [])
    assert sample.top == [] and sample.logprob <= 0


def test_top_ties_are_lowest_id_first():
    logits = np.zeros(100, dtype=np.float32)
    logits[[50, 10, 90]] = 1.0
    top = Sampler(SamplingParams(temperature=0, logprobs=5), 100).sample(logits, [], []).top
    assert [i for i, _ in top] == [10, 50, 90, 0, 1]


def test_log_softmax_is_stable_and_batched():
    x = np.array([[1000.0, 1001.0, 999.0], [0.0, -np.inf, 1.0]], dtype=np.float32)
    out = log_softmax(x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), [1.0, 1.0])
    np.testing.assert_allclose(out[0], np.log(reference_softmax([0.0, 1.0, -1.0])))
    assert out[1, 1] == -np.inf
    np.testing.assert_allclose(log_softmax(x[0]), out[0])


def test_token_logprobs_scores_each_row():
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    next_ids = [5, 0, 299, 17, 17, 100]
    reference = log_softmax(logits)
    scored = token_logprobs(logits, next_ids, top=4)
    assert len(scored) == 6
    for row, (lp, top), next_id in zip(reference, scored, next_ids):
        assert math.isclose(lp, row[next_id], abs_tol=1e-9)
        assert [i for i, _ in top] == np.argsort(-row, kind="stable")[:4].tolist()
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:4])
    assert all(top == [] for _, top in token_logprobs(logits, next_ids, top=0))
    with pytest.raises(ValueError, match="one logits row per next id"):
        token_logprobs(logits, next_ids[:3], top=1)


def test_full_size_vocabulary_smoke():
    vocab = 128256
    rng = np.random.default_rng(10)
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    logits[rng.choice(vocab, 20, replace=False)] += 12
    reference = log_softmax(logits)
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(top_k=40),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=0.7),
    ):
        sampler = Sampler(params.__class__(**{**params.__dict__, "seed": 0, "logprobs": 2}), vocab)
        sample = sampler.sample(logits, list(range(100)), [])
        assert math.isclose(sample.logprob, reference[sample.token], abs_tol=1e-4)
        assert reference[sample.token] > -20  # came from the head, not the bulk
