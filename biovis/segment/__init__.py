"""Segmentation, one job a file: `data` (masks, image + mask sets, the task's name), `net` (Attention
U-Net, loss), `metrics` (pixel scores), `predict` (`SegPredictor`, the `segmentation.fastai` kind),
`train` (fastai training and registration). Training names load on first use, so serving a model
does not import fastai; the benchmark lives in `biovis.bench.segmentation`."""
from .data import (TASK, IMAGE_EXTS, IMAGE_DIRS, MASK_DIRS, InvalidMaskError, read_mask, mask_to_png, SegDataset, is_seg_folder,
                   from_seg_folder, synthetic_seg_folder, find_seg_data, load_seg_dataset)
from .net import AttentionGate, AttentionUNet, DiceBCELoss, probs_to_mask
from .metrics import pixel_counts, scores, SegEvaluation, seg_metrics
from .predict import SegPrediction, SegPredictor, overlay_mask, evaluate_seg, pick_threshold, load_seg_model, seg_model_card

_LAZY = dict.fromkeys(('SegCropDL', 'SegDice', 'TimeBudget', 'train_seg', 'train_and_register_seg'), 'biovis.segment.train')

def __getattr__(name):
    "The training names, imported when first asked for."
    if name not in _LAZY: raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    from importlib import import_module
    return getattr(import_module(_LAZY[name]), name)
