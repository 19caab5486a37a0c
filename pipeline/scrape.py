"""Stage 1: download character art from Getchu-style monthly release lists and product pages.

month list pages -> product pages -> /brandnew/<id>/c<id>chara<N>.jpg -> ${scrape.raw_dir}/<id>/...
Every fetched page and image is recorded in ${scrape.raw_dir}/index.jsonl, so a rerun asks the
site for nothing it already has and a killed run resumes where it stopped.
"""
import hashlib
import io
import logging
import re
import time
from collections import Counter
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlsplit

import hydra
import requests
from bs4 import BeautifulSoup
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from pipeline.errors import PipelineError, exit_on_error
from pipeline.io import JsonlLog, atomic_write_bytes, read_jsonl

log = logging.getLogger(__name__)

PRODUCT_LINK_RE = re.compile(r"soft\.phtml\?id=(\d+)")
CHARA_IMAGE_RE = re.compile(r"/brandnew/(\d+)/c\1chara\d+\.jpg$")
AGE_GATE_MARK = "年齢認証"
BODY_ERRORS = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
               requests.exceptions.Timeout)


class ScrapeError(PipelineError):
    """A problem with the configuration or the site that retrying cannot fix."""


class TooLarge(Exception):
    pass


def month_range(start: str, end: str) -> list[tuple[int, int]]:
    """Inclusive list of (year, month) from 'YYYY-MM' to 'YYYY-MM'."""
    def parse(text, key):
        match = re.fullmatch(r"(\d{4})-(\d{2})", str(text))
        if not match or not 1 <= int(match[2]) <= 12:
            raise ScrapeError(f"scrape.{key}={text!r} is not a month: write it as YYYY-MM, e.g. 2015-02")
        return int(match[1]), int(match[2])

    (y, m), last = parse(start, "start"), parse(end, "end")
    if (y, m) > last:
        raise ScrapeError(f"scrape.start={start} comes after scrape.end={end}")
    out = []
    while (y, m) <= last:
        out.append((y, m))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def month_list_url(base_url: str, genre: str, year: int, month: int) -> str:
    return urljoin(base_url, f"/all/month_title.html?genre={genre}&gage=&year={year}&month={month:02d}")


def parse_month_list(html: str, page_url: str) -> list[dict]:
    """Products on a monthly list: the `a.black` title links to soft.phtml?id=N (href has a trailing space)."""
    products, seen = [], set()
    for link in BeautifulSoup(html, "html.parser").select("a.black[href]"):
        href = link["href"].strip()
        match = PRODUCT_LINK_RE.search(href)
        if not match or match[1] in seen:
            continue
        seen.add(match[1])
        products.append({"id": match[1], "title": link.get_text(" ", strip=True),
                         "url": urljoin(page_url, href)})
    return products


def parse_product_page(html: str, page_url: str) -> dict:
    """Title and character image URLs of a product page (images matched by the chara URL pattern)."""
    soup = BeautifulSoup(html, "html.parser")
    title_tag = soup.select_one("h1#soft-title") or soup.title
    images = []
    for img in soup.find_all("img", src=True):
        url = urljoin(page_url, img["src"].strip())
        if CHARA_IMAGE_RE.search(urlsplit(url).path) and url not in images:
            images.append(url)
    return {"title": title_tag.get_text(" ", strip=True) if title_tag else "", "images": images}


def is_age_gate(html: str) -> bool:
    return AGE_GATE_MARK in html and "soft-title" not in html


