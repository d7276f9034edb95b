"""Modules:

- `biovis.bench.hostile`: The server attacked as a hostile user and a careless proxy would (issue 13): a corpus of bad requests built in code, `/ping` latency while clients send pixel-dense images, a large DICOM's latency, and the 401 rate of one token across `--workers 2`. Figures go into `reports/benchmarks/serving.json|md` with the serving benchmark.
- `biovis.classification_retrain`: How a classifier is retrained from corrected labels: its dataset version (base data + the corrected images, latest label wins, the test split untouched), its pipeline notebook `retrain.ipynb`, and production's re-evaluation on the same holdout. Registered into `biovis.retrain_recipes` as the recipe of task `classification`.
- `biovis.segment.retrain`: How a segmentation model is retrained from corrected masks: its dataset version (base image + mask pairs + the corrected masks in the train split, the held-out split untouched), its pipeline notebook `retrain_segment.ipynb` with the production model's training configuration, and production's re-evaluation on the same held-out split. Registered into `biovis.retrain_recipes` as the recipe of the segmentation task (entry point `biovis.retrain`)."""

__version__ = "0.1.0"
