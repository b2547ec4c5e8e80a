"""The interface a merge strategy implements, and the parameter parsing shared by all of them.

A strategy sees one row chunk of one tensor at a time (`Chunk`), already upcast to float32, and
returns the merged rows in float32; the engine reads, chunks and writes. Strategies that need global
quantities (TIES' per-task threshold and majority sign, Fisher's global norm) declare statistics
passes: the engine streams the same chunks through `observe` before the merge pass, so even a global
algorithm runs in memory bounded by one chunk per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gittheta_merge.errors import MissingError, UsageError
from gittheta_merge.merge.fused import LinComb

# float32 working size per chunk of the streaming (elementwise) strategies: small enough that a chunk and
# its temporaries stay in the CPU caches, large enough that per-chunk Python overhead is noise
# (docs/merge.md, "Chunk size", has the measurements)
STREAM_CHUNK_BYTES = 1 << 20


@dataclass
class Param:
    """One tunable: its default, how to parse a string value, and a one-line help text."""

    default: Any
    kind: str  # float | int | bool | str | floats | choice
    help: str = ""
    choices: tuple[str, ...] = ()
    # a float that may also be given per model, one value each (mergekit's per-model density, epsilon, gamma):
    # stored as a float when one value is given, else as a list; strategies read it with Strategy.for_model
    per_model: bool = False


def parse_bool(raw: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 (as git config spells booleans), or a real bool."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def parse_value(kind: str, raw: Any, where: str, choices: tuple[str, ...] = ()) -> Any:
    """Parse a parameter given as a string (CLI, git config) or already typed (Python API)."""
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        if kind == "bool":
            return parse_bool(raw)
        if kind == "floats":
            if raw is None:
                return None
            if isinstance(raw, (list, tuple)):
                return [float(x) for x in raw]
            if isinstance(raw, (int, float)):
                return [float(raw)]
            return [float(x) for x in str(raw).replace(" ", "").split(",") if x]
        if kind == "choice":
            if str(raw) not in choices:
                raise ValueError(raw)
            return str(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = f"one of {', '.join(choices)}" if kind == "choice" else f"a {kind} value"
        raise UsageError(f"{where}: {raw!r} is not {expected}") from None


@dataclass
class StatsAccess:
    """Per-model statistic blobs (Fisher diagonals, Grams) keyed by kind, read lazily by tensor name."""

    sources: dict[str, list[Any]] = field(default_factory=dict)  # kind -> per-model TensorSource | None

    def has_kind(self, kind: str) -> bool:
        return any(src is not None for src in self.sources.get(kind, []))

    def lookup(self, kind: str, model: int, name: str) -> tuple[Any, str] | None:
        """(source, key) holding the statistic of tensor `name` for a model, trying `name` minus `.weight`."""
        per_model = self.sources.get(kind, [])
        src = per_model[model] if model < len(per_model) else None
        if src is None:
            return None
        for key in (name, name[: -len(".weight")] if name.endswith(".weight") else None):
            if key and src.info(key) is not None:
                return src, key
        return None

    def shape(self, kind: str, model: int, name: str) -> list[int] | None:
        found = self.lookup(kind, model, name)
        return None if found is None else list(found[0].info(found[1]).shape)

    def rows(self, kind: str, model: int, name: str, start: int, end: int | None = None) -> Any:
        """Rows [start, end) of the statistic (end None: to the last row)."""
        found = self.lookup(kind, model, name)
        if found is None:
            raise MissingError(f"tensor {name!r}: no {kind} statistic for model {model}")
        src, key = found
        return src.read_rows(key, start, src.info(key).rows if end is None else end)

    def whole(self, kind: str, model: int, name: str) -> Any:
        return self.rows(kind, model, name, 0)

    def count(self, kind: str, model: int, name: str) -> int | None:
        """How many terms the model's statistic for `name` sums (tokens, examples); None where that is not
        recorded (statistics given as plain safetensors files)."""
        found = self.lookup(kind, model, name)
        get = getattr(found[0], "count", None) if found is not None else None
        return get(found[1]) if callable(get) else None


@dataclass
class Chunk:
    """Rows [row_start, row_end) of one tensor in every model (float32; on the engine's compiled path, raw
    (bytes, dtype) pairs), plus where to report."""

    name: str
    shape: list[int]  # the full tensor's shape
    row_start: int
    row_end: int
    base: Any  # torch.Tensor | None
    models: list[Any]  # list[torch.Tensor]
    stats: StatsAccess
    report: dict[str, Any]  # per-tensor report entry; strategies add counters with add()

    def add(self, key: str, value: float) -> None:
        self.report[key] = self.report.get(key, 0) + value

    @property
    def numel(self) -> int:
        """Elements of the chunk's rows, from the row range (models may be tensors, arrays or raw bytes)."""
        return (self.row_end - self.row_start) * math.prod(self.shape[1:]) if self.shape else 1


