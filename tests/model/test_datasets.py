"""Gallery listing (folder and list files), identity-protocol splits, and the skip summary."""
from __future__ import annotations

import csv
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facepq_core.errors import ConfigError, DataError
from opqn_model.datasets import PhotoRecord, SkipCounter, list_photos, split_people, split_photos_per_person


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    for person, names in {"bob": ["2.JPG", "1.jpeg", ".hidden.jpg", "notes.txt"], "alice": ["a.PnG", "b.pgm", "c.WebP"],
                          "carol": ["x.tif", "y.TIFF", "z.bmp", "w.ppm"]}.items():
        for name in names:
            _touch(root / person / name)
    _touch(root / ".trash" / "ghost.jpg")
    _touch(root / "README.txt")
    return root


def test_folder_lists_images_of_every_person_sorted_and_skips_hidden_and_other_files(gallery):
    records = list_photos(gallery)
    assert [(r.person, os.path.basename(r.path)) for r in records] == [
        ("alice", "a.PnG"), ("alice", "b.pgm"), ("alice", "c.WebP"),
        ("bob", "1.jpeg"), ("bob", "2.JPG"),
        ("carol", "w.ppm"), ("carol", "x.tif"), ("carol", "y.TIFF"), ("carol", "z.bmp")]
    assert all(os.path.isabs(r.path) for r in records)
    assert list_photos(str(gallery)) == records  # deterministic, str or Path


