metaad meta-train --wild ../shared/data/saliency/ecssd ../shared/data/saliency/duts_tr --out benchmarks/_work/metaformer_universal_cpu_A --preset cpu --configuration A --threads 1 --resume
