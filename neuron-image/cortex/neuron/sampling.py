"""Choosing the next token of each sequence from its logits, with its own parameters and generator.

Every row first makes one pass over its logits: the maximum of each BLOCK of tokens, a vectorised
reduction several times cheaper than argmax or topk over the row. A row's best token lies in its
best block, and its best n tokens in its best n blocks, so greedy rows (one batched argmax) and
the candidates of sampled rows read those blocks only.

Sampled rows are filtered and drawn together: temperature, then vLLM's min-p (the tokens at least
min_p times as likely as the best one), then top-k, then top-p (the smallest set of best tokens
whose probability reaches top_p of what min-p kept; the best token always stays), then one draw
from what is left, renormalised. Each filter keeps a row's best tokens down to a cut, so the
candidates below serve them all; min-p compares each candidate's base-2 exponent with
log2(min_p), in batches with a min-p row only. Top-p works on a partial top-k of `CANDIDATES`
tokens per row instead of sorting the whole vocabulary, as vLLM and llama.cpp do; a row whose
candidates hold less than top_p of its probability (the whole row's weight is one more pass) is
redone with more of them (WIDEN times as many, then the tokens down to where a histogram of its
weights reaches top_p, then the whole vocabulary), so the cap never changes which
tokens are kept. Candidates are narrowed through groups of columns before each topk (see
_narrow): topk's cost grows with its input. The one difference from filtering the whole sorted
vocabulary: top-k keeps exactly k tokens, where a token tied exactly with the k-th best logit
was kept too (which of the tied tokens stays is topk's choice, and tied tokens are drawn in the
order the search left them).
Rows with no filter draw from the whole softmax in vocabulary order.

Each sequence's own torch.Generator gives one uniform number per step, which picks the token by
inverse CDF over its row alone: a seeded request gives the same tokens whichever batch it shares.

OpenAI's presence and frequency penalties (subtracted from the logits of tokens already in the
output, the latter per occurrence) and its logit bias (added) come next, greedy rows included.

A repetition penalty (>1) first divides the positive logits and multiplies the negative ones of
the tokens among a row's last REPETITION_WINDOW, as Hugging Face's and llama.cpp's do. Only an
explicit penalty (request, catalogue, generation_config) reaches greedy rows: temperature 0 keeps
meaning the model's most likely continuation.
"""

from __future__ import annotations

import math
import secrets
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cortex.neuron.generation import (
    FALLBACK_MAX_TOKENS,
    FALLBACK_MIN_P,
    FALLBACK_REPETITION_PENALTY,
    FALLBACK_TEMPERATURE,
    FALLBACK_TOP_K,
    FALLBACK_TOP_P,
    REPETITION_WINDOW,
    SamplingParams,
    TokenLogprob,
)


@dataclass(frozen=True)
class Sampler:
    """A sequence's resolved sampling: request, then model defaults, then the fallbacks."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int | None = None  # None: no logprobs reported

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def counts_output(self) -> bool:
        """Whether the row reads its output's token counts (presence and frequency penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def resolve(cls, params: SamplingParams, defaults: SamplingParams) -> Sampler:
        def pick(name: str, fallback: float | int) -> float | int:
            for source in (params, defaults):
                value = getattr(source, name)
                if value is not None:
                    return value
            return fallback

        temperature = float(pick("temperature", FALLBACK_TEMPERATURE))
        top_k = int(pick("top_k", FALLBACK_TOP_K))
        greedy = temperature <= 0.0 or top_k == 1
        penalty = pick("repetition_penalty", 1.0 if greedy else FALLBACK_REPETITION_PENALTY)
        return cls(
            temperature=temperature,
            top_p=float(pick("top_p", FALLBACK_TOP_P)),
            top_k=top_k,
            max_tokens=int(pick("max_tokens", FALLBACK_MAX_TOKENS)),
            min_p=float(pick("min_p", FALLBACK_MIN_P)),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            repetition_penalty=float(penalty),
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias,
            top_logprobs=params.logprobs,
        )

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


