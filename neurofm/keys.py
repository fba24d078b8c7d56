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
LIBRARY_LABEL = "library_label"
CELL_CLASS = "class"  # obs: "excitatory" / "inhibitory" (synthetic data)
X_COORD = "x"  # obs / metadata: 2-D atlas coordinate (the Allen release's UMAP-like layout)
Y_COORD = "y"
GENE_ID_INDEX = "gene_identifier"  # name of the var index (Ensembl IDs) in Allen files
DATASET = "dataset"  # obs of a multi-file cell store: the file (dataset name) a cell came from
BATCH = "batch"  # obs of a multi-file cell store: the file's batch column value, else the dataset name

# Allen atlas CSV columns (cluster.csv / cluster_annotation_term.csv), joined onto obs via cluster_alias
CLUSTER_LABEL = "label"  # cluster.csv and cluster_annotation_term.csv: the taxonomy term label
CLUSTER_N_CELLS = "number_of_cells"
TERM_NAME = "name"
TERM_DESCRIPTION = "description"  # e.g. "MGE interneuron (subcluster 5)"; base name = text before " ("
TERM_SET_LABEL = "term_set_label"

# uns (prepare)
CROP_PARAMS = "crop_params"
CROP_INDICES = "crop_indices"
SPARSITY_SUMMARY = "sparsity_summary"
DEDUPE_REPORT = "dedupe_report"
SUBSET_PARAMS = "subset_params"
REGION_PARAMS = "region_params"
LOAD_PARAMS = "load_params"

# obsm / uns (evaluation)
DROPPED_EMPTY = "dropped_empty"  # uns: all-zero cells/genes the prepare step left out (counts, gene names)
EMBEDDING = "X_neurofm"  # obsm: cell embeddings from the frozen encoder
EMBEDDING_PARAMS = "neurofm"  # uns: model source + pooling used for X_neurofm
PCA_BASELINE = "X_pca_baseline"  # obsm: PCA of log-normalised counts (baseline)
SCVI_BASELINE = "X_scvi_baseline"  # obsm: scVI latent means, trained on the evaluation cells (baseline)
RANDOM_BASELINE = "X_random_encoder"  # obsm: embeddings from the untrained encoder (baseline)
EVALUATED_EMBEDDING = "X_embedding"  # obsm of the scratch AnnData neurofm.evaluate builds its kNN graph on

# obs / uns (reference mapping)
MAPPED_LABEL_PREFIX = "neurofm_"  # obs: neurofm_<column> (label or "unknown"), neurofm_<column>_score
MAP_PARAMS = "neurofm_map"  # uns: model, gene match, reference, threshold, counts per predicted label
