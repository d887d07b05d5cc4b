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
Writes e2e.csv/.md (rewritten after each model, so a run stopped early leaves the models done)
and e2e.svg (speed-up over fp16 eager against tokens per step) to --out, and prints the
acceptance figures (``_acceptance.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

import lowbit
from _acceptance import print_figures
from _gpu import bench, device_name, gpu_parser, run_device, svg_lines, write_table

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


def compile_all(model: torch.nn.Module, recipes: list[str], vocab: int) -> dict[str, torch.nn.Module]:
    """recipe → the model compiled for the triton backend, on the CPU in fp32."""
    example = (torch.randint(0, vocab, (2, 32)),)
    calibration = [(torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    return {recipe: lowbit.compile(model, example, recipe=recipe, calibration=calibration, backend="triton",
                                   dynamic_shapes=({0: "batch", 1: "seq"},), progress=False)
            for recipe in recipes}


def time_model(name: str, recipe: str, m: torch.nn.Module, steps: dict, vocab: int, device: str,
               dtype: torch.dtype, cuda_graph: bool) -> list[dict]:
    """One row per step for one model, moved to ``device`` in ``dtype`` and back."""
    m.to(device, dtype)
    rows = []
    for step, (batch, seq) in steps.items():
        t = time_step(lambda ids: m(ids), batch, seq, vocab, device, cuda_graph)
        rows.append(dict(model=name, recipe=recipe, step=step, batch=batch, seq=seq, tokens=batch * seq, ms=t))
        print(f"{name}, {step}: {t:.3g} ms", flush=True)
    m.to("cpu")
    return rows


def plot(rows: list[dict], folder: Path) -> None:
    """e2e.svg: each compiled model's speed-up over fp16 eager against tokens per step."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["recipe"] != "fp16":
            series.setdefault(r["model"], []).append((r["tokens"], r["vs fp16 eager"]))
    svg_lines(series, folder / "e2e.svg", "Llama-shaped model, lowbit triton vs fp16 eager (CUDA graphs)",
              "tokens per step", "× faster")


def main() -> None:
    ap = gpu_parser(__doc__, "bench-e2e", "a tiny model on the CPU (no speed figures)")
    ap.add_argument("--recipes", default="w8a8,w4a16-rtn")
    ap.add_argument("--no-cuda-graph", action="store_true")
    args = ap.parse_args()
    device = run_device(args, "triton_e2e.py")
    dims = (64, 1, 128, 2, 256) if args.smoke else (4096, 4, 11008, 32, 32000)
    steps = {"prefill 1×16": (1, 16), "decode 1 token": (1, 1)} if args.smoke else STEPS
    dtype = torch.float32 if args.smoke else torch.float16
    model = llama(*dims)
    vocab = dims[-1]
    print(f"device: {device_name(device)}", flush=True)
    compiled = compile_all(model, args.recipes.split(","), vocab)  # before anything moves
    models = {"fp16": ("fp16 eager", model), **{r: (f"lowbit {r} (triton)", m) for r, m in compiled.items()}}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for recipe, (name, m) in models.items():
        rows += time_model(name, recipe, m, steps, vocab, device, dtype, not args.no_cuda_graph)
        base = {r["step"]: r["ms"] for r in rows if r["recipe"] == "fp16"}
        for r in rows:
            r["vs fp16 eager"] = base[r["step"]] / r["ms"]
        write_table(rows, folder, "e2e")
    plot(rows, folder)
    print((folder / "e2e.md").read_text())
    print_figures(folder, ("e2e",), args.smoke)


if __name__ == "__main__":
    main()