def check_image(data: bytes, min_side: int) -> tuple[str | None, tuple[int, int] | None]:
    """None if `data` is an image big enough to hold a face, else the reason to drop it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
    except (UnidentifiedImageError, OSError):
        return "not_image", None
    if min(size) <= 1:
        return "placeholder", size
    if min(size) < min_side:
        return "too_small", size
    return None, size


class Client:
    """One polite HTTP connection: a delay between requests, urllib3 retries, a size cap per body."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.host = urlsplit(cfg.base_url).netloc
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries,
                      backoff_factor=cfg.backoff, status_forcelist=[408, 429, 500, 502, 503, 504],
                      allowed_methods=["GET"], respect_retry_after_header=True,
                      raise_on_status=False)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=1)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, adapter)
        cookie = "; ".join(f"{k}={v}" for k, v in (cfg.cookies or {}).items())
        self.session.headers.update({"User-Agent": cfg.user_agent, **({"Cookie": cookie} if cookie else {})})
        self.requests = 0
        self.bytes = 0
        self._last = 0.0

    def on_host(self, url: str) -> bool:
        return urlsplit(url).netloc == self.host

    def get(self, url: str, referer: str | None = None) -> tuple[int, bytes]:
        """Status and body of `url`; a body cut off mid-transfer is fetched again (body_retries)."""
        if not self.on_host(url):
            raise ScrapeError(f"refusing to fetch {url}: not on scrape.base_url's host {self.host}")
        headers = {"Referer": referer} if referer else {}
        for attempt in range(self.cfg.body_retries + 1):
            time.sleep(max(0.0, self._last + self.cfg.delay - time.monotonic()))
            self._last = time.monotonic()
            self.requests += 1
            try:
                with self.session.get(url, headers=headers, timeout=self.cfg.timeout, stream=True) as resp:
                    return resp.status_code, self._read_capped(resp)
            except BODY_ERRORS:
                if attempt == self.cfg.body_retries:
                    raise
                log.info("retrying %s after a broken transfer", url)
                time.sleep(self.cfg.backoff * 2 ** attempt)

    def _read_capped(self, resp) -> bytes:
        if int(resp.headers.get("Content-Length") or 0) > self.cfg.max_bytes:
            raise TooLarge()
        chunks, total = [], 0
        for chunk in resp.iter_content(64 * 1024):
            total += len(chunk)
            if total > self.cfg.max_bytes:
                raise TooLarge()
            chunks.append(chunk)
        self.bytes += total
        return b"".join(chunks)

    def get_html(self, url: str, referer: str | None = None) -> tuple[int, str]:
        status, body = self.get(url, referer)
        return status, body.decode(self.cfg.encoding, errors="replace")


def latest_rows(index_path: Path) -> dict[str, dict]:
    """The last index row for each URL."""
    return {row["url"]: row for row in read_jsonl(index_path)}


def image_path(raw_dir: Path, product_id: str, url: str) -> Path:
    return raw_dir / product_id / PurePosixPath(urlsplit(url).path).name


