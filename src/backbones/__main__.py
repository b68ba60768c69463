"""`python -m src.backbones [pattern]`: the backbones by name, with feature size, parameters,
default size, mean/std and whether their weights are available offline."""

import argparse
import fnmatch

from src.backbones.timm_models import timm_backbone, timm_cached
from src.backbones.torchvision_models import (
    torchvision_backbone,
    torchvision_cached,
    torchvision_names,
)
from src.run.errors import UserError


def listing(pattern: str, image_size: int) -> list[dict[str, object]]:
    """One row per matching name: source, feature size, params, default size, mean/std, offline."""
    import timm

    rows = []
    for source, names, build, cached in (
        ("torchvision", torchvision_names(), torchvision_backbone, torchvision_cached),
        ("timm", timm.list_models(), timm_backbone, timm_cached),
    ):
        for name in fnmatch.filter(names, pattern):
            try:
                net = build(name, None, image_size)
            except UserError as err:
                rows.append({"source": source, "name": name, "error": str(err)})
                continue
            rows.append(
                {
                    "source": source,
                    "name": name,
                    "features": net.num_features,
                    "params": sum(p.numel() for p in net.module.parameters()),
                    "size": net.default_size,
                    "mean": "/".join(f"{v:.3f}" for v in net.mean),
                    "std": "/".join(f"{v:.3f}" for v in net.std),
                    "weights": cached(name),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m src.backbones [pattern]`: the backbones whose names match, one per line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style, e.g. 'resnet*'")
    parser.add_argument("--image-size", type=int, default=224, help="size to build them at")
    args = parser.parse_args(argv)
    rows = listing(args.pattern, args.image_size)
    if not rows:
        raise SystemExit(f"no backbone matches {args.pattern!r}. Fix: a pattern such as 'res*'")
    print(
        f"{'source':11} {'name':44} {'features':>8} {'params':>12} {'size':>4}  "
        f"{'mean':17} {'std':17} weights"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['source']:11} {row['name']:44} {row['error']}")
            continue
        print(
            f"{row['source']:11} {row['name']:44} {row['features']:>8} {row['params']:>12,} "
            f"{row['size']:>4}  {row['mean']:17} {row['std']:17} {row['weights']}"
        )
    print(
        "\nbackbone=torchvision backbone.name=<name> (weights: DEFAULT, an enum name, null, a "
        "file) or backbone=timm backbone.name=<name> (weights: pretrained, null, a file)"
    )


if __name__ == "__main__":
    main()
