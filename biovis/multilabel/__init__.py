"""Multi-label findings, one job a file: `data` (finding sets, MedMNIST multi-label `.npz`, CSV and folder loaders, BloodMNIST
mosaics, the task's name), `metrics` (per-finding and overall scores, figures), `predict` (`MultiLabelPredictor`, the
`multilabel.fastai` kind, evaluation, model card), `train` (fastai training and registration). Training names load on first
use, so serving a model does not import fastai; the benchmark lives in `biovis.bench.multilabel`."""
from .data import (TASK, SEP, NO_FINDING, MOSAIC_NAMES, names_of, label_text, parse_findings, findings_row, MultiLabelDataset,
                   from_npz, from_csv, from_folder, export_folder, write_multilabel_npz, is_multilabel, bloodmnist_mosaics, load_multilabel, reload_dataset)

_LAZY = {**dict.fromkeys(('MacroAUC', 'THRESHOLD_RULE', 'f1_threshold', 'fit_thresholds', 'fit_temperatures', 'train_multilabel',
                          'train_and_register_multilabel'),
                         'biovis.multilabel.train'),
         **dict.fromkeys(('finding_metrics', 'multilabel_metrics', 'MultiLabelEvaluation', 'per_finding_table', 'cooccurrence',
                          'plot_roc', 'plot_pr', 'plot_cooccurrence', 'plot_per_finding'), 'biovis.multilabel.metrics'),
         **dict.fromkeys(('MultiLabelPrediction', 'MultiLabelPredictor', 'multilabel_logits', 'probabilities',
                          'load_multilabel_model', 'evaluate_multilabel', 'multilabel_model_card'), 'biovis.multilabel.predict')}

def __getattr__(name):
    "The names of `metrics`, `predict` and `train`, imported when first asked for (importing the data names loads no torch)."
    if name not in _LAZY: raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    from importlib import import_module
    return getattr(import_module(_LAZY[name]), name)