class Strategy:
    """Base class: subclasses set the class attributes and implement `merge` (and passes if global)."""

    name: str = ""
    needs_base: bool = False
    uses_base: bool = False  # reads the base when one is given (needs_base: cannot merge without one)
    row_separable: bool = True  # False: the engine hands over the whole tensor as one chunk
    n_passes: int = 0  # statistics passes before the merge pass
    # Streaming (elementwise) strategies set a float32 working size per chunk, e.g. 1 MiB: the engine then
    # chunks at min(max_block_bytes, chunk_bytes) and hands over REUSED buffers (a strategy must not keep a
    # chunk's tensors after observe/merge returns; it may overwrite them). None: fresh tensors per chunk of
    # max_block_bytes.
    chunk_bytes: int | None = None
    # True: the strategy also implements merge_np (the same float32 operations on numpy arrays), so a merge
    # whose tensors are all F32/F16/BF16 on the CPU runs without importing torch (merge/npkernels.py)
    numpy_merge: bool = False
    pass_scope: str = "model"  # "model": passes run over every tensor first; "tensor": per tensor
    params_spec: dict[str, Param] = {}

    def __init__(self, params: dict[str, Any] | None = None, n_models: int = 2) -> None:
        from gittheta_merge.merge.buffers import Pool

        self.n_models = n_models
        self.pool = Pool()  # temporaries reused across chunks (see chunk_bytes)
        self.params = self.parse_params(params or {})
        self.validate()

    @classmethod
    def parse_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        out = {k: p.default for k, p in cls.params_spec.items()}
        for key, raw in given.items():
            key_norm = key.replace("-", "_")
            if key_norm not in cls.params_spec:
                known = ", ".join(sorted(cls.params_spec)) or "none"
                raise UsageError(f"strategy {cls.name}: unknown parameter {key!r} (known: {known})")
            spec = cls.params_spec[key_norm]
            where = f"strategy {cls.name}: {key_norm}"
            if spec.per_model and spec.kind == "float" and not isinstance(raw, (int, float)):
                values = parse_value("floats", raw, where)
                out[key_norm] = values[0] if len(values) == 1 else values
            else:
                out[key_norm] = parse_value(spec.kind, raw, where, spec.choices)
        return out

    def for_model(self, key: str, model: int) -> Any:
        """A per-model parameter's value for model `model` (the one value when a single value was given)."""
        value = self.params[key]
        return value[model] if isinstance(value, list) else value

    def values_of(self, key: str) -> list[Any]:
        """Every value a per-model parameter takes (one, or one per model), e.g. to check their range."""
        value = self.params.get(key)
        return list(value) if isinstance(value, list) else [value]

    def validate(self) -> None:
        """Check parameter values against n_models (e.g. one weight per model)."""
        weights = self.params.get("weights")
        if weights is not None and len(weights) != self.n_models:
            raise UsageError(
                f"strategy {self.name}: weights has {len(weights)} values for {self.n_models} models"
            )
        for key, spec in self.params_spec.items():
            value = self.params.get(key)
            if spec.per_model and isinstance(value, list) and len(value) != self.n_models:
                raise UsageError(f"strategy {self.name}: {key} has {len(value)} values for {self.n_models} models "
                                 "(give one value, or one per model)")

    def model_weights(self) -> list[float]:
        weights = self.params.get("weights")
        return list(weights) if weights is not None else [1.0] * self.n_models

    def whole_tensor_copies(self) -> int:
        """float32 copies of one whole tensor a non-row-separable strategy holds at once (its inputs, the base and
        its temporaries: stacked task vectors, SVD factors, optimiser state); the plan's peak (--dry-run) uses it."""
        return self.n_models + 2

    def stat_kinds(self) -> tuple[str, ...]:
        """Statistic kinds this strategy reads (fisher, gram, kfac): a merge finds them in git by these."""
        return ()

    def check_tensor(self, name: str, shape: list[int], stats: StatsAccess) -> None:
        """Metadata-only checks before any data is read (e.g. that statistics exist with the right shape)."""

    def separable(self, name: str, shape: list[int], stats: StatsAccess) -> bool:
        """Whether row chunks of this tensor can be merged independently (else one whole-tensor chunk)."""
        return self.row_separable

    def prepare(self, owned: list[tuple[str, list[int]]], stats: StatsAccess) -> None:
        """Before any pass: global facts from statistics alone (no model data), e.g. Fisher norms."""

    def begin_pass(self, index: int) -> None:
        """Start statistics pass `index` (per model, or per tensor with pass_scope='tensor')."""

    def observe(self, index: int, chunk: Chunk) -> None:
        """See one chunk during statistics pass `index`."""

    def observe_zero(self, index: int, name: str, numel: int) -> None:
        """A tensor this strategy owns whose task vectors are all zero (unchanged everywhere): no data read."""

    def reduce_pass(self, index: int, all_reduce: Callable[[Any], Any]) -> None:
        """In a merge over several ranks (torchrun) each rank observes only its own tensors in whole-model pass
        `index`; this adds the ranks' pass state with `all_reduce` (a sum in place, on every rank) before end_pass.
        Exact sums (integer counters) keep the result byte-identical to one process's. A strategy with whole-model
        passes must implement it to run on several ranks."""
        if self.n_passes and self.pass_scope == "model":
            raise UsageError(f"strategy {self.name} has whole-model passes without a distributed reduction; "
                             "merge with it in one process (without torchrun)")

    def end_pass(self, index: int) -> None:
        """Finish statistics pass `index`."""

    def merge(self, chunk: Chunk) -> Any:
        """The merged rows (float32, same shape as chunk.models[0])."""
        raise NotImplementedError

    def merge_np(self, chunk: Chunk) -> Any:
        """merge() on numpy float32 arrays (only called when numpy_merge is True)."""
        raise NotImplementedError

    def lincomb(self) -> LinComb | None:
        """This strategy as a linear combination the compiled kernel computes in one pass (merge/fused.py), or
        None. Only for numpy_merge strategies whose merge_np is exactly that combination, same operation order."""
        return None

    def summary(self) -> dict[str, Any]:
        """Global facts for the report (thresholds, majority sign, norms)."""
        return {}


StrategyFactory = Callable[..., Strategy]
