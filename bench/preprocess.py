"""Benchmark ``data-tools preprocess`` against Megatron-LM and against SentencePiece alone.

Runs, on the same corpus with the same tokenizer and worker count, each in a fresh process:

* ``megatron``: Megatron-LM's ``tools/preprocess_data.py`` from a checkout (``--megatron-lm``;
  its own ``megatron`` package goes first on PYTHONPATH). Under Python < 3.12 a generated
  ``sitecustomize`` adds ``typing.override`` (from typing_extensions), which that commit needs;
  ``--extra-pythonpath`` adds e.g. a folder with ``triton`` installed (pip install --target),
  which its imports need. Tokenization is untouched by either.
* ``data-tools``: ``python -m data_tools preprocess``; its output is compared byte for byte
  with Megatron-LM's.
* ``data-tools-whole``: the same with ``--no-newline-split`` (whole documents per encode call,
  like the bound below: shows the pipeline's own overhead);
* ``sentencepiece``: the bound: ``SentencePieceProcessor.encode(batch of 64 documents,
  num_threads=workers)`` over the parsed JSONL, nothing written.
* ``data-tools-parquet`` / ``data-tools-zst`` (``--parquet`` / ``--zst``: the same documents
  converted by ``bench/build_corpus.py --convert``): input formats; outputs compared byte for
  byte with ``data-tools``'s.
* ``data-tools-2-shards``: two ``--shard I/2`` processes at once with ``workers / 2`` threads
  each, then ``merge --shards 2`` (all in the measured time; ``merge`` alone is timed after it):
  the same bytes, scaled over processes as over nodes.

For each: wall time, MB/s (MB = 10^6 bytes of JSONL), tokens/s, CPU seconds (user + system of
the whole tree, from the rusage of waited-for children: less sensitive than wall time to other
load on a shared machine), and peak memory of the whole
process tree, sampled from /proc every 20 ms: the largest sum of RSS, the largest sum of PSS
(shared pages split between processes) and the largest single RSS. Prints a Markdown table.

    python bench/preprocess.py --corpus /tmp/bench/corpus80.jsonl --megatron-lm /tmp/megatron-lm \\
        --extra-pythonpath /tmp/bench-pylibs --workers 2 --runs 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data_tools.tokenizers import mixtral_tokenizer_path  # noqa: E402

SP_ALONE = r"""
import json, sys, sentencepiece as spm
model, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
copies = int(sys.argv[4]) if len(sys.argv) > 4 else 1
sp = spm.SentencePieceProcessor(model_file=model)
tokens, batch = 0, []
for _ in range(copies):
    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 64:
                tokens += sum(map(len, sp.encode(batch, num_threads=threads)))
                batch = []
tokens += sum(map(len, sp.encode(batch, num_threads=threads)))
print(json.dumps({"tokens": tokens}))
"""

SHIM = """import typing
if not hasattr(typing, "override"):
    import typing_extensions
    typing.override = typing_extensions.override
"""


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {
                ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("Rss", "Pss:"))
            }
        return fields.get("Rss", 0) * 1024, fields.get("Pss", 0) * 1024
    except (OSError, ValueError):
        return 0, 0


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall time, stdout and peak memory of its process tree."""
    peak = {"rss": 0, "pss": 0, "max_rss": 0}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = pss = top = 0
            for pid in _tree(proc.pid):
                r, p = _memory(pid)
                rss, pss, top = rss + r, pss + p, max(top, r)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["max_rss"] = max(peak["max_rss"], top)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall": wall, "cpu": cpu, "stdout": out, "stderr": err, **peak}


def idx_tokens(prefix: str) -> int:
    from data_tools.indexed_writer import IndexedReader

    return IndexedReader(prefix + "_text_document").n_tokens


