"""Train the tiny byte-level Llama that lowbit ships for perplexity-based quality checks.

What it trains
    A ``transformers.LlamaForCausalLM`` of about 0.85M parameters whose vocabulary is
    the 256 byte values (token id == byte value, so no tokenizer is needed):
    hidden 128, MLP 384, 4 layers, 4 query heads / 2 key-value heads, context 256,
    untied embeddings. With ``--experts N`` it is a ``Qwen3MoeForCausalLM`` instead, every
    layer's MLP N experts of width ``--ffn``, ``--top-k`` of them per token, trained with the
    router's load-balancing loss.

On what
    The ``.py`` files of the running Python's standard library
    (``sysconfig.get_paths()["stdlib"]``), skipping ``test``/``tests``/``idlelib``/
    ``lib2to3``/``site-packages`` directories. Files are sorted by their path relative
    to the stdlib root and read as raw bytes; every 20th file (index % 20 == 19) is
    held out for validation, the rest are concatenated (newline-separated) for
    training. Training uses AdamW (lr 3e-3, linear warmup then cosine decay, weight
    decay 0.01) on batches of random 256-byte windows drawn with a seeded
    ``torch.Generator`` for a fixed number of steps, so reruns are reproducible
    (same torch version, same stdlib, same CPU thread count).

Outputs
    * ``<out>/config.json`` and ``<out>/model.safetensors`` (fp32, ~3.4 MB)
    * ``<out>/train_log.json`` (parameter count, steps, losses, wall time, versions)
    * ``lowbit/data/byte_llama_val.txt``: the held-out validation text (first ~64 KB
      of the validation bytes, cut at a UTF-8 boundary). The final evaluation reported
      in ``train_log.json`` is the mean next-byte loss (nats/byte) over exactly this
      file's bytes, in non-overlapping 256-byte windows.

How to rerun
    python scripts/train_byte_llama.py            # ~2-3 minutes on 2 CPU cores
    python scripts/train_byte_llama.py --steps 50 --out /tmp/byte_llama   # quick try
    # the second shipped LM, with widths that are not powers of two (byte-llama-192):
    python scripts/train_byte_llama.py --hidden 192 --ffn 528 --heads 6 --kv-heads 3 \
        --out lowbit/data/byte_llama_192 --val-text /tmp/byte_llama_val.txt   # ~5 minutes
    # the shipped mixture of experts (byte-moe: Qwen3-MoE, 8 experts of width 96, 2 per token):
    python scripts/train_byte_llama.py --experts 8 --top-k 2 --ffn 96 --steps 1500 \
        --out lowbit/data/byte_moe --val-text /tmp/byte_moe_val.txt   # ~11 minutes

The trained result is committed to the repository so tests never train; they only
load ``lowbit/data/byte_llama`` (and its siblings) with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "lowbit" / "data" / "byte_llama"
DEFAULT_VAL_TEXT = REPO_ROOT / "lowbit" / "data" / "byte_llama_val.txt"

EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
VAL_EVERY = 20  # every 20th file (sorted order) goes to validation
SEQ_LEN = 256
BATCH_SIZE = 16
DEFAULT_STEPS = 750
LR = 3e-3
WARMUP_STEPS = 30
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
VAL_BYTES = 64 * 1024
LOG_EVERY = 20


def model_config(hidden: int = 128, ffn: int = 384, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 experts: int = 0, top_k: int = 2):
    from transformers import LlamaConfig, Qwen3MoeConfig

    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"--hidden {hidden} must split into --heads {heads}, which must split into --kv-heads {kv_heads}")
    if experts and not 0 < top_k <= experts:
        raise SystemExit(f"--top-k {top_k} must be between 1 and --experts {experts}")
    # a mixture of experts: Qwen3-MoE's architecture, every layer's MLP ``experts`` experts of
    # width ``ffn``, ``top_k`` of them per token (and a router load-balancing loss in training)
    moe = dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn, head_dim=hidden // heads,
               decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True) if experts else {}
    return (Qwen3MoeConfig if experts else LlamaConfig)(
        **moe,
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=SEQ_LEN,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def stdlib_files() -> tuple[Path, list[str]]:
    """Sorted stdlib ``.py`` paths, relative to the stdlib root (posix style)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return root, sorted(rels)


