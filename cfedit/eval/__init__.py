"""``cfedit eval``: how ctf-consistent editors are, measured on their images.

- :mod:`~cfedit.eval.reader`: the independent reader (pixel oracles and a separately trained classifier);
- :mod:`~cfedit.eval.models`: the models compared (checkpoints, and baselines sharing their image parts);
- :mod:`~cfedit.eval.run`: :func:`evaluate`, the estimates against the bounds and the general metrics;
- :mod:`~cfedit.eval.metrics`: the metrics as pure functions over arrays;
- :mod:`~cfedit.eval.report`: the typed report, its definitions and its JSON;
- :mod:`~cfedit.eval.render` and :mod:`~cfedit.eval.figures`: tables, chart and grids.
"""

from cfedit.eval.figures import edit_grid, write_chart, write_edit_grid, write_grid
from cfedit.eval.models import load_models, with_features
from cfedit.eval.reader import (READER_DEFAULTS, READER_EXTRA, Reader, ReaderInfo, load_or_train_reader, load_reader,
                                reader_cache_path, reader_options, save_reader, train_reader)
from cfedit.eval.render import render_tables, write_outputs
from cfedit.eval.report import DEFINITIONS, EvalReport, report_to_dict, report_to_json
from cfedit.eval.run import evaluate

__all__ = ["DEFINITIONS", "READER_DEFAULTS", "READER_EXTRA", "EvalReport", "Reader", "ReaderInfo", "edit_grid",
           "evaluate", "load_models", "load_or_train_reader", "load_reader", "reader_cache_path", "reader_options",
           "render_tables", "report_to_dict", "report_to_json", "save_reader", "train_reader", "with_features",
           "write_chart", "write_edit_grid", "write_grid", "write_outputs"]
