"""Readers of the images layer: files (NIfTI, NRRD, MetaImage) and DICOM series → (array, grid), and the checks that
refuse a file before it is decompressed or a series before it is stacked. :func:`vox2vec.load_volume` is the front
door; these modules are its parts."""

from vox2vec.readers.dicom import DicomSeries, dicom_series_ids, looks_like_dicom
from vox2vec.readers.files import IMAGE_SUFFIXES, image_stem

__all__ = ["IMAGE_SUFFIXES", "DicomSeries", "dicom_series_ids", "image_stem", "looks_like_dicom"]
