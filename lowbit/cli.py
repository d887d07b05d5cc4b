"""The ``lowbit`` command line (thin: parsing arguments and printing; the work is elsewhere).

    lowbit inspect tiny-llama --dump-dir out/
    lowbit inspect minilm --pipeline "canonicalize" --why-not fuse-attention
    lowbit export minilm --recipe w8a8 -o out/
    lowbit eval minilm --recipe w8a8 --recipe w8a8-dynamic
    lowbit passes
    lowbit zoo
"""

from __future__ import annotations

import argparse
import sys
import time

from lowbit.errors import LowbitError


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_records(records) -> str:
    rows = [("#", "pass", "time", "nodes", "params", "drift")]
    for i, r in enumerate(records):
        drift = "-" if r.drift is None else f"{r.drift:.1e}"
        time_s = "-" if i == 0 else f"{r.seconds * 1000:.1f} ms"
        rows.append((str(i), r.name + ("" if r.changed or i == 0 else " (no change)"), time_s,
                     str(r.nodes), _bytes(r.param_bytes), drift))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[c].rjust(widths[c]) if c in (0, 2, 3, 4, 5) else row[c].ljust(widths[c])
                 for c in range(len(row))]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from lowbit.api import build
    from lowbit.zoo import load_model

    spec = load_model(args.model)
    print(f"tracing {args.model} ({spec.description or type(spec.model).__name__}) ...", file=sys.stderr)
    start = time.perf_counter()
    calibration = None
    if args.recipe:
        calibration, where = _calibration(args, spec)
        print(f"recipe {args.recipe}, calibration: {where}", file=sys.stderr)
    report = None
    if args.report:
        from lowbit.evaluate import report_quality
        from lowbit.report import Report

        report = Report(report_quality(args.model))
    traced, records = build(spec.model, spec.example_inputs, pipeline=args.pipeline, recipe=args.recipe,
                            calibration=calibration, kwargs=spec.kwargs or None,
                            dynamic_shapes=spec.dynamic_shapes, dump_dir=args.dump_dir,
                            measure_drift=not args.no_drift, observer=report and report.observer)
    print(format_records(records))
    for note in traced.notes:
        print(f"note: {note}")
    if report is not None:
        title = f"{args.model}" + (f" · {args.recipe}" if args.recipe else "") + (f" · {args.pipeline}" if args.pipeline else "")
        folder = report.write(args.report, title, traced.notes)
        print(f"report: {folder}/index.html")
    print(f"\n{len(records) - 1} passes in {time.perf_counter() - start:.1f} s (tracing included)")
    if args.dump_dir:
        print(f"graphs after each pass: {args.dump_dir}/NN-<pass>.ir")
    if args.why_not:
        _why_not(traced.graph, args.why_not, args.where)
    return 0


def _why_not(graph, rule_name: str, where: str | None) -> None:
    from lowbit.passes import canonicalize, lower
    from lowbit.passes.rewriter import why_not

    RULES = {**canonicalize.RULES, **{r.name: r for r in (lower.QLINEAR, lower.DYNAMIC_QLINEAR,
                                                          lower.STATIC_QLINEAR, lower.HADAMARD_QLINEAR)}}
    if rule_name not in RULES:
        raise LowbitError(f"unknown rule {rule_name!r}; rules: {', '.join(sorted(RULES))}")
    misses = why_not(graph, RULES[rule_name], where)
    print(f"\n{rule_name}: {len(misses)} candidate node(s) did not match")
    for m in misses:
        loc = m.node.loc.module or "<no module>"
        print(f"  %{m.node.results[0].name} ({m.node.op}) at {loc}: {m.reason}")


