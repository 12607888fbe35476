"""The published evidence in results/: the committed runs say what the README says they say."""

import json
import re
from pathlib import Path

import pytest

import study
from study.analysis.load import RunData
from study.analysis.report import classify_claims, judge_study_arms
from study.analysis.tables import final_errors
from study.runstore import cpu_label
from study.grids import grid_configs

ROOT = Path(__file__).resolve().parents[1]
#: Each published study, and the page whose verdict table states its verdicts.
STUDIES = {"quick": ROOT / "README.md", "laptop": ROOT / "docs" / "laptop-study.md",
           "followups": ROOT / "results" / "followups" / "README.md"}


def stated_verdicts(study_name: str, page: Path | None = None) -> dict[str, str]:
    """The verdict table a page states for a published study: {row key: verdict}, between its markers."""
    return {key: verdicts[-1] for key, verdicts in stated_columns(study_name, page).items()}


def stated_columns(study_name: str, page: Path | None = None) -> dict[str, list[str]]:
    """Each row of a page's verdict table for a study (between its markers): {row key: its verdicts,
    one per column}."""
    text = (page or STUDIES[study_name]).read_text()
    block = text.split(f"<!-- {study_name}-verdicts -->")[1].split(f"<!-- /{study_name}-verdicts -->")[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\|\s*(claim \d|twin)\b", line)
        if m:
            rows[m[1]] = re.findall(r"\*\*(holds|does not hold|cannot be judged)\*\*", line)
    return rows


def twin_verdict(metrics) -> str:
    """The fix at equal depth: the deeper ResNet's mean final training error below its plain twin's."""
    finals = final_errors(metrics).groupby(["arch", "depth"])["train"].mean()
    deep = int(metrics["depth"].max())
    return "holds" if finals[("resnet", deep)] < finals[("plain", deep)] else "does not hold"


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_the_published_results_give_the_verdicts_their_page_states(name):
    results = ROOT / "results" / name
    if not results.is_dir():
        pytest.skip(f"results/{name}/ is not in this checkout")
    metrics = study.load_runs(results)
    # They are the grid of that name, as `study run --grid NAME` trains it today.
    assert set(metrics["run_id"]) == {cfg.run_id for cfg in grid_configs(name)}
    assert set(metrics["seed"]) >= {0, 1, 2}  # at least 3 seeds of every net
    assert metrics.groupby(["arch", "depth"])["seed"].nunique().min() >= 3
    stated = stated_verdicts(name)
    assert set(stated) == {"claim 1", "claim 3", "twin"}, stated

    verdicts = {f"claim {c.number}": c.verdict for c in classify_claims(RunData.load(results))}
    assert verdicts["claim 1"] == stated["claim 1"]
    assert verdicts["claim 3"] == stated["claim 3"]
    assert twin_verdict(metrics) == stated["twin"]


def test_the_bf16_check_gives_the_verdicts_its_page_states():
    """results/paper-depths-bf16-check: the four nets at 4k in fp32 and in bf16; its page states each
    verdict in both, and the runs of each precision give them."""
    name = "paper-depths-bf16-check"
    results = ROOT / "results" / name
    if not results.is_dir():
        pytest.skip(f"results/{name}/ is not in this checkout")
    metrics = study.load_runs(results)
    if set(metrics["run_id"]) != {cfg.run_id for cfg in grid_configs(name)}:
        pytest.skip(f"results/{name}/ is still training")
    stated = stated_columns(name, results / "README.md")
    assert set(stated) == {"claim 1", "claim 3", "twin"} and all(len(v) == 2 for v in stated.values()), stated
    data = RunData.load(results)
    for column, variant in enumerate(("", "bf16")):
        verdicts = {f"claim {c.number}": c.verdict for c in classify_claims(data, variant=variant)}
        assert verdicts["claim 1"] == stated["claim 1"][column], (variant, verdicts["claim 1"])
        assert verdicts["claim 3"] == stated["claim 3"][column], (variant, verdicts["claim 3"])
        assert twin_verdict(metrics[metrics["run_id"].str.endswith("-bf16") == bool(variant)]) == stated["twin"][column]


def test_the_published_results_hold_only_small_files():
    """Configs, metrics, gradients, responses, statuses, figures and the report: no checkpoints."""
    allowed = {".json", ".parquet", ".png", ".md"}
    for path in (ROOT / "results").rglob("*"):
        if path.is_file():
            assert path.suffix in allowed, path
            assert path.stat().st_size < 1_000_000, path


def test_the_published_runs_were_trained_from_a_clean_committed_tree():
    """Each published run's config.json names the commit it was trained from, with no uncommitted
    change to a tracked file: the commit alone says what ran."""
    import json

    configs = sorted((ROOT / "results").glob("*/*/config.json"))
    if not configs:
        pytest.skip("results/ is not in this checkout")
    dirty = [p.parent.name for p in configs if json.loads(p.read_text())["provenance"]["git_dirty"] is not False]
    assert dirty == [], f"trained from a tree with uncommitted changes (or no git): {dirty}"
    assert all(json.loads(p.read_text())["provenance"]["git_commit"] for p in configs)


def _errors_text(final) -> str:
    """A final-errors row's "train / test" cell, as the results pages write it."""
    return f"{final['train']:.2f} / {final['test']:.2f}"


def _difference_text(deep, shallow) -> str:
    """The "deeper minus shallower, train / test" cell, as the results pages write it."""
    return f"{deep['train'] - shallow['train']:+.2f} / {deep['test'] - shallow['test']:+.2f}"


def _page_text(page: Path) -> str:
    return page.read_text().replace("\u2212", "-")  # the pages' minus signs


def test_the_pilot_page_states_the_final_errors_its_runs_have():
    """results/paper-depths-pilot/README.md: each budget's row gives ResNet-20's and ResNet-56's final
    training / test error as their runs there end, and ResNet-56's minus ResNet-20's."""
    results = ROOT / "results" / "paper-depths-pilot"
    if not results.is_dir():
        pytest.skip("results/paper-depths-pilot/ is not in this checkout")
    finals = final_errors(study.load_runs(results)).set_index("run_id")
    rows = re.findall(r"^\| ([\d,]+) iterations \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", _page_text(results / "README.md"),
                      flags=re.M)
    assert sorted(int(b.replace(",", "")) for b, *_ in rows) == sorted({cfg.iterations for cfg in grid_configs("paper-depths-pilot")})
    for budget, shallow, deep, diff in rows:
        r20, r56 = (finals.loc[f"fashion-mnist-resnet{d}-A-s0-it{budget.replace(',', '')}-bf16"] for d in (20, 56))
        assert (shallow.strip(), deep.strip(), diff.strip()) == (_errors_text(r20), _errors_text(r56), _difference_text(r56, r20)), budget


def _means_text(rows) -> str:
    """A net's "train / test" cell over its seeds, as the results pages write it: mean ± std of each."""
    return " / ".join(f"{rows[s].mean():.2f} ± {rows[s].std():.2f}" for s in ("train", "test"))


def _mean_difference_text(deep, shallow) -> str:
    """The deeper net's mean minus the shallower's, train / test."""
    return " / ".join(f"{deep[s].mean() - shallow[s].mean():+.2f}" for s in ("train", "test"))


def _between(text: str, marker: str) -> str:
    """A page's text between `<!-- marker -->` and `<!-- /marker -->`."""
    assert f"<!-- {marker} -->" in text and f"<!-- /{marker} -->" in text, f"the page lacks its {marker} markers"
    return text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]


