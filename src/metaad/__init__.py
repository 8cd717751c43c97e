"""metaad: offline visual anomaly detection and localization for industrial inspection.

``metaad.load_run(RUN)`` loads a run folder written by ``metaad fit`` for scoring images from Python
(see :mod:`metaad.deploy.inference`); it is imported on first use, so ``import metaad`` loads no torch.
Nothing inside the package imports this file's names: they live in the layers below (``metaad.runtime``
holds the version and the OpenMP policy, which must be chosen before torch loads).
"""

from metaad.runtime import OPENMP_PASSIVE, OpenMPWarning, __version__

__all__ = ["OPENMP_PASSIVE", "ImageResult", "OpenMPWarning", "Run", "__version__", "load_run"]


def __getattr__(name: str):
    if name in ("load_run", "Run", "ImageResult"):
        from metaad.deploy import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'metaad' has no attribute {name!r}")
