"""The course as a static, offline website (``make site``): see :mod:`pretrain_lib.site.build`."""
from .build import build_site, page_path

__all__ = ["build_site", "page_path"]
