"""Captions for class-labelled images: templates, articles, class-name maps.

    fill_template("a photo of a {}", "airplane")      -> "a photo of an airplane"
    fill_template("A {} in the wild", "unicorn")       -> "A unicorn in the wild"
    pick_template(["a photo of a {}", "a picture of a {}"], "train/cat/0001.jpg")   # same path, same template

A template holds ``{}`` exactly once. When it is preceded by the article "a" or "an" (any case), the article is
chosen for the class name ("an" before a vowel sound, with the usual exceptions: "a unicorn", "an hour").
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

_ARTICLE = re.compile(r"\b(an?)(\s+)\{\}", re.IGNORECASE)
_A_BEFORE = ("uni", "use", "usu", "uti", "ure", "eu", "one", "once", "ewe")  # vowel letter, consonant sound
_AN_BEFORE = ("hour", "honest", "honor", "honour", "heir")  # consonant letter, vowel sound


def check_template(template: str) -> None:
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(f"caption template {template!r} must contain '{{}}' exactly once and no other braces")


def article(word: str) -> str:
    """'a' or 'an' for ``word``."""
    w = word.lower()
    if w.startswith(_AN_BEFORE):
        return "an"
    if w.startswith(_A_BEFORE):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def fill_template(template: str, name: str) -> str:
    """Put ``name`` into ``template``, fixing the article in front of it."""
    def fix(m: re.Match) -> str:
        chosen = article(name)
        if m.group(1)[0].isupper():
            chosen = chosen.capitalize()
        return chosen + m.group(2) + "{}"

    return _ARTICLE.sub(fix, template, count=1).replace("{}", name)


def pick_template(templates: list[str], path: str) -> str:
    """The template for the sample at ``path``: fixed by the path, independent of sample order."""
    return templates[zlib.crc32(path.encode("utf-8")) % len(templates)]


def class_name(folder: str, class_map: dict[str, str] | None = None) -> str:
    """The caption name of a class folder: mapped if ``class_map`` has it, underscores as spaces."""
    name = (class_map or {}).get(folder, folder)
    return name.replace("_", " ").strip()


def parse_class_map(text: str) -> dict[str, str]:
    """A class map from a JSON file ``{"folder": "name"}``, or inline ``folder=name,folder2=name2``."""
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"class map {text!r} is not a readable JSON file: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"class map {text!r} must be a JSON object of folder -> name strings")
        return {str(k): v for k, v in data.items()}
    out = {}
    for item in text.split(","):
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"class map entry {item!r} must look like folder=name (or give a JSON file)")
        folder, name = item.split("=", 1)
        out[folder.strip()] = name.strip()
    return out
