"""A compiled transformers causal LM as a compressed-tensors checkpoint: the folder vLLM,
SGLang and transformers (with ``compressed-tensors`` installed) load.

    q = lowbit.compile(model, ..., recipe="w4a16", calibration=batches)
    q.save_pretrained("out/llama-w4a16", format="compressed-tensors", tokenizer=tokenizer)

The folder holds the model's own ``config.json`` plus a ``quantization_config``, and
safetensors in the format's layouts:

- weight-only int4/int8 (``quant.linear``): ``pack-quantized``: ``weight_packed`` (int32, 32/bits
  values per word), ``weight_scale`` [out, groups] or [out, 1], ``weight_zero_point`` (packed
  along the output dim) when asymmetric, ``weight_shape``;
- int8 weights with int8 activations (``quant.dynamic_linear`` per token,
  ``quant.static_linear`` per tensor): ``int-quantized``: ``weight`` int8, ``weight_scale``,
  and for static activations ``input_scale`` (and ``input_zero_point``);
- fp8 weights: ``float-quantized``: ``weight`` float8_e4m3fn, ``weight_scale`` (and ``input_scale``).

Every transform folded into weights (SmoothQuant/AWQ scales, fused norms, the rotated residual
stream) is already in the graph's constants, so the checkpoint is the plain architecture with
those weights: a norm whose scale was folded away gets the weight that makes it the identity
scale (found by running the model's own norm module). An online Hadamard of a power-of-two
width is written as the format's ``transform_config``. Weight-only layers of one recipe held
per channel and in groups (``group128`` on a 64-wide model: the 64-input layers per channel)
are written in one group size, the gcd, with repeated scales: transformers' dequantizing
route reads every layer with one scheme. What the format cannot express — other online
rotations, block-sparse attention, a quantized key/value cache, groups that do not divide a
row, a layer the architecture does not have, a quantized layer that is not an ``nn.Linear``
(GPT-2's ``Conv1D``, stored [in, out]) — is refused with a message naming it; nothing is
dropped. An MoE router is not an ``nn.Linear`` either, but holds [out, in]: quantized
weight-only, it is written dequantized, in float (as runtimes build routers). MoE experts,
which lowbit quantizes in their stacked [experts, in, out] layout, are written one linear per
expert and projection under the keys transformers saves them as (``_expert_linears``);
symmetric only, as transformers' loader dequantizes experts without zero points.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.frontend.trace import TracedModel
from lowbit.io import staged_folder, write_tokenizer
from lowbit.ir.dialects.quant import dequantize_weight
from lowbit.ir.store import write_safetensors
from lowbit.ir.graph import Graph, Node
from lowbit.ir.types import DType

LINEARS = ("core.linear", "quant.linear", "quant.dynamic_linear", "quant.static_linear")
NORMS = ("core.rms_norm", "core.layer_norm")


class ExportError(LowbitError):
    """The compiled model cannot be written in the asked format; the message names the node or layer."""


@dataclasses.dataclass
class _Linear:
    node: Node
    weight: torch.Tensor            # float weight, or the integer/fp8 codes
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    bias: torch.Tensor | None
    axis: int | None
    group_size: int | None
    act: dict | None                # the input_activations entry, or None (weight-only)
    act_scale: torch.Tensor | None = None
    act_zero: torch.Tensor | None = None
    codes: DType | None = None      # the codes' dtype where the node is not a linear (MoE experts)

    @property
    def dtype(self) -> DType:
        """The weight's IR dtype (int4 codes live in int8 tensors)."""
        if self.codes is not None:
            return self.codes
        return self.node.operands[3 if self.node.op == "quant.static_linear" else 1].tensor_type.dtype


# ---- what the graph holds -------------------------------------------------------------------------

def _const(graph: Graph, node: Node, i: int, what: str) -> torch.Tensor | None:
    v = node.operands[i] if i < len(node.operands) else None
    if v is None:
        return None
    if not graph.is_constant(v):
        raise ExportError(f"{node.op} at {node.loc.module or '?'} (%{node.result.name}): its {what} is computed "
                          "in the graph, not a constant: the checkpoint format holds constant weights only")
    return graph.tensor(v)


