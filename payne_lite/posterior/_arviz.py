"""Posterior samples as ArviZ data: :func:`to_inference_data` (one star, an
``arviz.InferenceData``) and :func:`to_datatree` (every star, an ``xarray.DataTree``
with a group per star), for ArviZ's summaries, diagnostics and plots and its
netCDF / zarr files. Needs the ``arviz`` extra (``pip install payne-lite[arviz]``).
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from ._diagnostics import import_arviz
from ._io import PosteriorSamples

#: Broadening parameters: scalar variables of the posterior, like ``rv``.
_SCALARS = ("rv", "vsini", "vmacro")


def _arviz():
    """The ``arviz`` module.

    Raises:
        ImportError: ArviZ is not installed, with the extra to install.
    """
    try:
        arviz = import_arviz()
    except ImportError as err:
        raise ImportError(
            "exporting samples to ArviZ needs the arviz package: "
            "pip install 'payne-lite[arviz]'"
        ) from err
    return arviz


def _chains(a: np.ndarray, n_chains: int) -> np.ndarray:
    """Saved rows ``a`` (m, ...), step-major over ``n_chains`` interleaved chains
    (0: independent draws, one chain) -> (chain, draw, ...)."""
    c = max(int(n_chains), 1)
    return np.swapaxes(a.reshape(-1, c, *a.shape[1:]), 0, 1)


def _json_safe(meta: dict) -> str:
    """``meta`` as JSON (values JSON cannot hold become their ``str``)."""
    return json.dumps(meta, default=str, sort_keys=True)


def to_inference_data(
    samples: PosteriorSamples, star: int = 0, *, meta: dict | None = None
):
    """One star's posterior samples as an ``arviz.InferenceData``.

    Groups and variables (physical units, as :func:`payne_lite.sample` reports):

    * ``posterior``: ``labels`` (chain, draw, label), the coordinate ``label``
      holding the label names (``Teff``, ``[Fe/H]``: names with ``/`` cannot be
      netCDF variables) and ``label_unit`` their units; ``rv`` (chain, draw)
      [km/s]; ``vsini``, ``vmacro`` [km/s] and ``cont`` (chain, draw, cont_coef)
      when they were sampled (fixed parameters are not). MCMC draws keep their
      chains (emcee's walkers, NUTS's chains; thinned as saved); mdn-is draws
      are one chain.
    * ``sample_stats``: ``lp``, the log posterior (in the sampler's coordinates, up
      to a constant); ``diverging`` (nuts); ``weight`` (mdn-is: the normalised
      importance weights. ArviZ's summaries and diagnostics treat draws as equal
      and as a Markov chain: for mdn-is draws resample by ``weight`` first, and
      read no R-hat or ESS from them).
    * ``constant_data``: the prior per sampled parameter (coordinate ``param``):
      ``prior_lo``, ``prior_hi`` (support) and ``prior_mu``, ``prior_sd``
      (Gaussian; sd inf where flat), when known.

    Attributes: ``star``, ``method``, ``n_chains``, ``units`` and, given the
    sampling table's ``meta``, ``payne_lite_meta`` (its JSON).

    Args:
        samples: :class:`PosteriorSamples` (:func:`payne_lite.sample` with
            ``return_samples=True``, or :func:`load_samples`).
        star: which star (row of the table).
        meta: the sampling table's meta (``table.meta``, or :func:`load_samples`'
            second value), kept as an attribute.

    Returns:
        ``arviz.InferenceData``; ``.to_netcdf(path)`` writes it and
        ``arviz.from_netcdf(path)`` reads it back.

    Raises:
        ImportError: ArviZ is not installed.
        IndexError: no such star.
        ValueError: the star has no samples (no sampler ran), or they do not
            split into its chains.

    Examples:
        >>> idata = to_inference_data(post, 0, meta=table.meta)  # doctest: +SKIP
        >>> arviz.summary(idata)                                 # doctest: +SKIP
    """
    az = _arviz()
    groups, coords, dims, attrs = _star_groups(samples, star, meta)
    with warnings.catch_warnings():  # emcee: often more walkers than saved steps
        warnings.filterwarnings("ignore", "More chains", UserWarning)
        idata = az.from_dict(**groups, coords=coords, dims=dims)
    for g in idata.groups():  # from_dict's attrs= reaches only some groups
        getattr(idata, g).attrs.update(attrs)
    post = idata.posterior
    units = dict(zip(samples.names, samples.units, strict=True))
    if "labels" in post:
        label_unit = [units[n] for n in post["label"].values.tolist()]
        post = post.assign_coords(label_unit=("label", label_unit))
    for n in _SCALARS:
        if n in post:
            post[n].attrs["units"] = units[n]
    idata.posterior = post
    return idata


def _star_groups(samples: PosteriorSamples, star: int, meta: dict | None):
    """The ``from_dict`` groups, coords, dims and attrs of one star."""
    n_star = len(samples.samples)
    if not -n_star <= star < n_star:
        raise IndexError(f"star {star} out of range ({n_star} stars)")
    star = star % n_star
    x = np.asarray(samples.samples[star], np.float64)
    method = samples.method[star]
    names, units = list(samples.names), list(samples.units)
    if x.shape[0] == 0:
        raise ValueError(f"star {star} has no samples ({method})")
    c = samples.n_chains[star] if samples.n_chains is not None else 0
    if x.shape[0] % max(c, 1):
        raise ValueError(f"star {star}: {x.shape[0]} samples are not {c} chains")
    xc = _chains(x, c)
    cont = [j for j, n in enumerate(names) if n.startswith("cont_")]
    lab = [j for j in range(len(names)) if names[j] not in _SCALARS and j not in cont]
    post = {}
    coords = {}
    dims = {}
    if lab:
        post["labels"] = xc[:, :, lab]
        coords["label"] = [names[j] for j in lab]
        dims["labels"] = ["label"]
    for j, n in enumerate(names):
        if n in _SCALARS:
            post[n] = xc[:, :, j]
    if cont:
        post["cont"] = xc[:, :, cont]
        coords["cont_coef"] = [int(names[j][5:]) for j in cont]
        dims["cont"] = ["cont_coef"]
    stats = {}
    for key, val in (("lp", samples.log_prob), ("diverging", samples.diverging)):
        if val is not None and val[star] is not None:
            stats[key] = _chains(np.asarray(val[star]), c)
    if samples.weights[star] is not None:
        stats["weight"] = _chains(np.asarray(samples.weights[star], np.float64), c)
    const = {}
    for key in ("prior_lo", "prior_hi", "prior_mu", "prior_sd"):
        val = getattr(samples, key)
        if val is not None and val[star] is not None:
            const[key] = np.asarray(val[star], np.float64)
            dims[key] = ["param"]
    if const:
        coords["param"] = names
    attrs = dict(
        star=int(star),
        method=str(method),
        n_chains=int(c),
        units=json.dumps(dict(zip(names, units, strict=True))),
        created_by="payne_lite",
    )
    if meta:
        attrs["payne_lite_meta"] = _json_safe(dict(meta))
    groups = dict(posterior=post, sample_stats=stats or None)
    groups["constant_data"] = const or None
    return groups, coords, dims, attrs


def to_datatree(samples: PosteriorSamples, *, meta: dict | None = None):
    """Every star's posterior samples as one ``xarray.DataTree``: a group
    ``star_<i>`` per star (attributes ``star``, ``method``) holding
    :func:`to_inference_data`'s groups (``star_<i>/posterior``,
    ``star_<i>/sample_stats``, ...; none for a star no sampler ran for); the root's
    attributes:
    ``n_stars``, ``names``, ``units`` and, given it, ``payne_lite_meta``.

    ``arviz.from_datatree(tree["star_0"])`` is star 0's ``InferenceData``;
    ``tree.to_netcdf(path)`` writes the tree (one file) and
    ``xarray.open_datatree(path)`` reads it back.

    Raises:
        ImportError: ArviZ is not installed.
    """
    import xarray as xr

    _arviz()
    nodes = {}
    for i, x in enumerate(samples.samples):
        nodes[f"star_{i}"] = xr.Dataset(
            attrs=dict(star=i, method=str(samples.method[i]))
        )
        if np.shape(x)[0] == 0:
            continue
        for group, ds in to_inference_data(samples, i).to_datatree().children.items():
            nodes[f"star_{i}/{group}"] = ds.to_dataset()
    tree = xr.DataTree.from_dict(nodes)
    tree.attrs = dict(
        n_stars=len(samples.samples),
        names=json.dumps(list(samples.names)),
        units=json.dumps(list(samples.units)),
        created_by="payne_lite",
    )
    if meta:
        tree.attrs["payne_lite_meta"] = _json_safe(dict(meta))
    return tree
