"""The baselines every model number is reported beside, as strong as we can make them.

- **PCA** on scanpy's standard recipe: ``normalize_total`` (10,000 counts per cell), ``log1p``, the
  2,000 most variable genes when there are more (``highly_variable_genes``, Seurat flavour), 50
  principal components — what a user gets from ``sc.pp.pca`` before any model.
- **scVI** (scvi-tools): a variational autoencoder with a negative-binomial likelihood of the raw counts
  and the library size as an offset, trained on the evaluation data itself (CPU, seeded, scvi-tools'
  default epoch rule ``min(round(20,000 / n_cells × 400), 400)``; 2,000 Seurat-v3 variable genes when
  there are more; ``n_latent`` 10, scvi-tools' default). It sees the evaluation cells (not labels)
  during training, as PCA does — the usual transductive practice.
- The random-weights encoder (the same architecture, untrained) comes from :mod:`neurofm.embedding`.

Every baseline is scored by the same probe menu, split and clustering as the model.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA

from neurofm import keys
from neurofm.config import SCARCHES_QUERY_EPOCHS
from neurofm.errors import NeurofmError

logger = logging.getLogger(__name__)


def log_normalised_counts(adata: ad.AnnData, target_sum: float = 1e4) -> np.ndarray | sp.spmatrix:
    """Return log1p(counts scaled to ``target_sum`` per cell), computed on a copy.

    Counts are read from ``layers['counts']`` when present, else from ``X``. ``adata`` is not changed.
    """
    counts = adata.layers[keys.COUNTS_LAYER] if keys.COUNTS_LAYER in adata.layers else adata.X
    if counts is None:
        raise NeurofmError("AnnData has no X and no 'counts' layer; pass raw counts for the PCA baseline")
    work = ad.AnnData(X=counts.copy().astype(np.float32))
    sc.pp.normalize_total(work, target_sum=target_sum)
    sc.pp.log1p(work)
    return work.X


def highly_variable(adata: ad.AnnData, values, n_top_genes: int, flavor: str = "seurat") -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes (all genes when there are no more)."""
    if adata.n_vars <= n_top_genes:
        return np.ones(adata.n_vars, dtype=bool)
    work = ad.AnnData(X=values)
    sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor=flavor)
    return work.var["highly_variable"].to_numpy()


def pca_baseline(
    adata: ad.AnnData,
    n_components: int = 50,
    target_sum: float = 1e4,
    seed: int = 0,
    fit_indices: np.ndarray | None = None,
    n_top_genes: int = 2000,
) -> np.ndarray:
    """PCA of log-normalised counts, one row per cell (``float32``, shape ``n_cells × k``).

    Counts (``layers['counts']`` or ``X``) are normalised per cell to ``target_sum`` and log1p'd on a
    copy, restricted to the ``n_top_genes`` most variable genes when there are more (scanpy's recipe),
    then projected on ``k = min(n_components, n_cells - 1, n_genes - 1)`` principal components.

    Honesty note: PCA is unsupervised (it never sees labels) but by default it is fit on *all* cells,
    test cells included — the usual transductive practice in single-cell analysis. Pass
    ``fit_indices`` (e.g. the probe's training indices) to fit the components on those cells only
    and project every cell with them. Nothing is written to ``adata``; store the result under
    ``obsm['X_pca_baseline']`` if wanted. Deterministic for a given ``seed``.
    """
    n_cells, n_genes = adata.shape
    fit_rows = n_cells if fit_indices is None else len(fit_indices)
    n_components_used = min(n_components, fit_rows - 1, n_genes - 1)
    if n_components_used < 1:
        raise NeurofmError(
            f"PCA baseline needs at least 2 cells and 2 genes, got {fit_rows} × {n_genes}; pass more data"
        )
    if n_components_used < n_components:
        logger.info("PCA baseline: %d components requested, %d used", n_components, n_components_used)
    values = log_normalised_counts(adata, target_sum=target_sum)
    genes = highly_variable(adata, values, n_top_genes)
    if not genes.all():
        values = values[:, genes]
        n_components_used = min(n_components_used, int(genes.sum()) - 1)
    if sp.issparse(values):
        values = values.toarray()  # PCA needs centring; the shared data fit comfortably in memory
    values = np.asarray(values, dtype=np.float64)
    # randomized SVD (seeded, so deterministic): 2-7x faster than the exact solvers at this size
    pca = PCA(n_components=n_components_used, svd_solver="randomized", random_state=seed)
    if fit_indices is None:
        pca.fit(values)
    else:
        pca.fit(values[np.asarray(fit_indices)])
    return pca.transform(values).astype(np.float32)


