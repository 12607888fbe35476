"""The ImageNet part: Table-1 nets (counts, MACs, torchvision equivalence) and the ImageFolder data
path (real loader on a tiny generated ImageFolder, the paper's augmentation, 10-crop, errors)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from study.data import DataError
from study.data.imagenet import (
    IMAGENET_MEAN,
    Lighting,
    evaluate,
    make_loaders,
    make_ten_crop_loader,
    load_image,
    normalize,
    pixel_mean,
    set_epoch,
    ten_crop_error,
    train_transform,
    val_transform,
)
from study.models import architecture_table, build_model, count_params, from_torchvision

# PROTOCOL.md: plain = option A, and option B (= torchvision's resnet18/resnet34).
PARAMS = {18: (11_515_688, 11_689_512), 34: (21_623_848, 21_797_672)}
MACS = {18: 1.8e9, 34: 3.6e9}  # paper Table 1, multiply-adds per 224x224 image

COLOURS = {"cls_blue": (20, 30, 220), "cls_green": (30, 210, 40), "cls_red": (230, 25, 20)}
CHANNEL = {"cls_blue": 2, "cls_green": 1, "cls_red": 0}  # the dominant channel of each class


def imagenet(arch, depth, shortcut="A", **kw):
    return build_model(arch, depth, shortcut=shortcut, dataset="imagenet", **kw)


# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_parameter_counts_match_paper(depth):
    plain_a, resnet_b = PARAMS[depth]
    with torch.device("meta"):  # counting needs shapes only
        assert count_params(imagenet("plain", depth)) == plain_a
        assert count_params(imagenet("resnet", depth, "A")) == plain_a
        assert count_params(imagenet("resnet", depth, "B")) == resnet_b
        assert count_params(imagenet("resnet", depth, "C")) > resnet_b


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_plain_and_option_a_have_same_state_dict_layout(depth):
    with torch.device("meta"):
        plain = imagenet("plain", depth).state_dict()
        resnet = imagenet("resnet", depth).state_dict()
    assert list(plain) == list(resnet)
    assert all(plain[k].shape == resnet[k].shape for k in plain)


def test_plain_and_option_a_twins_start_from_identical_weights():
    torch.manual_seed(3)
    plain = imagenet("plain", 18).state_dict()
    torch.manual_seed(3)
    resnet = imagenet("resnet", 18).state_dict()
    assert all(torch.equal(plain[k], resnet[k]) for k in plain)


def test_a_net_on_the_meta_device_draws_no_initial_values_and_has_the_cpu_nets_counts(monkeypatch):
    """`study models` counts the ImageNet nets on the meta device: their He initialisation is skipped there
    (each draw on meta costs milliseconds of Python for no value), and their shapes are the CPU net's."""
    draws = []
    real = torch.nn.init.kaiming_normal_
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", lambda *a, **k: draws.append(1) or real(*a, **k))
    with torch.device("meta"):
        meta = imagenet("resnet", 18, "B")
    assert draws == [] and all(p.is_meta for p in meta.parameters())
    cpu = imagenet("resnet", 18, "B")
    assert len(draws) == sum(isinstance(m, torch.nn.Conv2d) for m in cpu.modules())  # He init on the CPU
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in cpu.state_dict().items()}
    assert count_params(meta) == count_params(cpu)


def test_table_lists_imagenet_nets_with_paper_params_and_macs():
    rows = architecture_table(depths=(), imagenet_depths=(18, 34))
    by_key = {(r["arch"], r["depth"], r["shortcut"]): r for r in rows}
    assert len(rows) == 8 and {r["dataset"] for r in rows} == {"imagenet"}
    for depth, (plain_a, resnet_b) in PARAMS.items():
        assert by_key[("plain", depth, "A")]["params"] == by_key[("resnet", depth, "A")]["params"] == plain_a
        assert by_key[("resnet", depth, "B")]["params"] == resnet_b
        for arch, shortcut in (("plain", "A"), ("resnet", "A"), ("resnet", "B")):
            assert by_key[(arch, depth, shortcut)]["macs"] == pytest.approx(MACS[depth], rel=0.05)
        # Option A's shortcuts are free, so the plain net and its twin do the same work.
        assert by_key[("plain", depth, "A")]["macs"] == by_key[("resnet", depth, "A")]["macs"]


