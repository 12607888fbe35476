"""ImageNet's training views (paper 3.4), drawn before any pixel is decoded, and two ways to make them.

The paper's augmentation resizes the whole image so that its shorter side is S, drawn from
[256, 480], then takes a random 224x224 crop, flipped with probability 1/2. For most ImageNet photos
(about 500x375) that first resize is an *up*-sampling of the whole image, of which a quarter or less
is kept. Here the view is drawn first (`draw_view`: the same random draws, in the same order, as
torchvision's `RandomShortestSize`, `RandomCrop` and `RandomHorizontalFlip`), its box is mapped back
to the original image, and only that region is resampled to 224x224:

- `CropFirst` (the CPU path, the default): in the DataLoader worker, PIL resamples the box alone
  (`Image.resize(box=...)`; PIL's filter uses the pixels around the box as a whole-image resize
  would, so without draft decoding the crop is the resize-then-crop one within 2 levels of 255), and when
  the resized image is at most half the original's size, the JPEG is decoded at 1/2, 1/4 or 1/8 of
  its size in the decoder itself (`Image.draft`), which interpolates differently. Where the package's
  one compiled module was built (`_jpegcrop`, libjpeg-turbo; `partial_decoding()` says), only the
  region under the box and its filter's reach is decoded: the rows above it are skipped without being
  reconstructed, the columns outside it are not reconstructed, decoding stops below it. The pixels
  the filter reads are the whole-image decoder's, so the view is the same up to PIL's rounding of
  its filter weights for a box shifted by whole pixels (at most 2 levels of 255; tested).
- `EncodedView` + `BatchDecoder` (`--decode gpu`): the worker reads the file's bytes and draws the
  view; the training process decodes the batch's JPEGs at once on the device (torchvision's batched
  `decode_jpeg`, nvJPEG on CUDA) and resamples each box there (`torchvision.ops.roi_align`, which
  averages the samples of each output pixel when it shrinks). Files it cannot take (ImageNet has a
  few CMYK and greyscale JPEGs, and a PNG named .JPEG) the worker renders with `CropFirst`
  instead; a JPEG the device decoder still refuses is decoded on the CPU in the training process.
  Both are counted (`BatchDecoder.cpu_decoded`).

Either way the distribution of views is the paper's; the pixels differ from resize-then-crop only by
interpolation.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from .sources import DataError

try:
    from . import _jpegcrop
except ImportError:  # not built: no C compiler or libjpeg-turbo headers when the package was installed
    _jpegcrop = None

TRAIN_SCALE = (256, 480)
CROP = 224


def partial_decoding() -> str | None:
    """The JPEG library the CPU path decodes training views' regions with ("libjpeg-turbo 2.1.5"),
    or None when `_jpegcrop` was not built and PIL decodes whole images (slower, the same views)."""
    return _jpegcrop.library_version() if _jpegcrop is not None else None


@dataclass(frozen=True)
class View:
    """A training view of a ``width`` x ``height`` image: resize it to ``resized`` (w, h; shorter
    side S), take the ``crop`` x ``crop`` square at (``left``, ``top``) of that, flip it if ``flip``."""

    width: int
    height: int
    resized: tuple[int, int]
    top: int
    left: int
    crop: int
    flip: bool

    def box(self, width: int | None = None, height: int | None = None) -> tuple[float, float, float, float]:
        """The crop as (x0, y0, x1, y1) in the pixel coordinates of the original image, or of a
        ``width`` x ``height`` copy of it (a draft-decoded one)."""
        sx = (self.width if width is None else width) / self.resized[0]
        sy = (self.height if height is None else height) / self.resized[1]
        return (self.left * sx, self.top * sy, (self.left + self.crop) * sx, (self.top + self.crop) * sy)


def draw_view(width: int, height: int, scale: tuple[int, int] = TRAIN_SCALE, crop: int = CROP,
              generator: torch.Generator | None = None) -> View:
    """Draw a view of a ``width`` x ``height`` image: S uniform in ``scale`` (inclusive), a uniform
    crop position, a flip with probability 1/2. With the same random state these are exactly the
    draws of `v2.RandomShortestSize(range(lo, hi + 1))`, `v2.RandomCrop(crop)` and
    `v2.RandomHorizontalFlip()` applied in turn (the torch global RNG when ``generator`` is None, as
    in a DataLoader worker)."""
    lo, hi = scale
    s = lo + int(torch.randint(hi - lo + 1, (), generator=generator))
    r = s / min(height, width)
    new_w, new_h = int(width * r), int(height * r)
    if new_w < crop or new_h < crop:
        raise ValueError(f"a {width}x{height} image resized to {new_w}x{new_h} is smaller than the {crop}x{crop} crop")
    top = int(torch.randint(0, new_h - crop + 1, (), generator=generator)) if new_h > crop else 0
    left = int(torch.randint(0, new_w - crop + 1, (), generator=generator)) if new_w > crop else 0
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return View(width, height, (new_w, new_h), top, left, crop, flip)


def open_image(path: str) -> Image.Image:
    """``path`` opened, not yet decoded (its header read); an unreadable file is a DataError naming it."""
    try:
        return Image.open(path)
    except OSError as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {path} ({e}); replace or delete that file") from e


def draft_scale(size: tuple[int, int], resized: tuple[int, int]) -> int:
    """The reduced size PIL's `Image.draft` decodes a JPEG of ``size`` at for a view resized to
    ``resized``: 1/8, 1/4, 1/2 or 1/1, the smallest that stays at least ``resized`` (returns 8, 4, 2
    or 1)."""
    scale = min(size[0] // resized[0], size[1] // resized[1])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _partial(image: Image.Image, view: View, draft: bool) -> Image.Image | None:
    """The view's box resampled from a decode of the region under it (`_jpegcrop`), or None for a
    file that goes to PIL whole: not a 3-component JPEG, one whose data does not end with the
    end-of-image marker (a truncated file: PIL's decoder says so, whichever crop is drawn), or one
    libjpeg-turbo cannot decode the region of. (Corrupt data below the region goes unnoticed here,
    where PIL's whole decode might stop on it.)"""
    if _jpegcrop is None or image.format != "JPEG" or image.mode != "RGB" or len(image.tile) != 1:
        return None
    image.fp.seek(0)
    data = image.fp.read()
    if not data.endswith(b"\xff\xd9"):
        return None
    w, h = image.size
    denom = draft_scale((w, h), view.resized) if draft else 1
    w, h = -(-w // denom), -(-h // denom)  # the decoder's size at 1/denom, as PIL's draft has it
    x0, y0, x1, y1 = view.box(w, h)
    # PIL's bilinear filter reaches max(1, box / crop) pixels either side of an output pixel's centre;
    # 2 more keep it off the region's outer columns, whose chroma the decoder upsamples as an edge.
    mx = math.ceil(max(1.0, (x1 - x0) / view.crop)) + 2
    my = math.ceil(max(1.0, (y1 - y0) / view.crop)) + 2
    region = (max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my),
              min(w, math.ceil(x1) + mx), min(h, math.ceil(y1) + my))
    try:
        pixels, left, top, rw, rh = _jpegcrop.decode_region(data, denom, *region)
    except ValueError:  # corrupt data, data ending inside the region, a feature this libjpeg lacks:
        return None  # PIL decodes the whole file, and names it if it cannot either
    rgb = Image.frombuffer("RGB", (rw, rh), pixels, "raw", "RGB", 0, 1)
    return rgb.resize((view.crop, view.crop), Image.BILINEAR, box=(x0 - left, y0 - top, x1 - left, y1 - top))


def render(image: Image.Image, view: View, *, draft: bool = True, partial: bool = True) -> torch.Tensor:
    """The view of an opened (not yet decoded) image as a uint8 (3, crop, crop) tensor: the box
    alone resampled (bilinear, PIL's antialiasing filter), decoded at a reduced size first when
    ``draft`` and the resized image is at most half the original's. With ``partial`` (and
    `_jpegcrop` built) only the region under the box is decoded, to the same pixels. Closes the
    image."""
    name = getattr(image, "filename", "") or "<image>"
    try:
        out = _partial(image, view, draft) if partial else None
        if out is None:
            if draft and image.format == "JPEG":
                image.draft(image.mode, view.resized)  # 1/2, 1/4 or 1/8 of the size, never below `resized`
            w, h = image.size
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            out = rgb.resize((view.crop, view.crop), Image.BILINEAR, box=view.box(w, h))
    except OSError as e:  # truncated or corrupt data, met while decoding
        raise DataError(f"cannot decode image {name} ({e}); replace or delete that file") from e
    finally:
        image.close()
    if view.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(out)


class CropFirst:
    """The CPU path's training transform (a DataLoader worker's): an opened image (`open_image`) ->
    its random view (`draw_view`), as a uint8 (3, crop, crop) tensor (`render`)."""

    def __init__(self, scale: tuple[int, int] = TRAIN_SCALE, crop: int = CROP, *, draft: bool = True,
                 partial: bool = True) -> None:
        self.scale, self.crop, self.draft, self.partial = scale, crop, draft, partial

    def __call__(self, image: Image.Image) -> torch.Tensor:
        view = draw_view(*image.size, self.scale, self.crop)
        return render(image, view, draft=self.draft, partial=self.partial)

    def __repr__(self) -> str:
        return f"CropFirst(scale={self.scale}, crop={self.crop}, draft={self.draft}, partial={self.partial})"


def device_decodable(image: Image.Image) -> bool:
    """Whether the device's JPEG decoder takes this file: a 3-channel (YCbCr) JPEG. Greyscale and
    CMYK JPEGs, and anything that is not a JPEG, go through the CPU."""
    return image.format == "JPEG" and image.mode == "RGB"


@dataclass
class Encoded:
    """One training sample of the GPU path, as a worker hands it over: the JPEG's bytes and the view's
    box (in its pixel coordinates) and flip, or, for a file the device cannot decode, its view
    already rendered (and flipped) on the CPU (``crop``; ``flip`` is then False)."""

    path: str
    data: torch.Tensor | None
    box: tuple[float, float, float, float]
    flip: bool
    crop: torch.Tensor | None = None


class EncodedView:
    """The GPU path's training transform: an opened image -> `Encoded`, drawing its view exactly as
    `CropFirst` does (the same draws in the same order, whichever way the file is then decoded)."""

    def __init__(self, scale: tuple[int, int] = TRAIN_SCALE, crop: int = CROP) -> None:
        self.scale, self.crop = scale, crop

    def __call__(self, image: Image.Image) -> Encoded:
        view = draw_view(*image.size, self.scale, self.crop)
        path = getattr(image, "filename", "") or "<image>"
        if not device_decodable(image):
            return Encoded(path, None, view.box(), False, crop=render(image, view))  # flipped already
        image.close()
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as e:
            raise DataError(f"cannot read image {path} ({e}); check that file") from e
        return Encoded(path, data, view.box(), view.flip)

    def __repr__(self) -> str:
        return f"EncodedView(scale={self.scale}, crop={self.crop})"


@dataclass
class EncodedBatch:
    """A batch of `Encoded` samples (`collate_encoded`): ``data[k]`` is sample ``jpeg_index[k]``'s
    JPEG with box ``boxes[k]``; ``crops[m]`` is sample ``crop_index[m]``'s view, rendered on the CPU."""

    paths: list[str]
    data: list[torch.Tensor]
    jpeg_index: torch.Tensor
    boxes: torch.Tensor
    crops: torch.Tensor
    crop_index: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return len(self.flips)

    def pin_memory(self) -> "EncodedBatch":
        """What DataLoader's pin_memory calls: the rendered crops go to page-locked memory (the JPEG
        bytes stay where they are: the decoder reads them from the host)."""
        self.crops = self.crops.pin_memory()
        return self


def collate_encoded(samples: list[tuple[Encoded, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """The DataLoader's collate_fn for `EncodedView` samples: (an `EncodedBatch`, int64 labels)."""
    jpegs = [i for i, (s, _) in enumerate(samples) if s.crop is None]
    rendered = [i for i, (s, _) in enumerate(samples) if s.crop is not None]
    crops = torch.stack([samples[i][0].crop for i in rendered]) if rendered else torch.empty((0,), dtype=torch.uint8)
    batch = EncodedBatch(
        paths=[s.path for s, _ in samples],
        data=[samples[i][0].data for i in jpegs],
        jpeg_index=torch.tensor(jpegs, dtype=torch.long),
        boxes=torch.tensor([samples[i][0].box for i in jpegs], dtype=torch.float32).reshape(-1, 4),
        crops=crops,
        crop_index=torch.tensor(rendered, dtype=torch.long),
        flips=torch.tensor([s.flip for s, _ in samples], dtype=torch.bool),
    )
    return batch, torch.tensor([label for _, label in samples], dtype=torch.long)


def _decode_jpeg():
    """torchvision's `decode_jpeg` (batched on CUDA since torchvision 0.20; deprecated from 0.29 in
    favour of TorchCodec, still there), or a one-line error."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:  # pragma: no cover - a torchvision without its image decoders
        raise DataError(f"--decode gpu needs torchvision's decode_jpeg, which this torchvision lacks ({e}); "
                        "use --decode cpu") from e
    return decode_jpeg, ImageReadMode.RGB


class BatchDecoder:
    """The training process's half of the GPU path: `EncodedBatch` -> uint8 (B, 3, crop, crop) views
    on ``device``. The batch's JPEGs are decoded together (nvJPEG on CUDA, libjpeg on the CPU, where
    the same code runs in tests), each box resampled to crop x crop on the device, the flips applied
    to the whole batch at once. ``cpu_decoded`` counts the images that were not decoded by the
    device decoder: rendered in a worker, or refused by it and decoded here on the CPU."""

    def __init__(self, device: torch.device | str, crop: int = CROP) -> None:
        self.device, self.crop = torch.device(device), crop
        self.decode, self.mode = _decode_jpeg()
        self.cpu_decoded = 0
        self.images = 0

    def _decode_all(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """The batch's JPEGs decoded on the device, together; if the decoder refuses the batch, file
        by file, with the CPU for the files it refuses alone."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates decode_jpeg
            try:
                return list(self.decode(batch.data, mode=self.mode, device=self.device))
            except RuntimeError:
                pass
            out = []
            for k, data in enumerate(batch.data):
                try:
                    out.append(self.decode(data, mode=self.mode, device=self.device))
                except RuntimeError:
                    out.append(self._cpu_decode(data, batch.paths[int(batch.jpeg_index[k])]))
            return out

    def _cpu_decode(self, data: torch.Tensor, path: str) -> torch.Tensor:
        self.cpu_decoded += 1
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                return pil_to_tensor(image.convert("RGB")).to(self.device)
        except OSError as e:
            raise DataError(f"cannot decode image {path} ({e}); replace or delete that file") from e

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        from torchvision.ops import roi_align

        out = torch.empty((len(batch), 3, self.crop, self.crop), dtype=torch.uint8, device=self.device)
        if len(batch.crop_index):
            out[batch.crop_index.to(self.device)] = batch.crops.to(self.device, non_blocking=True)
        if batch.data:
            images = self._decode_all(batch)
            boxes = batch.boxes.to(self.device)
            # One roi_align per image size (a photo collection has few: ImageNet's are mostly
            # 500x375, 500x333 or 375x500), not one per image. With aligned=True it samples the box in
            # pixel-centre coordinates, as PIL does; an adaptive number of samples per output pixel
            # averages away aliasing when it shrinks.
            by_size: dict[tuple[int, ...], list[int]] = {}
            for k, image in enumerate(images):
                by_size.setdefault(tuple(image.shape), []).append(k)
            for ks in by_size.values():
                stack = torch.stack([images[k] for k in ks]).float()
                rois = torch.cat([torch.arange(len(ks), device=self.device, dtype=boxes.dtype)[:, None], boxes[ks]], 1)
                views = roi_align(stack, rois, self.crop, aligned=True)
                out[batch.jpeg_index[ks].to(self.device)] = views.round_().clamp_(0, 255).to(torch.uint8)
        flips = batch.flips.to(self.device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
        self.cpu_decoded += len(batch.crop_index)
        self.images += len(batch)
        return out
