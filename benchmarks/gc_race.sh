#!/usr/bin/env bash
# Usage: bash benchmarks/gc_race.sh   (WORKDIR=/tmp/gc-race by default; needs ~4.5 GB of disk; docs/reliability.md)
# The issue's reproduction: gc --prune now while `git add` of a new version runs; then fsck and a checkout round trip.
set -u
W=${WORKDIR:-/tmp/gc-race}/w; rm -rf $W; mkdir -p $W; cd $W
git init -q -b main && git config user.email t@e && git config user.name t && git theta install >/dev/null
python - <<'PY'
import torch
from safetensors.torch import save_file
for v in (1, 2):
    g = torch.Generator().manual_seed(v)
    save_file({f"layer{i}.weight": torch.randn(1024, 4096, generator=g) for i in range(64)}, f"../v{v}.safetensors")
PY
ls -la $W/../v1.safetensors | awk '{print "model bytes:", $5}'
git theta track model.safetensors >/dev/null
cp $W/../v1.safetensors model.safetensors && git add . && git commit -qm v1
cp $W/../v2.safetensors model.safetensors
start=$(date +%s.%N)
git add model.safetensors & ADD=$!
sleep 1.5
echo "--- gc --prune now --no-wait (add still running: $(kill -0 $ADD 2>/dev/null && echo yes || echo no))"
git theta gc --prune now --no-wait; echo "rc=$?"
echo "--- gc --prune now"
git theta gc --prune now; echo "rc=$?"
wait $ADD; echo "add rc=$?"
end=$(date +%s.%N); echo "add+gc wall: $(echo "$end - $start" | bc) s"
git commit -qm v2
git theta fsck | tail -1
git checkout -q HEAD~1 && git checkout -q main && cmp model.safetensors $W/../v2.safetensors && echo "v2 byte-identical after checkout round trip"
