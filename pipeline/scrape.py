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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlsplit

import hydra
import requests
from bs4 import BeautifulSoup
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import NewConnectionError
from urllib3.util.retry import Retry

from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, exit_on_error
from pipeline.io import JsonlLog, after_write_error, atomic_write_bytes, read_jsonl, remove_partial_files

log = logging.getLogger(__name__)

PRODUCT_LINK_RE = re.compile(r"soft\.phtml\?id=(\d+)")
CHARA_IMAGE_RE = re.compile(r"/brandnew/(\d+)/c\1chara\d+\.jpg$")
AGE_GATE_MARK = "年齢認証"
MAX_REDIRECTS = 5
BODY_ERRORS = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
               requests.exceptions.Timeout)


@dataclass
class ScrapeConfig:
    """The keys of conf/scrape/default.yaml, their types and ranges."""
    base_url: str = key()
    genres: list[str] = key(low=1)
    start: str = key()
    end: str = key()
    delay: float = key(low=0)
    timeout: float = key(low=0.1)
    retries: int = key(low=0)
    body_retries: int = key(low=0)
    backoff: float = key(low=0)
    max_bytes: int = key(low=1)
    min_side: int = key(low=1)
    retry_failed: bool = key()
    max_failures_in_a_row: int = key(low=1)
    encoding: str = key()
    user_agent: str = key()
    cookies: dict[str, str] = key()
    raw_dir: str = key()


@dataclass
class ScrapeJob:
    paths: Paths = key(default=Paths)
    scrape: ScrapeConfig = key(default=ScrapeConfig)


class ScrapeError(PipelineError):
    """A problem with the configuration or the site that retrying cannot fix."""


class TooLarge(Exception):
    pass


class OffsiteRedirect(Exception):
    """A redirect to another host than scrape.base_url's: refused, nothing is sent there."""


def urllib3_reason(err: Exception):
    """The urllib3 error behind a requests exception (MaxRetryError.reason), if any."""
    return getattr(err.args[0], "reason", None) if err.args else None


def is_unreachable(err: Exception) -> bool:
    """A failure to connect at all (DNS, refused, connect timeout), as opposed to a broken transfer."""
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    return isinstance(err, requests.exceptions.ConnectionError) and isinstance(urllib3_reason(err), NewConnectionError)


