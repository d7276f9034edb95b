"""Serving, one job a file: `pool` (models that follow the registry, micro-batching), `auth` (tokens, who is calling),
`limits` (rate limit, upload size, zips), `metrics` (Prometheus), `errors` (exception classes -> HTTP statuses),
`service` (`PredictionService`: predict, explain, store, feedback), `api` (the FastAPI routes), `ui` (the Gradio UI),
`segment` (segmentation routes and tab), `launch` (`build_service`, `serve`, the uvicorn factory `app_from_env`).
The serving benchmark lives in `biovis.bench.serving`."""
from .service import PredictionService
from .auth import auth_enabled
from .api import create_app
from .launch import build_service, app_from_env, serve
from .segment import export_mask_feedback
