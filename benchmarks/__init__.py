"""Benchmarks: this hub against bare websockets and python-socketio, side by side.

``python -m benchmarks.run`` runs every workload on every target in one run and
writes ``results.json``, ``results.md`` and ``results.png`` (see ``run.py``).
"""
