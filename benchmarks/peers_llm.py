"""Perplexity of lowbit against peer quantization tools, side by side, on the byte-level Llamas the
package ships (``lowbit/data/byte_llama``, ``lowbit/data/byte_llama_192``).

    python benchmarks/peers_llm.py                      # all models, tools, configurations
    python benchmarks/peers_llm.py --quick              # smoke run: 16 eval / 32 calibration windows
    python benchmarks/peers_llm.py --tools lowbit,llm-compressor --configs w4a16,w4a4-token-rot
    python benchmarks/peers_llm.py --skip-install       # reuse the peer venvs as they are
    python benchmarks/peers_llm.py --render benchmarks/results/peers_llm.json   # redo the markdown
    python benchmarks/peers_llm.py --tools lowbit --merge benchmarks/results/peers_llm.json  # lowbit again

Each peer runs in its own virtual environment (``--venv-dir``, default ``~/.cache/lowbit/peers``),
created on first use: ``pip install torch==2.13.0`` first (the small CPU build), then the peer with
a constraint file pinning that torch, so the peer cannot replace it; peers bring the transformers
version they pin. The peer's runner, ``benchmarks/peers/run_<tool>.py``, is started with the venv's
python and prints one JSON line per (configuration, method); a failed method or a crashed runner
becomes an ``error: ...`` cell, never a crash of this script. lowbit runs in this process.

Protocol, identical for every tool (``benchmarks/peers/_common.py`` is a copy of
``lowbit.evaluate.byte_windows``/``perplexity``, so no peer venv imports lowbit): the text files'
bytes cut into non-overlapping 256-byte windows (remainder dropped), token id == byte value;
calibration = the windows of ``byte_llama_calib.txt``; perplexity = exp(mean next-token
cross-entropy over every window of ``byte_llama_val.txt``, tokens 1..255 predicted from the ones
before, no cache). lm_head and the embeddings stay float in every tool. Every environment prints
its own fp32 perplexity; they must agree to 1e-4 relative (the report says whether they do).

Output (``--out``, default ``benchmarks/results/peers_llm.md``, plus the same name ``.json``): per
model one table, rows = configuration x tool/method, columns:

    perplexity   exp(mean next-byte cross-entropy) on the held-out windows (lower is better)
    vs fp32      perplexity change against the same environment's fp32 model, in percent
    KL           mean KL divergence from that fp32 model's next-byte distribution, per predicted
                 byte (10^-3 nats): how far quantization moved the predictions. Perplexity also
                 rewards a lucky perturbation (rows land below fp32), and among methods within
                 0.1% of fp32 its order is noise; the KL is the steadier measure of fidelity
    time         seconds to quantize (calibrate, run the algorithm) and evaluate that row

"lowbit best" is the best of the lowbit recipes listed for a configuration; under each table, one
line per configuration compares it with the best peer, by perplexity and by KL. ``n/a`` cells
carry a footnote saying why the tool cannot express the configuration; ``error`` cells carry the
exception's first line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
DATA = ROOT / "lowbit" / "data"
CALIB, VAL = DATA / "byte_llama_calib.txt", DATA / "byte_llama_val.txt"

# configuration -> lowbit recipes run for it (built-in names or recipe files); edit freely
LOWBIT_RECIPES: dict[str, list[str]] = {
    "w4a16": ["w4a16", "w4a16-gptq", "w4a16-awq-gptq", "w4a16-rtn"],
    "w8a8-static": ["w8a8-static", "w8a8-gptq"],
    "w4a8": ["w4a8", "w4a8-rot"],
    "w4a4-token": ["w4a4"],
    "w4a4-token-rot": ["w4a4-rot"],
    "w4a4-static": [str(PEERS / "w4a4-static.yaml")],
    "w4a4-static-rot": [str(PEERS / "w4a4-static-rot.yaml")],
}

SHORT = {"w4a16": "w4a16", "w8a8-static": "w8a8 static", "w4a8": "w4a8", "w4a4-token": "w4a4 per-token",
         "w4a4-token-rot": "w4a4 per-token + rot", "w4a4-static": "w4a4 static",
         "w4a4-static-rot": "w4a4 static + rot"}
CONFIGS: dict[str, str] = {  # the table's row groups, in order
    "w4a16": "w4a16: int4 weights (group 128), float activations",
    "w8a8-static": "w8a8 static: int8 per-channel weights, int8 per-tensor static activations",
    "w4a8": "w4a8: int4 weights (group 128), int8 per-token dynamic activations",
    "w4a4-token": "w4a4 per-token: int4 per-channel weights, int4 per-token dynamic activations",
    "w4a4-token-rot": "w4a4 per-token + rotation (Hadamard, QuaRot/SpinQuant style)",
    "w4a4-static": "w4a4 static: int4 per-channel weights, int4 per-tensor static activations",
    "w4a4-static-rot": "w4a4 static + rotation (Hadamard, QuaRot/SpinQuant style)",
}

TORCH = "torch==2.13.0"
# tool -> what its venv installs after torch (with torch pinned); lowbit runs in this process
PEER_TOOLS: dict[str, list[str]] = {
    "llm-compressor": ["llmcompressor"],
    "brevitas": ["brevitas[llm,hadamard]"],
    "onnxruntime": ["onnxruntime", "onnx", "onnxscript", "transformers"],
}
TOOLS = ["lowbit", *PEER_TOOLS]
RUNNERS = {"llm-compressor": "run_llmcompressor.py", "brevitas": "run_brevitas.py",
           "onnxruntime": "run_onnxruntime.py"}
FP32_TOLERANCE = 1e-4
DEFAULT_VENVS = Path.home() / ".cache" / "lowbit" / "peers"
QUICK_EVAL, QUICK_CALIB = 16, 32


# ---------------------------------------------------------------------------------------- venvs


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install(tool: str, venv: Path, log) -> float:
    """Create ``venv`` for ``tool`` unless it already holds this exact install; seconds spent."""
    spec = [TORCH, *PEER_TOOLS[tool]]
    marker = venv / ".lowbit-peer-install.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return 0.0
    start = time.time()
    base = getattr(sys, "_base_executable", sys.executable)
    run = lambda cmd: subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)  # noqa: E731
    log.write(f"$ {base} -m venv {venv}\n".encode())
    log.flush()
    run([base, "-m", "venv", "--clear", str(venv)])
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    run([*pip, TORCH])
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    run([*pip, "-c", str(constraints), *PEER_TOOLS[tool]])
    marker.write_text(json.dumps({"spec": spec}))
    return time.time() - start


def install_command(tool: str, venv: Path) -> str:
    v = str(venv).replace(str(Path.home()), "~", 1)
    pkgs = " ".join(f"'{p}'" if "[" in p else p for p in PEER_TOOLS[tool])
    return (f"python3.11 -m venv {v} && {v}/bin/pip install {TORCH} && "
            f"echo {TORCH} > {v}/constraints.txt && {v}/bin/pip install -c {v}/constraints.txt {pkgs}")


# ------------------------------------------------------------------------------------- runners


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300]


def run_peer(tool: str, venv: Path, model: Path, configs: list[str], quick: bool, log_path: Path,
             work: Path, timeout: float, calib_offset: int = 0,
             methods: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run the tool's runner in its venv; its JSON rows, and {seconds, versions, error}. With
    ``calib_offset`` the calibration windows are cut from that byte on; with ``methods`` only
    the methods of those names run."""
    cmd = [str(venv_python(venv)), str(PEERS / RUNNERS[tool]), "--model", str(model), "--calib", str(CALIB),
           "--val", str(VAL), "--configs", ",".join(configs), "--work-dir", str(work),
           "--calib-offset", str(calib_offset), "--methods", ",".join(methods or [])]
    if quick:
        cmd += ["--eval-windows", str(QUICK_EVAL), "--calib-windows", str(QUICK_CALIB)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.time()
    info: dict = {}
    rows: list[dict] = []
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, timeout=timeout, cwd=ROOT, env=env)
            out, rc = proc.stdout.decode(errors="replace"), proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode(errors="replace"), f"timeout after {timeout:.0f}s"
    for line in out.splitlines():
        at = line.find('{"row"')  # a library's progress bar may share the line
        if at >= 0:
            try:
                row = json.loads(line[at:])
            except ValueError:
                continue
            if row.get("info"):
                info["versions"] = row.get("versions", {})
            else:
                rows.append(row)
    info["seconds"] = time.time() - start
    if rc != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        info["error"] = one_line(f"runner exited {rc}: {tail[-1] if tail else ''}")
    return rows, info


