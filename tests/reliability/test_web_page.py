"""The coordinator's web page in a real headless browser (Debian's chromium driven by Playwright): upload a
photo -> results appear; enrol a person -> a search finds them; delete them -> gone. Real node and coordinator
processes; the page talks only to the HTTP API of the same process."""
from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest

from tests.support.processes import Procs, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]  # a browser start is 5-25 s on a busy 2-core machine
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "web-" + "9a8b7c6d" * 4


@pytest.fixture
def browser_page():
    """A page of a fresh headless Chromium (its own profile folder); skips with the reason when unavailable."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the dev extra `playwright` drives the browser")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (scripts/apt-install.sh chromium)")
    profile = tempfile.mkdtemp(prefix="facepq-chromium-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                       viewport={"width": 1280, "height": 860})
        try:
            yield context.new_page()
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _unique_code_photo(model, index, photos):
    """A photo of `photos` whose code no gallery face and no other of `photos` has: the one face a search
    for it must rank first (the tiny model gives some faces equal codes, and equal scores tie)."""
    from indexer.segment import open_segment
    from indexer.store import IndexStore
    from opqn_model.api import FaceEncoder
    from query_node.face_model import FaceModel

    store = IndexStore(str(index))
    taken = [c.tobytes() for ref in store.load_manifest().segments for c in open_segment(store, ref).codes]
    codes, kept, _ = FaceModel(FaceEncoder.load(model)).encode_photos([p.read_bytes() for p in photos])
    mine = [c.tobytes() for c in codes]
    unique = [photos[i] for i, c in zip(kept, mine) if mine.count(c) == 1 and c not in taken]
    assert unique, "every photo of the newcomer shares its code: train the test's model longer"
    return unique[0]


def test_upload_enrol_and_delete_through_the_web_page(gallery, tiny_model, browser_page, tmp_path):
    from indexer.face_id import face_id_for_photo
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter
    from opqn_model.api import FaceEncoder
    from query_node.face_model import photo_features
    from tests.support.models import train_tiny_model

    # the session's tiny model gives many faces one code; this one has its head refitted (the demo's setting)
    trained = train_tiny_model(tmp_path / "refit", head_refit="data")
    model = tmp_path / "model.pt"  # calibrated: the page shows similarities and operating points
    shutil.copy(trained.path, model)
    assert run_cli("calibrate", "--model", model, "--data", trained.data, "--no-progress").returncode == 0
    enc = FaceEncoder.load(model)
    index = tmp_path / "idx"
    people = sorted(gallery["photos"])[:-4]
    photos = [p for person in people for p in gallery["photos"][person]]
    contents = [p.read_bytes() for p in photos]
    feats, kept, _ = photo_features(enc, contents)
    writer = IndexWriter(str(index), ModelMeta.from_encoder(enc), shard_count=2)
    writer.add([face_id_for_photo(contents[i]) for i in kept], [photos[i].parent.name for i in kept],
               [str(photos[i]) for i in kept], enc.codec.encode(feats))
    writer.commit("gallery")
    (tmp_path / "token").write_text(TOKEN)
    photos_root = tiny_model.data
    procs = Procs()
    try:
        node = procs.node(index, [0, 1])
        coord = procs.coordinator(model, index, "--nodes", node.address, "--http-port", "0", "--auth-token-file",
                                  tmp_path / "token", "--thumbnail-root", photos_root)
        url = re.search(r"facepq http serving on (http://\S+)", coord.text()).group(1)
        page = browser_page
        page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
        page.goto(url + "/")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#cluster-line:has-text('index version')")
        assert "1/1 nodes healthy" in page.inner_text("#cluster-line") and "calibrated" in page.inner_text("#cluster-line")

        # upload -> results appear, one row per person, with thumbnails of the gallery photos
        someone = sorted(gallery["photos"])[0]
        page.set_input_files("#search-photo", str(gallery["photos"][someone][0]))
        page.click("#search-button")
        page.wait_for_selector("#search-results .person")
        people = page.locator("#search-results .person")
        assert people.count() == 5  # the default: 5 people
        assert len({people.nth(i).get_attribute("data-person") for i in range(5)}) == 5
        page.wait_for_function("(imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0))"
                               "([...document.querySelectorAll('#search-results .faces img')])")
        page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
        if os.environ.get("FACEPQ_SCREENSHOT"):
            shutil.copy(tmp_path / "web.png", os.environ["FACEPQ_SCREENSHOT"])
        assert (tmp_path / "web.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # enrol -> the person is found
        newcomer, photos = gallery["enrol_people"][0], [str(p) for p in gallery["photos"][gallery["enrol_people"][0]]]
        query = _unique_code_photo(model, index, gallery["photos"][newcomer])
        page.fill("#enrol-name", "Newcomer " + newcomer)
        page.set_input_files("#enrol-photos", photos)
        page.click("#enrol-button")
        page.wait_for_selector("#enrol-result .ok")
        assert f"enrolled {len(photos)} face(s)" in page.inner_text("#enrol-result")
        page.set_input_files("#search-photo", str(query))
        page.click("#search-button")
        first = page.locator("#search-results .person").first
        first.wait_for()
        page.wait_for_function(f"document.querySelector('#search-results .person')?.dataset.person === "
                               f"'Newcomer {newcomer}'", timeout=30_000)

        # delete (from the people list) -> gone from the list and from a search
        page.fill("#people-filter", "Newcomer")
        page.press("#people-filter", "Enter")
        page.click(f"#people-list tr[data-person='Newcomer {newcomer}'] a")
        page.click("#delete-person")
        page.wait_for_selector("#delete-result")
        assert f"deleted {len(photos)} face(s)" in page.inner_text("#delete-result")
        page.click("#search-button")
        page.wait_for_function("document.querySelector('#search-summary') && "
                               f"![...document.querySelectorAll('#search-results .person')]"
                               f".some(p => p.dataset.person === 'Newcomer {newcomer}')", timeout=30_000)
        page.wait_for_selector("#search-results .person")
        assert page.locator(f"#people-list tr[data-person='Newcomer {newcomer}']").count() == 0
    finally:
        procs.kill_all()