# Tokens per block of a row. The blocks' maxima are one vectorised pass over the logits (several
# times cheaper than argmax or topk over the row); the row's best few tokens lie in its best few
# blocks, so argmax and the candidates read those blocks only.
BLOCK = 64
# Candidates per row before top-p: the tokens holding top_p of the mass are usually far fewer.
# Rows where they are not get WIDEN times as many, then every token down to the bin of weights
# where the row reaches top_p (_reaching), then the whole row.
CANDIDATES = 64
WIDEN = 8
# Tokens per group when candidates are narrowed: topk over n values costs several times more than
# the maxima of n / SUB_BLOCK groups, a topk over them and one over the best groups' tokens.
SUB_BLOCK = 8
# _reaching's histogram: bins per halving of a token's weight, and how many; tokens lighter than
# 2^-(BINS / BINS_PER_OCTAVE) of the best share the last bin.
BINS_PER_OCTAVE = 4
BINS = 128
# Weights are exp((logit - best) / temperature), computed as 2^((logit - best) * log2(e) /
# temperature): exp2 costs half of exp on the AMD EPYC box (0.40 against 0.79 ms for 16 x 49,152
# floats, one thread). The base-2 exponent is floored here, 2^-115 ~ e^-80: below it the power
# is a subnormal float, tens of times slower to make and add (a 49k-token row at temperature 0.2
# spans hundreds); what the floor adds is at most vocab * 2^-115 to a total of at least 1.
EXPONENT_FLOOR = -115.0
FLOOR_WEIGHT = 2.0**EXPONENT_FLOOR
# Logits per chunk of rows in the whole-row mass (1 MiB of float32).
MASS_CHUNK = 2**18


def sample(
    logits: torch.Tensor,
    samplers: list[Sampler],
    generators: list[torch.Generator],
    recent: Sequence[Sequence[int]] = (),
    outputs: Sequence[Sequence[int]] = (),
) -> list[int]:
    """Next token per row of logits [rows, vocab], which it may change; one host copy for the
    whole batch. `recent[row]` (see `recent_tokens`) is read by rows with a repetition penalty,
    `outputs[row]` (the tokens generated so far) by rows with a presence or frequency penalty."""
    if not samplers:  # a prefill chunk that completes no prompt samples nothing
        return []
    threads = torch.get_num_threads()
    if logits.device.type != "cpu" or threads == 1:
        return _sample(logits, samplers, generators, recent, outputs)
    # On one CPU thread: sampling is dozens of small ops, and each parallel one waits for every
    # intra-op thread, so a core busy elsewhere (the event loop, the HTTP clients) stalls it for
    # milliseconds; 16 sampled rows took 4x longer at 2 threads than at 1 on a shared 2-vCPU box.
    # The setting is this thread's own (OpenMP), restored before the next forward.
    torch.set_num_threads(1)
    try:
        return _sample(logits, samplers, generators, recent, outputs)
    finally:
        torch.set_num_threads(threads)