def calibration_windows(offset: int = 0, batch_size: int = 16) -> list[tuple]:
    """The calibration windows the runners cut (``_common.windows`` from byte ``offset`` on), as
    lowbit's (ids,) batches."""
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))
    from _common import windows

    ids = windows(str(CALIB), None, offset)
    return [(ids[i:i + batch_size],) for i in range(0, len(ids), batch_size)]


def run_lowbit(model_dir: Path, configs: list[str], quick: bool, calib_offset: int = 0,
               methods: list[str] | None = None) -> tuple[list[dict], dict]:
    """lowbit in this process: lowbit.compile with each recipe of LOWBIT_RECIPES (only those
    named in ``methods``, when given), calibrated on the windows from ``calib_offset`` on."""
    import torch

    torch.set_num_threads(1)
    import transformers

    import lowbit
    from lowbit.evaluate import byte_windows, next_token_scores, reference_logprobs
    from lowbit.frontend import Dim

    start = time.time()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    val, calib = byte_windows("val"), calibration_windows(calib_offset)
    if quick:
        val = [(torch.cat([b[0] for b in val])[:QUICK_EVAL],)]
        calib = [(torch.cat([b[0] for b in calib])[:QUICK_CALIB],)]
    example = (torch.tensor(list(VAL.read_bytes()[:64]), dtype=torch.long).reshape(2, 32),)
    shapes = ({0: "batch", 1: Dim("seq", max=model.config.max_position_embeddings)},)
    reference = reference_logprobs(model, val)
    rows = [{"config": "fp32", "method": "fp32", "ppl": next_token_scores(model, val)["perplexity"]}]
    for config in configs:
        for recipe in LOWBIT_RECIPES.get(config, []):
            name = Path(recipe).stem if recipe.endswith((".yaml", ".toml")) else recipe
            if methods and name not in methods:
                continue
            t0 = time.time()
            try:
                q = lowbit.compile(model, example, dynamic_shapes=shapes, recipe=recipe,
                                   calibration=calib, progress=False)
                scores = next_token_scores(q, val, reference)
                ppl = scores["perplexity"]
                if not math.isfinite(ppl):
                    raise RuntimeError(f"perplexity is {ppl}")
                rows.append({"config": config, "method": name, "ppl": ppl, "kl": scores["kl"],
                             "seconds": time.time() - t0})
            except Exception as e:  # noqa: BLE001 -- a failed recipe is a cell, not a crash
                rows.append({"config": config, "method": name, "seconds": time.time() - t0,
                             "error": one_line(f"{type(e).__name__}: {e}".splitlines()[0])})
    info = {"seconds": time.time() - start,
            "versions": {"lowbit": getattr(lowbit, "__version__", "?"), "torch": torch.__version__,
                         "transformers": transformers.__version__}}
    return rows, info


