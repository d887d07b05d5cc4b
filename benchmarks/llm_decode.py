"""LLM decoding on the CPU, all in one run on one model: prefill time and decode tokens/s.

The model is Llama-shaped (hidden 2048, FFN 5632, 4 layers, 32 query / 4 key-value heads,
vocabulary 32000) with random weights (speed does not depend on them), written once as a
transformers folder with a byte-level tokenizer (the model builder needs one). Engines:

- ``hf fp32``: transformers eager, the float model with its ``DynamicCache``;
- ``lowbit torch <recipe>``: ``lowbit.compile(model.bfloat16(), recipe)`` and its ``generate``
  (quantized linears on torch's packed CPU GEMMs, which torch vectorizes for bfloat16);
- ``lowbit genai <recipe>``: ``lowbit export --genai`` run by ONNX Runtime GenAI;
- ``builder int4`` / ``builder fp32``: ONNX Runtime GenAI's own model builder
  (``python -m onnxruntime_genai.models.builder``), run by GenAI.

Each context length is a prompt of that many tokens, then ``--new-tokens`` greedy tokens. The
engines take turns, ``--rounds`` times; the table gives medians. Prefill is the time to the
first token; decode is the rate of the tokens after it. The key/value cache's bytes per token
are given for every ``kv_cache`` preset (all layers, one sequence).

    pip install -e ".[genai]"
    python benchmarks/llm_decode.py --workdir /tmp/llm_decode          # ~25 min on 2 cores
    python benchmarks/llm_decode.py --workdir /tmp/llm_decode --quality 64   # byte-llama perplexity
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
             bos_token_id=1, eos_token_id=2)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: token i is byte i (GPT-2's byte alphabet)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[1], eos_token=chars[2])


def model_folder(work: Path) -> Path:
    import transformers

    folder = work / "hf"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
        model.save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    return folder


# ---- engines: each returns a function (prompt [1, n] int64, new tokens) -> (prefill s, decode tok/s)

def hf_engine(folder: Path):
    import transformers

    import inspect

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(prompt, new):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            cache = out[arg]
            for _ in range(new - 1):
                out = model(token, use_cache=True, **{arg: cache})
                cache, token = out[arg], out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return t1 - t0, (new - 1) / (t2 - t1)
    return run


def lowbit_torch_engine(folder: Path, recipe: str):
    import transformers

    import lowbit

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    calibration = [(torch.randint(3, 256, (2, 64), generator=gen),)]
    q = lowbit.compile(model, (calibration[0][0][:, :16],), recipe=recipe, calibration=calibration,
                       progress=False)
    del model

    def run(prompt, new):
        t0 = time.perf_counter()
        q.generate(prompt, max_new_tokens=1, eos_token_id=[])
        t1 = time.perf_counter()
        q.generate(prompt, max_new_tokens=new, eos_token_id=[])
        t2 = time.perf_counter()
        return t1 - t0, (new - 1) / ((t2 - t1) - (t1 - t0))
    return run


def genai_engine(folder: Path, threads: int):
    import onnxruntime_genai as og

    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(folder))

    def run(prompt, new):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + new, min_length=prompt.shape[1] + new,
                                  do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt.numpy().astype(np.int32))
        generator.generate_next_token()
        t1 = time.perf_counter()
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        t2 = time.perf_counter()
        return t1 - t0, count / (t2 - t1)
    return run


def lowbit_genai_folder(hf: Path, out: Path, recipe: str | None) -> Path:
    if not (out / "genai_config.json").exists():
        cmd = [sys.executable, "-m", "lowbit.cli", "export", str(hf), "--genai", "-o", str(out)]
        subprocess.run(cmd + (["--recipe", recipe] if recipe else []), check=True, stdout=subprocess.DEVNULL)
    return out


def builder_folder(hf: Path, out: Path, precision: str) -> Path:
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(out / "cache")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def cache_bytes(folder: Path) -> dict[str, int]:
    import transformers

    import lowbit

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = lowbit.compile(model, (ids,), progress=False)
    out = {"fp32": base.cache_bytes_per_token()}
    from lowbit.passes.kv_cache import KV_PRESETS

    for preset in KV_PRESETS:
        q = lowbit.compile(base.traced, kv_cache=preset, calibration=[(ids,)], progress=False)
        out[preset] = q.cache_bytes_per_token()
    return out


def genai_perplexity(folder: Path, windows: list[torch.Tensor]) -> float:
    """exp(mean next-byte cross-entropy) of a GenAI folder over ``windows`` (each [1, n]): the
    prompt's logits, as GenAI returns them after the prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    total, count = 0.0, 0
    for ids in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.numpy().astype(np.int32))
        logits = torch.from_numpy(np.array(generator.get_output("logits"))).float().reshape(1, ids.shape[1], -1)
        total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def quality(work: Path, windows: int) -> None:
    """byte-llama through ONNX Runtime GenAI: lowbit's int4 recipes (calibrated on the shipped
    calibration text) against the model builder's int4 (round to nearest) and the float model."""
    import shutil

    from lowbit.evaluate import byte_windows
    from lowbit.zoo import BYTE_LLAMA_DIR

    hf = work / "byte-llama"
    if not (hf / "tokenizer.json").exists():
        shutil.copytree(BYTE_LLAMA_DIR, hf, dirs_exist_ok=True)
        byte_tokenizer().save_pretrained(hf)
    calib = work / "byte_llama_calib.txt"
    calib.write_text((Path(__file__).resolve().parent.parent / "lowbit" / "data" / "byte_llama_calib.txt")
                     .read_text(errors="replace"))
    evaluation = [w[:1, :255] for (batch,) in byte_windows("val") for w in batch.split(1)][:windows]  # context 256
    rows = {"builder fp32": builder_folder(hf, work / "bl-builder-fp32", "fp32"),
            "builder int4 (RTN, block 32)": builder_folder(hf, work / "bl-builder-int4", "int4")}
    for recipe in ("w4a16", "w4a16-gptq", "w4a16-rtn"):
        out = work / f"bl-lowbit-{recipe}"
        if not (out / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "lowbit.cli", "export", str(hf), "--genai", "--recipe", recipe,
                            "--calibration", str(calib), "--samples", "64", "--max-length", "256", "-o", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
        rows[f"lowbit {recipe}"] = out
    print(f"\nbyte-llama perplexity through ONNX Runtime GenAI ({len(evaluation)} held-out windows of 255 bytes)\n")
    print("| model | perplexity |\n|---|---|")
    for name, folder in rows.items():
        print(f"| {name} | {genai_perplexity(folder, evaluation):.4f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/lowbit_llm_decode")
    ap.add_argument("--contexts", default="128,1024", help="prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="hf fp32,lowbit torch w4a16-rtn,lowbit torch w8a8-dynamic,"
                                        "lowbit genai fp32,lowbit genai w4a16-rtn,lowbit genai w4a16,"
                                        "lowbit genai w4a8,builder fp32,builder int4")
    ap.add_argument("--quality", type=int, default=0, metavar="WINDOWS",
                    help="only the byte-llama perplexity table, over this many held-out windows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.quality:
        quality(work, args.quality)
        return 0
    hf = model_folder(work)
    engines = {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        print(f"preparing {name} ...", file=sys.stderr, flush=True)
        kind, _, variant = name.partition(" ")
        if name == "hf fp32":
            engines[name] = hf_engine(hf)
        elif kind == "lowbit" and variant.startswith("torch"):
            engines[name] = lowbit_torch_engine(hf, variant.split()[1])
        elif kind == "lowbit":
            recipe = variant.split()[1]
            folder = lowbit_genai_folder(hf, work / f"lowbit-{recipe}", None if recipe == "fp32" else recipe)
            engines[name] = genai_engine(folder, args.threads)
        elif kind == "builder":
            engines[name] = genai_engine(builder_folder(hf, work / f"builder-{variant}", variant), args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    results: dict[tuple[str, int], list] = {}
    for r in range(args.rounds):
        for ctx in contexts:
            prompt = torch.randint(3, 256, (1, ctx), generator=torch.Generator().manual_seed(ctx))
            for name, run in engines.items():  # taking turns: the machine's drift hits all alike
                results.setdefault((name, ctx), []).append(run(prompt, args.new_tokens))
                print(f"round {r} ctx {ctx} {name}: {results[(name, ctx)][-1]}", file=sys.stderr, flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d')}; prompt of N tokens, then {args.new_tokens} greedy tokens; "
          f"medians of {args.rounds}\n")
    header = "| engine | " + " | ".join(f"prefill {c} (s) | decode @{c} (tok/s)" for c in contexts) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(contexts)))
    table = {}
    for name in engines:
        cells = []
        for ctx in contexts:
            runs = results[(name, ctx)]
            pre, rate = statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs)
            table[f"{name} @{ctx}"] = {"prefill_s": pre, "decode_tok_s": rate}
            cells += [f"{pre:.3f}", f"{rate:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sizes = cache_bytes(hf)
    print("\n| key/value cache | bytes per token | vs fp32 |\n|---|---|---|")
    for preset, n in sizes.items():
        print(f"| {preset} | {n} | {n / sizes['fp32']:.3f}× |")
    (work / "results.json").write_text(json.dumps({"table": table, "cache_bytes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
