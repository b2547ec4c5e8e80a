"""`git theta align`: permute models trained from different initializations into one model's coordinates.

    git theta align seed-a seed-b --data text.jsonl            # B aligned to A, committed on seed-b-aligned
    git theta align --to seed-a seed-b seed-c --data text.txt  # each aligned to seed-a
    git theta merge seed-a seed-b-aligned --strategy average

The aligned commit's child of B: the same tree with B's weights permuted (the model computes the same function
where the options are function-preserving), and an `alignment` statistic attached to the weights (the joint
feature statistics, the permutations and their provenance), so `git theta stats ls` shows how it was made.
"""

from __future__ import annotations

import io
import json
from typing import Any

import click

from gittheta_merge.errors import InputError, UsageError

KIND = "alignment"


def _size(text: str | None) -> int | None:
    from gittheta_merge.merge.commands import parse_size

    try:
        return parse_size(text)
    except UsageError:
        raise UsageError(f"--max-memory {text!r}: a size such as 2GB or 500MB") from None


def _texts(path: str, field: str, limit: int) -> list[str]:
    """Sentences from a .jsonl file (one JSON object per line, text under `field`) or a plain text file (a line
    each); empty lines skipped."""
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{n}: not JSON ({exc.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get(field), str):
                        raise InputError(f"{path}:{n}: no text field {field!r} (use --text-field)")
                    line = row[field]
                texts.append(line)
                if len(texts) >= limit:
                    break
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the data ({exc.strerror})") from None
    if not texts:
        raise InputError(f"{path}: no text in it; alignment needs sentences to run both models on")
    return texts


@click.command("align")
@click.argument("revs", nargs=-1, required=True)
@click.option("--to", "reference", default=None, help="The model the others are aligned to (default: the first REV).")
@click.option("--data", "data_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Text to run both models on: .jsonl (see --text-field) or plain text, one sentence a line.")
@click.option("--stats-from", default=None, metavar="REV",
              help="Instead of --data: reuse the joint statistics of an earlier alignment (the commit it made) and "
                   "only match again, e.g. with other options; refused as stale if either model changed since.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--max-sentences", default=1000, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--path", "folder", default=None, help="The model directory in the repository (found when only one).")
@click.option("--components", default="ff+attn+res", show_default=True,
              help="What to align: a +-joined subset of ff, attn, res.")
@click.option("--heads", default="permute", show_default=True, type=click.Choice(["permute", "monotonic", "ignore"]),
              help="Attention heads: matched as whole heads then within (permute), kept in place (monotonic), or "
                   "ignored, one flat matching (not function-preserving).")
@click.option("--residual", default="first", show_default=True, type=click.Choice(["first", "last", "all", "sep"]),
              help="The residual permutation from the embeddings' site, the last layer's, all averaged, or one per "
                   "site (sep: not function-preserving).")
@click.option("--qk", is_flag=True, help="BERT: Q and K permuted within each matched head from their own statistics "
              "(the query and key outputs), instead of following V; still function-preserving.")
@click.option("--max-memory", default=None, help="At most this much for the statistics at once (e.g. 2GB): sites are "
              "split into passes over the data, each running both models again; the plan is printed first.")
@click.option("--into", default=None, help="Branch for the aligned model (default: REV-aligned; one REV only).")
@click.option("--force", is_flag=True, help="Replace the branch if it exists.")
def align(revs: tuple[str, ...], reference: str | None, data_path: str, text_field: str, max_sentences: int,
          batch_size: int, max_length: int, folder: str | None, components: str, heads: str, residual: str,
          qk: bool, max_memory: str | None, stats_from: str | None, into: str | None, force: bool) -> None:
    """Permute models trained from different initializations into one model's coordinates (Verma & Elbayad
    2024), so that merging them averages matching features. Commits each aligned model on a branch."""
    from gittheta_align.matching import Options
    from gittheta_merge.storage.gitutil import Repo

    options = Options.parse(components, heads, residual, qk)
    repo = Repo.discover()
    ref = reference if reference is not None else revs[0]
    others = [r for r in revs if r != ref] if reference is None else list(revs)
    if not others:
        raise UsageError("name a model to align and the one to align it to (git theta align A B)")
    if into is not None and len(others) > 1:
        raise UsageError("--into names one branch: align one model at a time with it")
    if (data_path is None) == (stats_from is None):
        raise UsageError("give the text to run the models on (--data FILE), or reuse statistics (--stats-from REV)")
    texts = _texts(data_path, text_field, max_sentences) if data_path else []
    max_bytes = _size(max_memory)
    for rev in others:
        branch = into or f"{rev}-aligned"
        result = align_one(repo, ref, rev, texts, data_path, options, folder, branch, force, batch_size, max_length,
                           echo=lambda line: click.echo(line, err=True), max_bytes=max_bytes,
                           stats_from=stats_from)
        click.echo(f"aligned {rev} to {ref}: {result['commit'][:12]} on {branch} ({result['summary']})")


def align_branches(repo: Any, reference: str, branches: list[str], data_path: str, echo: Any = print) -> list[str]:
    """For `git theta merge --align`: each branch aligned to `reference` with the default options, committed on
    BRANCH-aligned (an existing branch of that name is refused, never replaced); returns those names."""
    from gittheta_align import gitflow
    from gittheta_align.matching import Options

    texts = _texts(data_path, "text", 1000)
    out = []
    for rev in branches:
        branch = f"{rev}-aligned"
        if repo.git("check-ref-format", "--branch", branch, check=False).strip() == b"":
            raise UsageError(f"--align commits {rev}'s aligned model on a branch named after it, and {branch!r} is not "
                             "a valid branch name: name branches, or align by hand (git theta align --into NAME)")
        if gitflow.resolve_branch(repo, branch) is not None:
            if not gitflow.is_alignment_of(repo, branch, reference, rev):
                raise UsageError(f"branch {branch} exists and is not an alignment of {rev} to {reference}'s current "
                                 f"model: delete it (git branch -D {branch}) or align by hand with --into NAME")
            echo(f"git-theta: {branch} already aligns {rev} to {reference}: reusing it")
        else:
            result = align_one(repo, reference, rev, texts, data_path, Options(), None, branch, False, echo=echo)
            echo(f"git-theta: aligned {rev} to {reference}: {result['commit'][:12]} on {branch} "
                 f"({result['summary']})")
        out.append(branch)
    return out


def align_one(repo: Any, ref: str, rev: str, texts: list[str], data_path: str | None, options: Any,
              folder: str | None, branch: str, force: bool, batch_size: int = 8, max_length: int = 128,
              echo: Any = print, max_bytes: int | None = None, stats_from: str | None = None) -> dict:
    """Align `rev`'s model to `ref`'s and commit it on `branch`; returns the commit and a one-line summary."""
    import numpy as np

    from gittheta_align import gitflow
    from gittheta_align.matching import permutations
    from gittheta_merge.stats.blobs import write_blob
    from gittheta_merge.stats.data import file_digest
    from gittheta_merge.storage.revisions import tracked_files
    from gittheta_merge.storage.store import ObjectStore

    a, b = gitflow.resolve(repo, ref), gitflow.resolve(repo, rev)
    folder = gitflow.model_dir(repo, b, folder)
    shape_a, _ = gitflow.shape_at(repo, a, folder)
    shape_b, _ = gitflow.shape_at(repo, b, folder)
    if shape_a != shape_b:
        raise InputError(f"{folder or '.'}/config.json: {ref} and {rev} have different architectures "
                         f"({shape_a} vs {shape_b}); alignment matches models of one shape")
    gitflow.check_same_tokenizer(repo, a, b, folder)
    sites = options.sites(shape_b)
    weights = {"reference": gitflow.weights_digests(repo, a, folder),
               "aligned": gitflow.weights_digests(repo, b, folder)}
    if stats_from is not None:
        stats, data_info = _reused_statistics(repo, stats_from, folder, sites, weights, ref, rev)
        echo(f"git-theta: align {rev} to {ref}: {len(sites)} sites from the statistics of {stats_from} "
             f"({data_info.get('sentences')} sentences); matching only")
    else:
        stats = _computed_statistics(repo, a, b, folder, shape_b, sites, texts, batch_size, max_length, max_bytes,
                                     f"{rev} to {ref}", echo)
        data_info = {"file": data_path, "digest": file_digest(str(data_path)), "sentences": len(texts),
                     "tokens": next(iter(stats.values())).n, "max_length": max_length}
    tokens = data_info.get("tokens")
    perms = permutations(stats, shape_b, options)
    provenance = {
        "method": "Verma & Elbayad 2024 permutation alignment", "reference": a, "aligned": b, "weights": weights,
        "data": data_info,
        "options": {"components": "+".join(options.components), "heads": options.heads,
                    "residual": options.residual, "qk": options.qk},
        "function_preserving": options.function_preserving(), "sites": sites,
    }
    tensors = {}
    for site, st in stats.items():
        tensors.update({k: _torch(v) for k, v in st.tensors(site).items()})
    for site, perm in perms.items():
        tensors[f"perm.{site}"] = _torch(np.asarray(perm, dtype=np.int64))
    out = io.BytesIO()
    write_blob(KIND, tensors, provenance, out)
    blob = out.getvalue()
    store = ObjectStore.for_repo(repo)
    files = {}
    for path, meta in tracked_files(repo, b).items():
        if folder and not path.startswith(folder + "/"):
            continue
        if meta.format != "safetensors":
            raise InputError(f"{path}: alignment rewrites safetensors weights (this file is {meta.format})")
        aligned = gitflow.aligned_metadata(repo, meta, shape_b, perms)
        oid, _ = store.put(blob)
        aligned.extra["stats"] = {KIND: {"oid": oid, "size": len(blob), "weights": aligned.weights_digest(),
                                         "provenance": provenance}}
        files[path] = aligned.to_bytes()
    moved = sum(int(not np.array_equal(p, np.arange(len(p)))) for p in perms.values())
    summary = (f"{moved} of {len(perms)} sites permuted, {tokens} tokens; "
               f"{'function-preserving' if options.function_preserving() else 'NOT function-preserving'}")
    message = f"Align {rev} to {ref} ({'+'.join(options.components)}, heads {options.heads}, " \
              f"residual {options.residual}{', q/k from their own statistics' if options.qk else ''})\n\n{summary}\n"
    commit = gitflow.commit_on_branch(repo, b, files, branch, message, force)
    return {"commit": commit, "summary": summary, "perms": perms, "stats": stats}


def _computed_statistics(repo: Any, a: str, b: str, folder: str, shape: Any, sites: list[str], texts: list[str],
                         batch_size: int, max_length: int, max_bytes: int | None, what: str, echo: Any) -> dict:
    """Both models run on the texts, in as many passes as --max-memory asks."""
    import transformers

    from gittheta_align import gitflow
    from gittheta_align.features import batches_from_texts, joint_statistics, plan_passes, site_bytes
    from gittheta_merge.errors import human_bytes
    from gittheta_merge.progress import Progress

    passes = plan_passes(shape, sites, max_bytes)
    largest = max(sum(site_bytes(shape, s) for s in p) for p in passes)
    echo(f"git-theta: align {what}: {len(sites)} sites, {len(texts)} sentences, {len(passes)} "
         f"pass{'es' if len(passes) > 1 else ''} over the data; statistics "
         f"{human_bytes(sum(site_bytes(shape, s) for s in sites))} in all, at most {human_bytes(largest)} at once "
         "(float64)")
    with gitflow.checked_out(repo, a, folder) as dir_a, gitflow.checked_out(repo, b, folder) as dir_b:
        model_a, model_b = gitflow.load_model(dir_a), gitflow.load_model(dir_b)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(dir_a))
        stats: dict = {}
        for number, sites_now in enumerate(passes, 1):
            label = f"pass {number}/{len(passes)}: " if len(passes) > 1 else ""
            bar = Progress(f"align: {label}running both models on {len(texts)} sentences", len(texts))
            stats.update(joint_statistics(model_a, model_b, _counted(batches_from_texts(
                tokenizer, texts, batch_size, max_length), bar), shape, sites_now))
            bar.close()
    return stats


def _reused_statistics(repo: Any, rev: str, folder: str, sites: list[str], weights: dict, ref: str,
                       aligned: str) -> tuple[dict, dict]:
    """The joint statistics an earlier alignment stored at `rev`, if they describe exactly these two models."""
    from safetensors.numpy import load

    from gittheta_align import gitflow
    from gittheta_align.features import SiteStats
    from gittheta_merge.storage.store import ObjectStore

    entry = gitflow.alignment_entry(repo, gitflow.resolve(repo, rev), folder)
    if entry is None:
        raise UsageError(f"{rev}: no alignment statistic there (the commit `git theta align` made has one)")
    stored = entry["provenance"].get("weights") or {}
    for role, name in (("reference", ref), ("aligned", aligned)):
        if stored.get(role) != weights[role]:
            raise UsageError(f"the statistics at {rev} are stale: {name}'s weights are not the ones they were computed "
                             "on; run the alignment with --data again")
    store = ObjectStore.for_repo(repo)
    tensors = load(store.read(entry["oid"], entry["size"], f"{rev}: alignment statistic: "))
    missing = [s for s in sites if f"{s}.cross" not in tensors]
    if missing:
        raise UsageError(f"the statistics at {rev} do not cover {', '.join(missing[:4])}"
                         f"{' …' if len(missing) > 4 else ''} (computed for other components or residual choices); "
                         "run the alignment with --data again")
    return {s: SiteStats.from_tensors(s, tensors) for s in sites}, dict(entry["provenance"].get("data") or {})


def _counted(batches: Any, bar: Any) -> Any:
    """The batches, with the progress bar counting sentences."""
    done = 0
    for batch in batches:
        yield batch
        done += len(batch["input_ids"])
        bar.update(done, 0)


def _torch(array: Any) -> Any:
    import torch

    return torch.from_numpy(array.copy())
