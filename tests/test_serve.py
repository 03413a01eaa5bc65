"""`miniclip serve`: the JSON API through Starlette's TestClient, the server process without PyTorch, and the
page in headless Chromium (marked `browser`, skipped without /usr/bin/chromium and its driver)."""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from miniclip_cli.serve.app import Gate, build_app, is_loopback  # noqa: E402

from .conftest import json_of, make_image, run_cli  # noqa: E402

CAPTIONS = ["a red circle", "a blue square", "a green circle"]


def photo_folder(root, runner, run):
    """Six images, two in a subfolder, indexed with the run's int8 model."""
    (root / "sub").mkdir(parents=True)
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"),
                                         ("yellow", "square"), ("red", "square"), ("blue", "circle")]):
        make_image(root / ("sub" if i < 2 else "") / f"{colour}_{shape}_{i}.png", colour, shape, seed=i)
    run_cli(runner, "index", root, "--model", run, "--backend", "onnx")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory, runner, exported_run):
    return photo_folder(tmp_path_factory.mktemp("serve-photos") / "photos", runner, exported_run)


@pytest.fixture(scope="module")
def client(exported_run, photos):
    # The loopback Host check is on, as the CLI serves by default: the client must say 127.0.0.1.
    return TestClient(build_app(exported_run, "onnx", photos), base_url="http://127.0.0.1:8000")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "query.png"
    make_image(path, "red", "circle", size=80, seed=7)
    return path


def classify(client, image_bytes, captions, name="query.png"):
    return client.post("/api/classify", files={"image": (name, image_bytes, "image/png")},
                       data={"captions": captions})