def scvi_baseline(
    adata: ad.AnnData,
    n_latent: int = 10,
    seed: int = 0,
    max_epochs: int | None = None,
    n_top_genes: int = 2000,
    early_stopping: bool = True,
) -> np.ndarray:
    """scVI's latent mean for every cell (``float32``, ``n_cells × n_latent``), trained on ``adata``.

    Raw counts (``layers['counts']`` or ``X``; the 2,000 Seurat-v3 variable genes when there are more)
    train an ``scvi.model.SCVI`` on the CPU, seeded; ``max_epochs`` None uses scvi-tools' own rule,
    with its early stopping on the held-out ELBO (``early_stopping``; 10 % of cells held out).
    ``adata`` is not changed. Deterministic for a given ``seed`` on a given machine.
    """
    import logging as _logging
    import warnings

    import scvi

    counts = adata.layers[keys.COUNTS_LAYER] if keys.COUNTS_LAYER in adata.layers else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    nonempty = np.diff(counts.indptr) > 0
    if nonempty.sum() < 3:
        raise NeurofmError("the scVI baseline needs at least 3 cells with counts; pass more cells")
    work = ad.AnnData(X=counts)
    if work.n_vars > n_top_genes:
        work = work[:, highly_variable(work, counts, n_top_genes, flavor="seurat_v3")].copy()
    scvi.settings.seed = seed
    scvi.settings.verbosity = _logging.ERROR
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        _logging.getLogger(name).setLevel(_logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(work)
        model = scvi.model.SCVI(work, n_latent=n_latent)
        model.train(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
            early_stopping=early_stopping,
        )
        latent = model.get_latent_representation()
    logger.info("scVI baseline: %d latent dimensions on %d cells × %d genes", n_latent, *work.shape)
    return np.asarray(latent, dtype=np.float32)


# ------------------------------------------------------------------ reference mapping (fit on the reference)


def shared_gene_views(
    reference: ad.AnnData, query: ad.AnnData, gene_col: str | None = None
) -> tuple[ad.AnnData, ad.AnnData]:
    """The reference and the query restricted to the genes both measure, in one order (names matched as
    :mod:`neurofm.genes` matches them: Ensembl versions stripped, case-insensitive; the query's names from
    ``var[gene_col]`` when given, the reference's from var_names or, failing that, ``var['gene_symbol']``)."""
    from neurofm.genes import data_gene_names, normalise_gene_name

    query_names = [normalise_gene_name(n) for n in data_gene_names(query, gene_col)[0]]
    best: tuple[int, list[int], list[int]] = (0, [], [])
    candidates = [np.asarray(reference.var_names, dtype=str)]
    if keys.GENE_SYMBOL in reference.var:
        candidates.append(reference.var[keys.GENE_SYMBOL].astype(str).to_numpy())
    for names in candidates:
        position: dict[str, int] = {}
        for column, name in enumerate(query_names):
            position.setdefault(name, column)
        ref_columns, query_columns, seen = [], [], set()
        for column, name in enumerate(names):
            key = normalise_gene_name(name)
            if key in position and key not in seen:
                seen.add(key)
                ref_columns.append(column)
                query_columns.append(position[key])
        if len(ref_columns) > best[0]:
            best = (len(ref_columns), ref_columns, query_columns)
    if best[0] < 2:
        raise NeurofmError(
            "the reference cells and the query share fewer than 2 genes; name the query's genes with --gene-col"
        )
    return reference[:, best[1]], query[:, best[2]]


def _counts(adata: ad.AnnData):
    counts = adata.layers[keys.COUNTS_LAYER] if keys.COUNTS_LAYER in adata.layers else adata.X
    return sp.csr_matrix(counts, dtype=np.float32)


def pca_reference_projection(
    reference: ad.AnnData, query: ad.AnnData, n_components: int = 50, n_top_genes: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """PCA on scanpy's recipe fit on the reference (its variable genes, its components), the query
    projected onto them: ``(reference × k, query × k)`` float32. Same genes in both (see
    :func:`shared_gene_views`)."""
    ref_values = log_normalised_counts(ad.AnnData(X=_counts(reference)))
    query_values = log_normalised_counts(ad.AnnData(X=_counts(query)))
    genes = highly_variable(reference, ref_values, n_top_genes)
    ref_values, query_values = (np.asarray(sp.csr_matrix(v)[:, genes].toarray(), np.float64) for v in (ref_values, query_values))
    k = min(n_components, ref_values.shape[0] - 1, ref_values.shape[1] - 1)
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(ref_values)
    return pca.transform(ref_values).astype(np.float32), pca.transform(query_values).astype(np.float32)


def log_count_features(
    reference: ad.AnnData, query: ad.AnnData, n_top_genes: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised counts (CP10k, log1p) of the shared genes as features — no embedding at all; the
    reference's ``n_top_genes`` most variable genes when there are more."""
    ref_values = log_normalised_counts(ad.AnnData(X=_counts(reference)))
    query_values = log_normalised_counts(ad.AnnData(X=_counts(query)))
    genes = highly_variable(reference, ref_values, n_top_genes)
    return tuple(np.asarray(sp.csr_matrix(v)[:, genes].toarray(), np.float32) for v in (ref_values, query_values))


SCVI_QUIET = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
              "logger": False, "enable_checkpointing": False}  # fmt: skip


def _quiet_scvi(seed: int):
    import logging as _logging

    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = _logging.ERROR
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        _logging.getLogger(name).setLevel(_logging.ERROR)
    return scvi


def scvi_reference(
    reference: ad.AnnData, n_latent: int = 10, seed: int = 0, n_top_genes: int = 2000, max_epochs: int | None = None
):
    """An ``SCVI`` trained on the reference's raw counts with scArches' settings (covariates encoded, layer
    norm, no batch norm, 2 layers, dropout 0.2), early stopping, the reference as one batch
    (``obs['batch']``), the reference's obs columns kept (scANVI's labels); the ``n_top_genes`` Seurat-v3
    variable genes when there are more. One model serves scVI, scArches and scANVI. ``max_epochs`` None:
    scvi-tools' epoch rule (a number caps it; for tests)."""
    import warnings

    ref = ad.AnnData(X=_counts(reference), obs=reference.obs.astype(str).reset_index(drop=True))
    ref.var_names = np.asarray(reference.var_names, dtype=str)
    ref.var["position"] = np.arange(ref.n_vars)  # the column in the shared-gene views (the query's too)
    if ref.n_vars > n_top_genes:
        genes = highly_variable(ref, ref.X, n_top_genes, flavor="seurat_v3")
        ref = ref[:, genes].copy()
    ref.obs["batch"] = "reference"
    scvi = _quiet_scvi(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
        model = scvi.model.SCVI(
            ref, n_latent=n_latent, n_layers=2, dropout_rate=0.2, encode_covariates=True,
            use_layer_norm="both", use_batch_norm="none",
        )  # fmt: skip
        model.train(max_epochs=max_epochs, early_stopping=True, **SCVI_QUIET)
    return model


def scvi_query_counts(model, query: ad.AnnData, batches=None) -> ad.AnnData:
    """The query's raw counts in the reference model's genes (``query``: the shared-gene view of
    :func:`shared_gene_views`, the reference view's genes in its order), ``obs['batch']`` = ``batches``
    (None: the reference's own batch, no adaptation)."""
    qry = ad.AnnData(X=_counts(query)[:, model.adata.var["position"].to_numpy()])
    qry.var_names = np.asarray(model.adata.var_names, dtype=str)
    qry.obs["batch"] = ["reference"] * qry.n_obs if batches is None else list(batches)
    return qry


def scvi_baseline_latent(model, query: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """scVI without adaptation: the reference model's latent means of the reference and of the query, read
    as the reference's own batch (``(reference × n_latent, query × n_latent)``)."""
    import warnings

    import scvi

    qry = scvi_query_counts(model, query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.prepare_query_anndata(qry, model)
        latent = model.get_latent_representation(qry)
    return np.asarray(model.get_latent_representation(), np.float32), np.asarray(latent, np.float32)


def scarches_baseline(
    reference: ad.AnnData,
    query: ad.AnnData,
    query_batches: np.ndarray | None = None,
    n_latent: int = 10,
    query_epochs: int = SCARCHES_QUERY_EPOCHS,
    seed: int = 0,
    n_top_genes: int = 2000,
    max_epochs: int | None = None,
    model=None,
) -> tuple[np.ndarray, np.ndarray]:
    """scArches through scvi-tools: the :func:`scvi_reference` model (``model``, or one trained here); the
    query (its own batches, ``query_batches``, or one) added by ``load_query_data`` — only the new
    batches' weights train — for ``query_epochs`` as scvi-tools' tutorial does. Returns the latent means
    ``(reference × n_latent, query × n_latent)``. Same genes in both (:func:`shared_gene_views`)."""
    import warnings

    import scvi

    if model is None:
        model = scvi_reference(reference, n_latent, seed, n_top_genes, max_epochs)
    batches = ["query"] * query.n_obs if query_batches is None else [f"query {b}" for b in query_batches]
    qry = scvi_query_counts(model, query, batches)
    _quiet_scvi(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference_latent = model.get_latent_representation()
        scvi.model.SCVI.prepare_query_anndata(qry, model)
        query_model = scvi.model.SCVI.load_query_data(qry, model)
        query_model.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, **SCVI_QUIET)
        query_latent = query_model.get_latent_representation()
    logger.info("scArches: reference %d cells, query %d cells × %d genes", model.adata.n_obs, qry.n_obs, qry.n_vars)
    return np.asarray(reference_latent, np.float32), np.asarray(query_latent, np.float32)


# ------------------------------------------------------------------ label-transfer tools a user would pick instead


class OneVsRestLogisticRegression:
    """scikit-learn's ``LogisticRegression(multi_class="ovr")`` as it was before scikit-learn 1.8 removed the
    option: one binary logistic regression (the same ``C``, solver, ``max_iter``, ``tol``) per class against
    the rest, stacked into ``coef_`` (classes × features), ``intercept_`` and ``classes_``.
    ``decision_function`` gives each class's own logit — what CellTypist turns into its per-class
    probabilities (a sigmoid, not a softmax)."""

    def __init__(self, C: float = 1.0, solver: str = "lbfgs", max_iter: int = 100, multi_class: str = "ovr",
                 n_jobs: int | None = None, tol: float = 1e-4) -> None:  # fmt: skip
        if multi_class != "ovr":
            raise NeurofmError(f"OneVsRestLogisticRegression fits one-vs-rest only, got multi_class={multi_class!r}")
        self.C, self.solver, self.max_iter, self.multi_class, self.n_jobs, self.tol = (
            C, solver, max_iter, multi_class, n_jobs, tol
        )

    def fit(self, X, y) -> OneVsRestLogisticRegression:
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise NeurofmError("a one-vs-rest classifier needs at least 2 labels in the reference")
        binary = [(label, y == label) for label in self.classes_]
        if len(self.classes_) == 2:  # one model, as scikit-learn fits two classes
            binary = binary[1:]
        coefs, intercepts, n_iter = [], [], []
        for _, target in binary:
            model = LogisticRegression(C=self.C, solver=self.solver, max_iter=self.max_iter, tol=self.tol)
            model.fit(X, target)
            coefs.append(model.coef_[0])
            intercepts.append(model.intercept_[0])
            n_iter.append(int(model.n_iter_[0]))
        self.coef_, self.intercept_ = np.vstack(coefs), np.asarray(intercepts)
        self.n_iter_, self.n_features_in_ = np.asarray(n_iter), self.coef_.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        scores = X @ self.coef_.T + self.intercept_
        return np.asarray(scores).ravel() if scores.shape[1] == 1 else np.asarray(scores)

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(int)]
        return self.classes_[scores.argmax(axis=1)]


def celltypist_train(adata: ad.AnnData, labels, **kwargs):
    """``celltypist.train(adata, labels, **kwargs)`` — its own gene filter, scaling, solver and ``max_iter``
    rules — returning a ``celltypist.models.Model``. ``adata``: log1p-normalised to 10,000 counts per cell,
    as CellTypist requires. Its default trainer (no SGD) builds ``LogisticRegression(multi_class="ovr")``,
    which scikit-learn >= 1.8 refuses; there :class:`OneVsRestLogisticRegression`, the same model, takes
    its place for this call only. The SGD trainers (``use_SGD=True``) run unchanged."""
    import importlib
    import inspect

    import celltypist
    from sklearn.linear_model import LogisticRegression

    module = importlib.import_module("celltypist.train")
    substitute = "multi_class" not in inspect.signature(LogisticRegression).parameters
    original = module.LogisticRegression
    if substitute:
        module.LogisticRegression = OneVsRestLogisticRegression
    try:
        return celltypist.train(adata, labels, **kwargs)
    finally:
        module.LogisticRegression = original


def symphony_reference(
    counts: ad.AnnData, n_components: int = 30, target_sum: float = 1e5, n_clusters: int | None = None, seed: int = 0
) -> ad.AnnData:
    """A Symphony reference built by symphonypy's recipe from raw counts: ``normalize_total`` to
    ``target_sum`` (symphonypy's 1e5), ``log1p``, every gene (all highly variable when there are no more
    than 2,000), ``scale`` (max 10; means and sds kept in ``var``), PCA of ``n_components`` (not re-centred),
    then ``symphonypy.pp.harmony_integrate`` with the reference as one batch: Harmony's soft clusters
    (K = min(N/30, 100), or ``n_clusters``) and its compressed reference (``uns['harmony']``) that the
    mapping needs; with one batch Harmony corrects nothing (``obsm['X_pca_harmony']`` = ``obsm['X_pca']``).
    symphonypy's path without Harmony (soft k-means inside ``map_embedding``) is not used: in 0.2.4 it stores
    the clusters' mean positions where the query correction expects their sums, which pulls every query
    cell towards the origin. Labels stay in ``obs`` as given."""
    import warnings

    import symphonypy

    work = ad.AnnData(X=_counts(counts), obs=counts.obs.copy())
    work.var_names = np.asarray(counts.var_names, dtype=str)
    sc.pp.normalize_total(work, target_sum=target_sum)
    sc.pp.log1p(work)
    work.var["highly_variable"] = True if work.n_vars <= 2000 else highly_variable(work, work.X, 2000)
    work = work[:, work.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(work, max_value=10)
    sc.pp.pca(work, n_comps=min(n_components, work.n_vars - 1, work.n_obs - 1), zero_center=False, random_state=seed)
    work.obs["symphony_batch"] = "reference"
    options = {} if n_clusters is None else {"nclust": n_clusters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        symphonypy.pp.harmony_integrate(work, key="symphony_batch", random_seed=seed, **options)
    return work


def symphony_map_query(reference: ad.AnnData, query_counts: ad.AnnData, target_sum: float = 1e5) -> ad.AnnData:
    """The query's raw counts normalised as the reference was and mapped onto a :func:`symphony_reference` with
    ``symphonypy.tl.map_embedding`` (``obsm['X_pca_harmony']``: the query in the reference's corrected PCA)."""
    import warnings

    import symphonypy

    query = ad.AnnData(X=_counts(query_counts))
    query.var_names = np.asarray(query_counts.var_names, dtype=str)
    sc.pp.normalize_total(query, target_sum=target_sum)
    sc.pp.log1p(query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        symphonypy.tl.map_embedding(query, reference)
    return query


def symphony_knn(reference: ad.AnnData, query: ad.AnnData, column: str, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, vote share of the winning label)``: the k-nearest-neighbour vote that
    ``symphonypy.tl.transfer_labels_kNN`` runs (scikit-learn ``KNeighborsClassifier``, its default ``k`` = 5,
    Symphony R's ``knnPredict`` default too), the reference's Harmony PCA against the mapped query's."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k)
    knn.fit(reference.obsm["X_pca_harmony"], reference.obs[column].astype(str))
    probability = knn.predict_proba(query.obsm["X_pca_harmony"])
    return knn.classes_[probability.argmax(axis=1)], probability.max(axis=1)


def symphony_map(
    reference: ad.AnnData, query_counts: ad.AnnData, label_columns, target_sum: float = 1e5, k: int = 5,
    chunk: int = 5000,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Map raw query counts onto a :func:`symphony_reference` (:func:`symphony_map_query`) and transfer each
    label column by :func:`symphony_knn`. Returns ``{column: (labels, vote share of the winning label)}`` and
    Symphony's per-cell Mahalanobis distance (``symphonypy.tl.per_cell_confidence``; higher means less
    confident), computed ``chunk`` cells at a time."""
    import symphonypy

    query = symphony_map_query(reference, query_counts, target_sum)
    distance = np.empty(query.n_obs)
    for start in range(0, query.n_obs, chunk):
        part = query[start : start + chunk].copy()
        symphonypy.tl.per_cell_confidence(part, reference)
        distance[start : start + chunk] = part.obs["symphony_per_cell_dist"].to_numpy()
    return {column: symphony_knn(reference, query, column, k) for column in label_columns}, distance
