"""Pictures of features: PCA images on the original grid (:func:`pyramid_pca`, no matplotlib) and three-plane PNGs
of a CT with its features, a head's prediction or a point's similarity map (:func:`show`, needs ``vox2vec[viz]``)."""

from vox2vec.viz.pca import pyramid_pca
from vox2vec.viz.show import show

__all__ = ["pyramid_pca", "show"]
