"""study: the plain-vs-residual degradation study of He et al. (2015), reproducible from your own runs."""

from importlib.metadata import PackageNotFoundError, version

#: The distribution's name (`pip install resnet-degradation-study`): `study` on PyPI is another project.
DISTRIBUTION = "resnet-degradation-study"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"

from .config import RunConfig  # noqa: E402

__all__ = ["RunConfig", "list_runs", "load_model", "load_runs", "__version__"]


def __getattr__(name: str) -> object:
    """`load_runs`, `load_model` and `list_runs` on first use: they import pandas and torch, which
    `study.config` and the listing commands do without."""
    if name == "load_runs":
        from .analysis.load import load_runs

        return load_runs
    if name == "load_model":
        from .trained import load_model

        return load_model
    if name == "list_runs":
        from .runstore import list_runs

        return list_runs
    raise AttributeError(f"module 'study' has no attribute {name!r}")
