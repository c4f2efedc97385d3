"""Identity-labelled photo lists: read a gallery, split it, count what was skipped.

A gallery is either a folder laid out `<root>/<person>/<photo>` or a list file
(`.csv` or `.parquet`) with columns `path` and `person`; relative paths in a list
file are resolved against the list file's folder. Splits are by person for the
unseen-identity protocol (`split_people`) and by photo within each person for
the seen-identity protocol (`split_photos_per_person`); both are deterministic
for a given seed, whatever the order of the records passed in.
"""
from __future__ import annotations

import csv
import logging
import os
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from facepq_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".webp", ".tif", ".tiff"})
LIST_FILE_COLUMNS = ("path", "person")


@dataclass(frozen=True, order=True)
class PhotoRecord:
    """One photo of one person. `path` is absolute (or a URI from a list file)."""

    path: str
    person: str


def is_photo_name(name: str) -> bool:
    """True for a visible file name with an image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_photos(source: str | os.PathLike) -> list[PhotoRecord]:
    """All photos of a gallery folder or list file, sorted by (person, path).

    Raises
    ------
    DataError when the source is missing, empty, has no photos, or a list file
    lacks the `path` / `person` columns.
    """
    path = pathlib.Path(source)
    if not path.exists():
        raise DataError(f"gallery {path} does not exist")
    if path.is_dir():
        records = _list_folder(path)
    elif path.suffix.lower() in (".csv", ".parquet"):
        records = _list_file(path)
    else:
        raise DataError(f"gallery {path} must be a folder <root>/<person>/<photo> or a .csv/.parquet list "
                        f"with columns {', '.join(LIST_FILE_COLUMNS)}")
    if not records:
        raise DataError(f"gallery {path} has no photos (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(records, key=lambda r: (r.person, r.path))


@dataclass
class _FolderSurvey:
    """What a gallery folder holds, against the expected `<root>/<person>/<photo>` layout."""

    root: pathlib.Path
    records: list = field(default_factory=list)
    loose: list = field(default_factory=list)        # photos directly in the root
    nested: list = field(default_factory=list)       # photos in a subfolder of a person folder
    empty_people: list = field(default_factory=list)  # top-level folders without any photo
    groups: list = field(default_factory=list)        # top-level folders with photos only in their subfolders
    other_files: int = 0                              # files that are not photos (by extension)

    def found(self) -> str:
        """One line: what is where, with examples."""
        people = len({r.person for r in self.records})
        parts = [f"{people} person folder(s) with photos"]
        if self.loose:
            parts.append(f"{len(self.loose)} photo(s) directly in the folder (e.g. {_names(self.loose, self.root)})")
        if self.nested:
            parts.append(f"{len(self.nested)} photo(s) one level deeper than person folders "
                         f"(e.g. {_names(self.nested, self.root)})")
        if self.empty_people:
            parts.append(f"{len(self.empty_people)} folder(s) without photos (e.g. {_names(self.empty_people, self.root)})")
        if self.other_files:
            parts.append(f"{self.other_files} file(s) without a photo extension")
        return "; ".join(parts)

    def advice(self) -> str:
        if self.loose and not self.nested:
            return ("put each person's photos in a folder named after them (<root>/<person>/<photo>), or list "
                    "them in a .csv with columns path,person")
        if self.nested:
            tops = sorted({p.relative_to(self.root).parts[0] for p in self.nested})
            deeper = f"; if {tops[0]}/ holds person folders, point at {self.root / tops[0]}" \
                if len(tops) == 1 and self.root / tops[0] in self.groups else ""
            return f"photos go directly in <root>/<person>/, not in subfolders of it{deeper}"
        return f"expected photos with an extension among {', '.join(sorted(IMAGE_EXTENSIONS))}"


def _names(paths, root: pathlib.Path, n: int = 3) -> str:
    shown = ", ".join(str(pathlib.Path(p).relative_to(root)) for p in paths[:n])
    return shown + (", ..." if len(paths) > n else "")


def _survey_folder(root: pathlib.Path) -> _FolderSurvey:
    survey = _FolderSurvey(root)
    for entry in sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name):
        if entry.is_dir():
            photos = direct = 0
            for folder, dirs, names in os.walk(entry.path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    path = pathlib.Path(folder) / name
                    if not is_photo_name(name):
                        survey.other_files += not name.startswith(".")
                    elif folder == entry.path:
                        survey.records.append(PhotoRecord(os.path.abspath(path), entry.name))
                        photos, direct = photos + 1, direct + 1
                    else:
                        survey.nested.append(path)
                        photos += 1
            if not photos:
                survey.empty_people.append(pathlib.Path(entry.path))
            elif not direct:
                survey.groups.append(pathlib.Path(entry.path))
        elif is_photo_name(entry.name):
            survey.loose.append(pathlib.Path(entry.path))
        else:
            survey.other_files += 1
    return survey


def _list_folder(root: pathlib.Path) -> list[PhotoRecord]:
    """The photos of `<root>/<person>/<photo>`; what does not fit that layout is named, never dropped silently.

    Raises DataError (saying what the layout should be and what the folder holds) when no photo fits it.
    """
    survey = _survey_folder(root)
    if not survey.records:
        if not (survey.loose or survey.nested or survey.empty_people or survey.other_files):
            raise DataError(f"gallery folder {root} is empty; expected <root>/<person>/<photo>")
        raise DataError(f"gallery folder {root} has no photos in the expected layout <root>/<person>/<photo>: "
                        f"found {survey.found()}. {survey.advice()[0].upper()}{survey.advice()[1:]}")
    if survey.loose or survey.nested:
        log.warning("gallery folder %s: using %d photos of %d people; IGNORED: %s (%s)", root, len(survey.records),
                    len({r.person for r in survey.records}), survey.found().split("; ", 1)[1], survey.advice())
    return survey.records


def _list_file(path: pathlib.Path) -> list[PhotoRecord]:
    rows = _read_parquet(path) if path.suffix.lower() == ".parquet" else _read_csv(path)
    base = path.resolve().parent
    records = []
    for i, (photo, person) in enumerate(rows):
        photo, person = ("" if photo is None else str(photo)).strip(), ("" if person is None else str(person)).strip()
        if not photo or not person:
            raise DataError(f"{path}: row {i + 1} has an empty path or person")
        if "://" not in photo and not os.path.isabs(photo):
            photo = str(base / photo)
        records.append(PhotoRecord(photo, person))
    return records


def _missing_columns(path: pathlib.Path, columns) -> None:
    missing = [c for c in LIST_FILE_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; a list file needs columns "
                        f"{', '.join(LIST_FILE_COLUMNS)} (found: {', '.join(map(str, columns)) or 'none'})")


def _read_csv(path: pathlib.Path) -> list[tuple]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            _missing_columns(path, reader.fieldnames or [])
            return [(row["path"], row["person"]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read list file {path}: {exc}") from None


def _read_parquet(path: pathlib.Path) -> list[tuple]:
    import pyarrow.parquet as pq  # only list files need pyarrow here

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read list file {path}: {exc}") from None
    _missing_columns(path, table.column_names)
    return list(zip(table.column("path").to_pylist(), table.column("person").to_pylist()))


def _by_person(records) -> dict[str, list[PhotoRecord]]:
    groups: dict[str, list[PhotoRecord]] = defaultdict(list)
    for record in records:
        groups[record.person].append(record)
    return {person: sorted(group) for person, group in sorted(groups.items())}


def split_people(records, test_fraction: float, seed: int = 0) -> tuple[list[PhotoRecord], list[PhotoRecord]]:
    """Unseen-identity split: every person's photos all go to train or all to test.

    Parameters
    ----------
    records : iterable of PhotoRecord
    test_fraction : share of people in the test split, in (0, 1); at least one
        person goes to each side when there are two or more people.
    seed : the same records and seed give the same split.

    Returns
    -------
    (train_records, test_records), each in the order of `records`.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction must be between 0 and 1, got {test_fraction}")
    records = list(records)
    people = sorted({r.person for r in records})
    if len(people) < 2:
        raise DataError(f"an unseen-identity split needs at least 2 people, got {len(people)}")
    n_test = min(max(1, round(len(people) * test_fraction)), len(people) - 1)
    order = np.random.default_rng(seed).permutation(len(people))
    test_people = {people[i] for i in order[:n_test]}
    return [r for r in records if r.person not in test_people], [r for r in records if r.person in test_people]


