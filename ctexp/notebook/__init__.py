"""The notebook API: recorded runs as pandas DataFrames and ctexp's typed objects.

    from ctexp.notebook import open_home

    home = open_home("mlruns")                      # or open_home("postgresql+psycopg://me@db/ctexp")
    runs = home.runs(lens="layer-position", sort="test_top1", limit=10)
    run = home.run("latest")
    run.by_position()                               # intervals, baselines and lifts per position
    lens, spec = run.lens()

See ``ctexp.notebook.api`` and README's "Notebook API".
"""

from ctexp.notebook.api import Home, RecordedRun, open_home

__all__ = ["Home", "RecordedRun", "open_home"]
