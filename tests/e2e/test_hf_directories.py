"""merge-files over Hugging Face model directories: sharded inputs (model.safetensors.index.json) are read as one
checkpoint, and a directory output is sharded above --shard-size with an index transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def test_sharded_directories_in_and_out(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    states = []
    for i in range(2):
        torch.manual_seed(i)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(tmp_path / f"m{i}", max_shard_size="20KB")  # several shards and an index
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        assert (tmp_path / f"m{i}" / "model.safetensors.index.json").is_file()
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", str(tmp_path / "m0"),
                           str(tmp_path / "m1"), "-o", str(out), "--shard-size", "30KB"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for k, v in states[0].items()
                                                  if k in index["weight_map"])
    from safetensors import safe_open

    for shard in shards:  # none above the shard size, except a single tensor larger than it
        with safe_open(str(out / shard), "pt") as fh:
            sizes = [fh.get_slice(k).get_shape() for k in fh.keys()]
        total = sum(4 * torch.Size(s).numel() for s in sizes)
        assert total <= 30_000 or len(sizes) == 1, (shard, total)
    (out / "config.json").write_text((tmp_path / "m0" / "config.json").read_text())
    merged = LlamaForCausalLM.from_pretrained(out).state_dict()
    for name, a in states[0].items():
        if name in index["weight_map"]:
            assert torch.allclose(merged[name], (a + states[1][name]) / 2, atol=1e-6), name
    small = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", str(tmp_path / "m0"),
                            str(tmp_path / "m1"), "-o", str(tmp_path / "one")], capture_output=True, text=True)
    assert small.returncode == 0, small.stderr  # under the default 5 GB: one model.safetensors, no index
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["model.safetensors"]
    again = subprocess.run([sys.executable, "-m", "gittheta_merge", "merge-files", str(tmp_path / "m0"),
                            str(tmp_path / "m1"), "-o", str(tmp_path / "one"), "--shard-size", "30KB"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # into the same folder, sharded now: no stale model.safetensors
    assert "model.safetensors" not in [p.name for p in (tmp_path / "one").iterdir()]
