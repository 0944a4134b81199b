"""Posterior samples in memory (:class:`PosteriorSamples`) and on disk
(:func:`save_samples`, :func:`load_samples`)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

#: Format tag and version of the saved-samples file.
SAMPLES_FORMAT = "payne_lite.samples"
SAMPLES_VERSION = 1


class PosteriorSamples(NamedTuple):
    """Samples of each star's posterior, physical units.

    Attributes:
        names: the k sampled parameters (labels, ``rv``, ``cont_<j>``; not fixed ones).
        units: their units.
        samples: one (m_i, k) array per star (emcee: the kept chain, flattened over
            walkers and thinned; mdn-is: the draws).
        weights: one (m_i,) array of normalised weights per star (mdn-is), or None
            (equal weights).
        method: per star, the sampler that produced them.
        n_chains: per star, the chains interleaved in ``samples`` (emcee: walkers,
            nuts: chains; rows are step-major, so ``samples.reshape(-1, n_chains,
            k)`` gives the (thinned) traces); 0 for mdn-is draws and failed stars.
        prior_lo, prior_hi: per star, (k,) the prior's support [physical units],
            or None where no sampler ran.
        prior_mu, prior_sd: per star, (k,) the Gaussian prior's mean and sd
            (``mdn-gauss``; sd = inf where the prior is flat), or None.
        log_prob: per star, (m_i,) the log posterior at each sample (in the
            sampler's coordinates, up to a constant), or None (failed stars, files
            written before it was kept).
        diverging: per star, (m_i,) bool, nuts: the transition to each kept draw
            diverged (draws thinned away are not seen: the table's
            ``n_divergent`` counts all); None for the other methods.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    samples: list
    weights: list
    method: list
    n_chains: list | None = None
    prior_lo: list | None = None
    prior_hi: list | None = None
    prior_mu: list | None = None
    prior_sd: list | None = None
    log_prob: list | None = None
    diverging: list | None = None


def save_samples(path, post: PosteriorSamples, meta: dict | None = None) -> None:
    """Write :class:`PosteriorSamples` to an HDF5 file (group ``star_<i>`` per star,
    datasets ``samples`` (m, k) physical, ``weights`` (m,) when weighted, and
    ``log_prob``, ``diverging`` (m,) and the prior's vectors when known).

    The file is written beside ``path`` and renamed over it when complete, so an
    interrupted write never leaves a half file under that name.
    """
    from .._h5 import atomic_h5_writer, set_json_attr

    with atomic_h5_writer(path, SAMPLES_FORMAT, SAMPLES_VERSION) as f:
        f.attrs["names"] = list(post.names)
        f.attrs["units"] = list(post.units)
        if meta:
            set_json_attr(f, "meta", {k: v for k, v in meta.items()})
        for i, x in enumerate(post.samples):
            g = f.create_group(f"star_{i}")
            g.attrs["method"] = post.method[i]
            if post.n_chains is not None:
                g.attrs["n_chains"] = int(post.n_chains[i])
            g.create_dataset(
                "samples", data=np.asarray(x), compression="gzip", fletcher32=True
            )
            if post.weights[i] is not None:
                g.create_dataset(
                    "weights", data=np.asarray(post.weights[i]), fletcher32=True
                )
            for key in ("prior_lo", "prior_hi", "prior_mu", "prior_sd", "log_prob"):
                val = getattr(post, key)
                if val is not None and val[i] is not None:
                    g.create_dataset(key, data=np.asarray(val[i], np.float64))
            if post.diverging is not None and post.diverging[i] is not None:
                g.create_dataset("diverging", data=np.asarray(post.diverging[i], bool))


def load_samples(path) -> tuple[PosteriorSamples, dict]:
    """Read a file written by :func:`save_samples` (``save_samples(path, samples, table.meta)``).

    Returns:
        (:class:`PosteriorSamples`, the sampling table's meta).

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not HDF5, corrupt or truncated, not a samples
            file, or of another format version.

    Examples:
        >>> post, meta = load_samples("samples.h5")              # doctest: +SKIP
        >>> x = post.samples[0]        # star 0: (m, k) in physical units
    """
    from .._h5 import get_json_attr, open_checked, read_dataset
    from ..errors import FileFormatError

    path = Path(path)
    with open_checked(path, SAMPLES_FORMAT, (SAMPLES_VERSION,)) as f:
        meta = get_json_attr(f, "meta", path) if "meta" in f.attrs else {}
        stars = sorted(
            (k for k in f if k.startswith("star_")), key=lambda k: int(k[5:])
        )
        optional = ("prior_lo", "prior_hi", "prior_mu", "prior_sd", "log_prob",
                    "diverging")  # fmt: skip
        keys = ("samples", "weights", "method", "n_chains", *optional)
        out = {key: [] for key in keys}
        for key in stars:
            g = f[key]
            if "samples" not in g:
                raise FileFormatError(f"{path}: {key} has no samples")
            out["samples"].append(read_dataset(g, "samples", path))
            out["weights"].append(
                read_dataset(g, "weights", path) if "weights" in g else None
            )
            out["method"].append(str(g.attrs["method"]))
            out["n_chains"].append(int(g.attrs.get("n_chains", 0)))
            for p in optional:
                out[p].append(read_dataset(g, p, path) if p in g else None)
        post = PosteriorSamples(
            tuple(str(v) for v in f.attrs["names"]),
            tuple(str(v) for v in f.attrs["units"]),
            **out,
        )
    return post, meta
