"""Data of any size: streaming gives the batches of in-memory decoding, the memory choice, the
scan cache, and the inference inputs (list_inputs, input_classes, stream_images)."""

import json
import logging
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import src.data.memory
import src.data.sampling
import src.data.scan
from src.data.datasets import ImagesDataset, StreamingDataset
from src.data.images import decode, stream_images
from src.data.module import ImageFolderData
from src.data.scan import input_classes, list_inputs, scan_cache_file
from src.data.splits import checkpoint_split
from src.run.errors import UserError
from src.train import train
from tests.conftest import compose_cfg, make_folder, tiny_overrides

AUGMENT = v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0)), v2.RandomHorizontalFlip()])
METRICS_ONLY = {"first_batch_s", "fit_s", "first_epoch_s", "mean_epoch_s", "wall_s"}


def folder_data(root: Path, **kwargs) -> ImageFolderData:
    """16 px, batch 4, light augmentation, seed 7."""
    return ImageFolderData(
        str(root), image_size=16, batch_size=4, seed=7, train_transform=AUGMENT, **kwargs
    )


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same(batches, others) -> None:
    assert len(batches) == len(others)
    for (images, labels), (other_images, other_labels) in zip(batches, others, strict=True):
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_in_memory_ones(tmp_path: Path, workers: int) -> None:
    root = make_folder(tmp_path / "d", per_class=6, validation=2)
    memory = folder_data(root, in_memory=True, num_workers=0)
    streamed = folder_data(root, in_memory=False, num_workers=workers)
    memory.setup()
    streamed.setup()
    assert isinstance(memory.datasets["train"], ImagesDataset)
    assert isinstance(streamed.datasets["train"], StreamingDataset)
    loader = streamed.train_dataloader()  # one loader: its workers persist across the epochs
    assert loader.persistent_workers == (workers > 0)
    context = loader.multiprocessing_context  # forked workers, as src.data.images.worker_start says
    assert context.get_start_method() == "fork" if workers else context is None
    in_memory = [epoch_batches(memory.train_dataloader(), epoch) for epoch in (0, 1)]
    for epoch in (0, 1):
        assert_same(epoch_batches(loader, epoch), in_memory[epoch])
    assert_same(list(streamed.val_dataloader()), list(memory.val_dataloader()))
    assert_same(list(streamed.test_dataloader()), list(memory.test_dataloader()))
    # the augmentation does something, and another thing in another epoch
    dataset = memory.datasets["train"]
    first = dataset[src.data.sampling.EpochIndex(0, 0)][0]
    assert not torch.equal(first, dataset.images[0])
    assert not torch.equal(first, dataset[src.data.sampling.EpochIndex(1, 0)][0])


def test_workers_fork_where_the_process_default_is_spawn(tmp_path: Path) -> None:
    """A ddp_spawn rank's default start method is spawn, whose workers would import torch and
    this package again for every loader."""
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    try:
        data = folder_data(root, in_memory=False, num_workers=1)
        data.setup()
        loader = data.val_dataloader()
        assert loader.multiprocessing_context.get_start_method() == "fork"
        assert sum(len(labels) for _, labels in loader) == 3
    finally:
        multiprocessing.set_start_method(default, force=True)


def test_a_resumed_epoch_augments_as_an_uninterrupted_one(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=6, validation=2)
    straight = folder_data(root, in_memory=True)
    straight.setup()
    loader = straight.train_dataloader()
    epoch_batches(loader, 0)
    second = epoch_batches(loader, 1)
    order = [key.index for key in loader.sampler]  # epoch 1's: each image augmented for epoch 1
    dataset = straight.datasets["train"]
    expected = torch.stack([dataset[src.data.sampling.EpochIndex(1, i)][0] for i in order[:4]])
    assert torch.equal(second[0][0], expected)
    torch.manual_seed(123)  # a resumed process: another global generator state
    resumed = folder_data(root, in_memory=False, num_workers=0)
    resumed.setup()
    assert_same(epoch_batches(resumed.train_dataloader(), 1), second)


