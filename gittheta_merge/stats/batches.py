"""From examples to model batches: the tasks and the transformers class of each, label ids, the encoder
(tokenisation, label alignment, masking for masked LM) and the batch stream."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gittheta_merge.errors import StatsError
from gittheta_merge.stats.data import Example

# each task and the transformers Auto class that builds a model for it
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification",
                "causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM"}
TASKS = tuple(AUTO_CLASSES)
LABEL_POLICIES = ("empirical", "sampled", "exact")

LOG_P_DEFINITION = {
    "sequence-classification": "log softmax(logits)[y]",
    "token-classification": "mean over labelled words (first sub-token) of log p(y_t|x)",
    "causal-lm": "mean over next-token targets inside the unpadded sequence of log p(x_{t+1}|x_<=t)",
    "masked-lm": "mean over masked positions of log p(x_t|x_masked)",
}

_CAUSAL_MODEL_TYPES = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "mixtral", "qwen2", "qwen3", "phi",
                       "phi3", "opt", "bloom", "falcon", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "starcoder2"}


def auto_class(task: str) -> Any:
    """The transformers Auto class for `task` (ValueError for an unknown task)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[_check_task(task)])


def load_model(path: str, task: str, **kwargs: Any) -> nn.Module:
    """Load an HF directory with the Auto class that matches `task` (a fresh head where the checkpoint has none)."""
    return auto_class(task).from_pretrained(path, **kwargs)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise StatsError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    return task


# --------------------------------------------------------------------------------------------------------------
# batches


@dataclass
class _Batch:
    """Model inputs plus the target description shared by every kind. `targets` is aligned with the logits:
    [B] for sequence classification, [B, T] for token tasks (causal LM already shifted: targets[:, t] is the token
    at t+1), with `target_mask` [B, T] marking positions that enter log p. `uniform` [B] or [B, T] drives the
    inverse-CDF sampling of the `sampled` policy, drawn from the seeded CPU generator so every device and both
    per-example paths sample the same labels."""

    inputs: dict[str, torch.Tensor]
    attention_mask: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor | None
    uniform: torch.Tensor
    n: int
    tokens: int

    def to(self, device: torch.device) -> _Batch:
        return _Batch({k: v.to(device) for k, v in self.inputs.items()}, self.attention_mask.to(device),
                      self.targets.to(device), None if self.target_mask is None else self.target_mask.to(device),
                      self.uniform.to(device), self.n, self.tokens)


def _label_id(label: Any, label_map: Mapping[str, int] | None, where: str) -> int:
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str):
        if label_map is not None and label in label_map:
            return int(label_map[label])
        try:
            return int(label)
        except ValueError:
            pass
    raise StatsError(f"{where}: label {label!r} is not an integer and not in the label map "
                     f"({sorted(label_map) if label_map else 'none given'}); pass label_map={{name: id}}")


def _default_label_map(model: nn.Module) -> dict[str, int] | None:
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if not label2id or all(re.fullmatch(r"LABEL_\d+", str(k)) for k in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}