@pytest.mark.parametrize("depth,tv_builder", [(18, torchvision.models.resnet18), (34, torchvision.models.resnet34)])
def test_torchvision_weights_load_and_give_the_same_outputs(depth, tv_builder):
    torch.manual_seed(0)
    tv = tv_builder(weights=None)
    # Non-trivial BN statistics, so that a mis-mapped running_mean/var would show in eval mode.
    state = tv.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    tv.eval()
    ours = imagenet("resnet", depth, "B").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, before = tv(x), ours(x)
        ours.load_state_dict(from_torchvision(state))  # strict: every key maps, none is left over
        got = ours(x)
    assert got.shape == (1, 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Before loading, its own random weights disagree: the comparison has teeth.
    assert not torch.allclose(before, expected, atol=1e-3)


def test_forward_at_224_any_classes_and_bad_depth():
    torch.manual_seed(0)
    model = imagenet("plain", 18, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 7)
    assert imagenet("resnet", 18).fc.out_features == 1000  # ImageNet's default
    with pytest.raises(ValueError, match="18, 34"):
        imagenet("resnet", 20)


# --- data: a tiny generated ImageFolder ----------------------------------------------------------


def write_image_folder(root, per_class=(6, 3), size=(72, 54)):
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, each class one noisy dominant colour."""
    gen = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                w, h = size if i % 2 == 0 else size[::-1]  # landscape and portrait
                noise = torch.randint(-15, 16, (h, w, 3), generator=gen)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


def dominant_channel(images_u8):
    return images_u8.float().mean(dim=(-2, -1)).argmax(-1)


def test_real_loader_gives_crops_and_right_labels(folder):
    loaders = make_loaders(folder, batch_size=4, workers=1, seed=0, pin_memory=False)
    assert loaders.classes == sorted(COLOURS)
    set_epoch(loaders.train, 0)
    batches = list(loaders.train)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert [len(y) for _, y in batches] == [4, 4, 4, 4, 2]  # one pass over 18 images, last batch kept
    assert images.shape == (18, 3, 224, 224) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    expected = torch.tensor([CHANNEL[loaders.classes[i]] for i in labels])
    assert torch.equal(dominant_channel(images), expected)

    val_images, val_labels = next(iter(loaders.val))
    assert val_images.shape == (4, 3, 224, 224) and val_labels.tolist() == [0, 0, 0, 1]  # in order


def test_epoch_order_is_reproducible_and_changes_between_epochs(folder):
    loader = make_loaders(folder, batch_size=6, workers=1, seed=5, pin_memory=False).train

    def epoch(e):
        set_epoch(loader, e)
        return [(x, y) for x, y in loader]

    first, again, second = epoch(1), epoch(1), epoch(2)
    # The same epoch gives the same images and the same random crops (a resumed run sees them too)...
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    # ...and another epoch another order.
    assert torch.cat([y for _, y in first]).tolist() != torch.cat([y for _, y in second]).tolist()


def test_training_augmentation_honours_the_scale_range_and_flips():
    """A horizontal ramp's slope in the crop reveals the scale the shorter side was resized to."""
    h, w = 300, 400
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8).expand(h, w)
    image = Image.fromarray(ramp[..., None].expand(h, w, 3).contiguous().numpy())
    transform = train_transform()
    torch.manual_seed(0)
    shorter_sides, flips = [], 0
    for _ in range(80):
        crop = transform(image)
        assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
        row = crop[0].float().mean(0)  # (224,) the ramp across the crop
        slope = (row[-10:].mean() - row[:10].mean()) / (224 - 10)
        flips += bool(slope < 0)
        # Resized width = 255 / |slope|, and shorter side = that * h / w.
        shorter_sides.append((255 / slope.abs() * h / w).item())
    assert min(shorter_sides) > 256 * 0.97 and max(shorter_sides) < 480 * 1.03
    assert min(shorter_sides) < 300 and max(shorter_sides) > 430  # the whole range is drawn
    assert 20 < flips < 60


