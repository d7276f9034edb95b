"""The feedback store: predictions, clinicians' feedback, users, corrected masks, sets of findings and drift events.

`feedback.db` holds the schema, the engine and the typed errors; `feedback.store` the store of predictions,
feedback and images; `feedback.users`, `feedback.masks`, `feedback.drift_events`, `feedback.review` (held
corrections) and `feedback.queue` (what to review next) add their methods to `FeedbackStore`; `feedback.findings` writes a set of findings
(multi-label) as one canonical label. Importing the package loads them all, so `from biovis.feedback import FeedbackStore` gives the whole store.
"""
from .db import (FeedbackError, UnknownPredictionError, FeedbackPermissionError, UnknownLabelError, ROLES, GC_MIN_AGE,
                 UPLOAD_EXTS, BUSY_TIMEOUT_MS, image_format, default_db_url, Base, PredictionRecord, FeedbackRecord, UserRecord,
                 MaskFeedbackRecord, DriftEventRecord)
from .store import FeedbackStore
from . import users, masks, drift_events, review, queue
from .review import hold_reason, NotHeldError
from .findings import NO_FINDING, finding_set_label, finding_set, is_finding_set, findings_hold_reason
