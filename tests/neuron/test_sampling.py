"""Sampling parameter resolution and token choice, on synthetic logits."""

from __future__ import annotations

import pytest
import torch

from cortex.neuron.generation import (
    FALLBACK_MAX_TOKENS,
    FALLBACK_MIN_P,
    FALLBACK_REPETITION_PENALTY,
    FALLBACK_TEMPERATURE,
    FALLBACK_TOP_P,
    REPETITION_WINDOW,
    SamplingParams,
)
from cortex.neuron.sampling import (
    Sampler,
    _block_maxima,
    _candidates,
    _mass,
    _min_p_cuts,
    _reaching,
    picked_logprobs,
    raw_logprobs,
    recent_tokens,
    sample,
)

CPU = torch.device("cpu")


def test_request_then_model_defaults_then_fallback() -> None:
    defaults = SamplingParams(temperature=0.6, top_p=0.9, top_k=50)
    sampler = Sampler.resolve(SamplingParams(temperature=0.2, seed=3), defaults)
    assert (sampler.temperature, sampler.top_p, sampler.top_k) == (0.2, 0.9, 50)
    assert sampler.max_tokens == FALLBACK_MAX_TOKENS and sampler.seed == 3
    fallback = Sampler.resolve(SamplingParams(max_tokens=5), SamplingParams())
    assert fallback.top_p == FALLBACK_TOP_P and fallback.max_tokens == 5


def test_zero_temperature_and_top_k_one_are_greedy() -> None:
    assert Sampler.resolve(SamplingParams(temperature=0), SamplingParams()).greedy
    assert Sampler.resolve(SamplingParams(top_k=1), SamplingParams()).greedy
    assert not Sampler.resolve(SamplingParams(temperature=0.7), SamplingParams()).greedy


def test_no_rows_sample_nothing() -> None:
    """A prefill chunk that completes no prompt asks for no token (a 300-token prompt failed)."""
    assert sample(torch.empty(0, 49_152), [], []) == []


def draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    generator = sampler.generator(CPU)
    return [sample(logits, [sampler], [generator])[0] for _ in range(n)]


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = Sampler.resolve(SamplingParams(temperature=1.0, top_k=2, seed=1), SamplingParams())
    assert set(draws(top_k, logits, 200)) == {0, 1}
    top_p = Sampler.resolve(SamplingParams(temperature=1.0, top_p=0.7, seed=1), SamplingParams())
    assert set(draws(top_p, logits, 200)) == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it
    everything = Sampler.resolve(SamplingParams(temperature=1.0, seed=1), SamplingParams())
    assert set(draws(everything, logits, 400)) == {0, 1, 2, 3}


