"""Interoperation with EDM's published networks (EDM, EDM-AOT): safe reading of their pickles, conversion to
aotdiff models, and EDM-named state dicts of aotdiff models.

* :func:`read_edm_pickle` unpickles with an allowlist of inert globals; nothing in the file is ever executed.
* :func:`convert_edm_pickle` turns an EDM ``EDMPrecond`` + ``SongUNet`` snapshot into an aotdiff denoiser.
* :func:`edm_state_dict` / :func:`edm_precond_kwargs` go the other way, for EDM-based tools.
"""

from aotdiff.interop.convert import (
    ConvertedModel,
    convert_edm_pickle,
    edm_pickle_weights,
    edm_precond_kwargs,
    edm_state_dict,
)
from aotdiff.interop.edm_names import EdmKey, edm_keys, from_edm_state_dict, to_edm_state_dict
from aotdiff.interop.edm_pickle import EdmPickleError, looks_like_pickle, read_edm_pickle

__all__ = [
    "ConvertedModel",
    "EdmKey",
    "EdmPickleError",
    "convert_edm_pickle",
    "edm_keys",
    "edm_pickle_weights",
    "edm_precond_kwargs",
    "edm_state_dict",
    "from_edm_state_dict",
    "looks_like_pickle",
    "read_edm_pickle",
    "to_edm_state_dict",
]
