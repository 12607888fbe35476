"""Beyond the paper (issue 31): the follow-ups' arms. What each arm is (a zero-init block is the
identity, a pre-activation block's structure and count, a delta-orthogonal kernel), that the paper's
nets are unchanged, how the arms are named and refused, how the runner treats them (resume, fused),
and the report's and figure's verdicts on synthetic runs with known answers."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

import study.models.cifar as cifar
from study.analysis.figures import build
from study.analysis.load import RunData
from study.analysis.report import gather
from study.cli import main
from study.config import RunConfig
from study.grids import grid_configs
from study.models import architecture_table, build_model, count_params
from study.runstore import Run

from helpers import TIMING_COLUMNS, train_run, train_steps_of
from test_analysis import write_run
from test_fused import CPU, cfg as fused_cfg, same_run, train_fused


# --- what each arm is -------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["original", "preact"])
def test_a_zero_init_block_that_keeps_its_width_is_the_identity(block):
    """At initialisation, in training mode (BN on the batch's statistics) as in eval mode: the
    original block gives ReLU(x), which is x for a non-negative x; the pre-activation block gives x."""
    torch.manual_seed(0)
    make = (lambda: cifar.BasicBlock(16, 16, residual=True)) if block == "original" else (lambda: cifar.PreActBlock(16, 16))
    blk = make()
    cifar.init_weights(blk)
    cifar.zero_init_residual(blk)
    x = torch.randn(8, 16, 10, 10)
    if block == "original":
        x = x.relu()
    for mode in (True, False):
        blk.train(mode)
        assert torch.equal(blk(x), x)
    he = make()
    cifar.init_weights(he)
    assert not torch.equal(he.train()(x), x)  # (the He-initialised block is not)


def test_a_zero_init_net_zeroes_exactly_the_last_layer_of_each_residual_branch_and_it_trains():
    """The original block's last BN scale, the pre-activation block's conv2 (its last layer: zeroing
    its BN instead would feed ReLU exactly 0 and no gradient would ever reach the branch). After one
    SGD step (which moves the zeroed layer and so lets the gradient through) every parameter of every
    branch has a gradient."""
    for arch, last in (("resnet", "bn2.weight"), ("preact", "conv2.weight")):
        torch.manual_seed(0)
        he = build_model(arch, 20)
        torch.manual_seed(0)
        zero = build_model(arch, 20, init="zero-residual")
        changed = {k for k, v in zero.state_dict().items() if not torch.equal(v, he.state_dict()[k])}
        assert changed == {f"stage{s}.{b}.{last}" for s in (1, 2, 3) for b in range(3)}
        assert all(zero.state_dict()[k].abs().sum() == 0 for k in changed)
        opt = torch.optim.SGD(zero.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(zero.train()(x), y).backward()
            if _ == 0:
                opt.step()
        # At the second step every branch parameter has a gradient (the first moved the zeroed layer).
        frozen = [k for k, v in zero.named_parameters() if k.startswith("stage") and not bool(v.grad.abs().sum() > 0)]
        assert frozen == [], frozen


def _preact_count(depth: int, in_channels: int = 3, classes: int = 10) -> int:
    """The pre-activation net's parameters, counted from its definition: 3x3 convs without bias, BN
    scale and shift before each conv of a block and once before the pooling, the FC layer."""
    n = (depth - 2) // 6
    total, width = 9 * in_channels * 16, 16
    for stage, planes in enumerate((16, 32, 64)):
        for b in range(n):
            total += 2 * width + 9 * width * planes + 2 * planes + 9 * planes * planes
            width = planes
    return total + 2 * 64 + 64 * classes + classes


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_a_preact_net_is_built_as_its_sequel_says(depth):
    net = build_model("preact", depth)
    assert [name for name, _ in net.named_children()] == ["conv1", "stage1", "stage2", "stage3", "bn", "fc"]
    block = net.stage2[0]
    assert [name for name, _ in block.named_children()] == ["bn1", "conv1", "bn2", "conv2", "shortcut"]
    assert (block.bn1.num_features, block.conv1.stride, block.bn2.num_features) == (16, (2, 2), 32)
    assert isinstance(block.shortcut, cifar.PadShortcut)  # option A: the identity path untouched
    assert count_params(net) == _preact_count(depth)
    # Nothing after a block's addition: its output is conv2's output plus the shortcut.
    x = torch.randn(2, 16, 8, 8)
    block = net.stage1[0].eval()
    inner = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
    torch.testing.assert_close(block(x), inner + x, rtol=0, atol=0)
    if depth == 20:  # `study models` lists it (a table of every arch: slow at the larger depths)
        rows = {(r["arch"], r["depth"]): r["params"] for r in architecture_table(depths=(depth,), imagenet_depths=())}
        assert rows[("preact", depth)] == _preact_count(depth)


def test_figure_7_responses_are_not_measured_for_the_preact_net():
    """Figure 7's response is a 3x3 layer's own BN output; a pre-activation block's BNs precede its
    convs, so the probe measures none there (the paper's nets keep all of theirs)."""
    from study.probes import conv3x3_bns

    assert conv3x3_bns(build_model("preact", 20)) == []
    assert len(conv3x3_bns(build_model("resnet", 20))) == 19


def test_a_delta_orthogonal_kernel_is_orthogonal_at_its_centre_and_zero_elsewhere():
    torch.manual_seed(0)
    net = build_model("plain", 20, init="delta-orthogonal")
    gain2 = 2.0  # ReLU's gain sqrt(2), squared
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19
    for conv in convs:
        w = conv.weight.detach()
        centre = w[:, :, 1, 1]
        rest = w.clone()
        rest[:, :, 1, 1] = 0
        assert torch.count_nonzero(rest) == 0
        out_ch, in_ch = centre.shape
        gram = centre @ centre.T if out_ch <= in_ch else centre.T @ centre
        torch.testing.assert_close(gram, gain2 * torch.eye(min(out_ch, in_ch)), atol=1e-5, rtol=0)


def test_the_papers_nets_are_unchanged():
    """`build_model` of the paper's nets is the paper's `CifarNet` with He initialisation, as built
    before the arms existed: the same parameters (counts and values) and forward output for a seed;
    their run ids carry no suffix."""
    x = torch.randn(4, 3, 32, 32)
    for arch in ("plain", "resnet"):
        torch.manual_seed(3)
        built = build_model(arch, 20)
        torch.manual_seed(3)
        direct = cifar.CifarNet(20, residual=arch == "resnet")
        assert count_params(built) == count_params(direct) == 269_722
        for (k, v), (k2, v2) in zip(built.state_dict().items(), direct.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
        assert torch.equal(built.eval()(x), direct.eval()(x))
        assert RunConfig(arch=arch, depth=56, dataset="cifar10").run_id == f"cifar10-{arch}56-A-s0"


# --- names, options, refusals -----------------------------------------------------------------


def test_arms_are_named_in_the_run_id_and_config():
    assert RunConfig(arch="preact", depth=56, dataset="cifar10").run_id == "cifar10-preact56-A-s0"
    assert RunConfig(arch="resnet", depth=56, dataset="cifar10", init="zero-residual").run_id == "cifar10-resnet56-A-s0-zeroinit"
    assert RunConfig(arch="plain", depth=56, dataset="cifar10", init="delta-orthogonal").run_id == "cifar10-plain56-A-s0-deltaorth"
    cfg = RunConfig(arch="resnet", depth=20, init="zero-residual")
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    runs = grid_configs("followups")
    assert len(runs) == 30 and {(c.arch, c.init) for c in runs} == {
        ("plain", "he"), ("resnet", "he"), ("preact", "he"), ("resnet", "zero-residual"), ("plain", "delta-orthogonal")}


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "plain", "--depth", "20", "--init", "zero-residual"], "which a plain net has none of"),
    (["--arch", "preact", "--depth", "18", "--dataset", "imagenet"], "--arch preact is built for the CIFAR-style nets only"),
    (["--arch", "resnet", "--depth", "34", "--dataset", "imagenet", "--init", "delta-orthogonal"], "for the CIFAR-style nets only"),
    (["--grid", "quick", "--init", "zero-residual"], "--init does not apply to --grid"),
    (["--arch", "preact", "--depth", "8", "--fuse", "2"], "--fuse groups the paper's blocks, not the pre-activation"),
])
def test_what_an_arm_cannot_do_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert main(["run", *argv, "--iterations", "2", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_an_arm_resumes_exactly(tmp_path, small_data):
    """A pre-activation run stopped after its first epoch's checkpoint and resumed equals the same
    run trained in one go (metrics, weights)."""
    c = RunConfig(arch="preact", depth=8, iterations=10, batch_size=64, init="zero-residual")
    whole = Run(tmp_path / "whole", c)
    assert train_run(c, whole, small_data, CPU, progress=False) == "done"
    part = Run(tmp_path / "part", c)
    steps = train_steps_of(c, part, small_data, CPU, progress=False, checkpoint_every=5)
    for _ in range(7):
        next(steps)
    steps.close()  # stopped at iteration 7, after iteration 5's checkpoint
    assert part.load_checkpoint()["iteration"] == 5
    assert train_run(c, part, small_data, CPU, progress=False) == "done"
    pd.testing.assert_frame_equal(whole.read_metrics().drop(columns=TIMING_COLUMNS),
                                  part.read_metrics().drop(columns=TIMING_COLUMNS))
    for k, v in whole.load_checkpoint()["model"].items():
        assert torch.equal(part.load_checkpoint()["model"][k], v), k


def test_initialisation_arms_fuse_and_equal_their_runs_alone(tmp_path, small_data64, float64):
    """--fuse links each member's own tensors into the group: a zero-init ResNet and a
    delta-orthogonal plain net fused with the paper's nets train as they do alone (float64, 1e-10)."""
    configs = [fused_cfg("resnet", 0, 6, batch_size=24, init="zero-residual"), fused_cfg("resnet", 1, 6, batch_size=24),
               fused_cfg("plain", 0, 6, batch_size=24, init="delta-orthogonal")]
    assert set(train_fused(configs, tmp_path / "fused", small_data64, slots=3).values()) == {"done"}
    for c in configs:
        alone = Run(tmp_path / "alone", c)
        train_run(c, alone, small_data64, CPU, progress=False, gradient_every=2)
        same_run(alone, Run(tmp_path / "fused", c), atol=1e-10)


# --- the report and the figure ----------------------------------------------------------------


def test_an_arm_and_its_reference_at_chance_cannot_be_judged(tmp_path):
    """Nets that have not learned (about 90% error for 10 classes) say nothing about an arm against
    the paper's net, whichever is a point "better": both of the arm's questions cannot be judged."""
    floors = {("plain", "he"): {20: 89.5, 56: 90.2}, ("plain", "delta-orthogonal"): {20: 89.0, 56: 89.6}}
    for (arch, init), by_depth in floors.items():
        for depth, floor in by_depth.items():
            for seed in (0, 1, 2):
                write_run(tmp_path, arch, depth, seed=seed, init=init, floor=(floor + 0.1 * seed, floor + 0.2 + 0.1 * seed))
    arms = gather(RunData.load(tmp_path), log=lambda line: None).arms
    assert [(f.verdict, f.significance) for f in arms] == [("cannot be judged", "")] * 2
    assert all("no net compared has learned" in f.evidence for f in arms)


def test_the_report_judges_each_arm_and_the_figure_draws_it(tmp_path):
    """Synthetic runs with known answers: the pre-activation ResNet improves with depth and beats
    ResNet-56; the delta-orthogonal plain net still degrades and does not beat plain-56."""
    floors = {("plain", "he"): {20: 10.0, 56: 14.0}, ("resnet", "he"): {20: 8.0, 56: 7.0},
              ("preact", "he"): {20: 7.5, 56: 5.0}, ("plain", "delta-orthogonal"): {20: 11.0, 56: 15.0}}
    for (arch, init), by_depth in floors.items():
        for depth, floor in by_depth.items():
            for seed in (0, 1, 2):
                write_run(tmp_path, arch, depth, seed=seed, init=init, floor=(floor + 0.1 * seed, floor + 1 + 0.1 * seed))
    content = gather(RunData.load(tmp_path), log=lambda line: None)
    findings = {f.text: (f.verdict, f.significance) for f in content.arms}
    assert findings == {
        # No, and significantly so: 4 and 1 points worse with seeds 0.1 apart.
        "plain-20 delta-orthogonal to plain-56 delta-orthogonal: does it improve with depth (no degradation)?": ("no", "significant"),
        "does plain-56 delta-orthogonal train better than the paper's plain-56?": ("no", "significant"),
        "PreAct-ResNet-20 to PreAct-ResNet-56: does it improve with depth (the residual gain kept)?": ("yes", "significant"),
        "does PreAct-ResNet-56 train better than the paper's ResNet-56?": ("yes", "significant"),
    }
    # The paper's claims, tables and figures are the paper's nets alone.
    assert {c.number: c.verdict for c in content.claims}[1] == "holds"
    table6 = next(t.table for t in content.tables if t.name == "table6")
    assert not any("PreAct" in str(v) or "delta" in str(v) for v in table6.shown.to_numpy().ravel())
    fig6 = next(f.drawn for f in content.figures if f.name == "fig6")
    assert not any("PreAct" in t.get_text() or "delta" in t.get_text()
                   for ax in fig6.figure.axes if ax.get_legend() for t in ax.get_legend().get_texts())
    drawn = build("arms", RunData.load(tmp_path))
    lines = [ln for ln in drawn.figure.axes[0].get_lines() if ln.get_linestyle() != "None"]
    assert len(lines) == 4  # one per net
    assert [t.get_text() for t in drawn.figure.axes[0].get_legend().get_texts()] == [
        "plain", "plain delta-orthogonal", "PreAct-ResNet", "ResNet"]
    by_label = dict(zip([t.get_text() for t in drawn.figure.axes[0].get_legend().get_texts()], lines))
    preact = by_label["PreAct-ResNet"]
    assert list(preact.get_xdata()) == [20, 56] and preact.get_ydata()[1] < preact.get_ydata()[0]
    out = tmp_path / "report.md"
    assert main(["report", "--runs-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Beyond the paper: the follow-ups' arms" in text and "(`study plot arms`)" in text
    assert main(["report", "--runs-dir", str(tmp_path), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    assert 'id="arm-1"' in (tmp_path / "r.html").read_text()


def test_the_figures_name_unprobed_runs_but_not_the_pre_activation_nets_which_have_no_responses(tmp_path):
    """`study probe` records no responses for a pre-activation net (its BNs precede its convs): Figure 7
    and the arms figure must not tell the user to probe it, but still name a run that was never probed."""
    from test_analysis import write_responses

    runs = {}
    for arch, init in (("plain", "he"), ("resnet", "he"), ("preact", "he"), ("resnet", "zero-residual")):
        for depth in (20, 56):
            runs[(arch, init, depth)] = write_run(tmp_path, arch, depth, init=init, floor=(8.0, 9.0))
    for (arch, init, depth), run in runs.items():
        if arch == "preact":
            write_responses(run, [])  # what the probe writes for a pre-activation net
        elif (arch, depth) != ("plain", 20) and init == "he":  # plain-20 and the zero-init nets: never probed
            write_responses(run, [1.0, 0.8, 0.6])
    data = RunData.load(tmp_path)
    fig7 = build("fig7", data)
    assert [n for n in fig7.notes if "not probed" in n] == [
        f"finished but not probed (run `study probe`): {runs[('plain', 'he', 20)].cfg.run_id}"]
    arms = build("arms", data)
    assert arms.figure.axes[2].get_yscale() == "linear" and "log scale" not in arms.caption  # responses 0.6 to 1
    assert any(n.startswith("no layer responses for PreAct-ResNet:") for n in arms.notes), arms.notes
    # At the deepest depth, the zero-init ResNet-56 is the one arm run the user can still probe.
    assert [n for n in arms.notes if "not probed" in n] == [
        f"finished but not probed (run `study probe`): {runs[('resnet', 'zero-residual', 56)].cfg.run_id}"]
    # Nothing probed at the deepest depth: no response panel, and still both notes.
    bare = tmp_path / "bare"
    for arch in ("plain", "preact"):
        for depth in (20, 56):
            write_run(bare, arch, depth, floor=(8.0, 9.0))
    arms = build("arms", RunData.load(bare))
    assert len(arms.figure.axes) == 2
    assert any(n.startswith("no layer responses for PreAct-ResNet:") for n in arms.notes), arms.notes
    assert [n for n in arms.notes if "not probed" in n] == ["finished but not probed (run `study probe`): "
                                                            "fashion-mnist-mini-plain56-A-s0-it400"]


def test_the_arms_response_panel_is_drawn_on_a_log_scale_where_one_arm_dwarfs_the_others(tmp_path):
    """A delta-orthogonal plain-56's first layers respond with a std of tens after BN, the other nets' about 1:
    on a linear axis every other line would lie flat on the floor; the panel and its caption go log."""
    from test_analysis import write_responses

    for arch, init, stds in (("plain", "he", [4.7, 2.0, 1.0]), ("plain", "delta-orthogonal", [48.3, 9.0, 1.1]),
                             ("resnet", "he", [1.0, 0.9, 0.8])):
        for depth in (20, 56):
            run = write_run(tmp_path, arch, depth, init=init, floor=(8.0, 9.0))
            write_responses(run, stds)
    arms = build("arms", RunData.load(tmp_path))
    panel = arms.figure.axes[2]
    assert panel.get_yscale() == "log" and panel.get_ylabel() == "std (log scale)"
    assert "on a log scale (they span more than a factor of 10)" in arms.caption
    drawn = sorted(max(line.get_ydata()) for line in panel.get_lines())
    assert drawn == [1.0, 4.7, 48.3]  # every net's responses, as measured


def test_the_arms_response_panel_reads_one_probe_setting_and_names_runs_probed_too_early(tmp_path):
    """The arms panel reads responses as Figure 7 does: a run probed per channel beside runs probed over the
    whole tensor is left out and named, so its numbers cannot decide the scale; a run probed with BN in eval
    mode before its statistics settled is named with the fix. A zero among the means does not turn the log
    scale off."""
    from test_analysis import write_responses

    runs = {}
    for arch, init, stds in (("plain", "he", [4.7, 2.0, 1.0]), ("plain", "delta-orthogonal", [48.3, 9.0, 0.0]),
                             ("resnet", "he", [1.0, 0.9, 0.8])):
        for depth in (20, 56):
            runs[(arch, init, depth)] = run = write_run(tmp_path, arch, depth, init=init, floor=(8.0, 9.0))
            write_responses(run, stds)
    odd = runs[("resnet", "he", 56)]
    write_responses(odd, [900.0, 0.001, 1.0], reduction="channel")  # another setting: not comparable
    arms = build("arms", RunData.load(tmp_path))
    panel = arms.figure.axes[2]
    assert panel.get_yscale() == "log"
    assert sorted(max(line.get_ydata()) for line in panel.get_lines()) == [4.7, 48.3]  # the odd run left out
    assert any(odd.cfg.run_id in n for n in arms.notes), arms.notes
    early = tmp_path / "early"
    for arch in ("plain", "preact"):
        for depth in (20, 56):
            run = write_run(early, arch, depth, iterations=60, floor=(8.0, 9.0))
            if arch == "plain":
                write_responses(run, [1.0, 0.9, 0.8])
    arms = build("arms", RunData.load(early))
    assert any("measured with BN in eval mode after fewer than 100 iterations" in n
               and "fashion-mnist-mini-plain56-A-s0-it60" in n for n in arms.notes), arms.notes
