"""ImageSpec: what the network expects of an input tensor (size, channels, normalisation, resampling)."""

from __future__ import annotations

from dataclasses import dataclass

from cxrdist.data import preprocess
from cxrdist.errors import UserError

INTERPOLATIONS = tuple(preprocess.INTERPOLATIONS)
# Who computes the evaluation resize (preprocess.resize_square). A model card without the field was written
# when torchvision did: its models keep it, so their numbers do not move (model/card.py).
RESAMPLER, LEGACY_RESAMPLER = preprocess.RESAMPLERS
# The side a stored JPEG is decoded at (libjpeg's DCT-scaled draft) for evaluation: "train_draft_side", training's
# (data/transforms.py train_draft_side), so evaluation resizes from the pixels training cropped from. A card without
# the field was written when evaluation drafted at the input size (from 2x that size on, a 1/2-1/8 scale decode unlike
# training's): its models keep that decode, so re-evaluating them gives the numbers their cards hold (model/card.py).
EVAL_DECODES = ("train_draft_side", "img_size")
EVAL_DECODE, LEGACY_EVAL_DECODE = EVAL_DECODES


@dataclass(frozen=True)
class ImageSpec:
    """The eval and train transforms read only this; the model card records it."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # how images are resized; the backbone's pretrained config decides
    resampler: str = RESAMPLER  # the implementation of the evaluation resize
    eval_decode: str = EVAL_DECODE  # the side stored JPEGs are decoded at for evaluation (EVAL_DECODES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std):
            raise UserError(f"normalisation mean has {len(self.mean)} values but std has {len(self.std)}")
        if len(self.mean) != self.channels and self.channels != 1:
            raise UserError(f"normalisation has {len(self.mean)} channel values but the model takes in_chans={self.channels}")
        if self.size < 1:
            raise UserError(f"image size must be >= 1, got {self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"image interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resampler not in preprocess.RESAMPLERS:
            raise UserError(f"image resampler must be one of {', '.join(preprocess.RESAMPLERS)}, got {self.resampler!r}")
        if self.eval_decode not in EVAL_DECODES:
            raise UserError(f"image eval_decode must be one of {', '.join(EVAL_DECODES)}, got {self.eval_decode!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "resampler": self.resampler, "eval_decode": self.eval_decode}
