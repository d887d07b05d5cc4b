"""A Llama-shaped model compiled for the triton backend vs the same model in fp16 eager, one run.

    python benchmarks/triton_e2e.py --out bench-e2e/          # on a CUDA GPU
    python benchmarks/triton_e2e.py --smoke --out /tmp/e2e    # a tiny model on the CPU (checks the script)

Random weights, hidden 4096, intermediate 11008, 32 heads, 4 layers (Llama-2-7B's layer shape),
compiled on the CPU with ``w8a8`` and ``w4a16-rtn`` (``w4a16``'s int4 group-128 weights rounded
to nearest: the AWQ search changes the weights' values, not the kernel), then moved to the GPU
in fp16. Times prefill (1 × 2048 tokens) and a decode step of 1 and 16 tokens (batch 1 and 16 ×
one token, the model run on those tokens alone: it has no KV cache, so the step is the linears'
GEMV-shaped work plus attention over one token). Decode steps are timed inside CUDA graphs for
both models, so per-op launch overhead of the graph executor does not hide the kernels.
Writes e2e.csv/.md to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lowbit
from _gpu import bench, device_name, write_table

STEPS = {"prefill 1×2048": (1, 2048), "decode 1 token": (1, 1), "decode 16 tokens": (16, 1)}


def llama(hidden: int, layers: int, inter: int, heads: int, vocab: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, use_cache=False)
    return tf.LlamaForCausalLM(cfg).eval()


def graphed(fn, ids: torch.Tensor):
    """``fn(ids)`` replayed from a CUDA graph (static input and output)."""
    static = ids.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn(static)
    return graph.replay


def time_step(fn, batch: int, seq: int, vocab: int, device: str, cuda_graph: bool) -> float:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if cuda_graph and device == "cuda":
        return bench(graphed(fn, ids), device)
    with torch.no_grad():
        return bench(lambda: fn(ids), device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-e2e")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (no speed figures)")
    ap.add_argument("--recipes", default="w8a8,w4a16-rtn")
    ap.add_argument("--no-cuda-graph", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_e2e.py needs a CUDA GPU (use --smoke to check the script on a CPU)")
    dims = (128, 2, 256, 4, 256) if args.smoke else (4096, 4, 11008, 32, 32000)
    steps = {"prefill 1×64": (1, 64), "decode 1 token": (1, 1)} if args.smoke else STEPS
    dtype = torch.float32 if args.smoke else torch.float16
    model = llama(*dims)
    vocab = dims[-1]
    example = (torch.randint(0, vocab, (2, 32)),)
    calibration = [(torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    print(f"device: {device_name(device)}")
    models: dict[str, torch.nn.Module] = {}
    for recipe in args.recipes.split(","):  # compiled on the CPU in fp32, before anything moves
        models[f"lowbit {recipe} (triton)"] = lowbit.compile(
            model, example, recipe=recipe, calibration=calibration, backend="triton",
            dynamic_shapes=({0: "batch", 1: "seq"},))
    models = {"fp16 eager": model, **models}
    rows = []
    for name, m in models.items():
        m.to(device, dtype)
        for step, (batch, seq) in steps.items():
            t = time_step(lambda ids: m(ids), batch, seq, vocab, device, not args.no_cuda_graph)
            rows.append(dict(model=name, step=step, ms=t))
        m.to("cpu")
    base = {r["step"]: r["ms"] for r in rows if r["model"] == "fp16 eager"}
    for r in rows:
        r["vs fp16 eager"] = base[r["step"]] / r["ms"]
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(rows, folder, "e2e")
    print((folder / "e2e.md").read_text())


if __name__ == "__main__":
    main()
