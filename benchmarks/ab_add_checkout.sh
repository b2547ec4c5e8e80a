#!/usr/bin/env bash
# A/B: the first `git add` and a checkout of MODEL, old (OLD_REV) vs new (the working tree), alternated 4 rounds,
# each version in its own venv.   bash benchmarks/ab_add_checkout.sh 99e2e75 /tmp/mb/base.safetensors
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"; OLD_REV=${1:?usage: ab_add_checkout.sh OLD_REV MODEL.safetensors}; MODEL=${2:?model file}; W=${WORKDIR:-/tmp/ab}; rm -rf $W; mkdir -p $W
git -C $SRC worktree add -f --detach $W/old-src $OLD_REV >/dev/null 2>&1
(cd $W/old-src && python setup.py -q build_ext --inplace >/dev/null 2>&1 || true)
DEPS=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkenv() { python -m venv --without-pip $2; site=$($2/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  printf '%s\n%s\n' $1 $DEPS > $site/ab.pth; printf '#!%s\nfrom gittheta_merge.cli import main\nmain()\n' $2/bin/python > $2/bin/git-theta; chmod +x $2/bin/git-theta; }
cd $W; mkenv $W/old-src $W/old-env; mkenv $SRC $W/new-env
for round in 1 2 3 4; do for v in old new; do
  export PATH=$W/$v-env/bin:$(echo $PATH | sed "s#$W/[a-z]*-env/bin:##g")
  r=$W/repo-$v; rm -rf $r; git init -q -b main $r; cd $r; git config user.email a@b; git config user.name a
  git theta install >/dev/null; git theta track model.safetensors >/dev/null; cp $MODEL model.safetensors
  sleep 2  # settle the racy-git window
  a=$(date +%s.%N); git add model.safetensors; b=$(date +%s.%N)
  git commit -qm v1; rm model.safetensors; sleep 1
  c=$(date +%s.%N); git checkout -- model.safetensors; d=$(date +%s.%N)
  printf 'round %d %s: add %.2f s, checkout %.2f s\n' $round $v $(echo "$b - $a" | bc) $(echo "$d - $c" | bc)
  cd $W
done; done
git -C $SRC worktree remove --force $W/old-src
