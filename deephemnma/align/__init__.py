"""HEMNMA elastic and rigid-body 3D-to-2D alignment, batched in torch (``deephemnma align``).

For every particle image, find the normal-mode amplitudes ``q``, the orientation ``A`` and
the origin ``o`` that make the projection of the reference deformed by ``Σ q_k v_k``,
rotated by ``A``, drawn at image centre − ``o`` and modulated by the particle's CTF match the
image (seed 000 §2.1.2). Three stages:

1. **Global search** (:mod:`.search`) at a low resolution (``search_box``, 32² by default):
   a template bank of the model at every orientation of a grid (Fibonacci directions ×
   in-plane angles, ``angular_step``) and every conformation of a coarse amplitude grid
   (``search_amplitude_points`` per mode over ± ``search_amplitude_rmsd`` Å) is projected
   once per run by Fourier slices of the rasterised model; each particle is correlated with
   all templates at all origins of a one-pixel grid within ``max_shift`` by one matrix
   product, its CTF applied to the image side. The ``candidates[0]`` best distinct poses
   (≥ 2 grid steps apart) go on. The amplitude grid matters: with deformations of ~5 Å RMS
   (the benchmark's) a rigid search finds the right orientation for only ~96 % of the
   particles at SNR 0.05, the conformation grid for > 99 %.
2. **Refinement** (:mod:`.refine`): pose and amplitudes together by batched, bounded
   L-BFGS on a rotation-vector perturbation of the rotation, the origin and the amplitudes
   (all expressed as Å of atomic displacement), through the analytic Gaussian-atom projector
   (:meth:`.model.ElasticModel.project`), coarse to fine over ``levels`` (32² → 64² → 128²
   by default: images Fourier-cropped, model matched in resolution), keeping the
   ``candidates[i]`` best per particle from one level to the next.
3. **Output** (:mod:`.run`): the best solution at the finest level, its score, a
   convergence flag and bit flags, written into the particle STAR; restartable in batches.

Similarity (:mod:`.levels`): the normalised cross-correlation of the CTF-modulated model
and the image over the whole box in the band 0 < |k| ≤ k_max — the Gaussian-noise
likelihood with the unknown gain and offset of the image profiled out, computed in Fourier
space so that CTFs, shifts and band limits are products.

Public API: :class:`AlignSettings`, :func:`align_star` (a chunk, from files),
:class:`Aligner` (arrays in, :class:`BatchResult` out), :func:`load_model` /
:class:`ElasticModel`.
"""
from .core import AlignSettings, Aligner, BatchResult
from .model import ElasticModel, load_model, model_from_modes
from .run import FLAG_AT_BOUND, align_star, progress_dir

__all__ = ["AlignSettings", "Aligner", "BatchResult", "ElasticModel", "load_model", "model_from_modes",
           "align_star", "progress_dir", "FLAG_AT_BOUND"]