def _act_args(dtype: DType, symmetric: bool, dynamic: bool) -> dict:
    kind = "float" if dtype.is_float else "int"
    return {"num_bits": dtype.bits, "type": kind, "symmetric": symmetric,
            "strategy": "token" if dynamic else "tensor", "dynamic": dynamic, "group_size": None,
            "block_structure": None, "actorder": None, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


def _linears(graph: Graph) -> dict[str, _Linear]:
    out: dict[str, _Linear] = {}
    for node in graph.nodes:
        if node.op not in LINEARS:
            continue
        module = node.loc.module
        if node.op == "core.linear":
            weight = node.operands[1]
            if weight is None or not graph.is_constant(weight):
                continue  # attention's matmuls written as linears of two activations: not a layer
            entry = _Linear(node, graph.tensor(weight), None, None, _const(graph, node, 2, "bias"), None, None, None)
        elif node.op == "quant.static_linear":
            act_dtype = node.attrs["act_dtype"]
            act_zero = _const(graph, node, 2, "activation zero point")
            entry = _Linear(node, _const(graph, node, 3, "weight"), _const(graph, node, 4, "scale"),
                            _const(graph, node, 5, "zero point"), _const(graph, node, 6, "bias"),
                            node.attrs.get("axis"), node.attrs.get("group_size"),
                            _act_args(act_dtype, act_dtype.is_float or act_dtype.int_range[0] < 0
                                      and (act_zero is None or not bool(act_zero.any())), False),
                            _const(graph, node, 1, "activation scale"), act_zero)
        else:
            act = None
            if node.op == "quant.dynamic_linear":
                if node.attrs.get("hadamard"):
                    raise ExportError(f"{module}: its input is rotated online by a Hadamard transform, which "
                                      "this export does not write (compile without online-hadamard)")
                if node.attrs.get("clip", 1.0) != 1.0:
                    raise ExportError(f"{module}: its per-token activation range is clipped to "
                                      f"{node.attrs['clip']:g} of each token's, which compressed-tensors does not "
                                      "describe (its runtimes scale by the full range); quantize the activations "
                                      "without the /mse clip search")
                act = _act_args(node.attrs["act_dtype"], bool(node.attrs.get("symmetric", True)), True)
            entry = _Linear(node, _const(graph, node, 1, "weight"), _const(graph, node, 2, "scale"),
                            _const(graph, node, 3, "zero point"), _const(graph, node, 4, "bias"),
                            node.attrs.get("axis"), node.attrs.get("group_size"), act)
        if not module:
            raise ExportError(f"{node.op} %{node.result.name} has no module path: it is not a layer of the model")
        if module in out:
            raise ExportError(f"{module} runs as two linears in the graph (%{out[module].node.result.name}, "
                              f"%{node.result.name}): the checkpoint has one weight per layer")
        out[module] = entry
    return out


def _refuse_extras(graph: Graph, online: dict[Node, list[str]]) -> None:
    """Ops a plain architecture's checkpoint cannot express (after the quantized linears are
    fused); ``online``: the Hadamard rotations written as input transforms."""
    for node in graph.nodes:
        where = f"{node.loc.module or '?'} (%{node.results[0].name})"
        if node.op.startswith("rotate.") and node not in online:
            raise ExportError(f"{where}: an online {node.op} rotation that compressed-tensors' transform_config "
                              "cannot express (only a Sylvester Hadamard of a power-of-two size, read by linears "
                              "only, as their input transform)")
        if node.op == "core.mul" and "smooth-quant" in node.loc.touched_by:
            raise ExportError(f"{where}: smooth-quant divided a norm's output by per-channel scales in a multiply "
                              "of its own (the norm also feeds the residual, so no weight could absorb them); a "
                              "checkpoint has no place for it: compile with smooth-quant{explicit=false}")
        if node.op.startswith("attn.") and "sparse" in node.op:
            raise ExportError(f"{where}: block-sparse attention has no compressed-tensors form")
        if node.op in ("quant.quantize", "quant.dynamic_quantize", "quant.dequantize") and not _expert_weight(graph, node):
            raise ExportError(f"{where}: a {node.op} that is not part of a quantized linear (a quantized "
                              "key/value cache, or an activation quantized for another op) has no place in "
                              "the checkpoint; compile without it")


def _expert_weight(graph: Graph, node: Node) -> bool:
    """Whether ``node`` dequantizes constant codes that only MoE experts' grouped matmuls read as their weight."""
    from lowbit.quant.experts import GROUPED_MM

    return node.op == "quant.dequantize" and graph.is_constant(node.operand(0)) and bool(node.result.users) and all(
        u.op in GROUPED_MM and u.operands[1] is node.result for u in node.result.users)


def _online_hadamards(graph: Graph, linears: dict[str, _Linear]) -> dict[Node, list[str]]:
    """Each ``rotate.hadamard`` that compressed-tensors' ``hadamard`` transform is (Sylvester's
    H/√n, n a power of two) and that only linears read: the modules whose input it rotates. The
    inverse is already in those linears' weights."""
    from lowbit.passes.rotate import linear_readers

    by_node = {id(lin.node): module for module, lin in linears.items()}
    out = {}
    for node in graph.nodes:
        n = node.result.tensor_type.shape[-1] if node.op == "rotate.hadamard" else None
        if not isinstance(n, int) or n & (n - 1):
            continue
        readers = linear_readers(node.result, LINEARS)
        if readers and all(id(u) in by_node for u in readers):
            out[node] = [by_node[id(u)] for u in readers]
    return out


def _transform_config(online: dict[Node, list[str]]) -> dict | None:
    """compressed-tensors' ``transform_config``: per size, a Hadamard on the listed linears'
    inputs (online) and its inverse on their weights (already applied to the saved weights)."""
    by_size: dict[int, list[str]] = {}
    for node, modules in online.items():
        by_size.setdefault(int(node.result.tensor_type.shape[-1]), []).extend(modules)
    if not by_size:
        return None
    groups = {}
    for n, modules in sorted(by_size.items()):
        groups[f"hadamard_{n}"] = {
            "type": "hadamard", "randomize": False, "requires_grad": False, "head_dim": None,
            "precision": "float32",
            "apply": [{"targets": modules, "location": "input", "inverse": False, "ignore": []},
                      {"targets": modules, "location": "weight_input", "inverse": True, "ignore": []}]}
    return {"config_groups": groups}


def _fused(graph: Graph) -> Graph:
    """A copy of ``graph`` with every quantize/dequantize around a linear fused into it. The
    fusions only rewire nodes, so the copy shares the constants' tensors (a model's weights are
    not held twice while it is written)."""
    from lowbit.ir.parser import clone_graph
    from lowbit.passes.manager import PassManager
    from lowbit.passes.pipeline import parse_pipeline

    graph = clone_graph(graph, share_tensors=True)
    PassManager(parse_pipeline("fuse-quantized-linear,fuse-static-linear")).run(graph)
    return graph


# ---- the checkpoint's tensors ---------------------------------------------------------------------

def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' dense packing: signed ``bits``-bit values (offset by 2^(bits−1)) laid
    end to end in int32 words along ``dim``, element i at bit i·bits."""
    v = values.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    per_word = 32 // bits
    words = -(-cols * bits // 32)
    v = torch.nn.functional.pad(v, (0, words * per_word - cols)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (v << shifts).sum(-1)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
    return (packed.T if dim == 0 else packed).contiguous()


def _signed(t: torch.Tensor, dtype: DType) -> torch.Tensor:
    """Codes (or a zero point) in the signed range compressed-tensors stores: an unsigned code u
    is u − 2^(bits−1), which leaves (q − z)·s unchanged when both move."""
    if dtype.int_range[0] < 0:
        return t.to(torch.int8)
    return (t.to(torch.int16) - (1 << (dtype.bits - 1))).to(torch.int8)


def _weight_args(lin: _Linear, dtype: DType, symmetric: bool) -> dict:
    if lin.group_size is not None:
        strategy = "group"
    elif lin.axis is not None:
        strategy = "channel"
    else:
        strategy = "tensor"
    return {"num_bits": dtype.bits, "type": "float" if dtype.is_float else "int", "symmetric": symmetric,
            "strategy": strategy, "group_size": lin.group_size, "dynamic": False, "block_structure": None,
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def _scale_2d(t: torch.Tensor, lin: _Linear, rows: int) -> torch.Tensor:
    """Scales (or zero points) as compressed-tensors shapes them: [out, groups], [out, 1], or [1]."""
    if lin.group_size is not None:
        if lin.axis not in (1, -1):
            raise ExportError(f"{lin.node.loc.module}: groups along the output dim have no compressed-tensors form")
        return t.reshape(rows, -1)
    if lin.axis is not None:
        if lin.axis not in (0, -2):
            raise ExportError(f"{lin.node.loc.module}: scales along the input dim have no compressed-tensors form")
        return t.reshape(rows, 1)
    return t.reshape(1)


def _quantized_tensors(module: str, lin: _Linear, float_dtype: torch.dtype) -> tuple[dict, dict]:
    """The layer's tensors and its scheme (weights, input_activations, format)."""
    rows, dtype = lin.weight.shape[0], lin.dtype
    cols = lin.weight.shape[-1]
    if lin.group_size is not None and cols % lin.group_size:
        raise ExportError(f"{module}: {cols} input features in groups of {lin.group_size} leave a short last "
                          "group, which compressed-tensors (and vLLM's kernels) cannot hold; quantize with a "
                          f"group that divides {cols} (or per channel)")
    tensors: dict[str, torch.Tensor] = {}
    if dtype.is_float:
        if dtype != DType.f8e4m3:
            raise ExportError(f"{module}: {dtype.short} weights: compressed-tensors and vLLM take float8_e4m3fn")
        if lin.zero_point is not None and bool(lin.zero_point.float().any()):
            raise ExportError(f"{module}: an fp8 weight with a zero point has no compressed-tensors form")
        fmt, symmetric = "float-quantized", True
        tensors["weight"] = lin.weight
    else:
        q = _signed(lin.weight, dtype)
        zp = lin.zero_point if lin.zero_point is not None or dtype.int_range[0] < 0 else \
            torch.zeros(lin.scale.shape, dtype=torch.uint8)  # unsigned codes without a zero point: z = 0
        zp = None if zp is None else _signed(zp, dtype)
        symmetric = zp is None or not bool(zp.any())
        z = None if symmetric else _scale_2d(zp.expand_as(lin.scale) if zp.dim() == 0 else zp, lin, rows)
        if lin.act is None or dtype.bits < 8:
            fmt = "pack-quantized"
            tensors["weight_packed"] = pack_int32(q, dtype.bits)
            tensors["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
            if z is not None:
                tensors["weight_zero_point"] = pack_int32(z, dtype.bits, dim=0) if z.dim() == 2 else z
        else:
            fmt = "int-quantized"
            tensors["weight"] = q
            if z is not None:
                tensors["weight_zero_point"] = z
    tensors["weight_scale"] = _scale_2d(lin.scale, lin, rows).to(float_dtype)
    if lin.act_scale is not None:
        tensors["input_scale"] = lin.act_scale.reshape(1).to(float_dtype)
        if not lin.act["symmetric"]:
            zero = lin.act_zero if lin.act_zero is not None else torch.zeros(1, dtype=torch.uint8)
            tensors["input_zero_point"] = _signed(zero, lin.node.attrs["act_dtype"]).reshape(1)
    scheme = {"weights": _weight_args(lin, dtype, symmetric), "input_activations": lin.act,
              "output_activations": None, "format": fmt}
    return tensors, scheme


# ---- the architecture ------------------------------------------------------------------------------

def _hf_config(traced: TracedModel):
    import transformers

    if traced.decoder is None or not traced.decoder.model_config.get("model_type"):
        raise ExportError("compressed-tensors export is for transformers causal LMs compiled with their cache "
                          "(lowbit.compile(model) of an AutoModelForCausalLM); this model has no transformers config")
    config = dict(traced.decoder.model_config)
    config.pop("quantization_config", None)
    return transformers.AutoConfig.for_model(config.pop("model_type"), **config)


def _skeleton(config) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _norm_reference(node: Node, graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """What the graph's norm computes on ``x`` (its scale folded away: ones)."""
    eps = float(node.attrs["eps"])
    gamma = torch.ones(x.shape[-1]) if node.operands[1] is None else graph.tensor(node.operands[1]).float()
    if node.op == "core.rms_norm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma
    beta = node.operands[2] if len(node.operands) > 2 else None
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * gamma
    return y if beta is None else y + graph.tensor(beta).float()


def _norm_params(skeleton: torch.nn.Module, module: str, node: Node, graph: Graph) -> dict[str, torch.Tensor]:
    """The parameters that make the model's own norm module compute what the graph's norm does:
    w = γ (ones where γ was folded into the next layers), or w = γ − 1 for norms that scale by
    1 + w; found by running the module, so a norm of another form is an error, not a guess."""
    probe = copy.deepcopy(skeleton.get_submodule(module)).to_empty(device="cpu").float()
    width = int(node.result.tensor_type.shape[-1])
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    want = _norm_reference(node, graph, x)
    gamma = torch.ones(width) if node.operands[1] is None else graph.tensor(node.operands[1]).float()
    beta = node.operands[2] if node.op == "core.layer_norm" and len(node.operands) > 2 else None
    params = dict(probe.named_parameters(recurse=False))
    for candidate in (gamma, gamma - 1):
        values = {"weight": candidate}
        if "bias" in params:
            values["bias"] = torch.zeros(width) if beta is None else graph.tensor(beta).float()
        if set(values) != set(params):
            break
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
            got = probe(x)
        if torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
            return values
    raise ExportError(f"{module}: cannot find parameters that make {type(probe).__name__} compute the graph's "
                      f"{node.op} (a norm of a form this export does not know)")


def _state_dict(traced: TracedModel, config, float_dtype: torch.dtype) -> tuple[dict, dict[str, dict], list[str],
                                                                               dict | None]:
    graph = _fused(traced.graph)
    linears = _linears(graph)
    skeleton = _skeleton(config)
    expected = dict(skeleton.state_dict())
    experts, stacked = _expert_linears(graph, skeleton, expected)
    online = _online_hadamards(graph, linears)
    _refuse_extras(graph, online)
    norms = {n.loc.module: n for n in graph.nodes if n.op in NORMS and n.loc.module}
    embeddings = {n.loc.module: n for n in graph.nodes if n.op == "core.embedding" and n.loc.module}
    as_float = _check_layers(skeleton, linears, expected)
    out, schemes, ignore = _linear_tensors(skeleton, linears, as_float, float_dtype)
    done = {f"{module}.{name}" for module in linears for name in ("weight", "bias")}
    expert_out, expert_schemes, _ = _linear_tensors(skeleton, experts, set(), float_dtype)
    out.update(expert_out)
    schemes.update(expert_schemes)
    linears = {**linears, **experts}
    done |= stacked
    for module, node in embeddings.items():
        out[f"{module}.weight"] = graph.tensor(node.operands[0]).to(float_dtype)
        done.add(f"{module}.weight")
    for module, node in norms.items():
        if f"{module}.weight" in expected:
            for name, value in _norm_params(skeleton, module, node, graph).items():
                out[f"{module}.{name}"] = value.to(float_dtype)
                done.add(f"{module}.{name}")
    for key, meta in expected.items():
        t = None if key in done else _parameter(graph, key, tuple(meta.shape))
        if t is not None:
            out[key] = t.to(float_dtype) if t.is_floating_point() else t
            done.add(key)
    missing = [k for k in expected if k not in done]
    if missing:
        raise ExportError(f"the compiled graph has no value for {len(missing)} parameter(s) of "
                          f"{type(skeleton).__name__}: {', '.join(missing[:5])}")
    _in_one_group_size(out, schemes, linears, float_dtype)
    transforms = _transform_config(online)
    for key, meta in expected.items():
        if key in out and tuple(out[key].shape) != tuple(meta.shape):
            raise ExportError(f"{key}: the graph holds shape {tuple(out[key].shape)}, "
                              f"{type(skeleton).__name__} has {tuple(meta.shape)}")
    return out, schemes, ignore, transforms


def _expert_linears(graph: Graph, skeleton: torch.nn.Module, expected: dict) -> tuple[dict[str, _Linear], set[str]]:
    """The quantized MoE experts as the per-expert linears the hub's checkpoints hold (and vLLM
    reads): each stacked parameter [experts, out, in] split into the keys transformers saves it
    as (``hub_rows``: ``experts.3.up_proj.weight``, Mixtral's ``experts.3.w3.weight``), each
    key's rows taken from the codes, scales and zero points lowbit holds [experts, in, out].
    Returns them by module, and the stacked parameters they stand for. Experts whose
    activations are quantized, or that transformers saves stacked, are refused."""
    from lowbit.frontend.weights import hub_rows
    from lowbit.quant.experts import GROUPED_MM

    out: dict[str, _Linear] = {}
    stacked: set[str] = set()
    for node in graph.nodes:
        dq = node.operand(1).producer if node.op in GROUPED_MM else None
        if dq is None or dq.op != "quant.dequantize" or not graph.is_constant(dq.operand(0)):
            continue
        module = node.loc.module or node.results[0].name
        name = str(dq.operand(0).producer.attrs["name"]).removesuffix(".q")
        param = name.removesuffix(".mT")
        pattern = "*." + module.rsplit(".", 1)[-1]  # the experts of every layer
        x = node.operand(0).producer
        if x is not None and x.op == "quant.dequantize":
            raise ExportError(f"{module}: the experts' inputs are quantized, which this export does not write for "
                              "MoE experts; use a weight-only recipe, or leave the experts float "
                              f"(insert-qdq{{skip={pattern}}})")
        layout = hub_rows(skeleton, param, tuple(expected[param].shape)) if param != name and param in expected \
            else None
        if layout is None:
            raise ExportError(f"{module}: transformers saves these experts as one stacked tensor ({param}), and "
                              "compressed-tensors holds quantized weights per nn.Linear; leave the experts float "
                              f"(insert-qdq{{skip={pattern}}}) or export with export_onnx")
        q, scale = graph.tensor(dq.operand(0)), graph.tensor(dq.operand(1))
        zp = graph.tensor(dq.operands[2]) if len(dq.operands) > 2 and dq.operands[2] is not None else None
        if zp is not None and bool(_signed(zp, dq.operand(0).tensor_type.dtype).any()):
            raise ExportError(f"{module}: the experts' weights have zero points, and transformers' compressed-tensors "
                              "loader dequantizes MoE experts without them (it reads scales and codes only); quantize "
                              f"the experts symmetrically: insert-qdq{{weights_override={pattern}>int4/group128/sym}}, or "
                              "a recipe with symmetric weights")
        experts, cin, cout = q.shape
        group = int(dq.attrs["group_size"])
        per_channel = group >= cin  # one group spanning the inputs: a scale per output channel

        def rows(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
            """The rows ``index`` of t [experts, in or groups, out] seen as [experts·out, in or groups]."""
            if t is None:
                return None
            picked = t.transpose(1, 2).reshape(experts * cout, t.shape[1])[index]
            return picked[:, 0] if per_channel and t is not q else picked

        for key, index in layout.items():
            out[key.removesuffix(".weight")] = _Linear(
                node, rows(q, index), rows(scale, index), rows(zp, index), None, 0 if per_channel else 1,
                None if per_channel else group, None, codes=dq.operand(0).tensor_type.dtype)
        stacked.add(param)
    return out, stacked


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's layers): a linear that stores its weight [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _check_layers(skeleton: torch.nn.Module, linears: dict[str, _Linear], expected: dict) -> set[str]:
    """Every linear of the graph is a layer of the architecture, and every quantized one an
    nn.Linear, the only module compressed-tensors quantizes. GPT-2's ``Conv1D`` stores its
    weight [in, out]: transformers reads a quantized [out, in] weight into it as a size mismatch,
    or (a square layer) silently transposed, and the format has no scheme for groups along the
    stored tensor's rows: refused. A weight-only layer of another class that holds [out, in]
    (an MoE router: transformers leaves its packed tensors unexpected and its weight missing,
    vLLM's Mixtral builds its gate unquantized) is written dequantized, in float: the returned modules."""
    as_float = set()
    for module, lin in linears.items():
        if f"{module}.weight" not in expected:
            raise ExportError(f"the graph has a linear at {module!r} (%{lin.node.result.name}) that "
                              f"{type(skeleton).__name__} does not have (a transform lowbit inserted): the "
                              "checkpoint cannot hold it")
        layer = skeleton.get_submodule(module)
        if lin.scale is None or isinstance(layer, torch.nn.Linear):
            continue
        rows, cols = lin.weight.shape[0], lin.weight.shape[-1]
        stored = tuple(expected[f"{module}.weight"].shape)
        kind = type(layer).__name__
        if stored != (rows, cols) or _is_conv1d(layer):
            layout = ", [in, out]," if stored == (cols, rows) else ""
            raise ExportError(f"{module} is a {kind} (weight stored {list(stored)}{layout} for its {cols} inputs "
                              f"and {rows} outputs), not an nn.Linear: compressed-tensors quantizes nn.Linear "
                              "layers, whose weight is [out, in], and transformers cannot load this layer's "
                              "quantized weight; export it with export_onnx (or lowbit's own save())")
        if lin.act is not None:
            raise ExportError(f"{module} is a {kind}, not an nn.Linear: compressed-tensors does not quantize it, "
                              "and its activations are quantized, which a float layer cannot hold; leave it "
                              f"float (insert-qdq{{skip=*.{module.rsplit('.', 1)[-1]}}})")
        as_float.add(module)
    return as_float


def _linear_tensors(skeleton: torch.nn.Module, linears: dict[str, _Linear], as_float: set[str],
                    float_dtype: torch.dtype) -> tuple[dict, dict[str, dict], list[str]]:
    """Each linear's tensors, the quantized ones' schemes, and the float ones (``ignore``):
    float layers, and ``as_float`` dequantized, as their module holds its weight."""
    out: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    ignore: list[str] = []
    for module, lin in linears.items():
        if lin.bias is not None:
            out[f"{module}.bias"] = lin.bias.to(float_dtype)
        if lin.scale is None or module in as_float:
            weight = lin.weight if lin.scale is None else \
                dequantize_weight(lin.weight, lin.scale, lin.zero_point, lin.axis, lin.group_size, torch.float32)
            conv1d = _is_conv1d(skeleton.get_submodule(module))
            out[f"{module}.weight"] = (weight.T if conv1d else weight).to(float_dtype)
            ignore.append(module)
            continue
        tensors, schemes[module] = _quantized_tensors(module, lin, float_dtype)
        out.update({f"{module}.{k}": v for k, v in tensors.items()})
    return out, schemes, ignore


_UNDO = {"view": lambda t: t, "to": lambda t: t, "neg": torch.neg, "exp": torch.log}


def _parameter(graph: Graph, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The graph's value for the parameter ``key``: its own constant, or the constant
    fold-constants made of it through reshapes and invertible elementwise ops, named by them
    (``key.view``: gpt-oss's attention sinks, [heads] read as [1, heads, 1, 1]; ``key.exp.neg``:
    Mamba's ``-exp(A_log)``; ``key.view.view``: a convolution's squeezed and unsqueezed
    kernel), undone in reverse order; None where the graph has none of these."""
    if key in graph.tensors:
        return graph.tensors[key]
    for name in graph.tensors:
        steps = name[len(key) + 1:].split(".") if name.startswith(key + ".") else []
        if steps and all(step in _UNDO for step in steps) and graph.tensors[name].numel() == math.prod(shape):
            value = graph.tensors[name].float()
            for step in reversed(steps):
                value = _UNDO[step](value)
            return value.reshape(shape)
    return None


def _in_one_group_size(out: dict, schemes: dict[str, dict], linears: dict[str, _Linear],
                       float_dtype: torch.dtype) -> None:
    """Rewrite per-channel and grouped layers of one recipe in one group size, the gcd of the
    groups and of the per-channel rows, each scale (and zero point) repeated over the groups it
    covered: every dequantized weight is unchanged. lowbit holds a layer per channel where
    the recipe's group is wider than its row (group128 on 64 inputs), so a recipe gives two
    schemes; transformers' dequantizing route reads every dense layer with the first config
    group's scheme (``get_dense_scheme``), so a second scheme would be misread (an asymmetric
    group128 layer's zero points read per channel: a shape error). vLLM's kernels take groups
    of 32, 64 and 128."""
    size = _common_group_size(schemes, linears)
    if size is None:
        return
    for module, scheme in schemes.items():
        if (scheme["weights"]["strategy"], scheme["weights"]["group_size"]) != ("group", size):
            tensors, schemes[module] = _quantized_tensors(module, _regrouped(linears[module], size), float_dtype)
            out.update({f"{module}.{k}": v for k, v in tensors.items()})


def _common_group_size(schemes: dict[str, dict], linears: dict[str, _Linear]) -> int | None:
    """The group size every weight-only layer can be written in, where the layers' schemes
    differ in their groups alone; None where they are one scheme already, or differ otherwise."""
    def rest(scheme: dict) -> str:
        weights = {k: v for k, v in scheme["weights"].items() if k not in ("strategy", "group_size")}
        return json.dumps({**scheme, "weights": weights}, sort_keys=True)

    layouts = {(s["weights"]["strategy"], s["weights"]["group_size"]) for s in schemes.values()}
    if len(layouts) < 2 or len({rest(s) for s in schemes.values()}) != 1:
        return None
    if any(s["format"] != "pack-quantized" or s["weights"]["strategy"] not in ("group", "channel")
           for s in schemes.values()):
        return None
    return math.gcd(*(s["weights"]["group_size"] if s["weights"]["strategy"] == "group"
                      else int(linears[m].weight.shape[-1]) for m, s in schemes.items()))


def _regrouped(lin: _Linear, size: int) -> _Linear:
    """``lin`` in groups of ``size`` input features (a divisor of its groups or row): each
    scale and zero point repeated over the groups it covers."""
    rows, cols = lin.weight.shape[0], lin.weight.shape[-1]

    def spread(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dim() == 0:
            return t
        t = t.reshape(rows, -1)
        return t.repeat_interleave(cols // size // t.shape[1], dim=1)

    return dataclasses.replace(lin, scale=spread(lin.scale), zero_point=spread(lin.zero_point), axis=-1,
                               group_size=size)


def _tie(out: dict, config) -> None:
    """Keep tied embeddings tied only where the graph still has them equal."""
    if not getattr(config, "tie_word_embeddings", False):
        return
    heads = [k for k in out if k.endswith("lm_head.weight")]
    embeds = [k for k in out if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if heads and embeds and torch.equal(out[heads[0]], out[embeds[0]]):
        del out[heads[0]]
    else:
        config.tie_word_embeddings = False


def _quantization_config(schemes: dict[str, dict], ignore: list[str]) -> dict:
    groups: list[tuple[str, list[str]]] = []
    for module, scheme in schemes.items():
        text = json.dumps(scheme, sort_keys=True)
        for key, targets in groups:
            if key == text:
                targets.append(module)
                break
        else:
            groups.append((text, [module]))
    formats = {json.loads(k)["format"] for k, _ in groups}
    config_groups = {f"group_{i}": {**json.loads(k), "targets": targets} for i, (k, targets) in enumerate(groups)}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None}


def export_compressed_tensors(traced: TracedModel, out_dir: str | os.PathLike, *, tokenizer=None,
                              source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``traced`` (a compiled transformers causal LM) as a compressed-tensors folder; the
    tokenizer's files come from ``tokenizer`` (saved with ``save_pretrained``) or ``source_dir``."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: give a new one")
    config = _hf_config(traced)
    store = traced.graph.tensors
    float_dtype = next((dtype for dtype in (store.meta(n)[1] for n in store)  # nothing read
                        if dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() > 1),
                       torch.float32)
    tensors, schemes, ignore, transforms = _state_dict(traced, config, float_dtype)
    if not schemes:
        raise ExportError("no layer of this model is quantized: there is nothing for compressed-tensors to hold "
                          "(compile with a recipe, or save the float model with transformers)")
    _tie(tensors, config)
    config.dtype = float_dtype
    with staged_folder(out, ExportError) as tmp:
        config_dict = config.to_dict()
        config_dict["quantization_config"] = _quantization_config(schemes, ignore)
        if transforms is not None:
            config_dict["quantization_config"]["transform_config"] = transforms
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        write_tokenizer(tmp, tokenizer, source_dir)
    return out


def compare_with_transformers(folder: str | os.PathLike, compiled) -> dict[str, float]:
    """Load ``folder`` with transformers (compressed-tensors must be installed) and compare its
    logits on the compiled model's example with the compiled model's. Asymmetric int4 folders
    load through compressed-tensors' dequantizing route (its default route cannot take their
    packed zero points)."""
    import compressed_tensors  # noqa: F401  (ImportError: the caller says how to install it)
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    asym = any(g["format"] == "pack-quantized" and not g["weights"]["symmetric"]
               for g in config["config_groups"].values())
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if asym else {}
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": as meant
        warnings.simplefilter("ignore", UserWarning)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    args, kwargs = compiled.traced.example_inputs, compiled.traced.example_kwargs
    with torch.no_grad():
        theirs = model(*args, **kwargs).logits.float()
        ours = compiled(*args, **kwargs).logits.float()
    return {"max_abs": (theirs - ours).abs().max().item(),
            "relative": ((theirs - ours).norm() / ours.norm().clamp_min(1e-30)).item()}
