"""Quantizing models larger than the machine: wall time and peak memory of ``lowbit.compile`` on
Llama-shaped models read from a folder (weights stay in the safetensors files until used,
calibration runs block by block), and of the ONNX export of the result.

    python benchmarks/scale.py                                  # 1.1B: w4a16-gptq and w8a8
    python benchmarks/scale.py --models 1.1b,3b,7b --export     # every size, with ONNX export
    python benchmarks/scale.py --models 1.1b --recipes w4a16-gptq --llm-compressor

Models (random weights, normal(0, 0.02), written once as sharded bf16 safetensors under
``--dir``, default ``~/.cache/lowbit/scale``): ``1.1b`` TinyLlama-1.1B's shapes (hidden 2048,
FFN 5632, 22 layers, 32/4 heads), ``3b`` Llama-3.2-3B's (3072, 8192, 28 layers, 24/8 heads,
vocabulary 128256, tied embeddings), ``7b`` Llama-2-7B's (4096, 11008, 32 layers, 32/32
heads). Calibration: 8 sequences of 512 random token ids (seeded), one per batch.

Every run is a fresh process, so its peak resident set (``ru_maxrss``) is its own; it is read
after compiling and again after the export. ``--llm-compressor`` runs llm-compressor's
``oneshot`` (GPTQ W4A16 group 128 asymmetric, its sequential pipeline, lm_head ignored) on the
same folder and calibration in its own virtual environment (``benchmarks/peers_llm.py``
creates it), turn about with lowbit. The table goes to ``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
SEQUENCES, LENGTH = 8, 512
SHARD_BYTES = 1 << 30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_model(name: str, folder: Path) -> Path:
    """The model's config and random bf16 weights in shards, written one tensor at a time."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = tf.LlamaConfig(**SHAPES[name], torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map, shards, size = {}, 0, 0

    def flush() -> None:
        nonlocal shard, shards, size
        if shard:
            shards += 1
            save_file(shard, str(folder / f"model-{shards:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update({k: f"model-{shards:05d}.safetensors" for k in shard})
            shard, size = {}, 0

    for key, p in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = torch.ones(p.shape) if key.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        shard[key] = t.to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def calibration():
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32000, (1, LENGTH), generator=gen) for _ in range(SEQUENCES)]


def child_lowbit(folder: str, recipe: str, export: str | None) -> dict:
    import torch

    import lowbit
    from lowbit.backends.onnx import export_onnx

    torch.set_num_threads(os.cpu_count() or 1)
    batches = [(ids,) for ids in calibration()]
    start = time.perf_counter()
    compiled = lowbit.compile(folder, batches[0], recipe=recipe, calibration=batches, verify=False)
    row = {"compile_s": time.perf_counter() - start, "compile_rss_gb": peak_rss_gb()}
    if export:
        start = time.perf_counter()
        path, _ = export_onnx(compiled.traced, Path(export) / "model.onnx")
        row.update(export_s=time.perf_counter() - start, export_rss_gb=peak_rss_gb(),
                   onnx_gb=sum(f.stat().st_size for f in path.parent.iterdir()) / 2**30)
    return row


def run_child(cmd: list[str], log) -> dict:
    """Run ``cmd``; its progress bars (stderr) go to the log as they come."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    log.seek(0, os.SEEK_END)
    log.write(f"\n{proc.stdout}\n")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        with open(log.name, errors="replace") as f:
            f.seek(start)
            tail = (f.read().strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def bf16_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="1.1b")
    ap.add_argument("--recipes", default="w4a16-gptq,w8a8")
    ap.add_argument("--export", action="store_true", help="also export each result to ONNX (external data)")
    ap.add_argument("--llm-compressor", action="store_true", help="llm-compressor's oneshot on the 1.1B model too")
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "lowbit" / "scale"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.md"))
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "RECIPE", "EXPORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, recipe, export = args.child
        print(json.dumps(child_lowbit(folder, recipe, None if export == "-" else export)))
        return
    rows = []
    log = open(Path(args.out).with_suffix(".log"), "w")
    for name in args.models.split(","):
        folder = write_model(name, Path(args.dir) / name)
        size = bf16_gb(folder)
        runs = [("lowbit", r) for r in args.recipes.split(",")]
        if args.llm_compressor and name == "1.1b":
            runs.insert(1, ("llm-compressor", "w4a16-gptq"))
        for tool, recipe in runs:
            export = str(Path(args.dir) / "onnx" / f"{name}-{recipe}") if args.export and tool == "lowbit" else "-"
            if tool == "lowbit":
                row = run_child([sys.executable, __file__, "--child", str(folder), recipe, export], log)
            else:
                row = llm_compressor(folder, log)
            row.update(model=name, tool=tool, recipe=recipe, bf16_gb=size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text(render(rows))
    print(render(rows))


def llm_compressor(folder: Path, log) -> dict:
    venv = Path.home() / ".cache" / "lowbit" / "peers" / "llm-compressor"
    python = venv / "bin" / "python"
    if not python.is_file():
        return {"error": f"no llm-compressor venv at {venv}: run benchmarks/peers_llm.py --tools llm-compressor once"}
    return run_child([str(python), str(ROOT / "benchmarks" / "peers" / "run_llmcompressor_scale.py"),
                      str(folder), str(SEQUENCES), str(LENGTH)], log)


def render(rows: list[dict]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Measured {stamp} on {os.cpu_count()} CPU cores, {SEQUENCES} x {LENGTH} calibration tokens "
             "(`python benchmarks/scale.py`)", "",
             "| model | bf16 on disk | tool | recipe | compile | peak RSS | RSS / (1.3 x bf16 + 1 GB) | ONNX export | export peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['bf16_gb']:.2f} GB | {r['tool']} | {r['recipe']} | error: {r['error']} | | | | |")
            continue
        budget = 1.3 * r["bf16_gb"] + 1
        export = (f"{r['export_s']:.0f} s ({r['onnx_gb']:.2f} GB)", f"{r['export_rss_gb']:.2f} GB") \
            if "export_s" in r else ("", "")
        lines.append(f"| {r['model']} | {r['bf16_gb']:.2f} GB | {r['tool']} | {r['recipe']} | {r['compile_s']:.0f} s "
                     f"| {r['compile_rss_gb']:.2f} GB | {r['compile_rss_gb'] / budget:.2f} | {export[0]} | {export[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
