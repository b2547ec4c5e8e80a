"""Joint feature statistics of two models run on the same token stream (Verma & Elbayad 2024, stage S).

For every site both models' features at each real token (padding removed; special tokens kept, as the paper's
scripts do) are accumulated in float64: the token count, each model's sums and sums of squares per feature, and
the cross sums  sum_t a_t b_t^T. That is exactly what the matching needs (the cross block of the correlation of
[A; B]); the A-A and B-B blocks of the paper's 2d x 2d covariance are never used, so they are not kept (a quarter
of the memory).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gittheta_align.arch import Shape


@dataclass
class SiteStats:
    """Running sums for one site, float64."""

    n: int
    sum_a: np.ndarray
    sum_b: np.ndarray
    sq_a: np.ndarray
    sq_b: np.ndarray
    cross: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> SiteStats:
        return cls(0, np.zeros(dim), np.zeros(dim), np.zeros(dim), np.zeros(dim), np.zeros((dim, dim)))

    def add(self, a: Any, b: Any) -> None:
        """Features of the same tokens, (tokens, dim) each."""
        import torch

        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        a64, b64 = torch.nan_to_num(a64), torch.nan_to_num(b64)
        self.n += a64.shape[0]
        self.sum_a += a64.sum(0).numpy()
        self.sum_b += b64.sum(0).numpy()
        self.sq_a += (a64 * a64).sum(0).numpy()
        self.sq_b += (b64 * b64).sum(0).numpy()
        self.cross += (a64.T @ b64).numpy()

    def covariances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cross covariance A x B, variance of A, variance of B)."""
        mean_a, mean_b = self.sum_a / self.n, self.sum_b / self.n
        cov = self.cross / self.n - np.outer(mean_a, mean_b)
        return cov, self.sq_a / self.n - mean_a**2, self.sq_b / self.n - mean_b**2

    def tensors(self, site: str) -> dict[str, np.ndarray]:
        return {f"{site}.n": np.array([self.n], dtype=np.int64), f"{site}.sum_a": self.sum_a,
                f"{site}.sum_b": self.sum_b, f"{site}.sq_a": self.sq_a, f"{site}.sq_b": self.sq_b,
                f"{site}.cross": self.cross}

    @classmethod
    def from_tensors(cls, site: str, tensors: dict[str, np.ndarray]) -> SiteStats:
        return cls(int(tensors[f"{site}.n"][0]), tensors[f"{site}.sum_a"], tensors[f"{site}.sum_b"],
                   tensors[f"{site}.sq_a"], tensors[f"{site}.sq_b"], tensors[f"{site}.cross"])


def site_bytes(shape: Shape, site: str) -> int:
    """Memory of one site's running sums (float64): the cross sums dominate (d x d)."""
    d = shape.site_dim(site)
    return 8 * (d * d + 4 * d)


def plan_passes(shape: Shape, sites: list[str], max_bytes: int | None) -> list[list[str]]:
    """Sites grouped into passes over the data whose statistics fit in `max_bytes` together (one pass when None).
    Each pass runs both models over all the data again: memory traded for time, results unchanged."""
    from gittheta_merge.errors import UsageError, human_bytes

    if max_bytes is None:
        return [list(sites)]
    passes: list[list[str]] = [[]]
    used = 0
    for site in sites:
        need = site_bytes(shape, site)
        if need > max_bytes:
            raise UsageError(f"site {site} alone needs {human_bytes(need)} of statistics; raise --max-memory to at "
                             "least that")
        if used + need > max_bytes and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(site)
        used += need
    return passes


def correlation(cov: np.ndarray, var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """The cross-correlation block, with the paper's clamp of the product of deviations at 1e-7."""
    sigma = np.outer(np.sqrt(np.clip(var_a, 0, None)), np.sqrt(np.clip(var_b, 0, None)))
    return cov / np.maximum(sigma, 1e-7)


def _parts(site: str) -> list[str]:
    """The capture points that feed a site: a ``qk`` site pools the query and the key outputs."""
    return [f"{site}.q", f"{site}.k"] if site.startswith("qk@") else [site]


def _capture(model: Any, shape: Shape, sites: set[str]) -> tuple[dict[str, Any], list[Any]]:
    """Forward hooks that store each wanted site's features of the current batch in the returned dict."""
    got: dict[str, Any] = {}
    handles = []

    def output_of(site: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            got[site] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def input_of(site: str) -> Any:
        def hook(_module: Any, inputs: Any) -> None:
            got[site] = inputs[0].detach()
        return hook

    for site, (module, where) in shape.capture_points(model).items():
        if site in sites:
            handles.append(module.register_forward_hook(output_of(site)) if where == "output"
                           else module.register_forward_pre_hook(input_of(site)))
    return got, handles


def joint_statistics(model_a: Any, model_b: Any, batches: Iterable[dict[str, Any]], shape: Shape,
                     sites: list[str], progress: Any = None) -> dict[str, SiteStats]:
    """Run both models on every batch (identical inputs) and accumulate each site's joint statistics."""
    import torch

    stats = {site: SiteStats.zeros(shape.site_dim(site)) for site in sites}
    points = {part for site in sites for part in _parts(site)}
    got_a, handles_a = _capture(model_a, shape, points)
    got_b, handles_b = _capture(model_b, shape, points)
    try:
        model_a.eval()
        model_b.eval()
        with torch.no_grad():
            for batch in batches:
                model_a(**batch)
                model_b(**batch)
                keep = batch["attention_mask"].reshape(-1).bool()
                for site in sites:
                    for part in _parts(site):
                        a = got_a[part].reshape(-1, got_a[part].shape[-1])[keep]
                        b = got_b[part].reshape(-1, got_b[part].shape[-1])[keep]
                        stats[site].add(a, b)
                if progress is not None:
                    progress(int(keep.sum()))
    finally:
        for h in handles_a + handles_b:
            h.remove()
    return stats


def batches_from_texts(tokenizer: Any, texts: list[str], batch_size: int = 8,
                       max_length: int = 128) -> Iterator[dict[str, Any]]:
    """The tokenized texts in batches, special tokens included, padding masked."""
    if getattr(tokenizer, "pad_token", "") is None:  # causal LM tokenizers often have none; padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions (rotary or learned) then start at 0 for every sentence
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start: start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
