"""deephemnma: DeepHEMNMA (HEMNMA + deep learning) conformational landscapes from cryo-EM particles.

The conventions every stage shares live in one module each:

- :mod:`deephemnma.core.star`       STAR files (RELION 3.0–5 in, RELION 3.1+ out)
- :mod:`deephemnma.core.mrc`        MRC stacks and volumes (positioned reads, streamed writes)
- :mod:`deephemnma.core.structure`  atomic models (gemmi)
- :mod:`deephemnma.core.geometry`   RELION ZYZ Euler angles, rotation matrices, quaternions
- :mod:`deephemnma.core.ctf`        RELION's CTF model
- :mod:`deephemnma.core.projection` Fourier-slice and Gaussian-atom projectors (torch)
"""

__version__ = "0.1.0"
