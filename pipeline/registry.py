"""Find a recommender by name: this project's models first, then RecBole's.

This project's models:

- ``TiM4Rec`` in ``tim4rec.py``, its defaults in ``config/model/TiM4Rec.yaml``;
- ``<Name>`` in ``baseline/<Name>/model.py`` (class ``<Name>``), for baselines RecBole lacks.

Every baseline, RecBole built-in or not, keeps its settings in ``baseline/<Name>/config.yaml``.
Names match case-insensitively; the returned spec carries the canonical spelling.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import ROOT
from pipeline.errors import UserError

BASELINE_DIR = ROOT / "baseline"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_class: type
    defaults: Path | None = None  # the model's own defaults: lowest priority of the config files
    settings: Path | None = None  # a baseline's settings: they win over the dataset config files


def project_model_names() -> list[str]:
    baselines = sorted(p.parent.name for p in BASELINE_DIR.glob("*/model.py"))
    return ["TiM4Rec", *baselines]


def baseline_names() -> list[str]:
    return sorted(p.parent.name for p in BASELINE_DIR.glob("*/config.yaml"))


def _import_file(module_name: str, path: Path):
    if str(ROOT) not in sys.path:  # models import ssd.py and tim4rec.py from the root
        sys.path.insert(0, str(ROOT))
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _recbole_model(name: str):
    from recbole.utils import get_model

    try:
        return get_model(name)
    except (ValueError, AttributeError, ImportError):
        # ImportError: RecBole's search imports its LightGBM/XGBoost package, whose libraries
        # this project does not install; no sequential model lives there.
        return None


def find_model(name: str) -> ModelSpec:
    """The model class called ``name`` and its config files; UserError when there is none."""
    known = {n.lower(): n for n in project_model_names() + baseline_names()}
    canonical = known.get(name.lower(), name)
    settings = BASELINE_DIR / canonical / "config.yaml"
    settings = settings if settings.is_file() else None

    if canonical == "TiM4Rec":
        module = _import_file("tim4rec", ROOT / "tim4rec.py")
        return ModelSpec("TiM4Rec", module.TiM4Rec, defaults=module.TiM4Rec.defaults_file)
    model_file = BASELINE_DIR / canonical / "model.py"
    if model_file.is_file():
        module = _import_file(f"baseline_{canonical.lower()}", model_file)
        return ModelSpec(canonical, getattr(module, canonical), settings=settings)
    model_class = _recbole_model(canonical)
    if model_class is None:
        raise UserError(
            f"unknown model '{name}': not one of this project's "
            f"({', '.join(project_model_names())}) nor a RecBole model")
    return ModelSpec(model_class.__name__, model_class, settings=settings)
