import shutil
import socket

from omegaconf import OmegaConf
import pytest

from pipeline.io import read_jsonl
from pipeline.scrape import ScrapeError, latest_rows, month_range, parse_month_list, parse_product_page, scrape
from tests.getchu_site import GetchuSite, product_page, serve
from tests.helpers import ROOT, run_module

CONF = OmegaConf.load(ROOT / "conf/scrape/default.yaml")


@pytest.fixture
def site(month_dir, illustrations):
    """A fresh local Getchu-style site (with its faults) for one test."""
    with GetchuSite(month_dir, illustrations) as site:
        yield site


@pytest.fixture
def plain_site(month_dir, illustrations):
    """The same site without faults."""
    with GetchuSite(month_dir, illustrations, faults=False) as site:
        yield site


def scrape_cfg(site, tmp_path, **overrides):
    cfg = OmegaConf.merge(CONF, {"base_url": site.url, "start": "2015-05", "end": "2015-05", "delay": 0,
                                 "timeout": 1, "backoff": 0.05, "raw_dir": str(tmp_path / "raw")}, overrides)
    return cfg


@pytest.mark.parametrize("month, count", [("2014_12", 91), ("2015_01", 60), ("2015_02", 51),
                                          ("2015_03", 75), ("2015_04", 33), ("2015_05", 30)])
def test_real_month_pages_list_their_products(month, count, month_dir):
    html = (month_dir / f"{month}.html").read_bytes().decode("euc_jp", errors="replace")
    products = parse_month_list(html, "https://www.getchu.com/all/month_title.html?genre=pc_soft")
    assert len(products) == count
    first = products[0]
    assert first["url"] == f"https://www.getchu.com/soft.phtml?id={first['id']}"  # trailing space gone
    assert first["title"]


def test_product_page_yields_only_character_images():
    html = product_page("846113", "t", [(1, '<IMG src="./brandnew/846113/c846113chara1.jpg " alt="キャラ1">'),
                                        (3, '<img src="../brandnew/846113/c846113chara3.jpg">')])
    page = parse_product_page(html.decode("euc_jp"), "https://www.getchu.com/soft.phtml?id=846113")
    assert page["title"] == "t"
    assert page["images"] == ["https://www.getchu.com/brandnew/846113/c846113chara1.jpg",
                              "https://www.getchu.com/brandnew/846113/c846113chara3.jpg"]


def test_month_range_and_its_errors():
    assert month_range("2014-11", "2015-02") == [(2014, 11), (2014, 12), (2015, 1), (2015, 2)]
    with pytest.raises(ScrapeError, match="scrape.start='2015-13'"):
        month_range("2015-13", "2015-12")
    with pytest.raises(ScrapeError, match="comes after"):
        month_range("2015-02", "2015-01")


def test_scrape_handles_every_fault_and_second_run_requests_nothing(tmp_path, site):
    counts = scrape(scrape_cfg(site, tmp_path))
    rows = {r["url"].removeprefix(site.url): r for r in read_jsonl(tmp_path / "raw" / "index.jsonl")}
    for path, source in site.expected_files.items():
        row = rows[path]
        assert row["status"] == "ok", row
        assert (tmp_path / "raw" / row["file"]).read_bytes() == source.read_bytes()
    reasons = {site.faulty[p]: rows[p].get("reason") for p in site.faulty}
    assert reasons["placeholder"] == "placeholder" and reasons["not_image"] == "not_image"
    assert reasons["redirect_away"] == "offsite_redirect"  # refused: nothing sent to the other host
    offsite = [r for r in rows.values() if r.get("reason") == "offsite"]
    assert len(offsite) == 1 and site.other.hits == 0
    # never asked for package, sample or charab images
    assert all("chara" in p and "charab" not in p for p in site.requests if p.startswith("/brandnew/"))
    assert all(h.get("Referer", "").startswith(site.url + "/soft.phtml") for p, h in site.log
               if p.startswith("/brandnew/"))
    assert not list((tmp_path / "raw").rglob("*.part"))
    assert counts["image_ok"] == len(site.expected_files)

    before = sum(site.requests.values())
    scrape(scrape_cfg(site, tmp_path))
    assert sum(site.requests.values()) == before  # nothing re-fetched: no page, no image


def test_age_gate_without_cookie_is_a_clear_error(tmp_path, plain_site):
    cfg = scrape_cfg(plain_site, tmp_path)
    cfg.cookies = {}
    with pytest.raises(ScrapeError, match="age-verification.*scrape.cookies"):
        scrape(cfg)


