"""Image folders: reading and checking them, splits and their record, sampling, datasets, the
memory policy and the DataModule. The data config's `_target_` names the DataModule here,
imported on first use so that the commands that only decode images never import Lightning."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ImageFolderData":
        from src.data.module import ImageFolderData

        return ImageFolderData
    raise AttributeError(f"module 'src.data' has no attribute {name!r}")
