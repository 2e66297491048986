"""Celery workers: ``celery -A workers worker`` finds the app in ``workers.celery``.

Nothing is imported here, so the web process can import ``workers.publish`` alone.
"""