def _sample(
    logits: torch.Tensor,
    samplers: list[Sampler],
    generators: list[torch.Generator],
    recent: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> list[int]:
    if recent:
        _penalise(logits, samplers, recent)
    _shift(logits, samplers, outputs)
    maxima = _block_maxima(logits)
    rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if not rows:
        return _argmax(logits, maxima).tolist()
    uniforms = torch.stack([_uniform(generators[row]) for row in rows]).to(logits.device)
    picked = [samplers[row] for row in rows]
    if len(rows) == len(samplers):  # no greedy row: spare the copy and the argmax
        return _draw(logits, maxima, picked, uniforms).tolist()
    chosen = _argmax(logits, maxima)
    index = torch.tensor(rows, device=logits.device)
    chosen[index] = _draw(logits[index], maxima[index], picked, uniforms)
    return chosen.tolist()


def recent_tokens(prompt: list[int], output: list[int]) -> list[int]:
    """A sequence's last REPETITION_WINDOW tokens, prompt included (llama.cpp's repeat_last_n)."""
    tail = output[-REPETITION_WINDOW:]
    missing = REPETITION_WINDOW - len(tail)
    return (prompt[-missing:] + tail) if missing and prompt else tail


def _penalise(
    logits: torch.Tensor, samplers: list[Sampler], recent: Sequence[Sequence[int]]
) -> None:
    """Penalise, in place, each penalised row's recent tokens (a history is never empty: the
    prompt has a token): one gather and one scatter over [rows, window], whatever the vocabulary.
    Short histories are padded with their own first token, a repeat that changes nothing."""
    rows = [r for r, s in enumerate(samplers) if s.repetition_penalty != 1.0 and recent[r]]
    if not rows:
        return
    device = logits.device
    ids = _padded([recent[r] for r in rows], device)
    penalty = torch.tensor([[samplers[r].repetition_penalty] for r in rows], device=device)
    at = (torch.tensor(rows, device=device).unsqueeze(1), ids)
    scores = logits[at].float()  # a repeated token reads and writes the same value
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    logits.index_put_(at, scores.to(logits.dtype))


def _padded(histories: list[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Token histories (none empty) as [rows, longest], each padded with its own first token.
    array() then one buffer copy: torch.tensor() over nested lists costs several times more."""
    width = max(map(len, histories))
    flat = array("q", [t for h in histories for t in (*h, *[h[0]] * (width - len(h)))])
    return torch.frombuffer(flat, dtype=torch.long).view(len(histories), width).to(device)


def _shift(logits: torch.Tensor, samplers: list[Sampler], outputs: Sequence[Sequence[int]]) -> None:
    """OpenAI's additive adjustments, in place: a token's count in the row's output times the
    frequency penalty, plus the presence penalty where it is there at all, is subtracted; the
    logit bias is added. A masked token (-inf) stays masked."""
    _penalise_output(logits, samplers, outputs)
    for row, sampler in enumerate(samplers):  # few rows ask for a bias: row by row
        if sampler.logit_bias:
            ids = torch.tensor([token for token, _ in sampler.logit_bias], device=logits.device)
            bias = torch.tensor([value for _, value in sampler.logit_bias], device=logits.device)
            logits[row, ids] = (logits[row, ids].float() + bias).to(logits.dtype)


def _penalise_output(
    logits: torch.Tensor, samplers: list[Sampler], outputs: Sequence[Sequence[int]]
) -> None:
    """The presence and frequency penalties of every row that has them, over [rows, output
    length] and never the vocabulary: each occurrence's count is found in the row's sorted
    output. Short outputs are padded with their own first token, a repeat of a real occurrence
    that reads and writes the same value (and is not counted)."""
    rows = [r for r, s in enumerate(samplers) if s.counts_output and outputs and outputs[r]]
    if not rows:
        return
    device = logits.device
    ids = _padded([outputs[r] for r in rows], device)
    width = ids.shape[1]
    lengths = torch.tensor([len(outputs[r]) for r in rows], device=device)
    real = torch.arange(width, device=device) < lengths.unsqueeze(1)
    ordered = torch.where(real, ids, -1).sort(dim=1).values  # padding (-1) sorts first
    counts = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
    frequency = torch.tensor([[samplers[r].frequency_penalty] for r in rows], device=device)
    presence = torch.tensor([[samplers[r].presence_penalty] for r in rows], device=device)
    at = (torch.tensor(rows, device=device).unsqueeze(1), ids)
    logits.index_put_(at, (logits[at].float() - counts * frequency - presence).to(logits.dtype))


def raw_logprobs(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor | None:
    """Log-softmax of the rows that report logprobs [those rows, vocab], taken before anything
    changes the logits (mask, penalties, bias); None when no row does."""
    rows = [r for r, s in enumerate(samplers) if s.top_logprobs is not None]
    if not rows:
        return None
    return torch.log_softmax(logits[rows].float(), dim=-1)


def picked_logprobs(
    scores: torch.Tensor | None, samplers: list[Sampler], tokens: list[int]
) -> list[TokenLogprob | None]:
    """Per row, the chosen token's logprob and its row's top alternatives (`raw_logprobs`'
    rows); None for rows that report none. One host copy for all rows."""
    if scores is None:
        return [None] * len(samplers)
    rows = [r for r, s in enumerate(samplers) if s.top_logprobs is not None]
    chosen = scores.gather(1, torch.tensor([[tokens[r]] for r in rows], device=scores.device))
    width = max(samplers[r].top_logprobs or 0 for r in rows)
    values, ids = scores.topk(width, dim=-1) if width else (scores[:, :0], scores[:, :0].long())
    picked: list[TokenLogprob | None] = [None] * len(samplers)
    for row, lp, best, best_ids in zip(
        rows, chosen.squeeze(1).tolist(), values.tolist(), ids.tolist(), strict=True
    ):
        n = samplers[row].top_logprobs or 0
        picked[row] = TokenLogprob(tokens[row], lp, tuple(zip(best_ids[:n], best[:n], strict=True)))
    return picked


def _uniform(generator: torch.Generator) -> torch.Tensor:
    """The sequence's one random number this step, in [0, 1)."""
    return torch.rand((), generator=generator, device=generator.device)


def _base2(temperature: torch.Tensor) -> torch.Tensor:
    """What turns a logit's distance from the best into a base-2 exponent: log2(e) / temperature."""
    return math.log2(math.e) / temperature


def _block_tokens(logits: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and ids [rows, n * BLOCK] of blocks [rows, n]; -inf past the vocabulary."""
    vocab = logits.shape[-1]
    ids = (blocks.unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=blocks.device)).flatten(1)
    values = logits.gather(1, ids.clamp(max=vocab - 1))
    if vocab % BLOCK:
        values = values.masked_fill(ids >= vocab, float("-inf"))
    return values, ids


def _argmax(logits: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """torch.argmax per row (the first best token, NaN first) from the blocks' maxima."""
    values, ids = _block_tokens(logits, maxima.argmax(dim=-1, keepdim=True))
    return ids.gather(1, values.argmax(dim=-1, keepdim=True)).squeeze(1)


def _candidates(
    logits: torch.Tensor, maxima: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `width` best logits, best first, and their ids. The best `width` tokens lie in
    the `width` blocks with the best maxima: when those are a small part of the row, only they
    are searched, else the whole row is narrowed through its sub-blocks."""
    vocab = logits.shape[-1]
    if width * BLOCK * 4 <= vocab:
        blocks = torch.topk(maxima, width, dim=-1, sorted=False).indices  # a set: any order
        values, ids = _block_tokens(logits, blocks)
        return _narrow(values, ids, width)
    ids = torch.arange(vocab, device=logits.device).expand_as(logits)
    return _narrow(logits, ids, width)


def _narrow(
    values: torch.Tensor, ids: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` best of values [rows, n] (best first) and their ids. topk's cost grows with n,
    so while n is many times `width`, the columns are split into groups of SUB_BLOCK and only
    the `width` groups with the best maxima are kept (they hold the `width` best values)."""
    rows, n = values.shape
    if width * SUB_BLOCK * 4 > n:
        best, at = torch.topk(values, width, dim=-1)
        return best, ids.gather(1, at)
    # Group g is columns g, g + stride, g + 2 * stride...: the maxima are SUB_BLOCK - 1
    # elementwise maxima of whole slices, several times cheaper than a reduction over each
    # run of SUB_BLOCK columns. Columns past the end (n not a multiple) read -inf.
    stride = -(-n // SUB_BLOCK)
    if stride * SUB_BLOCK > n:
        pad = stride * SUB_BLOCK - n
        values = torch.cat([values, values.new_full((rows, pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids[:, -1:].expand(rows, pad)], dim=1)
    maxima = values.view(rows, SUB_BLOCK, stride).amax(dim=1)
    groups = torch.topk(maxima, width, dim=-1, sorted=False).indices
    offsets = torch.arange(0, stride * SUB_BLOCK, stride, device=groups.device)
    columns = (groups.unsqueeze(-1) + offsets).flatten(1)
    return _narrow(values.gather(1, columns), ids.gather(1, columns), width)


def _per_block(values: torch.Tensor, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`reduce` (torch.amax, torch.sum) of each BLOCK of each row [rows, blocks]; the last block
    is shorter when BLOCK does not divide the vocabulary."""
    rows, vocab = values.shape
    whole = vocab - vocab % BLOCK
    blocks = reduce(values[:, :whole].reshape(rows, -1, BLOCK), dim=-1)
    if whole == vocab:
        return blocks
    return torch.cat([blocks, reduce(values[:, whole:], dim=-1, keepdim=True)], dim=1)


def _block_maxima(logits: torch.Tensor) -> torch.Tensor:
    """Each row's maximum per block [rows, blocks]: the one pass over the vocabulary all rows make."""
    return _per_block(logits, torch.amax)


def _draw(
    logits: torch.Tensor, maxima: torch.Tensor, samplers: list[Sampler], uniforms: torch.Tensor
) -> torch.Tensor:
    """One token per row of logits [rows, vocab], each row with its own sampler."""
    vocab, device = logits.shape[-1], logits.device
    temperature = torch.tensor([[s.temperature] for s in samplers], device=device)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in samplers])
    top_p = torch.tensor([s.top_p for s in samplers])
    cuts = _min_p_cuts(samplers)
    best = maxima.amax(dim=-1, keepdim=True).float()
    tokens = torch.empty(len(samplers), dtype=torch.long, device=device)
    whole = (top_k == vocab) & (top_p >= 1.0)  # nothing filtered: no candidates needed
    if cuts is not None:
        whole &= cuts == float("-inf")
        cuts = cuts.to(device)
    if whole.any():
        at = whole.nonzero().flatten().to(device)
        every = len(at) == len(samplers)
        tokens[at] = _draw_whole(
            logits if every else logits[at], best[at], temperature[at], uniforms[at]
        )
    pending = (~whole).nonzero().flatten()
    if not len(pending):
        return tokens
    mass = _mass(logits, best, temperature, (top_k == vocab) & ~whole, cuts)
    first = max([CANDIDATES, *(s.top_k for s in samplers if 0 < s.top_k < vocab)])
    # Each width decides the rows whose kept tokens it holds; None: _reaching's. The whole row
    # decides every row left. Rows with top-k are decided by the first (it holds their k).
    for width in (min(first, vocab), min(first * WIDEN, vocab), None, vocab):
        if not len(pending):
            break
        every = len(pending) == len(samplers)
        at = pending.to(device)
        rows, rows_top_p = (logits if every else logits[at]), top_p[pending].to(device)
        rows_cuts = None if cuts is None else cuts[at]
        decided, picked = _draw_candidates(
            _candidates(rows, maxima[at], width)
            if width is not None
            else _reaching(rows, best[at], temperature[at], rows_top_p, mass[at]),
            temperature[at],
            top_k[pending].to(device),
            rows_top_p,
            rows_cuts,
            mass[at],
            uniforms[at],
            vocab,
        )
        tokens[at[decided]] = picked[decided]
        pending = pending[~decided.cpu()]
    return tokens


def _min_p_cuts(samplers: list[Sampler]) -> torch.Tensor | None:
    """Per row, log2(min_p): the base-2 exponent of a token's weight relative to the best one's
    below which min-p drops it; -inf for rows without min-p. None when no row has it, so
    batches without min-p make none of its comparisons."""
    if not any(s.min_p > 0.0 for s in samplers):
        return None
    return torch.tensor([math.log2(s.min_p) if s.min_p > 0.0 else -math.inf for s in samplers])


def _draw_whole(
    logits: torch.Tensor, best: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Inverse CDF over the whole softmax in vocabulary order: first over the blocks' weights,
    then within the block it lands in. One pass over the vocabulary, no cumulative sum of it."""
    scale = _base2(temperature)
    exponents = (logits.float() - best).mul_(scale).clamp_(min=EXPONENT_FLOOR)
    # Less the floor's own weight: tokens below it (masked ones: -inf) weigh exactly 0.
    weights = exponents.exp2_().sub_(FLOOR_WEIGHT)
    cumulative = _per_block(weights, torch.sum).cumsum_(dim=-1)
    total = cumulative[:, -1:]
    target = uniforms.unsqueeze(1) * total
    # The last block with weight: u * total may round up to total itself.
    last = (cumulative < total).sum(dim=-1, keepdim=True)
    block = torch.searchsorted(cumulative, target, right=True).clamp_(max=last)
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
    values, ids = _block_tokens(logits, block)
    within = (values.float() - best).mul_(scale).clamp_(min=EXPONENT_FLOOR).exp2_()
    within = within.sub_(FLOOR_WEIGHT).cumsum_(dim=-1)
    column = torch.searchsorted(within, target - before, right=True)
    end = (within < within[:, -1:]).sum(dim=-1, keepdim=True)  # the block's last token with weight
    return ids.gather(1, torch.minimum(column, end)).squeeze(1)


def _mass(
    logits: torch.Tensor,
    best: torch.Tensor,
    temperature: torch.Tensor,
    unlimited: torch.Tensor,
    cuts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row, the whole vocabulary's weight relative to its best logit `best` [rows, 1]: what
    top-p without top-k renormalises over; only the tokens min-p keeps in rows with a cut
    (`_min_p_cuts`). 1 for the other rows, which never read it."""
    mass = torch.ones(len(logits), device=logits.device)
    if not unlimited.any():
        return mass
    at = unlimited.nonzero().flatten().to(logits.device)
    every = len(at) == len(logits)  # the usual case: no row copies, no per-chunk indexing
    rows, best, temperature = (
        (logits, best, temperature) if every else (logits[at], best[at], temperature[at])
    )
    if cuts is not None:
        cuts = (cuts if every else cuts[at]).unsqueeze(1)
    sums = torch.empty(len(rows), device=logits.device)
    scale = _base2(temperature)
    # A few rows at a time: their intermediate weights stay in a core's L2 across the passes.
    step = max(1, MASS_CHUNK // rows.shape[-1])
    for first in range(0, len(rows), step):
        part = slice(first, first + step)
        exponents = (rows[part].float() - best[part]).mul_(scale[part])
        exponents.clamp_(min=EXPONENT_FLOOR)
        if cuts is not None:  # a cut below the floor keeps at most vocab * 2^-115 more
            exponents.masked_fill_(exponents < cuts[part], float("-inf"))
        sums[part] = exponents.exp2_().sum(dim=-1)
    if every:
        return sums
    mass[at] = sums
    return mass


def _reaching(
    logits: torch.Tensor,
    best: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    mass: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens, best first, down to the bin of weights in which its cumulative weight
    reaches top_p of its mass (bins a factor 2^(1/BINS_PER_OCTAVE) apart): the tokens top-p can
    keep and a few more (a min-p row's mass is what min-p keeps, so it ends by the bin of its
    cut, top_p 1 included), found from a histogram of the weights and a sort of the tokens it
    selects, where a topk of a guessed width costs more per row (0.64 ms for 4,096 of 49,152 on
    the AMD EPYC box, one thread, against ~0.3 ms). Rows shorter than the longest are padded with
    -inf, which weighs nothing."""
    exponents = (logits.float() - best).mul_(_base2(temperature)).clamp_(min=EXPONENT_FLOOR)
    bins = exponents.mul(-BINS_PER_OCTAVE).clamp_(max=BINS - 1).long()
    weights = torch.zeros(len(logits), BINS, device=logits.device)
    weights.scatter_add_(1, bins, exponents.exp2_())
    # The bins before the one where top_p is reached each end short of it.
    reached = (weights.cumsum_(dim=1) < (top_p * mass).unsqueeze(1)).sum(dim=1, keepdim=True)
    chosen = [row.nonzero().squeeze(1) for row in bins <= reached]
    width = max(len(columns) for columns in chosen)
    values = logits.new_full((len(logits), width), float("-inf"))
    ids = torch.zeros((len(logits), width), dtype=torch.long, device=logits.device)
    for row, columns in enumerate(chosen):
        found, order = logits[row, columns].sort(descending=True, stable=True)
        values[row, : len(columns)] = found
        ids[row, : len(columns)] = columns[order]
    return values, ids


def _draw_candidates(
    candidates: tuple[torch.Tensor, torch.Tensor],
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    cuts: torch.Tensor | None,
    mass: torch.Tensor,
    uniforms: torch.Tensor,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-p, top-k, top-p and the draw over each row's best tokens (logits and ids, best
    first); `cuts` as `_min_p_cuts`.

    Returns which rows were decided (their kept tokens all lie among the candidates) and the token
    of each decided row. Sums run left to right over the best-first candidates, so a row's result
    does not depend on how many candidates it got once it is decided, nor on the other rows.
    """
    best, ids = candidates
    best = best.float()
    width = best.shape[-1]
    allowed = torch.arange(width, device=best.device) < top_k.unsqueeze(1)
    exponents = (best - best[:, :1]).mul_(_base2(temperature))
    if cuts is not None:  # min-p: a prefix, as top-k's (not `>=`: a NaN row stays as it was)
        allowed &= ~(exponents < cuts.unsqueeze(1))
    weights = exponents.exp2_().masked_fill_(~allowed, 0.0)
    cumulative = weights.cumsum(dim=-1)
    # Top-k renormalises over the k best (all candidates) that min-p keeps; otherwise over what
    # min-p keeps of the whole row (the mass).
    limited = top_k < vocab
    total = torch.where(limited, cumulative[:, -1], mass)
    # A token stays while the mass before it is below top_p (the best token always stays).
    kept = (cumulative - weights < top_p.unsqueeze(1) * total.unsqueeze(1)) & allowed
    decided = limited | (width == vocab) | ~kept[:, -1]
    column = _inverse_cdf(cumulative, uniforms, kept)
    return decided, ids.gather(1, column.unsqueeze(1)).squeeze(1)


def _inverse_cdf(
    cumulative: torch.Tensor, uniforms: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """Column per row where the kept prefix's cumulative weight first exceeds uniform * its total."""
    last = kept.sum(dim=-1) - 1
    total = cumulative.gather(1, last.unsqueeze(1)).squeeze(1)
    target = (uniforms * total).unsqueeze(1)
    column = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    return torch.minimum(column, last)