def _linked_copies(path: str, copies: int, folder: str) -> str:
    """A folder of ``copies`` hard links to ``path`` (names 0.<ext>, 1.<ext>, ...)."""
    os.makedirs(folder, exist_ok=True)
    ext = path[path.index(".", len(os.path.dirname(path)) + 1) :]
    for i in range(copies):
        link = os.path.join(folder, f"{i}{ext}")
        if not os.path.exists(link):
            os.link(path, link)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (skipped if absent)")
    p.add_argument("--extra-pythonpath", default="", help="prepended for Megatron-LM only")
    p.add_argument("--tokenizer-model", default=mixtral_tokenizer_path())
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--only",
        nargs="+",
        default=["megatron", "data-tools", "data-tools-whole", "sentencepiece"],
        help="tools to run (data-tools-whole: --no-newline-split, whole documents; "
        "data-tools-parquet, data-tools-zst, data-tools-2-shards)",
    )
    p.add_argument("--parquet", default=None, help="the corpus as Parquet (data-tools-parquet)")
    p.add_argument("--zst", default=None, help="the corpus as .jsonl.zst (data-tools-zst)")
    p.add_argument(
        "--copies", type=int, default=1,
        help="K > 1: every input is a folder of K hard links to the corpus file (K times the "
        "text; start-up amortized); Megatron-LM (one file) is then not run",
    )  # fmt: skip
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    os.makedirs(work, exist_ok=True)
    size = os.path.getsize(args.corpus) * args.copies
    py = sys.executable
    corpus_file = args.corpus
    if args.copies > 1:  # folders of hard links (not symlinks: preprocess refuses one file twice)
        for name in ("corpus", "parquet", "zst"):
            src = getattr(args, name)
            if src:
                setattr(args, name, _linked_copies(src, args.copies, os.path.join(work, name)))
        args.only = [t for t in args.only if t != "megatron"]
    common = ["--input", args.corpus, "--tokenizer-type", "Llama2Tokenizer"]
    common += ["--tokenizer-model", args.tokenizer_model, "--append-eod"]
    common += ["--workers", str(args.workers)]
    base_env = dict(os.environ, PYTHONPATH=REPO)
    tools = {}
    if "megatron" in args.only and args.megatron_lm:
        shim = os.path.join(work, "shim")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(SHIM)
        path = [shim, args.megatron_lm] + [x for x in args.extra_pythonpath.split(":") if x]
        tools["megatron"] = (
            [py, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), *common],
            dict(os.environ, PYTHONPATH=":".join(path)),
            os.path.join(work, "megatron"),
        )
    if "data-tools" in args.only:
        tools["data-tools"] = (
            [py, "-m", "data_tools", "preprocess", *common, "--progress", "none"],
            base_env,
            os.path.join(work, "ours"),
        )
    if "data-tools-whole" in args.only:
        tools["data-tools-whole"] = (
            [py, "-m", "data_tools", "preprocess", *common, "--progress", "none"]
            + ["--no-newline-split"],
            base_env,
            os.path.join(work, "whole"),
        )
    for kind in ("parquet", "zst"):
        if f"data-tools-{kind}" in args.only:
            other = [*common]
            other[1] = getattr(args, kind)
            tools[f"data-tools-{kind}"] = (
                [py, "-m", "data_tools", "preprocess", *other, "--progress", "none"],
                base_env,
                os.path.join(work, kind),
            )
    if "data-tools-2-shards" in args.only:
        half = max(1, args.workers // 2)
        out = os.path.join(work, "sharded")
        shard = [py, "-m", "data_tools", "preprocess", *common[:-1], str(half), "--progress"]
        shard += ["none", "--output-prefix", out, "--shard"]
        line = " & ".join(" ".join(map(shlex.quote, shard + [f"{i}/2"])) for i in range(2))
        merge = [py, "-m", "data_tools", "merge", "--shards", "2", "--output-prefix", out]
        script = f"{line} & wait -n && wait -n && {' '.join(map(shlex.quote, merge))}"
        tools["data-tools-2-shards"] = (["bash", "-c", script], base_env, out)
    if "sentencepiece" in args.only:
        tools["sentencepiece"] = (
            [py, "-c", SP_ALONE, args.tokenizer_model, corpus_file, str(args.workers)]
            + [str(args.copies)],
            base_env,
            None,
        )
    results: dict[str, list[dict]] = {name: [] for name in tools}
    for run in range(args.runs):
        for name, (cmd, env, prefix) in tools.items():
            if name == "data-tools-2-shards":
                for stale in glob.glob(prefix + "*"):  # else: "already done"
                    os.remove(stale)
            full = cmd + (["--output-prefix", prefix] if prefix and cmd[0] != "bash" else [])
            r = measure(full, env)
            r["tokens"] = idx_tokens(prefix) if prefix else json.loads(r["stdout"])["tokens"]
            results[name].append(r)
            print(f"run {run + 1} {name}: {r['wall']:.1f} s", file=sys.stderr, flush=True)
    if "data-tools-2-shards" in tools:  # the merge alone, once more over the same shards
        merge_cmd = [py, "-m", "data_tools", "merge", "--shards", "2", "--output-prefix"]
        merge = measure(merge_cmd + [os.path.join(work, "sharded")], base_env)
        print(f"merge --shards 2 alone: {merge['wall']:.2f} s", file=sys.stderr)
    variants = {"data-tools-parquet": "parquet", "data-tools-zst": "zst"}
    variants["data-tools-2-shards"] = "sharded"
    for tool, other in variants.items():
        if tool in tools and "data-tools" in tools:
            same = all(
                open(os.path.join(work, f"ours_text_document.{ext}"), "rb").read()
                == open(os.path.join(work, f"{other}_text_document.{ext}"), "rb").read()
                for ext in ("bin", "idx")
            )
            print(f"data-tools output from {other} byte-identical to data-tools': {same}")
    if "megatron" in tools and "data-tools" in tools:
        same = all(
            open(os.path.join(work, f"{a}_text_document.{ext}"), "rb").read()
            == open(os.path.join(work, f"{b}_text_document.{ext}"), "rb").read()
            for a, b in [("megatron", "ours")]
            + ([("megatron", "whole")] if "data-tools-whole" in tools else [])
            for ext in ("bin", "idx")
        )
        print(f"data-tools output byte-identical to Megatron-LM's: {same}")
    med = {n: statistics.median(r["wall"] for r in rs) for n, rs in results.items()}
    mib = 1 << 20
    print(f"\ncorpus {args.corpus}: {size / 1e6:.1f} MB, workers {args.workers}, runs {args.runs}")
    print(
        "| tool | wall s, median (all runs) | MB/s | tokens/s | CPU s, median | peak RSS, tree "
        "| peak PSS, tree | largest process RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        walls = ", ".join(f"{r['wall']:.1f}" for r in rs)
        tokens = rs[0]["tokens"]
        cpu = statistics.median(r["cpu"] for r in rs)
        print(
            f"| {name} | {med[name]:.1f} ({walls}) | {size / 1e6 / med[name]:.2f} | "
            f"{tokens / med[name] / 1e6:.2f}M | {cpu:.1f} | "
            f"{max(r['rss'] for r in rs) / mib:.0f} MiB | "
            f"{max(r['pss'] for r in rs) / mib:.0f} MiB | "
            f"{max(r['max_rss'] for r in rs) / mib:.0f} MiB |"
        )
    if "data-tools" in med:
        ours = results["data-tools"]
        for other in ("megatron", "sentencepiece"):
            if other in med:
                print(f"- throughput data-tools / {other}: {med[other] / med['data-tools']:.2f}x")
        if "data-tools-whole" in med and "sentencepiece" in med:
            ratio = med["sentencepiece"] / med["data-tools-whole"]
            print(f"- throughput data-tools --no-newline-split / sentencepiece: {ratio:.2f}x")
        if "megatron" in med:
            theirs = results["megatron"]
            print(
                "- peak memory data-tools / megatron: "
                f"RSS {max(r['rss'] for r in ours) / max(r['rss'] for r in theirs):.2f}, "
                f"PSS {max(r['pss'] for r in ours) / max(r['pss'] for r in theirs):.2f}"
            )


if __name__ == "__main__":
    main()
