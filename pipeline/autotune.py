"""Remember which configuration mamba-ssm's Triton autotuner chose, so that it chooses only once.

mamba-ssm's SSD kernels are wrapped in ``triton.autotune``: in every new process, the first call of
each kernel at a new shape key compiles and times every candidate configuration (6 to 17 each, about
twenty kernels for a forward and backward pass). That is most of the 90-100 s first step of a cold
run, and 10-15 s even when Triton's compiled-kernel cache is warm. Triton's own on-disk autotune
cache (``TRITON_CACHE_AUTOTUNING``) skips every kernel whose configurations carry a pre-hook, which
is most of mamba-ssm's backward kernels.

This module keeps the choices itself, as plain data, and puts them back into the autotuners'
in-memory caches before the first call. Only the chosen configuration is then compiled, and Triton's
compiled-kernel cache makes a second run's first step a matter of seconds. Choices are looked up, in
order, in:

1. the user's cache file, ``$TIM4REC_AUTOTUNE_CACHE``, else
   ``$XDG_CACHE_HOME/tim4rec/autotune.json`` (default ``~/.cache``); written after each new choice
   (:func:`save`); ``TIM4REC_AUTOTUNE_CACHE=off`` turns reading and writing it off;
2. the choices shipped with the project, ``config/autotune.json`` (measured on the GPUs it names).

Both are keyed by GPU name, then kernel, then the autotuner's own key (the shape arguments and
dtypes it tunes on). A choice is a configuration of the kernel's own candidate list, matched by its
parameters, so the kernel keeps its pre-hooks; an entry that no longer matches a candidate (another
mamba-ssm version) is ignored and the kernel is tuned as usual. Choosing only changes which launch
parameters run the same computation, not what is computed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pipeline import ROOT

SHIPPED: Path | None = ROOT / "config" / "autotune.json"  # None: no shipped choices
KERNEL_MODULES = "mamba_ssm.ops.triton."

logger = logging.getLogger(__name__)
_restored: dict[tuple, str] = {}  # (kernel, key) -> config, as put back or saved: what is known


def cache_file() -> Path | None:
    """The user's cache file, or None when ``TIM4REC_AUTOTUNE_CACHE=off``."""
    value = os.environ.get("TIM4REC_AUTOTUNE_CACHE")
    if value is not None:
        return None if value.strip().lower() == "off" else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tim4rec" / "autotune.json"


def _autotuners() -> dict:
    """``{qualified kernel name: Autotuner}`` of the loaded mamba-ssm Triton modules."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(KERNEL_MODULES):
            continue
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{module_name.removeprefix(KERNEL_MODULES)}.{name}"] = value
    return found


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("ignoring the autotune cache %s: %s", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def _key_text(key: tuple) -> str:
    return json.dumps(list(key))


def restore() -> int:
    """Put the known choices for this GPU into the autotuners; the number of choices put back."""
    tuners = _autotuners()
    if not tuners:
        return 0
    gpu = _gpu()
    user = cache_file()
    tables = [_read(user) if user else {}, _read(SHIPPED) if SHIPPED else {}]
    put = set()
    for kernel, tuner in tuners.items():
        candidates = {str(config): config for config in tuner.configs}
        for table in reversed(tables):  # the user's own choices win over the shipped ones
            for key_text, chosen in table.get(gpu, {}).get(kernel, {}).items():
                config = candidates.get(chosen)
                if config is None:
                    continue
                try:
                    key = tuple(json.loads(key_text))
                except ValueError:
                    continue
                tuner.cache[key] = config
                _restored[(kernel, key_text)] = chosen
                put.add((kernel, key))
    if put:
        logger.info("Triton autotune: %d choices restored for %s", len(put), gpu)
    return len(put)


def save() -> int:
    """Add this process's new choices to the user's cache file; the number added.

    Written to a temporary file and renamed, so that concurrent runs never leave a torn file.
    """
    path = cache_file()
    new = {}
    for kernel, tuner in _autotuners().items():
        for key, config in tuner.cache.items():
            key_text = _key_text(key)
            if _restored.get((kernel, key_text)) != str(config):
                new[(kernel, key_text)] = str(config)
    if path is None or not new:
        return 0
    gpu = _gpu()
    data = _read(path)
    entries = data.setdefault(gpu, {})
    for (kernel, key_text), config in new.items():
        entries.setdefault(kernel, {})[key_text] = config
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp",
                                         encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except OSError as error:
        logger.warning("could not write the autotune cache %s: %s", path, error)
        return 0
    _restored.update(new)
    logger.info("Triton autotune: %d new choices saved to %s", len(new), path)
    return len(new)
