"""GPU kernels (Triton), each beside its PyTorch reference and a dispatcher: Triton on CUDA, the reference
elsewhere. Planned (issues 3 and 4): fused linear cross-entropy / selective log-softmax, TIES/DARE merge
passes. Nothing here imports models/."""
