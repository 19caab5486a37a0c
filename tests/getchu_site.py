"""A local Getchu-style site on 127.0.0.1 for offline tests.

Monthly list pages are the real saved pages (getchu/month_title/ of ../shared or of the fetched copy,
see tests/realdata.py); product pages follow the real markup (EUC-JP, relative ./brandnew/ paths,
an age gate without the cookie); character images are the real illustrations (data/illustrations/). Some URLs misbehave on
purpose: a 1x1 placeholder, a non-image, a 503 that recovers, a slow answer, a truncated body, a
link to another host, a redirect on the host and one to another host.
"""
import io
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image


COOKIE = "getchu_adalt_flag=getchu.com"
AGE_GATE = """<html><head><meta http-equiv="Content-Type" content="text/html; charset=EUC-JP"></head>
<body><h1>年齢認証</h1><p>あなたは18歳以上ですか？</p><a href="/php/attestation.html?aurl=x">【すすむ】</a></body></html>"""


def product_ids(month_file: Path) -> list[str]:
    ids = re.findall(rb'href="/soft\.phtml\?id=(\d+) " class="black"', month_file.read_bytes())
    return list(dict.fromkeys(i.decode() for i in ids))


def illustration_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def placeholder_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 255, 255)).save(out, format="JPEG")
    return out.getvalue()


def product_page(pid: str, title: str, charas: list[str]) -> bytes:
    rows = "\n".join(
        f'<tr><td valign="top"><a name="chara{n}"></a>{src}</td>'
        f'<td class="chara-text"><dl><dt><h2 class="chara-name">キャラ{n}　きゃら（CV：声優）</h2></dt>'
        f"<dd>プロフィール{n}</dd></dl></td></tr>"
        for n, src in charas)
    html = f"""<html><head><meta http-equiv="Content-Type" content="text/html; charset=EUC-JP">
<title>{title} - Getchu.com</title></head><body>
<h1 id="soft-title">{title}</h1>
<table id="soft_table"><tr><td><img src="./brandnew/{pid}/c{pid}package.jpg" alt="パッケージ"></td></tr></table>
<div class="tabletitle">&nbsp;キャラクター</div>
<table>{rows}</table>
<div class="tabletitle">&nbsp;サンプル画像</div><a name="sample" id="sample"></a>
<a href="./brandnew/{pid}/c{pid}sample1.jpg"><img src="./brandnew/{pid}/c{pid}sample1s.jpg" alt="SAMPLE1"></a>
<img src="../brandnew/{pid}/c{pid}charab1.jpg" alt="キャラ">
</body></html>"""
    return html.encode("euc_jp", errors="replace")


