"""deephemnma: DeepHEMNMA (HEMNMA + deep learning) conformational landscapes from cryo-EM particles.

The conventions every stage shares live in one module each:

- :mod:`deephemnma.star`       STAR files (RELION 3.0–5 in, RELION 3.1+ out)
- :mod:`deephemnma.mrc`        MRC stacks and volumes (memory-mapped, streamed)
- :mod:`deephemnma.structure`  atomic models (gemmi)
- :mod:`deephemnma.geometry`   RELION ZYZ Euler angles, rotation matrices, quaternions
- :mod:`deephemnma.ctf`        RELION's CTF model
- :mod:`deephemnma.projection` Fourier-slice and Gaussian-atom projectors (torch)
"""

__version__ = "0.1.0"
