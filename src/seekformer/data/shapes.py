"""Small image sets written to disk: a seeded shapes-and-colours VQA generator and scikit-learn's digits.

    write_shapes_vqa(out, n_images, seed)   -> out/images/*.png + out/{train,validation,test}.jsonl
    write_digits(out, per_class, size)      -> out/{train,test}/<digit>/*.png (ImageFolder; sklearn digits, BSD)

Shapes scenes: 1-3 distinct shapes (circle, square, triangle, cross) in distinct colours (red, green, blue,
yellow, magenta, cyan, white) on black. Questions (answer in one word):
    what color is the SHAPE?        -> COLOR          what shape is COLOR?   -> SHAPE
    is there a COLOR SHAPE?          -> yes | no      how many shapes are there? -> 1 | 2 | 3
    is the SHAPE on the left or right? -> left | right
Command line: `python -m seekformer.data.shapes OUT --images 4000 --seed 0` (or `--digits OUT`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 80, 240), "yellow": (240, 220, 30),
          "magenta": (220, 40, 220), "cyan": (40, 220, 230), "white": (245, 245, 245)}


def _draw(draw, shape: str, cx: int, cy: int, r: int, rgb: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:
        w = max(1, r // 2)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)


def shapes_scene(rng: random.Random, size: int = 32):
    """(PIL image, objects [(shape, color, cx, cy)]) of one random scene without overlaps."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    n = rng.randint(1, 3)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    r = max(3, size // 8)
    placed: list[tuple[str, str, int, int]] = []
    for shape, color in zip(shapes, colors):
        for _ in range(100):
            cx, cy = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
            if all(abs(cx - x) > 2 * r + 1 or abs(cy - y) > 2 * r + 1 for _, _, x, y in placed):
                break
        else:
            continue
        _draw(draw, shape, cx, cy, r, COLORS[color])
        placed.append((shape, color, cx, cy))
    return img, placed


def scene_questions(rng: random.Random, objects: list[tuple[str, str, int, int]], size: int) -> list[dict[str, str]]:
    """Every question type once for a scene (yes/no balanced): [{"question", "answer"}]."""
    shape, color, cx, _ = rng.choice(objects)
    present = {(s, c) for s, c, _, _ in objects}
    if rng.random() < 0.5:
        qs, qc = rng.choice(objects)[:2]
    else:
        qs, qc = rng.choice(SHAPES), rng.choice(list(COLORS))
    out = [{"question": f"what color is the {shape}?", "answer": color},
           {"question": f"what shape is {color}?", "answer": shape},
           {"question": f"is there a {qc} {qs}?", "answer": "yes" if (qs, qc) in present else "no"},
           {"question": "how many shapes are there?", "answer": str(len(objects))}]
    if abs(cx - size / 2) > 2:
        out.append({"question": f"is the {shape} on the left or right?", "answer": "left" if cx < size / 2 else "right"})
    return out


def write_shapes_vqa(out: str | Path, n_images: int = 4000, seed: int = 0, size: int = 32,
                     splits: tuple[float, float] = (0.8, 0.1)) -> dict[str, int]:
    """Write PNG scenes and {train,validation,test}.jsonl ({"image", "question", "answer"}, relative paths).

    Splits are by image (no scene is in two splits). Returns {split: number of questions}.
    """
    rng = random.Random(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_train, n_val = int(n_images * splits[0]), int(n_images * splits[1])
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for i in range(n_images):
        img, objects = shapes_scene(rng, size)
        name = f"images/{i:06d}.png"
        img.save(out / name)
        split = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
        rows[split] += [{"image": name, **q} for q in scene_questions(rng, objects, size)]
    for split, recs in rows.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return {s: len(r) for s, r in rows.items()}


def write_digits(out: str | Path, per_class: int | None = None, size: int = 8, test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, int]:
    """scikit-learn's 8x8 digits (1797 images, BSD licence) as ImageFolder PNGs: out/{train,test}/<digit>/.

    `size` upsamples (bilinear) e.g. to 28 for a 28x28 greyscale set. Returns {split: images}.
    """
    from PIL import Image

    try:
        from sklearn.datasets import load_digits  # the digits ship inside scikit-learn (BSD)
    except ImportError:
        from ..errors import DataError

        raise DataError("the digits come from scikit-learn: pip install scikit-learn") from None

    d = load_digits()
    rng = random.Random(seed)
    out = Path(out)
    counts = {"train": 0, "test": 0}
    for digit in range(10):
        idx = [i for i, t in enumerate(d.target) if t == digit]
        rng.shuffle(idx)
        idx = idx[:per_class] if per_class else idx
        n_test = max(1, int(len(idx) * test_fraction))
        for k, i in enumerate(idx):
            split = "test" if k < n_test else "train"
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            arr = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype("uint8")
            img = Image.fromarray(arr, mode="L")
            if size != 8:
                img = img.resize((size, size), Image.BILINEAR)
            img.save(folder / f"{i:04d}.png")
            counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m seekformer.data.shapes", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", action="store_true", help="write scikit-learn digits (ImageFolder) instead")
    a = p.parse_args(argv)
    counts = write_digits(a.out, size=a.size, seed=a.seed) if a.digits else \
        write_shapes_vqa(a.out, a.images, a.seed, a.size)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()


__all__ = ["write_shapes_vqa", "write_digits", "shapes_scene", "scene_questions", "SHAPES", "COLORS"]
