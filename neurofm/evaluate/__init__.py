"""Evaluation science: embeddings in, metrics and figures out (no ZenML, no MLflow).

- :mod:`~neurofm.evaluate.labels` — ``resolve_labels``: one obs column → class labels
- :mod:`~neurofm.evaluate.baselines` — ``pca_baseline``: PCA of log-normalised counts
- :mod:`~neurofm.evaluate.probe` — ``make_split``, ``run_probe``, ``probe_to_json``/``probe_from_json``
- :mod:`~neurofm.evaluate.cluster` — ``cluster_embedding``: kNN graph, Leiden, ARI/NMI/…
- :mod:`~neurofm.evaluate.label_efficiency` — ``label_efficiency``: few-shot probe curves
- :mod:`~neurofm.evaluate.visualize` — ``visualize``: seeded t-SNE and UMAP figures
- :mod:`~neurofm.evaluate.compare` — ``evaluate_embeddings`` (the entry), ``write_report``
- :mod:`~neurofm.evaluate.run_files` — what an evaluation run writes: its tables, ``run_meta.json``, figures
- :mod:`~neurofm.evaluate.promotion` — ``should_promote``: the champion alias rule (re-exported by compare)
- :mod:`~neurofm.evaluate.methods` — ``embed_methods``, ``draw_tsne``, ``score_methods``: the evaluate pipeline's stages
- :mod:`~neurofm.evaluate.transfer` — ``evaluate_mapping``, ``score_mapped_file``: a reference mapping scored

Submodules are imported on demand, so ``import neurofm.evaluate`` stays cheap.
"""
