"""Quality of a compiled model against fp32.

MiniLM: cosine similarity of mean-pooled sentence embeddings on the evaluation sentences the
package ships (``lowbit/data/sentences_eval.txt``), calibrated on a disjoint set
(``sentences_calibration.txt``).

byte-llama, byte-llama-192, byte-moe: perplexity (per byte) on held-out Python source (``byte_llama_val.txt``, from
files the model was not trained on), calibrated on a disjoint slice of its training text
(``byte_llama_calib.txt``).

    q = lowbit.compile(model, example, recipe="w8a8", calibration=minilm_batches("calibration"))
    print(minilm_cosine(q, model))     # {'mean': 0.99.., 'min': 0.98..}
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
BYTE_LMS = ("byte-llama", "byte-llama-192", "byte-moe")  # the shipped byte-level LMs: same data, same metric


def sentences(split: str) -> list[str]:
    """``calibration`` or ``eval`` sentences (disjoint)."""
    path = DATA / f"sentences_{split}.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


def minilm_batches(split: str, batch_size: int = 32, max_length: int = 128) -> list[tuple]:
    """Tokenized (input_ids, attention_mask) batches, padded to each batch's longest sentence."""
    return _tokenized(sentences(split), batch_size, max_length)


def _tokenized(texts: list[str], batch_size: int, max_length: int) -> list[tuple]:
    from lowbit.zoo import minilm_tokenizer

    tok = minilm_tokenizer()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def minilm_passages(sentences_per_passage: int = 12, batch_size: int = 8, split: str = "eval") -> list[tuple]:
    """The ``split``'s sentences joined into passages of about 200 tokens (long enough for
    several attention blocks), tokenized as (input_ids, attention_mask) batches."""
    texts = sentences(split)
    passages = [" ".join(texts[i:i + sentences_per_passage]) for i in range(0, len(texts), sentences_per_passage)]
    return _tokenized(passages, batch_size, max_length=512)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def minilm_cosine(candidate: torch.nn.Module, reference: torch.nn.Module,
                  batches: list[tuple] | None = None) -> dict[str, float]:
    """Per-sentence cosine similarity of embeddings, candidate vs reference: mean and min."""
    batches = batches if batches is not None else minilm_batches("eval")
    cos = []
    with torch.no_grad():
        for ids, mask in batches:
            a = mean_pool(candidate(ids, mask).last_hidden_state, mask)
            b = mean_pool(reference(ids, mask).last_hidden_state, mask)
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    c = torch.cat(cos)
    return {"mean": c.mean().item(), "min": c.min().item(), "n": float(c.numel())}


def byte_windows(split: str, window: int = 256, batch_size: int = 16) -> list[tuple]:
    """Non-overlapping byte windows of ``byte_llama_<split>.txt`` as (ids,) batches."""
    data = (DATA / f"byte_llama_{split}.txt").read_bytes()
    n = len(data) // window
    ids = torch.tensor(list(data[: n * window]), dtype=torch.long).reshape(n, window)
    return [(ids[i:i + batch_size],) for i in range(0, n, batch_size)]


def perplexity(model: torch.nn.Module, batches: list[tuple] | None = None) -> float:
    """exp(mean next-byte cross-entropy) over the evaluation windows."""
    return next_token_scores(model, batches)["perplexity"]


