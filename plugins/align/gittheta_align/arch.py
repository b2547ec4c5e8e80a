"""Which architecture a model is, and the sizes its alignment sites need. One module per family says where each
tensor sits (`roles`) and where each site's features are read (`capture_points`): bert.py (post-LayerNorm
encoders), llama.py (pre-RMSNorm decoders with rotary embeddings and grouped-query attention)."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gittheta_merge.errors import InputError

BERT_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
LLAMA_TYPES = ("llama", "mistral", "qwen2")
POOLED_HEADS = ("BertForSequenceClassification", "BertForMultipleChoice", "BertForNextSentencePrediction",
                "BertForPreTraining")


@dataclass(frozen=True)
class Shape:
    """The sizes the sites need, read from a model's config."""

    family: str  # "bert" | "llama"
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    n_kv_heads: int
    head_dim: int
    architecture: str = ""  # config.json's architectures[0]: what a task head reads

    @property
    def pooled_head(self) -> bool | None:
        """Whether a `classifier` reads the pooler's output (BERT's sequence classification) rather than hidden
        states (token classification, RoBERTa/ELECTRA heads); None when the config does not say."""
        if not self.architecture:
            return None
        return self.architecture in POOLED_HEADS

    @property
    def d_head(self) -> int:
        return self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        model_type = config.get("model_type", "")
        heads = config["num_attention_heads"]
        architecture = (config.get("architectures") or [""])[0] or ""
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        if model_type in BERT_TYPES:
            if config.get("embedding_size", config["hidden_size"]) != config["hidden_size"]:
                raise InputError(f"embedding_size {config['embedding_size']} != hidden_size {config['hidden_size']}: "
                                 "a projected embedding (ELECTRA's embeddings_project) is not supported by alignment")
            if config.get("position_embedding_type", "absolute") != "absolute":
                raise InputError("alignment supports absolute position embeddings only "
                                 f"(this config: {config['position_embedding_type']!r})")
            return cls("bert", config["num_hidden_layers"], config["hidden_size"], heads,
                       config["intermediate_size"], heads, head_dim, architecture)
        if model_type in LLAMA_TYPES:
            kv = config.get("num_key_value_heads") or heads
            return cls("llama", config["num_hidden_layers"], config["hidden_size"], heads,
                       config["intermediate_size"], kv, head_dim, architecture)
        raise InputError(f"alignment supports the BERT family ({', '.join(BERT_TYPES)}) and Llama-family decoders "
                         f"({', '.join(LLAMA_TYPES)}); this config is model_type {model_type!r}")

    @property
    def module(self) -> ModuleType:
        from gittheta_align import bert, llama

        return bert if self.family == "bert" else llama

    def residual_sites(self) -> list[str]:
        return self.module.residual_sites(self)

    def roles(self, name: str) -> tuple[str | None, str | None]:
        return self.module.roles(name, self)

    def capture_points(self, model: Any) -> dict[str, tuple[Any, str]]:
        return self.module.capture_points(model, self)

    def site_dim(self, site: str) -> int:
        if site.startswith("ff@"):
            return self.d_ff
        if site.startswith(("attn@", "q@", "qk@")):
            return self.n_heads * self.head_dim
        if site.startswith(("kv@", "v@")):
            return self.n_kv_heads * self.head_dim
        return self.d_model
