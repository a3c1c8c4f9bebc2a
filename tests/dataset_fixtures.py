"""Tiny copies of the benchmarks' layouts for the dataset tests: a few generated images and the
annotation files written as the datasets ship them (CUB-200-2011's text files, Stanford Dogs'
MATLAB lists and VOC XML, ImageNet's wnid folders, val XML and Kaggle CSV). Image sizes and boxes
are chosen so that the expected masks at 32px can be written by hand: the evaluation view resizes
the shorter side to 37 and centre-crops 32."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (id, class id, is_training_image, (width, height), CUB box x y w h)
CUB_IMAGES = [
    (1, 1, 1, (37, 37), (10.0, 5.0, 10.0, 10.0)),
    (2, 1, 0, (37, 37), (10.0, 5.0, 10.0, 10.0)),
    (3, 2, 1, (74, 37), (30.0, 5.0, 10.0, 10.0)),
    (4, 2, 0, (74, 74), (20.0, 10.0, 20.0, 20.0)),
    (5, 3, 1, (37, 37), (0.0, 0.0, 37.0, 37.0)),
    (6, 3, 0, (37, 37), (0.0, 0.0, 37.0, 37.0)),
]


def image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def cub_name(i: int) -> str:
    cls = CUB_CLASSES[CUB_IMAGES[i - 1][1] - 1]
    return f"{cls}/{cls.split('.', 1)[1]}_{i:04d}_{100 + i}.jpg"


def make_cub(root: Path, segmentations: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{k} {c}\n" for k, c in enumerate(CUB_CLASSES, 1)))
    (root / "images.txt").write_text("".join(f"{i} {cub_name(i)}\n" for i, *_ in CUB_IMAGES))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, *_ in CUB_IMAGES))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, *_ in CUB_IMAGES))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {x} {y} {w} {h}\n" for i, _, _, _, (x, y, w, h)
                                                     in CUB_IMAGES))
    for i, _, _, size, _ in CUB_IMAGES:
        image(root / "images" / cub_name(i), size, i)
    if segmentations:
        from PIL import Image
        for i, _, _, (w, h), _ in CUB_IMAGES:
            m = np.zeros((h, w), dtype=np.uint8)
            m[: h // 2, : w // 2] = 255   # the top-left quarter: every annotator
            m[h // 2:, : w // 2] = 102    # 2 of 5 annotators: not the bird
            p = (root / "segmentations" / cub_name(i)).with_suffix(".png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(p)
    return root


def voc_xml(folder: str, filename: str, size: tuple[int, int], objects: list[tuple[str, tuple]], database: str) -> str:
    """A PASCAL VOC annotation as Stanford Dogs and ImageNet ship it (tab-indented)."""
    w, h = size
    out = ["<annotation>", f"\t<folder>{folder}</folder>", f"\t<filename>{filename}</filename>",
           "\t<source>", f"\t\t<database>{database}</database>", "\t</source>",
           "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>", "\t\t<depth>3</depth>", "\t</size>",
           "\t<segment>0</segment>"]
    for name, (x0, y0, x1, y1) in objects:
        out += ["\t<object>", f"\t\t<name>{name}</name>", "\t\t<pose>Unspecified</pose>",
                "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>", "\t\t<bndbox>",
                f"\t\t\t<xmin>{x0}</xmin>", f"\t\t\t<ymin>{y0}</ymin>", f"\t\t\t<xmax>{x1}</xmax>",
                f"\t\t\t<ymax>{y1}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(out + ["</annotation>"]) + "\n"


DOG_BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
# (breed index, stem number, split, (w, h), VOC boxes (inclusive, 1-based))
DOG_IMAGES = [
    (0, 10074, "train", (37, 37), [(11, 6, 20, 15)]),
    (0, 10131, "test", (37, 37), [(11, 6, 20, 15), (1, 30, 5, 37)]),
    (1, 1004, "train", (37, 37), [(1, 1, 37, 37)]),
    (1, 1007, "test", (74, 37), [(31, 6, 40, 15)]),
    (2, 1030, "train", (37, 37), [(1, 1, 37, 37)]),
    (2, 1053, "test", (37, 37), [(1, 1, 37, 37)]),
]


def dog_name(breed: int, stem: int) -> str:
    return f"{DOG_BREEDS[breed]}/{DOG_BREEDS[breed].split('-')[0]}_{stem}"


def make_dogs(root: Path) -> Path:
    from scipy.io import savemat

    root.mkdir(parents=True)
    for k, (b, stem, _, size, boxes) in enumerate(DOG_IMAGES):
        name = dog_name(b, stem)
        image(root / "Images" / f"{name}.jpg", size, 50 + k)
        ann = root / "Annotation" / name  # no extension, as in annotation.tar
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(voc_xml(DOG_BREEDS[b].split("-")[0][1:], "%s", size,
                               [(DOG_BREEDS[b].split("-", 1)[1], box) for box in boxes], "ImageNet database"))
    for split in ("train", "test"):
        rows = [(b, stem) for b, stem, s, _, _ in DOG_IMAGES if s == split]
        # cell arrays (N x 1) of strings and an N x 1 double column, as lists.tar has them
        savemat(str(root / f"{split}_list.mat"), {
            "file_list": np.array([[f"{dog_name(b, s)}.jpg"] for b, s in rows], dtype=object),
            "annotation_list": np.array([[dog_name(b, s)] for b, s in rows], dtype=object),
            "labels": np.array([[b + 1] for b, _ in rows], dtype=np.float64)})
    return root


WNIDS = ["n01440764", "n01443537", "n01484850"]
# (val number, wnid index, (w, h), VOC boxes)
IMAGENET_VAL = [
    (1, 2, (37, 37), [(11, 6, 20, 15)]),
    (2, 0, (74, 37), [(31, 6, 40, 15)]),
    (3, 1, (37, 37), [(11, 6, 20, 15), (1, 30, 5, 37)]),
]


def val_name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}"


def make_imagenet(root: Path, kaggle: bool = False, val_folders: bool = False) -> Path:
    """The plain layout (train/WNID/, flat val/ with the bbox XML beside each image; ``val_folders``:
    val/WNID/ as valprep.sh sorts it, the XML beside), or the Kaggle download (LOC_synset_mapping.txt,
    LOC_val_solution.csv, ILSVRC/Data/CLS-LOC, the XML in ILSVRC/Annotations/CLS-LOC/val)."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    data.mkdir(parents=True)
    for k, wnid in enumerate(WNIDS):
        for j in range(2):
            image(data / "train" / wnid / f"{wnid}_{1000 + j}.JPEG", (37, 37), 100 + 2 * k + j)
    for n, c, size, boxes in IMAGENET_VAL:
        val = data / "val" / WNIDS[c] if val_folders else data / "val"
        image(val / f"{val_name(n)}.JPEG", size, 200 + n)
        xml = voc_xml("val", val_name(n), size, [(WNIDS[c], b) for b in boxes], "ILSVRC_2012")
        where = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val" if kaggle else val
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{val_name(n)}.xml").write_text(xml)
    if kaggle:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} fish {k}\n" for k, w in enumerate(WNIDS)))
        rows = ["ImageId,PredictionString"]
        for n, c, _, boxes in IMAGENET_VAL:
            rows.append(f"{val_name(n)}," + " ".join(f"{WNIDS[c]} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes)
                        + " ")
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def box_mask(rows: tuple[int, int], cols: tuple[int, int], size: int = 32) -> np.ndarray:
    """A size x size 0/1 mask, 1 on rows [r0, r1) and columns [c0, c1)."""
    m = np.zeros((size, size), dtype=np.float32)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return m