def test_missing_and_empty_and_photo_less_sources_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_photos(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        list_photos(tmp_path / "empty")
    _touch(tmp_path / "docs" / "bob" / "cv.pdf")
    with pytest.raises(DataError, match="no photos"):
        list_photos(tmp_path / "docs")
    _touch(tmp_path / "list.txt")
    with pytest.raises(DataError, match="folder"):
        list_photos(tmp_path / "list.txt")


def test_csv_list_resolves_relative_paths_against_its_folder(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    with open(lists / "gallery.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["person", "path", "extra"])
        writer.writerow(["bob", "photos/b.jpg", "1"])
        writer.writerow(["al", "/abs/a.jpg", "2"])
    records = list_photos(lists / "gallery.csv")
    assert records == [PhotoRecord("/abs/a.jpg", "al"), PhotoRecord(str(lists.resolve() / "photos/b.jpg"), "bob")]


def test_parquet_list_is_read(tmp_path):
    pq.write_table(pa.table({"path": ["x/1.png", "x/2.png"], "person": ["p1", "p2"]}), tmp_path / "g.parquet")
    records = list_photos(tmp_path / "g.parquet")
    assert [r.person for r in records] == ["p1", "p2"]
    assert records[0].path == str(tmp_path.resolve() / "x/1.png")


def test_list_file_without_the_columns_names_them(tmp_path):
    (tmp_path / "bad.csv").write_text("file,name\na.jpg,bob\n")
    with pytest.raises(DataError, match="path, person"):
        list_photos(tmp_path / "bad.csv")
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="person"):
        list_photos(tmp_path / "bad.parquet")
    (tmp_path / "header_only.csv").write_text("path,person\n")
    with pytest.raises(DataError, match="no photos"):
        list_photos(tmp_path / "header_only.csv")
    (tmp_path / "blank.csv").write_text("path,person\na.jpg,\n")
    with pytest.raises(DataError, match="row 1"):
        list_photos(tmp_path / "blank.csv")


def _records(n_people=20, per_person=6):
    return [PhotoRecord(f"/g/p{p:02d}/{i}.jpg", f"p{p:02d}") for p in range(n_people) for i in range(per_person)]


def test_split_people_keeps_every_person_on_one_side_and_is_deterministic():
    records = _records()
    train, test = split_people(records, 0.25, seed=7)
    train_people, test_people = {r.person for r in train}, {r.person for r in test}
    assert not train_people & test_people and len(test_people) == 5 and len(train) + len(test) == len(records)
    assert split_people(list(reversed(records)), 0.25, seed=7)[1] == list(reversed(test))  # order-independent choice
    assert {r.person for r in split_people(records, 0.25, seed=8)[1]} != test_people


def test_split_people_rejects_bad_fraction_and_single_person():
    with pytest.raises(ConfigError):
        split_people(_records(), 1.0)
    with pytest.raises(DataError):
        split_people(_records(n_people=1), 0.5)
    train, test = split_people(_records(n_people=2), 0.01)  # at least one person each side
    assert {r.person for r in train} and {r.person for r in test}


def test_split_photos_per_person_takes_queries_from_each_person():
    records = _records(n_people=5, per_person=6) + [PhotoRecord("/g/solo/1.jpg", "solo")]
    database, queries = split_photos_per_person(records, 2, seed=0)
    assert len(queries) == 10 and len(database) == 21
    assert not set(database) & set(queries)
    assert all(sum(q.person == p for q in queries) == 2 for p in {r.person for r in records} - {"solo"})
    assert PhotoRecord("/g/solo/1.jpg", "solo") in database  # too few photos to be queried
    assert split_photos_per_person(reversed(records), 2, seed=0) == (database, queries)
    assert split_photos_per_person(records, 2, seed=1)[1] != queries


def test_skip_counter_counts_keeps_examples_merges_and_summarises():
    a = SkipCounter(max_examples=2)
    for i in range(3):
        a.add("no_face", f"/p/{i}.jpg")
    a.add("truncated", "/p/t.jpg")
    a.add_note("converted_16bit", "/p/d.png")
    a.add_note(None, "/p/ok.jpg")
    b = SkipCounter()
    b.add("truncated", "/q/t.jpg")
    a.merge(b)
    assert a.skipped == {"no_face": 3, "truncated": 2} and a.total == 5 and a.converted == {"converted_16bit": 1}
    lines = a.summary_lines()
    assert lines[0] == "skipped: 5 photo(s)"
    assert lines[1] == "  skipped no_face: 3 (e.g. /p/0.jpg, /p/1.jpg)"
    assert lines[2] == "  skipped truncated: 2 (e.g. /p/t.jpg, /q/t.jpg)"
    assert lines[3].startswith("  converted converted_16bit: 1")
    assert SkipCounter().summary_lines() == ["skipped: none"]


def test_a_flat_folder_is_refused_with_the_layout_it_needs(tmp_path):
    for name in ("ann_1.jpg", "ann_2.jpg", "bob_1.jpg"):
        _touch(tmp_path / "flat" / name)
    with pytest.raises(DataError) as err:
        list_photos(tmp_path / "flat")
    message = str(err.value)
    assert "<root>/<person>/<photo>" in message and "3 photo(s) directly in the folder" in message
    assert "ann_1.jpg" in message and "folder named after them" in message and ".csv" in message


def test_a_folder_one_level_too_deep_names_the_folder_to_use(tmp_path):
    for rel in ("group/ann/1.jpg", "group/ann/2.jpg", "group/bob/1.jpg"):
        _touch(tmp_path / "deep" / rel)
    with pytest.raises(DataError) as err:
        list_photos(tmp_path / "deep")
    message = str(err.value)
    assert "3 photo(s) one level deeper than person folders" in message and "group/ann/1.jpg" in message
    assert f"point at {tmp_path / 'deep' / 'group'}" in message


def test_photos_outside_the_layout_are_named_not_dropped_silently(tmp_path, caplog):
    for rel in ("ann/1.jpg", "ann/2019/2.jpg", "bob/1.jpg", "stray.jpg"):
        _touch(tmp_path / "mixed" / rel)
    with caplog.at_level("WARNING", logger="opqn_model.datasets"):
        records = list_photos(tmp_path / "mixed")
    assert [(pathlib.Path(r.path).name, r.person) for r in records] == [("1.jpg", "ann"), ("1.jpg", "bob")]
    warning = caplog.text
    assert "IGNORED" in warning and "stray.jpg" in warning and "ann/2019/2.jpg" in warning
