"""Where the tests' real pictures come from.

1. `../shared` beside the checkout (as CI lays it), when it holds the files;
2. else the same files from their public upstream locations, pinned by commit and checked by
   sha256 (`realdata_registry.tsv`), fetched once with pooch into `$ANIMEFACE_TEST_DATA`
   (default: pooch's cache folder for animeface-vae-tests);
3. else (offline, or a file changed upstream) the tests that need them are skipped, with a reason
   that says what is missing and how to get it.

Sets, by what the tests need: `cascade`, `illustrations` (160), `month_pages` (6), `faces_sample`
(the first 700 Getchu face tiles), `faces_full` (all 19,992 tiles: only from ../shared, since
fetching 20,000 files one by one is not a reasonable test setup).

Regenerate the registry from a ../shared copy with `python -m tests.realdata`.
"""
import hashlib
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REGISTRY = Path(__file__).with_name("realdata_registry.tsv")
FACES_SAMPLE = 700

# shared/ prefix -> upstream raw-file prefix, pinned by commit (../shared/data/README.md)
RAW = "https://raw.githubusercontent.com"
UPSTREAM = {
    "cascade/": f"{RAW}/nagadomi/lbpcascade_animeface/4433ab1ae1166ea75acfe99eb0f18709dac329a0/",
    "data/illustrations/": f"{RAW}/skhyr/Anime-Girls-Holding-Programming-Books/"
                           "684aedce9e198de52b8a75abbe3d6deb17136e04/",
    "data/faces/getchu-2000-2009/": f"{RAW}/Mysterchan/Anime_DCGAN/2d316670d3b8259462efd694602802303470fbf1/images/",
    "getchu/month_title/": f"{RAW}/project-orgel/getchu_com_scraping_tools/"
                           "2a0cf982050554bb7624765153e1539fd81ea08e/sample_page/",
}
SETS = {
    "cascade": "cascade/",
    "illustrations": "data/illustrations/",
    "month_pages": "getchu/month_title/",
    "faces_sample": "data/faces/getchu-2000-2009/",
    "faces_full": "data/faces/getchu-2000-2009/",
}
HOW_TO_GET = ("put the project's shared data folder at ../shared beside the checkout, or run the tests once "
              "with network access (files are fetched from their pinned upstream commits into "
              "$ANIMEFACE_TEST_DATA)")


def registry() -> dict[str, str]:
    """shared-relative path -> sha256."""
    rows = (line.split("\t") for line in REGISTRY.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#"))
    return {path: digest for path, digest in rows}


def upstream_url(path: str) -> str:
    prefix = next(p for p in UPSTREAM if path.startswith(p))
    return UPSTREAM[prefix] + quote(path[len(prefix):])


def members(name: str) -> list[str]:
    """The registered files of a set (faces_sample: the first 700 tiles by name)."""
    return sorted(p for p in registry() if p.startswith(SETS[name]))


def in_shared(name: str) -> bool:
    if name == "faces_full":
        return (SHARED / SETS[name]).is_dir() and len(list((SHARED / SETS[name]).glob("*.jpg"))) >= 19992
    return all((SHARED / path).is_file() for path in members(name))


def cache_dir() -> Path:
    import pooch
    return Path(os.environ.get("ANIMEFACE_TEST_DATA") or pooch.os_cache("animeface-vae-tests"))


def fetch(paths: list[str], root: Path, urls=upstream_url) -> None:
    """Download `paths` under `root` (skipping those already there and verified), checking sha256."""
    import pooch
    digests = registry()
    store = pooch.create(path=root, base_url="", registry={p: f"sha256:{digests[p]}" for p in paths},
                         urls={p: urls(p) for p in paths}, retry_if_failed=1)
    for path in paths:
        store.fetch(path)


def root_for(name: str) -> Path:
    """A folder laid out like ../shared that holds set `name`, or a skip saying what is missing."""
    if in_shared(name):
        return SHARED
    if name == "faces_full":
        pytest.skip(f"needs all 19,992 face tiles at {SHARED / SETS[name]}: {HOW_TO_GET.split(', or')[0]}")
    root = cache_dir()
    try:
        fetch(members(name), root)
    except Exception as err:  # offline, a moved file, a hash that no longer matches: skip with the reason
        pytest.skip(f"needs the real '{name}' files ({SHARED / SETS[name]} is not there and fetching them "
                    f"failed: {type(err).__name__}: {str(err)[:200]}); {HOW_TO_GET}")
    return root


def write_registry(shared: Path) -> None:
    lines = ["# path under ../shared<TAB>sha256 (python -m tests.realdata)"]
    for prefix in UPSTREAM:
        files = sorted(p for p in (shared / prefix).rglob("*") if p.is_file())
        for path in files[:FACES_SAMPLE] if prefix == SETS["faces_sample"] else files:
            lines.append(f"{path.relative_to(shared).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}")
    REGISTRY.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_registry(Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED)
