"""The generated blocks of a published study's page (`results/<study>/README.md`): tables written from
the published runs between `<!-- marker -->` and `<!-- /marker -->`, so that a page's numbers are the
runs' and `tests/test_results.py` can hold them to it.

`python -m study.analysis.pages paper-depths results/paper-depths` fills the page of a study of the
paper's pair (plain and ResNet x 20/56, several seeds): its final errors, the paper's claims 1 and 3 as
`study report` judges them, the twin (ResNet-56 against plain-56), and ResNet-56 against ResNet-20 in
training error alone; and how each of its runs was trained (CPU, CPU path, threads, commit, clock).
A study with follow-up arms (`python -m study.analysis.pages followups results/followups`) has their
rows in the errors table too, and a block of their questions and answers (`<marker>-arms`). Pages named
after the folder (`... paper-depths results/paper-depths README.md`) get those of the blocks whose markers
they hold: the repository's README quotes a study's tables so.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..config import ConfigError
from ..runstore import atomic_write_text, machine
from .arms import arms_in, judge_arms
from .load import RunData, studies
from .report import (UNKNOWN, _cifar_study, _Finals, _provenance, _significance, by_session, classify_claims, commit_text,
                     compare)

#: The nets of the paper's pair, as a page names them (`arch` in the runs in backticks).
PAIR_NETS = {"plain": "plain", "resnet": "ResNet"}
#: The follow-ups' arms (`study.analysis.arms`), as a page names them; another arm goes by its `arch`.
ARM_NAMES = {"preact": "pre-activation ResNet", "resnet+zeroinit": "zero-init ResNet",
             "plain+deltaorth": "delta-orthogonal plain"}


def _minus(text: str) -> str:
    """The pages' minus sign for a negative number."""
    return re.sub(r"(?<![\w.])-(?=\d)", "\u2212", text)


