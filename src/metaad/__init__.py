"""metaad: offline visual anomaly detection and localization for industrial inspection."""

import os

# torch and faiss each run an OpenMP thread pool; by default idle OpenMP threads spin, and on a few cores
# the spinning faiss threads starve torch's (PatchCore inference was 10x slower on 2 cores). Passive waiting
# must be chosen before either library loads, so it is set here; import metaad before torch to get it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
