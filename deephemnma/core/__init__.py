"""Shared conventions and services, one definition each, used by every stage.

=================  =====================================================================
module             what it defines
=================  =====================================================================
``star``           STAR files (RELION 3.0–5 in, 3.1+ out), column names, flag bits
``mrc``            MRC images and stacks: lazy reading (positioned reads); atomic writers
``structure``      atomic models (PDB/mmCIF via gemmi)
``modes``          the normal-mode file (ModeSet) and the deformation x0 + Σ q_k v_k
``geometry``       orientation: RELION ZYZ Euler angles, matrices, quaternions, metrics
``projection``     shifts, Fourier-slice projection and back-projection, Gaussian projector
``ctf``            RELION's CTF model and sign, phase flip, Wiener filter
``density``        atoms → density (Peng 1996 scattering factors)
``imageops``       Fourier crop/pad, low-pass, background normalisation, contrast
``fsc``            Fourier shell correlation, masks
``features``       per-particle feature matrices from STAR columns
``kde``            binned 2-D density estimate
``plots``          matplotlib figures shared by the stages
``config``         the configuration: one JSON schema, defaults from it
``settings``       stage settings built from the configuration
``resume``         fingerprints, per-chunk records and done checks for resumable work
``device``         the torch device a stage runs on
``stage``          the declaration of a stage (sections, results folder, report section)
``fileio``         atomic writes, JSON, required inputs
``errors``         the one-line error types (exit code 2)
``logs``           logging and progress
``runtime``        CPU threads; ``parallel``: process pools
``demo_data``      the demo reference fetched from PyPI
=================  =====================================================================

Nothing here imports a stage.
"""
