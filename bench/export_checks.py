"""What checking an export folder costs `load()`: the checks of pipeline/bundle.py (every config.json field, every
tensor finite, the mixture and the hair colours) against the same load with those checks replaced by no-ops.

    .venv/bin/python bench/export_checks.py EXPORT_FOLDER [--reps 10]

Each repetition loads the folder both ways, in alternating order, in this process (imports paid once), and
draws one face (the stored prior and the hair colours are read on first use). Prints the medians.
"""
import argparse
import statistics
import time
from contextlib import contextmanager
from unittest import mock

from pipeline import bundle, load


@contextmanager
def unchecked():
    """pipeline/bundle.py's checks as no-ops: what loading cost before them."""
    same = lambda value, *args, **kwargs: value  # noqa: E731
    with mock.patch.object(bundle, "fits", lambda *args: None), mock.patch.object(bundle, "require_finite", same), \
            mock.patch.object(bundle, "checked_mixture", same), mock.patch.object(bundle, "checked_hair", same):
        yield


def timed_load(folder: str) -> float:
    start = time.perf_counter()
    model = load(folder, device="cpu")
    model.sample(1)
    model.hair_colours()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    timed_load(args.folder)  # warm the page cache and the lazy imports
    checked, baseline = [], []
    for rep in range(args.reps):
        for side in ((checked, baseline) if rep % 2 else (baseline, checked)):
            if side is baseline:
                with unchecked():
                    baseline.append(timed_load(args.folder))
            else:
                checked.append(timed_load(args.folder))
    base, full = statistics.median(baseline), statistics.median(checked)
    print(f"load() + sample(1) + hair colours, median of {args.reps}: without the checks {base * 1000:.0f} ms, "
          f"with them {full * 1000:.0f} ms (+{(full - base) * 1000:.0f} ms, x{full / base:.2f})")


if __name__ == "__main__":
    main()
