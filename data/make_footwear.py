"""Build data/footwear/ from Fashion-MNIST's footwear classes in the published folder layout.

Reads Debian's `dataset-fashion-mnist` files (/usr/share/datasets/fashion-mnist) when present,
otherwise lets torchvision download Fashion-MNIST. Run: python data/make_footwear.py
"""

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {5: "sandals", 7: "sneakers", 9: "boots"}  # Fashion-MNIST label -> folder name
PER_CLASS = {"training": 249, "validation": 50}  # taken from the train and test split


def load_split(root: Path, train: bool) -> FashionMNIST:
    """Fashion-MNIST from the Debian package when installed, else torchvision's download."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in DEBIAN_DIR.glob("*-ubyte.gz"):
        target = raw / gz.name.removesuffix(".gz")
        if not target.exists():
            with gzip.open(gz) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return FashionMNIST(root, train=train, download=not DEBIAN_DIR.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "footwear")
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory() as tmp:
        for split, count in PER_CLASS.items():
            dataset = load_split(Path(tmp), train=split == "training")
            for label, name in CLASSES.items():
                folder = out / split / name
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                indices = (dataset.targets == label).nonzero().flatten()[:count].tolist()
                for n, index in enumerate(indices):
                    dataset[index][0].save(folder / f"image{n}.png", optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