def test_augmentation_leaves_the_global_generator_alone(tmp_path: Path) -> None:
    data = folder_data(make_folder(tmp_path / "d", per_class=3, validation=1), in_memory=True)
    data.setup()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    data.datasets["train"][0]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_seeded_training_run_has_the_same_metrics_streamed_and_in_memory(
    image_root: Path, tmp_path: Path
) -> None:
    results = {}
    for mode, workers in (("true", 0), ("false", 2)):
        out = tmp_path / mode
        overrides = [
            *tiny_overrides(image_root),
            "augment=light",
            "cache_features=false",
            "freeze=false",  # a frozen random backbone gives near-constant features
            f"data.in_memory={mode}",
            f"data.num_workers={workers}",
            f"data.scan_cache={tmp_path / 'scan'}",
        ]
        train(compose_cfg(overrides, out))
        result = json.loads((out / "result.json").read_text())
        results[mode] = {k: v for k, v in result.items() if k not in METRICS_ONLY}
    assert results["true"] == results["false"]
    record = checkpoint_split(torch.load(out / "checkpoints" / "best.ckpt", weights_only=True))
    data = ImageFolderData.from_record(str(image_root), record, image_size=32)
    assert record == data.split_record() and record["seed"] == 42
    assert "test/acc" in results["true"] and "before/test_acc" in results["true"]


