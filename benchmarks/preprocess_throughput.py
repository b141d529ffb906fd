"""Preprocessor throughput (chars/s end to end) and peak RSS, on the shared corpus and a big synthetic one.

    python benchmarks/preprocess_throughput.py                       # full ../shared/corpus
    python benchmarks/preprocess_throughput.py --synthetic_mb 300    # + a >= 300 MB corpus made by repeating it

Each run is a fresh `python -m dialogpt_zh.preprocess` subprocess (so imports and peak RSS are its own);
peak RSS comes from the child's rusage (ru_maxrss), CPU time from user + sys. chars/s = characters of the
cleaned sessions (what the preprocessor reports as chars_read) / wall seconds. The synthetic corpus repeats
every shared file, each copy's lines tagged with its copy number so that sessions stay unique (otherwise
dedupe would drop all copies); it is written in a new directory under --workdir (default bench_out/,
git-ignored), and only that directory (and --workdir, when this run created it and it is left empty) is
deleted afterwards: whatever else is in --workdir stays.
Targets: >= 1 M chars/s on 2 cores; peak RSS < 1 GB and not growing with corpus size.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dialogpt_zh.cli import field_help, make_parser, parse  # noqa: E402

SOURCES = ["lccc-sample", "kdconv", "chatterbot-zh", "subtitles-dgk"]


@dataclass
class BenchArguments:
    corpus: str = field(default=str(REPO.parent / "shared" / "corpus"), metadata=field_help("shared corpus"))
    synthetic_mb: int = field(default=0, metadata=field_help("also build and run a synthetic corpus of this size"))
    workdir: str = field(default=str(REPO / "bench_out"), metadata=field_help(
        "scratch space: the run works in a new directory inside it and deletes only that"))
    workers: str = field(default="0", metadata=field_help(
        "comma list of --workers values to run each corpus with (0 = the preprocessor's auto choice)"))


# A wrapper process per run, so that ru_maxrss (the max over a process's children) is this run's alone.
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(f'RUSAGE {u.ru_maxrss} {u.ru_utime + u.ru_stime}', file=sys.stderr); sys.exit(r.returncode)")


def run(inputs: list[str], output: Path, workers: int = 0) -> dict:
    cmd = [sys.executable, "-m", "dialogpt_zh.preprocess", *inputs, "--output", str(output), "--no_progress",
           "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    maxrss_kb, cpu = proc.stderr.strip().splitlines()[-1].split()[1:]
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    size = sum(f["size"] for i in manifest["inputs"] for f in i["files"])
    return {"input_mb": size / 1e6, "chars": manifest["chars_read"], "wall_s": wall, "cpu_s": float(cpu),
            "chars_per_s": manifest["chars_read"] / wall, "peak_rss_mb": int(maxrss_kb) / 1024,
            "windows": sum(v["windows"] for v in manifest["counts"]["by_split"].values()),
            "command": " ".join(cmd[1:]), "load_after": os.getloadavg()[0]}


def make_synthetic(corpus: Path, target_mb: int, out: Path) -> list[str]:
    """Copies of every source file until the total reaches target_mb; each copy's text tagged (unique)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [p for s in SOURCES for p in sorted((corpus / s).rglob("*"))
             if p.suffix in (".txt", ".json", ".yml", ".conv")]
    total, copy = 0, 0
    while total < target_mb * 1e6:
        copy += 1
        for p in files:
            text = p.read_text(encoding="utf-8")
            tag = f"第{copy}遍"
            if p.suffix == ".conv":
                text = text.replace("\nM ", f"\nM {tag}")
            elif p.suffix == ".txt":
                text = "\n".join(tag + ln if ln.strip() else ln for ln in text.split("\n"))
            elif p.suffix == ".json":
                text = text.replace('"message": "', f'"message": "{tag}') if "messages" in text else \
                    text.replace('[\n"', f'[\n"{tag}')
            else:
                text = text.replace("- - ", f"- - {tag}")
            dest = out / f"{copy:04d}_{p.parent.name}_{p.name}"
            dest.write_text(text, encoding="utf-8")
            total += dest.stat().st_size
    return [str(out)]


def main() -> None:
    parser = make_parser([BenchArguments], prog="python benchmarks/preprocess_throughput.py",
                         description="Preprocessor throughput and peak RSS.",
                         examples="  python benchmarks/preprocess_throughput.py --synthetic_mb 300")
    (args,) = parse(parser)
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        raise SystemExit(f"shared corpus not found at {corpus}")
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise SystemExit(f"--workdir {workdir} is not a directory")
    created_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="preprocess_throughput-", dir=workdir))  # ours alone: deleted at the end
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other jobs slow wall time)")
    rows = []
    try:
        workers = [int(w) for w in args.workers.split(",")]
        for w in workers:
            rows.append((f"shared corpus w={w}", run([str(corpus / s) for s in SOURCES], work / "store_shared", w)))
        if args.synthetic_mb:
            inputs = make_synthetic(corpus, args.synthetic_mb, work / "synthetic")
            for w in workers:
                rows.append((f"synthetic {args.synthetic_mb} MB w={w}", run(inputs, work / "store_synthetic", w)))
    finally:
        shutil.rmtree(work)
        if created_workdir and not any(workdir.iterdir()):
            workdir.rmdir()
    print(f"{'corpus':26s} {'input MB':>9s} {'chars':>12s} {'wall s':>8s} {'cpu s':>8s} {'chars/s':>11s} "
          f"{'chars/cpu-s':>12s} {'peak RSS MB':>12s} {'load after':>10s}")
    for name, r in rows:
        print(f"{name:26s} {r['input_mb']:9.1f} {r['chars']:12,d} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} "
              f"{r['chars_per_s']:11,.0f} {r['chars'] / r['cpu_s']:12,.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['load_after']:10.1f}")
    print("cpu s: user + sys of the run and its worker processes; peak RSS: the largest single process "
          "(workers are forked: most of their pages are shared with the parent)")
    for name, r in rows:
        print(f"command ({name}): python {r['command']}")


if __name__ == "__main__":
    main()
