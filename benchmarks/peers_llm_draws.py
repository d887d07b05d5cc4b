"""How much of the perplexity gap between lowbit and the peers in ``benchmarks/peers_llm.py``
is the calibration windows' luck: the same comparison repeated over several draws of calibration
windows, each cut from a different byte offset of ``byte_llama_calib.txt`` (the same text, the
same amount of it, different 256-byte windows), with the mean and spread per method.

    python benchmarks/peers_llm_draws.py \\
        --methods w4a16-gptq,w4a16-awq-gptq,w4a8,w4a8-rot,GPTQ,SpinQuant+GPTQ,"Hadamard rotation+GPTQ"
    python benchmarks/peers_llm_draws.py --models byte_llama --out a.md &   # one model per core
    python benchmarks/peers_llm_draws.py --models byte_llama_192 --out b.md; wait
    python benchmarks/peers_llm_draws.py --render a.json,b.json           # one report of both

Protocol and peer environments are ``peers_llm.py``'s (its runners, venvs and evaluation windows;
draw 0, offset 0, is that script's calibration set). Per model and configuration the report
lists each method's perplexity in every draw, their mean and standard deviation, and the mean
KL from fp32; then lowbit's best method by mean against the best peer method by mean, with the
per-draw difference between the two (paired: both calibrated on the same windows) and whether
its mean is beyond two standard errors of zero. Output: ``--out`` (default
``benchmarks/results/peers_llm_draws.md``) and the same name ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from peers_llm import (CONFIGS, DATA, DEFAULT_VENVS, PEER_TOOLS, ROOT, SHORT, TOOLS, describe, git_state,
                       run_tool, venv_python)

DEFAULT_OFFSETS = "0,51,102,153,204"


def run(args) -> dict:
    tools = [t for t in args.tools.split(",") if t]
    configs = [c for c in args.configs.split(",") if c]
    methods = [m for m in args.methods.split(",") if m] or None
    offsets = [int(o) for o in args.offsets.split(",") if o]
    for name, given, allowed in (("tool", tools, TOOLS), ("configuration", configs, CONFIGS)):
        bad = [x for x in given if x not in allowed]
        if bad:
            sys.exit(f"unknown {name}(s) {bad}; choose from {', '.join(allowed)}")
    venv_dir = Path(args.venv_dir).expanduser()
    missing = [t for t in tools if t in PEER_TOOLS and not venv_python(venv_dir / t).exists()]
    if missing:
        sys.exit(f"no venv for {missing} under {venv_dir}: run benchmarks/peers_llm.py once to create them")
    (venv_dir / "logs").mkdir(parents=True, exist_ok=True)
    models = {}
    for m in [m for m in args.models.split(",") if m]:
        model_dir = Path(m) if "/" in m else DATA / m
        result = {"description": describe(model_dir), "fp32": {}, "rows": []}
        models[model_dir.name] = result
        for offset in offsets:
            for tool in tools:
                print(f"[draws] {model_dir.name}: offset {offset}: {tool} ...", file=sys.stderr, flush=True)
                rows, info = run_tool(tool, model_dir, configs, venv_dir, args.timeout,
                                      calib_offset=offset, methods=methods)
                if info.get("error"):
                    print(f"[draws] {tool}: {info['error']}", file=sys.stderr, flush=True)
                for r in rows:
                    if r["config"] == "fp32":
                        result["fp32"][tool] = r["ppl"]
                    else:
                        result["rows"].append({**r, "tool": tool, "offset": offset})
    return {"meta": {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "argv": sys.argv[1:], "tools": tools, "configs": configs, "offsets": offsets,
                     "lowbit_source": git_state()},
            "models": models}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def section(name: str, result: dict, configs: list[str], offsets: list[int]) -> list[str]:
    fp32 = result["fp32"].get("lowbit") or next(iter(result["fp32"].values()), float("nan"))
    lines = [f"## {name}", "", result["description"], "", f"fp32 perplexity {fp32:.4f}.", "",
             "| configuration | tool | method | " + " | ".join(f"offset {o}" for o in offsets)
             + " | mean | sd | mean vs fp32 | mean KL (10⁻³) |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in offsets) + " | ---: | ---: | ---: | ---: |"]
    summary = []
    for config in configs:
        methods: dict[tuple[str, str], dict[int, dict]] = {}
        for r in result["rows"]:
            if r["config"] == config:
                methods.setdefault((r["tool"], r["method"]), {})[r["offset"]] = r
        means = {}
        for (tool, method), by_offset in methods.items():
            cells = []
            for o in offsets:
                r = by_offset.get(o)
                cells.append(f"{r['ppl']:.4f}" if r and "ppl" in r else
                             "n/a" if r and "na" in r else "error" if r else "—")
            ppls = [by_offset[o]["ppl"] for o in offsets if "ppl" in by_offset.get(o, {})]
            kls = [by_offset[o]["kl"] for o in offsets if by_offset.get(o, {}).get("kl") is not None]
            mean, sd = spread(ppls) if ppls else (float("nan"), float("nan"))
            if len(ppls) == len(offsets):
                means[(tool, method)] = mean
            kl = f"{1e3 * statistics.fmean(kls):.3f}" if kls else ""
            stats = (f"{mean:.4f} | {sd:.4f} | {100 * (mean / fp32 - 1):+.2f}% | {kl}" if ppls
                     else " | | | ")
            lines.append(f"| {SHORT[config]} | {tool} | {method} | " + " | ".join(cells) + f" | {stats} |")
        ours = {k: v for k, v in means.items() if k[0] == "lowbit"}
        theirs = {k: v for k, v in means.items() if k[0] != "lowbit"}
        head = f"- **{SHORT[config]}**: "
        if not ours or not theirs:
            summary.append(head + "needs a lowbit method and a peer method with a result in every draw.")
            continue
        lb, pb = min(ours, key=ours.get), min(theirs, key=theirs.get)
        diffs = [100 * (methods[lb][o]["ppl"] / methods[pb][o]["ppl"] - 1) for o in offsets]
        d, sd = spread(diffs)
        se = sd / math.sqrt(len(diffs))
        wins = sum(x < 0 for x in diffs)
        verdict = ("lowbit better" if d < -2 * se else "lowbit worse" if d > 2 * se
                   else "no difference beyond 2 standard errors")
        summary.append(head + f"lowbit {lb[1]} mean {ours[lb]:.4f} vs {pb[0]} {pb[1]} mean {theirs[pb]:.4f}; "
                       f"paired difference {d:+.3f}% ± {se:.3f}% (standard error over {len(diffs)} draws), "
                       f"lowbit lower in {wins} of {len(diffs)} draws: **{verdict}**.")
    return lines + ["", "lowbit's best method by mean vs the best peer method by mean:", ""] + summary + [""]


def render(saved: list[dict]) -> str:
    """One report of several runs: a model's rows from every run that has it (each run its own
    draws, e.g. one model per core, or more offsets later), draws in offset order."""
    models: dict[str, dict] = {}
    for run_ in saved:
        for name, result in run_["models"].items():
            into = models.setdefault(name, {"description": result["description"], "fp32": {}, "rows": []})
            into["fp32"].update(result["fp32"])
            into["rows"] += result["rows"]
    configs = [c for c in CONFIGS if any(c in s["meta"]["configs"] for s in saved)]
    out = ["# lowbit vs peers over draws of calibration windows", "",
           "Calibration draws: the 256-byte windows of `byte_llama_calib.txt` cut from byte offsets as "
           "listed (offset 0 is `peers_llm.py`'s set); evaluation as in `peers_llm.py` (every window of "
           "`byte_llama_val.txt`). Generated by:", ""]
    out += [f"- `{' '.join(['python benchmarks/peers_llm_draws.py', *s['meta']['argv']])}` "
            f"({s['meta']['generated']}, lowbit at {s['meta']['lowbit_source']})" for s in saved]
    out.append("")
    for name, result in models.items():
        offsets = sorted({r["offset"] for r in result["rows"]})
        out += section(name, result, configs, offsets)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="byte_llama,byte_llama_192")
    ap.add_argument("--tools", default="lowbit,llm-compressor,brevitas", help=f"subset of {','.join(TOOLS)}")
    ap.add_argument("--configs", default="w4a16,w4a8", help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--methods", default="", help="comma-separated lowbit recipe and peer method names "
                    "(as in peers_llm.py's table); default: all of each configuration")
    ap.add_argument("--offsets", default=DEFAULT_OFFSETS, help="byte offsets of the calibration draws")
    ap.add_argument("--venv-dir", default=str(DEFAULT_VENVS), help="the peer venvs peers_llm.py created")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per peer runner, model and draw")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers_llm_draws.md"))
    ap.add_argument("--render", metavar="JSON[,JSON]", help="only write the report (to --out) from JSONs "
                    "this script wrote, one per model group")
    args = ap.parse_args()
    if args.render:
        saved = [json.loads(Path(p).read_text()) for p in args.render.split(",") if p]
    else:
        saved = [run(args)]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(saved[0], indent=1))
    text = render(saved)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
