"""git's clean/smudge filter: the long-running process (filter.theta.process) and single-shot commands.

One Python process serves a whole `git add`/`git checkout` (torch's import alone costs seconds, so one
process per file would be slow). clean: checkpoint bytes → objects + metadata. smudge: metadata +
objects → checkpoint bytes. Content that is already metadata is passed through on clean, and content
that is not metadata (a raw file committed before tracking, a git-lfs pointer) is passed through on
smudge, so the filter never destroys data it does not understand.
"""

from __future__ import annotations

import io
import sys
import traceback
from pathlib import Path
from typing import BinaryIO

from gittheta_merge import formats
from gittheta_merge.errors import InputError, ThetaError, human_bytes, require_space, storage_error
from gittheta_merge.filter.pktline import PktReader, PktWriter
from gittheta_merge.formats.base import Context
from gittheta_merge.formats.streams import PrefixedStream, read_head
from gittheta_merge.progress import Progress
from gittheta_merge.storage.gitutil import Repo
from gittheta_merge.storage.metadata import Metadata, configured_block_bytes, is_metadata
from gittheta_merge.storage.store import MissingObject, ObjectStore

PROGRESS_MIN_BYTES = 32 << 20


class Filter:
    """clean and smudge for one repository."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.store = ObjectStore.for_repo(repo)
        self.max_block_bytes = configured_block_bytes(repo)
        self.scratch = repo.common_dir / "theta" / "tmp"
        self.auto_fetch = repo.config_bool("theta.autoFetch", True) and bool(repo.git("remote").strip())
        from gittheta_merge.storage.materialize import threshold

        self.materialize_bytes = threshold(repo)  # above it, smudge gives git a placeholder (storage/materialize.py)

    def context(self, path: str, label: str, total_bytes: int | None = None,
                total_tensors: int | None = None) -> tuple[Context, Progress]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        bar = Progress(f"git-theta {label} {path}", total_tensors, total_bytes)
        ctx = Context(path, self.store, self.max_block_bytes, str(self.scratch), bar.update)
        return ctx, bar

    def require_checkout_space(self, path: str, size: int) -> None:
        """git writes what we give it into the work tree (after removing the old file): refuse up front, with the
        numbers, when it cannot fit, instead of git's error after it has removed the old version."""
        target = self.repo.root / path
        try:
            reclaimed = target.stat().st_size
        except OSError:
            reclaimed = 0
        require_space(target.parent, size - reclaimed, f"{path}: checking out {human_bytes(size)}")

    def clean(self, path: str, stream: BinaryIO, out: BinaryIO) -> None:
        from gittheta_merge.storage.materialize import recognise

        known = recognise(self.repo, path, stream)  # a file we materialized, unchanged: no re-hash
        if known is not None:
            meta = Metadata.from_bytes(known, path)
            before = dict(meta.stats)
            self.carry_over_stats(path, meta)  # statistics staged since the checkout stay attached
            self.store.require_present(meta.iter_objects(), path)
            out.write(known if meta.stats == before else meta.to_bytes())
            return
        head = read_head(stream, 64)
        if not head:
            raise InputError(f"{path}: file is empty: not a checkpoint")
        if is_metadata(head):
            data = head + stream.read()
            Metadata.from_bytes(data, path)  # validate before accepting it
            out.write(data)
            return
        fmt = formats.detect(path, head)
        ctx, bar = self.context(path, "clean")
        try:
            meta = fmt.clean(PrefixedStream(head, stream), ctx)
        finally:
            bar.close()
        self.carry_over_stats(path, meta)
        self.store.require_present(meta.iter_objects(), path)  # never answer git with an object that is gone
        out.write(meta.to_bytes())

    def carry_over_stats(self, path: str, meta: Metadata) -> None:
        """Keep the statistics attached to the staged version of this file.

        Statistic blobs are not part of the checkpoint file, so clean would drop them; carrying them
        over keeps `git status` clean after `git theta stats compute`, and once the weights change
        they stay attached but are reported stale (their recorded weights digest no longer matches).
        """
        from gittheta_merge.storage.revisions import INDEX, read_metadata

        try:
            staged = read_metadata(self.repo, INDEX, path)
        except ThetaError:
            return  # an unreadable staged version carries nothing over
        stats = staged.stats if staged is not None else {}
        if stats:
            meta.extra["stats"] = stats

    def parse_for_smudge(self, path: str, data: bytes, commit: str = "") -> Metadata:
        meta = Metadata.from_bytes(data, path)
        context = f" (commit {commit})" if commit else ""
        if self.auto_fetch and self._missing(meta):
            from gittheta_merge.storage import transfer

            transfer.fetch_objects(self.repo, list(transfer.needs_of(meta, path)), context=context)
        missing = self._missing(meta)
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise MissingObject(
                f"{path}{context}: {len(missing)} tensor(s) have no local object: {shown}. "
                "Fetch them (git theta pull-objects, or git lfs fetch) from a remote that has them"
            )
        return meta

    def _missing(self, meta: Metadata) -> list[str]:
        names = [t.name for t in meta.tensors if any(not self.store.has(o) for o in t.oids)]
        names += [f"<{oid[:12]}…>" for oid, _ in meta.iter_extra_objects() if not self.store.has(oid)]
        return names

    def smudge_meta(self, path: str, meta: Metadata, out: BinaryIO) -> None:
        self.require_checkout_space(path, meta.total_bytes)
        fmt = formats.by_name(meta.format)
        ctx, bar = self.context(path, "smudge", meta.total_bytes, len(meta.tensors))
        try:
            fmt.smudge(meta, out, ctx)
        finally:
            bar.close()

    def is_placeholder_size(self, path: str, data: bytes) -> bool:
        """Above theta.materializeBytes the checkout gets the metadata itself as a placeholder, which the hooks
        then replace by the real file written straight from the store (storage/materialize.py)."""
        return Metadata.from_bytes(data, path).total_bytes > self.materialize_bytes

    def smudge_full(self, path: str, data: bytes, out: BinaryIO) -> None:
        """The real file for content git holds (metadata or a raw file), whatever its size: for callers that write
        the file themselves, not git's checkout (no placeholder)."""
        if not is_metadata(data[:64]):
            out.write(data)
            return
        self.smudge_meta(path, self.parse_for_smudge(path, data), out)

    def smudge(self, path: str, stream: BinaryIO, out: BinaryIO) -> None:
        head = read_head(stream, 64)
        if not is_metadata(head):
            out.write(head)
            while chunk := stream.read(8 << 20):
                out.write(chunk)
            return
        data = head + stream.read()
        if self.is_placeholder_size(path, data):
            out.write(data)
            return
        meta = self.parse_for_smudge(path, data)
        self.smudge_meta(path, meta, out)


