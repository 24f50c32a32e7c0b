import os

# Whatever a portal process creates (the database, logs, the broker's files, .env) is its user's
# alone. Set here, first, so manage.py, gunicorn and every Celery process get it; the local backend
# gives the folders instance servers need their modes explicitly.
os.umask(0o077)

from .celery import app as celery_app  # noqa: E402 - after the umask, which it must not precede

__all__ = ["celery_app"]