def refused(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


def test_health_names_the_model_and_backend(client, exported_run, photos):
    health = client.get("/api/health").json()
    assert health["model"] == exported_run.name and health["backend"] == "onnx"
    assert health["backend_label"] == "ONNX int8" and health["image_size"] == 32
    assert health["photos"] == str(photos.resolve()) and health["photo_count"] == 6
    # An exported folder on its own is served with its int8 model (--backend auto), named after its run.
    exported = TestClient(build_app(exported_run / "onnx"), base_url="http://127.0.0.1").get("/api/health").json()
    assert (exported["model"], exported["backend"]) == (exported_run.name, "onnx")


def test_page_and_script_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"></script>' in page.text and "http" not in page.text.replace("http-equiv", "")
    script = client.get("/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    # User text reaches the page only as text: no HTML-parsing sink anywhere in the script.
    assert not re.search(r"(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML|document\.write|eval\(", script.text)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_classify_returns_what_classify_json_prints(runner, exported_run, image, backend):
    client = TestClient(build_app(exported_run, backend), base_url="http://127.0.0.1")
    response = classify(client, image.read_bytes(), CAPTIONS)
    assert response.status_code == 200, response.text
    served = response.json()
    args = [a for c in CAPTIONS for a in ("-c", c)]
    printed = json_of(run_cli(runner, "classify", image, *args, "--model", exported_run, "--backend", backend, "--json"))
    assert served["image"] == "query.png" and printed["image"] == str(image)
    assert [s["caption"] for s in served["scores"]] == CAPTIONS == [s["caption"] for s in printed["scores"]]
    assert served["scores"] == printed["scores"]
    assert sum(s["probability"] for s in served["scores"]) == pytest.approx(1.0, abs=1e-3)
    assert classify(client, image.read_bytes(), CAPTIONS).json() == served  # the caption set's cached features


def test_an_html_caption_comes_back_as_plain_text(client, image):
    markup = '<img src=x onerror="alert(1)">'
    response = classify(client, image.read_bytes(), [markup, "a blue square"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json()["scores"][0]["caption"] == markup


def test_a_non_finite_result_is_an_error_not_a_number(exported_run, image):
    guarded = build_app(exported_run, "onnx")
    guarded.app.state.service.encoder.logit_scale = float("nan")  # as a damaged run would load
    client = TestClient(guarded, base_url="http://127.0.0.1")
    assert "non-finite" in refused(classify(client, image.read_bytes(), CAPTIONS), 500)


def test_caption_refusals(client, image):
    data = image.read_bytes()
    assert "at least two" in refused(classify(client, data, ["a red circle"]), 400)
    assert "at least two" in refused(classify(client, data, ["a red circle", "   "]), 400)
    assert "at most 8" in refused(classify(client, data, [f"caption {i}" for i in range(9)]), 400)
    assert "at most 1000" in refused(classify(client, data, ["x" * 1001, "a cat"]), 400)


def test_upload_refusals(exported_run, client, image, tmp_path):
    message = refused(classify(client, b"this is not an image", CAPTIONS, "notes.png"), 415)
    assert message.startswith("notes.png: ") and "JPEG or PNG" in message and "BytesIO" not in message
    assert refused(classify(client, b"GIF89a broken", CAPTIONS, "x.gif"), 415).startswith("x.gif: ")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    assert refused(classify(client, svg, CAPTIONS, "x.svg"), 415).startswith("x.svg: ")
    assert "empty" in refused(classify(client, b"", CAPTIONS), 400)
    no_image = client.post("/api/classify", files={"photo": ("q.png", b"x", "image/png")}, data={"captions": CAPTIONS})
    assert "field `image`" in refused(no_image, 400)
    assert "multipart" in refused(client.post("/api/classify", data={"captions": CAPTIONS}), 415)
    assert "multipart" in refused(client.post("/api/classify", json={"captions": CAPTIONS}), 415)
    # A PNG header announcing 40000 x 40000 pixels: refused before any pixel is decoded.
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    assert 400 <= classify(client, bomb, CAPTIONS, "bomb.png").status_code < 500

    small = TestClient(build_app(exported_run, "onnx", max_upload_mb=0.05), base_url="http://127.0.0.1")
    big = tmp_path / "big.bmp"  # 100 x 100 x 3 bytes, over 0.05 MB
    from PIL import Image

    Image.new("RGB", (150, 150), (10, 20, 30)).save(big)
    assert "0.05 MB" in refused(classify(small, big.read_bytes(), CAPTIONS, "big.bmp"), 413)
    assert classify(small, image.read_bytes(), CAPTIONS).status_code == 200  # the server still answers


def test_other_refusals_are_json(client):
    assert refused(client.get("/no/such/page"), 404)
    assert refused(client.get("/api/classify"), 405)
    assert "top" in refused(client.get("/api/search", params={"q": "a dog", "top": "many"}), 400)
    assert "top" in refused(client.get("/api/search", params={"q": "a dog", "top": "0"}), 400)
    assert "caption" in refused(client.get("/api/search", params={"q": " "}), 400)
    assert "at most 1000" in refused(client.get("/api/search", params={"q": "x" * 1001}), 400)
    # Served on loopback, a request naming another host (DNS rebinding) is refused.
    assert "Host" in refused(client.get("/api/health", headers={"host": "evil.example"}), 400)


def test_search_returns_what_search_json_prints(runner, client, exported_run, photos):
    served = client.get("/api/search", params={"q": "a red circle", "top": 4}).json()
    printed = json.loads(run_cli(runner, "search", "a red circle", "--in", photos, "--model", exported_run,
                                 "--backend", "onnx", "--top", 4, "--json").stdout.strip().splitlines()[-1])
    assert served == printed and [h["rank"] for h in served] == [1, 2, 3, 4]


def test_search_by_image_finds_the_image_itself(client, photos):
    target = photos / "sub" / "blue_square_1.png"
    response = client.post("/api/search", files={"image": ("q.png", target.read_bytes(), "image/png")},
                           data={"top": "3"})
    hits = response.json()
    assert response.status_code == 200 and len(hits) == 3
    assert hits[0]["path"] == str(target.resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_search_without_photos_says_how_to_add_them(exported_run):
    client = TestClient(build_app(exported_run, "onnx"), base_url="http://127.0.0.1")
    assert "--photos" in refused(client.get("/api/search", params={"q": "a dog"}), 404)
    assert client.get("/api/health").json()["photos"] is None


def test_photos_are_served_from_the_index_only(client, photos):
    served = client.get("/photos/sub/red_circle_0.png")
    assert served.status_code == 200 and served.content == (photos / "sub" / "red_circle_0.png").read_bytes()
    thumb = client.get("/photos/green_circle_2.png", params={"thumb": "1"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    (photos / "notes.txt").write_text("not indexed")
    for url in ["/photos/notes.txt", "/photos/.miniclip/index-run.npz", "/photos/missing.png",
                "/photos/%2e%2e/%2e%2e/etc/passwd", "/photos/..%2f..%2fetc%2fpasswd", "/photos/sub%2Fred_circle_0.png",
                "/photos/sub%5Cred_circle_0.png", "/photos//etc/passwd", "/photos/%2Fetc%2Fpasswd",
                "/photos/sub/%2e%2e/green_circle_2.png", "/photos/%2e/green_circle_2.png"]:
        assert refused(client.get(url), 404) == "no such photo in the index", url


def test_a_symlink_out_of_the_folder_is_not_served(runner, exported_run, tmp_path):
    outside = tmp_path / "secret.png"
    make_image(outside, "yellow", "circle", seed=9)
    folder = photo_folder(tmp_path / "photos", runner, exported_run)
    (folder / "link_before.png").symlink_to(outside)  # made before indexing: never indexed
    run_cli(runner, "index", folder, "--model", exported_run, "--backend", "onnx")
    indexed = folder / "red_square_4.png"  # indexed, then replaced by a link out of the folder
    indexed.unlink()
    indexed.symlink_to(outside)
    client = TestClient(build_app(exported_run, "onnx", folder), base_url="http://127.0.0.1")
    assert client.get("/photos/green_circle_2.png").status_code == 200
    for name in ["link_before.png", "red_square_4.png"]:
        assert refused(client.get(f"/photos/{name}"), 404) == "no such photo in the index"
        assert refused(client.get(f"/photos/{name}", params={"thumb": "1"}), 404)


def test_a_full_gate_answers_503_and_frees_its_slots():
    async def scenario():
        gate = Gate(workers=1, max_pending=2)
        async with gate.slot(), gate.slot():
            with pytest.raises(HTTPException) as busy:
                async with gate.slot():
                    pass
            assert busy.value.status_code == 503 and busy.value.headers["Retry-After"] == "1"
        async with gate.slot():
            assert await gate.run(lambda: 6 * 7) == 42
        return gate.pending

    assert anyio.run(scenario) == 0


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_a_port_in_use_is_one_clear_line(runner, exported_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(runner, "serve", "--model", exported_run, "--backend", "onnx", "--port", port, code=3)
    assert "cannot listen" in result.output and "--port" in result.output


def start_server(*args, env_extra=None):
    """`miniclip serve ARGS --port 0` in a process where importing torch fails; -> (process, base URL)."""
    script = ("import sys\n"
              "sys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"
              "from miniclip_cli.cli import app\n"
              f"app({['serve', *map(str, args), '--port', '0']!r})\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **(env_extra or {})})
    line = process.stdout.readline()
    if not line.startswith("miniclip serve: http://"):
        process.kill()
        raise AssertionError(f"no URL from the server: {line!r}\n{process.stderr.read()}")
    return process, line.split(": ", 1)[1].strip()


def test_the_onnx_server_runs_without_torch_and_stops_on_ctrl_c(exported_run, photos, image):
    import httpx

    process, url = start_server("--model", exported_run, "--backend", "onnx", "--photos", photos)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/health", timeout=30).json()["backend"] == "onnx"
        response = httpx.post(f"{url}/api/classify", files={"image": ("q.png", image.read_bytes(), "image/png")},
                              data={"captions": CAPTIONS}, timeout=30)
        assert response.status_code == 200 and len(response.json()["scores"]) == 3
        assert len(httpx.get(f"{url}/api/search", params={"q": "a red circle", "top": 2}, timeout=30).json()) == 2
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "server stopped" in stderr and "Traceback" not in stderr


def test_without_the_serve_extra_the_command_names_it(exported_run):
    script = ("import sys\nsys.modules['uvicorn'] = None\n"
              "from miniclip_cli.cli import app\n"
              f"app(['serve', '--model', {str(exported_run)!r}, '--backend', 'onnx'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "uvicorn is missing" in done.stderr and "pip install 'miniclip[serve]'" in done.stderr


# --- the page in headless Chromium -------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1000,760", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.mark.browser
@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
def test_the_page_in_chromium(runner, exported_run, photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "upload.png"
    make_image(photo, "blue", "square", size=120, seed=3)
    captions = ["a blue square", "a red circle", '<b id="injected">bold</b>']
    args = [a for c in captions for a in ("-c", c)]
    expected = json_of(run_cli(runner, "classify", photo, *args, "--model", exported_run, "--backend", "onnx", "--json"))

    process, url = start_server("--model", exported_run, "--backend", "onnx", "--photos", photos)
    driver = chromium(tmp_path)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        wait.until(lambda d: "ONNX int8" in d.find_element(By.ID, "footer").text)
        boxes = driver.find_elements(By.CSS_SELECTOR, "#captions input")
        assert len(boxes) == 3
        driver.find_element(By.ID, "file").send_keys(str(photo))
        for box, caption in zip(boxes, captions):
            box.send_keys(caption)
        rows = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .row")) == 3
                          and d.find_elements(By.CSS_SELECTOR, "#bars .row"))
        shown = [(r.find_element(By.CLASS_NAME, "label").text, float(r.get_attribute("data-probability"))) for r in rows]
        assert [c for c, _ in shown] == captions  # the HTML caption is text on the page
        assert [p for _, p in shown] == [s["probability"] for s in expected["scores"]]
        assert not driver.find_elements(By.ID, "injected")
        widths = [r.find_element(By.CSS_SELECTOR, ".bar span").get_attribute("style") for r in rows]
        assert all("width" in w for w in widths)
        assert "last request" in driver.find_element(By.ID, "footer").text
        assert driver.find_element(By.ID, "preview").is_displayed()
        screenshot = tmp_path / "serve.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 1000
        if os.environ.get("MINICLIP_SCREENSHOT"):  # scripts and the README's picture: docs/serve.png
            shutil.copy(screenshot, os.environ["MINICLIP_SCREENSHOT"])

        driver.find_element(By.ID, "tab-search").click()
        driver.find_element(By.ID, "query").send_keys("a red circle")
        driver.find_element(By.CSS_SELECTOR, "#search-form button").click()
        figures = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure"))
        assert len(figures) == 6  # top 24 of the 6 indexed photos
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        link = figures[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert link.startswith(f"{url}/photos/")
    finally:
        driver.quit()
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)

