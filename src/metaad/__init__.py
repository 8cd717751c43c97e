"""metaad: offline visual anomaly detection and localization for industrial inspection."""

import os
import sys

# torch and faiss each run an OpenMP thread pool; by default idle OpenMP threads spin, and on a few cores
# the spinning faiss threads starve torch's (PatchCore inference was 10x slower on 2 cores). Passive waiting
# takes effect only if chosen before either library loads; when one was imported before metaad, faiss
# searches run single-threaded instead (see PatchCore._search).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
OPENMP_PASSIVE = os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE" and not (
    "torch" in sys.modules or "faiss" in sys.modules
)

__version__ = "0.1.0"