def run_tool(tool: str, model_dir: Path, configs: list[str], venv_dir: Path, timeout: float, quick: bool = False,
             calib_offset: int = 0, methods: list[str] | None = None) -> tuple[list[dict], dict]:
    """``tool``'s rows on one model: lowbit in this process, a peer in its venv (scratch files and
    log named after the model, the tool and the calibration offset)."""
    if tool == "lowbit":
        return run_lowbit(model_dir, configs, quick, calib_offset, methods)
    tag = f"{model_dir.name}-{tool}" + (f"-draw{calib_offset}" if calib_offset else "")
    work = venv_dir / "work" / tag
    work.mkdir(parents=True, exist_ok=True)
    return run_peer(tool, venv_dir / tool, model_dir, configs, quick, venv_dir / "logs" / f"{tag}.log", work,
                    timeout, calib_offset, methods)


# -------------------------------------------------------------------------------------- report


def pct(ppl: float, ref: float) -> str:
    return f"{100 * (ppl / ref - 1):+.2f}%"


class Footnotes:
    def __init__(self):
        self.notes: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"


def model_section(name: str, result: dict, tools: list[str], configs: list[str]) -> str:
    fp32 = result["fp32"]
    ref = fp32.get("lowbit") or next(iter(fp32.values()), None)
    lines = [f"## {name}", "", result["description"], ""]
    if result.get("skipped"):
        return "\n".join(lines + [f"Not run: {result['skipped']}", ""])
    sanity = ", ".join(f"{t} {v:.6f}" for t, v in fp32.items())
    spread = max(abs(v / ref - 1) for v in fp32.values()) if ref else float("nan")
    verdict = "agree" if spread <= FP32_TOLERANCE else "DISAGREE"
    lines += [f"fp32 perplexity per environment (sanity): {sanity} — {verdict} "
              f"(max relative difference {spread:.1e}, tolerance {FP32_TOLERANCE:.0e}).", ""]
    notes = Footnotes()
    lines += ["| configuration | tool | method | perplexity | vs fp32 | KL from fp32 (10⁻³) | time |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |",
              f"| fp32 | — | — | {ref:.4f} | +0.00% | | |"]
    summary = []
    for config in configs:
        rows = [r for r in result["rows"] if r["config"] == config]
        best, closest = {}, {}  # per tool: the lowest perplexity, the lowest KL from fp32
        for tool in tools:
            tool_rows = [r for r in rows if r["tool"] == tool]
            if not tool_rows:
                continue
            for r in tool_rows:
                own = fp32.get(tool, ref)
                if "ppl" in r:
                    kl = f"{1e3 * r['kl']:.3f}" if r.get("kl") is not None else ""
                    cells = f"{r['ppl']:.4f} | {pct(r['ppl'], own)} | {kl}"
                    if tool not in best or r["ppl"] < best[tool]["ppl"]:
                        best[tool] = r
                    if r.get("kl") is not None and (tool not in closest or r["kl"] < closest[tool]["kl"]):
                        closest[tool] = r
                elif "na" in r:
                    cells = f"n/a {notes.mark(r['tool'] + ': ' + r['na'])} | | "
                else:
                    cells = f"error: {r['error'].replace('|', '/')} | | "
                secs = f"{r['seconds']:.0f} s" if r.get("seconds") else ""
                method = r["method"] + (f" {notes.mark(r['note'])}" if r.get("note") else "")
                lines.append(f"| {SHORT[config]} | {tool} | {method} | {cells} | {secs} |")
            if tool == "lowbit" and "lowbit" in best:
                b = best["lowbit"]
                kl = f"{1e3 * b['kl']:.3f}" if b.get("kl") is not None else ""
                lines.append(f"| {SHORT[config]} | **lowbit best** | {b['method']} | "
                             f"**{b['ppl']:.4f}** | **{pct(b['ppl'], fp32.get('lowbit', ref))}** | {kl} | |")
        peers = [best[t] for t in best if t != "lowbit"]
        head = f"- **{CONFIGS[config]}**: "
        if "lowbit" not in best:
            summary.append(head + "lowbit has no result.")
        elif not peers:
            summary.append(head + f"lowbit best {best['lowbit']['method']} {best['lowbit']['ppl']:.4f}; "
                           "no peer result to compare.")
        else:
            lb, pb = best["lowbit"], min(peers, key=lambda r: r["ppl"])
            d = 100 * (lb["ppl"] / pb["ppl"] - 1)
            word = "better" if d < 0 else "worse" if d > 0 else "equal"
            line = (f"lowbit best {lb['method']} {lb['ppl']:.4f} vs best peer "
                    f"{pb['tool']} {pb['method']} {pb['ppl']:.4f}: lowbit {abs(d):.2f}% {word}.")
            near = [closest[t] for t in closest if t != "lowbit"]
            if "lowbit" in closest and near:
                lk, pk = closest["lowbit"], min(near, key=lambda r: r["kl"])
                k = 100 * (lk["kl"] / pk["kl"] - 1)
                line += (f" KL from fp32: lowbit {lk['method']} {1e3 * lk['kl']:.3f}e-3 vs {pk['tool']} "
                         f"{pk['method']} {1e3 * pk['kl']:.3f}e-3, lowbit {abs(k):.0f}% "
                         f"{'lower' if k < 0 else 'higher'}.")
            summary.append(head + line)
    lines += ["", "lowbit best vs best peer:", ""] + summary
    if notes.notes:
        lines += ["", "Notes:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes.notes)]
    tinfo = result["tools"]
    lines += ["", "| tool | versions | run time | venv install |", "| --- | --- | ---: | ---: |"]
    for tool in tools:
        if tool in tinfo:
            i = tinfo[tool]
            vers = ", ".join(f"{k} {v}" for k, v in i.get("versions", {}).items())
            err = f" (error: {i['error']})" if i.get("error") else ""
            inst = (f"{i['install_seconds']:.0f} s" if i.get("install_seconds")
                    else "in process" if tool == "lowbit" else "already there")
            lines.append(f"| {tool} | {vers}{err} | {i['seconds']:.0f} s | {inst} |")
    return "\n".join(lines + [""])


def describe(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return str(model_dir)
    return (f"`{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}`: Llama, "
            f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, FFN {cfg['intermediate_size']}, "
            f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads, vocab "
            f"{cfg['vocab_size']} (bytes).")


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="byte_llama,byte_llama_192",
                    help="comma-separated: names under lowbit/data/ or model directories")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--venv-dir", default=str(DEFAULT_VENVS), help="where the peer venvs live")
    ap.add_argument("--skip-install", action="store_true", help="use the peer venvs as they are")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK_EVAL} eval windows, {QUICK_CALIB} calibration windows")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per peer runner and model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers_llm.md"))
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown (to --out) from a "
                    "JSON this script wrote (after editing the report's layout)")
    ap.add_argument("--merge", metavar="JSON", help="start from a JSON this script wrote: the tools "
                    "run now replace their rows there, the other tools' rows are kept (e.g. rerun "
                    "lowbit after changing a recipe: --tools lowbit --merge old.json)")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        return write(saved["meta"], saved["models"], Path(args.out))

    tools = [t for t in args.tools.split(",") if t]
    configs = [c for c in args.configs.split(",") if c]
    for name, allowed in (("tool", TOOLS), ("configuration", CONFIGS)):
        bad = [x for x in (tools if name == "tool" else configs) if x not in allowed]
        if bad:
            sys.exit(f"unknown {name}(s) {bad}; choose from {', '.join(allowed)}")
    venv_dir = Path(args.venv_dir).expanduser()
    logs = venv_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    install_seconds: dict[str, float] = {}
    install_errors: dict[str, str] = {}
    for tool in tools:
        if tool == "lowbit":
            continue
        venv = venv_dir / tool
        if args.skip_install:
            if not venv_python(venv).exists():
                install_errors[tool] = f"no venv at {venv} (run without --skip-install)"
            continue
        print(f"[peers] installing {tool} into {venv} ...", file=sys.stderr, flush=True)
        with open(logs / f"install-{tool}.log", "ab") as log:
            try:
                install_seconds[tool] = install(tool, venv, log)
            except subprocess.CalledProcessError as e:
                install_errors[tool] = f"install failed ({' '.join(map(str, e.cmd[-3:]))}); see {log.name}"

    results: dict = {}
    for m in [m for m in args.models.split(",") if m]:
        model_dir = Path(m) if "/" in m else DATA / m
        name = model_dir.name
        result = {"description": describe(model_dir), "fp32": {}, "rows": [], "tools": {}}
        results[name] = result
        if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
            result["skipped"] = f"no model at {model_dir}"
            print(f"[peers] {name}: {result['skipped']}", file=sys.stderr)
            continue
        for tool in tools:
            print(f"[peers] {name}: {tool} ...", file=sys.stderr, flush=True)
            if tool in install_errors:
                rows, info = [], {"seconds": 0.0, "error": install_errors[tool]}
            else:
                rows, info = run_tool(tool, model_dir, configs, venv_dir, args.timeout, quick=args.quick)
            if tool in install_seconds:
                info["install_seconds"] = install_seconds[tool]
            result["tools"][tool] = info
            for r in rows:
                r["tool"] = tool
                if r["config"] == "fp32":
                    if r["method"] == "fp32":
                        result["fp32"][tool] = r["ppl"]
                    else:  # e.g. the fp32 ONNX model under onnxruntime: one more sanity value
                        result["fp32"][f"{tool} ({r['method']})"] = r["ppl"]
                else:
                    result["rows"].append(r)
            seen = {r["config"] for r in rows}
            for config in configs:  # a runner that died before a configuration: say so in the cell
                if config not in seen and (tool != "lowbit" or LOWBIT_RECIPES.get(config)):
                    result["rows"].append({"tool": tool, "config": config, "method": "—",
                                           "error": info.get("error", "runner printed no result")})
            done = [r for r in rows if "ppl" in r and r["config"] != "fp32"]
            print(f"[peers] {name}: {tool} done in {info['seconds']:.0f} s, {len(done)} results"
                  + (f" ({info['error']})" if info.get("error") else ""), file=sys.stderr, flush=True)

    if args.merge:  # the table shows the saved run's tools and configurations as well
        saved = json.loads(Path(args.merge).read_text())
        results = merge(saved, results, tools, configs)
        old = saved.get("meta", {})
        tools = [t for t in TOOLS if t in {*old.get("tools", []), *tools}]
        configs = [c for c in CONFIGS if c in {*old.get("configs", []), *configs}]
    meta = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:], "quick": args.quick, "tools": tools, "configs": configs,
            "lowbit_recipes": {k: v for k, v in LOWBIT_RECIPES.items() if k in configs},
            "lowbit_source": git_state(),
            "venv_dir": str(venv_dir),
            "install": {t: install_command(t, venv_dir / t) for t in tools if t in PEER_TOOLS}}
    write(meta, results, Path(args.out))


