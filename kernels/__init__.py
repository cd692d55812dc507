"""GPU kernels (Triton), each beside its PyTorch reference and a dispatcher: Triton on CUDA, the reference
elsewhere (BRANCHMERGE_KERNELS=reference|triton forces one). merge.py: the TIES / DARE / DELLA per-tensor
passes (drop / trim + rescale, sign election + disjoint mean in one pass). Planned (issue 3): fused linear
cross-entropy / selective log-softmax. Nothing here imports models/."""