def _seed_text(seeds: tuple[int, ...]) -> str:
    """Seeds as a page names them: `seeds 0-2` for a run of three or more, `seeds 0, 2`, `seed 1`."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def pair_blocks(results: str | Path, marker: str) -> dict[str, list[str]]:
    """The blocks `<marker>-errors`, `<marker>-verdicts`, `<marker>-training` and `<marker>-runs` of a
    study of the paper's pair at 20 and 56 layers in `results` (and `<marker>-arms` where it has follow-up
    arms): each a list of Markdown table lines.

    Every block reads the runs the claims are judged on (`study report`'s: the finished runs, option A,
    of the one CIFAR-style study in `results`), so a page's tables and its verdicts count the same seeds.
    ConfigError (one line) when `results` holds several studies (ImageNet runs too: the report would judge
    claim 1 on them as well), lacks a net of the pair, a net has no final error, or a run's file is
    unreadable (a page would quietly lose its rows)."""
    data = RunData.load(results)
    if data.unreadable:
        raise ConfigError(data.notes()[0])
    found = studies(data.runs)
    if len(found) > 1:
        raise ConfigError(f"{results} holds {len(found)} studies ({'; '.join(s.label() for s in found)}); a pair "
                          "page is written from one: publish each to a folder of its own")
    study = _cifar_study(data)
    finals = _Finals(data, study) if study is not None else None
    if finals is None or finals.df is None:
        raise ConfigError(f"{results} has no finished CIFAR-style runs with metrics; a pair page needs plain and "
                          "ResNet at 20 and 56 layers")
    column = {"train": "train", "test": finals.eval}

    def stat(arch: str, depth: int, split: str):
        return finals.get(arch, depth, column[split])

    absent = [f"{arch}-{depth}" for arch in PAIR_NETS for depth in (20, 56)
              if any(stat(arch, depth, split) is None for split in column)]
    if absent:
        raise ConfigError(f"{results} has no finished runs (option A, with training and {finals.eval} errors) of "
                          f"{', '.join(absent)}; a pair page needs plain and ResNet at 20 and 56 layers")

    # The paper's pair, then any arm the study trained at both depths (its errors table gives them too).
    every_arm = arms_in(finals)
    arms = [a for a in every_arm if all(stat(a, d, split) is not None for d in (20, 56) for split in column)]
    nets = {**PAIR_NETS, **{arm: ARM_NAMES.get(arm, arm) for arm in arms}}
    seeds = {(arch, depth, split): tuple(sorted(int(x) for x in stat(arch, depth, split).values.index))
             for arch in nets for depth in (20, 56) for split in column}
    same = len(set(seeds.values())) == 1
    # Every net and split over the same seeds: the headers say which; else each cell says its own.
    over = _seed_text(next(iter(seeds.values()))) if same else "each net's seeds, in its cell"
    evidence = over if same else "each net's seeds, as the errors table gives them"

    def means(arch: str, depth: int) -> str:
        own = [seeds[arch, depth, split] for split in column]
        cell = " / ".join(str(stat(arch, depth, split)) for split in column)
        if same or own[0] == own[1]:
            return cell if same else f"{cell} ({_seed_text(own[0])})"
        return " / ".join(f"{stat(arch, depth, split)} ({_seed_text(o)})" for split, o in zip(column, own))

    def difference(arch: str) -> str:
        return " / ".join(_minus(f"{stat(arch, 56, split).mean - stat(arch, 20, split).mean:+.2f}") for split in column)

    splits = "train / test" if finals.eval == "test" else f"train / {finals.eval}"
    errors = [f"| net (`arch` in the runs; {over}) | 20 layers ({splits}; mean ± std, %) | 56 layers | 56 minus 20 (means) |",
              "|---|---|---|---|"]
    for arch, name in nets.items():
        errors.append(f"| {name} (`{arch}`) | {means(arch, 20)} | {means(arch, 56)} | {difference(arch)} |")

    def training_row(text: str, deep: tuple[str, int], shallow: tuple[str, int], words: tuple[str, str]) -> str:
        a, b = stat(*deep, "train"), stat(*shallow, "train")
        comparison = compare(a, b)
        better = comparison.diff < 0
        names = [f"{PAIR_NETS[arch]}-{depth}" for arch, depth in (deep, shallow)]
        if why := finals.unlearned([a, b]):  # nets at chance: which is "better" is noise, as in the claims
            return (f"| {text} | training error {names[0]} {a} vs {names[1]} {b}; {_minus(why)} | "
                    f"**{UNKNOWN}** |")
        significance = _significance([(comparison, False)], better)
        return (f"| {text} | training error {names[0]} {a} vs {names[1]} {b} ({_minus(str(comparison))}) | "
                f"**{words[0] if better else words[1]}**{f' ({significance})' if significance else ''} |")

    claims = {c.number: c for c in classify_claims(data)}
    verdicts = [f"| the paper's claim (`study report`) | evidence ({evidence}; mean ± std, %) | verdict |", "|---|---|---|"]
    # Claim 3 is the report's: the shallowest ResNet against the deepest up to 110 layers (20 against 56
    # where the study has no other depth); its row names the pair it judged.
    resnets = [d for d in finals.depths("resnet") if d <= 110]
    for number, text in ((1, "plain-56 trains and tests worse than plain-20"),
                         (3, f"ResNet-{resnets[-1]} trains and tests better than ResNet-{resnets[0]}")):
        c = claims[number]
        verdicts.append(f"| claim {number}: {text} | {_minus(c.evidence)} | **{c.verdict}**"
                        f"{f' ({c.significance})' if c.significance else ''} |")
    verdicts.append(training_row("twin: ResNet-56 trains better than plain-56", ("resnet", 56), ("plain", 56),
                                 ("holds", "does not hold")))
    # A table of its own, with its header: a page may set it apart from the verdicts.
    training = [f"| question | evidence ({evidence}; mean ± std, %) | answer |", "|---|---|---|",
                training_row("ResNet-56 trains better than ResNet-20 (training error alone)", ("resnet", 56),
                             ("resnet", 20), ("yes", "no"))]
    blocks = {f"{marker}-errors": errors, f"{marker}-verdicts": verdicts, f"{marker}-training": training,
              f"{marker}-runs": runs_rows(data, study)}
    if every_arm:  # `study report`'s questions to each arm (those at one depth too), and its answers
        blocks[f"{marker}-arms"] = [f"| arm | question (`study report`) | answer | evidence ({evidence}; mean ± std, %) |",
                                    "|---|---|---|---|"] + [
            f"| arm {f.number} | {f.text} | **{f.verdict}**{f' ({f.significance})' if f.significance else ''} | "
            f"{_minus(f.evidence)} |" for f in judge_arms(finals)]
    return blocks


#: The provenance a page's runs block gives (with report's `_provenance`, which reads it from config.json).
RUN_KEYS = ("cpu", "cpu_flags", "cpu_capability", "device_name", "device", "cpu_path", "threads", "git_commit",
            "git_dirty", "resumed")


def runs_rows(data: RunData, study) -> list[str]:
    """How each judged run (finished, of `study`) was trained, from its own files: the CPU (or device),
    the CPU path `study run` chose, threads and commit from its config.json, its clock from its metrics
    (`elapsed_s` of its last epoch: wall time, any pause included)."""
    done = study.select(data.runs).query("status == 'done'").sort_values(["seed", "arch", "depth"])
    clock = data.metrics.groupby("run_id")["elapsed_s"].max() if "elapsed_s" in data.metrics else {}
    rows = ["| run | CPU (or device) | CPU path | threads | commit | clock, h |", "|---|---|---|---:|---|---:|"]
    for _, run in done.iterrows():
        run_id = run["run_id"]
        prov = _provenance(data, run, RUN_KEYS)
        path = prov.get("cpu_path")
        path = path.get("name") if isinstance(path, dict) else path
        # A run resumed on another machine or from another commit: each session's, from the iteration it resumed at.
        commit = by_session(prov, lambda s: commit_text(s, 7))
        where = by_session(prov, lambda s: (m.name if (m := machine(s)) else None) or s.get("device_name")
                           or s.get("device"))
        threads = by_session(prov, lambda s: str(s["threads"]) if s.get("threads") else None)
        hours = f"{clock[run_id] / 3600:.2f}" if run_id in clock else "–"
        rows.append(f"| {run_id} | {where or '–'} | {path or '–'} | {threads or '–'} | {commit or '–'} | {hours} |")
    return rows


def _span(marker: str) -> str:
    return rf"<!-- {re.escape(marker)} -->.*?<!-- /{re.escape(marker)} -->"


def filled(text: str, blocks: dict[str, list[str]], *, every: bool = True) -> tuple[str, list[str]]:
    """`text` with each block written between its markers, and the markers it lacks. `every`: it must hold
    all of them (a study's page), else the text is returned as it was; otherwise those it holds are
    written (another page quoting some of the blocks, such as the repository's README), and it must hold one."""
    missing = [m for m in blocks if not re.search(_span(m), text, flags=re.DOTALL)]
    if (every and missing) or len(missing) == len(blocks):
        return text, missing
    for marker, rows in blocks.items():
        new = f"<!-- {marker} -->\n" + "\n".join(rows) + f"\n<!-- /{marker} -->"
        text = re.sub(_span(marker), lambda _, new=new: new, text, flags=re.DOTALL)
    return text, []


def _refuse(message: str) -> int:
    """Bad input: one line on stderr, exit code 2."""
    print(f"study.analysis.pages: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Write the blocks into RESULTS_DIR/README.md, and into each further PAGE those of them whose markers it
    holds (e.g. the repository's README quoting the study's tables). Bad input (no runs, no page, markers
    missing) is one line on stderr and exit code 2, every page unchanged."""
    if len(argv) < 2:
        print("usage: python -m study.analysis.pages MARKER RESULTS_DIR [PAGE ...] (e.g. paper-depths "
              "results/paper-depths README.md)", file=sys.stderr)
        return 2
    marker, results, *others = argv
    page = Path(results) / "README.md"
    pages = [(page, True), *((Path(p), False) for p in others)]
    try:
        for path, _ in pages:
            if not path.is_file():
                raise ConfigError(f"{path} does not exist; write the page, with its markers, first")
        blocks = pair_blocks(results, marker)
    except ConfigError as e:
        return _refuse(str(e))
    except OSError as e:
        return _refuse(f"cannot read the runs in {results}: {e.strerror or e}; check the folder's permissions")
    texts = []  # every page checked and filled before any is written
    for path, every in pages:
        try:
            text, missing = filled(path.read_text(encoding="utf-8"), blocks, every=every)
        except UnicodeDecodeError:
            return _refuse(f"{path} is not UTF-8 text; save it as UTF-8")
        except OSError as e:
            return _refuse(f"cannot read {path}: {e.strerror or e}; check its permissions")
        if missing:
            what = "lacks the markers of" if every else "holds none of the markers of"
            return _refuse(f"{path} {what}: {', '.join(missing)}; add <!-- NAME --> and <!-- /NAME -->")
        texts.append((path, text))
    for path, text in texts:
        try:
            atomic_write_text(path, text)  # each whole or not at all
        except OSError as e:  # a folder the new page cannot be written into
            return _refuse(f"cannot rewrite {path}: {e.strerror or e}; check its and its folder's permissions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