def next_token_scores(model: torch.nn.Module, batches: list[tuple] | None = None,
                      reference: list[torch.Tensor] | None = None) -> dict:
    """Perplexity over the evaluation windows and, given the ``reference`` model's next-token
    log-probabilities on them (``reference_logprobs``), the mean KL divergence from the
    reference to this model per predicted token (nats). Perplexity also rewards a lucky
    perturbation (a quantized model can land below fp32); the KL only counts how far the
    predictions moved, so it separates methods whose perplexities differ by noise."""
    batches = batches if batches is not None else byte_windows("val")
    total, count, kl = 0.0, 0, 0.0
    with torch.no_grad():
        for i, (ids,) in enumerate(batches):
            logits = model(ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
            if reference is not None:
                ref = reference[i]
                kl += float((ref.exp() * (ref - torch.log_softmax(logits, -1))).sum())
    out = {"perplexity": float(torch.exp(torch.tensor(total / count)))}
    if reference is not None:
        out["kl"] = kl / count
    return out


def reference_logprobs(model: torch.nn.Module, batches: list[tuple]) -> list[torch.Tensor]:
    """The next-token log-probabilities of ``model`` on each batch (for ``next_token_scores``)."""
    with torch.no_grad():
        return [torch.log_softmax(model(ids).logits[:, :-1].float(), -1) for (ids,) in batches]


def quality_table(name: str, recipes: list[str], batch_size: int = 32, progress: bool = True) -> list[dict]:
    """Compile zoo model ``name`` with each recipe and measure quality vs fp32, one row each
    (minilm: embedding cosine; byte-llama: perplexity and KL divergence from fp32)."""
    import lowbit
    from lowbit.zoo import load_model

    if name not in ("minilm", *BYTE_LMS):
        from lowbit.errors import LowbitError

        raise LowbitError(f"no quality metric for {name!r}: lowbit eval knows minilm (embedding "
                          f"cosine vs fp32) and {', '.join(BYTE_LMS)} (perplexity on held-out text)")
    spec = load_model(name)
    if name == "minilm":
        calib, evals = minilm_batches("calibration", batch_size=batch_size), minilm_batches("eval")
        rows = [{"recipe": "fp32", "mean cos": 1.0, "min cos": 1.0}]
    else:
        calib, evals = byte_windows("calib", batch_size=batch_size), byte_windows("val")
        reference = reference_logprobs(spec.model, evals)
        r = next_token_scores(spec.model, evals, reference)
        rows = [{"recipe": "fp32", "perplexity": r["perplexity"], "vs fp32": "+0.00%", "KL to fp32": r["kl"]}]
    for recipe in recipes:
        q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                           recipe=recipe, calibration=calib, progress=progress)
        acts = "{}/{}".format(*activation_quantizers(q.graph))
        if name == "minilm":
            r = minilm_cosine(q, spec.model, evals)
            rows.append({"recipe": recipe, "mean cos": r["mean"], "min cos": r["min"], "static/dynamic acts": acts})
        else:
            r = next_token_scores(q, evals, reference)
            p = r["perplexity"]
            rows.append({"recipe": recipe, "perplexity": p, "vs fp32": f"{100 * (p / rows[0]['perplexity'] - 1):+.2f}%",
                         "KL to fp32": r["kl"], "static/dynamic acts": acts})
    return rows


def activation_quantizers(graph) -> tuple[int, int]:
    """How many activations a compiled graph quantizes statically and per token at run time (a
    dynamic quantization fused into its linear counts once per value it reads)."""
    static = sum(n.op == "quant.quantize" for n in graph.nodes)
    dynamic = {id(n.operand(0)) for n in graph.nodes if n.op == "quant.dynamic_linear"}
    return static, len(dynamic) + sum(n.op == "quant.dynamic_quantize" for n in graph.nodes)


def default_calibration(name: str, spec) -> tuple[list[tuple], str]:
    """The calibration set a CLI command uses for zoo model ``name``, and a description."""
    if name == "minilm":
        return minilm_batches("calibration"), "256 shipped calibration sentences"
    if name in BYTE_LMS:
        return byte_windows("calib"), "32 KB of the byte LMs' training text"
    example = dict(spec.kwargs) if spec.kwargs else spec.example_inputs
    return [example], ("the example inputs only (fine for structure, not for accuracy: "
                       "give --calibration FILE)")


def report_quality(name: str):
    """The per-pass quality the inspection report shows for zoo model ``name`` (None if it has
    none): MiniLM embedding cosine against the input graph on 32 evaluation sentences, byte-llama
    perplexity on 16 held-out windows."""
    from lowbit.ir.interpreter import Executor

    if name not in ("minilm", *BYTE_LMS):
        return None
    batch = minilm_batches("eval")[0] if name == "minilm" else byte_windows("val")[0]
    reference: list[torch.Tensor] = []

    def quality(graph, traced) -> tuple[str, float]:
        with torch.no_grad():
            out = traced.unflatten_outputs(Executor(graph).run(traced.flatten_inputs(batch, None)))
        if name in BYTE_LMS:
            return "perplexity", perplexity(lambda ids: out, [batch])
        emb = mean_pool(out.last_hidden_state, batch[1])
        if not reference:
            reference.append(emb)
        cos = torch.nn.functional.cosine_similarity(emb, reference[0], dim=-1)
        return "embedding cosine", cos.mean().item()
    return quality