def split_photos_per_person(records, queries_per_person: int, seed: int = 0):
    """Seen-identity split: per person, `queries_per_person` photos become queries, the rest database.

    People with no more than `queries_per_person` photos cannot be both queried
    and found, so all their photos stay in the database (logged).

    Returns
    -------
    (database_records, query_records), each sorted by (person, path).
    """
    if queries_per_person < 1:
        raise ConfigError(f"queries per person must be >= 1, got {queries_per_person}")
    rng = np.random.default_rng(seed)
    database, queries, too_few = [], [], 0
    for person, group in _by_person(records).items():
        if len(group) <= queries_per_person:
            database.extend(group)
            too_few += 1
            continue
        chosen = set(rng.choice(len(group), size=queries_per_person, replace=False).tolist())
        for i, record in enumerate(group):
            (queries if i in chosen else database).append(record)
    if too_few:
        log.info("%d people have <= %d photos: all kept in the database, none queried", too_few, queries_per_person)
    if not queries:
        raise DataError(f"no person has more than {queries_per_person} photos; nothing to query")
    return database, queries


@dataclass
class SkipCounter:
    """Photos skipped (reason -> count) and photos converted (note -> count), with a few example paths.

    Every run's summary prints `summary_lines()`; counters from parallel workers
    combine with `merge`.
    """

    max_examples: int = 3
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str = "") -> None:
        """Count one skipped photo."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._example(reason, path)

    def add_note(self, note: str | None, path: str = "") -> None:
        """Count one photo that was kept after a conversion (no-op for None)."""
        if note:
            self.converted[note] = self.converted.get(note, 0) + 1
            self._example(note, path)

    def _example(self, key: str, path: str) -> None:
        examples = self.examples.setdefault(key, [])
        if path and len(examples) < self.max_examples:
            examples.append(str(path))

    @property
    def total(self) -> int:
        """Number of skipped photos."""
        return sum(self.skipped.values())

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        for note, n in other.converted.items():
            self.converted[note] = self.converted.get(note, 0) + n
        for key, paths in other.examples.items():
            for path in paths:
                self._example(key, path)
        return self

    def to_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "converted": dict(self.converted), "examples": dict(self.examples)}

    def summary_lines(self) -> list[str]:
        """Human-readable lines, most frequent reason first; ['skipped: none'] when nothing was skipped."""
        lines = [f"skipped: {self.total} photo(s)" if self.skipped else "skipped: none"]
        for title, counts in (("skipped", self.skipped), ("converted", self.converted)):
            for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                examples = self.examples.get(key, [])
                suffix = f" (e.g. {', '.join(examples)})" if examples else ""
                lines.append(f"  {title} {key}: {n}{suffix}")
        return lines
