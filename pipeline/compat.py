"""Fixes for running RecBole 1.2.1 on today's stack (numpy 2, pandas 3, torch >= 2.6).

RecBole 1.2.1 was released for numpy 1, pandas 1/2 and torch < 2.6. Several things break on a modern
stack and one is unsafe; :func:`apply` mends them once, before any RecBole object is built:

1. ``Config.compatibility_settings`` reads ``np.float_``, ``np.complex_`` and ``np.unicode_``, which
   numpy 2 removed, so ``Config()`` raises. We restore the three aliases (to the numpy 2 types).
2. ``Dataset._fill_nan`` fills missing values with ``Series.fillna(..., inplace=True)`` on a column
   taken out of the frame. Under pandas 3 copy-on-write that writes to a copy and the NaNs silently
   stay. We replace it with a version that assigns the filled column back (same values as RecBole
   produces under pandas 1).
3. ``ensure_dir`` checks for a directory and then creates it, so two processes starting together can
   both see it missing and one crashes on ``FileExistsError``. We make it
   ``makedirs(exist_ok=True)`` in every module that imported it by name.
4. ``Config`` turns string values of a config dict or of the command line into Python values with
   ``eval``, so a crafted string (in a shared config or a checkpoint's saved config) runs code. We
   use ``ast.literal_eval`` instead, which accepts the same literals (numbers, lists, dicts, bools).
5. Importing ``recbole.model.sequential_recommender`` (which any RecBole sequential model does)
   runs SINE's module, which switches on ``torch.autograd.set_detect_anomaly(True)`` for the whole
   process: every backward pass then checks every tensor for NaN, several times slower. We import
   the package and switch it back off.
6. RecBole's code raises deprecation warnings on pandas 3 (``inplace=``) and a UserWarning on
   torch (tensors from read-only numpy arrays, which RecBole never writes to). They are about
   RecBole's internals, not the user's input, so we silence exactly those.
7. ``recbole.quick_start`` imports ray (pinned <= 2.6.3: no wheel for Python 3.12, broken on
   numpy 2). Nothing here imports it; the project's own pipeline replaces quick_start.
8. RecBole reads a model's defaults only from its own package (``properties/model/<Name>.yaml``), so
   a plugin model built from RecBole's ``Config`` would miss every setting of its own. A model of
   this project names its defaults file in ``defaults_file``; ``Config`` reads it right after
   RecBole's own files: every file, dict and command line the user gives wins over it.
9. RecBole reads its interaction file with pandas and mends missing values silently; the file is
   read with every row checked instead (:mod:`pipeline.atomic`), and a dataset that its filters
   empty is named with its counts rather than failing deep inside RecBole.
10. RecBole's ``Trainer`` reloads the best checkpoint it saved (a pickle holding its Config) with
    ``torch.load``, which torch >= 2.6 refuses. A checkpoint that a RecBole Trainer wrote in this
    process is loaded in full (it is the process's own file); any other file still gets torch's
    safe loading.

The project's own checkpoints need no patch: they are plain data that loads with
``torch.load(weights_only=True)`` (see :mod:`pipeline.checkpoint`). Models of this project call
:func:`apply` when their module is imported, so RecBole's own flow (``Config``, ``create_dataset``,
``Trainer``) works with them as it does with RecBole's models.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import warnings

_applied = False
_RECBOLE = {}  # RecBole's own functions that the patches below wrap
_WRITTEN_BY_RECBOLE: set[str] = set()  # checkpoints RecBole's Trainer saved in this process

_NUMPY_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}


def _ensure_dir(dir_path):
    os.makedirs(dir_path, exist_ok=True)


def _fill_nan(self):
    """RecBole's missing-value filling, written so that it also takes effect under pandas 3."""
    import numpy as np
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in list(feat):
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _convert_config_dict(self, config_dict):
    """RecBole's conversion of string settings to Python values, without ``eval``."""
    for key, value in config_dict.items():
        if not isinstance(value, str):
            continue
        try:
            config_dict[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            lowered = value.lower()
            config_dict[key] = True if lowered == "true" else False if lowered == "false" else value
    return config_dict


def _load_internal_config_dict(self, model, model_class, dataset):
    """RecBole's defaults, then the defaults file a plugin model names (``defaults_file``)."""
    _RECBOLE["load_internal"](self, model, model_class, dataset)
    defaults = getattr(model_class, "defaults_file", None)
    if defaults is not None:
        self._update_internal_config_dict(str(defaults))


def _load_feat(self, filepath, source):
    """RecBole's reading of an atomic file; the interaction file's rows are checked."""
    from recbole.utils import FeatureSource

    from pipeline import atomic

    recbole_reader = functools.partial(_RECBOLE["load_feat"], self)
    if source == FeatureSource.INTERACTION:
        return atomic.read_interactions(self, filepath, source, recbole_reader)
    return recbole_reader(filepath, source)


def _reset_index(self):
    from pipeline import atomic

    atomic.check_not_empty(self)
    return _RECBOLE["reset_index"](self)


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    _RECBOLE["save_checkpoint"](self, epoch, verbose=verbose, **kwargs)
    _WRITTEN_BY_RECBOLE.add(os.path.abspath(kwargs.get("saved_model_file", self.saved_model_file)))


@contextlib.contextmanager
def _loading_own_checkpoint(path):
    """Inside: torch.load unpickles in full, if ``path`` is a checkpoint written in this process."""
    if path is None or os.path.abspath(path) not in _WRITTEN_BY_RECBOLE:
        yield
        return
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # read by torch.load at each call
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with warnings.catch_warnings():  # torch warns that the variable is set: it is, on purpose
            warnings.filterwarnings("ignore", message=f"Environment variable {key}")
            yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def _evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
    path = (model_file or self.saved_model_file) if load_best_model else None
    with _loading_own_checkpoint(path):
        return _RECBOLE["evaluate"](self, eval_data, load_best_model=load_best_model,
                                    model_file=model_file, show_progress=show_progress)


def _resume_checkpoint(self, resume_file):
    with _loading_own_checkpoint(resume_file):
        return _RECBOLE["resume_checkpoint"](self, resume_file)


def apply() -> None:
    """Patch RecBole in place; safe to call any number of times."""
    global _applied
    if _applied:
        return
    import numpy as np

    for alias, target in _NUMPY_ALIASES.items():
        if alias not in np.__dict__:
            setattr(np, alias, getattr(np, target))

    import recbole.config.configurator as rb_config
    import recbole.data.dataset.dataset as rb_dataset
    import recbole.data.utils as rb_data_utils
    import recbole.model.sequential_recommender  # noqa: F401  (runs SINE's module once, here)
    import recbole.trainer.trainer as rb_trainer
    import recbole.utils as rb_utils
    import recbole.utils.logger as rb_logger
    import recbole.utils.utils as rb_utils_utils
    import torch

    torch.autograd.set_detect_anomaly(False)

    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"recbole\.")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                            category=UserWarning)

    rb_config.Config._convert_config_dict = _convert_config_dict
    rb_dataset.Dataset._fill_nan = _fill_nan
    for owner, name, key, patch in (
            (rb_config.Config, "_load_internal_config_dict", "load_internal",
             _load_internal_config_dict),
            (rb_dataset.Dataset, "_load_feat", "load_feat", _load_feat),
            (rb_dataset.Dataset, "_reset_index", "reset_index", _reset_index),
            (rb_trainer.Trainer, "_save_checkpoint", "save_checkpoint", _save_checkpoint),
            (rb_trainer.Trainer, "evaluate", "evaluate", _evaluate),
            (rb_trainer.Trainer, "resume_checkpoint", "resume_checkpoint", _resume_checkpoint)):
        _RECBOLE[key] = getattr(owner, name)
        setattr(owner, name, patch)
    for module in (rb_dataset, rb_data_utils, rb_trainer, rb_utils, rb_logger, rb_utils_utils):
        module.ensure_dir = _ensure_dir
    _applied = True
