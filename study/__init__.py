"""study: the plain-vs-residual degradation study of He et al. (2015), reproducible from your own runs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("study")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"

from .analysis.load import load_runs  # noqa: E402
from .config import RunConfig  # noqa: E402
from .runstore import list_runs  # noqa: E402

__all__ = ["RunConfig", "list_runs", "load_runs", "__version__"]