def test_min_p_keeps_the_tokens_at_least_its_share_of_the_best_after_temperature() -> None:
    """vLLM's min_p: a token stays if its probability is at least min_p times the best token's,
    at the row's temperature; top-p then renormalises over what min-p kept; 0 is off."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # shares of the best: .6 .3 .1

    def drawn(n: int = 300, **params: object) -> set[int]:
        return set(draws(resolve(seed=1, **params), logits, n))

    assert drawn(temperature=1.0, min_p=0.25) == {0, 1, 2}
    assert drawn(temperature=1.0, min_p=0.5) == {0, 1}
    assert drawn(50, temperature=1.0, min_p=1.0) == {0}  # the best token alone
    assert drawn(temperature=2.0, min_p=0.5) == {0, 1, 2}  # shares at 2: .77 .55 .32
    assert drawn(400, temperature=1.0, min_p=0.0) == {0, 1, 2, 3}
    # Of the 0.95 min-p keeps, 0.5 and 0.3 are 0.84: top_p 0.83 is reached before token 2,
    # which top_p 0.83 of the whole row (0.5 + 0.3 = 0.8 before it) keeps.
    assert drawn(temperature=1.0, min_p=0.25, top_p=0.83) == {0, 1}
    assert drawn(temperature=1.0, top_p=0.83) == {0, 1, 2}


def test_min_p_is_resolved_from_the_request_then_the_model() -> None:
    assert resolve(min_p=0.1).min_p == 0.1
    model = SamplingParams(min_p=0.05)
    assert Sampler.resolve(SamplingParams(), model).min_p == 0.05
    assert Sampler.resolve(SamplingParams(min_p=0.0), model).min_p == 0.0  # the request's off
    assert resolve().min_p == FALLBACK_MIN_P == 0.0


def test_rows_sample_independently_with_their_own_generators() -> None:
    logits = torch.zeros(3, 100)
    logits[1, 42] = 5.0
    seeded = Sampler.resolve(SamplingParams(temperature=1.0, seed=9), SamplingParams())
    greedy = Sampler.resolve(SamplingParams(temperature=0), SamplingParams())
    batch = sample(logits, [seeded, greedy, seeded], [seeded.generator(CPU) for _ in range(3)])
    alone = sample(logits[:1], [seeded], [seeded.generator(CPU)])
    assert batch[1] == 42
    assert batch[0] == batch[2] == alone[0]


def reference(logits: torch.Tensor, sampler: Sampler, uniform: float) -> int:
    """The per-row definition, over the whole sorted vocabulary: temperature, min-p (vLLM's: drop
    a token less likely than min_p times the best), top-k (ties kept), top-p (drop a token once
    the mass before it reaches top_p), then inverse CDF at `uniform`."""
    scores = logits.double() / sampler.temperature
    if sampler.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < sampler.min_p * probs.max(), float("-inf"))
    if 0 < sampler.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampler.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    ordered, order = torch.sort(scores, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    if sampler.top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= sampler.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    at = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])]), right=True)[0])
    return int(order[min(at, int((probs > 0).sum()) - 1)])


def resolve(**params: object) -> Sampler:
    return Sampler.resolve(SamplingParams(**params), SamplingParams())  # type: ignore[arg-type]


FILTERED = [
    resolve(temperature=0.8, top_p=0.95, seed=1),
    resolve(temperature=1.0, top_k=40, seed=2),
    resolve(temperature=0.7, top_k=300, top_p=0.9, seed=3),  # top_k wider than the candidates
    resolve(temperature=1.5, top_p=0.99, seed=4),  # flat: widened past the first candidates
    resolve(temperature=0.2, top_p=0.9, seed=5),  # most weights below float32's normal range
]


def rows(count: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's: a few strong tokens over a long flat tail."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, vocab, generator=generator) * torch.linspace(6, 0.5, count)[:, None]


def test_filtered_draws_match_the_per_row_definition() -> None:
    logits = rows(len(FILTERED), 5000, seed=11)
    generators = [s.generator(CPU) for s in FILTERED]
    uniforms = [s.generator(CPU) for s in FILTERED]  # the same stream the sampler draws from
    for _ in range(40):
        batch = sample(logits, FILTERED, generators)
        expected = [
            reference(logits[i], s, float(torch.rand((), generator=uniforms[i])))
            for i, s in enumerate(FILTERED)
        ]
        assert batch == expected


def draws_as_the_reference(
    logits: torch.Tensor, samplers: list[Sampler], rounds: int
) -> list[list[int]]:
    """`rounds` batched draws, each asserted equal to the per-row definition drawn with the
    same seeds' uniforms."""
    generators = [s.generator(CPU) for s in samplers]
    uniforms = [s.generator(CPU) for s in samplers]
    batches = []
    for _ in range(rounds):
        batch = sample(logits.clone(), samplers, generators)
        expected = [
            reference(logits[i], s, float(torch.rand((), generator=uniforms[i])))
            for i, s in enumerate(samplers)
        ]
        assert batch == expected
        batches.append(batch)
    return batches


