"""Streaming ingestion at scale: a large gallery through `reir ingest`, killed part way, resumed.

    PYTHONPATH=. .venv/bin/python bench/ingest_stream.py --images 100000 --kill-at 0.3 \
        --out bench/results/ingest-stream-100k-2cpu.json --plot bench/results/ingest-stream-100k-2cpu.png

Runs the command a user runs (``python -m reir.cli ingest --gallery DIR ...``, local Ray and
milvus-lite) twice on one gallery of generated 128 px JPEGs:

1. until ``--kill-at`` of the images are encoded, then SIGKILL to its whole process tree (the
   driver, Ray, the encoders, the milvus-lite server): a crashed node, nothing shut down cleanly;
2. again, unchanged: it must re-encode only what the first run did not finish.

While each runs, the resident memory (RSS) of every process of the tree is sampled and summed
by role (driver, encoder actors, milvus-lite server, the rest of Ray), and the progress lines
the command writes give images/s over time. Prints one JSON object; ``--plot`` draws both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import make_images, random_small_checkpoint  # the generated images and model of bench/ingest.py

PROGRESS = re.compile(r"ingest progress: \[[#.]*\]\s+\d+% ([\d,]+)/([\d,]+) images\s+([\d.]+) img/s")
ROLES = ("driver", "encoders", "milvus", "ray")


def _make_chunk(args: tuple[Path, int, int, int]) -> int:
    folder, start, n, size = args
    paths = make_images(folder / f"part{start // 10_000:03d}", n, size, seed=start)
    for i, p in enumerate(paths):  # unique names across chunks
        p.rename(p.with_name(f"g{start + i:07d}.jpg"))
    return n


def make_gallery(folder: Path, n: int, size: int, workers: int) -> None:
    chunks = [(folder, s, min(10_000, n - s), size) for s in range(0, n, 10_000)]
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_make_chunk, chunks))
    assert done == n


def role_of(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "ray"
    if "EncoderActor" in cmd or "IngestActor" in cmd:  # the staged and the fused layouts
        return "encoders"
    if "milvus_lite" in cmd or "milvus-lite" in cmd:
        return "milvus"
    return "ray"


class Run:
    """One `reir ingest` process tree: its progress lines and RSS samples by role."""

    def __init__(self, cmd: list[str], env: dict[str, str], kill_at: int | None, interval_s: float = 5.0) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        self.kill_at = kill_at
        self.interval_s = interval_s
        self.progress: list[tuple[float, int]] = []
        self.rss: list[dict[str, float]] = []
        self.killed_at: int | None = None
        self.stdout = ""
        self.tree: dict[int, psutil.Process] = {}
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            match = PROGRESS.search(line)
            if match is None:
                self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-40:]
                continue
            done = int(match.group(1).replace(",", ""))
            self.progress.append((round(time.monotonic() - self.start, 2), done))
            if self.kill_at is not None and self.killed_at is None and done >= self.kill_at:
                self.killed_at = done
                self.kill()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self._refresh_tree()
            by_role = dict.fromkeys(ROLES, 0.0)
            for proc in list(self.tree.values()):
                try:
                    by_role[role_of(proc, self.proc.pid)] += proc.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.rss.append({"t": round(time.monotonic() - self.start, 2), **{k: round(v, 1) for k, v in by_role.items()},
                             "total": round(sum(by_role.values()), 1)})  # fmt: skip
            time.sleep(self.interval_s)

    def _refresh_tree(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        """SIGKILL to every process of the tree at once (Ray's own processes included)."""
        self._refresh_tree()
        for proc in self.tree.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        out, _ = self.proc.communicate()
        self.stdout = out or ""
        time.sleep(self.interval_s)  # the sampler's last round
        return self.proc.returncode

    def peak(self) -> dict[str, float]:
        return {role: max((s[role] for s in self.rss), default=0.0) for role in (*ROLES, "total")} if self.rss else {}

    def summary(self) -> dict[str, Any]:
        return {"seconds": round(time.monotonic() - self.start, 1), "returncode": self.proc.returncode,
                "killed_at_images": self.killed_at, "peak_rss_mb": self.peak(), "progress": self.progress,
                "rss_mb": self.rss}  # fmt: skip


def rss_at_quarters(rss: list[dict[str, float]]) -> list[float]:
    """Total RSS at 25/50/75/100 % of a run (flat memory: these stay level as images stream)."""
    if not rss:
        return []
    return [rss[min(len(rss) - 1, int(q * (len(rss) - 1)))]["total"] for q in (0.25, 0.5, 0.75, 1.0)]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_mem) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    offset = 0.0
    for name, run in (("run 1 (killed)", result["killed_run"]), ("run 2 (resumed)", result["resumed_run"])):
        prog = run["progress"]
        times = [offset + t for t, _ in prog[1:]]
        rates = [(b - a) / (tb - ta) if tb > ta else 0.0 for (ta, a), (tb, b) in itertools.pairwise(prog)]
        ax_rate.plot(times, rates, label=name)
        for role in (*ROLES, "total"):
            ax_mem.plot([offset + s["t"] for s in run["rss_mb"]], [s[role] for s in run["rss_mb"]],
                        label=f"{role}" if name.startswith("run 1") else None,
                        color=f"C{(*ROLES, 'total').index(role)}", linestyle="-" if name.startswith("run 1") else "--")  # fmt: skip
        offset += run["seconds"]
        ax_rate.axvline(offset, color="grey", linewidth=0.8)
    ax_rate.set_ylabel("images/s (per progress interval)")
    ax_rate.set_title(f"reir ingest, {result['images']:,} generated images, killed at {result['kill_at']:.0%} "
                      f"and resumed ({result['cores']} cores)")  # fmt: skip
    ax_rate.legend()
    ax_mem.set_ylabel("RSS (MiB); solid run 1, dashed run 2")
    ax_mem.set_xlabel("seconds (run 2 starts at the grey line)")
    ax_mem.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--kill-at", type=float, default=0.3, help="fraction of the images after which run 1 is killed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="checkpoint directory [small preset, random init]")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the gallery and index here [a temp dir]")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="reir-stream-") if args.workdir is None else None
    work = Path(tmp.name) if tmp is not None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gallery = work / "gallery"
    t = time.perf_counter()
    if not gallery.exists():
        make_gallery(gallery, args.images, args.image_size, workers=os.cpu_count() or 1)
    generate_s = time.perf_counter() - t
    model_dir = args.model or random_small_checkpoint(work / "small-random")
    db = work / "stream.db"
    cmd = [sys.executable, "-m", "reir.cli", "ingest", "--gallery", str(gallery), "--model", model_dir,
           "--milvus-uri", str(db), "--batch-size", str(args.batch_size)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REIR_PROGRESS_INTERVAL_S": "5"}
    first = Run(cmd, env, kill_at=int(args.kill_at * args.images))
    first.wait()
    killed = first.summary()
    second = Run(cmd, env, kill_at=None)
    code = second.wait()
    resumed = second.summary()
    if code != 0:
        raise SystemExit(f"resumed run failed ({code}):\n" + "\n".join(second.stderr_tail))
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    result = {
        "images": args.images,
        "kill_at": args.kill_at,
        "killed_after_images_encoded": killed["killed_at_images"],
        "resumed_encoded": summary["images"],
        "resumed_unchanged": summary["unchanged"],
        # every image is indexed once: found finished (run 1) or encoded now (run 2)
        "all_images_accounted": summary["images"] + summary["unchanged"] + summary["failures"] == args.images,
        # encoded by run 1 (at its last progress line) but not yet written when it died: encoded again
        "re_encoded_after_kill": max(0, (killed["killed_at_images"] or 0) - summary["unchanged"]),
        "rows_in_store": summary["rows_in_store"],
        "failures": summary["failures"],
        "promoted": summary["promoted"],
        "resumed_images_per_s": summary["images_per_s"],
        "resumed_steady_images_per_s": round(summary["images"] / summary["phases"]["stream"], 3),
        "resumed_phases_s": summary["phases"],
        "peak_rss_mb": {"killed_run": killed["peak_rss_mb"], "resumed_run": resumed["peak_rss_mb"]},
        "total_rss_mb_at_25_50_75_100pct": {"killed_run": rss_at_quarters(killed["rss_mb"]),
                                            "resumed_run": rss_at_quarters(resumed["rss_mb"])},
        "generate_s": round(generate_s, 1),
        "cores": os.cpu_count(),
        "batch_size": args.batch_size,
        "model": args.model or "small (random init)",
        "command": " ".join(["reir", *cmd[3:]]),
        "killed_run": killed,
        "resumed_run": resumed,
    }
    text = json.dumps(result, indent=1)
    brief = {k: v for k, v in result.items() if k not in ("killed_run", "resumed_run")}
    print(json.dumps(brief, indent=2))
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
