"""Block-sparse attention (mask building + the Triton kernel) vs torch SDPA (flash), one run.

    python benchmarks/sparse_attention.py --out bench-sparse/          # on a CUDA GPU
    python benchmarks/sparse_attention.py --smoke --out /tmp/sparse    # tiny shapes on the CPU

Batch 1, 32 heads, head dim 128, fp16, causal, sequence 4k–64k, block 64, target block sparsity
0/50/75/90/95% (``attn.block_mask`` method=sparsity: pooled q·k scores, a sink block and a
2-block local window always kept). Per point: the mask-building time (block scores + selection
+ the kernel's index lists), the attention time, their sum against SDPA's, and on the same
inputs the sparsity reached, the relative output error against SDPA and the softmax mass kept
(over the last 256 query rows: the full L×L probabilities do not fit at 64k).

Inputs are random but structured like real attention: queries and keys share a slowly
drifting component (neighbouring tokens alike) plus a few recurring "topic" directions, so
attention concentrates on some blocks; pure noise would spread it evenly.
Writes sparse_attention.csv/.md (rewritten after each point, so a run stopped early leaves the
points done) and .svg to --out, and prints the acceptance figures (``_acceptance.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from _acceptance import print_figures
from _gpu import bench, device_name, gpu_parser, run_device, svg_lines, write_table

SEQS = [4096, 8192, 16384, 32768, 65536]
SPARSITIES = [0.0, 0.5, 0.75, 0.9, 0.95]


def structured_qkv(seq: int, heads: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device)

    drift = rand(1, heads, seq, dim).cumsum(2) / (torch.arange(1, seq + 1, device=device)[:, None] ** 0.5)
    topics = rand(1, heads, 8, dim)
    which = torch.randint(0, 8, (seq,), generator=g, device=device)
    base = drift + 2 * topics[:, :, which]
    q = base + rand(1, heads, seq, dim)
    k = base + rand(1, heads, seq, dim)
    return q.to(dtype), k.to(dtype), rand(1, heads, seq, dim).to(dtype)


def mass_kept(q, k, mask_blocks, block, rows=256) -> float:
    """Mean dense softmax mass on kept keys over the last ``rows`` query rows (causal)."""
    lq = q.shape[-2]
    qs = q[..., lq - rows:, :].float()
    s = qs @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    pos = torch.arange(lq - rows, lq, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(lq, device=q.device)[None, :] > pos, -torch.inf)
    p = s.softmax(-1)
    keep = mask_blocks[..., (lq - rows) // block:, :].repeat_interleave(block, -2)[..., -rows:, :]
    keep = keep.repeat_interleave(block, -1)[..., :lq]
    return (p * keep).sum(-1).mean().item()


def point(seq, sparsity, heads, dim, block, device, dtype) -> dict:
    from lowbit.backends.triton.attention import block_sparse_attention_indexed, kernel_block_indices
    from lowbit.ir.dialects.attn import build_block_mask

    q, k, v = structured_qkv(seq, heads, dim, device, dtype)
    opts = dict(block=block, method="sparsity", topk=0, sparsity=sparsity, mass=1.0, sinks=1, window=2,
                causal=True, scale=None)

    def build():
        m = build_block_mask(q, k, None, **opts)
        return m, kernel_block_indices(m, block, seq, seq, True, dim)

    mask, (counts, idx) = build()
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, graph=True)
    t_mask = bench(build, device)  # eager: the index lists' width is read on the host
    t_attn = bench(lambda: block_sparse_attention_indexed(q, k, v, mask, counts, idx, block, True), device,
                   graph=True)
    out = block_sparse_attention_indexed(q, k, v, mask, counts, idx, block, True).float()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).float()
    n = mask.shape[-1]
    allowed = n * (n + 1) // 2 * heads
    return dict(seq=seq, target=sparsity, sparsity=1 - mask.sum().item() / allowed,
                sdpa_ms=sdpa, mask_ms=t_mask, attn_ms=t_attn, speedup=sdpa / (t_mask + t_attn),
                kernel_speedup=sdpa / t_attn, rel_err=((out - ref).norm() / ref.norm()).item(),
                max_abs_err=(out - ref).abs().max().item(), mass_kept=mass_kept(q, k, mask, block, min(256, seq)))


def main() -> None:
    ap = gpu_parser(__doc__, "bench-sparse")
    ap.add_argument("--seqs", default=None)
    args = ap.parse_args()
    device = run_device(args, "sparse_attention.py")
    heads, dim, block, dtype = (2, 32, 32, torch.float32) if args.smoke else (32, 128, 64, torch.float16)
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([128] if args.smoke else SEQS)
    print(f"device: {device_name(device)}", flush=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq in seqs:
        for sp in SPARSITIES:
            rows.append(point(seq, sp, heads, dim, block, device, dtype))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            write_table(rows, folder, "sparse_attention")
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(f"{int(100 * r['target'])}% sparse", []).append((r["seq"], r["speedup"]))
    svg_lines(series, folder / "sparse_attention.svg", "block-sparse attention (mask + kernel) vs SDPA",
              "sequence length", "× faster than SDPA")
    print((folder / "sparse_attention.md").read_text())
    print_figures(folder, ("sparse_attention",), args.smoke)


if __name__ == "__main__":
    main()
