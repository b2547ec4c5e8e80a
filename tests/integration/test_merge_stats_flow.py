"""Statistics flow from git into merges (no --stats), and out again: the merged model carries summed
statistics, so merging A+B and then C equals the 3-way merge. Real git, values vs straight formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import git
from safetensors.torch import load_file, save_file

from gittheta_merge.stats.blobs import statistic_to_bytes
from gittheta_merge.stats.statistic import Statistic
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.revisions import read_metadata

SHAPES = {"q.weight": (16, 16), "k.weight": (16, 16), "up.weight": (24, 16), "up.bias": (24,),
          "down.weight": (16, 24), "ln.weight": (16,)}
GRAM_OF = {"q.weight": "q.weight", "k.weight": "q.weight", "up.weight": "up.weight", "down.weight": "down.weight"}
BRANCHES = ("a", "b", "c")


def models(seed: int = 3) -> tuple[dict, dict[str, dict]]:
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return base, {b: {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for b in BRANCHES}


def gram_stat(seed: int) -> Statistic:
    """A Gram blob as the computation writes it: sums, token counts, q/k sharing one input Gram."""
    gen = torch.Generator().manual_seed(100 + seed)
    tensors, counts = {}, {}
    for key in sorted(set(GRAM_OF.values())):
        d = SHAPES[key][1]
        n = 40 + 7 * seed
        x = torch.randn(n, d, generator=gen)
        tensors[key] = (x.T @ x).double()
        counts[key] = n
    return Statistic("gram", tensors, {"sharing": dict(GRAM_OF), "counts": counts, "n_examples": 5, "tokens": 40})


def fisher_stat(seed: int) -> Statistic:
    gen = torch.Generator().manual_seed(200 + seed)
    tensors = {k: torch.rand(s, generator=gen) ** 4 for k, s in SHAPES.items()}
    return Statistic("fisher", tensors, {"sharing": {k: k for k in SHAPES}, "counts": {k: 9 for k in SHAPES},
                                         "n_examples": 9})


def commit_model(repo: Path, sd: dict, msg: str) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(repo / "model.safetensors"))
    git(repo, "add", "model.safetensors", ".gitattributes")
    git(repo, "commit", "-q", "-m", msg)


def attach(repo: Path, stat: Statistic, name: str) -> None:
    blob = repo.parent / f"{name}.safetensors"
    blob.write_bytes(statistic_to_bytes(stat))
    git(repo, "theta", "stats", "add", str(blob), "model.safetensors", "--kind", stat.kind)


def setup(repo: Path, kind: str | None, without: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    base, fts = models()
    git(repo, "theta", "track", "*.safetensors")
    commit_model(repo, base, "base")
    stats = {}
    for i, b in enumerate(BRANCHES):
        git(repo, "checkout", "-q", "-b", b, "main")
        commit_model(repo, fts[b], f"fine-tune {b}")
        if kind and b not in without:
            stats[b] = gram_stat(i) if kind == "gram" else fisher_stat(i)
            attach(repo, stats[b], f"{kind}-{b}")
            git(repo, "commit", "-q", "-m", f"{kind} statistics of {b}")
    git(repo, "checkout", "-q", "main")
    return base, fts, stats


def ref_regmean(ws: list[dict], grams: list[Statistic]) -> dict:
    """RegMean from the formula: W* = (sum_i W_i G_i)(sum_i G_i)^-1; blocks without a Gram averaged."""
    out = {}
    for k in SHAPES:
        if k in GRAM_OF:
            gs = [g.tensors[GRAM_OF[k]] for g in grams]
            num = sum(w[k].double() @ g for w, g in zip(ws, gs))
            out[k] = (num @ torch.linalg.inv(sum(gs))).float()
        else:
            out[k] = sum(w[k] for w in ws) / len(ws)
    return out


def ref_fisher(ws: list[dict], fs: list[Statistic], floor: float = 1e-6) -> dict:
    """Fisher merging from the formula, floor on the target (model 0) only, no normalisation."""
    out = {}
    for k in SHAPES:
        ft = [f.tensors[k].double() for f in fs]
        ft[0] = ft[0].clamp(min=floor)
        out[k] = (sum(f * w[k].double() for f, w in zip(ft, ws)) / sum(ft)).float()
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for k, v in want.items():
        err = float((got[k].double() - v.double()).abs().max() / v.double().abs().max())
        assert err <= tol, (k, err)


def merged_stats(repo: Path) -> dict:
    return read_metadata(Repo.discover(repo), "HEAD", "model.safetensors").stats


@pytest.mark.slow  # statistics computed on three branches, then two chains of merges (~25 s each)
@pytest.mark.parametrize("kind", ["gram", "fisher"])
def test_sequential_merges_with_carried_statistics_equal_the_three_way_merge(repo: Path, kind: str) -> None:
    base, fts, stats = setup(repo, kind)
    if kind == "gram":
        (repo / ".gittheta.toml").write_text('[merge]\nstrategy = "regmean"\n')
    else:
        (repo / ".gittheta.toml").write_text('[merge]\nstrategy = "fisher"\nparams = { normalize = false }\n')
    git(repo, "add", ".gittheta.toml")
    git(repo, "commit", "-q", "-m", "merge settings")
    for b in BRANCHES:  # the settings file reaches every branch (committed on main, merged plainly)
        git(repo, "checkout", "-q", b)
        git(repo, "merge", "-q", "--no-edit", "main")
    git(repo, "checkout", "-q", "-b", "seq", "a")
    git(repo, "merge", "-q", "--no-edit", "b")  # the driver finds both sides' statistics by itself
    entry = merged_stats(repo)[kind]
    assert entry["provenance"]["merged_models"] == 2 and entry["provenance"]["exact"] is True
    assert "fresh" in git(repo, "theta", "stats", "ls").stdout.decode()
    git(repo, "merge", "-q", "--no-edit", "c")  # ours = the A+B merge with its derived statistics
    assert merged_stats(repo)[kind]["provenance"]["merged_models"] == 3
    sequential = load_file(str(repo / "model.safetensors"))

    ws = [fts[b] for b in BRANCHES]
    sts = [stats[b] for b in BRANCHES]
    want = ref_regmean(ws, sts) if kind == "gram" else ref_fisher(ws, sts)
    assert_close(sequential, want)

    git(repo, "checkout", "-q", "-b", "octo", "a")  # the 3-way merge in one commit, statistics from git too
    git(repo, "theta", "merge", "b", "c")
    assert_close(load_file(str(repo / "model.safetensors")), want)
    assert git(repo, "status", "--porcelain").stdout == b""


@pytest.mark.slow  # statistics computed on two branches through the CLI (~16 s)
def test_missing_statistics_name_the_branch_and_the_command(repo: Path) -> None:
    _, fts, _ = setup(repo, "gram", without=("b",))
    git(repo, "config", "theta.merge.strategy", "regmean")
    git(repo, "checkout", "-q", "a")
    ours = (repo / "model.safetensors").read_bytes()
    proc = git(repo, "merge", "--no-edit", "b", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "theirs (b) has no gram statistics" in err
    assert "git theta stats compute model.safetensors --kind gram" in err and "missingStats" in err
    assert (repo / "model.safetensors").read_bytes() == ours
    git(repo, "merge", "--abort")
    proc = git(repo, "theta", "merge", "b", "c", check=False)
    assert proc.returncode != 0 and b"b has no gram statistics" in proc.stderr

    git(repo, "config", "theta.merge.missingStats", "average")  # the documented fallback
    proc = git(repo, "merge", "--no-edit", "b")
    assert b"merged with average instead of regmean" in proc.stderr
    got = load_file(str(repo / "model.safetensors"))
    for k in SHAPES:
        assert torch.allclose(got[k], (fts["a"][k] + fts["b"][k]) / 2, atol=1e-6)
    assert "stats" not in read_metadata(Repo.discover(repo), "HEAD", "model.safetensors").extra


@pytest.mark.slow  # statistics computed, weights changed, merged twice (~21 s)
def test_stale_statistics_are_refused_unless_allowed(repo: Path) -> None:
    base, fts, stats = setup(repo, "fisher")
    git(repo, "checkout", "-q", "b")
    changed = dict(fts["b"], **{"ln.weight": fts["b"]["ln.weight"] + 1})
    commit_model(repo, changed, "retrain b after computing its Fisher")  # the Fisher stays attached, stale
    git(repo, "config", "theta.merge.strategy", "fisher")
    git(repo, "checkout", "-q", "a")
    proc = git(repo, "merge", "--no-edit", "b", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "model.safetensors on theirs (b)" in err and "stale" in err
    assert "--allow-stale-stats" in err
    git(repo, "merge", "--abort")
    proc = git(repo, "theta", "merge", "b", check=False)
    assert proc.returncode != 0 and b"on b" in proc.stderr and b"--allow-stale-stats" in proc.stderr
    git(repo, "theta", "merge", "b", "--allow-stale-stats", "--set", "normalize=false")
    got = load_file(str(repo / "model.safetensors"))
    want = ref_fisher([fts["a"], changed], [stats["a"], stats["b"]])
    assert_close(got, want)


def test_explicit_statistics_files_still_work(repo: Path, tmp_path: Path) -> None:
    base, fts, _ = setup(repo, None)
    sts = [gram_stat(i) for i in range(2)]
    files = []
    for i, st in enumerate(sts):  # plain files keyed by weight name (no sharing map): k's Gram spelled out
        p = tmp_path / f"g{i}.safetensors"
        save_file({w: st.tensors[key].clone() for w, key in GRAM_OF.items()}, str(p))
        files.append(str(p))
    git(repo, "checkout", "-q", "a")
    git(repo, "theta", "merge", "b", "--strategy", "regmean", "--stats", f"gram={files[0]},{files[1]}")
    assert_close(load_file(str(repo / "model.safetensors")), ref_regmean([fts["a"], fts["b"]], sts))
    assert merged_stats(repo)["gram"]["provenance"]["merged_models"] == 2  # derived from the files too


@pytest.mark.slow  # Grams computed on three branches through the CLI (~17 s)
def test_regmean_normalize_reads_the_token_counts_from_git(repo: Path) -> None:
    """`--set normalize=true`: each branch's Gram divided by the token count its committed blob records (40, 47
    and 54 tokens here), which is the formula with mean Grams; the merged model's derived statistic says it is not
    exact (a later merge recomputes the means)."""
    base, fts, stats = setup(repo, "gram")
    git(repo, "checkout", "-q", "-b", "octo", "a")
    git(repo, "theta", "merge", "b", "c", "--strategy", "regmean", "--set", "normalize=true")
    means = [Statistic("gram", {k: v / s.provenance["counts"][k] for k, v in s.tensors.items()}, s.provenance)
             for s in (stats[b] for b in BRANCHES)]
    got = load_file(str(repo / "model.safetensors"))
    assert_close(got, ref_regmean([fts[b] for b in BRANCHES], means))
    sums = ref_regmean([fts[b] for b in BRANCHES], [stats[b] for b in BRANCHES])
    assert float((got["q.weight"] - sums["q.weight"]).abs().max()) > 1e-4  # the counts differ: so do the merges
    assert merged_stats(repo)["gram"]["provenance"]["exact"] is False
