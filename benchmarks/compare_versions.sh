#!/usr/bin/env bash
# Same inputs, two versions of this tool: the README quickstart's models (base + 3 fine-tunes) tracked, merged
# with `git theta merge` (ties) and with a plain `git merge` (task arithmetic driver), checked out, and diffed with
# `git theta diff`; prints the sha256 of every output under each version and whether they are byte-identical.
# Used to prove a refactoring changed no behaviour.
#   bash benchmarks/compare_versions.sh OLD_REV [WORKDIR]      (new = the working tree)
set -euo pipefail
OLD_REV=${1:?usage: compare_versions.sh OLD_REV [WORKDIR]}
WORK=${2:-/tmp/compare-versions}
SRC="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$WORK"; mkdir -p "$WORK"
git -C "$SRC" worktree add -f --detach "$WORK/old-src" "$OLD_REV" >/dev/null 2>&1
trap 'git -C "$SRC" worktree remove --force "$WORK/old-src" >/dev/null 2>&1 || true' EXIT
(cd "$WORK/old-src" && python setup.py -q build_ext --inplace >/dev/null 2>&1 || true)
(cd "$SRC" && python setup.py -q build_ext --inplace >/dev/null 2>&1 || true)

python - "$WORK" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file
work = sys.argv[1]
torch.manual_seed(0)
base = {f"layer{i}.weight": torch.randn(512, 512) for i in range(24)}
save_file(base, f"{work}/base.safetensors")
for task in "abc":
    sd = dict(base)
    g = torch.Generator().manual_seed(ord(task))
    for name in ("layer3.weight", "layer7.weight", f"layer{10 + ord(task) % 3}.weight"):
        sd[name] = sd[name] + 0.01 * torch.randn(sd[name].shape, generator=g)
    save_file(sd, f"{work}/task-{task}.safetensors")
PY

DEPS=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")  # torch, numpy, … of this env

env_for() {  # a venv that sees this env's dependencies but the package only from $1 (no editable finder)
  local pkg=$1 venv=$2
  python -m venv --without-pip "$venv"
  local site; site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  printf '%s\n%s\n' "$pkg" "$DEPS" > "$site/compare-versions.pth"  # plain paths: their own .pth files are not run
  printf '#!%s\nfrom gittheta_merge.cli import main\nmain()\n' "$venv/bin/python" > "$venv/bin/git-theta"
  chmod +x "$venv/bin/git-theta"
  "$venv/bin/python" -c "import gittheta_merge, sys; assert gittheta_merge.__file__.startswith(sys.argv[1]), gittheta_merge.__file__" "$pkg"
}

run() {  # run the scenario with the package from $1, outputs under $2
  local pkg=$1 out=$2
  mkdir -p "$out"; cd "$WORK"  # not in the source tree: '' on sys.path would find its package
  env_for "$pkg" "$out/venv"
  local saved_path=$PATH
  export PATH="$out/venv/bin:$PATH"
  local repo="$out/repo"
  git init -q -b main "$repo"; cd "$repo"
  git config user.email t@e; git config user.name t
  git theta install >/dev/null; git theta track model.safetensors >/dev/null
  cp "$WORK/base.safetensors" model.safetensors; git add .gitattributes model.safetensors
  GIT_COMMITTER_DATE=2026-01-01T00:00:00 GIT_AUTHOR_DATE=2026-01-01T00:00:00 git commit -qm base
  for t in a b c; do
    git checkout -q -b task-$t main; cp "$WORK/task-$t.safetensors" model.safetensors
    GIT_COMMITTER_DATE=2026-01-01T00:00:00 GIT_AUTHOR_DATE=2026-01-01T00:00:00 git commit -qam "task $t"
  done
  git checkout -q main
  git show task-a:model.safetensors > "$out/metadata-task-a.txt"
  git theta diff main task-a > "$out/diff.txt"
  git theta merge task-a task-b task-c --strategy ties --set density=0.2 >/dev/null 2>&1
  cp model.safetensors "$out/ties.safetensors"
  git show HEAD:model.safetensors > "$out/metadata-ties.txt"
  git checkout -q -b pair task-a
  git config theta.merge.strategy task_arithmetic; git config theta.merge.lambda 0.5
  git merge -q --no-edit task-b >/dev/null 2>&1
  cp model.safetensors "$out/ta-driver.safetensors"
  rm model.safetensors; git checkout -- model.safetensors; cp model.safetensors "$out/checkout.safetensors"
  git theta fsck | tail -1 > "$out/fsck.txt"
  cd "$WORK"; export PATH=$saved_path
}
run "$WORK/old-src" "$WORK/old"
run "$SRC" "$WORK/new"

same=0; differ=0
for f in metadata-task-a.txt diff.txt ties.safetensors metadata-ties.txt ta-driver.safetensors checkout.safetensors fsck.txt; do
  a=$(sha256sum < "$WORK/old/$f" | cut -c1-16); b=$(sha256sum < "$WORK/new/$f" | cut -c1-16)
  if [ "$a" = "$b" ]; then verdict=identical; same=$((same+1)); else verdict=DIFFERENT; differ=$((differ+1)); fi
  printf '%-24s old %s  new %s  %s\n' "$f" "$a" "$b" "$verdict"
done
echo "$same identical, $differ different (old = $OLD_REV, new = working tree)"
[ "$differ" = 0 ]
