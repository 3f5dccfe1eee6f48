"""The explorer: a local web page to draw a digit and watch the prediction and every explanation.

``explorer.Explorer`` holds a trained run's model and its explanation functions, compiled once at
start-up; ``app.create_app`` serves it (Starlette, ``pip install -e ".[serve]"``); ``page.html`` is
the page, self-contained (no script, style or font from elsewhere). Start it with
``python scripts/serve.py``.
"""
