"""PASCAL VOC annotation files (the XML of Stanford Dogs' ``Annotation/`` and ImageNet's validation
boxes): ``read_voc`` gives each object's name and box, with the line it was read from, so that a
fault names the file and the line. Parsed with expat, which reports line numbers (ElementTree's C
parser does not)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.boxes import Box


@dataclass
class Element:
    tag: str
    line: int
    text: str = ""
    children: list["Element"] = field(default_factory=list)

    def find(self, tag: str) -> "Element | None":
        return next((c for c in self.children if c.tag == tag), None)


@dataclass
class VocAnnotation:
    path: Path
    size: tuple[int, int] | None           # (width, height) of <size>, when given
    objects: list[tuple[str, Box, str]]    # (<name>, its <bndbox>, where <name> is) per <object>


def _parse(path: Path) -> Element:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the annotation {path}: {exc.strerror or exc}") from None
    parser = expat.ParserCreate()
    stack: list[Element] = []
    root: list[Element] = []

    def start(tag, _attrs):
        el = Element(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(el)
        stack.append(el)

    def end(_tag):
        stack.pop()

    def text(data):
        if stack:
            stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise UsageError(f"{path}, line {exc.lineno}: not well-formed XML ({expat.ErrorString(exc.code)})") from None
    if not root or root[0].tag != "annotation":
        raise UsageError(f"{path}, line {root[0].line if root else 1}: expected a PASCAL VOC <annotation> element")
    return root[0]


def _number(el: Element | None, parent: Element, tag: str, path: Path) -> float:
    if el is None:
        raise UsageError(f"{path}, line {parent.line}: <{parent.tag}> has no <{tag}>")
    try:
        return float(el.text.strip())
    except ValueError:
        raise UsageError(f"{path}, line {el.line}: <{tag}> is {el.text.strip()!r}, not a number") from None


def read_voc(path: Path) -> VocAnnotation:
    """The objects of a PASCAL VOC file; a fault is a UsageError naming the file and the line."""
    path = Path(path)
    root = _parse(path)
    size = None
    sz = root.find("size")
    if sz is not None:
        size = (int(_number(sz.find("width"), sz, "width", path)), int(_number(sz.find("height"), sz, "height", path)))
    objects = []
    for obj in (c for c in root.children if c.tag == "object"):
        name = obj.find("name")
        if name is None or not name.text.strip():
            raise UsageError(f"{path}, line {obj.line}: <object> has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise UsageError(f"{path}, line {obj.line}: <object> has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bb.find(t), bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        # inclusive 1-based corners (module docstring of sib_fast.datasets.boxes)
        objects.append((name.text.strip(), Box(xmin - 1, ymin - 1, xmax, ymax, f"{path}, line {bb.line}"),
                        f"{path}, line {name.line}"))
    return VocAnnotation(path, size, objects)