class GetchuSite:
    """Serves `month` (YYYY_MM) with its products' character images spread over the illustrations."""

    def __init__(self, month_dir: Path, illustrations: Path, month: str = "2015_05", faults: bool = True,
                 port: int = 0):
        self.port = port
        self.month_dir = month_dir
        self.month_file = self.month_dir / f"{month}.html"
        self.ids = product_ids(self.month_file)
        self.images: dict[str, bytes] = {}  # path -> body
        self.pages: dict[str, list] = {pid: [] for pid in self.ids}
        files = illustration_files(illustrations)
        self.served_illustrations = {}
        for k, file in enumerate(files):
            pid = self.ids[k % (len(self.ids) - 1)]  # the last product has no characters
            n = len(self.pages[pid]) + 1
            path = f"/brandnew/{pid}/c{pid}chara{n}.jpg"
            self.images[path] = file.read_bytes()
            self.served_illustrations[path] = file
            self.pages[pid].append((n, f'<IMG src="./brandnew/{pid}/c{pid}chara{n}.jpg " alt="キャラ{n}" width="200">'))
        self.faulty: dict[str, str] = {}
        self.other = None
        if faults:
            self._add_faults()
        self.requests = Counter()
        self.log: list[tuple[str, dict]] = []
        self.once_done: set[str] = set()
        self.stop_after: int | None = None
        self._lock = threading.Lock()

    def _add_faults(self):
        pid = self.ids[0]
        bad = {"placeholder": placeholder_jpeg(), "not_image": b"<html>404 Not Found</html>"}
        kinds = ["placeholder", "not_image", "503_once", "slow_once", "truncated_once", "redirect_here",
                 "redirect_away"]
        good = next(iter(self.images.values()))
        for kind in kinds:
            n = len(self.pages[pid]) + 1
            path = f"/brandnew/{pid}/c{pid}chara{n}.jpg"
            self.faulty[path] = kind
            self.images[path] = bad.get(kind, good)
            self.pages[pid].append((n, f'<img src="./brandnew/{pid}/c{pid}chara{n}.jpg" alt="キャラ{n}">'))
        self.other = OtherHost()
        n = len(self.pages[pid]) + 1
        self.pages[pid].append((n, f'<img src="{self.other.url}/brandnew/{pid}/c{pid}chara{n}.jpg" alt="キャラ{n}">'))

    @property
    def expected_files(self) -> dict[str, Path]:
        """Character image path -> the illustration it serves (what the scraper must save)."""
        good = dict(self.served_illustrations)
        first = next(iter(self.served_illustrations.values()))
        for path, kind in self.faulty.items():
            if kind.endswith("_once") or kind == "redirect_here":
                good[path] = first
        return good

    def image_requests(self) -> int:
        return sum(c for p, c in self.requests.items() if p.startswith("/brandnew/"))

    def handle(self, handler: BaseHTTPRequestHandler):
        """Answer; once `stop_after` requests are answered, the site goes away (connections refused)."""
        self._answer(handler)
        if self.stop_after is not None and sum(self.requests.values()) >= self.stop_after:
            handler.close_connection = True
            threading.Thread(target=self.server.server_close).start()

    def _answer(self, handler: BaseHTTPRequestHandler):
        url = urlsplit(handler.path)
        with self._lock:
            self.requests[url.path] += 1
            self.log.append((handler.path, dict(handler.headers)))
            first_time = url.path not in self.once_done
            self.once_done.add(url.path)
        has_cookie = COOKIE in (handler.headers.get("Cookie") or "")
        if url.path == "/all/month_title.html":
            q = parse_qs(url.query)
            name = f"{q.get('year', [''])[0]}_{q.get('month', [''])[0]}.html"
            body = (self.month_dir / name).read_bytes() if (self.month_dir / name).is_file() else \
                "<html><body>該当する商品がありません</body></html>".encode("euc_jp")
            return self.send(handler, 200, body, "text/html; charset=EUC-JP")
        if url.path == "/soft.phtml":
            pid = parse_qs(url.query).get("id", [""])[0].strip()
            if pid not in self.pages:
                return self.send(handler, 404, b"not found", "text/html")
            if not has_cookie:
                return self.send(handler, 200, AGE_GATE.encode("euc_jp"), "text/html; charset=EUC-JP")
            return self.send(handler, 200, product_page(pid, f"タイトル{pid}", self.pages[pid]),
                             "text/html; charset=EUC-JP")
        if url.path in self.images:
            if not handler.headers.get("Referer"):
                return self.send(handler, 403, b"forbidden", "text/html")
            kind = self.faulty.get(url.path)
            body = self.images[url.path]
            if kind == "redirect_here":
                return self.send(handler, 302, b"", "text/html", {"Location": next(iter(self.served_illustrations))})
            if kind == "redirect_away":
                return self.send(handler, 302, b"", "text/html", {"Location": self.other.url + url.path})
            if kind == "503_once" and first_time:
                return self.send(handler, 503, b"busy", "text/html", {"Retry-After": "1"})
            if kind == "slow_once" and first_time:
                time.sleep(2.5)
            if kind == "truncated_once" and first_time:
                return self.send(handler, 200, body[: len(body) // 2], "image/jpeg",
                                 {"Content-Length": str(len(body))})
            return self.send(handler, 200, body, "text/html" if kind == "not_image" else "image/jpeg")
        return self.send(handler, 404, b"not found", "text/html")

    @staticmethod
    def send(handler, status, body, content_type, headers=None):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if len(body) < int(headers["Content-Length"]):
            handler.close_connection = True

    def __enter__(self):
        self.server = serve(self.handle, self.port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        if self.other:
            self.other.close()


class OtherHost:
    """A second server: the scraper must never request anything from it."""

    def __init__(self):
        self.hits = 0

        def handle(handler):
            self.hits += 1
            GetchuSite.send(handler, 200, b"x", "image/jpeg")

        self.server = serve(handle)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def serve(handle, port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            handle(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
