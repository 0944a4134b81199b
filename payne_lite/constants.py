"""Physical and instrument constants, in one place (no magic numbers inline)."""

from __future__ import annotations

#: Speed of light [km/s] (CODATA, exact).
C_KMS = 299_792.458

#: Boltzmann constant [eV/K].
K_BOLTZMANN_EV = 8.617_333_262e-5

#: theta = THETA_CONST / Teff is the usual 5040/T [eV^-1] of stellar spectroscopy.
THETA_CONST = 5039.77

#: APOGEE-like default instrument: resolving power and log10-lambda pixel step.
APOGEE_R = 22_500.0
APOGEE_DLOGLAM = 6.0e-6