def test_failed_and_oversized_images_leave_no_file_and_failures_are_retried(tmp_path, plain_site):
    site = plain_site
    missing = next(iter(site.images))
    saved = site.images.pop(missing)
    cfg = scrape_cfg(site, tmp_path, max_bytes=2_000_000, retries=1)
    scrape(cfg)
    rows = {r["url"].removeprefix(site.url): r for r in read_jsonl(tmp_path / "raw" / "index.jsonl")}
    assert rows[missing]["status"] == "failed" and rows[missing]["reason"] == "http_404"
    too_large = [p for p, b in site.images.items() if len(b) > 2_000_000]
    assert too_large and all(rows[p]["reason"] == "too_large" for p in too_large)
    files = {p.name for p in (tmp_path / "raw").rglob("*.jpg")}
    assert missing.rsplit("/", 1)[1] not in files
    assert not any(p.rsplit("/", 1)[1] in files for p in too_large)

    site.images[missing] = saved
    site.requests.clear()
    scrape(cfg)
    assert site.requests[missing] == 1 and site.image_requests() == 1


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_site_fails_at_once_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    proc = run_module("pipeline.scrape", f"scrape.base_url={url}", "scrape.start=2015-01", "scrape.end=2015-12",
                      f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot reach {url}/all/month_title.html")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.log"))


def test_site_going_away_stops_the_run_and_a_rerun_resumes(tmp_path, month_dir, illustrations):
    with GetchuSite(month_dir, illustrations, faults=False) as site:
        port = site.server.server_address[1]
        site.stop_after = 4
        with pytest.raises(ScrapeError, match="stopped answering: 3 requests in a row.*run the same command"):
            scrape(scrape_cfg(site, tmp_path, max_failures_in_a_row=3))
        fetched = set(site.requests)
    kept = {r["url"] for r in read_jsonl(tmp_path / "raw" / "index.jsonl") if r["status"] == "ok"}
    assert len(kept) == 4 and any("month_title" in u for u in kept)
    with GetchuSite(month_dir, illustrations, faults=False, port=port) as site:
        counts = scrape(scrape_cfg(site, tmp_path))
        assert "/all/month_title.html" not in site.requests  # what was kept is not fetched again
        assert not fetched & {p for p in site.requests if p.startswith("/brandnew/")}
        rows = latest_rows(tmp_path / "raw" / "index.jsonl")
        assert all(rows[site.url + path]["status"] == "ok" for path in site.expected_files)
        assert counts["image_ok"] == len(site.expected_files) - sum(1 for u in kept if "/brandnew/" in u)


def test_month_page_with_unknown_markup_is_reported_not_cached(tmp_path, month_dir, illustrations):
    pages = tmp_path / "pages"
    shutil.copytree(month_dir, pages)
    real = (pages / "2015_05.html").read_bytes()
    (pages / "2015_05.html").write_bytes(real.replace(b'class="black"', b'class="item-title"'))
    with GetchuSite(pages, illustrations, month="2015_04", faults=False) as site:
        counts = scrape(scrape_cfg(site, tmp_path, start="2015-04", end="2015-05"))
        assert counts["month_unrecognised"] == 1 and counts["month_recognised"] == 1
        months = [r["month"] for r in read_jsonl(tmp_path / "raw" / "index.jsonl") if r["kind"] == "month"]
        assert months == ["2015-04"]  # the unrecognised month is not recorded as done
        with pytest.raises(ScrapeError, match="none of the 1 monthly list pages.*markup may have changed"):
            scrape(scrape_cfg(site, tmp_path / "other", start="2015-05", end="2015-05"))
        (pages / "2015_05.html").write_bytes(real)
        site.requests.clear()
        counts = scrape(scrape_cfg(site, tmp_path, start="2015-04", end="2015-05"))
        assert site.requests["/all/month_title.html"] == 1 and counts["month_recognised"] == 1


@pytest.mark.parametrize("value, message", [
    ("scrape.genres=pc_soft", "scrape.genres='pc_soft' is not a list of text values"),
    ("scrape.genres=[]", "scrape.genres=[] needs at least 1 item"),
    ("scrape.delay=-1", "scrape.delay=-1.0 is out of range: it must be >= 0"),
    ("scrape.max_bytes=lots", "scrape.max_bytes='lots' is not a whole number"),
])
def test_scrape_keys_are_checked_before_any_request(tmp_path, value, message):
    proc = run_module("pipeline.scrape", value, f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out",
                      "scrape.base_url=http://127.0.0.1:9", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {proc.stderr.strip()[7:]}"
    assert message in proc.stderr and not (tmp_path / "data").exists()


def test_a_run_where_every_request_failed_does_not_succeed(tmp_path):
    server = serve(lambda handler: GetchuSite.send(handler, 404, b"gone", "text/html"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = OmegaConf.merge(CONF, {"base_url": url, "start": "2015-04", "end": "2015-05", "delay": 0,
                                     "raw_dir": str(tmp_path / "raw")})
        with pytest.raises(ScrapeError, match="every one of 2 requests failed"):
            scrape(cfg)
    finally:
        server.shutdown()
        server.server_close()
