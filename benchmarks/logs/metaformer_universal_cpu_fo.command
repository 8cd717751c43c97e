metaad meta-train --wild ../shared/data/saliency/ecssd ../shared/data/saliency/duts_tr --out benchmarks/_work/metaformer_universal_cpu_fo --preset cpu --first-order --epochs 400 --threads 1 --resume