def _assert_errors_table(page_text: str, marker: str, finals) -> None:
    """A page's final-errors table (between its `marker`s): a row per net (its `arch` in backticks) giving
    its final training / test error at 20 and 56 layers, mean ± std over its seeds as `finals` (the runs'
    `final_errors`) has them, and the difference of the means."""
    text = _between(page_text, marker)
    rows = re.findall(r"^\| [^|`]*\(`([a-z+]+)`\) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", text, flags=re.M)
    assert {arch for arch, *_ in rows} == set(finals["arch"]), rows
    for arch, shallow, deep, diff in rows:
        a, b = (finals[(finals["arch"] == arch) & (finals["depth"] == d)] for d in (20, 56))
        assert len(a) >= 2 and len(b) >= 2  # a mean ± std over seeds (3 each, unless a run diverged)
        assert (shallow.strip(), deep.strip(), diff.strip()) == (_means_text(a), _means_text(b), _mean_difference_text(b, a)), arch


def test_the_followups_page_states_the_final_errors_of_its_runs():
    """results/followups/README.md: the table gives each net's final training / test error at 20 and 56
    layers, mean ± std over the grid's 3 seeds as its runs there end, and the difference of the means."""
    results = ROOT / "results" / "followups"
    if not results.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    metrics = study.load_runs(results)
    assert set(metrics["run_id"]) == {cfg.run_id for cfg in grid_configs("followups")}
    _assert_errors_table(_page_text(results / "README.md"), "followups-errors", final_errors(metrics))