def split_files(rels: list[str]) -> tuple[list[str], list[str]]:
    train = [r for i, r in enumerate(rels) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [r for i, r in enumerate(rels) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def concat_bytes(root: Path, rels: list[str]) -> bytes:
    return b"\n".join((root / r).read_bytes() for r in rels)


def utf8_prefix(data: bytes) -> bytes:
    """Longest prefix of ``data`` that decodes as UTF-8."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as e:
        return data[: e.start]


def calibration_text(train_bytes: bytes, chunks: int = 16, size: int = 2048) -> bytes:
    """Calibration bytes for quantization: ``chunks`` slices of the *training* text spread
    evenly over it (so they never overlap the validation files)."""
    step = len(train_bytes) // chunks
    return b"".join(utf8_prefix(train_bytes[i * step: i * step + size]) for i in range(chunks))


@torch.no_grad()
def eval_nats_per_byte(model, data: bytes, seq_len: int = SEQ_LEN) -> float:
    """Mean next-byte cross entropy (nats/byte) over non-overlapping windows.

    ``data`` is cut into consecutive ``seq_len``-byte windows (the last may be
    shorter); within each window every byte after the first is predicted from the
    bytes before it in that window. The mean is weighted by predicted bytes.
    """
    model.eval()
    total, count = 0.0, 0
    ids = torch.tensor(list(data), dtype=torch.long)
    for start in range(0, len(ids), seq_len):
        window = ids[start : start + seq_len]
        if len(window) < 2:
            continue
        logits = model(input_ids=window[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output model directory")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size")
    ap.add_argument("--ffn", type=int, default=384, help="MLP width (intermediate_size)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key-value heads")
    ap.add_argument("--experts", type=int, default=0,
                    help="MoE experts per layer (0: a dense Llama; else Qwen3-MoE, --ffn the experts' width)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (with --experts)")
    ap.add_argument(
        "--val-text",
        default=None,
        help="where to write the validation text (default: lowbit/data/byte_llama_val.txt "
        "when --out is the default, else <out>/byte_llama_val.txt)",
    )
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM

    out_dir = Path(args.out)
    if args.val_text is not None:
        val_path = Path(args.val_text)
    elif out_dir.resolve() == DEFAULT_OUT.resolve():
        val_path = DEFAULT_VAL_TEXT
    else:
        val_path = out_dir / "byte_llama_val.txt"

    torch.set_num_threads(2)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    root, rels = stdlib_files()
    train_rels, val_rels = split_files(rels)
    train_bytes = concat_bytes(root, train_rels)
    val_text_bytes = utf8_prefix(concat_bytes(root, val_rels)[:VAL_BYTES])
    print(
        f"stdlib {root}: {len(rels)} files -> {len(train_rels)} train "
        f"({len(train_bytes):,} bytes), {len(val_rels)} val "
        f"(eval on first {len(val_text_bytes):,} bytes)"
    )

    config = model_config(args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.experts, args.top_k)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )

    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)
    offsets = torch.arange(SEQ_LEN)
    gen = torch.Generator().manual_seed(args.seed)

    model.train()
    t0 = time.perf_counter()
    recent: list[float] = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH_SIZE,), generator=gen)
        batch = data[starts[:, None] + offsets].long()
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        recent.append(loss.item())
        recent = recent[-LOG_EVERY:]
        if (step + 1) % LOG_EVERY == 0 or step == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            eta = el / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1:5d}/{args.steps} ({100 * (step + 1) / args.steps:5.1f}%) "
                f"loss {loss.item():.4f} avg{len(recent)} {sum(recent) / len(recent):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {el:6.1f}s eta {eta:6.1f}s",
                flush=True,
            )
    train_time = time.perf_counter() - t0
    final_train_loss = sum(recent) / len(recent)

    # Write the validation text first, then evaluate on exactly the bytes written.
    val_path.parent.mkdir(parents=True, exist_ok=True)
    val_path.write_bytes(val_text_bytes)
    val_path.with_name(val_path.name.replace("_val", "_calib")).write_bytes(calibration_text(train_bytes))
    val_nats = eval_nats_per_byte(model, val_path.read_bytes())
    print(
        f"validation: {val_nats:.4f} nats/byte ({val_nats / math.log(2):.4f} bits/byte, "
        f"ppl {math.exp(val_nats):.3f}) on {len(val_text_bytes):,} bytes of {val_path}"
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # the balancing loss is for training only
    model.save_pretrained(out_dir, safe_serialization=True)
    log = {
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "seed": args.seed,
        "shape": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, **({"experts": args.experts, "top_k": args.top_k} if args.experts else {})},
        "lr": LR,
        "final_train_loss": round(final_train_loss, 4),
        "final_train_loss_note": f"mean of the last {len(recent)} step losses (nats/byte)",
        "val_nats_per_byte": round(val_nats, 4),
        "val_bytes": len(val_text_bytes),
        "val_text": val_path.name,
        "train_wall_time_s": round(train_time, 1),
        "train_files": len(train_rels),
        "val_files": len(val_rels),
        "train_bytes": len(train_bytes),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": sys.version.split()[0],
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved model to {out_dir} (train {train_time:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