def _export(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    import lowbit
    from lowbit.backends.onnx import compare_with_torch, export_onnx, fusion_report
    from lowbit.backends.onnx.validate import check
    from lowbit.saving import META as SAVED_META
    from lowbit.zoo import load_model

    if args.output is None and args.save is None:
        raise SystemExit("lowbit export: give -o/--output (ONNX), --save (a lowbit save), or both")
    saved = (Path(args.model) / SAVED_META).is_file()
    if saved:  # a saved model: no tracing, no calibration
        if args.recipe or args.pipeline or args.kv_cache or args.calibration or args.genai or args.dtype != "float32":
            raise SystemExit(f"lowbit export: {args.model} is a saved lowbit model, already compiled: "
                             "--recipe, --pipeline, --kv-cache, --calibration, --dtype and --genai do not apply")
        compiled = lowbit.load(args.model)
    else:
        import torch

        from lowbit.frontend.weights import is_weightless

        # a transformers folder is compiled without loading it: its weights are read when used
        spec = load_model(args.model, lazy=True, dtype=torch.float16 if args.dtype == "float16" else torch.float32)
        calibration, where = _calibration(args, spec)
        model, example, kwargs = spec.model, spec.example_inputs, spec.kwargs
        if args.dtype == "float16":  # traced in half precision, so the ONNX model computes in it
            model, example, kwargs = model if is_weightless(model) else model.half(), _half(example), _half(kwargs)
            calibration = [_half(batch) for batch in calibration] if calibration is not None else None
        print(f"compiling {args.model} with {args.recipe or 'no recipe'} (calibration: {where}) ...",
              file=sys.stderr)
        compiled = lowbit.compile(model, example, kwargs=kwargs or None, dynamic_shapes=spec.dynamic_shapes,
                                  recipe=args.recipe, pipeline=args.pipeline, calibration=calibration,
                                  kv_cache=args.kv_cache, kv_storage="float" if args.genai else "quantized",
                                  cache=False if args.sparse_attention == "contrib" else None,  # the op keeps its own
                                  work_dir=args.work_dir)
        for note in compiled.traced.notes:
            print(f"note: {note}")
    if args.save is not None:
        print(f"saved {compiled.save(args.save)} (lowbit.load reads it back)")
    if args.output is None:
        return 0
    if args.format == "compressed-tensors":
        return _export_compressed_tensors(args, None if saved else spec, compiled)
    if args.genai:
        return _export_genai(args, spec, compiled)
    out = Path(args.output) / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path, weights = export_onnx(compiled.traced, out, args.opset, not args.no_attention_op, args.hadamard,
                                    args.sparse_attention)
    for w in caught:
        if issubclass(w.category, UserWarning) and "lowbit" in w.filename:
            print(f"note: {w.message}")
    check(path)
    print(f"wrote {path} ({sum(f.stat().st_size for f in path.parent.glob(path.name + '*')) / 2**20:.1f} MB); "
          "ONNX checker (full): passed")
    inputs = compiled.traced.export_leaves()
    diff = compare_with_torch(path, compiled, inputs)
    print(f"ONNX Runtime vs lowbit torch backend on the example inputs: max |diff| {diff['max_abs']:.2e}, "
          f"cosine {diff['cosine']:.6f}")
    if weights.layers:
        print(fusion_report(path, weights.layers).text())
    return 0


def _export_compressed_tensors(args: argparse.Namespace, spec, compiled) -> int:
    """Write the compressed-tensors folder, then load it with transformers (when
    compressed-tensors is installed) and compare its logits with lowbit's torch backend."""
    from pathlib import Path

    from lowbit.backends.compressed_tensors import compare_with_transformers

    source = Path(args.model) if Path(args.model).is_dir() else None
    out = compiled.save_pretrained(args.output, tokenizer=spec.tokenizer if spec is not None and source is None
                                   else None, source_dir=source)
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    try:
        diff = compare_with_transformers(out, compiled)
    except ImportError:
        print("compressed-tensors is not installed: pip install compressed-tensors to check the folder")
        return 0
    print(f"transformers vs lowbit torch backend on the example inputs: max |diff| {diff['max_abs']:.2e}, "
          f"relative {diff['relative']:.2e}")
    return 0


def _export_genai(args: argparse.Namespace, spec, compiled) -> int:
    """Write the GenAI folder, then generate 16 tokens with ONNX Runtime GenAI (when installed)
    and with lowbit's torch backend, and say whether they agree."""
    from pathlib import Path

    from lowbit.backends.onnx.genai import export_genai, genai_generate

    source = Path(args.model) if Path(args.model).is_dir() else None
    out = export_genai(compiled.traced, args.output, tokenizer=spec.tokenizer if source is None else None,
                       source_dir=source, hadamard=args.hadamard)
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir() if not f.name.startswith('.')))})")
    ids, mask = compiled.traced.example_leaves()[:2]
    prompt = ids[:1, mask[0].bool()]  # GenAI masks pad tokens itself: give it none
    try:
        theirs = genai_generate(out, prompt, 16)
    except ImportError:
        print("onnxruntime-genai is not installed: pip install onnxruntime-genai to check the folder")
        return 0
    ours = compiled.generate(prompt, max_new_tokens=16)[0, prompt.shape[1]:].tolist()
    same = sum(1 for _ in __import__("itertools").takewhile(lambda p: p[0] == p[1], zip(ours, theirs)))
    print(f"ONNX Runtime GenAI vs lowbit torch backend, 16 greedy tokens: {same} agree"
          + ("" if same == len(ours) else f" (then {theirs[same:same + 4]} vs {ours[same:same + 4]})"))
    return 0


def _calibration(args: argparse.Namespace, spec) -> tuple[list, str]:
    """``--calibration FILE`` tokenized with the model's tokenizer, else the zoo model's own set."""
    if getattr(args, "calibration", None):
        from lowbit.zoo import text_calibration

        batches = text_calibration(spec, args.calibration, samples=args.samples, max_length=args.max_length,
                                   batch_size=args.batch_size)
        lines = sum(len(next(iter(b.values()))) for b in batches)
        return batches, f"{lines} lines of {args.calibration} (at most {args.max_length} tokens each)"
    from lowbit.evaluate import default_calibration

    return default_calibration(args.model, spec)


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration text, one sample per line, tokenized with the model folder's tokenizer "
                        "(default: the zoo model's shipped set, else its example inputs)")
    p.add_argument("--samples", type=int, default=128, help="with --calibration: at most this many lines")
    p.add_argument("--max-length", type=int, default=512, help="with --calibration: tokens per sample at most")
    p.add_argument("--batch-size", type=int, default=8, help="with --calibration: samples per batch")