def test_normalize_subtracts_the_channel_mean_without_std_division():
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    x = normalize(red)
    expected = torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)
    torch.testing.assert_close(x[0, :, 2, 2], expected)


def test_pixel_mean_is_the_mean_centre_crop_of_the_training_set_and_is_cached(folder, tmp_path, monkeypatch):
    """The paper's per-pixel mean: the average 224x224 centre crop (shorter side 256) of every
    training image, computed once into the runs dir, read back after, recomputed if unreadable."""
    import study.data.imagenet as imagenet_module

    train = sorted((folder / "train").rglob("*.JPEG"))
    crops = torch.stack([val_transform()(load_image(str(p))) for p in train])
    expected = (crops.double().mean(0) / 255).float()
    logs: list[str] = []
    mean = pixel_mean(folder, tmp_path, workers=0, log=logs.append)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
    assert len(logs) == 1 and f"the {len(train)} images" in logs[0]
    spread = mean - mean.mean(dim=(1, 2), keepdim=True)
    assert spread.abs().max() > 1e-3  # a mean image, not one value per channel
    # Subtracted as it is, pixel by pixel.
    x = normalize(crops[:2], mean=mean)
    torch.testing.assert_close(x, crops[:2].float() / 255 - mean)

    # Cached: a second call does not read the images.
    def no_scan(*args, **kwargs):
        raise AssertionError("scanned the folder again")

    monkeypatch.setattr(imagenet_module, "image_folder", no_scan)
    assert torch.equal(pixel_mean(folder, tmp_path, workers=0, log=logs.append), mean) and len(logs) == 1
    monkeypatch.undo()
    # An unreadable cache is computed again, and says so.
    (cache,) = tmp_path.glob(".imagenet-pixel-mean-*.pt")
    cache.write_bytes(b"not a torch file")
    assert torch.equal(pixel_mean(folder, tmp_path, workers=0, log=logs.append), mean)
    assert "unreadable" in logs[1] and "computing" in logs[2]
    # A run passes the scanned folder: the same number of images reads the cache back; a cache
    # made from another number (the folder has changed since) is an error naming the fix, not
    # silently replaced (runs trained with it would change their mean); deleted, it is recomputed.
    from study.data.imagenet import image_folder

    def scanned_mean():
        return pixel_mean(folder, tmp_path, workers=0, log=logs.append, train=image_folder(folder, "train", None))

    assert torch.equal(scanned_mean(), mean) and len(logs) == 3
    extra = folder / "train" / train[0].parent.name / "extra.JPEG"
    shutil.copy(train[-1], extra)
    try:
        with pytest.raises(DataError, match=f"made from {len(train)} training images of .*, which now has "
                                            f"{len(train) + 1}; if the data set changed on purpose, delete"):
            scanned_mean()
        assert torch.load(cache, weights_only=True)["images"] == len(train)  # untouched
        cache.unlink()
        changed = scanned_mean()
    finally:
        extra.unlink()
    expected = (crops.double().sum(0) + crops[-1].double()) / (len(train) + 1) / 255
    torch.testing.assert_close(changed, expected.float(), rtol=0, atol=1e-6)
    assert torch.load(cache, weights_only=True)["images"] == len(train) + 1


