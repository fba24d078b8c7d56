"""Every AnnData key neurofm reads or writes, in one place.

Steps document which of these they add; nothing else spells them out as string literals.
"""

# layers / obs / var
COUNTS_LAYER = "counts"  # raw integer UMI counts, if the file keeps them apart from X
SUBTYPE = "subtype"  # obs: cluster label such as "cluster_2523", added by the subset step
GENE_SYMBOL = "gene_symbol"  # var: human-readable gene symbol; var_names are stable IDs (Ensembl)
CELL_LABEL = "cell_label"  # metadata column whose values are the h5ad obs_names
CELL_BARCODE = "cell_barcode"
CLUSTER_ALIAS = "cluster_alias"
REGION = "anatomical_division_label"

# uns (prepare)
CROP_PARAMS = "crop_params"
CROP_INDICES = "crop_indices"
SPARSITY_SUMMARY = "sparsity_summary"
DEDUPE_REPORT = "dedupe_report"
SUBSET_PARAMS = "subset_params"
REGION_PARAMS = "region_params"

# obsm / uns (evaluation)
EMBEDDING = "X_neurofm"  # obsm: cell embeddings from the frozen encoder
EMBEDDING_PARAMS = "neurofm"  # uns: model source + pooling used for X_neurofm
PCA_BASELINE = "X_pca_baseline"  # obsm: PCA of log-normalised counts (baseline)
RANDOM_BASELINE = "X_random_encoder"  # obsm: embeddings from the untrained encoder (baseline)
