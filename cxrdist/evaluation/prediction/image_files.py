"""New radiographs as files, read exactly as prepare would have stored them: the dataset `predict` and its
Grad-CAM maps (saliency.py) both draw their images from. The steps are data/preprocess.py's, the module an
exported model ships with, called with the arguments its sidecar records (`model_input_arguments`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from cxrdist.data import preprocess
from cxrdist.data.ingest.images import bad_image
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import model_input_arguments
from cxrdist.errors import BadImage


def stored_pixels(path: Path, image: dict) -> bytes:
    """The bytes prepare would have written to a shard for this file (`image`: the model card's stored_image)."""
    with bad_image():
        return preprocess.stored_image(path, image["format"], int(image["max_size"]), int(image.get("quality", 95)))


class ImageFiles(Dataset):
    """(index, [tensor per preprocessing group]) or (index, error) for every file."""

    def __init__(self, paths: list[Path], image: dict, specs: list[ImageSpec]) -> None:
        self.paths, self.image = paths, image
        self.arguments = [model_input_arguments(spec, image) for spec in specs]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        """preprocess.model_input for every group, the file read and stored once."""
        try:
            data = stored_pixels(self.paths[index], self.image)
            return index, [torch.from_numpy(preprocess.stored_to_input(data, a["size"], a["mean"], a["std"], a["interpolation"],
                                                                       a["resampler"], draft_side=a["draft_side"]))
                           for a in self.arguments]
        except BadImage as err:
            return index, str(err)
