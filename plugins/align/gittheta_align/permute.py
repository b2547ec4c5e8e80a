"""Applying permutations to a model's tensors, one tensor at a time (so the aligned model is written block by
block, never held whole)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gittheta_align.arch import Shape
from gittheta_merge.errors import InputError


def permute_tensor(name: str, tensor: Any, shape: Shape, perms: Mapping[str, np.ndarray]) -> Any:
    """`tensor` with its rows and columns reordered as the sites of `name` say: out[r] = in[perm[r]]. A site absent
    from `perms` is left as it is (a component that is not aligned)."""
    import torch

    row_site, col_site = shape.roles(name)
    out = tensor
    for dim, site in ((0, row_site), (1, col_site)):
        if site is not None and site.startswith("qk@") and site not in perms:
            site = "attn@" + site[3:]  # Q and K follow V (permutation sets written before `--qk` existed)
        if site is None or site not in perms:
            continue
        perm = perms[site]
        if out.dim() <= dim or out.shape[dim] != len(perm):
            raise InputError(f"tensor {name!r}: shape {list(tensor.shape)} does not fit the {site} permutation "
                             f"of {len(perm)} (dimension {dim}); is it the same architecture?")
        out = out.index_select(dim, torch.as_tensor(perm, dtype=torch.long))
    return out


def permute_state(state: Mapping[str, Any], shape: Shape, perms: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: permute_tensor(name, t, shape, perms) for name, t in state.items()}


def inverse(perm: np.ndarray) -> np.ndarray:
    return np.argsort(perm)


def random_perms(shape: Shape, seed: int, heads: bool = True, qk: bool = False) -> dict[str, np.ndarray]:
    """A random function-preserving permutation set: one residual permutation, per layer an FF permutation and an
    attention permutation that moves heads as whole blocks (BERT: with a within-head permutation shared by Q, K
    and V; Llama: key/value groups and query heads within their group, a within-head permutation only for V and O,
    one per group: rotary pairs keep Q and K's dimensions in place).
    `qk` (BERT): Q and K get a within-head permutation of their own (heads moved as V's), still function-preserving.
    For tests and for the exactness benchmark (a planted permutation the alignment must recover)."""
    rng = np.random.default_rng(seed)
    res = rng.permutation(shape.d_model)
    perms = {site: res for site in shape.residual_sites()}
    dh = shape.d_head
    for layer in range(shape.n_layers):
        if shape.family == "llama":
            groups = rng.permutation(shape.n_kv_heads) if heads else np.arange(shape.n_kv_heads)
            q_heads = np.concatenate([g * shape.group + (rng.permutation(shape.group) if heads
                                                         else np.arange(shape.group)) for g in groups])
            within = [rng.permutation(dh) for _ in range(shape.n_kv_heads)]  # per group, for V and O only
            perms[f"attn@{layer}"] = np.concatenate([h * dh + within[h // shape.group] for h in q_heads])
            perms[f"q@{layer}"] = np.concatenate([h * dh + np.arange(dh) for h in q_heads])
            perms[f"kv@{layer}"] = np.concatenate([g * dh + np.arange(dh) for g in groups])
            perms[f"v@{layer}"] = np.concatenate([g * dh + within[g] for g in groups])
        else:
            order = rng.permutation(shape.n_heads) if heads else np.arange(shape.n_heads)
            perms[f"attn@{layer}"] = np.concatenate([h * dh + rng.permutation(dh) for h in order])
            perms[f"qk@{layer}"] = (np.concatenate([h * dh + rng.permutation(dh) for h in order]) if qk
                                    else perms[f"attn@{layer}"])
        perms[f"ff@{layer}"] = rng.permutation(shape.d_ff)
    return perms
