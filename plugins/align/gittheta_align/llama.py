"""Where each tensor of a Llama-family decoder (pre-RMSNorm, rotary embeddings, grouped-query attention) sits in
the alignment.

The residual stream is one permutation (RMSNorm is permutation-equivariant, so its weight just follows), read at
the embeddings' output (``res@emb``) and each layer's output (``res@L``). The attention site is the input of
o_proj (every query head's context). Rotary embeddings rotate pairs of dimensions inside a head (i with
i + head_dim/2) at fixed frequencies, so Q and K take no permutation inside a head; heads move whole, and with
grouped-query attention a key/value head moves with its group of query heads. V and O carry no rotation: a value
head's dimensions may be permuted inside the head, and every query head of its group reads its context in that
order. So four permutations per layer: ``q@L`` (query heads moved, rows of q_proj), ``kv@L`` (key/value groups
moved, rows of k_proj), ``v@L`` (groups moved and each value head's dimensions permuted, rows of v_proj) and
``attn@L`` (the query heads' context dimensions: the moves of q@L with the within-head permutation of each head's
group, columns of o_proj); only attn@L is read from the models. The FF site is the input of down_proj (gate and up
rows follow it).
"""

from __future__ import annotations

import re
from typing import Any

from gittheta_align.arch import Shape
from gittheta_merge.errors import InputError

_LAYER = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?P<rest>.+)$")


def residual_sites(shape: Shape) -> list[str]:
    return ["res@emb"] + [f"res@{layer}" for layer in range(shape.n_layers)]


def capture_points(model: Any, shape: Shape) -> dict[str, tuple[Any, str]]:
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        raise InputError(f"{type(model).__name__}: not a Llama-family decoder (no embed_tokens/layers modules)")
    points: dict[str, tuple[Any, str]] = {"res@emb": (base.embed_tokens, "output")}
    for layer, block in enumerate(base.layers):
        points[f"res@{layer}"] = (block, "output")
        points[f"attn@{layer}"] = (block.self_attn.o_proj, "input")
        points[f"ff@{layer}"] = (block.mlp.down_proj, "input")
    return points


def roles(name: str, shape: Shape) -> tuple[str | None, str | None]:
    last = f"res@{shape.n_layers - 1}"
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m["layer"]), m["rest"]
        into = "res@emb" if layer == 0 else f"res@{layer - 1}"
        out, attn, kv, ff = f"res@{layer}", f"attn@{layer}", f"kv@{layer}", f"ff@{layer}"
        q, v = f"q@{layer}", f"v@{layer}"
        table = {
            "input_layernorm.weight": (into, None),
            "self_attn.q_proj.weight": (q, into), "self_attn.q_proj.bias": (q, None),
            "self_attn.k_proj.weight": (kv, into), "self_attn.k_proj.bias": (kv, None),
            "self_attn.v_proj.weight": (v, into), "self_attn.v_proj.bias": (v, None),
            "self_attn.o_proj.weight": (out, attn), "self_attn.o_proj.bias": (out, None),
            "post_attention_layernorm.weight": (out, None),
            "mlp.gate_proj.weight": (ff, out), "mlp.up_proj.weight": (ff, out), "mlp.down_proj.weight": (out, ff),
        }
        if rest in table:
            return table[rest]
        if rest.endswith("rotary_emb.inv_freq"):
            return (None, None)
        raise InputError(f"tensor {name!r}: not a part of a Llama layer that alignment knows")
    table = {"model.embed_tokens.weight": (None, "res@emb"), "embed_tokens.weight": (None, "res@emb"),
             "model.norm.weight": (last, None), "norm.weight": (last, None), "lm_head.weight": (None, last)}
    if name in table:
        return table[name]
    if name.endswith("rotary_emb.inv_freq"):
        return (None, None)
    raise InputError(f"tensor {name!r}: alignment does not know where it sits in a Llama model")
