"""Attention cost of one decode step under four KV layouts (`python -m bench.kv_layouts`).

SmolLM2-135M's shapes (30 layers, 9 query heads over 3 KV heads, head_dim 64), float32, one
thread, random KV: 16 short rows (150-255 tokens) plus rows of 2,000 and 6,000 tokens. Attention
only, as transformers runs it at decode (one query token, query heads packed over KV heads); best
of 10. What it compares: rows padded to the longest in one buffer (the engine before length
bands), length bands (one call per band), one call per row, and a paged pool of 16-token blocks
gathered per row before attention (torch has no paged attention kernel on CPU).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 30, 9, 3, 64, 16
SHORT = [150 + 7 * i for i in range(16)]
LONG = [2000, 6000]


def best(run: Callable[[], None], repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def mask_for(lengths: list[int], keys: int) -> torch.Tensor:
    hidden = torch.arange(keys)[None, None, None, :] > torch.tensor(lengths)[:, None, None, None]
    return torch.zeros(len(lengths), 1, 1, keys).masked_fill(hidden, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    packed = q.reshape(q.shape[0], KV_HEADS, HEADS // KV_HEADS, DIM)
    return F.scaled_dot_product_attention(packed, k, v, attn_mask=mask)


def layouts() -> dict[str, Callable[[], None]]:
    lengths = SHORT + LONG
    q = torch.randn(len(lengths), HEADS, 1, DIM)
    longest = max(lengths) + 1
    padded = [torch.randn(2, len(lengths), KV_HEADS, longest, DIM) for _ in range(LAYERS)]
    padded_mask = mask_for(lengths, longest)
    bands = [
        [torch.randn(2, len(SHORT), KV_HEADS, max(SHORT) + 1, DIM)]
        + [torch.randn(2, 1, KV_HEADS, n + 1, DIM) for n in LONG]
        for _ in range(LAYERS)
    ]
    short_mask = mask_for(SHORT, max(SHORT) + 1)
    blocks = [-(-(n + 1) // BLOCK) for n in lengths]
    pool = [torch.randn(2, sum(blocks), KV_HEADS, BLOCK, DIM) for _ in range(LAYERS)]
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    tables = [torch.arange(s, s + n) for s, n in zip(starts, blocks, strict=True)]

    def run_padded() -> None:
        for kv in padded:
            attend(q, kv[0], kv[1], padded_mask)

    def run_bands() -> None:
        for short, *longs in bands:
            attend(q[:16], short[0], short[1], short_mask)
            for i, kv in enumerate(longs):
                attend(q[16 + i : 17 + i], kv[0], kv[1])

    def run_rows() -> None:
        for short, *longs in bands:
            for row, n in enumerate(SHORT):
                rows = slice(row, row + 1)
                attend(q[rows], short[0, rows, :, : n + 1], short[1, rows, :, : n + 1])
            for i, kv in enumerate(longs):
                attend(q[16 + i : 17 + i], kv[0], kv[1])

    def run_paged() -> None:
        for kv in pool:
            for row, table in enumerate(tables):
                gathered = kv[:, table].transpose(2, 3).reshape(2, 1, -1, KV_HEADS, DIM)
                keys, values = (t.transpose(1, 2) for t in gathered)
                attend(q[row : row + 1], keys, values)

    return {
        "padded to the longest (one buffer, as before)": run_padded,
        "length bands (3 calls per layer)": run_bands,
        "one call per row (18 per layer)": run_rows,
        "paged 16-token blocks, gathered per row": run_paged,
    }


def main(argv: list[str]) -> int:
    torch.set_num_threads(int(argv[0]) if argv else 1)
    for name, run in layouts().items():
        print(f"{name}: {best(run):.1f} ms per decode step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
