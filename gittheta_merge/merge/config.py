"""Merge settings from every place a user can put them, with one documented precedence.

Why layers: a team commits how its models merge (`.gittheta.toml`, reviewed like code, the same for every
clone — git config is not versioned), a user overrides it locally (git config) or for one command (flags).
Lowest to highest precedence:

  1. built-in defaults (average, and SETTINGS below: shortcuts=git, 64 MiB chunks, missing statistics = error, cpu)
  2. `.gittheta.toml` at the repository root, `[merge]`
  3. `.gittheta.toml` `[[merge.path]]` entries whose `match` glob matches the file (in file order)
  4. the `theta-merge-strategy` git attribute of the file (.gitattributes), e.g. `*.bin theta-merge-strategy=ties`
  5. git config `theta.merge.*` (strategy, <param>, rule, and each Setting's git_key)
  6. command-line flags (`git theta merge --strategy/--set/--rule/...`)

A layer that changes the strategy drops the parameters collected so far (they belong to another strategy);
parameters without a strategy refine the current one. Rules from every layer apply, higher layers first
(the first matching rule wins, so a higher layer's rule overrides a lower one's for the same tensor).
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gittheta_merge.constants import MERGE_CHUNK_BYTES
from gittheta_merge.errors import UsageError
from gittheta_merge.merge.rules import Rule, parse_action, parse_rule
from gittheta_merge.merge.strategies.base import parse_value

CONFIG_FILE = ".gittheta.toml"
ATTRIBUTE = "theta-merge-strategy"


@dataclass(frozen=True)
class Setting:
    """One merge setting, declared once: its type, default and help, and the names it has in each place it can be
    set (`.gittheta.toml` key = `name`; git config `theta.merge.<git_key>`; the flag of `git theta merge`)."""

    name: str
    kind: str  # str | int | bool | choice (parsed like strategy parameters)
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def git_key(self) -> str:
        head, *rest = self.name.split("_")
        return head + "".join(w.capitalize() for w in rest)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, where: str) -> Any:
        return parse_value(self.kind, value, f"{where}: {self.name}", self.choices)


# Every setting besides strategy, params and rules (which are structured: see the module docstring). The engine's
# MergeOptions, the layers below, the CLI flags' help and the settings table in docs/merge.md all come from here.
SETTINGS = (
    Setting("shortcuts", "choice", "git", "how tensors are settled from metadata alone: git (3-way: a tensor changed "
            "on one side only is taken from it) or exact (only tensors equal everywhere)", ("git", "exact")),
    Setting("max_block_bytes", "int", MERGE_CHUNK_BYTES, "the merge's row-chunk size in float32 bytes; peak memory "
            "is about (models + 1 + a strategy's temporaries) chunks"),
    Setting("missing_stats", "str", "error", "when a side has no statistics for a data-aware strategy: error, or "
            "the name of a data-free strategy to merge that file with instead"),
    Setting("allow_stale_stats", "bool", False, "use statistics computed on other weights than the ones merged"),
    Setting("device", "str", "cpu", "cpu or cuda[:N]: each chunk is merged on that device"),
    Setting("out_dtype", "choice", "keep", "the dtype of every floating-point output tensor (mergekit's out_dtype); "
            "keep: each tensor's own", ("keep", "F32", "F16", "BF16")),
)
BY_NAME = {s.name: s for s in SETTINGS}
SETTING_KEYS = set(BY_NAME)
GIT_SETTING = {alias: s.name for s in SETTINGS for alias in (s.git_key.lower(), s.name.replace("_", "-"))}


def settings_table() -> str:
    """The markdown table of settings in docs/merge.md (a test keeps the two equal)."""
    rows = ["| setting (`.gittheta.toml`) | git config | flag | type | default | meaning |",
            "|---|---|---|---|---|---|",
            "| `strategy` | `theta.merge.strategy` | `--strategy` | name | `average` | the merge strategy "
            "(`git theta strategies`) |",
            "| `params` (table) | `theta.merge.<param>` | `--set K=V` | per strategy | per strategy | the strategy's "
            "parameters |",
            "| `rules` (list) | `theta.merge.rule` (multi) | `--rule RE=ACTION` | rules | none | per-tensor rules |"]
    for st in SETTINGS:
        kind = " \\| ".join(st.choices) if st.choices else st.kind
        default = str(st.default).lower() if isinstance(st.default, bool) else st.default
        rows.append(f"| `{st.name}` | `theta.merge.{st.git_key}` | `{st.flag}` | {kind} | `{default}` | {st.help} |")
    return "\n".join(rows) + "\n"


@dataclass
class MergeSettings:
    """The resolved settings of one file's merge, and which layer decided each (for the report)."""

    strategy: str = "average"
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    shortcuts: str = BY_NAME["shortcuts"].default
    max_block_bytes: int = BY_NAME["max_block_bytes"].default
    missing_stats: str = BY_NAME["missing_stats"].default
    allow_stale_stats: bool = BY_NAME["allow_stale_stats"].default
    device: str = BY_NAME["device"].default
    out_dtype: str = BY_NAME["out_dtype"].default
    origin: dict[str, str] = field(default_factory=dict)

    def apply(self, layer: dict[str, Any], where: str) -> None:
        """Overlay one layer (see the module docstring for the semantics)."""
        if layer.get("strategy") is not None:
            strategy = str(layer["strategy"]).replace("-", "_")
            if strategy != self.strategy:
                self.strategy, self.params = strategy, {}
            self.origin["strategy"] = where
        if layer.get("params"):
            self.params.update(layer["params"])
            self.origin["params"] = where
        if layer.get("rules"):
            self.rules = list(layer["rules"]) + self.rules
            self.origin["rules"] = where
        for setting in SETTINGS:
            if layer.get(setting.name) is not None:
                setattr(self, setting.name, setting.parse(layer[setting.name], where))
                self.origin[setting.name] = where

    def options(self, **kwargs: Any) -> Any:
        """MergeOptions for the engine."""
        from gittheta_merge.merge.plan import MergeOptions

        return MergeOptions(strategy=self.strategy, params=dict(self.params), rules=list(self.rules),
                            max_block_bytes=self.max_block_bytes, shortcuts=self.shortcuts, device=self.device,
                            out_dtype=None if self.out_dtype == "keep" else self.out_dtype, **kwargs)


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 needs the tomli backport
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(f"{path}: reading it needs Python 3.11+ or the tomli package") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML ({exc})") from None


