"""Builders and helpers the tests share: tiny models and data sets, worker processes, numerics.

Imported as ``support.<module>`` (``tests`` is on the path: ``pythonpath`` in pyproject.toml).
"""

from pathlib import Path

#: the repository (configs, scripts, .git)
REPO = Path(__file__).resolve().parents[2]
