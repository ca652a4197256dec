"""The Celery app built from the environment, for `celery -A reporter.celery_app worker|beat|inspect|flower`.

The one module whose import reads the environment (and exits 1, with the reason, when it cannot be
read); everything else builds its app with reporter.app.create_app.
"""

from __future__ import annotations

from reporter.app import app_from_env

app = app_from_env()