def _rules(raw: Any, where: str) -> list[Rule]:
    """Rules as 'REGEX=ACTION' strings or tables {pattern, action | strategy [, params]}."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UsageError(f"{where}: rules must be a list")
    out: list[Rule] = []
    for item in raw:
        if isinstance(item, str):
            out.append(parse_rule(item))
        elif isinstance(item, dict) and "pattern" in item:
            pattern = str(item["pattern"])
            if "action" in item:
                rule = parse_action(pattern, str(item["action"]))
                if rule is None:
                    raise UsageError(f"{where}: rule {pattern!r}: unknown action {item['action']!r}")
            elif "strategy" in item:
                rule = parse_action(pattern, str(item["strategy"]))
                if rule is None or rule.action != "merge":
                    raise UsageError(f"{where}: rule {pattern!r}: unknown strategy {item['strategy']!r}")
                rule.params = dict(item.get("params") or {})
            else:
                raise UsageError(f"{where}: rule {pattern!r} needs an action or a strategy")
            out.append(rule)
        else:
            raise UsageError(f"{where}: a rule is 'REGEX=ACTION' or a table with pattern and action/strategy")
    return out


def _layer(table: dict[str, Any], where: str) -> dict[str, Any]:
    params = table.get("params") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{where}: params must be a table")
    layer: dict[str, Any] = {"strategy": table.get("strategy"), "params": dict(params),
                             "rules": _rules(table.get("rules"), where) + _rules(table.get("tensor"), where)}
    for key in SETTING_KEYS:
        if key in table:
            layer[key] = table[key]
    unknown = set(table) - {"strategy", "params", "rules", "tensor", "path", "match"} - SETTING_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return layer


def _matches(pattern: str, path: str) -> bool:
    """gitattributes-like: a pattern without '/' matches the file name in any directory."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(Path(path).name, pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def file_layers(root: Path, path: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Layers 2 and 3 from `.gittheta.toml`, if the file exists."""
    cfg = root / CONFIG_FILE
    if not cfg.exists():
        return []
    data = _load_toml(cfg)
    merge = data.get("merge") or {}
    if not isinstance(merge, dict):
        raise UsageError(f"{cfg}: [merge] must be a table")
    layers = [(f"{CONFIG_FILE} [merge]", _layer(merge, f"{CONFIG_FILE} [merge]"))]
    for i, entry in enumerate(merge.get("path") or []):
        where = f"{CONFIG_FILE} [[merge.path]] #{i + 1}"
        if not isinstance(entry, dict) or "match" not in entry:
            raise UsageError(f"{where}: needs match = \"GLOB\"")
        if path is not None and _matches(str(entry["match"]), path):
            layers.append((f"{where} ({entry['match']})", _layer(entry, where)))
    return layers


def git_config_layer(repo: Any) -> dict[str, Any]:
    """Layer 5 from `git config theta.merge.*` (keys arrive lower-cased from git)."""
    out = repo.git("config", "--get-regexp", r"^theta\.merge\.", check=False).decode()
    layer: dict[str, Any] = {"params": {}, "rules": []}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        name = key[len("theta.merge."):]
        if name == "strategy":
            layer["strategy"] = value
        elif name == "rule":
            layer["rules"].append(parse_rule(value))
        elif name in GIT_SETTING:
            layer[GIT_SETTING[name]] = value
        elif name == "report" or "." in name:
            continue
        else:
            layer["params"][name] = value
    return layer


def resolve(repo: Any, path: str | None, cli: dict[str, Any] | None = None) -> MergeSettings:
    """The settings for merging `path` (repo-relative; None = not file-specific)."""
    settings = MergeSettings()
    for where, layer in file_layers(Path(repo.root), path):
        settings.apply(layer, where)
    if path is not None:
        value = repo.check_attr(ATTRIBUTE, [path]).get(path)
        if value and value not in {"unspecified", "set", "unset"}:
            settings.apply({"strategy": value}, f".gitattributes {ATTRIBUTE}")
    settings.apply(git_config_layer(repo), "git config")
    if cli:
        settings.apply(cli, "command line")
    settings.missing_stats = settings.missing_stats.replace("-", "_")
    return settings
