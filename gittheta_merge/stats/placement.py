"""Statistics of a model larger than one device: accelerate's `device_map` splits it over the GPUs, the CPU and a
disk folder, and moves each layer's weights to where it runs, one layer at a time.

The Gram statistic runs on that placement as it is: it needs the inputs of each linear layer (forward hooks), which
an offloaded layer still sees. The Fisher and K-FAC need gradients (of every weight; of every layer output), and
accelerate's offloaded layers hold no trainable weights (they are filled in for each forward and dropped), so
they run layer by layer instead (stats/layerwise.py: one block's weights materialized at a time, re-run for the
backward).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from gittheta_merge.errors import UsageError

KINDS = ("gram", "fisher", "kfac")


def check(kind: str, distributed: bool) -> None:
    if kind not in KINDS:
        raise UsageError(f"--device-map computes {', '.join(KINDS)} statistics, not {kind}")
    if distributed:
        raise UsageError("--device-map under torchrun: each rank would load its own split copy; run it as one process")


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """'0=20GB,cpu=8GB' -> {0: '20GB', 'cpu': '8GB'} (accelerate's max_memory: GPU indices as ints)."""
    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not dev or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.IGNORECASE):
            raise UsageError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GB,cpu=8GB")
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def load_kwargs(device_map: str, max_memory: str | None, offload_folder: str) -> dict[str, Any]:
    """What `from_pretrained` needs to place the model (and to check accelerate is there, with the fix)."""
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise UsageError("--device-map needs accelerate: pip install accelerate") from exc
    kwargs: dict[str, Any] = {"device_map": device_map, "offload_folder": offload_folder}
    memory = parse_max_memory(max_memory)
    if memory is not None:
        kwargs["max_memory"] = memory
    return kwargs


def execution_device(model: Any) -> str:
    """Where the inputs go: the first module's device (accelerate moves activations on from there); a layer
    waiting on disk or on the CPU runs on the CPU when no GPU is in the map."""
    placed = [str(d) for d in getattr(model, "hf_device_map", {}).values()]
    first = next((d for d in placed if d not in ("cpu", "disk")), "cpu")
    return f"cuda:{first}" if first.isdigit() else first


def stored_value(model: Any, name: str, tensor: Any) -> Any:
    """The value of parameter `name`: itself where it is materialized, else the copy accelerate keeps for an
    offloaded module (its hook's weights_map, on the CPU or read from the offload folder)."""
    if tensor.device.type != "meta":
        return tensor
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    hook = getattr(module, "_hf_hook", None)
    for h in [*getattr(hook, "hooks", ()), hook]:
        weights = getattr(h, "weights_map", None)
        if weights is not None and leaf in weights:
            return weights[leaf]
    raise RuntimeError(f"{name}: offloaded by accelerate, but its stored value was not found")


def describe(model: Any) -> str:
    """The placement, one line per device: 'disk: bert.encoder.layer.2-5' style runs of consecutive modules."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for module, dev in getattr(model, "hf_device_map", {}).items():
        name = str(dev)
        groups.setdefault(f"cuda:{name}" if name.isdigit() else name, []).append(module or "(whole model)")
    lines = []
    for dev, modules in groups.items():
        lines.append(f"  {dev}: {_runs(modules)}")
    return "\n".join(lines)


def _runs(modules: list[str]) -> str:
    """'a.layer.0', 'a.layer.1', 'a.layer.2', 'b' -> 'a.layer.0-2, b'."""
    out: list[str] = []
    prev: tuple[str, int] | None = None
    start = 0
    for m in [*modules, None]:
        match = re.fullmatch(r"(.*\.)(\d+)", m) if m is not None else None
        key = (match.group(1), int(match.group(2))) if match else None
        if prev is not None and key is not None and key[0] == prev[0] and key[1] == prev[1] + 1:
            prev = key
            continue
        if prev is not None:
            out.append(f"{prev[0]}{start}" + (f"-{prev[1]}" if prev[1] != start else ""))
        prev, start = (key, key[1]) if key else (None, 0)
        if key is None and m is not None:
            out.append(m)
    return ", ".join(out)
