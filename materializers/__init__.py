"""ZenML materializers for neurofm's artifact types."""

from materializers.anndata_materializer import AnnDataMaterializer

__all__ = ["AnnDataMaterializer"]