def _half(tree):
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.half() if hasattr(t, "is_floating_point") and t.is_floating_point() else t, tree)


def _eval(args: argparse.Namespace) -> int:
    from lowbit.evaluate import quality_table

    rows = quality_table(args.model, args.recipe, batch_size=args.batch_size)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1e-2:  # a KL divergence near fp32
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _passes(args: argparse.Namespace) -> int:
    from lowbit.passes import ALIASES, PASSES

    for name in sorted(PASSES):
        cls = PASSES[name]
        kind = "lossless" if cls.lossless else "lossy"
        print(f"{name:34s} {kind:8s} {cls.summary}")
    for name, expansion in sorted(ALIASES.items()):
        print(f"{name:34s} {'alias':8s} = {expansion}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from lowbit.zoo import ZOO

    for name, factory in ZOO.items():
        print(f"{name:12s} {(factory.__doc__ or '').strip().splitlines()[0] if factory.__doc__ else ''}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="A compiler for cheap inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="trace a model, run a pipeline, show what each pass did")
    p.add_argument("model", help="zoo name, file.py:factory, package.module:factory, or a transformers dir")
    p.add_argument("--recipe", help="built-in recipe name or a .yaml/.toml file, run after canonicalize")
    p.add_argument("--pipeline", help="passes to run after canonicalize (and the recipe), e.g. 'fold-constants'")
    p.add_argument("--report", metavar="DIR", help="write a browsable HTML report of every pass here")
    p.add_argument("--dump-dir", help="write the printed graph after each pass here")
    p.add_argument("--no-drift", action="store_true", help="skip running the graph after each pass")
    p.add_argument("--why-not", metavar="RULE", help="explain where a pattern rule did not match")
    p.add_argument("--where", metavar="MODULE", help="with --why-not: only nodes under this module path")
    _add_calibration_options(p)
    p.set_defaults(fn=_inspect)
    x = sub.add_parser("export", help="compile a model and write ONNX that ONNX Runtime runs fast")
    x.add_argument("model", help="zoo name, file.py:factory, package.module:factory, a transformers dir, "
                   "or a folder written by --save (exported without compiling again)")
    x.add_argument("--recipe", help="built-in recipe name or a .yaml/.toml file (default: fp32)")
    x.add_argument("-o", "--output", help="output folder (model.onnx is written there)")
    x.add_argument("--save", metavar="DIR", help="also save the compiled model here (lowbit.load reads it)")
    x.add_argument("--work-dir", metavar="DIR", help="GPTQ saves its state here after each block; a run "
                   "interrupted later resumes from the last finished block (docs/scale.md)")
    x.add_argument("--format", choices=["onnx", "compressed-tensors"], default="onnx",
                   help="what -o holds: ONNX (model.onnx), or a compressed-tensors checkpoint that "
                        "transformers, vLLM and SGLang load (causal LMs)")
    x.add_argument("--pipeline", help="passes to run after the recipe, e.g. 'sparse-attention{causal=true}'")
    x.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="precision the model is traced and exported in (SparseAttention on CUDA needs float16)")
    x.add_argument("--opset", type=int, help="ONNX opset (default: the lowest that holds the model's "
                   "types: 18; 19 with float8; 21 with int4)")
    x.add_argument("--no-attention-op", action="store_true",
                   help="keep attention as standard ONNX ops instead of com.microsoft.MultiHeadAttention")
    x.add_argument("--hadamard", choices=["matmul", "staged"], default="matmul",
                   help="online Hadamard as two MatMuls with the small factors (default) or as "
                        "butterfly stages of reshape/add/sub")
    x.add_argument("--sparse-attention", choices=["dense", "contrib"], default="dense",
                   help="block-sparse attention as dense attention with the block mask (default, runs "
                        "anywhere) or as com.microsoft.SparseAttention (causal prompts; the model then "
                        "takes and returns key/value caches, see docs)")
    x.add_argument("--genai", action="store_true",
                   help="write a folder ONNX Runtime GenAI loads: the decoder with past_key_values/present, "
                        "genai_config.json and the tokenizer's files")
    x.add_argument("--kv-cache", choices=["int8", "fp8", "k8v4", "int4", "int4-rot"],
                   help="quantize the key/value cache of a causal LM (with --genai: held as the same values "
                        "in float, the cache GenAI holds)")
    _add_calibration_options(x)
    x.set_defaults(fn=_export)
    e = sub.add_parser("eval", help="quality of quantization recipes vs fp32")
    e.add_argument("model", help="minilm (cosine of mean-pooled sentence embeddings) or "
                                 "byte-llama, byte-llama-192, byte-moe (perplexity on held-out text, and the KL divergence "
                                 "from fp32's next-byte predictions)")
    e.add_argument("--recipe", action="append", required=True,
                   help="built-in recipe name or a .yaml/.toml file; repeat to compare")
    e.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    e.set_defaults(fn=_eval)
    sub.add_parser("passes", help="list the registered passes").set_defaults(fn=_passes)
    sub.add_parser("zoo", help="list the built-in models").set_defaults(fn=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
