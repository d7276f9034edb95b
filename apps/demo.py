"""The clinician demo: Gradio UI + REST API in one FastAPI app.

    biovis serve                                      # the usual way (see biovis serve --help)
    uvicorn --factory apps.demo:make_app --port 7860  # the same app under any ASGI server

Settings come from the environment (BIOVIS_HOME, BIOVIS_MODELS, BIOVIS_DB_URL, BIOVIS_AUTH, ...).
Nothing is loaded at import: the models and the store load when the app is made.
"""
from biovis.core import set_env

set_env(setdefault=True, GRADIO_ANALYTICS_ENABLED='False')


def make_app():
    from biovis.serve import auth_enabled, build_service, create_app
    return create_app(build_service(), auth=auth_enabled())


if __name__ == '__main__':
    from biovis.serve import serve
    serve()
