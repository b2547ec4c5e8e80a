"""From joint statistics to permutations (stage P): a Hungarian assignment on the raw cross-correlation
(scipy's linear_sum_assignment, maximising; the paper's scripts pass --no-absval), with the attention sites'
head-aware variants and the residual variants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gittheta_align.arch import Shape
from gittheta_align.features import SiteStats, correlation
from gittheta_merge.errors import UsageError

COMPONENTS = ("ff", "attn", "res")
HEAD_MODES = ("permute", "monotonic", "ignore")
RESIDUAL_MODES = ("first", "last", "all", "sep")


@dataclass(frozen=True)
class Options:
    """What to align and how (the paper's names). `components`: a subset of ff / attn / res."""

    components: tuple[str, ...] = ("ff", "attn", "res")
    heads: str = "permute"
    residual: str = "first"
    qk: bool = False  # Q and K from their own (query, key) statistics instead of following V (the paper's --qk)

    def __post_init__(self) -> None:
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise UsageError(f"components must be a +-joined subset of ff, attn, res (got {'+'.join(self.components)})")
        if self.heads not in HEAD_MODES:
            raise UsageError(f"heads must be one of {', '.join(HEAD_MODES)} (got {self.heads!r})")
        if self.residual not in RESIDUAL_MODES:
            raise UsageError(f"residual must be one of {', '.join(RESIDUAL_MODES)} (got {self.residual!r})")
        if self.qk and ("attn" not in self.components or self.heads == "ignore"):
            raise UsageError("--qk permutes query and key dimensions inside the heads that the attention alignment "
                             "matched: it needs the attn component with heads permute or monotonic")

    @classmethod
    def parse(cls, components: str, heads: str, residual: str, qk: bool = False) -> Options:
        return cls(tuple(c.strip() for c in components.split("+") if c.strip()), heads, residual, qk)

    def function_preserving(self) -> bool:
        """Whether applying the permutations to one model leaves its outputs unchanged."""
        return not ("attn" in self.components and self.heads == "ignore") and not (
            "res" in self.components and self.residual == "sep")

    def sites(self, shape: Shape) -> list[str]:
        """The sites whose statistics the options need."""
        sites = []
        for layer in range(shape.n_layers):
            if "attn" in self.components:
                sites.append(f"attn@{layer}")
                if self.qk:
                    sites.append(f"qk@{layer}")
            if "ff" in self.components:
                sites.append(f"ff@{layer}")
        if "res" in self.components:
            res = shape.residual_sites()
            sites += {"first": res[:1], "last": res[-1:], "all": res, "sep": res}[self.residual]
        return sites


def assign(corr: np.ndarray) -> tuple[np.ndarray, float]:
    """perm with perm[r] = the B feature matched to A feature r, and the summed correlation of the matches."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = np.empty(corr.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm, float(corr[rows, cols].sum())


def assign_heads(corr: np.ndarray, n_heads: int, mode: str) -> np.ndarray:
    """An attention site's permutation. permute: a within-head assignment for every (A head, B head) pair, then
    an assignment of heads on the summed correlations; monotonic: head j stays j, within-head assignment only;
    ignore: one flat assignment over all features (mixes heads: not function-preserving)."""
    if mode == "ignore":
        return assign(corr)[0]
    d_head = corr.shape[0] // n_heads
    block = [slice(h * d_head, (h + 1) * d_head) for h in range(n_heads)]
    if mode == "monotonic":
        return np.concatenate([h * d_head + assign(corr[block[h], block[h]])[0] for h in range(n_heads)])
    inner = {}
    score = np.zeros((n_heads, n_heads))
    for j in range(n_heads):
        for k in range(n_heads):
            inner[j, k], score[j, k] = assign(corr[block[j], block[k]])
    heads, _ = assign(score)
    return np.concatenate([heads[j] * d_head + inner[j, heads[j]] for j in range(n_heads)])


def assign_groups(corr: np.ndarray, shape: Shape, mode: str) -> dict[str, np.ndarray]:
    """A Llama attention layer's permutations from its o_proj-input correlation: ``attn`` (context dimensions of the
    query heads), ``q`` (query heads, whole), ``kv`` (key/value groups, whole) and ``v`` (groups, and each value
    head's dimensions). Rotary pairs forbid moving dimensions inside a query or key head; a value head's dimensions
    may move, and the query heads of its group then read their context in that order, so one within-head permutation
    per group is shared by v and the group's query heads in attn.
    permute: for every (A head, B head) pair the best within-head assignment; query heads assigned inside every
    (A group, B group) pair on those scores, then the groups; each group's within-head permutation from the summed
    correlation blocks of its matched heads. monotonic: heads and groups stay, within-head permutations only.
    ignore: one flat assignment of the context dimensions (not function-preserving; q, k, v stay)."""
    dh, g, n_kv, heads = shape.d_head, shape.group, shape.n_kv_heads, shape.n_heads
    identity = {"q": np.arange(heads * dh), "kv": np.arange(n_kv * dh), "v": np.arange(n_kv * dh)}
    if mode == "ignore":
        return {"attn": assign(corr)[0], **identity}
    blocks = corr.reshape(heads, dh, heads, dh)
    if mode == "monotonic":
        q_heads, groups = np.arange(heads), np.arange(n_kv)
    else:
        score = np.zeros((heads, heads))
        for j in range(heads):
            for k in range(heads):
                score[j, k] = assign(blocks[j, :, k, :])[1]
        inner, group_score = {}, np.zeros((n_kv, n_kv))
        for a in range(n_kv):
            for b in range(n_kv):
                inner[a, b], group_score[a, b] = assign(score[a * g:(a + 1) * g, b * g:(b + 1) * g])
        groups, _ = assign(group_score)
        q_heads = np.concatenate([groups[a] * g + inner[a, groups[a]] for a in range(n_kv)])
    within = [assign(sum(blocks[j, :, q_heads[j], :] for j in range(a * g, (a + 1) * g)))[0] for a in range(n_kv)]
    return {"attn": np.concatenate([q_heads[j] * dh + within[j // g] for j in range(heads)]),
            "q": np.concatenate([h * dh + np.arange(dh) for h in q_heads]),
            "kv": np.concatenate([b * dh + np.arange(dh) for b in groups]),
            "v": np.concatenate([groups[a] * dh + within[a] for a in range(n_kv)])}


def assign_within_heads(corr: np.ndarray, attn: np.ndarray, n_heads: int) -> np.ndarray:
    """Q and K's permutation from their own correlation (`--qk`): A head j keeps the B head the attention site gave
    it (`attn` moved whole heads), and the dimensions inside each matched pair get their own assignment. Q and K
    share it, so every head's q.k is unchanged."""
    d_head = corr.shape[0] // n_heads
    out = []
    for j in range(n_heads):
        k = int(attn[j * d_head]) // d_head
        out.append(k * d_head + assign(corr[j * d_head:(j + 1) * d_head, k * d_head:(k + 1) * d_head])[0])
    return np.concatenate(out)


def permutations(stats: dict[str, SiteStats], shape: Shape, options: Options) -> dict[str, np.ndarray]:
    """Every site's permutation of B into A's coordinates. Sites of components not aligned are absent (identity);
    a BERT layer's ``qk`` site (the rows of Q and K) is the attention site's unless `options.qk`."""
    if options.qk and shape.family != "bert":
        raise UsageError("--qk is for BERT-family models: a Llama's rotary embeddings pair query and key dimensions, "
                         "so Q and K move only as whole heads (they already follow their heads)")
    perms: dict[str, np.ndarray] = {}
    for layer in range(shape.n_layers):
        if "attn" in options.components:
            corr = correlation(*stats[f"attn@{layer}"].covariances())
            if shape.family == "llama":
                for part, perm in assign_groups(corr, shape, options.heads).items():
                    perms[f"{part}@{layer}"] = perm
            else:
                attn = perms[f"attn@{layer}"] = assign_heads(corr, shape.n_heads, options.heads)
                perms[f"qk@{layer}"] = (assign_within_heads(correlation(*stats[f"qk@{layer}"].covariances()), attn,
                                                            shape.n_heads) if options.qk else attn)
        if "ff" in options.components:
            perms[f"ff@{layer}"] = assign(correlation(*stats[f"ff@{layer}"].covariances()))[0]
    if "res" in options.components:
        res = shape.residual_sites()
        if options.residual == "sep":
            for site in res:
                perms[site] = assign(correlation(*stats[site].covariances()))[0]
        else:
            used = {"first": res[:1], "last": res[-1:], "all": res}[options.residual]
            # `all`: the covariances averaged over the residual sites, then turned into a correlation
            parts = [stats[s].covariances() for s in used]
            mean = [sum(p[i] for p in parts) / len(parts) for i in range(3)]
            shared = assign(correlation(*mean))[0]
            for site in res:
                perms[site] = shared
    return perms