def test_candidates_from_the_best_blocks_match_the_per_row_definition() -> None:
    """A vocabulary wide enough that candidates come from each row's best blocks (the last one
    shorter), rows whose kept tokens number from a few to past the first candidates."""
    vocab, strong = 20000, [3, 40, 60, 100, 8]
    generator = torch.Generator().manual_seed(16)
    logits = torch.randn(len(strong), vocab, generator=generator)
    for row, count in enumerate(strong):  # spread over the vocabulary, ~97% of the mass
        at = torch.randperm(vocab, generator=generator)[:count]
        logits[row, at] = 10.0 + torch.rand(count, generator=generator)
    logits[4, -1] = 12.0  # the best token in the short last block
    samplers = [resolve(temperature=1.0, top_p=0.95, seed=30 + row) for row in range(4)]
    samplers.append(resolve(temperature=1.0, top_k=6, top_p=0.99, seed=34))
    seen = {batch[2] for batch in draws_as_the_reference(logits, samplers, 60)}
    ranks = [int((logits[2] > logits[2, token]).sum()) for token in seen]
    assert max(ranks) >= 32  # row 2 drew from past its best 32 tokens


def test_widened_rows_narrowed_through_groups_match_the_per_row_definition() -> None:
    """Rows whose kept tokens outnumber the first candidates, in a vocabulary that is not a
    multiple of the narrowing's groups (the last group is short): their candidates are found
    through the groups' maxima, draw for draw the same as over the whole sorted row."""
    vocab, strong = 20003, [90, 200, 700]
    generator = torch.Generator().manual_seed(17)
    logits = torch.randn(len(strong), vocab, generator=generator)
    for row, count in enumerate(strong):
        at = torch.randperm(vocab, generator=generator)[:count]
        logits[row, at] = 8.0 + torch.rand(count, generator=generator)
    logits[0, -2:] = torch.tensor([9.5, 9.45])  # the best tokens in the short last group
    logits[1, ::5] = float("-inf")  # masked, as a grammar does
    samplers = [resolve(temperature=1.0, top_p=0.97, seed=40 + row) for row in range(3)]
    ranks = [
        int((logits[i] > logits[i, token]).sum())
        for batch in draws_as_the_reference(logits, samplers, 60)
        for i, token in enumerate(batch)
    ]
    assert max(ranks) >= 512  # drawn from past the second round's candidates too


def test_rows_keeping_thousands_are_decided_from_a_histogram_of_their_weights() -> None:
    """Rows of a 49,152-token vocabulary whose top-p keeps thousands of tokens: the histogram
    selects fewer tokens than the row, best first, holding every kept one and the next; the
    draws are the definition's."""
    vocab, temperature, top_p = 49152, 1.2, 0.95
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(19))
    logits *= torch.tensor([[2.5], [1.5], [3.5]])
    logits[1, ::7] = float("-inf")  # masked, as a grammar does
    best = logits.amax(dim=-1, keepdim=True)
    temperatures = torch.full((3, 1), temperature)
    mass = _mass(logits, best, temperatures, torch.ones(3, dtype=torch.bool))
    values, ids = _reaching(logits, best, temperatures, torch.full((3,), top_p), mass)
    assert values.shape[1] < vocab
    for row in range(3):
        probs = torch.softmax(logits[row].double() / temperature, dim=-1)
        ordered = probs.sort(descending=True).values
        kept = int((ordered.cumsum(dim=0) - ordered < top_p).sum())
        assert 1000 < kept < int((values[row] > float("-inf")).sum())
        assert torch.equal(values[row, :kept], logits[row].topk(kept).values)
        assert torch.equal(logits[row, ids[row, :kept]], values[row, :kept])
    samplers = [resolve(temperature=temperature, top_p=top_p, seed=50 + row) for row in range(3)]
    draws_as_the_reference(logits, samplers, 10)