def _report(exc: BaseException) -> None:
    if isinstance(exc, OSError):
        exc = storage_error(exc) or exc
    if isinstance(exc, ThetaError):
        sys.stderr.write(f"git-theta: error: {exc}\n")
    else:
        sys.stderr.write("git-theta: internal error (please report):\n" + traceback.format_exc())
    sys.stderr.flush()


def _widen_pipe(stream: BinaryIO) -> None:
    """Let the pipe to git hold 1 MiB instead of 64 KiB (Linux; the unprivileged limit), so the smudge writes
    ahead while git copies what it read; anything else (not a pipe, another OS) keeps the default."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, AttributeError, OSError, ValueError):
        pass


def serve(stdin: BinaryIO, stdout: BinaryIO, repo: Repo | None = None) -> None:
    """Speak git's long-running filter protocol (version 2) until git closes the pipe."""
    reader, writer = PktReader(stdin), PktWriter(stdout)
    _widen_pipe(stdout)
    _widen_pipe(stdin)  # and git's writes to us: a clean (or the refresh after a materialization) streams a whole file
    hello = reader.read_text_list()
    if hello[:1] != ["git-filter-client"] or "version=2" not in hello:
        raise InputError(f"unexpected filter handshake from git: {hello}")
    writer.text("git-filter-server")
    writer.text("version=2")
    writer.flush()
    caps = reader.read_text_list()
    for cap in ("clean", "smudge"):
        if f"capability={cap}" in caps:
            writer.text(f"capability={cap}")
    writer.flush()
    filt = Filter(repo or Repo.discover())
    with filt.store.guard.session(owner="git"):  # git writes the index that refers to what we store after we answer
        _serve_requests(filt, reader, writer)


