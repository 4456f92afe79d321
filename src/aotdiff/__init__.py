"""aotdiff: diffusion models trained with Approximated Optimal Transport (Kim et al., IJCAI 2024).

Layout (each piece usable alone):
  aotdiff.diffusion   EDM maths: sigma distribution, preconditioning, loss (noise is an explicit input)
  aotdiff.sampling    Karras sigma schedule, Euler / Heun / stochastic samplers with exact NFE accounting
  aotdiff.coupling    who pairs which noise with which image: independent or exact OT (Hungarian) couplings
  aotdiff.nets        SongUNet (DDPM++ / NCSN++) and an MLP denoiser for 2-D toys
  aotdiff.data        built-in digits, 2-D toys, EDM folders/zips, CIFAR-10 tarball, .npz; augmentation
  aotdiff.metrics     FID / proxy FD, curvature and truncation error
  aotdiff.train       configs and presets, training loop, EMA, checkpoints, distributed helpers
"""

__version__ = "0.1.0"