def test_auto_streams_when_the_images_exceed_the_limit(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    with caplog.at_level(logging.INFO, logger="src.data"):
        tiny = folder_data(root, memory_limit_gb=0.000001)
    assert tiny.streaming and "streamed" in caplog.text
    assert "12 decoded images at 16 px take 0.00 GiB" in caplog.text
    assert tiny.workers == len(os.sched_getaffinity(0))
    tiny.setup()
    assert isinstance(tiny.datasets["train"], StreamingDataset)
    roomy = folder_data(root)
    assert not roomy.streaming and roomy.workers == 0
    roomy.setup()
    assert isinstance(roomy.datasets["train"], ImagesDataset)


def test_auto_limit_is_half_the_available_memory(tmp_path: Path, monkeypatch, caplog) -> None:
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    need = 12 * 3 * 16 * 16
    monkeypatch.setattr(src.data.memory, "memory_available", lambda: 2 * need - 2)
    with caplog.at_level(logging.INFO, logger="src.data"):
        assert folder_data(root).streaming
    assert "data.memory_limit_gb=null: 50% of the" in caplog.text
    monkeypatch.setattr(src.data.memory, "memory_available", lambda: 2 * need)
    assert not folder_data(root).streaming


def test_several_processes_stream_instead_of_decoding_everything_each(tmp_path: Path) -> None:
    data = folder_data(make_folder(tmp_path / "d", per_class=3, validation=1), in_memory=True)
    assert not data.streaming
    data.trainer = SimpleNamespace(world_size=2, num_devices=2)  # what a DDP Trainer reports
    data.setup()
    assert data.streaming and isinstance(data.datasets["train"], StreamingDataset)
    assert data.workers == max(1, len(os.sched_getaffinity(0)) // 2)  # the cores, per device


def count_checks(monkeypatch) -> list[Path]:
    """Record each image that the scan checks."""
    checked: list[Path] = []
    check = src.data.scan.check_image

    def counting(path: Path) -> tuple[int, int]:
        checked.append(path)
        return check(path)

    monkeypatch.setattr(src.data.scan, "check_image", counting)
    return checked


def test_scan_cache_skips_unchanged_images_and_rechecks_changed_ones(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    cache = tmp_path / "cache"
    checked = count_checks(monkeypatch)
    first = folder_data(root, scan_cache=str(cache))
    assert len(checked) == 12 and scan_cache_file(cache, root).is_file()
    checked.clear()
    assert folder_data(root, scan_cache=str(cache)).splits() == first.splits()
    assert checked == []
    touched = root / "training" / "class_0" / "image1.png"
    os.utime(touched, ns=(1, 1))
    rewritten = root / "validation" / "class_2" / "image0.png"
    Image.new("RGB", (30, 30), "white").save(rewritten)
    folder_data(root, scan_cache=str(cache))
    assert sorted(checked) == sorted([touched, rewritten])
    checked.clear()
    folder_data(root, scan_cache=None)
    assert len(checked) == 12  # no cache, no reuse


def test_scan_cache_of_another_pillow_limit_is_not_reused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    folder_data(root, scan_cache=str(tmp_path / "cache"))
    checked = count_checks(monkeypatch)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    folder_data(root, scan_cache=str(tmp_path / "cache"))
    assert len(checked) == 12


@pytest.mark.parametrize(
    "content",
    [
        b"\x80\x04 not json: pickle-looking bytes",
        b'{"header": 1, "images": []}',
        b"[1, 2, 3]",
    ],
)
def test_corrupt_scan_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, content: bytes):
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    path = scan_cache_file(tmp_path / "cache", root)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    checked = count_checks(monkeypatch)
    folder_data(root, scan_cache=str(tmp_path / "cache"))
    assert len(checked) == 12
    assert len(json.loads(path.read_text())["images"]) == 12


def test_scan_cache_entries_of_the_wrong_shape_are_rechecked(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    cache = tmp_path / "cache"
    folder_data(root, scan_cache=str(cache))
    path = scan_cache_file(cache, root)
    saved = json.loads(path.read_text())
    key = "training/class_0/image0.png"
    saved["images"][key][2] = "evil"
    path.write_text(json.dumps(saved))
    checked = count_checks(monkeypatch)
    folder_data(root, scan_cache=str(cache))
    assert checked == [root / key]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_images_reports_a_bad_file_and_decodes_the_rest_in_order(tmp_path, workers):
    root = make_folder(tmp_path / "d", per_class=3)
    paths = sorted((root / "training").rglob("*.png"))
    bad = tmp_path / "cut.png"
    bad.write_bytes(paths[0].read_bytes()[:40])
    paths.insert(4, bad)
    batches = list(stream_images(paths, 8, batch_size=3, num_workers=workers))
    indices = [i for batch, _, _ in batches for i in batch]
    assert indices == [i for i in range(10) if i != 4]
    errors = {i: why for _, _, found in batches for i, why in found.items()}
    assert list(errors) == [4] and errors[4]
    images = torch.cat([images for _, images, _ in batches])
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 8, 8)
    for image, i in zip(images, indices, strict=True):
        assert torch.equal(image, decode(paths[i], 8))
    assert batches[1][1].shape == (2, 3, 8, 8)  # the batch of 3 with the bad file


def test_stream_images_of_only_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    ((_, images, errors),) = stream_images([tmp_path / "empty.png"], 8, num_workers=0)
    assert images.shape == (0, 3, 8, 8) and errors == {0: "empty file"}


def test_list_inputs_recurses_and_ignores_junk(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2, validation=1)
    (root / "notes.txt").write_text("x")
    (root / "training" / ".DS_Store").write_bytes(b"junk")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "secret.png")
    Image.new("RGB", (8, 8)).save(root / "top.JPG")
    found = list_inputs(root)
    assert found == sorted(found) and len(found) == 6 + 3 + 1
    assert root / "top.JPG" in found and not any(".hidden" in str(p) for p in found)
    assert list_inputs(root / "top.JPG") == [root / "top.JPG"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match=r"no images .* in the folder .*nothing or its sub-folders"):
        list_inputs(tmp_path / "nothing")
    with pytest.raises(UserError, match=r"no inputs given"):
        list_inputs(None)
    with pytest.raises(UserError, match=r"inputs .*missing not found\. Fix: inputs="):
        list_inputs(tmp_path / "missing")


def test_input_classes_of_a_class_structured_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2, validation=2)
    validation = root / "validation"
    paths = list_inputs(validation)
    assert input_classes(paths, validation) == [p.parent.name for p in paths]
    assert set(input_classes(paths, validation)) == {"class_0", "class_1", "class_2"}
    Image.new("RGB", (8, 8)).save(validation / "loose.png")
    assert input_classes(list_inputs(validation), validation) is None
    assert input_classes(paths, tmp_path / "elsewhere") is None