class Scraper:
    def __init__(self, cfg):
        self.cfg = cfg
        self.raw_dir = Path(cfg.raw_dir)
        self.index_path = self.raw_dir / "index.jsonl"
        self.done = latest_rows(self.index_path)
        self.client = Client(cfg)
        self.counts = Counter()

    def is_done(self, url: str) -> bool:
        row = self.done.get(url)
        if row is None or (row["status"] == "failed" and self.cfg.retry_failed):
            return False
        if row["status"] == "ok" and row.get("kind") == "image":
            return (self.raw_dir / row["file"]).exists()
        return True

    def record(self, index: JsonlLog, row: dict) -> None:
        index.append(row)
        self.done[row["url"]] = row
        self.counts[f"{row['kind']}_{row['status']}" + (f"_{row['reason']}" if row.get("reason") else "")] += 1

    def fetch_page(self, index: JsonlLog, kind: str, url: str, referer=None, **meta) -> str | None:
        """HTML of a page, or None after recording why it could not be had."""
        try:
            status, html = self.client.get_html(url, referer)
        except (requests.RequestException, TooLarge) as err:
            self.record(index, {"kind": kind, "url": url, "status": "failed", "reason": type(err).__name__, **meta})
            log.warning("%s %s failed: %s", kind, url, err)
            return None
        if status != 200:
            self.record(index, {"kind": kind, "url": url, "status": "failed", "reason": f"http_{status}", **meta})
            log.warning("%s %s answered HTTP %d", kind, url, status)
            return None
        if is_age_gate(html):
            raise ScrapeError(
                f"{url} answered with the age-verification page ({AGE_GATE_MARK}): the site refused "
                f"scrape.cookies={dict(self.cfg.cookies or {})}; set the cookie the site expects")
        return html

    def month_products(self, index: JsonlLog, genre: str, year: int, month: int) -> list[dict]:
        url = month_list_url(self.cfg.base_url, genre, year, month)
        if self.is_done(url):
            return self.done[url].get("products", [])
        html = self.fetch_page(index, "month", url, genre=genre, month=f"{year}-{month:02d}")
        if html is None:
            return []
        products = [p for p in parse_month_list(html, url) if self.client.on_host(p["url"])]
        self.record(index, {"kind": "month", "url": url, "status": "ok", "genre": genre,
                            "month": f"{year}-{month:02d}", "products": products})
        return products

    def product_images(self, index: JsonlLog, product: dict) -> list[str]:
        url = product["url"]
        if self.is_done(url):
            return self.done[url].get("images", [])
        html = self.fetch_page(index, "product", url, id=product["id"])
        if html is None:
            return []
        page = parse_product_page(html, url)
        self.record(index, {"kind": "product", "url": url, "status": "ok", "id": product["id"],
                            "title": page["title"] or product["title"], "images": page["images"]})
        return page["images"]

    def fetch_image(self, index: JsonlLog, product: dict, url: str) -> None:
        row = {"kind": "image", "url": url, "product_id": product["id"], "title": product["title"]}
        if not self.client.on_host(url):
            self.record(index, {**row, "status": "skipped", "reason": "offsite"})
            return
        try:
            status, data = self.client.get(url, referer=product["url"])
        except TooLarge:
            self.record(index, {**row, "status": "skipped", "reason": "too_large"})
            return
        except requests.RequestException as err:
            log.warning("image %s failed: %s", url, err)
            self.record(index, {**row, "status": "failed", "reason": type(err).__name__})
            return
        if status != 200:
            self.record(index, {**row, "status": "failed", "reason": f"http_{status}"})
            return
        reason, size = check_image(data, self.cfg.min_side)
        if reason:
            log.info("dropping %s: %s %s", url, reason, size or "")
            self.record(index, {**row, "status": "skipped", "reason": reason})
            return
        path = image_path(self.raw_dir, product["id"], url)
        atomic_write_bytes(path, data)
        self.record(index, {**row, "status": "ok", "file": path.relative_to(self.raw_dir).as_posix(),
                            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                            "width": size[0], "height": size[1]})

    def run(self) -> Counter:
        start = time.monotonic()
        months = month_range(self.cfg.start, self.cfg.end)
        with JsonlLog(self.index_path) as index:
            products = []
            for genre in self.cfg.genres:
                for year, month in tqdm(months, desc=f"month lists ({genre})", unit="month"):
                    products += self.month_products(index, genre, year, month)
            for product in tqdm(products, desc="products", unit="product"):
                for url in self.product_images(index, product):
                    if not self.is_done(url):
                        self.fetch_image(index, product, url)
        self.counts["requests"] = self.client.requests
        self.counts["bytes"] = self.client.bytes
        skipped = {k: v for k, v in sorted(self.counts.items()) if "skipped" in k or "failed" in k}
        log.info("scrape done: %d month pages, %d products, %d images saved, skipped/failed %s, "
                 "%d requests, %.1f MB, %.0f s", len(months) * len(self.cfg.genres), len(products),
                 sum(1 for r in self.done.values() if r.get("kind") == "image" and r["status"] == "ok"),
                 skipped or "none", self.client.requests, self.client.bytes / 1e6, time.monotonic() - start)
        return self.counts


def scrape(cfg: DictConfig) -> Counter:
    return Scraper(cfg).run()


@hydra.main(config_path="../conf", config_name="scrape", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    scrape(cfg.scrape)


if __name__ == "__main__":
    main()