class _Encoder:
    """Tokenizes examples into `_Batch`es for one task; owns the seeded generator for masking and sampling."""

    def __init__(self, tokenizer: Any, task: str, max_length: int, label_map: Mapping[str, int] | None,
                 needs_gold: bool, seed: int, mlm_probability: float, accepts_token_types: bool = True) -> None:
        self.tok = tokenizer
        self.accepts_token_types = accepts_token_types
        self.task = task
        self.max_length = max_length
        self.label_map = label_map
        self.needs_gold = needs_gold
        self.gen = torch.Generator().manual_seed(seed)
        self.mlm_probability = mlm_probability
        if tokenizer.pad_token is None:
            raise StatsError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) first")
        if task == "masked-lm" and tokenizer.mask_token_id is None:
            raise StatsError("masked-lm needs a tokenizer with a mask token")

    def encode(self, examples: list[Example]) -> _Batch:
        tok = self.tok
        words = self.task == "token-classification"
        texts = [(e.text.split() if isinstance(e.text, str) else list(e.text)) if words else
                 (e.text if isinstance(e.text, str) else " ".join(e.text)) for e in examples]
        pairs = [e.text_pair for e in examples]
        kw: dict[str, Any] = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                                  return_special_tokens_mask=self.task == "masked-lm")
        if words:
            kw["is_split_into_words"] = True
        enc = tok(texts, pairs, **kw) if any(p is not None for p in pairs) else tok(texts, **kw)
        ids = enc["input_ids"]
        am = enc["attention_mask"].bool()
        inputs = {"input_ids": ids, "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc and self.accepts_token_types:
            inputs["token_type_ids"] = enc["token_type_ids"]
        B, T = ids.shape
        lengths = am.sum(1).tolist()
        target_mask: torch.Tensor | None
        # every random draw is made per example over its own unpadded length, so the masks and sampled labels
        # depend on the seed and the examples only, not on the batch size or the padding
        if self.task == "sequence-classification":
            targets = torch.zeros(B, dtype=torch.long)
            for i, e in enumerate(examples):
                if e.label is None:
                    if self.needs_gold:
                        raise StatsError("the empirical label policy needs a label for every example (missing one)")
                    continue
                targets[i] = _label_id(e.label, self.label_map, "label")
            target_mask = None
            uniform = torch.rand(B, generator=self.gen, dtype=torch.float64)
        else:
            uniform = torch.zeros(B, T, dtype=torch.float64)
            mlm_mask = torch.zeros(B, T, dtype=torch.bool)
            eligible = am & ~enc["special_tokens_mask"].bool() if self.task == "masked-lm" else am
            for i, L in enumerate(lengths):
                uniform[i, :L] = torch.rand(L, generator=self.gen, dtype=torch.float64)
                if self.task == "masked-lm":
                    mlm_mask[i, :L] = (torch.rand(L, generator=self.gen) < self.mlm_probability) & eligible[i, :L]
                    if not mlm_mask[i].any() and eligible[i].any():  # at least one target, or no likelihood
                        cand = eligible[i].nonzero().flatten()
                        mlm_mask[i, cand[torch.randint(len(cand), (1,), generator=self.gen)]] = True
        if self.task == "token-classification":
            if not getattr(tok, "is_fast", False):
                raise StatsError("token-classification needs a fast tokenizer (word_ids aligns labels to sub-tokens)")
            targets = torch.zeros(B, T, dtype=torch.long)
            target_mask = torch.zeros(B, T, dtype=torch.bool)
            for i, e in enumerate(examples):
                labels = e.label
                if labels is not None and not isinstance(labels, (list, tuple)):
                    raise StatsError("token-classification labels must be a list with one label per word")
                if labels is None and self.needs_gold:
                    raise StatsError("the empirical label policy needs word labels for every example")
                prev = None
                for t, w in enumerate(enc.word_ids(i)):
                    if w is not None and w != prev:
                        target_mask[i, t] = True
                        if labels is not None:
                            targets[i, t] = _label_id(labels[w], self.label_map, "word label")
                    prev = w
        elif self.task == "causal-lm":
            targets = torch.zeros(B, T, dtype=torch.long)
            targets[:, :-1] = ids[:, 1:]
            target_mask = torch.zeros(B, T, dtype=torch.bool)
            target_mask[:, :-1] = am[:, 1:] & am[:, :-1]
        elif self.task == "masked-lm":
            target_mask = mlm_mask
            targets = torch.where(target_mask, ids, torch.zeros_like(ids))
            inputs["input_ids"] = torch.where(target_mask, torch.full_like(ids, tok.mask_token_id), ids)
        return _Batch(inputs, am, targets, target_mask, uniform, B, int(am.sum()))


def _batches(examples: Iterable[Example], encoder: _Encoder, batch_size: int, limit: int | None) -> Iterator[_Batch]:
    buf: list[Example] = []
    seen = 0
    for e in examples:
        if limit is not None and seen >= limit:
            break
        buf.append(e)
        seen += 1
        if len(buf) == batch_size:
            yield encoder.encode(buf)
            buf = []
    if buf:
        yield encoder.encode(buf)


