"""What metaad knows of its own process: its version, and the OpenMP wait policy chosen before torch loads.

torch and faiss each run an OpenMP thread pool; by default idle OpenMP threads spin, and on a few cores the
spinning faiss threads starve torch's (PatchCore inference was 10x slower on 2 cores). Passive waiting takes
effect only if chosen before either library loads: set here when metaad comes first (the package's
``__init__`` imports this module before anything else), or in the environment by the user. When torch or
faiss was imported before metaad without it, faiss searches run single-threaded instead (see
``metaad.components.knn``), and metaad says so once.
"""

import os
import sys
import warnings

__version__ = "0.1.0"

_USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
_LOADED_FIRST = sorted(name for name in ("torch", "faiss") if name in sys.modules)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
OPENMP_PASSIVE = os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE" and (
    _USER_WAIT_POLICY is not None or not _LOADED_FIRST
)


class OpenMPWarning(UserWarning):
    """torch or faiss was imported before metaad, so OpenMP's passive waiting could not be chosen."""


if not OPENMP_PASSIVE and _LOADED_FIRST and _USER_WAIT_POLICY is None:
    warnings.warn(
        f"{' and '.join(_LOADED_FIRST)} was imported before metaad, so metaad could not make OpenMP threads "
        "wait passively; PatchCore's nearest-neighbour search will run single-threaded (slower). "
        "Import metaad before torch, or set OMP_WAIT_POLICY=PASSIVE in the environment before starting Python.",
        OpenMPWarning,
        stacklevel=3,
    )


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and faiss (default: all cores)."""
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
