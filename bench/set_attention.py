"""Why the re-ranker's instance-set attention and input dropout are written out on CPU.

    PYTHONPATH=. .venv/bin/python bench/set_attention.py --out bench/results/set-attention-2cpu.json

Times, in milliseconds (median of ``--rounds`` rounds of ``--repeat`` calls each): torch's CPU
softmax on rows shorter than and as long as its 16-float vector width against a written-out
one; the instance set's attention (4 heads of 8 over sets of 10) through
``F.scaled_dot_product_attention`` and through :func:`reir.model.rerank.set_attention`, at one
query's 30 images (inference, 1 thread) and at a re-ranker training batch's 2,048 rows
(forward + backward, ``--threads`` threads), full sets of 10 and (``padded16``) sets of 3-16
padded to 16 with the padding masked as the re-ranker masks it; and the input dropout's mask from ``bernoulli_``
(``nn.Dropout``) against :class:`reir.model.rerank.InputDropout`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reir.model.rerank import InputDropout, set_attention


def _ms(fn: Callable[[], Any], repeat: int, rounds: int) -> float:
    for _ in range(max(2, repeat // 10)):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append(1000.0 * (time.perf_counter() - started) / repeat)
    return round(statistics.median(times), 4)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


# (key tag, set width, padded): full sets of 10, and sets of 3-16 padded to 16
LAYOUTS = (("", 10, False), ("_padded16", 16, True))


def _bias(n: int, width: int, padded: bool, g: torch.Generator) -> torch.Tensor:
    """``[n, 4, width, width]``; ``padded``: sets of 3 to ``width`` instances, the padding masked
    by -1e4 as :meth:`reir.model.rerank.InstanceSet.image_part` masks it."""
    bias = torch.randn(n, 4, width, width, generator=g)
    if not padded:
        return bias
    counts = torch.randint(3, width + 1, (n,), generator=g)
    return bias.masked_fill(~(torch.arange(width)[None] < counts[:, None])[:, None, None, :], -1e4)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the training-batch rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"threads_training": args.threads, "rounds": args.rounds}

    torch.set_num_threads(1)
    with torch.inference_mode():
        for width in (10, 16):
            x = torch.randn(1200, width, generator=g)
            out[f"softmax_1200x{width}_torch_ms"] = _ms(lambda x=x: x.softmax(-1), 500, args.rounds)
            out[f"softmax_1200x{width}_written_out_ms"] = _ms(lambda x=x: _softmax(x), 500, args.rounds)
        for tag, width, padded in LAYOUTS:
            q, k, v = (torch.randn(30, 4, width, 8, generator=g) for _ in range(3))
            bias = _bias(30, width, padded, g)
            out[f"query_30_images{tag}_sdpa_ms"] = _ms(
                lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), 500,
                args.rounds)  # fmt: skip
            out[f"query_30_images{tag}_set_attention_ms"] = _ms(
                lambda q=q, k=k, v=v, bias=bias: set_attention(q, k, v, bias), 500, args.rounds)

    torch.set_num_threads(args.threads)
    for tag, width, padded in LAYOUTS:
        q, k, v = (torch.randn(2048, 4, width, 8, generator=g, requires_grad=True) for _ in range(3))
        bias = _bias(2048, width, padded, g).requires_grad_(True)
        out[f"training_2048_rows{tag}_sdpa_fwd_bwd_ms"] = _ms(
            lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward(),
            10, args.rounds)  # fmt: skip
        out[f"training_2048_rows{tag}_set_attention_fwd_bwd_ms"] = _ms(
            lambda q=q, k=k, v=v, bias=bias: set_attention(q, k, v, bias).sum().backward(), 10, args.rounds)
    x = torch.randn(1200, 10, 129, generator=g, requires_grad=True)
    dropout, written = torch.nn.Dropout(0.4), InputDropout(0.4)
    out["dropout_1200x10x129_bernoulli_ms"] = _ms(lambda: dropout(x), 10, args.rounds)
    out["dropout_1200x10x129_input_dropout_ms"] = _ms(lambda: written(x), 10, args.rounds)
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