def test_processes_that_need_the_pixel_mean_at_once_make_one_pass(folder, tmp_path):
    """`--concurrency` workers or SLURM tasks starting together: the first makes the pass, the
    others wait for it (an flock on the runs dir) and read its result."""
    import threading

    logs: list[str] = []
    means: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: means.append(pixel_mean(folder, tmp_path, log=logs.append)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(means) == 3 and all(torch.equal(m, means[0]) for m in means)
    assert sum("computing" in line for line in logs) == 1, logs
    assert [p.name.startswith(".imagenet-pixel-mean-") for p in tmp_path.iterdir()] == [True]  # no lock file


def _sharded_pixel_mean(rank, world, port, folder, cache_dir, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(pixel_mean(folder, cache_dir, distributed=True, log=lambda m: None), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_process_averages_its_share_into_the_same_mean(folder, tmp_path):
    """Two gloo processes each read half the training images; both get the single-process mean,
    and rank 0 alone writes the cache."""
    from test_distributed import free_port

    alone = pixel_mean(folder, tmp_path / "alone", workers=0, log=lambda m: None)
    (tmp_path / "ddp").mkdir()
    torch.multiprocessing.spawn(_sharded_pixel_mean, args=(2, free_port(), folder, tmp_path / "ddp", tmp_path),
                                nprocs=2)
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), alone, rtol=0, atol=1e-7)
    assert len(list((tmp_path / "ddp").glob(".imagenet-pixel-mean-*.pt"))) == 1


def test_a_process_exits_while_loader_workers_are_still_alive(folder):
    """Workers ignore SIGTERM, so an iterator still alive at exit (kept by a stored exception's
    traceback, say) used to hang the process for ever in multiprocessing's exit handler."""
    import subprocess
    import sys

    code = (f"from study.data.imagenet import make_loaders, set_epoch\n"
            f"loaders = make_loaders({str(folder)!r}, batch_size=2, workers=1, pin_memory=False)\n"
            "set_epoch(loaders.train, 0)\nKEEP = iter(loaders.train)\nnext(KEEP)\n")
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


@pytest.mark.slow
def test_workers_obey_sigterm_once_their_process_exits(folder):
    """Even when the exit hook cannot reach the iterator, the workers obey the SIGTERM that
    multiprocessing sends at exit (the hook has told them the process is exiting)."""
    import subprocess
    import sys

    code = (f"from study.data.imagenet import make_loaders, set_epoch\n"
            f"loaders = make_loaders({str(folder)!r}, batch_size=2, workers=1, pin_memory=False)\n"
            "set_epoch(loaders.train, 0)\nKEEP = iter(loaders.train)\nnext(KEEP)\n"
            "import study.data.imagenet as m\nm._LIVE_ITERATORS.clear()\n")
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


def test_lighting_shifts_each_image_by_one_colour():
    images = torch.rand(4, 3, 8, 8)
    assert torch.equal(Lighting(0.0)(images), images)
    out = Lighting(0.1)(images, torch.Generator().manual_seed(0))
    shift = out - images
    # One RGB offset per image, the same at every pixel...
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    # ...drawn independently per image, and reproducible from the generator.
    assert not torch.allclose(shift[0, :, 0, 0], shift[1, :, 0, 0])
    torch.testing.assert_close(Lighting(0.1)(images, torch.Generator().manual_seed(0)), out)


class ColourModel(nn.Module):
    """Class scores = channel means: a classifier that is right on the generated folder."""

    def forward(self, x):
        return x.mean(dim=(2, 3))[:, [2, 1, 0]] * 10  # classes sorted: blue, green, red


class AlwaysBlue(nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(x.shape[0], 3)


def test_ten_crop_evaluation(folder):
    loader = make_ten_crop_loader(folder, batch_size=5, workers=0, pin_memory=False)
    crops, labels = next(iter(loader))
    assert crops.shape == (5, 10, 3, 224, 224)
    # Crops 5-8 (the corners of the mirrored image) are mirror images of corners 0-3. (The centre
    # crops can be a pixel apart when the width's margin is odd, so they are not compared.)
    assert torch.equal(crops[:, 5:9], crops[:, [1, 0, 3, 2]].flip(-1))
    assert not torch.equal(crops[:, 0], crops[:, 1])
    result = ten_crop_error(ColourModel(), loader, "cpu")
    assert result.top1 == 0.0 and result.top5 == 0.0 and result.loss < 1.0
    # A classifier that always answers "blue" is wrong on the 6 green and red images of 9.
    always_blue = ten_crop_error(AlwaysBlue(), loader, "cpu")
    assert always_blue.top1 == pytest.approx(100 * 6 / 9)
    # The centre-crop loader is not a 10-crop loader.
    with pytest.raises(ValueError, match="10 crops"):
        ten_crop_error(ColourModel(), make_loaders(folder, 4, 0, pin_memory=False).val, "cpu")
    centre = evaluate(ColourModel(), make_loaders(folder, 4, 0, pin_memory=False).val, "cpu")
    assert centre.top1 == 0.0


def test_a_real_net_trains_a_step_on_loader_output(folder):
    """The loader, normalize, lighting and an ImageNet net fit together."""
    torch.manual_seed(0)
    loaders = make_loaders(folder, batch_size=2, workers=0, pin_memory=False)
    set_epoch(loaders.train, 0)
    images, labels = next(iter(loaders.train))
    model = imagenet("resnet", 18, num_classes=len(loaders.classes))
    x = normalize(images, lighting=Lighting(0.1))
    loss = nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad.abs().sum() > 0


# --- data: what goes wrong -----------------------------------------------------------------------


def test_missing_or_malformed_folders_are_data_errors(tmp_path, folder):
    with pytest.raises(DataError, match="--data-dir"):
        make_loaders(tmp_path / "nowhere", 4, 0)
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val/ not found"):
        make_loaders(tmp_path / "only_train", 4, 0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match="one folder of JPEGs per class"):
        make_loaders(tmp_path / "empty", 4, 0)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match=r"ImageNet root .*a-file is a file, not a folder; pass --data-dir"):
        make_loaders(tmp_path / "a-file", 4, 0)
    # One class folder without images among good ones: named, with its fix (not "put one folder per class").
    root = write_image_folder(tmp_path / "one-empty", per_class=(1, 1))
    (root / "train" / "cls_void").mkdir()
    with pytest.raises(DataError) as err:
        make_loaders(root, 4, 0)
    assert str(err.value) == (f"{root / 'train'}/ has class folders with no image (cls_void); put that class's JPEGs "
                              "in them, or delete them from train/ and val/ alike")


def test_mismatched_classes_and_corrupt_images_are_data_errors(tmp_path):
    root = write_image_folder(tmp_path / "mismatch", per_class=(1, 1))
    (root / "val" / "cls_red").rename(root / "val" / "cls_rouge")
    with pytest.raises(DataError, match="same class folders"):
        make_loaders(root, 4, 0)
    root = write_image_folder(tmp_path / "corrupt", per_class=(1, 1))
    (root / "train" / "cls_blue" / "cls_blue_0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cls_blue_0.JPEG.*replace or delete") as err:
        make_loaders(root, 4, 0)
    assert "\n" not in str(err.value)


def test_an_unreadable_val_image_met_by_a_worker_is_one_line_in_either_evaluation(tmp_path):
    from test_imagenet_run import no_worker_left_behind

    root = write_image_folder(tmp_path / "data", per_class=(1, 2))
    # Not the first file: the up-front check decodes each split's first file.
    bad = sorted((root / "val").glob("*/*.JPEG"))[-1]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    centre = make_loaders(root, 2, 1, pin_memory=False).val
    ten = make_ten_crop_loader(root, 2, 1, pin_memory=False)
    for score, loader in ((evaluate, centre), (ten_crop_error, ten)):
        with no_worker_left_behind(), pytest.raises(DataError) as err:
            score(model, loader, "cpu")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"cannot decode image {bad}"), message
        assert message.endswith("replace or delete that file")


def test_distributed_needs_an_initialised_process_group(folder):
    with pytest.raises(ValueError, match="torchrun"):
        make_loaders(folder, 4, 0, distributed=True)