def merge(saved: dict, fresh: dict, tools: list[str], configs: list[str]) -> dict:
    """``saved``'s models with the rows of ``tools`` in ``configs``, and those tools' fp32 values
    and entries, replaced by ``fresh``'s (models only in ``fresh`` are added)."""
    models = saved["models"]
    for name, result in fresh.items():
        old = models.setdefault(name, result)
        if old is result:
            continue
        old["rows"] = [r for r in old["rows"] if r["tool"] not in tools or r["config"] not in configs] + result["rows"]
        old["fp32"] = {k: v for k, v in old["fp32"].items() if k.split(" (")[0] not in tools} | result["fp32"]
        old["tools"] = {k: v for k, v in old["tools"].items() if k not in tools} | result["tools"]
    return models


def git_state() -> str:
    """The commit lowbit ran from, and whether lowbit/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowbit"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in lowbit/" if dirty else "")


def render(meta: dict, results: dict) -> str:
    quick = " — QUICK smoke run (not comparable numbers)" if meta["quick"] else ""
    tools, configs = meta.get("tools", TOOLS), meta.get("configs", list(CONFIGS))
    header = [f"# lowbit vs peer quantization tools: byte-level Llama perplexity{quick}", "",
              f"Generated {meta['generated']} by `{' '.join(['python benchmarks/peers_llm.py', *meta['argv']])}`"
              + (f" (lowbit at {meta['lowbit_source']})" if meta.get("lowbit_source") else "") + ". "
              "Evaluation: every 256-byte window of `byte_llama_val.txt` "
              f"({'first ' + str(QUICK_EVAL) + ' windows' if meta['quick'] else '256 windows, 65,280 predicted bytes'}); "
              "calibration: windows of `byte_llama_calib.txt`"
              f"{' (first ' + str(QUICK_CALIB) + ')' if meta['quick'] else ' (128)'}. "
              "lm_head and embeddings stay float everywhere; perplexity of each tool's own fake-quantized "
              "(or ONNX Runtime) model; time = quantize + evaluate, one thread.", ""]
    body = [model_section(n, r, tools, configs) for n, r in results.items()]
    venvs = Path(meta.get("venv_dir", DEFAULT_VENVS))
    install = ["## Peer environments", "", "Each created on first use by this script, equivalent to:", ""]
    install += [f"- {t}: `{install_command(t, venvs / t)}`" for t in tools if t in PEER_TOOLS]
    recipes = ["", "lowbit recipes per configuration: "
               + "; ".join(f"{SHORT[c]}: {', '.join(Path(r).name for r in rs)}"
                           for c, rs in meta.get("lowbit_recipes", {}).items()) + ".", ""]
    return "\n".join(header + body + install + recipes)


def write(meta: dict, results: dict, out: Path) -> None:
    text = render(meta, results)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    print(f"[peers] wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
