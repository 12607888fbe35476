"""The CIFAR networks match the paper: parameter counts, MACs, plain/residual twins, wired shortcuts."""

import pytest
import torch

from study.models import BasicBlock, architecture_table, build_model, count_macs, count_params

# PROTOCOL.md: exact parameter counts, BN affine parameters included.
PARAMS = {
    20: (269_722, 272_474),
    32: (464_154, 466_906),
    44: (658_586, 661_338),
    56: (853_018, 855_770),
    110: (1_727_962, 1_730_714),
    1202: (19_421_274, 19_424_026),
}
# PROTOCOL.md: forward multiply-accumulates per 32x32 image, in millions (two decimals as printed there).
MACS_M = {20: 40.55, 32: 68.86, 44: 97.17, 56: 125.5, 110: 252.9}


def model(arch, depth, shortcut="A", **kw):
    return build_model(arch, depth, shortcut=shortcut, **kw)


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_parameter_counts_match_paper(depth):
    plain_a, resnet_b = PARAMS[depth]
    assert count_params(model("plain", depth)) == plain_a
    assert count_params(model("resnet", depth, "A")) == plain_a
    assert count_params(model("resnet", depth, "B")) == resnet_b


@pytest.mark.parametrize("depth", sorted(MACS_M))
def test_macs_match_paper(depth):
    macs = count_macs(model("resnet", depth), (3, 32, 32))
    assert macs == count_macs(model("plain", depth), (3, 32, 32))
    assert round(macs / 1e6, 2 if depth < 56 else 1) == MACS_M[depth]


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_plain_and_option_a_twins_have_same_state_dict_layout(depth):
    plain = model("plain", depth).state_dict()
    resnet = model("resnet", depth).state_dict()
    assert list(plain) == list(resnet)
    assert all(plain[k].shape == resnet[k].shape for k in plain)


@pytest.mark.parametrize("depth", [20, 56])
def test_same_seed_gives_identical_initial_weights(depth):
    torch.manual_seed(7)
    plain = build_model("plain", depth).state_dict()
    torch.manual_seed(7)
    resnet = build_model("resnet", depth).state_dict()
    torch.manual_seed(7)
    again = build_model("plain", depth).state_dict()
    torch.manual_seed(8)
    other = build_model("plain", depth).state_dict()
    for k in plain:
        assert torch.equal(plain[k], resnet[k]), k
        assert torch.equal(plain[k], again[k]), k
    assert not torch.equal(plain["conv1.weight"], other["conv1.weight"])


@pytest.mark.parametrize(
    "in_planes,planes,stride,shortcut",
    [(16, 16, 1, "A"), (16, 32, 2, "A"), (16, 32, 2, "B"), (16, 16, 1, "B"), (16, 16, 1, "C"), (16, 32, 2, "C")],
)
def test_zeroed_residual_branch_makes_block_the_shortcut(in_planes, planes, stride, shortcut):
    """With the residual branch's last BN zeroed the block outputs relu(shortcut(x)): the shortcut
    is really wired (and option A sub-samples and zero-pads)."""
    torch.manual_seed(0)
    block = BasicBlock(in_planes, planes, stride, residual=True, shortcut=shortcut).eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(2, in_planes, 8, 8)
        out = block(x)
    if shortcut == "A" or (shortcut == "B" and stride == 1):
        expected = x[:, :, ::stride, ::stride]
        expected = torch.cat([expected, torch.zeros(2, planes - in_planes, *expected.shape[2:])], 1)
        assert torch.equal(out, torch.relu(expected))
    else:
        assert torch.allclose(out, torch.relu(block.shortcut(x)))
    # ...while the same block without its residual switch outputs exactly zero.
    plain = BasicBlock(in_planes, planes, stride, residual=False).eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("shortcut")})
    with torch.no_grad():
        assert torch.count_nonzero(plain(x)) == 0


def test_any_channels_and_classes():
    model = build_model("resnet", 8, in_channels=1, num_classes=7)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("depth", [0, 7, 19, 21, -4])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("plain", depth)


def test_architecture_table_lists_every_architecture():
    rows = architecture_table(depths=(20, 56))
    assert {(r["arch"], r["shortcut"]) for r in rows} == {("plain", "A"), ("resnet", "A"), ("resnet", "B"), ("resnet", "C"),
                                                          ("preact", "A")}  # (beyond the paper, CIFAR-style only)
    assert {r["arch"] for r in rows if r["dataset"] == "imagenet"} == {"plain", "resnet"}
    by_key = {(r["arch"], r["depth"], r["shortcut"]): r for r in rows}
    for depth in (20, 56):
        plain_a, resnet_b = PARAMS[depth]
        assert by_key[("plain", depth, "A")]["params"] == plain_a
        assert by_key[("resnet", depth, "B")]["params"] == resnet_b
        assert by_key[("resnet", depth, "C")]["params"] > resnet_b


def test_the_models_table_lists_every_depth_a_named_grid_trains():
    """`study models` (its default depths) covers the nets of every CIFAR-style grid, 8 layers included."""
    import inspect

    from study.grids import GRIDS

    listed = inspect.signature(architecture_table).parameters["depths"].default
    trained = {cfg.depth for grid in GRIDS.values() for cfg in grid.configs if cfg.dataset != "imagenet"}
    assert trained <= set(listed), sorted(trained - set(listed))