#: The blocks `study.analysis.pages` writes into a pair study's page.
PAGE_BLOCKS = ("errors", "verdicts", "training", "runs")


def _assert_runs_table(text: str, data: RunData, done, marker: str = "paper-depths-runs") -> None:
    """The page's runs block: one row per judged run, with the CPU, CPU path, threads and commit of its
    config.json and the clock of its metrics."""
    rows = re.findall(r"^\| (\S+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$",
                      _between(text, marker), flags=re.M)
    stated = {r[0]: tuple(c.strip() for c in r[1:]) for r in rows if r[0] != "run" and not r[0].startswith("-")}
    assert set(stated) == set(done), set(stated) ^ set(done)
    for run_id in done:
        prov = json.loads((data.runs_dir / run_id / "config.json").read_text())["provenance"]
        clock = data.metrics[data.metrics["run_id"] == run_id]["elapsed_s"].max() / 3600
        # Runs trained before config.json recorded the CPU model, its path and threads say what they have;
        # the CPU's instruction set where it recorded that too (`AMD EPYC (AVX2)`).
        cpu = cpu_label(prov) or prov.get("device_name") or prov["device"]
        path = (prov.get("cpu_path") or {}).get("name", "–")
        assert stated[run_id] == (cpu, path, str(prov.get("threads", "–")), prov["git_commit"][:7], f"{clock:.2f}"), run_id


def assert_paper_depths_page(results: Path) -> None:
    """A paper-depths page (plain and ResNet x 20/56, 3 seeds) states what its runs show: the final
    errors (mean ± std, difference of the means); the verdicts and significance `study report` gives
    claims 1 and 3 (training and test error); the twin (ResNet-56 against plain-56) and ResNet-56 against
    ResNet-20 in training error alone, each with its Welch interval and significance as `compare` gives them."""
    from study.analysis.report import _significance, _stat, compare

    data = RunData.load(results)
    done = data.runs.query("status == 'done'")["run_id"]  # the runs `study report` judges the claims on
    finals = final_errors(data.metrics[data.metrics["run_id"].isin(done)])
    text = _page_text(results / "README.md")
    _assert_errors_table(text, "paper-depths-errors", finals)
    _assert_runs_table(text, data, set(done))

    def train(arch, depth):
        return _stat(finals[(finals["arch"] == arch) & (finals["depth"] == depth)].set_index("seed")["train"])

    block = _between(text, "paper-depths-verdicts")
    stated = {m[0]: (m[1], m[2]) for m in re.findall(
        r"^\| (claim \d|twin)\b.*\| \*\*(holds|does not hold|cannot be judged)\*\*(?: \(((?:not )?significant)\))? \|$",
        block, flags=re.M)}
    assert set(stated) == {"claim 1", "claim 3", "twin"}, block
    claims = {f"claim {c.number}": c for c in classify_claims(RunData.load(results))}
    for key in ("claim 1", "claim 3"):
        assert stated[key] == (claims[key].verdict, claims[key].significance), key
        assert claims[key].evidence.replace("-", "\u2212") in block.replace("-", "\u2212"), key
    for key, marker, deep, shallow, words in (
            ("twin", "paper-depths-verdicts", ("resnet", 56), ("plain", 56), ("holds", "does not hold")),
            ("training", "paper-depths-training", ("resnet", 56), ("resnet", 20), ("yes", "no"))):
        comparison = compare(train(*deep), train(*shallow))
        better = comparison.diff < 0
        row = [line for line in _between(text, marker).splitlines() if str(comparison) in line.replace("\u2212", "-")]
        assert len(row) == 1, (key, str(comparison))
        verdict = words[0] if better else words[1]
        assert f"**{verdict}** ({_significance([(comparison, False)], better)})" in row[0], (key, row[0])


