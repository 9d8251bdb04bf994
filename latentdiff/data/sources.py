"""Image sources for shard writing: a folder or a tar archive, with captions from class folders or .txt files.

Folders are listed, and errors raised, as in :mod:`latentdiff.data.image_sources` (the evaluation reader); image
files are those with an extension in :data:`latentdiff.data.decode.IMAGE_EXTS`. Unlike that streaming reader, this
one reads entries in any order (shard writing shuffles them), so a compressed archive is first decompressed.

Layouts (``layout="auto"`` picks ``captions`` when the source holds any ``.txt`` file, else ``classes``):

    classes   ``<anything>/<class>/<image>``: the caption is a template filled with the class (the image's
              parent folder, optionally renamed by a class map); ``train/airplane/0000.jpg`` -> "a photo of an
              airplane". Images with no parent folder are skipped (and listed).
    captions  ``<dir>/<name>.<ext>`` beside ``<dir>/<name>.txt``: the caption is the text file. Images without
              one are skipped (and listed).

A source is a folder, an uncompressed ``.tar`` (read in place) or a compressed ``.tar.gz|.tgz|.tar.bz2|.tar.xz``
(decompressed once to a temporary ``.tar`` so that images can be read in any order). Entries are sorted by path.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from latentdiff.data.captions import check_template, class_name, fill_template, pick_template
from latentdiff.data.decode import IMAGE_EXTS, is_image_name
from latentdiff.data.image_sources import SourceError, list_files

LAYOUTS = ("auto", "classes", "captions")
_DECOMPRESSORS = {".gz": gzip.open, ".tgz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class SourceEntry:
    path: str  # '/'-separated path inside the source
    caption: str
    label: str | None = None  # class folder (classes layout)


class ImageSource:
    """The images of a folder or tar archive with their captions; ``read(entry)`` returns the encoded bytes."""

    def __init__(self, path: str | Path, templates: list[str] | None = None, layout: str = "auto",
                 class_map: dict[str, str] | None = None):
        self.path = Path(path)
        self.templates = templates or ["a photo of a {}"]
        if layout not in LAYOUTS:
            raise SourceError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
        for t in self.templates:
            try:
                check_template(t)
            except ValueError as e:
                raise SourceError(str(e)) from None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if self.path.is_dir():
            images, texts = self._index_folder()
        elif self.path.is_file():
            images, texts = self._index_archive()
        else:
            raise SourceError(f"source {str(self.path)!r} does not exist")
        if not images:
            self.close()
            raise SourceError(f"source {str(self.path)!r} holds no images ({', '.join(IMAGE_EXTS)})")
        self.layout = ("captions" if texts else "classes") if layout == "auto" else layout
        self.entries: list[SourceEntry] = []
        self.skipped: list[dict] = []  # {"source": path, "reason": ...}
        for rel in sorted(images):
            self._add(rel, texts, class_map)

    def _add(self, rel: str, texts: dict[str, str | None], class_map: dict[str, str] | None) -> None:
        p = PurePosixPath(rel)
        if self.layout == "captions":
            stem = str(p.with_suffix(""))
            if stem not in texts:
                self.skipped.append({"source": rel, "reason": f"no caption file {stem}.txt"})
            elif texts[stem] is None:
                self.skipped.append({"source": rel, "reason": f"caption file {stem}.txt is not UTF-8 text"})
            else:
                self.entries.append(SourceEntry(rel, texts[stem]))
        elif len(p.parts) < 2:
            self.skipped.append({"source": rel, "reason": "not inside a class folder"})
        else:
            label = p.parts[-2]
            caption = fill_template(pick_template(self.templates, rel), class_name(label, class_map))
            self.entries.append(SourceEntry(rel, caption, label))

    def _index_folder(self) -> tuple[list[str], dict[str, str | None]]:
        images, texts = [], {}
        for full in list_files(self.path):
            rel = full.relative_to(self.path).as_posix()
            if is_image_name(rel):
                images.append(rel)
            elif full.suffix.lower() == ".txt":
                texts[rel[:-4]] = _decode_text(full.read_bytes())
        return images, texts

    def _index_archive(self) -> tuple[list[str], dict[str, str | None]]:
        path = self.path
        suffix = path.suffix.lower()
        try:
            if suffix in _DECOMPRESSORS:
                self._tmp = tempfile.TemporaryDirectory(prefix="latentdiff-source-")
                path = Path(self._tmp.name) / "source.tar"
                with _DECOMPRESSORS[suffix](self.path, "rb") as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            self._tar = tarfile.open(path, "r:")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            self.close()
            raise SourceError(f"source {str(self.path)!r} is neither a folder nor a readable tar archive: {e}") \
                from None
        images, texts = [], {}
        for m in members:
            name = m.name.removeprefix("./")
            base = PurePosixPath(name).name
            if not m.isfile() or base.startswith("."):
                continue
            if is_image_name(name):
                images.append(name)
                self._members[name] = m
            elif PurePosixPath(name).suffix.lower() == ".txt":
                texts[name[:-4]] = _decode_text(self._tar.extractfile(m).read())
        return images, texts

    def read(self, entry: SourceEntry) -> bytes:
        if self._tar is None:
            return (self.path / entry.path).read_bytes()
        return self._tar.extractfile(self._members[entry.path]).read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decode_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
