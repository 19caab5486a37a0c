"""animeface-vae: scrape -> crop -> pack -> train -> sample / evaluate / explore / export. One module per stage.

From Python: `from pipeline import load` (pipeline/api.py), e.g. `load(obs_std=0.1).sample(16)`.
"""


def __getattr__(name):
    if name in ("load", "FaceModel"):  # imported on first use: the stages need not load torch for it
        from pipeline import api
        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