def _copy_the_followups_pair(folder):
    """The follow-ups' plain nets and ResNets at 20 and 56 layers (a pair study of 3 seeds), copied into
    `folder`; skips where results/followups/ is not in the checkout."""
    import shutil

    followups = ROOT / "results" / "followups"
    if not followups.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    for run in followups.glob("fashion-mnist-*"):
        if re.match(r"fashion-mnist-(plain|resnet)(20|56)-A-s\d-it4000-bf16$", run.name):
            shutil.copytree(run, folder / run.name)


def test_a_pair_page_written_by_the_pages_module_passes_its_check_and_a_changed_number_fails(tmp_path, capsys):
    """`study.analysis.pages` writes a pair study's blocks from its runs (here the follow-ups' plain nets and
    ResNets: the paper's pair at 20 and 56 layers, 3 seeds); `assert_paper_depths_page` accepts the page,
    and rejects it with one number or one verdict changed."""
    import shutil

    from study.analysis import pages

    _copy_the_followups_pair(tmp_path)
    assert len(list(tmp_path.iterdir())) == 12
    page = tmp_path / "README.md"
    page.write_text("".join(f"<!-- paper-depths-{b} -->\n<!-- /paper-depths-{b} -->\n" for b in PAGE_BLOCKS))
    assert pages.main(["paper-depths", str(tmp_path)]) == 0
    assert_paper_depths_page(tmp_path)
    good = page.read_text()
    assert good.count("(seeds 0-2; mean ± std, %)") == 2 and "| net (`arch` in the runs; seeds 0-2) |" in good
    for old, new in ((r"\| (\d+\.\d)(\d) ± ", lambda m: f"| {m[1]}{(int(m[2]) + 1) % 10} ± "),
                     (r"\*\*(holds|does not hold)\*\* \(significant\)", "**\\1** (not significant)"),
                     (r"\*\*(yes|no)\*\*", lambda m: "**no**" if m[1] == "yes" else "**yes**")):
        page.write_text(re.sub(old, new, good, count=1))
        assert page.read_text() != good
        with pytest.raises(AssertionError):
            assert_paper_depths_page(tmp_path)

    # A run that diverged (published, but not judged): the tables leave it out as the claims do, so the
    # page's plain-56 cell and claim 1's evidence give the same 2 seeds.
    from study.analysis.report import _stat

    gone = tmp_path / "fashion-mnist-plain56-A-s2-it4000-bf16" / "status.json"
    gone.write_text(json.dumps({**json.loads(gone.read_text()), "status": "diverged"}))
    assert pages.main(["paper-depths", str(tmp_path)]) == 0
    finals = final_errors(study.load_runs(tmp_path))
    two = finals[(finals["arch"] == "plain") & (finals["depth"] == 56) & (finals["seed"] < 2)].set_index("seed")
    cell = f"{_stat(two['train'])} / {_stat(two['test'])} (seeds 0, 1)"  # its seeds, where the nets' differ
    text = _page_text(page)
    row = next(line for line in text.splitlines() if line.startswith("| plain (`plain`)"))
    assert row.split(" | ")[2] == cell, (row, cell)
    assert row.split(" | ")[1].endswith("(seeds 0-2)") and "evidence (each net's seeds, as the errors table" in text
    claim1 = next(line for line in text.splitlines() if line.startswith("| claim 1"))
    assert f"plain-56 {_stat(two['train'])} vs" in claim1, claim1
    # Two studies in one folder (another budget of a net): one line, exit 2, the page as it was (emptied
    # first, so a page rewritten with the same blocks would show).
    before = "".join(f"<!-- paper-depths-{b} -->\nold\n<!-- /paper-depths-{b} -->\n" for b in PAGE_BLOCKS)
    page.write_text(before)
    other = tmp_path / "fashion-mnist-plain20-A-s0-it4000-bf16"
    cfg = json.loads((other / "config.json").read_text())
    twin = tmp_path / other.name.replace("it4000", "it2000")
    shutil.copytree(other, twin)
    (twin / "config.json").write_text(json.dumps({**cfg, "run_id": twin.name,
                                                  "config": {**cfg["config"], "iterations": 2000}}))
    capsys.readouterr()
    assert pages.main(["paper-depths", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds 2 studies" in err[0] and "publish each to a folder of its own" in err[0], err
    assert page.read_text() == before
    # A page that is not UTF-8 text: one line, exit 2, the page as it was.
    shutil.rmtree(twin)
    page.write_bytes(before.encode("latin-1") + b"caf\xe9\n")
    assert pages.main(["paper-depths", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is not UTF-8 text" in err[0], err
    assert page.read_bytes() == before.encode("latin-1") + b"caf\xe9\n"
    # A run's damaged file: the page would quietly lose its rows; one line naming it, exit 2, the page as it was.
    page.write_text(before)
    damaged = tmp_path / "fashion-mnist-resnet56-A-s1-it4000-bf16" / "metrics.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert pages.main(["paper-depths", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"study.analysis.pages: error: {damaged} is unreadable"), err
    assert page.read_text() == before


def test_the_pages_module_writes_the_blocks_another_page_quotes_and_refuses_one_that_quotes_none(tmp_path, capsys):
    """`python -m study.analysis.pages MARKER RESULTS_DIR PAGE`: the study's page gets every block, the other
    page those whose markers it holds (its other text kept); a page holding none of them is one line, exit 2,
    and no page is written, the study's own included."""
    from study.analysis import pages

    _copy_the_followups_pair(tmp_path)
    page = tmp_path / "README.md"
    empty = "".join(f"<!-- paper-depths-{b} -->\n<!-- /paper-depths-{b} -->\n" for b in PAGE_BLOCKS)
    page.write_text(empty)
    quoting = tmp_path / "top.md"
    quoting.write_text("# top\n<!-- paper-depths-verdicts -->\nold\n<!-- /paper-depths-verdicts -->\nend\n")
    assert pages.main(["paper-depths", str(tmp_path), str(quoting)]) == 0
    blocks = pages.pair_blocks(tmp_path, "paper-depths")
    assert quoting.read_text() == ("# top\n<!-- paper-depths-verdicts -->\n" + "\n".join(blocks["paper-depths-verdicts"])
                                   + "\n<!-- /paper-depths-verdicts -->\nend\n")
    assert all(_between(page.read_text(), m) == "\n" + "\n".join(rows) + "\n" for m, rows in blocks.items())
    page.write_text(empty)
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    capsys.readouterr()
    assert pages.main(["paper-depths", str(tmp_path), str(bare)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"study.analysis.pages: error: {bare} holds none of the markers of: paper-depths-errors"), err
    assert page.read_text() == empty and bare.read_text() == "no markers\n"


def test_a_pair_page_judges_no_training_row_of_nets_still_at_chance(tmp_path):
    """Two nets at chance (90% error on 10 classes): which is "better" is noise, so the page's twin row
    cannot be judged, as `study report`'s claims say of such nets; a row of nets that learned is judged."""
    import pandas as pd

    from study.analysis import pages

    _copy_the_followups_pair(tmp_path)
    for path in tmp_path.glob("fashion-mnist-*56-A-*/metrics.parquet"):  # the 56-layer nets learned nothing
        df = pd.read_parquet(path)
        df["error_pct"] = 90.0
        df.to_parquet(path, index=False)
    page = tmp_path / "README.md"
    page.write_text("".join(f"<!-- paper-depths-{b} -->\n<!-- /paper-depths-{b} -->\n" for b in PAGE_BLOCKS))
    assert pages.main(["paper-depths", str(tmp_path)]) == 0
    lines = _page_text(page).splitlines()
    twin = next(line for line in lines if line.startswith("| twin: ResNet-56 trains better than plain-56"))
    assert twin.endswith("| **cannot be judged** |") and "no net compared has learned" in twin, twin
    deeper = next(line for line in lines if line.startswith("| ResNet-56 trains better than ResNet-20"))
    assert "| **no** (significant) |" in deeper, deeper  # ResNet-20 learned: ResNet-56 at chance is worse


def test_a_pair_pages_claim_3_row_names_the_resnets_the_report_compared(tmp_path):
    """Claim 3 is `study report`'s: the shallowest ResNet against the deepest up to 110 layers. A pair study
    with a ResNet-110 too (here ResNet-56's runs copied as ResNet-110's) judges ResNet-110 against ResNet-20,
    and the page's row says so rather than naming the 56-layer net."""
    import json
    import shutil

    import pandas as pd

    from study.analysis import pages

    _copy_the_followups_pair(tmp_path)
    for run in sorted(tmp_path.glob("fashion-mnist-resnet56-A-*")):
        copy = tmp_path / run.name.replace("resnet56", "resnet110")
        shutil.copytree(run, copy)
        config = json.loads((copy / "config.json").read_text())
        config["run_id"], config["config"]["depth"] = copy.name, 110
        (copy / "config.json").write_text(json.dumps(config))
        df = pd.read_parquet(copy / "metrics.parquet").assign(run_id=copy.name, depth=110)
        df.to_parquet(copy / "metrics.parquet", index=False)
    page = tmp_path / "README.md"
    page.write_text("".join(f"<!-- paper-depths-{b} -->\n<!-- /paper-depths-{b} -->\n" for b in PAGE_BLOCKS))
    assert pages.main(["paper-depths", str(tmp_path)]) == 0
    claim3 = next(line for line in _page_text(page).splitlines() if line.startswith("| claim 3:"))
    assert claim3.startswith("| claim 3: ResNet-110 trains and tests better than ResNet-20 |"), claim3
    assert "ResNet-110 vs ResNet-20" in claim3, claim3


def test_the_pages_module_refuses_bad_input_in_one_line_and_leaves_the_page(tmp_path, capsys):
    """No page, markers missing, no runs, runs lacking a net of the pair: one line, exit 2, page unchanged."""
    from study.analysis import pages

    followups = ROOT / "results" / "followups"
    if not followups.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    page = tmp_path / "README.md"
    cases = []
    assert pages.main(["paper-depths", str(tmp_path)]) == 2  # no page
    cases.append("does not exist")
    page.write_text("<!-- paper-depths-errors -->\n<!-- /paper-depths-errors -->\n")
    assert pages.main(["paper-depths", str(tmp_path)]) == 2  # no runs
    cases.append("no runs in")
    run = "fashion-mnist-plain20-A-s0-it4000-bf16"
    import shutil

    shutil.copytree(followups / run, tmp_path / run)
    assert pages.main(["paper-depths", str(tmp_path)]) == 2  # plain-20 only
    cases.append("with training and test errors) of plain-56, resnet-20, resnet-56; a pair page needs")
    for r in followups.glob("fashion-mnist-*-it4000-bf16"):
        if re.match(r"fashion-mnist-(plain|resnet)(20|56)-A-s\d-it4000-bf16$", r.name) and not (tmp_path / r.name).exists():
            shutil.copytree(r, tmp_path / r.name)
    assert pages.main(["paper-depths", str(tmp_path)]) == 2  # the other blocks' markers missing
    cases.append("lacks the markers of: paper-depths-verdicts, paper-depths-training, paper-depths-runs")
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == len(cases) and all(needle in line for needle, line in zip(cases, errors)), errors
    assert all(line.startswith("study.analysis.pages: error: ") for line in errors), errors  # whose error it is
    assert page.read_text() == "<!-- paper-depths-errors -->\n<!-- /paper-depths-errors -->\n"


def test_the_paper_depths_page_states_what_its_runs_show():
    """results/paper-depths/README.md: its blocks are, line for line, what the pages module writes from the
    runs published so far (they are published as they finish); once all 12 are, every number and
    verdict is checked against the runs as well."""
    from study.analysis import pages

    results = ROOT / "results" / "paper-depths"
    if not results.is_dir():
        pytest.skip("results/paper-depths/ is not in this checkout")
    published = set(study.load_runs(results)["run_id"])
    grid = {cfg.run_id for cfg in grid_configs("paper-depths")}
    assert published <= grid, published - grid
    text = (results / "README.md").read_text()
    blocks = pages.pair_blocks(results, "paper-depths")
    for marker, rows in blocks.items():
        assert _between(text, marker) == "\n" + "\n".join(rows) + "\n", marker
    # The repository's README quotes its errors and verdicts, written by the same module.
    readme = (ROOT / "README.md").read_text()
    for marker in ("paper-depths-errors", "paper-depths-verdicts"):
        assert _between(readme, marker) == "\n" + "\n".join(blocks[marker]) + "\n", marker
    if published != grid:
        pytest.skip(f"results/paper-depths/ is still training: {len(published)} of {len(grid)} runs published")
    assert_paper_depths_page(results)


def test_the_followups_page_blocks_are_what_the_pages_module_writes_from_its_runs():
    """results/followups/README.md: every generated block (final errors of every net, the arms' answers,
    the paper's claims, training alone, how each run was trained) is, line for line, what
    `python -m study.analysis.pages followups results/followups` writes from the published runs."""
    from study.analysis import pages

    results = ROOT / "results" / "followups"
    if not results.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    blocks = pages.pair_blocks(results, "followups")
    assert set(blocks) == {f"followups-{b}" for b in (*PAGE_BLOCKS, "arms")}
    text = (results / "README.md").read_text()
    for marker, rows in blocks.items():
        assert _between(text, marker) == "\n" + "\n".join(rows) + "\n", marker
    _assert_runs_table(_page_text(results / "README.md"), RunData.load(results),
                       set(study.analysis.load_run_table(results)["run_id"]), "followups-runs")


def test_the_followups_page_states_the_arms_verdicts_of_its_runs():
    """results/followups/README.md: each arm's row gives the question `study report` asks, its verdict
    and significance, as the report judges the published runs."""
    results = ROOT / "results" / "followups"
    if not results.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    findings = judge_study_arms(RunData.load(results))
    assert len(findings) == 6  # two questions for each of the three arms
    text = _between(_page_text(results / "README.md"), "followups-arms")
    rows = re.findall(r"^\| arm (\d+) \| ([^|]+) \| \*\*(yes|no|cannot be judged)\*\*(?: \(([a-z ]+)\))? \|", text,
                      flags=re.M)
    assert len({n for n, *_ in rows}) == len(rows), rows  # each arm's question once
    stated = {int(n): (q.strip(), v, sig) for n, q, v, sig in rows}
    assert stated == {f.number: (f.text, f.verdict, f.significance) for f in findings}


def test_the_followups_page_states_what_the_bn_scales_of_its_plain_56_nets_show():
    """results/followups/README.md's paragraph on the delta-orthogonal plain-56's strong responses: over
    stage 1, the correlation of response std and γ rms (per layer, mean over seeds) and the largest γ rms in
    each plain-56; over stages 2 and 3, their rank correlation and ranges; as the published
    responses.parquet files give them."""
    from study.analysis import load_responses

    results = ROOT / "results" / "followups"
    if not results.is_dir():
        pytest.skip("results/followups/ is not in this checkout")
    r = load_responses(results)
    m = r[(r.depth == 56) & r.arch.isin(["plain", "plain+deltaorth"])].groupby(
        ["arch", "layer_name"])[["std", "bn_scale_rms"]].mean()
    assert len(m) == 2 * 54 and m["bn_scale_rms"].notna().all()
    stage1 = m.index.get_level_values("layer_name").str.startswith("stage1")
    first, rest = m[stage1], m[~stage1]
    assert len(first) == 2 * 18
    corr = {a: g["std"].corr(g["bn_scale_rms"]) for a, g in first.groupby("arch")}
    rank = {a: g["std"].corr(g["bn_scale_rms"], method="spearman") for a, g in rest.groupby("arch")}
    top = first.groupby("arch")["bn_scale_rms"].max()
    text = " ".join(_page_text(results / "README.md").split())
    assert (f"Over stage 1's 18 layers the two go together (correlation {corr['plain']:.3f} in the He-initialised "
            f"net, {corr['plain+deltaorth']:.3f} in the delta-orthogonal one; per layer, mean over seeds)") in text
    assert (f"first-stage γ grew to an rms of up to {top['plain+deltaorth']:.1f} (mean over seeds) against "
            f"{top['plain']:.1f} for the He-initialised net") in text
    assert (f"γ's rms stays between {rest['bn_scale_rms'].min():.2f} and {rest['bn_scale_rms'].max():.2f} and the "
            f"responses between {rest['std'].min():.2f} and {rest['std'].max():.2f} in both nets") in text
    assert f"(rank correlation {rank['plain']:.2f} and {rank['plain+deltaorth']:.2f}, in that order)" in text


def test_the_pages_name_seeds_as_a_reader_says_them():
    from study.analysis.pages import _seed_text

    assert [_seed_text(s) for s in ((1,), (0, 2), (0, 1), (0, 1, 2), (0, 2, 3))] == [
        "seed 1", "seeds 0, 2", "seeds 0, 1", "seeds 0-2", "seeds 0, 2, 3"]
