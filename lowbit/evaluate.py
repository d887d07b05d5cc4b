"""Quality of a compiled model against fp32.

MiniLM: cosine similarity of mean-pooled sentence embeddings on the evaluation sentences the
package ships (``lowbit/data/sentences_eval.txt``), calibrated on a disjoint set
(``sentences_calibration.txt``).

byte-llama: perplexity (per byte) on held-out Python source (``byte_llama_val.txt``, from
files the model was not trained on), calibrated on a disjoint slice of its training text
(``byte_llama_calib.txt``).

    q = lowbit.compile(model, example, recipe="w8a8", calibration=minilm_batches("calibration"))
    print(minilm_cosine(q, model))     # {'mean': 0.99.., 'min': 0.98..}
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def sentences(split: str) -> list[str]:
    """``calibration`` or ``eval`` sentences (disjoint)."""
    path = DATA / f"sentences_{split}.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


def minilm_batches(split: str, batch_size: int = 32, max_length: int = 128) -> list[tuple]:
    """Tokenized (input_ids, attention_mask) batches, padded to each batch's longest sentence."""
    from lowbit.zoo import minilm_tokenizer

    tok = minilm_tokenizer()
    texts = sentences(split)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


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
    batches = batches if batches is not None else byte_windows("val")
    total, count = 0.0, 0
    with torch.no_grad():
        for (ids,) in batches:
            logits = model(ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