# For rows(8, 20000, seed=21), sharp to flat; what min-p alone keeps in each row in comments.
MIN_P = [
    resolve(temperature=1.0, min_p=0.05, seed=60),  # 5 tokens
    resolve(temperature=1.5, top_k=40, min_p=0.02, seed=61),  # 7, within the top-k
    resolve(temperature=0.8, top_p=0.95, seed=62),  # no min-p, beside rows with it
    resolve(temperature=1.5, top_p=0.9, min_p=0.02, seed=63),  # 66
    resolve(temperature=1.5, top_k=300, min_p=0.02, seed=64),  # 223: top_k past the candidates
    resolve(temperature=1.5, min_p=0.05, seed=65),  # 1,395: past the second round's candidates
    resolve(temperature=1.5, top_p=0.97, min_p=0.1, seed=66),  # 3,031, then top-p's cut
    resolve(temperature=0.2, min_p=1e-6, seed=67),  # 16,758: a cut 20 octaves down
]


def test_rows_with_and_without_min_p_draw_as_the_per_row_definition() -> None:
    """Rows with min-p (alone, with top-k, with top-p) beside a row without it, sharp to flat:
    draw for draw the definition's, the flat ones from past the second round's candidates."""
    logits = rows(len(MIN_P), 20000, seed=21)
    logits[3, ::9] = float("-inf")  # masked, as a grammar does
    batches = draws_as_the_reference(logits, MIN_P, 40)
    ranks = [int((logits[5] > logits[5, batch[5]]).sum()) for batch in batches]
    assert max(ranks) >= 512


def test_rows_min_p_keeps_thousands_of_are_decided_from_a_histogram_of_their_weights() -> None:
    """Rows of a 49,152-token vocabulary where min-p keeps thousands of tokens, with and without
    top-p: the histogram selects fewer tokens than the row, holding every one they keep."""
    vocab, temperature = 49152, 1.2
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(22))
    logits *= torch.tensor([[2.5], [1.5], [3.5]])
    logits[1, ::7] = float("-inf")  # masked, as a grammar does
    min_p, top_p = torch.tensor([0.01, 0.05, 0.0005]), torch.tensor([1.0, 0.9, 1.0])
    samplers = [
        resolve(temperature=temperature, min_p=float(m), top_p=float(p), seed=70 + row)
        for row, (m, p) in enumerate(zip(min_p, top_p, strict=True))
    ]
    cuts = _min_p_cuts(samplers)
    assert cuts is not None and _min_p_cuts([resolve(temperature=1.0)]) is None
    best = logits.amax(dim=-1, keepdim=True)
    temperatures = torch.full((3, 1), temperature)
    mass = _mass(logits, best, temperatures, torch.ones(3, dtype=torch.bool), cuts)
    values, ids = _reaching(logits, best, temperatures, top_p, mass)
    assert values.shape[1] < vocab
    for row in range(3):
        probs = torch.softmax(logits[row].double() / temperature, dim=-1)
        probs = probs.masked_fill(probs < min_p[row] * probs.max(), 0.0)
        ordered = probs.sort(descending=True).values / probs.sum()
        kept = int(((ordered.cumsum(dim=0) - ordered < top_p[row]) & (ordered > 0)).sum())
        assert 1000 < kept < int((values[row] > float("-inf")).sum())
        assert torch.equal(values[row, :kept], logits[row].topk(kept).values)
        assert torch.equal(logits[row, ids[row, :kept]], values[row, :kept])
    draws_as_the_reference(logits, samplers, 10)


def test_a_min_p_row_gives_the_same_tokens_whichever_batch_it_shares() -> None:
    """Beside greedy, whole-softmax, top-p, top-k and other min-p rows, or alone: the same."""
    logits = rows(6, 5000, seed=23)
    mine = resolve(temperature=1.2, min_p=0.05, seed=42)
    alone_generator = mine.generator(CPU)
    alone = [sample(logits[3:4].clone(), [mine], [alone_generator])[0] for _ in range(30)]
    batch = [resolve(temperature=0), resolve(temperature=0.7), FILTERED[0], mine, *MIN_P[1:3]]
    generators = [s.generator(CPU) for s in batch]
    shared = [sample(logits.clone(), batch, generators)[3] for _ in range(30)]
    assert shared == alone
    assert len(set(alone)) > 1  # sampled, not greedy


