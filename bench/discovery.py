"""Discovery mode on the benchmark's discovery queries: precision/recall curve + PNG.

    python bench/discovery.py --data DATA --model CKPT --milvus MILVUS --out discovery.json --png discovery.png

Every discovery query of ``DATA/discovery.json`` (multi-positive ground truth, some with no
match at all) goes once through the in-process query path in ``mode="discover"`` with the
threshold at 0, and is scored at every threshold (the curve) and at the checkpoint's
calibrated one: :func:`reir.evaluation.discovery.evaluate_discovery`, which ``reir eval
--discover`` runs too. ``MILVUS``: a
milvus-lite ``.db`` file, an ``http://`` URI or a milvus-lite server data dir (served here;
pass a copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localize import milvus_uri  # bench/ helper: serve a milvus-lite data dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark directory (discovery.json)")
    p.add_argument("--model", type=Path, required=True, help="the checkpoint that indexed the gallery")
    p.add_argument("--milvus", required=True, help="a .db file, an http:// URI or a milvus-lite server data dir")
    p.add_argument("--collection", default="reir_live")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None, help="precision/recall curve")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from reir.evaluation.discovery import evaluate_discovery

    torch.set_num_threads(max(1, args.threads))
    with milvus_uri(args.milvus) as uri:
        result = evaluate_discovery(args.data, args.model, milvus_uri=uri, collection=args.collection, png=args.png,
                                    echo=lambda _: None)  # fmt: skip
    result.update({"model": str(args.model), "data": str(args.data)})
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2, sort_keys=True))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
