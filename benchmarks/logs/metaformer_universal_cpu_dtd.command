metaad meta-train --wild ../shared/data/saliency/ecssd ../shared/data/saliency/duts_tr ../shared/data/dtd/train/* --out benchmarks/_work/metaformer_universal_cpu_dtd --preset cpu --threads 2 --resume
