"""Side by side with the published tf.keras recipe (../shared/peer/keras_recipe.py), per CPU kind.

On the embedded data, one after the other: the recipe (its own venv, `weights=None`) and this
project's command line (`backbone.weights=null`, features not cached on disk), for MobileNetV2
and VGG19, frozen and fine-tuned. Frozen: the recipe's median epoch extrapolated to 50 epochs
against our whole 50-epoch run (start-up included); fine-tuned, 3 epochs each: the recipe's
median epoch rate against our mean over the epochs after the first (both leave out the first
epoch's warm-up: TensorFlow traces its graph there; validation is included in ours, not in the
recipe's). VGG19 runs a few batches per epoch (`--vgg-batches`). `--kinds native avx2` also
runs both restricted to AVX2 kernels (TensorFlow's oneDNN reads ONEDNN_MAX_CPU_ISA too).
Prints a table and writes bench/PEER.md.

    python -m bench.keras_peer [--peer-python ~/.cache/keras-peer/bin/python] [--kinds native]
        [--modes vgg19:fine-tuned ...]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench import kinds
from bench.train_speed import cli_run
from src.run.runtime import cpu_kind

PEER = kinds.ROOT.parent / "shared" / "peer" / "keras_recipe.py"
DATA = kinds.ROOT / "data" / "footwear"
BATCH = 32
FINETUNE_EPOCHS = 3  # the median (recipe) and the mean after the first (ours) skip the warm-up
MODES = [("mobilenet_v2", True), ("mobilenet_v2", False), ("vgg19", True), ("vgg19", False)]


def keras_rate(python: str, backbone: str, frozen: bool, epochs: int, steps: int | None) -> dict:
    """The recipe's images per second (median epoch) and its epoch times."""
    command = [python, str(PEER), str(DATA), backbone, "frozen" if frozen else "unfrozen"]
    command += [str(epochs)] + ([str(steps)] if steps else [])
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    median = statistics.median(result["epoch_s"])
    return {**result, "rate": result["images_per_epoch"] / median, "median_s": median}


def ours(backbone: str, frozen: bool, vgg_batches: int) -> dict:
    """This project's run: frozen, 50 epochs of the recipe's head training; fine-tuned,
    FINETUNE_EPOCHS epochs (VGG19: `vgg_batches` training batches and one val batch each), with
    `steady_epoch_s`, the mean epoch after the first."""
    overrides = ["head_fit=recipe"] if frozen else ["freeze=false"]
    overrides += [] if frozen else [f"trainer.max_epochs={FINETUNE_EPOCHS}"]
    if backbone == "vgg19" and not frozen:
        overrides += [
            f"+trainer.limit_train_batches={vgg_batches}",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
        ]
    run = cli_run(DATA, backbone, overrides)
    run["steady_epoch_s"] = (FINETUNE_EPOCHS * run["epoch_s"] - run["first_epoch_s"]) / (
        FINETUNE_EPOCHS - 1
    )
    run["images_per_epoch"] = (
        BATCH * vgg_batches if backbone == "vgg19" and not frozen else run["train_images"]
    )
    return run


def measure(python: str, vgg_batches: int, modes: list[str]) -> list[dict[str, object]]:
    """One row per mode (`backbone:frozen|fine-tuned`) on the kernels this process (and the
    recipe beside it) may use."""
    rows = []
    for backbone, frozen in MODES:
        if f"{backbone}:{'frozen' if frozen else 'fine-tuned'}" not in modes:
            continue
        vgg = backbone == "vgg19"
        if frozen:
            keras = keras_rate(python, backbone, True, 2 if vgg else 5, 5 if vgg else None)
            run = ours(backbone, True, vgg_batches)
            keras_s = 50 * 673 / keras["rate"]
            cells = (
                f"{keras['rate']:.1f} img/s: 50 epochs of 673 images ≈ {keras_s:,.0f} s",
                f"{run['wall_s']:.1f} s wall in all (first batch at {run['first_batch_s']:.1f} s)",
                keras_s / run["wall_s"],
            )
        else:
            keras = keras_rate(
                python, backbone, False, FINETUNE_EPOCHS, vgg_batches if vgg else None
            )
            run = ours(backbone, False, vgg_batches)
            rate = run["images_per_epoch"] / run["steady_epoch_s"]
            cells = (
                f"{keras['rate']:.2f} img/s (median of {keras['epoch_s']} s epochs of "
                f"{keras['images_per_epoch']} images)",
                f"{rate:.2f} img/s ({run['steady_epoch_s']:.1f} s per epoch after the first "
                f"({run['first_epoch_s']:.1f} s) of {run['images_per_epoch']} images, "
                "validation included)",
                rate / keras["rate"],
            )
        mode = f"{'MobileNetV2' if not vgg else 'VGG19'} {'frozen' if frozen else 'fine-tuned'}"
        keys = ["kind", "mode", "Keras recipe", "lightning-transfer", "ahead"]
        row = dict(zip(keys, [cpu_kind(), mode, *cells], strict=True))
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-python", default=str(Path.home() / ".cache" / "keras-peer" / "bin" / "python")
    )
    parser.add_argument("--vgg-batches", type=int, default=3)
    names = [f"{b}:{'frozen' if f else 'fine-tuned'}" for b, f in MODES]
    parser.add_argument("--modes", nargs="+", default=names, choices=names)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "PEER.md")
    args, rows = kinds.rows_per_kind(
        parser, "bench.keras_peer", lambda a: measure(a.peer_python, a.vgg_batches, a.modes)
    )
    intro = (
        "TensorFlow beside torch, one after the other (method: bench/keras_peer.py). `avx2` on "
        f"a CPU with more: both restricted with {kinds.RESTRICTION}. `ahead`: our speed over "
        "the recipe's."
    )
    kinds.write_section(args.out, "Against the published tf.keras recipe", intro, rows)


if __name__ == "__main__":
    main()
