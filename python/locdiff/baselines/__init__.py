"""Baselines measured beside LocDiff in the same run: nearest neighbours in embedding space
(points and a von Mises-Fisher density), a geocell classifier (PlaNet-style) and a plain
regression of the location.

Every density method offers ``log_density_at(emb, latlon)`` (per steradian) and
``grid_probabilities(emb, grid)`` (cell probabilities), which :mod:`locdiff.evaluate` turns
into NLL and Recall-vs-Area.
"""
from locdiff.baselines.geocell import GeocellClassifier, spherical_kmeans
from locdiff.baselines.knn import KnnDensity, knn_predict, knn_top_k
from locdiff.baselines.regression import Regressor

__all__ = ["GeocellClassifier", "KnnDensity", "Regressor", "knn_predict", "knn_top_k", "spherical_kmeans"]
