"""payne_lite.catalog: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._apogee import APOGEE_BAD_PIXEL_BITS as APOGEE_BAD_PIXEL_BITS
from ._apogee import APOGEE_PIXMASK_BITS as APOGEE_PIXMASK_BITS
from ._apogee import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from ._apogee import ApogeeFitsCatalog as ApogeeFitsCatalog
from ._apogee import ApogeeSpectrum as ApogeeSpectrum
from ._apogee import chunk_bounds as chunk_bounds
from ._apogee import read_apogee_fits as read_apogee_fits
from ._apogee import visit_rows as visit_rows
from ._apvisit import ApogeeVisitCatalog as ApogeeVisitCatalog
from ._apvisit import ApVisit as ApVisit
from ._apvisit import apstar_wavelength as apstar_wavelength
from ._apvisit import read_apvisit as read_apvisit
from ._apvisit import resample_visit as resample_visit
from ._checks import CatalogChecks as CatalogChecks
from ._checks import check_catalog as check_catalog
from ._distributed import check_client as check_client
from ._distributed import connect as connect
from ._distributed import fit_chunks as fit_chunks
from ._distributed import local_client as local_client
from ._distributed import require as require
from ._distributed import worker_stats as worker_stats
from ._hdf5 import CATALOG_FORMAT as CATALOG_FORMAT
from ._hdf5 import CatalogChunk as CatalogChunk
from ._hdf5 import HDF5Catalog as HDF5Catalog
from ._hdf5 import Reader as Reader
from ._parts import parts_folder as parts_folder
from ._plain import FitsTableCatalog as FitsTableCatalog
from ._plain import PlainHDF5Catalog as PlainHDF5Catalog
from ._readers import iter_catalog as iter_catalog
from ._readers import open_catalog as open_catalog
from ._readers import reader_names as reader_names
from ._readers import register_reader as register_reader
from ._results import FORMATS as FORMATS
from ._results import HDF5_PATH as HDF5_PATH
from ._results import KEY_COLUMNS as KEY_COLUMNS
from ._results import KEY_VERSION as KEY_VERSION
from ._results import RESULTS_FORMAT_VERSION as RESULTS_FORMAT_VERSION
from ._results import SAFE_NAME_EXAMPLES as SAFE_NAME_EXAMPLES
from ._results import format_of as format_of
from ._results import model_from_results as model_from_results
from ._results import read_results as read_results
from ._results import safe_column_name as safe_column_name
from ._results import safe_column_names as safe_column_names
from ._results import write_results as write_results
from ._runner import fit_catalog as fit_catalog
from ._runner import fit_rows as fit_rows
from ._specutils import SpecutilsCatalog as SpecutilsCatalog
from ._writer import CatalogWriter as CatalogWriter
from ._writer import catalog_writer as catalog_writer
from ._writer import write_catalog as write_catalog

__all__ = [
    "CatalogChecks",
    "check_catalog",
    "APOGEE_BAD_PIXEL_BITS",
    "APOGEE_PIXMASK_BITS",
    "ApogeeFitsCatalog",
    "ApogeeSpectrum",
    "ApogeeVisitCatalog",
    "ApVisit",
    "apstar_wavelength",
    "CATALOG_FORMAT",
    "CatalogChunk",
    "CatalogWriter",
    "DEFAULT_CHUNK_SIZE",
    "FitsTableCatalog",
    "FORMATS",
    "HDF5Catalog",
    "HDF5_PATH",
    "PlainHDF5Catalog",
    "Reader",
    "SpecutilsCatalog",
    "KEY_COLUMNS",
    "KEY_VERSION",
    "RESULTS_FORMAT_VERSION",
    "SAFE_NAME_EXAMPLES",
    "catalog_writer",
    "check_client",
    "chunk_bounds",
    "connect",
    "fit_catalog",
    "fit_chunks",
    "fit_rows",
    "format_of",
    "iter_catalog",
    "local_client",
    "model_from_results",
    "open_catalog",
    "parts_folder",
    "read_apogee_fits",
    "read_apvisit",
    "reader_names",
    "register_reader",
    "read_results",
    "require",
    "resample_visit",
    "safe_column_name",
    "safe_column_names",
    "visit_rows",
    "worker_stats",
    "write_catalog",
    "write_results",
]
