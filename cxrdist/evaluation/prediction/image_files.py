"""New radiographs as files, read exactly as prepare would have stored them: the dataset `predict` and its
Grad-CAM maps (saliency.py) both draw their images from."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from cxrdist.data.images import encode_image, load_for_shard
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import decode_grayscale, eval_transform
from cxrdist.errors import BadImage


def stored_pixels(path: Path, image: dict) -> bytes:
    """The bytes prepare would have written to a shard for this file."""
    pixels = load_for_shard(path, int(image["max_size"]))
    return encode_image(pixels, image["format"], int(image.get("quality", 95)))


class ImageFiles(Dataset):
    """(index, [tensor per preprocessing group]) or (index, error) for every file."""

    def __init__(self, paths: list[Path], image: dict, specs: list[ImageSpec]) -> None:
        self.paths, self.image, self.specs = paths, image, specs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            data = stored_pixels(self.paths[index], self.image)
            return index, [eval_transform(decode_grayscale(data, spec.size), spec) for spec in self.specs]
        except BadImage as err:
            return index, str(err)