def failure_cause(err: Exception) -> str:
    return str(urllib3_reason(err) or err).split(": ", 1)[-1]


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
        # one quick reconnect only: a host that cannot be reached is reported, not retried for minutes
        retry = Retry(total=cfg.retries, connect=min(cfg.retries, 1), read=cfg.retries, status=cfg.retries,
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
        """Status and body of `url`, following redirects only on the host; a body cut off mid-transfer
        is fetched again (body_retries)."""
        for _ in range(MAX_REDIRECTS + 1):
            if not self.on_host(url):
                raise OffsiteRedirect(url)
            status, body, location = self._get_once(url, referer)
            if location is None:
                return status, body
            url = urljoin(url, location)
        raise requests.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")

    def _get_once(self, url: str, referer: str | None) -> tuple[int, bytes, str | None]:
        headers = {"Referer": referer} if referer else {}
        for attempt in range(self.cfg.body_retries + 1):
            time.sleep(max(0.0, self._last + self.cfg.delay - time.monotonic()))
            self._last = time.monotonic()
            self.requests += 1
            try:
                with self.session.get(url, headers=headers, timeout=self.cfg.timeout, stream=True,
                                      allow_redirects=False) as resp:
                    if resp.is_redirect:
                        return resp.status_code, b"", resp.headers["Location"]
                    return resp.status_code, self._read_capped(resp), None
            except BODY_ERRORS as err:
                if attempt == self.cfg.body_retries or is_unreachable(err):
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
        if removed := remove_partial_files(self.raw_dir):
            log.info("removed %d partial files left by a killed run in %s", removed, self.raw_dir)
        self.done = latest_rows(self.index_path)
        self.client = Client(cfg)
        self.counts = Counter()
        self.answered_ok = self.unreachable_in_a_row = 0

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

    def request(self, url: str, referer: str | None = None) -> tuple[int | None, bytes | str]:
        """(HTTP status, body), or (None, the reason it could not be had)."""
        try:
            status, body = self.client.get(url, referer)
        except TooLarge:
            return None, "too_large"
        except OffsiteRedirect as err:
            log.warning("%s redirects to %s, off scrape.base_url's host: refused", url, err)
            return None, "offsite_redirect"
        except requests.RequestException as err:
            self.note_failure(url, err)
            return None, "unreachable" if is_unreachable(err) else type(err).__name__
        self.unreachable_in_a_row = 0
        self.answered_ok += status == 200
        return status, body

    def note_failure(self, url: str, err: requests.RequestException) -> None:
        """Log it; stop the run when the site cannot be reached at the start or stops answering."""
        log.warning("%s failed: %s", url, failure_cause(err))
        if not is_unreachable(err):
            return
        self.unreachable_in_a_row += 1
        if self.answered_ok == 0 and self.unreachable_in_a_row == 1:
            raise ScrapeError(f"cannot reach {url}: {failure_cause(err)}; check scrape.base_url="
                              f"{self.cfg.base_url} and the network (nothing was fetched this run)")
        if self.unreachable_in_a_row >= self.cfg.max_failures_in_a_row:
            raise ScrapeError(f"the site stopped answering: {self.unreachable_in_a_row} requests in a row could "
                              f"not connect (last: {url}: {failure_cause(err)}); everything fetched so far is "
                              f"kept in {self.index_path}: run the same command again to resume")

    def fetch_page(self, index: JsonlLog, kind: str, url: str, **meta) -> str | None:
        """HTML of a page, or None after recording why it could not be had."""
        status, body = self.request(url)
        if status != 200:
            reason = body if status is None else f"http_{status}"
            self.record(index, {"kind": kind, "url": url, "status": "failed", "reason": reason, **meta})
            log.warning("%s %s failed: %s", kind, url, reason)
            return None
        html = body.decode(self.cfg.encoding, errors="replace")
        if is_age_gate(html):
            raise ScrapeError(
                f"{url} answered with the age-verification page ({AGE_GATE_MARK}): the site refused "
                f"scrape.cookies={dict(self.cfg.cookies or {})}; set the cookie the site expects")
        return html

    def month_products(self, index: JsonlLog, genre: str, year: int, month: int) -> list[dict]:
        url = month_list_url(self.cfg.base_url, genre, year, month)
        if self.is_done(url):
            return self.done[url].get("products", [])
        meta = {"genre": genre, "month": f"{year}-{month:02d}"}
        html = self.fetch_page(index, "month", url, **meta)
        if html is None:
            return []
        products = [p for p in parse_month_list(html, url) if self.client.on_host(p["url"])]
        if not products:  # an empty month, or markup the parser no longer recognises
            log.warning("%s lists no product (no a.black link to soft.phtml?id=N): not recorded, "
                        "fetched again next run", url)
            self.counts["month_unrecognised"] += 1
            return []
        self.counts["month_recognised"] += 1
        self.record(index, {"kind": "month", "url": url, "status": "ok", **meta, "products": products})
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
        status, data = self.request(url, referer=product["url"])
        if status is None and data in ("too_large", "offsite_redirect"):
            self.record(index, {**row, "status": "skipped", "reason": data})
            return
        if status != 200:
            self.record(index, {**row, "status": "failed", "reason": data if status is None else f"http_{status}"})
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

    def check_month_pages_recognised(self) -> None:
        if self.counts["month_unrecognised"] and not self.counts["month_recognised"]:
            raise ScrapeError(f"none of the {self.counts['month_unrecognised']} monthly list pages fetched lists a "
                              "product (no a.black link to soft.phtml?id=N): the site's markup may have changed "
                              "(pipeline/scrape.py: parse_month_list), or the months asked for are empty")

    def run(self) -> Counter:
        start = time.monotonic()
        months = month_range(self.cfg.start, self.cfg.end)
        with JsonlLog(self.index_path) as index:
            products = []
            for genre in self.cfg.genres:
                for year, month in tqdm(months, desc=f"month lists ({genre})", unit="month"):
                    products += self.month_products(index, genre, year, month)
            self.check_month_pages_recognised()
            for product in tqdm(products, desc="products", unit="product"):
                for url in self.product_images(index, product):
                    if not self.is_done(url):
                        self.fetch_image(index, product, url)
        self.counts["requests"] = self.client.requests
        self.counts["bytes"] = self.client.bytes
        if self.client.requests and not self.answered_ok:
            raise ScrapeError(f"every one of {self.client.requests} requests failed (reasons in "
                              f"{self.index_path}); check scrape.base_url={self.cfg.base_url}")
        skipped = {k: v for k, v in sorted(self.counts.items()) if "skipped" in k or "failed" in k}
        log.info("scrape done: %d month pages, %d products, %d images saved, skipped/failed %s, "
                 "%d requests, %.1f MB, %.0f s", len(months) * len(self.cfg.genres), len(products),
                 sum(1 for r in self.done.values() if r.get("kind") == "image" and r["status"] == "ok"),
                 skipped or "none", self.client.requests, self.client.bytes / 1e6, time.monotonic() - start)
        return self.counts


def scrape(cfg: DictConfig) -> Counter:
    with after_write_error("every page and image saved before is kept and listed in index.jsonl; once that is "
                           "fixed, run the same command again: it fetches only what is missing"):
        return Scraper(cfg).run()


@hydra.main(config_path="../conf", config_name="scrape", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    scrape(checked(cfg, ScrapeJob).scrape)


if __name__ == "__main__":
    main()
