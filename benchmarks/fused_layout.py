"""The same trained LM in two layouts: byte-llama (separate q/k/v and gate/up projections) and
byte-llama rewritten into Phi-3's fused layout (``qkv_proj``, ``gate_up_proj``), which computes
the same function. A recipe should not care which layout the checkpoint uses; this prints
perplexity and KL from fp32 for each recipe in both, on the same calibration and evaluation
windows.

    python benchmarks/fused_layout.py                           # w4a16 and w8a8-static
    python benchmarks/fused_layout.py --recipes w4a16 w8a8 --eval-batches 16
"""

from __future__ import annotations

import argparse

import torch
import transformers

import lowbit
from lowbit.evaluate import byte_windows, next_token_scores, reference_logprobs
from lowbit.zoo import load_model


def fused_layout(llama: transformers.LlamaForCausalLM) -> transformers.Phi3ForCausalLM:
    """``llama`` as a Phi-3 model: q, k, v stacked into ``qkv_proj``, gate and up into
    ``gate_up_proj`` (Phi-3 splits them back in that order); every other weight as it is."""
    c = llama.config
    config = transformers.Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), hidden_act=c.hidden_act,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    fused = {}
    state = llama.state_dict()
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith(".q_proj"):
            block = prefix.removesuffix(".q_proj")
            fused[f"{block}.qkv_proj.{leaf}"] = torch.cat([state[f"{block}.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
        elif prefix.endswith(".gate_proj"):
            block = prefix.removesuffix(".gate_proj")
            fused[f"{block}.gate_up_proj.{leaf}"] = torch.cat([state[f"{block}.{p}.{leaf}"] for p in ("gate_proj", "up_proj")])
        elif not prefix.endswith((".k_proj", ".v_proj", ".up_proj")):
            fused[key] = value
    model = transformers.Phi3ForCausalLM(config).eval()
    model.load_state_dict(fused, strict=True)
    return model


def compare(recipes: list[str], calib_batches: int = 2, eval_batches: int = 4) -> list[dict]:
    """Per recipe and layout: perplexity and KL from fp32 (nats per byte)."""
    llama = load_model("byte-llama").model.eval()
    phi3 = fused_layout(llama)
    evaluation, calibration = byte_windows("val")[:eval_batches], byte_windows("calib")[:calib_batches]
    reference = reference_logprobs(llama, evaluation)
    same = next_token_scores(phi3, evaluation, reference)["kl"]
    if same > 1e-9:
        raise AssertionError(f"the fused layout is not the same function (KL {same:.2e} from the original)")
    rows = []
    for recipe in recipes:
        for layout, model in (("llama", llama), ("phi-3 fused", phi3)):  # take turns, same windows
            q = lowbit.compile(model, calibration[0], recipe=recipe, calibration=calibration, progress=False)
            scores = next_token_scores(q, evaluation, reference)
            rows.append(dict(recipe=recipe, layout=layout, **scores))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["w4a16", "w8a8-static"])
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=4)
    args = parser.parse_args()
    rows = compare(args.recipes, args.calib_batches, args.eval_batches)
    print("| recipe | layout | perplexity | KL from fp32 (10⁻³) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['layout']} | {r['perplexity']:.4f} | {r['kl'] * 1e3:.3f} |")


if __name__ == "__main__":
    main()