def _serve_requests(filt: Filter, reader: PktReader, writer: PktWriter) -> None:
    try:
        from gittheta_merge.storage.tracking import hooks_dir, install_hooks

        # a fresh clone with a user-scope install gets our hooks too; but only into the repository's own hooks
        # folder: a core.hooksPath elsewhere (a committed .githooks/, husky's, a `git -c core.hooksPath=…` meant
        # to skip hooks) is the user's, written only by an explicit `git theta install`
        if hooks_dir(filt.repo).resolve().is_relative_to(filt.repo.common_dir.resolve()):
            install_hooks(filt.repo)
    except (ThetaError, OSError) as exc:
        sys.stderr.write(f"git-theta: warning: could not install the git hooks: {exc}\n")

    while True:
        try:
            headers = reader.read_text_list()
        except EOFError:
            return
        fields = dict(h.split("=", 1) for h in headers if "=" in h)
        command, path = fields.get("command"), fields.get("pathname", "<unknown>")
        content = reader.content_stream()
        if command == "clean":
            _serve_clean(filt, path, content, writer)
        elif command == "smudge":
            _serve_smudge(filt, path, content, writer, fields.get("treeish") or fields.get("ref", ""))
        else:
            content.drain()
            writer.text("status=error")
            writer.flush()


def _answer(content: object, writer: PktWriter, exc: Exception | None = None) -> None:
    """Read the rest of git's content, then say whether we take the request (a failure is reported first)."""
    content.drain()  # type: ignore[attr-defined]
    if exc is not None:
        _report(exc)
    writer.text("status=error" if exc is not None else "status=success")
    writer.flush()


def _serve_clean(filt: Filter, path: str, content: object, writer: PktWriter) -> None:
    out = io.BytesIO()
    try:
        filt.clean(path, content, out)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - every failure must become status=error, not a hang
        _answer(content, writer, exc)
        return
    _answer(content, writer)
    writer.content_sink().write(out.getvalue())
    writer.flush()
    writer.flush()  # empty list: status unchanged


def _serve_smudge(filt: Filter, path: str, content: object, writer: PktWriter, commit: str) -> None:
    try:
        head = read_head(content, 64)  # type: ignore[arg-type]
        if is_metadata(head):
            data = head + content.read()  # type: ignore[attr-defined]
            if filt.is_placeholder_size(path, data):
                meta, rest = None, data  # a placeholder: the hooks write the real file (storage/materialize.py)
            else:
                meta, rest = filt.parse_for_smudge(path, data, commit), b""
        else:
            meta, rest = None, head + content.read()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        _answer(content, writer, exc)
        return
    _answer(content, writer)
    sink = writer.content_sink()
    try:
        if meta is None:
            sink.write(rest)  # not ours: pass through untouched
        else:
            filt.smudge_meta(path, meta, sink)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - abort: git discards the partial content
        writer.flush()
        _report(exc)
        writer.text("status=error")
        writer.flush()
        return
    writer.flush()
    writer.flush()


def single_shot(command: str, path: str) -> int:
    """`git-theta clean|smudge PATH` for tools that do not speak the process protocol."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    filt = Filter(Repo.discover(Path.cwd()))
    try:
        with filt.store.guard.session(owner="git"):
            if command == "clean":
                filt.clean(path, stdin, stdout)
            else:
                filt.smudge(path, stdin, stdout)
    except ThetaError as exc:
        _report(exc)
        return 1
    stdout.flush()
    return 0
