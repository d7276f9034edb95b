"""The feedback store: predictions, clinicians' feedback, users, corrected masks and drift events.

`feedback.db` holds the schema, the engine and the typed errors; `feedback.store` the store of predictions,
feedback and images; `feedback.users`, `feedback.masks`, `feedback.drift_events`, `feedback.review` (held
corrections) and `feedback.queue` (what to review next) add their methods to `FeedbackStore`. Importing the package loads them all, so `from biovis.feedback import FeedbackStore` gives the whole store.
"""
from .db import (FeedbackError, UnknownPredictionError, FeedbackPermissionError, UnknownLabelError, ROLES, GC_MIN_AGE,
                 UPLOAD_EXTS, BUSY_TIMEOUT_MS, image_format, default_db_url, Base, PredictionRecord, FeedbackRecord, UserRecord,
                 MaskFeedbackRecord, DriftEventRecord)
from .store import FeedbackStore
from . import users, masks, drift_events, review, queue
from .review import hold_reason, NotHeldError