@pytest.mark.parametrize(("vocab", "width"), [(49152, 64), (49155, 512), (5000, 64), (3001, 64)])
def test_candidates_are_each_rows_best_tokens_best_first(vocab: int, width: int) -> None:
    """Narrowing through blocks and groups finds exactly topk's values, each id once."""
    logits = rows(6, vocab, seed=18)
    logits[1, : vocab // 2] = float("-inf")
    logits[2, -3:] = 40.0  # the best tokens in the last, short block and group
    logits[3] = logits[3].round()  # many ties
    best, ids = _candidates(logits, _block_maxima(logits), width)
    assert torch.equal(best, torch.topk(logits, width, dim=-1).values)
    assert torch.equal(logits.gather(1, ids), best)
    assert all(len(set(row)) == width for row in ids.tolist())


def in_vocabulary_order(logits: torch.Tensor, temperature: float, uniform: float) -> int:
    """The definition without filters: inverse CDF of the softmax, token ids in order."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    at = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])]), right=True)[0])
    return min(at, int((cdf < cdf[-1]).sum()))


def test_unfiltered_draws_match_the_definition_and_skip_masked_tokens() -> None:
    logits = rows(3, 20000, seed=14)
    logits[:, ::3] = float("-inf")  # masked out, as a grammar does
    logits[:, :256] = float("-inf")  # whole blocks of them
    samplers = [resolve(temperature=t, seed=20 + i) for i, t in enumerate([1.0, 0.7, 0.2])]
    generators = [s.generator(CPU) for s in samplers]
    uniforms = [s.generator(CPU) for s in samplers]
    for _ in range(40):
        batch = sample(logits.clone(), samplers, generators)
        expected = [
            in_vocabulary_order(logits[i], s.temperature, float(torch.rand((), generator=u)))
            for i, (s, u) in enumerate(zip(samplers, uniforms, strict=True))
        ]
        assert batch == expected
        assert all(logits[i, token] > float("-inf") for i, token in enumerate(batch))


def test_unfiltered_rows_draw_from_the_whole_softmax() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]]))
    sampler = resolve(temperature=1.0, seed=5)
    counts = torch.bincount(torch.tensor(draws(sampler, logits, 4000)), minlength=4) / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.25, 0.1, 0.05]), atol=0.03)


def test_a_flat_row_keeps_tokens_beyond_the_first_candidates() -> None:
    logits = torch.zeros(1, 2000)  # top_p 0.95 of a uniform row keeps 1,900 tokens
    sampler = resolve(temperature=1.0, top_p=0.95, seed=6)
    drawn = draws(sampler, logits, 300)
    assert max(drawn) > 1000 and len(set(drawn)) > 250


def test_a_seed_gives_the_same_tokens_whichever_batch_it_shares() -> None:
    logits = rows(6, 5000, seed=12)
    mine = resolve(temperature=0.8, top_p=0.95, seed=42)
    alone_generator = mine.generator(CPU)
    alone = [sample(logits[2:3], [mine], [alone_generator])[0] for _ in range(30)]
    neighbours = [*FILTERED, resolve(temperature=0)]
    batch = [neighbours[0], neighbours[1], mine, neighbours[2], neighbours[3], neighbours[4]]
    generators = [s.generator(CPU) for s in batch]
    shared = [sample(logits, batch, generators)[2] for _ in range(30)]
    assert shared == alone
    assert len(set(alone)) > 1  # sampled, not greedy


def test_every_seed_the_api_accepts_seeds_a_generator() -> None:
    """The API takes -2**63 .. 2**64-1 (protocol/openai.py); a negative seed is its value
    modulo 2**64."""
    for seed in (-(2**63), -1, 0, 2**63, 2**64 - 1):
        resolve(temperature=1.0, seed=seed).generator(CPU)
    draws = [torch.rand(4, generator=resolve(seed=s).generator(CPU)) for s in (-1, 2**64 - 1)]
    assert torch.equal(*draws)


def test_greedy_rows_take_the_argmax_beside_sampled_ones() -> None:
    logits = rows(4, 3000, seed=13)
    greedy = [resolve(temperature=0), resolve(top_k=1, temperature=0.9)]
    batch = [greedy[0], FILTERED[0], greedy[1], FILTERED[3]]
    chosen = sample(logits, batch, [s.generator(CPU) for s in batch])
    assert chosen[0] == int(logits[0].argmax()) and chosen[2] == int(logits[2].argmax())


def test_greedy_is_torch_argmax_wherever_the_best_token_lies() -> None:
    logits = rows(5, 20000, seed=15)
    logits[1, -3] = 50.0  # in the short last block
    logits[2, [700, 9000]] = 50.0  # a tie: the first one
    logits[3] = float("-inf")  # nothing allowed: as torch.argmax, token 0
    logits[4, 64:128] = 50.0  # a whole block tied
    greedy = [resolve(temperature=0)] * 5
    chosen = sample(logits, greedy, [s.generator(CPU) for s in greedy])
    assert chosen == torch.argmax(logits, dim=-1).tolist() == [chosen[0], 19997, 700, 0, 64]


def test_fallbacks_are_a_sane_temperature_with_a_penalty_for_sampled_rows_only() -> None:
    sampled = Sampler.resolve(SamplingParams(), SamplingParams())
    assert (sampled.temperature, sampled.repetition_penalty) == (
        FALLBACK_TEMPERATURE,
        FALLBACK_REPETITION_PENALTY,
    )
    assert FALLBACK_TEMPERATURE < 1.0
    greedy = Sampler.resolve(SamplingParams(temperature=0), SamplingParams())
    assert greedy.repetition_penalty == 1.0  # temperature 0 is the model's own argmax
    asked = Sampler.resolve(SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams())
    assert asked.repetition_penalty == 1.3
    model = Sampler.resolve(SamplingParams(), SamplingParams(repetition_penalty=1.0))
    assert model.repetition_penalty == 1.0


def test_repetition_penalty_turns_greedy_away_from_recent_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0], [2.0, 1.9, -1.0, 0.0]])
    penalised = Sampler.resolve(
        SamplingParams(temperature=0, repetition_penalty=1.5), SamplingParams()
    )
    plain = Sampler.resolve(SamplingParams(temperature=0), SamplingParams())
    generators = [penalised.generator(CPU), plain.generator(CPU)]
    # Row 0 recently said token 0 (twice) and 2: 2.0 / 1.5 < 1.9, and -1.0 * 1.5 is further down.
    tokens = sample(logits.clone(), [penalised, plain], generators, [[0, 2, 0], [0]])
    assert tokens == [1, 0]  # the unpenalised row ignores its history
    changed = logits.clone()
    sample(changed, [penalised, plain], generators, [[0, 2, 0], [0]])
    assert changed[0].tolist() == pytest.approx([2.0 / 1.5, 1.9, -1.5, 0.0])
    assert changed[1].tolist() == logits[1].tolist()


def test_recent_tokens_reach_back_into_the_prompt() -> None:
    prompt, output = list(range(100)), [7, 8]
    recent = recent_tokens(prompt, output)
    assert len(recent) == REPETITION_WINDOW and recent[-2:] == [7, 8] and recent[0] == 38
    assert recent_tokens([1], list(range(200))) == list(range(200))[-REPETITION_WINDOW:]


def test_logit_bias_and_openai_penalties_shift_greedy_rows() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.0, float("-inf")]] * 4)

    def resolve(**asked: object) -> Sampler:
        return Sampler.resolve(SamplingParams(temperature=0, **asked), SamplingParams())  # type: ignore[arg-type]

    samplers = [
        resolve(logit_bias=((2, 1.5), (3, 100.0))),  # 1.0 + 1.5 wins; the masked token stays out
        resolve(frequency_penalty=0.1),  # token 0 twice in the output: 2.0 - 0.2 < 1.9
        resolve(presence_penalty=0.15, frequency_penalty=-0.05),  # 2.0 - 0.15 + 0.1 > 1.9
        resolve(),
    ]
    generators = [s.generator(CPU) for s in samplers]
    outputs = [[0, 0]] * 4
    shifted = logits.clone()
    assert sample(shifted, samplers, generators, outputs=outputs) == [2, 1, 0, 0]
    assert shifted[0].tolist() == pytest.approx([2.0, 1.9, 2.5, float("-inf")])
    assert shifted[1].tolist() == pytest.approx([1.8, 1.9, 1.0, float("-inf")])
    assert shifted[2].tolist() == pytest.approx([1.95, 1.9, 1.0, float("-inf")])
    assert shifted[3].tolist() == logits[3].tolist()  # nothing asked, nothing changed
    # Penalties read the output only: without one (the first token), nothing is subtracted.
    fresh = logits.clone()
    assert sample(fresh, samplers, generators, outputs=[[], [], [], []]) == [2, 0, 0, 0]


def test_the_openai_adjustments_are_resolved_from_the_request_alone() -> None:
    asked = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((7, -100.0),))
    sampler = Sampler.resolve(asked, SamplingParams(temperature=0.3))
    assert (sampler.presence_penalty, sampler.frequency_penalty) == (0.5, -1.0)
    assert sampler.logit_bias == ((7, -100.0),) and sampler.counts_output
    assert not Sampler.resolve(
        SamplingParams(logit_bias=((7, 1.0),)), SamplingParams()
    ).counts_output


def test_output_penalties_over_rows_of_any_length_match_the_per_token_definition() -> None:
    generator = torch.Generator().manual_seed(3)
    vocab, rows = 50, 5
    logits = torch.randn(rows, vocab, generator=generator)
    outputs = [torch.randint(0, 12, (n,), generator=generator).tolist() for n in (0, 1, 7, 30, 30)]
    penalties = [(0.5, 0.3), (1.0, 0.0), (0.0, 0.7), (-0.4, 1.2), (0.0, 0.0)]
    samplers = [
        Sampler.resolve(
            SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f),
            SamplingParams(),
        )
        for p, f in penalties
    ]
    expected = logits.clone()
    for row, ((presence, frequency), output) in enumerate(zip(penalties, outputs, strict=True)):
        for token in set(output):
            expected[row, token] -= output.count(token) * frequency + presence
    shifted = logits.clone()
    sample(shifted, samplers, [s.generator(CPU) for s in samplers], outputs=outputs)
    assert torch.allclose(shifted, expected)


def test_logprobs_are_the_raw_distribution_of_the_rows_that_ask() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 5.0, 1.0]])
    asked = [2, None, 0]
    samplers = [
        Sampler.resolve(SamplingParams(temperature=0, logprobs=n), SamplingParams()) for n in asked
    ]
    scores = raw_logprobs(logits, samplers)
    assert scores is not None and scores.shape == (2, 4)  # rows 0 and 2 only
    logits[0, 0] = float("-inf")  # a mask after the fact changes nothing reported
    picked = picked_logprobs(scores, samplers, [1, 1, 3])
    expected = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0], [1.0, 1.0, 5.0, 1.0]]), -1)
    assert picked[1] is None
    first, third = picked[0], picked[2]
    assert first is not None and third is not None
    assert (first.token, third.token) == (1, 3)
    assert first.logprob == pytest.approx(expected[0, 1].item())
    assert third.logprob == pytest.approx(expected[1, 3].item())
    assert [token for token, _ in first.top] == [0, 1] and third.top == ()
    assert first.top[0][1] == pytest.approx(expected[0, 0].item())
    assert raw_logprobs(logits, [samplers[1]]) is None
    assert picked_logprobs(None, [samplers[1]], [0]) == [None]
