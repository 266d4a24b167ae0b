"""Cost of one re-ranker training step (forward + backward, the re-ranker alone) for forms of
the re-ranker, on a batch shaped as the rerank stage's: 128 expressions x 16 images (300
distinct), 10 instances each, 20 tokens. Prints one JSON object: seconds per step, mean of
``--steps`` after 3 warm-up steps.

    PYTHONPATH=. python bench/rerank_cost.py --variants 'none:{"set_layers":0};set32:{"set_layers":1,"set_hidden":32}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reir.model.configuration import RerankSpec
from reir.model.rerank import RelationReranker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default='none:{"set_layers":0};set32:{"set_layers":1,"set_hidden":32}')
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    t, c, u, m, length = 128, 16, 300, 10, 20
    states, tmask = torch.randn(t, length, 128), torch.ones(t, length, dtype=torch.long)
    emb, boxes, obj = torch.randn(u, m, 128), torch.rand(u, m, 4) * 0.5 + 0.1, torch.rand(u, m)
    mask = torch.rand(u, m) > 0.2
    mask[:, 0] = True
    rows, images = torch.arange(t).repeat_interleave(c), torch.randint(u, (t * c,))
    base = torch.randn(t * c, m)
    out: dict[str, float] = {}
    for variant in args.variants.split(";"):
        name, _, spec = variant.partition(":")
        rr = RelationReranker(RerankSpec(**{"hidden_size": 128, "text_layers": 1, "context_relation": True,
                                            **json.loads(spec or "{}")}), 128, 128).train()  # fmt: skip

        def step(rr: RelationReranker = rr) -> None:
            logits = rr(states, tmask, base, emb, boxes, obj, mask, text_rows=rows, image_rows=images)
            logits.masked_fill(torch.isinf(logits), 0).pow(2).mean().backward()

        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        out[name] = round((time.perf_counter() - started) / args.steps, 4)
    print(json.dumps({"seconds_per_step": out, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
