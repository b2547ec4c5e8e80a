"""Where each tensor of a BERT-family model (post-LayerNorm encoder) sits in the alignment: which permutation
acts on its rows (outputs) and which on its columns (inputs).

Sites (Verma & Elbayad 2024, §7 of merge-methods.md): per layer an attention site (the concatenated heads, the input
of attention.output.dense) and an FF site (the input of output.dense); and residual sites, the outputs of the
embeddings' LayerNorm and of each layer's two LayerNorms. Residual site keys are ``res@emb``, ``res@L.attn`` and
``res@L.out``; with one shared residual permutation (every option but ``sep``) they all name the same one, which is
what makes the permuted model compute the same function. The MLM head's transform writes into the space the tied
decoder (the word embeddings) reads, so its rows follow ``res@emb``; a pooler reads the last residual site and its
outputs are not permuted.
"""

from __future__ import annotations

import re
from typing import Any

from gittheta_align.arch import Shape
from gittheta_merge.errors import InputError

_LAYER = re.compile(r"^(?P<prefix>(?:[A-Za-z_]+\.)*?)encoder\.layer\.(?P<layer>\d+)\.(?P<rest>.+)$")


def residual_sites(shape: Shape) -> list[str]:
    sites = ["res@emb"]
    for layer in range(shape.n_layers):
        sites += [f"res@{layer}.attn", f"res@{layer}.out"]
    return sites


def capture_points(model: Any, shape: Shape) -> dict[str, tuple[Any, str]]:
    """site -> (module, "output" | "input"): where each site's features are read during a forward pass."""
    base = getattr(model, "base_model", model)
    if not hasattr(base, "encoder") or not hasattr(base, "embeddings"):
        raise InputError(f"{type(model).__name__}: not a BERT-family encoder (no embeddings/encoder modules)")
    points = {"res@emb": (base.embeddings.LayerNorm, "output")}
    for layer, block in enumerate(base.encoder.layer):
        points[f"res@{layer}.attn"] = (block.attention.output.LayerNorm, "output")
        points[f"res@{layer}.out"] = (block.output.LayerNorm, "output")
        points[f"attn@{layer}"] = (block.attention.output.dense, "input")
        # `--qk`: query and key outputs, pooled into one statistic (each token adds a q row and a k row)
        points[f"qk@{layer}.q"] = (block.attention.self.query, "output")
        points[f"qk@{layer}.k"] = (block.attention.self.key, "output")
        points[f"ff@{layer}"] = (block.output.dense, "input")
    return points


def roles(name: str, shape: Shape) -> tuple[str | None, str | None]:
    """(row site, column site) of tensor `name`: the permutation applied to its first and second dimension (a 1-D
    tensor has only rows). None: that dimension is not permuted. Unknown names are an error naming them."""
    last = f"res@{shape.n_layers - 1}.out"
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m["layer"]), m["rest"]
        into = "res@emb" if layer == 0 else f"res@{layer - 1}.out"  # the stream this layer reads
        attn, ff, qk = f"attn@{layer}", f"ff@{layer}", f"qk@{layer}"
        mid, out = f"res@{layer}.attn", f"res@{layer}.out"
        table = {
            "attention.self.query.weight": (qk, into), "attention.self.query.bias": (qk, None),
            "attention.self.key.weight": (qk, into), "attention.self.key.bias": (qk, None),
            "attention.self.value.weight": (attn, into), "attention.self.value.bias": (attn, None),
            "attention.output.dense.weight": (mid, attn), "attention.output.dense.bias": (mid, None),
            "attention.output.LayerNorm.weight": (mid, None), "attention.output.LayerNorm.bias": (mid, None),
            "intermediate.dense.weight": (ff, mid), "intermediate.dense.bias": (ff, None),
            "output.dense.weight": (out, ff), "output.dense.bias": (out, None),
            "output.LayerNorm.weight": (out, None), "output.LayerNorm.bias": (out, None),
        }
        if rest in table:
            return table[rest]
        raise InputError(f"tensor {name!r}: not a part of a BERT layer that alignment knows")
    stripped = re.sub(r"^(bert|roberta|electra|model)\.", "", name)
    table = {
        "embeddings.word_embeddings.weight": (None, "res@emb"),
        "embeddings.position_embeddings.weight": (None, "res@emb"),
        "embeddings.token_type_embeddings.weight": (None, "res@emb"),
        "embeddings.LayerNorm.weight": ("res@emb", None), "embeddings.LayerNorm.bias": ("res@emb", None),
        "embeddings.position_ids": (None, None), "embeddings.token_type_ids": (None, None),
        "pooler.dense.weight": (None, last), "pooler.dense.bias": (None, None),
        "cls.predictions.transform.dense.weight": ("res@emb", last),
        "cls.predictions.transform.dense.bias": ("res@emb", None),
        "cls.predictions.transform.LayerNorm.weight": ("res@emb", None),
        "cls.predictions.transform.LayerNorm.bias": ("res@emb", None),
        "cls.predictions.decoder.weight": (None, "res@emb"),
        "cls.predictions.decoder.bias": (None, None), "cls.predictions.bias": (None, None),
    }
    if stripped in table:
        return table[stripped]
    heads = {  # task heads that read the last hidden states (in the permuted basis): their inputs follow it
        "classifier.dense.weight": (None, last), "classifier.dense.bias": (None, None),  # RoBERTa / ELECTRA
        "classifier.out_proj.weight": (None, None), "classifier.out_proj.bias": (None, None),
        "qa_outputs.weight": (None, last), "qa_outputs.bias": (None, None),
        "cls.seq_relationship.weight": (None, None), "cls.seq_relationship.bias": (None, None),  # reads the pooler
        "classifier.bias": (None, None),
    }
    if stripped in heads:
        return heads[stripped]
    if stripped == "classifier.weight":
        if shape.pooled_head is None:
            raise InputError(f"tensor {name!r}: config.json names no architecture, so whether this classifier "
                             "reads the pooler or the hidden states is unknown; add \"architectures\" to it")
        return (None, None) if shape.pooled_head else (None, last)
    raise InputError(f"tensor {name!r}: alignment does not know where it sits in a BERT model (supported: the "
                     "encoder, embeddings, pooler, MLM and NSP heads, sequence/token classification and QA heads)")
