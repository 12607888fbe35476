"""ImageNet's training views drawn before decoding (`study.data.decode`): the CPU path (`CropFirst`)
against the paper's resize-then-crop reference (`imagenet.train_transform`), and the GPU path's
batched decoder (`--decode gpu`), which runs here with the CPU decoder."""

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from study.cli import main
from study.config import RunConfig
from study.data import DataError, imagenet
from study.data import decode
from study.data.decode import (BatchDecoder, CropFirst, EncodedBatch, draft_scale, draw_view, open_image,
                               partial_decoding, render)
from study.data.imagenet import load_image, loaders_for, open_imagenet, set_epoch, train_transform
from helpers import train_run
from study.runstore import Run

from test_imagenet import write_image_folder


def textured(w: int, h: int, seed: int = 0, smooth: bool = False) -> Image.Image:
    """A photo-like RGB image: a smooth colour field, plus (unless ``smooth``) pixel noise, so that
    a crop shifted by one pixel, or flipped, would differ from the right one everywhere."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    if not smooth:
        pixels = pixels + rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(path, image: Image.Image, **kwargs) -> str:
    image.save(path, format="JPEG", quality=95, **kwargs)
    return str(path)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 260), (640, 640)])
def test_crop_first_draws_the_reference_views_and_matches_its_pixels(tmp_path, size):
    # The same random state gives the same S, crop and flip as RandomShortestSize -> RandomCrop ->
    # RandomHorizontalFlip; resampling the box alone gives the same pixels up to rounding. On a
    # noisy image a one-pixel shift or a wrong flip would differ by tens of levels everywhere.
    path = save_jpeg(tmp_path / "a.JPEG", textured(*size))
    reference, crop_first = train_transform(), CropFirst(draft=False)
    flips, scales = set(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        want = reference(load_image(path))
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        view = draw_view(*size)
        torch.manual_seed(seed)
        got = crop_first(open_image(path))
        assert torch.rand(1) == after_reference  # the same number of draws
        assert got.shape == want.shape == (3, 224, 224) and got.dtype == torch.uint8
        diff = (got.int() - want.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.05, (seed, diff.max(), diff.float().mean())
        flips.add(view.flip)
        scales.add(min(view.resized))
    assert flips == {True, False} and len(scales) > 6


def test_views_cover_the_scale_range_and_stay_inside_the_image():
    gen = torch.Generator().manual_seed(0)
    shorter = []
    for _ in range(2000):
        v = draw_view(500, 333, generator=gen)
        x0, y0, x1, y1 = v.box()
        assert 0 <= x0 < x1 <= 500 + 1e-9 and 0 <= y0 < y1 <= 333 + 1e-9
        assert math.isclose((x1 - x0) * v.resized[0] / 500, 224) and math.isclose((y1 - y0) * v.resized[1] / 333, 224)
        shorter.append(min(v.resized))
    # int() of the float scale can land one below S, as torchvision's RandomShortestSize does.
    assert 255 <= min(shorter) <= 256 and max(shorter) == 480


def test_a_large_jpeg_is_draft_decoded_at_a_fraction_and_stays_close(tmp_path):
    path = save_jpeg(tmp_path / "big.JPEG", textured(2000, 1500, smooth=True))
    for seed in range(4):
        torch.manual_seed(seed)
        want = train_transform()(load_image(path))
        torch.manual_seed(seed)
        view = draw_view(2000, 1500)
        image = open_image(path)
        got = render(image, view, partial=False)  # PIL's draft decoding of the whole image
        # The decoder scales by 1/2, 1/4 or 1/8 as long as the image stays at least the resized size.
        factor = next(s for s in (8, 4, 2, 1) if min(2000 // view.resized[0], 1500 // view.resized[1]) >= s)
        assert factor >= 2 and image.size == (math.ceil(2000 / factor), math.ceil(1500 / factor))
        assert draft_scale((2000, 1500), view.resized) == factor
        diff = (got.int() - want.int()).abs().float()
        assert diff.mean() < 2.0 and diff.quantile(0.99) < 12, (seed, diff.mean(), diff.quantile(0.99))
    torch.manual_seed(0)
    no_draft = CropFirst(draft=False)(open_image(path))
    torch.manual_seed(0)
    assert (no_draft.int() - train_transform()(load_image(path)).int()).abs().max() <= 2


def test_greyscale_and_cmyk_jpegs_and_a_png_named_jpeg_come_out_rgb(tmp_path):
    rgb = textured(320, 280)
    files = {
        "grey": save_jpeg(tmp_path / "grey.JPEG", rgb.convert("L")),
        "cmyk": save_jpeg(tmp_path / "cmyk.JPEG", rgb.convert("CMYK")),
    }
    rgb.save(tmp_path / "png.JPEG", format="PNG")
    files["png"] = str(tmp_path / "png.JPEG")
    for name, path in files.items():
        torch.manual_seed(1)
        want = train_transform()(load_image(path))
        torch.manual_seed(1)
        got = CropFirst()(open_image(path))
        assert got.shape == (3, 224, 224), name
        assert (got.int() - want.int()).abs().float().mean() < 0.5, name


def test_an_unreadable_or_truncated_file_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8 not a JPEG")
    with pytest.raises(DataError, match="cannot decode image .*bad.JPEG"):
        CropFirst()(open_image(str(bad)))
    data = io.BytesIO()
    textured(400, 300).save(data, format="JPEG")
    cut = tmp_path / "cut.JPEG"
    cut.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(DataError, match="cannot decode image .*cut.JPEG"):
        CropFirst()(open_image(str(cut)))


needs_partial = pytest.mark.skipif(partial_decoding() is None, reason="the _jpegcrop module was not built "
                                   "(no C compiler or libjpeg-turbo headers at install time)")


@needs_partial
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 250)])
def test_a_decoded_region_holds_the_whole_decoders_pixels(tmp_path, size):
    # decode_region skips the rows above the region and reconstructs only the iMCU columns holding
    # it. Inside it the pixels are exactly PIL's decode of the whole image, at full size and at 1/2;
    # only its outermost columns (unless they are the image's edges) may differ, where the decoder
    # upsamples chroma as at an edge: `render` keeps its filter two pixels off them.
    path = save_jpeg(tmp_path / "a.JPEG", textured(*size), subsampling="4:2:0")
    data = open(path, "rb").read()
    rng = np.random.default_rng(0)
    for denom in (1, 2):
        image = Image.open(path)
        image.draft("RGB", (size[0] // denom, size[1] // denom))
        whole = np.asarray(image.convert("RGB"))
        h, w = whole.shape[:2]
        for k in range(25):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            # Narrow regions too (1-4 columns): they are widened to 32, as libjpeg-turbo upsamples
            # the chroma of a region a chroma sample or two wide differently.
            x1 = x0 + int(rng.integers(1, 5)) if k % 5 == 0 else int(rng.integers(x0 + 1, w + 1))
            y1 = int(rng.integers(y0 + 1, h + 1))
            pixels, x, y, rw, rh = decode._jpegcrop.decode_region(data, denom, x0, y0, x1, y1)
            assert x <= x0 and x + rw >= x1 and (y, rh) == (y0, y1 - y0) and rw >= min(32, w)
            region = np.frombuffer(pixels, np.uint8).reshape(rh, rw, 3)
            inner = slice(0 if x == 0 else 1, rw if x + rw == w else rw - 1)
            assert np.array_equal(region[:, inner], whole[y:y + rh, x:x + rw][:, inner]), (denom, x0, y0, x1, y1)


@needs_partial
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 640), (1000, 750), (2000, 1500)])
def test_partial_decoding_gives_the_views_of_the_whole_decoder(tmp_path, size):
    # Decoding only the region under the box changes which pixels are decoded, not the view: the
    # resampled crop is PIL's resampling of the whole decoded image, up to PIL's own rounding of its
    # filter weights for a box shifted by whole pixels (at most 2 levels; a mean well under 1).
    path = save_jpeg(tmp_path / "a.JPEG", textured(*size))
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        view = draw_view(*size, generator=gen)
        for draft in (True, False):
            got = render(open_image(path), view, draft=draft)
            want = render(open_image(path), view, draft=draft, partial=False)
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.5, (view, draft, diff.max(), diff.float().mean())


@pytest.mark.skipif(not os.environ.get("STUDY_REQUIRE_JPEGCROP"), reason="STUDY_REQUIRE_JPEGCROP not set")
def test_the_compiled_module_was_built_where_it_is_required():
    # CI sets STUDY_REQUIRE_JPEGCROP (.ci/run): there a build that failed silently (pip does not say)
    # would otherwise only skip the tests above.
    assert partial_decoding() is not None and partial_decoding().startswith("libjpeg-turbo")


@needs_partial
def test_partial_decoding_reports_corrupt_data_and_data_that_ends_too_soon(tmp_path):
    data = io.BytesIO()
    textured(400, 300).save(data, format="JPEG", quality=95)
    whole = data.getvalue()
    with pytest.raises(ValueError, match="(?i)premature end"):  # the rows wanted lie past the data's end
        decode._jpegcrop.decode_region(whole[: len(whole) // 2], 1, 0, 250, 100, 300)
    with pytest.raises(ValueError):
        decode._jpegcrop.decode_region(b"\xff\xd8 not a JPEG", 1, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="outside the image"):
        decode._jpegcrop.decode_region(whole, 1, 0, 0, 401, 10)
    # A region libjpeg-turbo cannot decode goes to PIL whole: the same view as PIL's, or PIL's error.
    cut_early = tmp_path / "early.JPEG"
    cut_early.write_bytes(whole[: len(whole) // 2])  # no end marker: PIL's whole decode
    with pytest.raises(DataError, match="cannot decode image .*early.JPEG"):
        CropFirst()(open_image(str(cut_early)))
    # A file cut short has no end-of-image marker: PIL decodes it whole and says it is truncated,
    # whichever crop was drawn (test_an_unreadable_or_truncated_file_is_a_data_error_naming_it). One
    # cut short and then closed with a marker passes as PIL passes it, grey below the cut.
    cut = tmp_path / "cut.JPEG"
    cut.write_bytes(whole[: len(whole) // 3] + b"\xff\xd9")
    torch.manual_seed(0)
    view = draw_view(400, 300)
    bottom = decode.View(400, 300, view.resized, view.resized[1] - 224, 0, 224, False)
    got = render(open_image(str(cut)), bottom)
    assert torch.equal(got, render(open_image(str(cut)), bottom, partial=False)) and got[:, -50:].float().std() < 1


def test_without_the_compiled_module_pil_decodes_the_whole_image(tmp_path, monkeypatch):
    path = save_jpeg(tmp_path / "a.JPEG", textured(500, 375))
    torch.manual_seed(0)
    view = draw_view(500, 375)
    want = render(open_image(path), view, partial=False)
    monkeypatch.setattr(decode, "_jpegcrop", None)
    assert partial_decoding() is None and "_jpegcrop module was not built" in imagenet.views_decoder("cpu")
    assert torch.equal(render(open_image(path), view), want)

    class Refusing:  # a libjpeg-turbo that cannot decode this file's region (say, arithmetic coding)
        @staticmethod
        def decode_region(*args):
            raise ValueError("Sorry, arithmetic code not supported")

    monkeypatch.setattr(decode, "_jpegcrop", Refusing)
    assert torch.equal(render(open_image(path), view), want)  # PIL decodes it whole


def odd_folder(root):
    """A small ImageFolder whose training split also holds a greyscale JPEG, a CMYK JPEG and a PNG
    named .JPEG (as ImageNet's does), and photo-sized colour JPEGs."""
    root = write_image_folder(root, per_class=(2, 1), size=(300, 260))
    cls = sorted(p for p in (root / "train").iterdir())[0]
    rgb = textured(330, 270, seed=5)
    save_jpeg(cls / "z_grey.JPEG", rgb.convert("L"))
    save_jpeg(cls / "z_cmyk.JPEG", rgb.convert("CMYK"))
    rgb.save(cls / "z_png.JPEG", format="PNG")
    return root


def epoch_images(data, workers: int, seed: int = 7, decoder=None):
    torch.manual_seed(seed)  # without workers the views are drawn from the global RNG
    loader = loaders_for(data, batch_size=4, workers=workers, seed=seed, pin_memory=False).train
    set_epoch(loader, 1)
    out = []
    for images, labels in loader:
        if decoder is not None:
            assert isinstance(images, EncodedBatch)
            images = decoder(images)
        out.append((images, labels))
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


def test_gpu_path_on_the_cpu_decoder_gives_the_cpu_paths_views(tmp_path):
    # The same images, labels and views as the CPU path, batch for batch; the pixels differ only by
    # the resampling filter (roi_align's averaged bilinear samples vs PIL's). Files the device
    # decoder does not take are rendered by the workers, and counted.
    root = odd_folder(tmp_path)
    cpu_x, cpu_y = epoch_images(open_imagenet(root), workers=2)
    decoder = BatchDecoder("cpu")
    gpu_x, gpu_y = epoch_images(open_imagenet(root, decode="gpu"), workers=2, decoder=decoder)
    assert torch.equal(cpu_y, gpu_y) and gpu_x.shape == cpu_x.shape == (len(cpu_y), 3, 224, 224)
    diff = (gpu_x.int() - cpu_x.int()).abs().float().mean(dim=(1, 2, 3))
    assert diff.max() < 3.0, diff
    assert decoder.images == len(cpu_y) == 9 and decoder.cpu_decoded == 3


def test_gpu_path_falls_back_to_the_cpu_for_a_jpeg_its_decoder_refuses(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path, per_class=(2, 1), size=(300, 260))
    data = open_imagenet(root, decode="gpu")
    whole = epoch_images(data, workers=0, decoder=BatchDecoder("cpu"))[0]
    decoder = BatchDecoder("cpu")
    real = decoder.decode
    refused = sorted(p for p in (root / "train").glob("*/*.JPEG"))[0].read_bytes()

    def picky(data, **kwargs):  # a device decoder that refuses one file, and so the batch holding it
        batch = data if isinstance(data, list) else [data]
        if any(t.numpy().tobytes() == refused for t in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(decoder, "decode", picky)
    again = epoch_images(data, workers=0, decoder=decoder)[0]
    assert decoder.cpu_decoded == 1
    assert (again.int() - whole.int()).abs().max() <= 1  # the same views, one of them via PIL's decoder


def test_gpu_path_reports_a_corrupt_file_by_name(tmp_path):
    root = write_image_folder(tmp_path, per_class=(2, 1), size=(300, 260))
    bad = sorted((root / "train").glob("*/*.JPEG"))[-1]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(DataError, match=f"cannot decode image .*{bad.name}"):
        epoch_images(open_imagenet(root, decode="gpu"), workers=0, decoder=BatchDecoder("cpu"))


def test_a_run_trains_with_the_gpu_paths_code_on_the_cpu(tmp_path):
    # The run's feed decodes through BatchDecoder (here the CPU decoder) and logs the count.
    root = odd_folder(tmp_path / "data")
    data = open_imagenet(root, decode="gpu")
    cfg = RunConfig("resnet", 18, dataset="imagenet", iterations=3, batch_size=4, mean="channel", lighting=0.0)
    lines = []
    run = Run(tmp_path / "runs", cfg)
    assert train_run(cfg, run, data, torch.device("cpu"), workers=1, log=lines.append, progress=False) == "done"
    assert any("of the 9 training images decoded so far" in line and "went through the CPU" in line for line in lines)
    metrics = run.read_metrics()
    assert set(metrics["split"]) == {"train", "val"} and metrics["error_pct"].notna().all()


@pytest.mark.parametrize("extra", [["--device", "cpu"], ["--device", "auto"]])
def test_decode_gpu_without_cuda_is_one_line_exit_2(tmp_path, capsys, extra):
    if torch.cuda.is_available() and "auto" in extra:
        pytest.skip("a GPU is visible: --device auto resolves to it")
    root = write_image_folder(tmp_path / "data", per_class=(1, 1))
    runs = tmp_path / "runs"
    args = ["run", "--arch", "resnet", "--depth", "18", "--dataset", "imagenet", "--iterations", "1",
            "--data-dir", str(root), "--runs-dir", str(runs), "--decode", "gpu", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode gpu" in err and "CUDA" in err
    assert not runs.exists() or list(runs.iterdir()) == []


def test_decode_is_for_imagenet_only(tmp_path, capsys):
    args = ["run", "--arch", "resnet", "--depth", "8", "--iterations", "1", "--decode", "gpu",
            "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    if torch.cuda.is_available():
        args += ["--device", "cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode applies only to ImageNet" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_gpu_path_on_a_gpu_matches_the_cpu_decoder(tmp_path):
    # nvJPEG against libjpeg on the same batches: the same views; pixels within decoder rounding.
    root = odd_folder(tmp_path)
    data = open_imagenet(root, decode="gpu")
    on_cpu = BatchDecoder("cpu")
    want, labels = epoch_images(data, workers=2, decoder=on_cpu)
    on_gpu = BatchDecoder("cuda")
    got, gpu_labels = epoch_images(data, workers=2, decoder=on_gpu)
    assert got.device.type == "cuda" and torch.equal(gpu_labels, labels)
    diff = (got.cpu().int() - want.int()).abs().float().mean(dim=(1, 2, 3))
    assert diff.max() < 1.5, diff
    assert on_gpu.cpu_decoded == on_cpu.cpu_decoded == 3
