"""``starflow serve``: one model behind an OpenAI-compatible HTTP API, a job queue and a small web page.

``jobs.py`` runs the model (one worker thread, a bounded queue, progress, cancel, results kept in the
output folder); ``app.py`` is the Starlette app in front of it; ``static/`` is the page served at ``/``.
"""
