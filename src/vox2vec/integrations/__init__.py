"""Optional bridges to other tools, each behind its own extra and imported only when used.

* :mod:`vox2vec.integrations.monai` (``pip install "vox2vec[monai]"``): a MONAI-ready network and dictionary
  transforms that apply a model's input contract inside a MONAI ``Compose``.
* :mod:`vox2vec.integrations.dicom_seg` (``pip install "vox2vec[dicom]"``): a prediction written as a DICOM
  Segmentation that references its source series.

Importing this package imports neither MONAI nor highdicom.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vox2vec.errors import MissingExtraError

__all__ = ["import_extra"]


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the ``vox2vec[extra]`` that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f'pip install "vox2vec[{extra}]"') from None
